"""A long run of `lexvla train`: goodput across restarts, the hang watchdog, Ctrl-C, damaged and partial checkpoints.

The runs are the cut-down tiny config of `test_train_loop.py` (24 steps, a checkpoint every 4) on 2 devices, so
their final states compare bit for bit with its uninterrupted run.
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from support import local_cluster

from lexvla_jax import cli, goodput, watchdog
from lexvla_jax.checkpoints import Checkpointer, parse_kill_save
from lexvla_jax.configlib import ConfigError

STEPS = local_cluster.STEPS
HANG = {"train.hang_timeout": 5}  # seconds without a step; start-up and checkpoints get hang_timeout_slow
WORKER = {"data.num_workers": 1}  # a data worker process, which Ctrl-C reaches too


def _start(workdir, data_dir, env, **extra) -> tuple[int, str]:
    """`lexvla train` to its end (or its hang) → (exit code, output)."""
    result = subprocess.run(local_cluster.command(workdir, data_dir, **extra), env=env, capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.slow
def test_two_hangs_then_the_end_goodput_and_exact_resume(uninterrupted, data_dir, env, tmp_path):
    """Start 1 hangs fetching step 7, start 2 fetching step 15: the watchdog dumps every thread's stack and exits
    124 each time; start 3 trains to the end. Steps 5-6 and 13-14 ran twice: the goodput record counts those 4 as
    redone, the restore time as logged, and its causes add up to the wall time measured here (launches, the time
    lost between starts and the file's last write, by this process's clock)."""
    workdir = str(tmp_path / "work")
    started = time.time()
    first, out1 = _start(workdir, data_dir, env, **HANG, **{"train.debug_hang": "(0,7)"})
    second, out2 = _start(workdir, data_dir, env, **HANG, **{"train.debug_hang": "(0,15)"})
    third, out3 = _start(workdir, data_dir, env, **HANG)
    # Wall time from the first launch to the last record (the file's modification time): what follows it, the
    # interpreter's exit, is outside every record.
    wall = os.path.getmtime(os.path.join(workdir, goodput.FILE)) - started
    assert (first, second, third) == (watchdog.EXIT_CODE, watchdog.EXIT_CODE, 0), out3[-3000:]
    for out in (out1, out2):
        assert "process 0: no training step completed for " in out and "Traceback" not in out
        assert "Current thread" in out and "_debug_hang" in out  # faulthandler's dump names the stuck frame
    dumps = glob.glob(os.path.join(workdir, "hangs", "process-0-*.txt"))
    assert len(dumps) == 2 and all("_debug_hang" in open(d).read() for d in dumps)
    assert "resumed from step 4" in out2 and "resumed from step 12" in out3
    local_cluster.assert_bitwise_equal(
        local_cluster.final_state(workdir, STEPS), local_cluster.final_state(uninterrupted[0], STEPS)
    )

    total = goodput.summarize(goodput.read_runs(workdir))
    assert total["runs"] == 3 and total["restores"] == 2 and total["last_step"] == STEPS
    assert total["redone_steps"] == 4
    logged = [float(s) for s in re.findall(r"checkpoint read in ([0-9.]+) s", out2 + out3)]
    assert total["seconds"]["restore"] == pytest.approx(sum(logged), abs=0.01)
    assert sum(total["seconds"].values()) == pytest.approx(total["wall_seconds"], rel=1e-9)
    assert total["wall_seconds"] == pytest.approx(wall, rel=0.02)
    for cause in ("productive", "startup", "compile", "checkpoint", "redone", "lost"):
        assert total["seconds"][cause] > 0, cause
    rows = [r for r in local_cluster.metric_rows(workdir) if "loss" in r]
    assert all(0 < r["goodput"] < 1 and "badput/compile" in r for r in rows)


def test_goodput_command_prints_the_causes(tmp_path, capsys):
    """`lexvla goodput` on two recorded starts: the table's figures are the records' sums."""
    clock = iter(range(100, 200)).__next__
    workdir = str(tmp_path / "work")
    for restored in (None, 2):
        recorder = goodput.GoodputRecorder(workdir, enabled=True, started_at=clock(), clock=clock)
        if restored is not None:
            recorder.resumed(restored)
        for step in range(1 + (restored or 0), 5):
            recorder.switch(recorder.step_cause(step))
            with recorder.doing("input_wait"):
                pass
            recorder.step_done(step)
        recorder.flush()
    total = goodput.summarize(goodput.read_runs(workdir))
    assert total["redone_steps"] == 2 and total["last_step"] == 4 and total["restores"] == 1
    assert sum(total["seconds"].values()) == total["wall_seconds"]
    assert cli.main(["goodput", "--workdir", workdir]) == 0
    out = capsys.readouterr().out
    assert f"goodput {100 * total['fractions']['productive']:.1f}%" in out and "(2 steps)" in out
    assert cli.main(["goodput", "--workdir", str(tmp_path / "none")]) == 2
    assert "no goodput.jsonl" in capsys.readouterr().err


def _popen(workdir, data_dir, env, **extra):
    """`lexvla train` in its own process group (as a terminal's foreground job), SIGINT's default disposition."""
    log = open(f"{workdir}.log", "w+")
    command = local_cluster.command(workdir, data_dir, **extra)
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _wait_for(proc, log, pattern: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not re.search(pattern, open(log.name).read()):
        assert proc.poll() is None and time.time() < deadline, open(log.name).read()[-3000:]
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_stops_with_a_checkpoint_and_a_second_exits_at_once(data_dir, env, tmp_path):
    """Ctrl-C (SIGINT to the process group, data worker included) stops after the step with a checkpoint, no
    traceback and no leaked shared memory; resumed, two Ctrl-Cs exit at once and the checkpoints still read."""
    workdir = str(tmp_path / "work")
    proc, log = _popen(workdir, data_dir, env, **WORKER)
    _wait_for(proc, log, r"\] 8/24 ")
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == 0
    out = open(log.name).read()
    stopped = int(re.search(r"process 0: stopped at step (\d+) on a termination signal", out).group(1))
    assert "process 0: interrupted: stopping after this step" in out
    for bad in ("Traceback", "KeyboardInterrupt", "leaked shared_memory", "resource_tracker"):
        assert bad not in out, out[-3000:]
    assert max(local_cluster.saved_steps(workdir)) == stopped < STEPS

    proc, log = _popen(workdir, data_dir, env, **WORKER)
    _wait_for(proc, log, rf"resumed from step {stopped}")
    # A Ctrl-C while a data worker is still importing shows that worker's KeyboardInterrupt traceback (a known
    # start-up window of a second or two): the Ctrl-Cs come once it has started.
    local_cluster.wait_for_data_workers(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    out = open(log.name).read()
    assert "interrupted again: exiting now" in out and "Traceback" not in out, out[-3000:]
    newest = max(local_cluster.saved_steps(workdir))
    assert newest >= stopped and local_cluster.final_state(workdir, newest)["params"]


def _damage(checkpoint_dir: str) -> None:
    """Overwrites 4 KiB of every array-data file of a checkpoint's train state (as a failing disk would): whatever
    a reader reads of it (the parameters alone, or the whole state) is damaged."""
    files = glob.glob(os.path.join(checkpoint_dir, "state", "ocdbt.process_*", "d", "*"))
    assert files, checkpoint_dir
    for target in files:
        with open(target, "r+b") as f:
            f.seek(min(64, os.path.getsize(target) // 2))
            f.write(b"\xff" * 4096)


@pytest.mark.slow
def test_damaged_newest_and_partial_saves_resume_from_the_newest_that_reads(
    uninterrupted,
    data_dir,
    env,
    tmp_path,
    capsys,
):
    """The run as it was at step 20 with step 20's array data damaged and two saves of step 24 cut short by a kill
    (during and after the array writes): `lexvla eval` names the damage and the older steps; `lexvla train` removes
    the partial saves, moves step 20 aside, resumes from 16 and ends bit for bit like the uninterrupted run."""
    workdir = str(tmp_path / "work")
    shutil.copytree(uninterrupted[0], workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    shutil.copytree(os.path.join(checkpoints, "24"), os.path.join(checkpoints, "24.orbax-checkpoint-tmp-1"))
    during = shutil.copytree(os.path.join(checkpoints, "24"), os.path.join(checkpoints, "24.orbax-checkpoint-tmp-2"))
    for path in glob.glob(os.path.join(during, "state", "ocdbt.process_*", "d", "*"))[1:]:
        os.remove(path)
    shutil.rmtree(os.path.join(checkpoints, "24"))
    _damage(os.path.join(checkpoints, "20"))

    eval_args = ["eval", *local_cluster.command(workdir, data_dir)[4:]]
    assert cli.main(eval_args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    damage = f"checkpoint step 20 in {checkpoints} is damaged: its {{}} cannot be read ("
    assert len(err) == 1 and damage.format("trained parameters") in err[0], err  # reading needs only those
    assert "--step N (steps 4, 8, 12, 16)" in err[0] and "config.model" not in err[0]

    code, out = _start(workdir, data_dir, env)
    assert code == 0, out[-3000:]
    for name in ("24.orbax-checkpoint-tmp-1", "24.orbax-checkpoint-tmp-2"):
        assert f"removed {os.path.join(checkpoints, name)}: a checkpoint save that was cut short" in out
    damaged = os.path.join(workdir, "damaged", "20")
    assert damage.format("train state") in out
    assert f"moved it to {damaged}; resuming from step 16" in out
    assert "resumed from step 16" in out and os.path.isdir(os.path.join(damaged, "state"))
    local_cluster.assert_bitwise_equal(
        local_cluster.final_state(workdir, STEPS), local_cluster.final_state(uninterrupted[0], STEPS)
    )


@pytest.mark.slow
def test_every_checkpoint_damaged_starts_anew_parameters_and_data(uninterrupted, data_dir, env, tmp_path):
    """A workdir whose only checkpoint (step 4) is damaged: the run says so, sets it aside and starts anew (fresh
    parameters, the data from its first batch, not from step 4's position), ending bit for bit like the
    uninterrupted run."""
    workdir = tmp_path / "work"
    shutil.copytree(os.path.join(uninterrupted[0], "checkpoints", "4"), workdir / "checkpoints" / "4")
    _damage(str(workdir / "checkpoints" / "4"))
    code, out = _start(workdir, data_dir, env)
    assert code == 0, out[-3000:]
    assert f"moved it to {workdir / 'damaged' / '4'}; no older checkpoint: starting anew" in out
    assert "resumed from step" not in out
    local_cluster.assert_bitwise_equal(
        local_cluster.final_state(workdir, STEPS), local_cluster.final_state(uninterrupted[0], STEPS)
    )


@pytest.mark.slow
def test_sigkill_before_during_and_after_the_array_writes_of_a_save(uninterrupted, data_dir, env, tmp_path):
    """Three starts SIGKILLed by the crash-test hook (`checkpoint.debug_kill_save`): at step 8's save before its
    array writes, at step 12's during them and at step 16's after them (before orbax finalises the save). Each
    next start removes the cut-short save in one line and resumes from the newest complete checkpoint; the fourth
    trains to the end, bit for bit like the uninterrupted run."""
    workdir = str(tmp_path / "work")
    checkpoints = os.path.join(workdir, "checkpoints")

    def assert_recovered(out, partial, step):
        assert f"removed {partial}: a checkpoint save that was cut short" in out, out[-3000:]
        assert f"resumed from step {step}" in out, out[-3000:]

    previous = None  # (the cut-short save, the step the next start resumes from)
    for step, point in ((8, "before"), (12, "during"), (16, "after")):
        code, out = _start(workdir, data_dir, env, **{"checkpoint.debug_kill_save": f"({step},'{point}')"})
        assert code == -signal.SIGKILL, out[-3000:]
        assert f"debug_kill_save: SIGKILL at step {step}, {point} the array writes" in out
        if previous:
            assert_recovered(out, *previous)
        assert max(local_cluster.saved_steps(workdir)) == step - 4, (point, local_cluster.saved_steps(workdir))
        partial = glob.glob(os.path.join(checkpoints, f"{step}.orbax-checkpoint-tmp*"))
        assert len(partial) == 1, (point, os.listdir(checkpoints))
        if point == "after":  # the arrays were written: only the finalising step is missing
            assert glob.glob(os.path.join(partial[0], "state*", "ocdbt.process_*", "d", "*")), point
        previous = partial[0], step - 4
    code, out = _start(workdir, data_dir, env)
    assert code == 0, out[-3000:]
    assert_recovered(out, *previous)
    # `train.final_eval=False` (the tests' default): no evaluation at the end, none recorded.
    assert "final evaluation" not in out and "evaluated " not in out
    assert not [row for row in local_cluster.metric_rows(workdir) if "retrieval/dense/i2t_r@1" in row]
    local_cluster.assert_bitwise_equal(
        local_cluster.final_state(workdir, STEPS), local_cluster.final_state(uninterrupted[0], STEPS)
    )


def test_a_bad_crash_test_setting_is_one_line():
    assert parse_kill_save(()) is None and parse_kill_save((8, "after")) == (8, "after")
    with pytest.raises(ConfigError, match=r"^config.checkpoint.debug_kill_save=\(8, 'late'\): use \(step, point\)"):
        parse_kill_save((8, "late"))


# ------------------------------------------------------------------------------------- gs:// workdirs


def test_damaged_newest_checkpoint_in_gcs_is_set_aside(gcs_emulator):
    """Step 2's array data damaged in the bucket: named as damaged, moved to damaged/2, step 1 restored."""
    workdir = gcs_emulator.new_workdir()
    state = {"codebook": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64), "step": jnp.int32(3)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    saver = Checkpointer(workdir, every_steps=1, keep=None)
    for step in (1, 2):
        saver.save(step, state, None, {"step": step}, {"ids": []})
        saver.wait()
    saver.close()
    data = [o for o in gcs_emulator.objects(workdir) if o.startswith("checkpoints/2/state/") and "/d/" in o]
    assert data, gcs_emulator.objects(workdir)
    damaged_object = epath.Path(workdir) / data[0]
    raw = damaged_object.read_bytes()
    damaged_object.write_bytes(raw[:16] + b"\xff" * 4096 + raw[16 + 4096 :])

    logs = []
    checkpointer = Checkpointer(workdir, every_steps=1, keep=None)
    try:
        restored, step = checkpointer.newest_readable(2, lambda s: checkpointer.restore(s, abstract), logs.append)
        assert step == 1 and checkpointer.all_steps() == [1]
    finally:
        checkpointer.close()
    np.testing.assert_array_equal(np.asarray(restored["codebook"]), np.asarray(state["codebook"]))
    assert len(logs) == 1 and logs[0].startswith(f"checkpoint step 2 in {workdir}/checkpoints is damaged: its train")
    assert logs[0].endswith(f"moved it to {workdir}/damaged/2; resuming from step 1")
    objects = gcs_emulator.objects(workdir)
    assert f"damaged/2/{data[0].removeprefix('checkpoints/2/')}" in objects
    assert not any(o.startswith("checkpoints/2/") for o in objects)


def test_goodput_command_reads_a_gcs_workdir(gcs_emulator, capsys):
    workdir = gcs_emulator.new_workdir()
    clock = iter(range(10, 100)).__next__
    recorder = goodput.GoodputRecorder(workdir, enabled=True, started_at=clock(), clock=clock)
    recorder.switch("productive")
    recorder.step_done(1)
    recorder.flush()
    assert "goodput.jsonl" in gcs_emulator.objects(workdir)
    assert cli.main(["goodput", "--workdir", workdir, "--json"]) == 0
    total = json.loads(capsys.readouterr().out)
    assert total["last_step"] == 1 and total["seconds"]["startup"] == 1  # clock ticks: start 10, first step 11
    assert total["seconds"]["productive"] == total["wall_seconds"] - 1 > 0


# ------------------------------------------------------------------------------------------ unit tests


def test_a_hang_counts_from_the_last_completed_step(tmp_path):
    now = [0.0]
    recorder = goodput.GoodputRecorder(str(tmp_path), enabled=True, started_at=0.0, clock=lambda: now[0])
    now[0] = 1.0
    recorder.switch("productive")  # start-up 0 → 1
    now[0] = 2.0
    recorder.step_done(1)  # step 1: 1 → 2
    now[0] = 3.0
    recorder.switch("input_wait")
    now[0] = 5.0
    recorder.hung()  # the next batch never came: 2 → 5 is the hang, not input wait
    (record,) = goodput.read_runs(str(tmp_path))
    assert record["seconds"]["hang"] == 3 and record["seconds"]["input_wait"] == 0
    assert record["seconds"]["productive"] == 1 and record["seconds"]["startup"] == 1
    assert sum(record["seconds"].values()) == record["end"] - record["start"] == 5


@pytest.mark.parametrize(
    ("value", "seconds", "multiple"), [("600", 600, 0), (0, 0, 0), ("20x", 0, 20), (" 2.5X ", 0, 2.5)]
)
def test_hang_timeout_forms(value, seconds, multiple):
    assert watchdog.parse_timeout(value) == (seconds, multiple)


@pytest.mark.parametrize("value", ["-1", "x", "0x", "ten"])
def test_bad_hang_timeout_is_one_line(value):
    with pytest.raises(watchdog.ConfigError, match="^config.train.hang_timeout=.* use e.g. 600"):
        watchdog.parse_timeout(value)


def test_the_timeout_follows_the_median_step_time(tmp_path):
    dog = watchdog.Watchdog("0", 100, tmp_path / "hangs", 0)  # off: no thread, the arithmetic only
    dog.multiple = 20
    assert dog.timeout() == 100  # start-up and compilation
    dog.step_done()
    dog._times.extend([0.5] * 4 + [90.0])  # one slow step does not move the median
    assert dog.timeout() == max(20 * 0.5, watchdog.MIN_MULTIPLE_SECONDS)
    dog._times.extend([3.0] * 10)
    assert dog.timeout() == 60
    with dog.slow():
        assert dog.timeout() == 100
    dog.close()
