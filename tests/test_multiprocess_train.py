"""The whole `lexvla train` as 2 processes × 4 CPU devices on 127.0.0.1 against 1 process × 8 devices.

Two uninterrupted runs (shared by every test here) train the same 12 steps with data workers on, evaluation
every 6 steps and checkpoints every 4; the data are 2 streams, so both process counts read the same global
batches. The other tests stop (SIGTERM, a hang, Ctrl-C), resume across process counts, re-evaluate or kill
copies of these runs, and compare with them.
"""

import glob
import json
import multiprocessing
import os
import re
import shutil
import signal
import threading
import time

import jax
import numpy as np
import pytest
from support import local_cluster
from support.local_cluster import Cluster

from lexvla_jax import build, cli, configlib, inference, sharding, watchdog
from lexvla_jax.checkpoints import Checkpointer, VocabularyMismatch
from lexvla_jax.data import pipeline
from lexvla_jax.miniature import synthetic
from lexvla_jax.program import make_program
from lexvla_jax.text.tokenizer import load_tokenizer, train_tokenizer
from lexvla_jax.text.vocabulary import filter_vocabulary

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = 12
EXTRA = {
    "train.num_steps": STEPS,
    "train.log_every": 2,
    "train.show_top_words": 0,
    "train.record_sample_keys": True,
    "evals.retrieval.every_steps": 6,
    "eval.batch_size": 16,
    "checkpoint.every_steps": 4,
    "data.num_streams": 2,
    "data.num_workers": 1,
}
# Final parameters of different process counts differ by the order of the cross-process sums (measured: at
# most 2.5e-6 after 12 steps); 1e-5 is 1/300 of one AdamW step at the peak learning rate 3e-3.
PARAMS_TOL = dict(rtol=1e-4, atol=1e-5)
STOP_SECONDS = 120  # a stopped run must have checkpointed and exited within this after the signal
HANG_TIMEOUT = 5
# After process 1 stops fetching: its watchdog's timeout, process 0's (it completes at most one more step), the
# grace before exiting, and start-up slack on a loaded machine.
HANG_EXIT_BOUND = HANG_TIMEOUT + watchdog.GRACE_SECONDS + 60


@pytest.fixture(scope="session")
def runs(data_dir, tmp_path_factory):
    """`{"one": workdir of 1 process × 8 devices, "two": 2 processes × 4 devices}`, both run to the end."""
    root = tmp_path_factory.mktemp("runs")
    one = Cluster(root / "one", data_dir, 1, 8, **EXTRA, **{"train.final_eval": True})
    two = Cluster(root / "two", data_dir, 2, 4, **EXTRA, **{"train.final_eval": True})
    one.check()
    two.check()
    outputs = [one.output(0), two.output(0), two.output(1)]
    return {"one": one.workdir, "two": two.workdir, "outputs": outputs}


def _copy(workdir, tmp_path, name="work") -> str:
    target = str(tmp_path / name)
    shutil.copytree(workdir, target)
    return target


def _stopped_at(output: str) -> int:
    steps = re.findall(r"process \d+: stopped at step (\d+) on a termination signal", output)
    assert len(steps) == 1, output[-3000:]
    return int(steps[0])


def _params(workdir, step=STEPS) -> dict:
    return local_cluster.final_state(workdir, step)["params"]


def test_two_processes_train_like_one(runs):
    one, two = runs["one"], runs["two"]
    losses_one, losses_two = local_cluster.losses(one), local_cluster.losses(two)
    assert sorted(losses_two) == list(range(2, STEPS + 1, 2))
    np.testing.assert_allclose([losses_two[s] for s in losses_one], list(losses_one.values()), rtol=1e-5)
    assert len(set(np.round(list(losses_one.values()), 4))) > 3  # training really moved
    local_cluster.assert_close(_params(two), _params(one), **PARAMS_TOL)
    assert local_cluster.sample_keys(two) == local_cluster.sample_keys(one)
    evals_one, evals_two = local_cluster.eval_rows(one), local_cluster.eval_rows(two)
    assert sorted(evals_two) == [6, STEPS]
    for step, metrics in evals_one.items():
        # Recall is a ranking: a near-tie between two captions may flip under ~1e-7 of parameter noise, which
        # moves one of 24 images' R@K by 1/24 at most.
        for key, value in metrics.items():
            assert abs(evals_two[step][key] - value) <= 1 / 24 + 1e-6, (step, key)


