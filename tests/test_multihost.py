"""Two JAX processes on 127.0.0.1 (4 CPU devices each) train like one process with 8 devices."""

import json
import pathlib

import numpy as np

import local_cluster

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
STEPS = 3


def test_two_processes_match_one_process(tmp_path):
    two = local_cluster.start_workers(WORKER, 2, 4, STEPS, tmp_path / "two.json")
    one = local_cluster.start_workers(WORKER, 1, 8, STEPS, tmp_path / "one.json")
    local_cluster.wait_workers(two + one, timeout=420)
    two_result = json.loads((tmp_path / "two.json").read_text())
    one_result = json.loads((tmp_path / "one.json").read_text())
    assert two_result["local_rows"] == list(range(8))  # process 0 fed only its half of the batch
    assert len(two_result["losses"]) == STEPS
    np.testing.assert_allclose(two_result["losses"], one_result["losses"], rtol=1e-5)
    np.testing.assert_allclose(two_result["checksum"], one_result["checksum"], rtol=1e-5)
    assert len(set(np.round(two_result["losses"], 6))) == STEPS  # the steps really changed the model
