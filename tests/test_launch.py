"""The launch scripts' dry runs: the exact commands each would run, and their one-line errors."""

import ast
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash not installed")

TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
POD = ["--name", "lex", "--zone", "us-east5-a", "--accelerator-type", "v5p-64", "--workdir", "gs://bucket/run"]
# Train arguments that only survive if every level of quoting is right.
TRICKY = ["--config.data.train_shards=/data/{00000..00009}.tar", "--config.train.note=it's a test"]


def launch(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(
        [BASH, str(LAUNCH / script), *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        cwd=REPO,
        timeout=60,
    )


def commands(script: str, *args: str, env: dict | None = None) -> list[list[str]]:
    """The commands a dry run prints (`+ ...` lines), split into words."""
    result = launch(script, "--dry-run", *args, env=env)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def option(command: list[str], name: str) -> str:
    (value,) = [w.split("=", 1)[1] for w in command if w.startswith(name + "=")]
    return value


def contains(words: list[str], part: list[str]) -> bool:
    return any(words[i : i + len(part)] == part for i in range(len(words) - len(part) + 1))


def assert_fails(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# --------------------------------------------------------------------------------------------- TPU pod


def test_tpu_pod_creates_installs_trains_and_deletes_in_order():
    cmds = commands("tpu_pod.sh", *POD)
    create, tar, scp, install, start, stream, status, delete = cmds
    zone, kind = "--zone=us-east5-a", "--accelerator-type=v5p-64"
    assert create == [*TPU, "create", "lex", zone, kind, "--version=v2-alpha-tpuv5"]
    assert tar[:2] == ["tar", "-czf"] and tar[-1] == "." and "--exclude-vcs" in tar
    assert scp == [*TPU, "scp", tar[2], "lex:lexvla.tar.gz", "--zone=us-east5-a", "--worker=all"]
    for ssh in (install, start, status):
        assert ssh[:6] == [*TPU, "ssh", "lex"] and "--worker=all" in ssh
    assert stream[:6] == [*TPU, "ssh", "lex"] and "--worker=0" in stream
    assert contains(shlex.split(option(install, "--command")), [".venv/bin/pip", "install", "-q", "-e", ".[tpu]"])
    assert delete == [*TPU, "delete", "lex", "--zone=us-east5-a", "--quiet"]


def test_tpu_pod_spot_and_project():
    create = commands("tpu_pod.sh", *POD, "--spot", "--project", "proj")[0]
    assert create[:5] == [*TPU, "create"] and "--spot" in create and "--project=proj" in create


def test_tpu_pod_queued_resource_waits_and_force_deletes():
    cmds = commands("tpu_pod.sh", *POD, "--queued", "--spot", "--version", "my-image")
    create, describe, delete = cmds[0], cmds[1], cmds[-1]
    assert create == [
        *QR, "create", "lex", "--node-id=lex", "--zone=us-east5-a", "--accelerator-type=v5p-64",
        "--runtime-version=my-image", "--spot",
    ]  # fmt: skip
    assert describe == [*QR, "describe", "lex", "--zone=us-east5-a", "--format=value(state.state)"]
    assert delete == [*QR, "delete", "lex", "--zone=us-east5-a", "--force", "--quiet"]
    assert not any(c[:5] == [*TPU, "create"] for c in cmds)


def test_tpu_pod_keep_leaves_the_slice():
    result = launch("tpu_pod.sh", "--dry-run", *POD, "--keep")
    assert result.returncode == 0
    assert "delete" not in result.stdout
    assert "keeping lex; delete it with: gcloud compute tpus tpu-vm delete lex" in result.stderr


@pytest.mark.parametrize(
    ("accelerator", "image"),
    [("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v6e-8", "v2-alpha-tpuv6e")],
)
def test_tpu_pod_default_image_per_generation(accelerator, image):
    args = [*POD[:5], accelerator, *POD[6:]]
    assert option(commands("tpu_pod.sh", *args)[0], "--version") == image


def test_tpu_pod_worker_commands_run_lexvla_train_with_every_argument(tmp_path):
    """Runs the start / stream / status commands in a fake home whose `lexvla` records its argv."""
    cmds = commands("tpu_pod.sh", *POD, "--config", "configs/tiny.py", "--", *TRICKY)
    start, stream, status = (option(c, "--command") for c in cmds[4:7])
    fake = tmp_path / "lexvla" / ".venv" / "bin" / "lexvla"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\nsys.exit(3)\n")
    fake.chmod(0o755)
    env = {**os.environ, "HOME": str(tmp_path)}
    subprocess.run([BASH, "-c", start], env=env, check=True, timeout=30)
    for _ in range(200):
        if (tmp_path / "lexvla" / "train.rc").exists():
            break
        time.sleep(0.05)
    log = subprocess.run([BASH, "-c", stream], env=env, capture_output=True, text=True, timeout=30).stdout
    assert json.loads(log) == [
        "train", "--config", "configs/tiny.py", "--workdir", "gs://bucket/run", "--config.dist.mode=auto", *TRICKY,
    ]  # fmt: skip
    assert subprocess.run([BASH, "-c", status], env=env, timeout=30).returncode == 3


def fake_gcloud(tmp_path, stream_failures: int) -> dict:
    """A `gcloud` on PATH that records its arguments; streaming worker 0's log fails (ssh's 255) at first."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(
        "#!/usr/bin/env bash\n"
        'echo "$*" >> "$FAKE_DIR/calls"\n'
        'if [[ " $* " == *" --worker=0 "* ]]; then\n'
        '  echo x >> "$FAKE_DIR/streams"\n'
        f'  [[ $(wc -l < "$FAKE_DIR/streams") -gt {stream_failures} ]] || exit 255\n'
        "fi\n"
    )
    (bin_dir / "gcloud").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path), "TMPDIR": str(tmp_path)}


def test_tpu_pod_reconnects_to_a_dropped_log_and_still_deletes(tmp_path):
    env = {**fake_gcloud(tmp_path, stream_failures=2), "RECONNECT_WAIT_S": "0"}
    result = launch("tpu_pod.sh", *POD, env=env)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    calls = [c for c in calls if " describe " not in c]  # the slice's state, asked after each dropped log
    assert [c.split()[3] for c in calls] == ["create", "scp", "ssh", "ssh", "ssh", "ssh", "ssh", "ssh", "delete"]
    assert sum("--worker=0" in c for c in calls) == 3  # two dropped connections, then the whole log
    assert result.stderr.count("lost worker 0's log; reconnecting") == 2


def test_tpu_pod_keeps_the_slice_when_the_log_stays_lost(tmp_path):
    env = {**fake_gcloud(tmp_path, stream_failures=100), "RECONNECT_WAIT_S": "0", "RECONNECTS": "3"}
    result = launch("tpu_pod.sh", *POD, env=env)
    assert result.returncode == 2
    calls = (tmp_path / "calls").read_text().splitlines()
    assert sum("--worker=0" in c for c in calls) == 3 and not any(" delete " in c for c in calls)
    assert "lost worker 0's log 3 times; training goes on, so lex is kept" in result.stderr
    assert "keeping lex; delete it with: gcloud compute tpus tpu-vm delete lex" in result.stderr


def test_the_tpu_extra_writes_a_gs_workdir():
    """tpu_pod.sh installs `.[tpu]` and trains into gs://: the extra must bring gcsfs (epath's gs:// backend)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    names = {n.targets[0].id: n.value for n in tree.body if isinstance(n, ast.Assign)}
    extras = {k.value: v for k, v in zip(names["EXTRAS"].keys, names["EXTRAS"].values, strict=True)}
    starred = {e.value.id for e in extras["tpu"].elts if isinstance(e, ast.Starred)}
    assert "GCS" in starred and any(c.value.startswith("gcsfs") for c in names["GCS"].elts)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*POD[:6], "--workdir", "/local/dir"], "--workdir must be a gs:// path"),
        (POD[2:], "--name is required"),
        ([*POD, "--bogus"], "unknown option --bogus"),
        ([*POD, "--config", "configs/nope.py"], "config configs/nope.py not found"),
        ([*POD[:5], "tpu7-8", *POD[6:]], "no default image for tpu7-8; pass --version"),
        ([*POD, "--zone"], "--zone needs a value"),
    ],
)
def test_tpu_pod_errors(args, message):
    assert_fails(launch("tpu_pod.sh", "--dry-run", *args), message)


