"""`lexvla train`: config → data → model → loss → step → checkpoints and metrics.

Read top to bottom: set up the mesh and data, build (or load) the model and split it into trainable,
frozen and the rest, create or restore the train state, then loop — step, log, evaluate, checkpoint —
until `config.train.num_steps`, SIGTERM or a preemption notice. Restarting with the same workdir resumes
from the latest checkpoint, data position included, bit for bit.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from lexvla_jax import build, configlib, explain, sharding, vocab
from lexvla_jax import step as step_lib
from lexvla_jax.checkpoints import Checkpointer
from lexvla_jax.data import pipeline, synthetic
from lexvla_jax.evaluate import retrieval
from lexvla_jax.metric_writers import MetricWriter


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. repeated non-finite losses); the message says why."""


def prepare_data(config: ml_collections.ConfigDict) -> None:
    """Generates the synthetic set and its tokenizer when the config asks for them and they are absent."""
    syn = config.data.get("synthetic")
    if syn is None:
        return
    if sharding.is_main_process():
        if not synthetic.exists(syn.dir):
            print(f"generating the synthetic dataset in {syn.dir} ...", flush=True)
            synthetic.make_synthetic(
                syn.dir, num_train=syn.train, num_eval=syn.eval, seed=syn.seed, image_size=syn.image_size
            )
        if config.data.tokenizer and not os.path.exists(config.data.tokenizer):
            captions = synthetic.all_captions(syn.dir)
            vocab.train_tokenizer(
                [*captions, config.data.prompt_template], config.model.text.vocab_size, config.data.tokenizer
            )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("prepare_data")


def _array_shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


class _StopSignal:
    """Turns SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains; returns the last logged and evaluated metrics."""
    sharding.initialize_distributed(config.dist)
    mesh = sharding.mesh_from_config(config.mesh)
    rules = tuple(tuple(r) for r in config.sharding.rules)
    tc = config.train
    sharding.check_batch_size(tc.global_batch_size, mesh, rules, tc.micro_batches)
    writer = MetricWriter(workdir, tc.num_steps, enabled=sharding.is_main_process())
    writer.log(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices")

    # Data.
    prepare_data(config)
    tokenizer = vocab.load_tokenizer(config.data.tokenizer)
    if (
        tokenizer.vocab_size != config.model.text.get("vocab_size", tokenizer.vocab_size)
        and not config.model.text_checkpoint
    ):
        raise TrainingError(
            f"tokenizer has {tokenizer.vocab_size} pieces but config.model.text.vocab_size="
            f"{config.model.text.vocab_size}; make them equal"
        )
    kept_ids = vocab.filter_vocabulary(tokenizer)
    prompt = pipeline.prompt_encoder(config.data, tokenizer)
    train_iter = pipeline.train_iterator(
        config.data, tc.global_batch_size, jax.process_index(), jax.process_count(), prompt
    )

    # Model, split into what trains, what is frozen, and the rest (random streams).
    with sharding.use_mesh_rules(mesh, rules):
        model = build.build_model(config, mesh, kept_ids)
    graphdef, params, frozen, rest = nnx.split(model, step_lib.trainable_filter(tc.trainable), nnx.Param, ...)
    del model
    writer.log(f"vocabulary {len(kept_ids)} words; parameters: trainable {_count(params):,}, frozen {_count(frozen):,}")
    tx, schedule = step_lib.make_optimizer(config.optim, tc.num_steps)
    abstract_state = jax.eval_shape(functools.partial(step_lib.init_train_state, tx=tx, seed=tc.seed), params)
    state_shardings = step_lib.train_state_shardings(abstract_state, tx, mesh, rules)
    state = jax.jit(functools.partial(step_lib.init_train_state, tx=tx, seed=tc.seed), out_shardings=state_shardings)(
        params
    )
    del params

    # Resume.
    ck = config.checkpoint
    checkpointer = Checkpointer(workdir, every_steps=ck.every_steps, keep=ck.keep, async_save=ck.async_save)
    latest = checkpointer.latest_step()
    if latest is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_shardings)
        state = checkpointer.restore(latest, target, train_iter)
        writer.log(f"resumed from step {latest}")

    # The compiled step.
    encoder = step_lib.Encoder(graphdef, pipeline.normalize_images)
    loss_config = step_lib.LossConfig(**config.loss.to_dict())
    train_step = step_lib.jit_train_step(
        encoder,
        tx,
        schedule,
        loss_config,
        tc.micro_batches,
        frozen_shardings=_array_shardings(frozen),
        rest_shardings=_array_shardings(rest),
        state_shardings=state_shardings,
        batch_sharding=sharding.batch_sharding(mesh, rules),
    )
    evaluator = _Evaluator(config, encoder, prompt, kept_ids, mesh, rules, frozen, rest)

    stop = _StopSignal()
    config_dict = config.to_dict()
    step = int(jax.device_get(state.step))
    last_metrics, previous = {}, None
    tick, tick_step = time.time(), step
    try:
        while step < tc.num_steps:
            with sharding.use_mesh_rules(mesh, rules):
                batch = pipeline.make_global_batch(next(train_iter), mesh, rules)
                state, metrics = train_step(frozen, rest, state, batch)
            step += 1
            # The previous step has finished by now or soon: reading it does not stall this one.
            _check_skips(previous, step - 1, tc.max_consecutive_skips)
            previous = metrics
            if step % tc.log_every == 0 or step == tc.num_steps:
                elapsed = time.time() - tick
                samples_per_s = (step - tick_step) * tc.global_batch_size / max(elapsed, 1e-9)
                last_metrics = {k: v for k, v in jax.device_get(metrics).items() if k != "update_ok"}
                last_metrics.update(
                    samples_per_s=samples_per_s,
                    samples_per_s_per_device=samples_per_s / jax.device_count(),
                    **{f"skipped_samples/{k}": v for k, v in train_iter.skip_counts.items()},
                )
                writer.write(step, last_metrics)
                writer.progress(
                    step, {k: last_metrics[k] for k in ("loss", "info_nce", "logit_scale", "samples_per_s")}
                )
                tick, tick_step = time.time(), step
            if config.eval.every_steps and step % config.eval.every_steps == 0 and step != tc.num_steps:
                writer.write(step, evaluator(state.params))
            preempted = stop.received or checkpointer.reached_preemption(step)
            last = step == tc.num_steps
            # A state whose update was skipped (non-finite loss or gradient) is never saved.
            if (preempted or last or checkpointer.due(step)) and bool(metrics["update_ok"]):
                checkpointer.save(step, state, train_iter, config_dict)
            if preempted:
                checkpointer.wait()
                writer.log(
                    f"stopped at step {step} on a termination signal; checkpoint saved, resume with the same workdir"
                )
                return last_metrics
        _check_skips(previous, step, tc.max_consecutive_skips)
        checkpointer.wait()
        final = evaluator(state.params, show_top_words=tc.show_top_words, writer=writer)
        writer.write(step, final)
        writer.log("final evaluation: " + "  ".join(f"{k}={v:.3f}" for k, v in final.items()))
        return {**last_metrics, **final}
    finally:
        stop.restore()
        checkpointer.wait()
        checkpointer.close()
        train_iter.close()  # stops the data workers
        writer.close()


