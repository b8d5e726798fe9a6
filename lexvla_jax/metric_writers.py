"""Training metrics: `metrics.jsonl`, TensorBoard event files, and a console progress line (process 0).

Everything under the workdir goes through `etils.epath`, so a `gs://` (or other remote) workdir works and
nothing is written to a local folder of that name: `metrics.jsonl` is rewritten whole on each write (object
stores have no append), TensorBoard events are written to a private temporary folder and copied over.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
import uuid

import numpy as np
from etils import epath


def _scalar(value):
    value = np.asarray(value)
    if value.dtype == bool:
        return bool(value)
    if np.issubdtype(value.dtype, np.integer):
        return int(value)
    return float(value)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class MetricWriter:
    """Writes one JSON object per line (full float precision), TensorBoard scalars and a progress bar.

    Every method is a no-op unless `enabled` (process 0 in multi-host runs).
    """

    def __init__(self, workdir: str, total_steps: int, enabled: bool = True, console=None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.console = console if console is not None else sys.stdout  # the stream of now, not of import time
        self._start = time.time()
        self._start_step: int | None = None
        if not enabled:
            return
        self.workdir = epath.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl_path = self.workdir / "metrics.jsonl"
        self._rows = self._jsonl_path.read_text().splitlines() if self._jsonl_path.exists() else []
        from tensorboardX import SummaryWriter

        self._tb_local = tempfile.mkdtemp(prefix="lexvla-tb-")
        # Event files are named by second and host: a unique suffix keeps a quickly resumed run's apart.
        self._tb = SummaryWriter(self._tb_local, filename_suffix=f".{uuid.uuid4().hex[:8]}")

    def write(self, step: int, metrics: dict) -> None:
        """Records scalar `metrics` at `step`."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        self._rows.append(json.dumps(row))
        self._jsonl_path.write_text("\n".join(self._rows) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, int(step))
        self._tb.flush()
        self._copy_events()

    def _copy_events(self) -> None:
        target = self.workdir / "tensorboard"
        target.mkdir(parents=True, exist_ok=True)
        for local in epath.Path(self._tb_local).glob("events.out.tfevents.*"):
            (target / local.name).write_bytes(local.read_bytes())

    def progress(self, step: int, metrics: dict) -> None:
        """Prints `step/total [bar] eta  key=value ...` to the console."""
        if not self.enabled:
            return
        if self._start_step is None:
            self._start_step, self._start = step, time.time()
        done = step - self._start_step
        elapsed = time.time() - self._start
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        width = 20
        filled = int(width * step / max(self.total_steps, 1))
        bar = "#" * filled + "." * (width - filled)
        shown = "  ".join(f"{k}={_scalar(v):.4g}" for k, v in metrics.items() if not isinstance(_scalar(v), bool))
        eta_text = format_duration(eta) if math.isfinite(eta) else "--:--"
        print(f"[{bar}] {step}/{self.total_steps} eta {eta_text}  {shown}", file=self.console, flush=True)

    def log(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.console, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._copy_events()
            shutil.rmtree(self._tb_local, ignore_errors=True)


class SampleKeyLog:
    """Debug record of the data each step consumed (`config.train.record_sample_keys`).

    Every process appends `{"step": s, "keys": [...]}` (its rows of global batch s, in order) to
    `sample_keys/process-<p>.jsonl` under the workdir; the global batch is the processes' rows in process
    order. Steps redone after a resume from an earlier checkpoint appear again: the last row of a step counts.
    """

    def __init__(self, workdir: str, process_index: int, enabled: bool):
        self.path = None
        if enabled:
            folder = epath.Path(workdir) / "sample_keys"
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / f"process-{process_index:05d}.jsonl"

    def write(self, step: int, batch: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": int(step), "keys": [str(k) for k in batch["key"]]}) + "\n")
