"""A long run on 2 processes × 4 CPU devices: a hang in one process stops both, Ctrl-C stops both at one step."""

import glob
import os
import re
import signal
import time

import pytest
from support import local_cluster
from support.local_cluster import Cluster
from test_multiprocess_train import EXTRA, _stopped_at

from lexvla_jax import watchdog

HANG_TIMEOUT = 5
# After process 1 stops fetching: its watchdog's timeout, process 0's (it completes at most one more step), the
# grace before exiting, and start-up slack on a loaded machine.
EXIT_BOUND = HANG_TIMEOUT + watchdog.GRACE_SECONDS + 60


def _wait_for(cluster: Cluster, process: int, pattern: str, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while not re.search(pattern, cluster.output(process)):
        assert time.time() < deadline, cluster.output(process)[-3000:]
        assert all(p.poll() is None for p in cluster.procs), cluster.output(process)[-3000:]
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_hang_in_one_process_stops_both_then_ctrl_c_stops_both_at_one_step(data_dir, tmp_path):
    workdir = str(tmp_path / "work")
    hang = {"train.hang_timeout": HANG_TIMEOUT, "train.debug_hang": "(1,7)"}
    hung = Cluster(workdir, data_dir, 2, 4, **EXTRA, **hang)
    _wait_for(hung, 1, r"debug_hang: no batch for step 7")
    hung_at = time.time()
    assert hung.wait(timeout=EXIT_BOUND + 60) == [watchdog.EXIT_CODE, watchdog.EXIT_CODE]
    assert time.time() - hung_at < EXIT_BOUND
    for i in range(2):
        out = hung.output(i)
        assert f"process {i}: no training step completed for " in out and "Current thread" in out, out[-3000:]
    assert "_debug_hang" in hung.output(1)  # the stuck frame is in process 1's dump
    dumps = glob.glob(os.path.join(workdir, "hangs", "process-*.txt"))
    assert sorted(os.path.basename(d).split("-")[1] for d in dumps) == ["0", "1"]

    # Resumed, then Ctrl-C in the terminal before its first step (while compiling): SIGINT to every process of the
    # job (trainers and data workers). Both stop after the first step, with a checkpoint.
    resumed = Cluster(workdir, data_dir, 2, 4, **EXTRA)
    _wait_for(resumed, 0, r"resumed from step 4\b")
    for proc in resumed.procs:  # started data workers (see test_long_run's Ctrl-C test)
        local_cluster.wait_for_data_workers(proc.pid)
    for proc in resumed.procs:
        for pid in [proc.pid, *local_cluster.children(proc.pid)]:
            os.kill(pid, signal.SIGINT)
    assert resumed.wait(timeout=300) == [0, 0]
    stops = [_stopped_at(resumed.output(i)) for i in range(2)]
    assert stops == [5, 5] and max(local_cluster.saved_steps(workdir)) == 5
    for i in range(2):
        assert f"process {i}: interrupted: stopping" in resumed.output(i)
        assert "Traceback" not in resumed.output(i), resumed.output(i)[-3000:]
