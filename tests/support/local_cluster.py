"""Local CPU clusters on 127.0.0.1 for tests: `lexvla train` (or a worker script) as N processes × K devices.

A `Cluster` starts N copies of `lexvla train` on the synthetic set with K fake CPU devices each
(`LEXVLA_COORDINATOR`, `LEXVLA_NUM_PROCESSES`, `LEXVLA_PROCESS_ID`, `config.dist.mode=explicit`); with N=1
it is a plain single-process run. `start_workers` does the same for a test's own worker script. The
readers below take a workdir apart: saved steps, restored train states, metrics rows and the sample keys
each step consumed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from lexvla_jax import configlib
from lexvla_jax.miniature import synthetic
from lexvla_jax.text.tokenizer import train_tokenizer
from support import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CONFIG = os.path.join(REPO, "configs", "tiny.py:scratch")  # no stage 1: a from-scratch text tower
STEPS = 24


def make_data(root: str, seed: int = 1) -> str:
    """The synthetic set (600 training, 24 eval images of 32 px) and a tokenizer trained on its captions."""
    synthetic.make_synthetic(root, num_train=600, num_eval=24, seed=seed, image_size=32, shard_size=100)
    config = configlib.load_config(TINY_CONFIG)
    texts = [*synthetic.all_captions(root), config.data.prompt_template]
    train_tokenizer(texts, config.model.text.vocab_size, os.path.join(root, "tokenizer.model"))
    return root


def overrides(data_dir: str, **extra) -> list[str]:
    """The tiny config cut down to seconds per step (1 layer per tower, 32 px, batch 16, no final evaluation, data
    read in the trainer's process), then `extra`."""
    values = {
        "miniature.synthetic.dir": data_dir,
        "data.train_shards": os.path.join(data_dir, "train"),
        "data.eval_shards": os.path.join(data_dir, "eval"),
        "data.tokenizer": os.path.join(data_dir, "tokenizer.model"),
        "data.image_size": 32,
        "data.shuffle_buffer": 50,
        # A data worker process costs ~4 s of CPU a start; the tests of workers (signals, exact resume) turn it on.
        "data.num_workers": 0,
        "model.vision.image_size": 32,
        "model.vision.num_hidden_layers": 1,
        "model.text.num_hidden_layers": 1,
        "train.num_steps": STEPS,
        "train.global_batch_size": 16,
        "train.log_every": 4,
        "train.show_top_words": 2,
        "optim.warmup_steps": 2,
        "checkpoint.every_steps": 4,
        "checkpoint.keep": 10,
        "evals.retrieval.every_steps": 0,
        "eval.batch_size": 16,
        # No evaluation, top words or word maps at the end: the tests that read them turn it on.
        "train.final_eval": False,
        "train.word_maps": 0,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def cli(command_name: str, config: str, workdir, config_overrides: list[str]) -> list[str]:
    """`lexvla <command_name> --config <config> --workdir <workdir>` with `key=value` overrides, as a subprocess
    argument list."""
    args = ["--config", config, "--workdir", str(workdir), *(f"--config.{o}" for o in config_overrides)]
    return [sys.executable, "-m", "lexvla_jax.cli", command_name, *args]


def command(workdir, data_dir, *, command_name: str = "train", **extra) -> list[str]:
    """`lexvla <command_name>` (train, eval) on the cut-down tiny config."""
    return cli(command_name, TINY_CONFIG, workdir, overrides(data_dir, **extra))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_envs(num_processes: int, devices: int, job: str) -> list[dict[str, str]]:
    """The environment of each process of a `lexvla` command on 127.0.0.1: its id, and for several processes the
    coordinator and a compilation cache of its own (`xla_env.cpu_env`; `job` names it)."""
    if num_processes == 1:
        return [{**xla_env.cpu_env(devices), "LEXVLA_PROCESS_ID": "0"}]
    shared = dict(LEXVLA_COORDINATOR=f"127.0.0.1:{free_port()}", LEXVLA_NUM_PROCESSES=str(num_processes))
    return [
        {**xla_env.cpu_env(devices, job_process=(job, i)), **shared, "LEXVLA_PROCESS_ID": str(i)}
        for i in range(num_processes)
    ]


def start_workers(script, num_processes: int, devices: int, *args) -> list[subprocess.Popen]:
    """`python script PROCESS_ID NUM_PROCESSES PORT DEVICES *args` for each process (the script sets up JAX)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(script)), env.get("PYTHONPATH", "")])
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(script), *map(str, (i, num_processes, port, devices, *args))],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]


def wait_workers(procs: list[subprocess.Popen], timeout: float = 900) -> list[str]:
    """The outputs of `procs`; all are killed past `timeout` seconds, and each must exit 0."""
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outputs


class Cluster:
    """`num_processes` copies of `lexvla train` (or `command_name`) with `devices` CPU devices each, logging to
    `<workdir>.log<i>`."""

    def __init__(self, workdir, data_dir, num_processes: int, devices: int, *, command_name: str = "train", **extra):
        self.workdir = str(workdir)
        if num_processes > 1:
            extra = {"dist.mode": "explicit", **extra}
        self.log_paths = [f"{self.workdir}.log{i}" for i in range(num_processes)]
        self.procs = []
        for log_path, env in zip(self.log_paths, process_envs(num_processes, devices, command_name), strict=True):
            with open(log_path, "w") as log:
                self.procs.append(
                    subprocess.Popen(
                        command(workdir, data_dir, command_name=command_name, **extra),
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=REPO,
                    )
                )

    def wait(self, timeout: float = 1200) -> list[int]:
        """The exit codes; every process is killed (and the test fails) past `timeout` seconds."""
        deadline = time.time() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.time(), 1)) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"lexvla train did not finish in {timeout} s:\n{self.output(0)[-3000:]}") from None

    def check(self, timeout: float = 1200) -> None:
        """Waits; fails with the log of the first process that did not exit 0."""
        codes = self.wait(timeout)
        for i, code in enumerate(codes):
            assert code == 0, f"process {i} exited {code}:\n{self.output(i)[-4000:]}"

    def signal(self, sig: int, processes=None) -> None:
        for i in range(len(self.procs)) if processes is None else processes:
            os.kill(self.procs[i].pid, sig)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def output(self, process: int) -> str:
        with open(self.log_paths[process]) as f:
            return f.read()

    def wait_for_output(self, process: int, pattern: str, timeout: float = 900) -> None:
        """Blocks until `pattern` is in the output of `process`; fails if any process ended before."""
        deadline = time.time() + timeout
        while not re.search(pattern, self.output(process)):
            assert time.time() < deadline, f"no {pattern!r} after {timeout} s:\n{self.output(process)[-3000:]}"
            assert all(p.poll() is None for p in self.procs), f"a process ended early:\n{self.output(process)[-3000:]}"
            time.sleep(0.05)


def saved_steps(workdir) -> list[int]:
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(name) for name in os.listdir(path) if name.isdigit())


def final_state(workdir, step: int) -> dict:
    """The train state saved at `step` as host NumPy arrays (whatever processes and devices wrote it)."""
    path = os.path.join(workdir, "checkpoints")
    with ocp.CheckpointManager(path, item_handlers={"state": ocp.PyTreeCheckpointHandler()}) as manager:
        metadata = manager.item_metadata(step)["state"]
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        args = ocp.args.Composite(state=ocp.args.PyTreeRestore(restore_args=as_numpy))
        return manager.restore(step, args=args)["state"]


def assert_bitwise_equal(a, b):
    flat_a, flat_b = ocp.tree.to_flat_dict(a), ocp.tree.to_flat_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg=str(key))


def assert_close(a, b, rtol: float, atol: float):
    flat_a, flat_b = ocp.tree.to_flat_dict(a), ocp.tree.to_flat_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_allclose(
            np.asarray(flat_a[key]), np.asarray(flat_b[key]), rtol=rtol, atol=atol, err_msg=str(key)
        )


def metric_rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir) -> dict[int, float]:
    """Logged training loss by step (a step logged again after a resume: its last row)."""
    return {r["step"]: r["loss"] for r in metric_rows(workdir) if "loss" in r}


def eval_rows(workdir) -> dict[int, dict]:
    """Evaluation metrics by step (the evaluators' keys only, their timings left out)."""
    out = {}
    for r in metric_rows(workdir):
        if "retrieval/dense/i2t_r@1" in r:
            evaluated = ("retrieval/", "patchdis/", "zeroshot/")
            out[r["step"]] = {k: v for k, v in r.items() if k.startswith(evaluated) and not k.endswith("/seconds")}
    return out


def sample_keys(workdir) -> dict[int, list[str]]:
    """The global batch of every step as sample keys: the rows of the processes that ran it, in process order.

    A step recorded twice by one process (redone after a resume) counts with its last record.
    """
    folder = os.path.join(workdir, "sample_keys")
    by_process = []
    for name in sorted(os.listdir(folder)):
        rows = {}
        with open(os.path.join(folder, name)) as f:
            for line in f:
                row = json.loads(line)
                rows[row["step"]] = row["keys"]
        by_process.append(rows)
    steps = sorted(set().union(*by_process))
    return {s: [k for rows in by_process for k in rows.get(s, [])] for s in steps}


def truncate_sample_keys(workdir, step: int) -> None:
    """Drops the sample-key records of steps after `step` (a workdir made to look as it was at `step`)."""
    folder = os.path.join(workdir, "sample_keys")
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(kept)


def children(pid: int) -> list[int]:
    """The child processes of `pid` (every thread's)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return found


def _ignores_sigint(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            ignored = next(line for line in f if line.startswith("SigIgn:"))
    except (FileNotFoundError, StopIteration):
        return False
    return bool(int(ignored.split()[1], 16) & (1 << (signal.SIGINT - 1)))


def wait_for_data_workers(pid: int, timeout: float = 120) -> None:
    """Until trainer `pid` has children (its data workers, multiprocessing's resource tracker) and all of them ignore
    SIGINT, i.e. have started (`pipeline.end_with_parent`): a terminal's Ctrl-C then reaches only the trainer."""
    deadline = time.time() + timeout
    while True:
        found = children(pid)
        if found and all(_ignores_sigint(c) for c in found):
            return
        assert time.time() < deadline, f"data workers of {pid} not started within {timeout} s: {found}"
        time.sleep(0.05)
