"""The hang watchdog: when no training step completes in time, dump every thread's stack and exit non-zero.

A stuck collective, a stuck filesystem or a data worker that stops would otherwise stop a whole job silently.
`train.hang_timeout` is seconds (`"600"`) or a multiple of the median step time (`"20x"`, never below
`MIN_MULTIPLE_SECONDS`); until enough steps give a median, and while compiling, evaluating or checkpointing
(`slow()`), `train.hang_timeout_slow` seconds apply. On a timeout the process writes the Python stacks of all
its threads (`faulthandler`) to stderr and to `WORKDIR/hangs/process-<p>-<time>.txt`, waits `GRACE_SECONDS` (so
the other processes, which stop stepping within a step of it, dump theirs before its connections close) and
exits with `EXIT_CODE`, so a launcher restarts it (process 0, which hosts the coordination service, a little
later than the others). A watcher thread does this; `faulthandler`'s own C-level
timer backs it up a little later for a process whose interpreter is stuck too.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import math
import os
import statistics
import sys
import tempfile
import threading
import time

from etils import epath

from lexvla_jax.configlib import ConfigError

EXIT_CODE = 124  # as timeout(1)
MIN_MULTIPLE_SECONDS = 30.0
MEDIAN_OF = 100  # the median of the last this many step times
MIN_STEPS_FOR_MEDIAN = 5
GRACE_SECONDS = 5.0
# Process 0 hosts the coordination service: when it goes first, the others' coordination clients abort
# (SIGABRT) instead of exiting with EXIT_CODE, so it stays this much longer.
COORDINATOR_LINGER_SECONDS = 3.0
BACKUP_SECONDS = 60.0  # the C-level timer fires this long after the watcher should have
REARM_SECONDS = 1.0  # the C-level timer is re-armed at most this often (re-arming starts a thread)


def parse_timeout(value) -> tuple[float, float]:
    """`train.hang_timeout` → (seconds, multiple of the median step time); (0, 0) is off."""
    text = str(value).strip().lower()
    try:
        if text.endswith("x"):
            multiple = float(text[:-1])
            if multiple > 0:
                return 0.0, multiple
        elif float(text) >= 0:
            return float(text), 0.0
    except ValueError:
        pass
    raise ConfigError(
        f"config.train.hang_timeout={value!r} is neither seconds nor a multiple of the median step time; "
        "use e.g. 600 (seconds), '20x', or 0 (off)"
    )


class Watchdog:
    """Call `step_done()` after each completed step; wrap slow phases in `with watchdog.slow():`; `close()`."""

    def __init__(self, hang_timeout, slow_seconds: float, hang_dir, process_index: int, on_timeout=lambda: None):
        """`on_timeout()` runs before the stacks are dumped (e.g. the goodput record's last write)."""
        self.seconds, self.multiple = parse_timeout(hang_timeout)
        self.enabled = bool(self.seconds or self.multiple)
        self.slow_seconds = float(slow_seconds)
        self.hang_dir = epath.Path(hang_dir)
        self.process_index = process_index
        self.on_timeout = on_timeout
        self._armed_at = -math.inf
        self._times: collections.deque[float] = collections.deque(maxlen=MEDIAN_OF)
        self._last = time.monotonic()
        self._slow = 1  # start-up and compilation count as slow, until the first step
        self._started = False
        self._lock = threading.Lock()
        self._closed = threading.Event()
        if self.enabled:
            self._arm()
            threading.Thread(target=self._watch, name="hang-watchdog", daemon=True).start()

    def timeout(self) -> float:
        """The seconds allowed now without a completed step."""
        if self._slow or (self.multiple and len(self._times) < MIN_STEPS_FOR_MEDIAN):
            return max(self.slow_seconds, self.seconds)
        if self.multiple:
            return max(self.multiple * statistics.median(self._times), MIN_MULTIPLE_SECONDS)
        return self.seconds

    def step_done(self) -> None:
        now = time.monotonic()
        with self._lock:
            if not self._started:
                self._started = True
                self._slow -= 1  # the first step ends start-up and compilation
            else:
                self._times.append(now - self._last)
            self._last = now
        if self.enabled and now - self._armed_at >= REARM_SECONDS:
            self._arm()

    @contextlib.contextmanager
    def slow(self):
        """Evaluation, checkpointing: `train.hang_timeout_slow` applies; the step clock restarts afterwards."""
        with self._lock:
            self._slow += 1
            self._last = time.monotonic()
        if self.enabled:
            self._arm()
        try:
            yield
        finally:
            with self._lock:
                self._slow -= 1
                self._last = time.monotonic()
            if self.enabled:
                self._arm()

    def _arm(self) -> None:
        self._armed_at = time.monotonic()
        faulthandler.dump_traceback_later(self.timeout() + BACKUP_SECONDS + REARM_SECONDS, exit=True)

    def _watch(self) -> None:
        while not self._closed.wait(0.25):
            with self._lock:
                waited, allowed = time.monotonic() - self._last, self.timeout()
            if waited > allowed:
                self._dump_and_exit(waited)

    def _dump_and_exit(self, waited: float) -> None:
        faulthandler.cancel_dump_traceback_later()
        try:
            self.on_timeout()
        except Exception as e:  # the stacks and the exit matter more
            print(f"process {self.process_index}: before dumping the stacks: {e}", file=sys.stderr)
        with tempfile.TemporaryFile("w+") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.seek(0)
            stacks = f.read()
        what = "a step" if not self._slow else "start-up, compilation, evaluation or a checkpoint"
        message = (
            f"process {self.process_index}: no training step completed for {waited:.0f} s "
            f"(limit {self.timeout():.0f} s, waiting for {what}); stacks of all threads follow, exiting {EXIT_CODE} "
            "so the launcher restarts the run from its last checkpoint"
        )
        print(f"{message}\n{stacks}", file=sys.stderr, flush=True)
        try:
            self.hang_dir.mkdir(parents=True, exist_ok=True)
            name = f"process-{self.process_index}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
            (self.hang_dir / name).write_text(f"{message}\n{stacks}")
        except Exception as e:  # a stuck or failing filesystem must not stop the exit
            print(f"process {self.process_index}: writing the stacks to {self.hang_dir} failed: {e}", file=sys.stderr)
        time.sleep(GRACE_SECONDS + (COORDINATOR_LINGER_SECONDS if self.process_index == 0 else 0.0))
        os._exit(EXIT_CODE)

    def close(self) -> None:
        self._closed.set()
        if self.enabled:
            faulthandler.cancel_dump_traceback_later()