def _check_skips(metrics, step: int, limit: int) -> None:
    """Stops the run after `limit` non-finite steps in a row."""
    if metrics is not None and int(metrics["consecutive_skips"]) >= limit:
        raise TrainingError(
            f"{limit} steps in a row had a non-finite loss or gradient (last at step {step}); "
            "lower config.optim.learning_rate or check the data"
        )


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


class _Evaluator:
    """Retrieval R@K on the eval set with the current trainable parameters (and top words, if asked)."""

    def __init__(self, config, encoder: step_lib.Encoder, prompt, kept_ids, mesh, rules, frozen, rest):
        self.config, self.mesh, self.rules = config, mesh, rules
        self.eval_set = pipeline.load_eval_set(config.data, prompt)
        self.tokenizer, self.kept_ids = prompt.tokenizer, kept_ids
        self.frozen, self.rest = frozen, rest

        def image_fn(params, frozen, rest, batch):
            model = encoder.merge(params, frozen, rest)
            return model.encode_image(pipeline.normalize_images(batch["image"]))

        def text_fn(params, frozen, rest, batch):
            model = encoder.merge(params, frozen, rest)
            return model.encode_text(batch["input_ids"], batch["attention_mask"])

        self.image_fn, self.text_fn = jax.jit(image_fn), jax.jit(text_fn)

    def __call__(self, params, show_top_words: int = 0, writer: MetricWriter | None = None) -> dict:
        with sharding.use_mesh_rules(self.mesh, self.rules):
            metrics, s_img, s_txt = retrieval.retrieval_eval(
                lambda b: self.image_fn(params, self.frozen, self.rest, b),
                lambda b: self.text_fn(params, self.frozen, self.rest, b),
                self.eval_set,
                self.config.eval.batch_size,
                self.mesh,
                self.rules,
            )
        n_img = len(s_img)
        per_image = len(s_txt) // max(n_img, 1)
        chance = retrieval.chance_recall(n_img, per_image, 1)
        metrics["eval/chance_i2t_r@1"] = chance["i2t_r@1"]
        metrics["eval/chance_t2i_r@1"] = chance["t2i_r@1"]
        if show_top_words and writer is not None:
            tokenizer, kept = self.tokenizer, self.kept_ids
            for i in range(min(show_top_words, n_img)):
                caption_index = int(np.flatnonzero(self.eval_set["image_of_text"] == i)[0])
                writer.log(f"eval image {i}: {explain.format_top_words(explain.top_words(s_img[i], kept, tokenizer))}")
                writer.log(f"  caption {self.eval_set['captions'][caption_index]!r}")
                words = explain.top_words(s_txt[caption_index], kept, tokenizer)
                writer.log(f"  caption words: {explain.format_top_words(words)}")
        return metrics


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lexvla train", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard files go here")
    config, args = configlib.parse_command(argv, parser)
    try:
        run(config, args.workdir)
    except TrainingError as e:
        print(f"lexvla train: {e}", file=sys.stderr)
        return 1
    return 0
