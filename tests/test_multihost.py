"""Two JAX processes on 127.0.0.1 (4 CPU devices each) train like one process with 8 devices."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(process_id, num_processes, port, local_devices, out):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent), env.get("PYTHONPATH", "")])
    args = [sys.executable, str(WORKER), *map(str, (process_id, num_processes, port, local_devices, STEPS)), str(out)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout=420):
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]


def test_two_processes_match_one_process(tmp_path):
    port = _free_port()
    two = [_launch(i, 2, port, 4, tmp_path / "two.json") for i in range(2)]
    one = [_launch(0, 1, 0, 8, tmp_path / "one.json")]
    _wait(two + one)
    two_result = json.loads((tmp_path / "two.json").read_text())
    one_result = json.loads((tmp_path / "one.json").read_text())
    assert two_result["local_rows"] == list(range(8))  # process 0 fed only its half of the batch
    assert len(two_result["losses"]) == STEPS
    np.testing.assert_allclose(two_result["losses"], one_result["losses"], rtol=1e-5)
    np.testing.assert_allclose(two_result["checksum"], one_result["checksum"], rtol=1e-5)
    assert len(set(np.round(two_result["losses"], 6))) == STEPS  # the steps really changed the model