def test_normal_exit_leaks_no_shared_memory(runs):
    for output in runs["outputs"]:
        assert "resource_tracker" not in output and "leaked shared_memory" not in output, output[-3000:]


def test_lexvla_eval_on_two_processes_writes_the_runs_final_evaluation(runs, data_dir, tmp_path):
    """`lexvla eval` as 2 processes × 4 devices on the 1-process run's last checkpoint, with an eval batch (12) that
    does not divide the 8 devices: eval/step_12.json holds the numbers of the run's own final evaluation (retrieval
    and PatchDis, batch 16), so the parameters were restored exactly and the vectors gathered across processes in
    order; only process 0 prints tables."""
    workdir = _copy(runs["one"], tmp_path)
    cluster = Cluster(workdir, data_dir, 2, 4, command_name="eval", **{**EXTRA, "eval.batch_size": 12})
    cluster.check()
    with open(os.path.join(workdir, "eval", f"step_{STEPS}.json")) as f:
        written = json.load(f)
    metrics = {k: v for k, v in written["metrics"].items() if not k.endswith("/seconds")}
    assert written["step"] == STEPS and metrics == local_cluster.eval_rows(runs["one"])[STEPS]
    assert "patchdis/miou" in metrics and "retrieval/threshold/active_words_image" in metrics
    for table in ("Retrieval (%)", "PatchDis (%)"):
        assert table in cluster.output(0) and table not in cluster.output(1)


def test_sigterm_to_one_process_stops_all_at_one_step_then_resume_across_process_counts(runs, data_dir, tmp_path):
    """Elastic resume both ways around a stop. The 1-process run's step-4 checkpoint continues on 2 processes; one
    of them gets SIGTERM, then SIGTERM again while stopping: both stop at one step with a checkpoint and exit 0.
    That checkpoint restores exactly onto 1 process × 8 devices and finishes there like the uninterrupted run: no
    sample repeated or skipped, parameters within the cross-process summation tolerance."""
    workdir = _copy(runs["one"], tmp_path)
    _truncate(workdir, step=4)
    cluster = Cluster(workdir, data_dir, 2, 4, **EXTRA)
    cluster.wait_for_output(0, r"resumed from step 4\b")
    cluster.wait_for_output(0, r" 6/12 ")  # the first logged step after the resume
    start = time.time()
    cluster.signal(signal.SIGTERM, [1])
    time.sleep(1.0)
    cluster.signal(signal.SIGTERM, [1])
    assert cluster.wait(timeout=STOP_SECONDS) == [0, 0] and time.time() - start < STOP_SECONDS
    stops = [_stopped_at(cluster.output(i)) for i in range(2)]
    assert stops[0] == stops[1] and 6 <= stops[0] < STEPS, stops
    stop = stops[0]
    assert local_cluster.saved_steps(workdir) == sorted({*range(4, stop, 4), stop})  # one checkpoint for the stop

    _assert_restores_exactly_on_one_process(workdir, stop, data_dir)
    resumed = Cluster(workdir, data_dir, 1, 8, **EXTRA)
    resumed.check()
    assert f"resumed from step {stop}" in resumed.output(0)
    local_cluster.assert_close(_params(workdir), _params(runs["one"]), **PARAMS_TOL)
    assert local_cluster.sample_keys(workdir) == local_cluster.sample_keys(runs["one"])  # steps 1-4, 5-stop, the rest
    losses = local_cluster.losses(workdir)
    np.testing.assert_allclose(
        [losses[s] for s in range(2, STEPS + 1, 2)], list(local_cluster.losses(runs["one"]).values()), rtol=1e-5
    )


