"""The training loop: config → data → model → loss → step → checkpoints and metrics.

Read top to bottom: start the processes, the data and the model, the
compiled program (`program.py`), create or restore the train state, then loop — step, log, evaluate,
checkpoint — until `config.train.num_steps` or a termination signal. Restarting with the same workdir
resumes from the latest checkpoint, data position included, bit for bit, also on another process count
that divides `config.data.num_streams`.

Several processes decide everything identically: where a decision needs host-local information (a
SIGTERM to one process), it goes through JAX's preemption sync point, which every process reaches at the
same step. A long run records where its wall time goes (`goodput.py`), dumps stacks and exits when no step
completes in time (`watchdog.py`), and resumes from the newest checkpoint that reads, setting damaged ones aside.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from lexvla_jax import build, explain, sharding, throughput
from lexvla_jax.checkpoints import Checkpointer, parse_kill_save, vocabulary_record, workdir_path
from lexvla_jax.data import layout, pipeline
from lexvla_jax.data.device_batch import make_global_batch
from lexvla_jax.evaluate import registry, table
from lexvla_jax.goodput import GoodputRecorder
from lexvla_jax.inference import LexicalEncoder
from lexvla_jax.metric_writers import MetricWriter, SampleKeyLog
from lexvla_jax.program import make_program
from lexvla_jax.watchdog import Watchdog


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. repeated non-finite losses); the message says why."""


