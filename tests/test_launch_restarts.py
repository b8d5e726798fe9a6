"""Restarts without a person: `tpu_pod.sh --restarts N` against a scripted fake `gcloud`, and `slurm.sbatch`'s
requeue on SLURM's time-limit SIGTERM against a fake `srun` and `scontrol`."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_launch import BASH, LAUNCH, POD, REPO, launch

pytestmark = pytest.mark.skipif(BASH is None, reason="bash not installed")

FAKE_GCLOUD = """#!PYTHON
import json, os, sys
folder = os.environ["FAKE_DIR"]
with open(os.path.join(folder, "calls"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
with open(os.path.join(folder, "calls")) as f:
    attempt = sum(line.split()[3] == "create" for line in f)
with open(os.path.join(folder, "plan.json")) as f:
    plan = json.load(f).get(str(attempt), {})
verb = sys.argv[4]
if verb == "create":
    sys.exit(1 if plan.get("create") == "fail" else 0)
if verb == "describe":
    print(plan.get("state", "ACTIVE" if "queued-resources" in sys.argv else "READY"))
elif verb == "ssh" and "--worker=0" in sys.argv:
    sys.exit(255 if plan.get("state") == "PREEMPTED" else 0)
elif verb == "ssh" and any("lexvla-train-rc" in a for a in sys.argv):
    rc = plan.get("rc", 0)
    print(f"lexvla-train-rc={rc}")
    sys.exit(rc)
"""


def fake_gcloud(tmp_path, plan: dict) -> dict:
    """A `gcloud` that records its calls and follows `plan` ({attempt: {"create": "fail", "state": ..., "rc": ...}},
    attempt = how many slices were created so far)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD.replace("PYTHON", sys.executable))
    (bin_dir / "gcloud").chmod(0o755)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_DIR": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "RECONNECT_WAIT_S": "0",
        "QUEUED_POLL_S": "0",
    }


def verbs(tmp_path) -> list[str]:
    """The gcloud verbs called, the slice's state queries left out."""
    calls = (tmp_path / "calls").read_text().splitlines()
    return [c.split()[3] for c in calls if c.split()[3] != "describe"]


ONE_RUN = ["create", "scp", "ssh", "ssh", "ssh", "ssh"]  # create, copy, install, start, stream, status


def test_preempted_during_training_is_recreated_and_resumed(tmp_path):
    env = fake_gcloud(tmp_path, {"1": {"state": "PREEMPTED"}})
    result = launch("tpu_pod.sh", *POD, "--spot", "--restarts", "2", env=env)
    assert result.returncode == 0, result.stderr
    assert verbs(tmp_path) == ["create", "scp", "ssh", "ssh", "ssh", "delete", *ONE_RUN, "delete"]
    assert "the slice was preempted or could not be created; restart 1 of 2: re-creating lex" in result.stderr
    assert result.stdout.count("--workdir gs://bucket/run") == 2  # the same workdir: training resumes


def test_queued_resource_preempted_while_created_is_requested_again(tmp_path):
    env = fake_gcloud(tmp_path, {"1": {"state": "SUSPENDED"}})
    result = launch("tpu_pod.sh", *POD, "--queued", "--restarts", "1", env=env)
    assert result.returncode == 0, result.stderr
    assert verbs(tmp_path) == ["create", "delete", *ONE_RUN, "delete"]
    assert "queued resource lex is SUSPENDED" in result.stderr and "restart 1 of 1" in result.stderr


def test_failed_runs_restart_until_none_are_left(tmp_path):
    env = fake_gcloud(tmp_path, {"1": {"rc": 124}, "2": {"rc": 124}})  # e.g. the hang watchdog's exit
    result = launch("tpu_pod.sh", *POD, "--restarts", "1", env=env)
    assert result.returncode == 1
    assert verbs(tmp_path) == [*ONE_RUN, "delete", *ONE_RUN, "delete"]
    assert "lexvla train exited 124; restart 1 of 1" in result.stderr
    assert "lexvla train exited 124; no restarts left (--restarts 1)" in result.stderr


def test_a_config_error_is_not_retried(tmp_path):
    env = fake_gcloud(tmp_path, {"1": {"rc": 2}})
    result = launch("tpu_pod.sh", *POD, "--restarts", "3", env=env)
    assert result.returncode == 2
    assert verbs(tmp_path) == [*ONE_RUN, "delete"]
    assert "configuration error (exit 2); not restarting" in result.stderr


def test_restarts_must_be_a_number():
    result = launch("tpu_pod.sh", "--dry-run", *POD, "--restarts", "many")
    assert result.returncode == 2 and "--restarts must be a number" in result.stderr


def test_slurm_asks_for_requeue_and_the_time_limit_signal():
    directives = [line for line in (LAUNCH / "slurm.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in directives and "#SBATCH --signal=B:TERM@120" in directives
    result = launch("slurm.sbatch", "--dry-run", "--nodes", "1", "--gpus-per-node", "2", "--workdir", "/w")
    assert result.returncode == 0 and "scontrol requeue" in result.stderr


def _fake_slurm(tmp_path, train_exit: int) -> dict:
    """`srun` that waits for SIGTERM (then exits 0, as training does after its checkpoint) or exits `train_exit`
    at once when that is not 0; `scontrol` records its arguments; a venv whose `lexvla` exists."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = '#!/usr/bin/env bash\necho started > "$FAKE_DIR/srun"\n'
    if train_exit:
        srun += f"exit {train_exit}\n"
    else:
        srun += "trap 'echo TERM >> \"$FAKE_DIR/srun\"; exit 0' TERM\nwhile true; do sleep 0.05; done\n"
    (bin_dir / "srun").write_text(srun)
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\necho "$*" >> "$FAKE_DIR/scontrol"\n')
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "lexvla").write_text("#!/usr/bin/env bash\n")
    for path in (bin_dir / "srun", bin_dir / "scontrol", venv / "lexvla"):
        path.chmod(0o755)
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_DIR": str(tmp_path),
        "SLURM_JOB_ID": "42",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_GPUS_ON_NODE": "2",
    }


def _sbatch(tmp_path, env, *args) -> subprocess.Popen:
    command = [BASH, str(LAUNCH / "slurm.sbatch"), "--workdir", "/w", "--venv", str(tmp_path / "venv"), *args]
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_slurm_time_limit_signal_stops_training_and_requeues(tmp_path):
    env = _fake_slurm(tmp_path, train_exit=0)
    job = _sbatch(tmp_path, env)
    deadline = time.time() + 30
    while not (tmp_path / "srun").exists():
        assert time.time() < deadline and job.poll() is None, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 sends the batch shell
    _, err = job.communicate(timeout=30)
    assert job.returncode == 0, err
    assert (tmp_path / "srun").read_text().split() == ["started", "TERM"]  # training got the signal
    assert (tmp_path / "scontrol").read_text().split() == ["requeue", "42"]
    assert "requeueing job 42 to resume" in err


@pytest.mark.parametrize(("train_exit", "requeued"), [(1, True), (2, False)], ids=["failed", "config-error"])
def test_slurm_failed_run_is_requeued_but_not_a_config_error(tmp_path, train_exit, requeued):
    env = _fake_slurm(tmp_path, train_exit=train_exit)
    job = _sbatch(tmp_path, env, "--requeues", "2")
    _, err = job.communicate(timeout=30)
    assert job.returncode == train_exit
    assert (tmp_path / "scontrol").exists() == requeued, err
    if requeued:
        assert "training exited 1; requeue 1 of 2" in err