# --------------------------------------------------------------------------------------------- one GPU


def test_gpu_installs_the_gpu_extra_and_trains_the_debug_config():
    cmds = commands("gpu.sh", "--text", "/ckpt/llama", "--vision", "/ckpt/dino", "--", "--config.train.num_steps=5")
    query, venv, _, install, export, train = cmds
    assert query[0] == "nvidia-smi" and "--query-gpu=memory.total" in query
    assert venv[1:3] == ["-m", "venv"]
    assert install[1:] == ["install", "-q", "-e", f"{REPO}[gpu]"]
    assert export == ["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"]  # XLA's default 75% is too little at 24 GB
    assert train[0] == f"{venv[3]}/bin/lexvla"
    assert train[1:] == [
        "train", "--config", f"{REPO}/configs/debug_gpu.py:24gb", "--workdir", "runs/debug_gpu",
        "--config.data.tokenizer=/ckpt/llama", "--config.model.text_checkpoint=/ckpt/llama",
        "--config.model.vision_checkpoint=/ckpt/dino", "--config.train.num_steps=5",
    ]  # fmt: skip
    assert (REPO / "configs" / "debug_gpu.py").is_file()


def test_gpu_size_and_random_text():
    train = commands("gpu.sh", "--random-text", "--tokenizer", "/t/tokenizer.model", "--size", "80gb")[-1]
    assert train[3].endswith("configs/debug_gpu.py:80gb")
    assert "--config.data.tokenizer=/t/tokenizer.model" in train
    assert not any(w.startswith("--config.model.text_checkpoint") for w in train)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "pass --text DIR"),
        (["--random-text"], "--random-text needs --tokenizer"),
        (["--text", "/ckpt", "--size", "40gb"], "--size must be 24gb or 80gb"),
    ],
)
def test_gpu_errors(args, message):
    assert_fails(launch("gpu.sh", "--dry-run", *args), message)