def test_a_hang_stops_both_then_ctrl_c_stops_both_at_one_step_and_the_run_resumes_exactly(runs, data_dir, tmp_path):
    """Process 1 stops fetching batches at step 6: both watchdogs dump their stacks and exit. Resumed, a terminal's
    Ctrl-C stops both at one step with a checkpoint; resumed again, the run ends bit for bit as the uninterrupted
    2-process run, with the same batches."""
    workdir = str(tmp_path / "work")
    hang = {"train.hang_timeout": HANG_TIMEOUT, "train.debug_hang": "(1,6)"}
    hung = Cluster(workdir, data_dir, 2, 4, **EXTRA, **hang)
    hung.wait_for_output(1, r"debug_hang: no batch for step 6")
    hung_at = time.time()
    assert hung.wait(timeout=HANG_EXIT_BOUND + 60) == [watchdog.EXIT_CODE, watchdog.EXIT_CODE]
    assert time.time() - hung_at < HANG_EXIT_BOUND
    for i in range(2):
        out = hung.output(i)
        assert f"process {i}: no training step completed for " in out and "Current thread" in out, out[-3000:]
    assert "_debug_hang" in hung.output(1)  # the stuck frame is in process 1's dump
    dumps = glob.glob(os.path.join(workdir, "hangs", "process-*.txt"))
    assert sorted(os.path.basename(d).split("-")[1] for d in dumps) == ["0", "1"]
    assert local_cluster.saved_steps(workdir) == [4]

    # Resumed, then Ctrl-C in the terminal before its first step (while compiling): SIGINT to every process of the
    # job (trainers and data workers). Both stop after the first step, with a checkpoint.
    interrupted = Cluster(workdir, data_dir, 2, 4, **EXTRA)
    interrupted.wait_for_output(0, r"resumed from step 4\b")
    for proc in interrupted.procs:  # started data workers (see test_long_run's Ctrl-C test)
        local_cluster.wait_for_data_workers(proc.pid)
    for proc in interrupted.procs:
        for pid in [proc.pid, *local_cluster.children(proc.pid)]:
            os.kill(pid, signal.SIGINT)
    assert interrupted.wait(timeout=300) == [0, 0]
    stops = [_stopped_at(interrupted.output(i)) for i in range(2)]
    assert stops == [5, 5] and max(local_cluster.saved_steps(workdir)) == 5
    for i in range(2):
        assert f"process {i}: interrupted: stopping" in interrupted.output(i)
        assert "Traceback" not in interrupted.output(i), interrupted.output(i)[-3000:]

    resumed = Cluster(workdir, data_dir, 2, 4, **EXTRA)
    resumed.check()
    assert "resumed from step 5" in resumed.output(0)
    local_cluster.assert_bitwise_equal(
        local_cluster.final_state(workdir, STEPS), local_cluster.final_state(runs["two"], STEPS)
    )
    assert local_cluster.sample_keys(workdir) == local_cluster.sample_keys(runs["two"])


def _truncate(workdir: str, step: int) -> None:
    """Makes a finished workdir look as it was when step `step` was checkpointed."""
    for saved in local_cluster.saved_steps(workdir):
        if saved > step:
            shutil.rmtree(os.path.join(workdir, "checkpoints", str(saved)))
    local_cluster.truncate_sample_keys(workdir, step)


def _assert_restores_exactly_on_one_process(workdir: str, step: int, data_dir: str) -> None:
    """Restores step `step` onto this process's 8-device mesh (as `lexvla train` does) and compares bit for bit."""
    config = configlib.load_config(local_cluster.TINY_CONFIG, local_cluster.overrides(data_dir, **EXTRA))
    _, kept_ids = build.load_vocabulary(config)
    mesh = sharding.mesh_from_config(config.mesh)
    with sharding.use_mesh_rules(mesh, tuple(config.sharding.rules)):
        program, *_ = make_program(config, mesh, build.abstract_model(config, len(kept_ids)))
    checkpointer = Checkpointer(workdir, every_steps=4, keep=None, create=False)
    try:
        state = checkpointer.restore(step, program.abstract_state)
    finally:
        checkpointer.close()
    saved = local_cluster.final_state(workdir, step)
    for name in ("params", "opt_state"):
        restored, expected = jax.tree.leaves(getattr(state, name)), jax.tree.leaves(saved[name])
        assert len(restored) == len(expected) > 0
        for a, b in zip(restored, expected, strict=True):
            assert len(a.sharding.device_set) == 8
            np.testing.assert_array_equal(np.asarray(a), b)