class StopRequest:
    """Whether to stop after this step for a termination signal or Ctrl-C, decided the same way on every process.

    One process: a SIGTERM handler sets a flag. Several: JAX's preemption sync manager (started by
    `jax.distributed.initialize`) turns a SIGTERM to any process into one step at which
    `reached_preemption_sync_point` is true on all of them; its handler stays installed. It is asked with the
    number of steps this start has run (the same on every process), not the step: it places the sync point one
    past the largest counter it has seen (0 before the first call), so a notice that comes before the first step
    of a resumed run would otherwise name a step already behind it. SIGINT (Ctrl-C) is the
    same request: it sets the flag, or with several processes is passed on to this process as SIGTERM. A second
    SIGINT exits at once (code 130, one line, no traceback); the last complete checkpoint stays.
    """

    def __init__(self):
        self.received = self.interrupted = False
        self.calls = 0
        self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._interrupt)}
        if jax.process_count() == 1:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def _interrupt(self, signum, frame):
        who = f"process {jax.process_index()}"
        if self.interrupted:
            print(f"{who}: interrupted again: exiting now; the last complete checkpoint is kept", flush=True)
            os._exit(130)
        self.interrupted = True
        print(f"{who}: interrupted: stopping after this step with a checkpoint (Ctrl-C again: exit now)", flush=True)
        if jax.process_count() == 1:
            self.received = True
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    def __call__(self) -> bool:
        """Called once after every step, on every process."""
        self.calls += 1
        if jax.process_count() == 1:
            return self.received
        return multihost_utils.reached_preemption_sync_point(self.calls)

    def restore(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def run(config: ml_collections.ConfigDict, workdir: str, started_at: float | None = None) -> dict:
    """Trains; returns the last logged and evaluated metrics. `started_at`: when the run's start-up began
    (Unix time; default: now), for the goodput record."""
    started_at = time.time() if started_at is None else started_at
    sharding.initialize_distributed(config.dist)
    goodput = GoodputRecorder(workdir, enabled=sharding.is_main_process(), started_at=started_at)
    mesh, rules = sharding.mesh_and_rules(config)
    tc = config.train
    sharding.check_batch_size(tc.global_batch_size, mesh, rules, tc.micro_batches)
    writer = MetricWriter(workdir, tc.num_steps, enabled=sharding.is_main_process())
    writer.log(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices")

    # Data, and where a previous run of this workdir stopped: a checkpoint this run cannot continue exactly
    # (another vocabulary, data streams or worker count) is refused here, before the model is built.
    tokenizer, kept_ids = build.load_vocabulary(config)
    vocabulary = vocabulary_record(tokenizer, kept_ids, config.data.tokenizer)
    prompt = build.caption_encoder(config, tokenizer, kept_ids)
    writer.log(layout.check_layout(config.data, jax.process_count()))
    ck = config.checkpoint
    kill_at = parse_kill_save(ck.get("debug_kill_save", ()))
    checkpointer = Checkpointer(
        workdir, every_steps=ck.every_steps, keep=ck.keep, async_save=ck.async_save, kill_at=kill_at
    )
    new_train_iter = functools.partial(
        pipeline.train_iterator,
        config.data,
        tc.global_batch_size,
        prompt_encoder=prompt,
        keep_keys=tc.record_sample_keys,
    )
    train_iter = new_train_iter()
    sample_keys = SampleKeyLog(workdir, jax.process_index(), enabled=tc.record_sample_keys)
    stop = StopRequest()
    profiler = throughput.Profiler(str(workdir_path(workdir) / "profile"), tc.get("profile_steps"))
    hang_timeouts = tc.get("hang_timeout", 0), tc.get("hang_timeout_slow", 0)
    watchdog = Watchdog(*hang_timeouts, workdir_path(workdir) / "hangs", jax.process_index(), goodput.hung)
    try:
        for name in checkpointer.partial_saves:
            writer.log(f"removed {checkpointer.directory / name}: a checkpoint save that was cut short")

        def read_position(step):
            checkpointer.check_vocabulary(step, tokenizer, kept_ids, config.data.tokenizer)
            checkpointer.restore_data(step, train_iter)

        restore_start = time.perf_counter()
        with goodput.doing("restore"):
            _, latest = checkpointer.newest_readable(checkpointer.latest_step(), read_position, writer.log)
        restore_seconds = time.perf_counter() - restore_start

        # Model and program: trainable parameters in the train state, frozen ones and the rest beside it. A run that
        # resumes reads its trainable parameters from the checkpoint: they are not initialised first.
        resuming = latest is not None
        with sharding.use_mesh_rules(mesh, rules):
            model = build.build_model(config, mesh, kept_ids, trainable_abstract=resuming)
            program, params, frozen, rest = make_program(config, mesh, model)
        patch_size = model.config.vision.patch_size
        del model
        writer.log(
            f"vocabulary {len(kept_ids)} words; parameters: trainable {_count(params):,}, frozen {_count(frozen):,}"
        )
        if resuming:  # a damaged train state sets its checkpoint aside: an older one is read instead
            restore_start = time.perf_counter()
            with goodput.doing("restore"):
                state, latest = _restore_state(checkpointer, latest, program, read_position, writer.log)
            restore_seconds += time.perf_counter() - restore_start
        if latest is None:
            if resuming:  # no checkpoint was readable after all: parameters and data start anew
                with sharding.use_mesh_rules(mesh, rules):
                    _, params, _, _ = make_program(config, mesh, build.build_model(config, mesh, kept_ids))
                train_iter.close()
                train_iter = new_train_iter()
            state = program.init_state(params)
        else:
            goodput.resumed(latest)
            writer.log(f"resumed from step {latest} (checkpoint read in {restore_seconds:.3f} s)")
        del params

        encoder = LexicalEncoder.for_program(config, program, state.params, frozen, rest, prompt, kept_ids, patch_size)
        final_eval = tc.get("final_eval", True)
        evaluators = registry.build_evaluators(config, periodic_only=not final_eval)
        config_dict = config.to_dict()
        step = int(jax.device_get(state.step))
        last_metrics, previous = {}, None
        meter = throughput.StepMeter(
            global_batch=tc.global_batch_size,
            num_devices=jax.device_count(),
            flops_per_step_per_device=0.0,  # counted from the step's jaxpr at the first report
            peak_flops_per_device=throughput.peak_flops_per_device(),
        )
        first_step = step
        while step < tc.num_steps:
            goodput.switch("compile" if step == first_step else goodput.step_cause(step + 1))
            profiler.before_step(step, pending=previous)
            with meter.waiting_for_input(), goodput.doing("input_wait"):
                _debug_hang(tc.get("debug_hang", ()), step + 1)
                host_batch = next(train_iter)
            sample_keys.write(step + 1, host_batch)
            with sharding.use_mesh_rules(mesh, rules):
                batch = make_global_batch(host_batch, mesh, rules)
                if not meter.flops_per_step_per_device:
                    jaxpr = program.step.trace(frozen, rest, state, batch).jaxpr
                    flops = throughput.matmul_flops(jaxpr, jax.devices()[0].platform)  # the branches this platform runs
                    meter.flops_per_step_per_device = flops / jax.device_count()
                state, metrics = program.step(frozen, rest, state, batch)
            step += 1
            meter.step_done()
            if step == first_step + 1:  # leave compilation out of the first interval
                jax.block_until_ready(metrics)
                meter.restart()
            # The previous step has finished by now or soon: reading it does not stall this one.
            _check_skips(previous, step - 1, tc.max_consecutive_skips)
            previous = metrics
            watchdog.step_done()
            goodput.step_done(step)
            if step % tc.log_every == 0 or step == tc.num_steps:
                last_metrics = {k: v for k, v in jax.device_get(metrics).items() if k != "update_ok"}
                last_metrics.update(meter.report())
                last_metrics.update({f"skipped_samples/{k}": v for k, v in train_iter.skip_counts.items()})
                last_metrics.update(goodput.metrics())
                writer.write(step, last_metrics)
                shown = ("loss", "info_nce", "logit_scale", "samples_per_s", "mfu")
                writer.progress(step, {k: last_metrics[k] for k in shown if k in last_metrics})
            if step != tc.num_steps and any(e.due(step) for e in evaluators):
                jax.block_until_ready(state)  # the step's device work stays in the interval, outside the pause
                with meter.paused(), goodput.doing("evaluation"), watchdog.slow():
                    due = registry.run_evaluators(evaluators, encoder.with_params(state.params), step, writer.log)
                writer.write(step, due)
            preempted = stop()
            last = step == tc.num_steps
            # A state whose update was skipped (non-finite loss or gradient) is never saved.
            if (preempted or last or checkpointer.due(step)) and bool(metrics["update_ok"]):  # waits for the step
                with meter.paused(), goodput.doing("checkpoint"), watchdog.slow():
                    checkpointer.save(step, state, train_iter, config_dict, vocabulary)
            if preempted:
                with goodput.doing("checkpoint"), watchdog.slow():
                    checkpointer.wait()
                # Every process says so: on a pod, each host's log shows where it stopped.
                print(
                    f"process {jax.process_index()}: stopped at step {step} on a termination signal; "
                    "checkpoint saved, resume with the same workdir",
                    flush=True,
                )
                return last_metrics
        _check_skips(previous, step, tc.max_consecutive_skips)
        with goodput.doing("checkpoint"), watchdog.slow():
            checkpointer.wait()
        if not final_eval:
            return last_metrics
        goodput.switch("evaluation")
        watchdog.close()  # the final evaluation, top words and word maps run once, at their own pace
        final_encoder = encoder.with_params(state.params)
        final = registry.run_evaluators(evaluators, final_encoder, log=writer.log)
        writer.write(step, final)
        if evaluators:
            writer.log(f"final evaluation (step {step}):\n{table.format_results(evaluators, final)}")
        _show_top_words(final_encoder, evaluators, tc.show_top_words, writer.log)
        maps = _write_word_maps(final_encoder, evaluators, tc.get("word_maps", 0), workdir_path(workdir) / "word_maps")
        if maps:
            writer.log(f"word maps of {len(maps)} eval images in {maps[0].parent}")
        return {**last_metrics, **final}
    finally:
        watchdog.close()
        goodput.switch("shutdown")
        profiler.close()
        stop.restore()
        with goodput.doing("checkpoint"):
            checkpointer.wait()
        checkpointer.close()
        train_iter.close()  # stops the data workers
        writer.close()
        goodput.flush()


def _restore_state(checkpointer: Checkpointer, positioned: int, program, read_position, log):
    """(train state, step) of the newest checkpoint from step `positioned` down whose state reads (None, None when
    none does); the data iterator, positioned at `positioned`, is repositioned by `read_position` for an older one."""

    def read_state(step):
        if step != positioned:
            read_position(step)
        return checkpointer.restore(step, program.abstract_state)

    return checkpointer.newest_readable(positioned, read_state, log)


def _debug_hang(at: tuple, step: int) -> None:
    """`config.train.debug_hang=(process, step)`: that process stops (for good) fetching that step's batch."""
    if tuple(at) == (jax.process_index(), step):
        print(f"process {jax.process_index()}: debug_hang: no batch for step {step}", file=sys.stderr, flush=True)
        time.sleep(10**7)


def _check_skips(metrics, step: int, limit: int) -> None:
    """Stops the run after `limit` non-finite steps in a row."""
    if metrics is not None and int(metrics["consecutive_skips"]) >= limit:
        raise TrainingError(
            f"{limit} steps in a row had a non-finite loss or gradient (last at step {step}); "
            "lower config.optim.learning_rate or check the data"
        )


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _show_top_words(encoder: LexicalEncoder, evaluators, count: int, log) -> None:
    """Logs the top words of the first `count` images of the first retrieval set and of their first captions."""
    data = next((e.data for e in evaluators if e.type == "retrieval"), None)
    if not count or data is None:
        return
    count = min(count, len(data["image"]))
    first_caption = [int(np.flatnonzero(data["image_of_text"] == i)[0]) for i in range(count)]
    s_img = encoder.encode_images(data["image"][:count])
    s_txt = encoder.encode_texts([data["captions"][c] for c in first_caption])
    words = lambda s: explain.format_top_words(explain.top_words(s, encoder.kept_ids, encoder.tokenizer))
    for i in range(count):
        log(f"eval image {i}: {words(s_img[i])}")
        log(f"  caption {data['captions'][first_caption[i]]!r}")
        log(f"  caption words: {words(s_txt[i])}")


def _write_word_maps(encoder: LexicalEncoder, evaluators, count: int, directory) -> list:
    """PNGs of the top words of the first `count` images of the first retrieval set over their patch grids
    (`explain.plot_image_words`), titled with each image's first caption; written by the main process."""
    data = next((e.data for e in evaluators if e.type == "retrieval"), None)
    if not count or data is None:
        return []
    count = min(count, len(data["image"]))
    explained = explain.explain_images(encoder, data["image"][:count])  # every process: the encoder is collective
    if not sharding.is_main_process():
        return []
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, words in enumerate(explained):
        caption = data["captions"][int(np.flatnonzero(data["image_of_text"] == i)[0])]
        paths.append(directory / f"eval-image-{i}.png")
        with paths[-1].open("wb") as f:
            explain.plot_image_words(data["image"][i], words, f, title=textwrap.shorten(caption, 48))
    return paths