# --------------------------------------------------------------------------------------------- SLURM


def test_slurm_runs_one_process_per_gpu_without_gpus_per_task():
    (srun,) = commands("slurm.sbatch", "--nodes", "2", "--gpus-per-node", "8", "--workdir", "/shared/run")
    assert srun[:5] == ["srun", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--kill-on-bad-exit=1"]
    assert srun[6:] == [
        "train", "--config", "configs/lexvla_cc12m.py", "--workdir", "/shared/run", "--config.dist.mode=auto",
    ]  # fmt: skip
    assert not any("gpus-per-task" in w for w in srun)
    directives = [line for line in (LAUNCH / "slurm.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --gpus-per-node=8" in directives
    assert not any("gpus-per-task" in line for line in directives)


def test_slurm_per_node_and_layout_from_the_job():
    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_NUM_NODES": "3",
        "SLURM_GPUS_PER_NODE": "a100:4",
        "SLURM_NTASKS": "12",  # the job's; srun would take it as the step's task count
        "SLURM_CPUS_ON_NODE": "32",
    }
    (srun,) = commands("slurm.sbatch", "--workdir", "/w", "--", *TRICKY, env=env)
    assert srun[1:5] == ["--nodes=3", "--ntasks=12", "--ntasks-per-node=4", "--cpus-per-task=8"]
    assert srun[-2:] == TRICKY
    (srun,) = commands("slurm.sbatch", "--workdir", "/w", "--per-node", env=env)
    assert srun[1:5] == ["--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--cpus-per-task=32"]  # the whole node


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "2", "--gpus-per-node", "8"], "--workdir is required"),
        (["--workdir", "/w", "--gpus-per-node", "8"], "number of nodes unknown"),
        (["--workdir", "/w", "--nodes", "2"], "GPUs per node unknown"),
    ],
)
def test_slurm_errors(args, message):
    assert_fails(launch("slurm.sbatch", "--dry-run", *args), message)
