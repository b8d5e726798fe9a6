"""Goodput: what each second of a run's wall time went to, across every start of the same workdir.

Each start of `lexvla train` is one record in `WORKDIR/goodput.jsonl` (process 0 rewrites the file whole: object
stores have no append), holding its start and last-recorded time and its seconds by cause. At any moment exactly
one cause is running (`switch`, `doing`), so a start's causes add up to its recorded wall time:

| cause        | the time                                                                          |
|--------------|-----------------------------------------------------------------------------------|
| productive   | training steps that advanced the run (the first time they ran)                     |
| startup      | process start → first step: imports, distributed set-up, data, model, tracing      |
| restore      | reading the checkpoint resumed from (data position and train state)                |
| compile      | the first step of each start (XLA compilation and its execution)                   |
| input_wait   | waiting for the input pipeline                                                     |
| checkpoint   | checkpoint saves (the loop's pause and the wait for asynchronous writes)           |
| evaluation   | evaluators during and after training, top words and word maps                      |
| redone       | steps past the restored checkpoint that an earlier start had already run           |
| shutdown     | stopping the data workers and closing files                                        |
| hang         | the watchdog's timeout: from the last completed step to its exit (`watchdog.py`)   |
| lost         | between starts: after an abrupt end's last record, and until the next start        |

`lost` is what the wall time from the first start to the last record leaves over (`summarize`). A start records
at least every `flush_seconds` (1 s on a local workdir, 30 s on a remote one), and the watchdog records before it
exits, so an abrupt end (SIGKILL, a lost machine) loses at most that much of its record; a start's interpreter exit
after its last record counts as lost once the next start begins. Only the main process records; all processes step
together.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from etils import epath

CAUSES = (
    "productive",
    "startup",
    "restore",
    "compile",
    "input_wait",
    "checkpoint",
    "evaluation",
    "redone",
    "shutdown",
    "hang",
    "lost",
)
FILE = "goodput.jsonl"
LOCAL_FLUSH_SECONDS = 1.0
REMOTE_FLUSH_SECONDS = 30.0


def process_start_time() -> float:
    """When this process started (Unix time, 10 ms), from /proc on Linux; now elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, `starttime`
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def read_runs(workdir) -> list[dict]:
    """The recorded starts of `workdir`, oldest first ([] when none)."""
    path = epath.Path(workdir) / FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(runs: list[dict]) -> dict:
    """Totals over `runs`: wall seconds (first start → last record), seconds and fractions by cause, steps."""
    if not runs:
        return {"runs": 0, "wall_seconds": 0.0, "seconds": dict.fromkeys(CAUSES, 0.0), "fractions": {}}
    seconds = {c: sum(r["seconds"].get(c, 0.0) for r in runs) for c in CAUSES}
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    seconds["lost"] = max(wall - sum(seconds.values()), 0.0)
    return {
        "runs": len(runs),
        "wall_seconds": wall,
        "seconds": seconds,
        "fractions": {c: s / wall if wall > 0 else 0.0 for c, s in seconds.items()},
        "restores": sum(r.get("restored_step") is not None for r in runs),
        "redone_steps": sum(r.get("redone_steps", 0) for r in runs),
        "last_step": max((r.get("last_step") or 0) for r in runs),
    }


class GoodputRecorder:
    """The current start's record; `switch(cause)` at each boundary, `step_done(step)` after each step."""

    def __init__(self, workdir, *, enabled: bool, started_at: float, clock=time.time):
        self.enabled = enabled
        self._clock = clock
        self.redo_until = 0
        if not enabled:
            return
        self.path = epath.Path(workdir) / FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_seconds = REMOTE_FLUSH_SECONDS if "://" in str(workdir) else LOCAL_FLUSH_SECONDS
        self.previous = read_runs(workdir)
        self.previous_last_step = max((r.get("last_step") or 0 for r in self.previous), default=0)
        self.record = {
            "start": started_at,
            "end": started_at,
            "seconds": dict.fromkeys(CAUSES[:-1], 0.0),
            "restored_step": None,
            "last_step": None,
            "redone_steps": 0,
        }
        self.cause, self._since, self._flushed = "startup", started_at, 0.0
        self._at_last_step = (dict(self.record["seconds"]), started_at)

    def switch(self, cause: str) -> str:
        """Charges the time since the last switch to the running cause, then runs `cause`; returns the old one."""
        previous = getattr(self, "cause", cause)
        if self.enabled:
            now = self._clock()
            self.record["seconds"][self.cause] += now - self._since
            self.record["end"], self._since, self.cause = now, now, cause
        return previous

    @contextlib.contextmanager
    def doing(self, cause: str):
        """`cause` runs inside; the running cause resumes afterwards."""
        previous = self.switch(cause)
        try:
            yield
        finally:
            self.switch(previous)

    def resumed(self, step: int) -> None:
        """The run restored checkpoint `step`: steps up to the furthest an earlier start reached are redone."""
        if self.enabled:
            self.record["restored_step"] = int(step)
            self.redo_until = self.previous_last_step

    def step_cause(self, step: int) -> str:
        """The cause of running step `step` (1-based): redone or productive."""
        return "redone" if step <= self.redo_until else "productive"

    def step_done(self, step: int) -> None:
        if not self.enabled:
            return
        self.record["last_step"] = int(step)
        self.record["redone_steps"] += step <= self.redo_until
        self.switch(self.cause)
        self._at_last_step = (dict(self.record["seconds"]), self._since)
        if self._clock() - self._flushed >= self.flush_seconds:
            self.flush()

    def hung(self) -> None:
        """The watchdog's last record before it exits: the time since the last completed step counts as `hang`."""
        if not self.enabled:
            return
        seconds, since = self._at_last_step
        now = self._clock()
        self.record["seconds"] = {**seconds, "hang": seconds["hang"] + now - since}
        self.record["end"], self._since, self.cause = now, now, "hang"
        self.flush()

    def flush(self) -> None:
        """Writes every start's record, this one up to now."""
        if not self.enabled:
            return
        self.switch(self.cause)
        lines = [json.dumps(r) for r in [*self.previous, self.record]]
        self.path.write_text("\n".join(lines) + "\n")
        self._flushed = self._clock()

    def metrics(self) -> dict:
        """The running figure for metrics.jsonl / TensorBoard: `goodput` and `badput/<cause>` (fractions of wall)."""
        if not self.enabled:
            return {}
        self.switch(self.cause)
        fractions = summarize([*self.previous, self.record])["fractions"]
        badput = {f"badput/{c}": f for c, f in fractions.items() if c != "productive"}
        return {"goodput": fractions["productive"], **badput}