def _refused(workdir, data_dir, capfd, monkeypatch, **extra) -> str:
    """`lexvla train` in this process on `workdir`: must stop with one line (exit code 2) before building a model."""
    monkeypatch.setattr(build, "build_model", lambda *a, **k: pytest.fail("the model was built before the refusal"))
    command = local_cluster.command(workdir, data_dir, **{**EXTRA, **extra})
    assert cli.main(command[command.index("train") :]) == 2
    err = capfd.readouterr().err
    assert err.startswith("lexvla train: ") and err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize(
    "setting, value, saved",
    [("data.num_workers", 0, 1), ("data.num_streams", 4, 2)],
    ids=["num_workers", "num_streams"],
)
def test_resume_with_other_data_layout_is_refused(runs, data_dir, tmp_path, capfd, monkeypatch, setting, value, saved):
    workdir = _copy(runs["one"], tmp_path)
    _truncate(workdir, step=4)
    assert _refused(workdir, data_dir, capfd, monkeypatch, **{setting: value}) == (
        f"lexvla train: the checkpoint's data position was saved with config.{setting}={saved} but this run has "
        f"{value}; set config.{setting}={saved} to resume it exactly"
    )


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except FileNotFoundError:
        return ""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_data_workers_end_with_their_trainer(data_dir, tmp_path):
    """SIGKILL of the trainer alone (what the OOM killer does): its two data workers are gone within 5 s."""
    cluster = Cluster(tmp_path / "work", data_dir, 1, 2, **{**EXTRA, "train.num_steps": 10_000})
    trainer = cluster.procs[0].pid
    deadline = time.time() + 600
    workers = []
    while len(workers) < 2:  # one worker per data stream
        assert time.time() < deadline and cluster.procs[0].poll() is None, cluster.output(0)[-3000:]
        time.sleep(0.1)
        workers = [c for c in local_cluster.children(trainer) if "spawn_main" in _command_line(c)]
    children = local_cluster.children(trainer)  # the workers and multiprocessing's resource tracker
    os.kill(trainer, signal.SIGKILL)
    assert cluster.wait(timeout=60) == [-signal.SIGKILL]
    deadline = time.time() + 5
    while any(map(_alive, children)) and time.time() < deadline:
        time.sleep(0.1)
    assert not [c for c in children if _alive(c)], [_command_line(c) for c in children if _alive(c)]


def _watch_trainer_then_sleep(trainer: int, watching) -> None:
    pipeline.end_with_parent(trainer=trainer)
    watching.set()
    time.sleep(60)


def test_a_worker_outlives_the_thread_that_started_it():
    """grain starts workers from its prefetch threads; a worker must live on when that thread ends (Linux's
    `PR_SET_PDEATHSIG` would kill it then: it watches the starting thread, not the process)."""
    context = multiprocessing.get_context("spawn")
    watching = context.Event()
    worker = context.Process(target=_watch_trainer_then_sleep, args=(os.getpid(), watching))
    thread = threading.Thread(target=lambda: (worker.start(), watching.wait(60)))
    thread.start()
    thread.join()
    try:
        assert watching.is_set()
        time.sleep(2)
        assert worker.is_alive()
    finally:
        worker.kill()
        worker.join()


@pytest.fixture(scope="module")
def other_tokenizer(data_dir, tmp_path_factory):
    """A tokenizer of the same size (512 pieces) trained on other text: another kept vocabulary."""
    path = str(tmp_path_factory.mktemp("other") / "tokenizer.model")
    texts = [caption.replace(" ", "-") for caption in synthetic.all_captions(data_dir)]
    train_tokenizer(texts, 512, path)
    return path


def _kept_words(tokenizer_path: str) -> int:
    return len(filter_vocabulary(load_tokenizer(tokenizer_path)))


def test_resume_with_another_vocabulary_is_refused(runs, data_dir, other_tokenizer, tmp_path, capfd, monkeypatch):
    workdir = _copy(runs["one"], tmp_path)
    trained, now = _kept_words(os.path.join(data_dir, "tokenizer.model")), _kept_words(other_tokenizer)
    assert trained != now
    error = _refused(workdir, data_dir, capfd, monkeypatch, **{"data.tokenizer": other_tokenizer})
    assert f"trained on {trained} kept words of" in error and f"{other_tokenizer} gives {now} of 512" in error

    config = configlib.load_config(
        local_cluster.TINY_CONFIG, local_cluster.overrides(data_dir, **{**EXTRA, "data.tokenizer": other_tokenizer})
    )
    with pytest.raises(VocabularyMismatch, match=rf"trained on {trained} kept words .* gives {now} of 512"):
        inference.restore(config, workdir)
