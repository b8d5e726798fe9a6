"""Training metrics: `metrics.jsonl`, TensorBoard event files, and a console progress line (process 0)."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np


def _scalar(value):
    value = np.asarray(value)
    if value.dtype == bool:
        return bool(value)
    if np.issubdtype(value.dtype, np.integer):
        return int(value)
    return float(value)


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class MetricWriter:
    """Writes one JSON object per line (full float precision), TensorBoard scalars and a progress bar.

    Every method is a no-op unless `enabled` (process 0 in multi-host runs).
    """

    def __init__(self, workdir: str, total_steps: int, enabled: bool = True, console=sys.stdout):
        self.enabled = enabled
        self.total_steps = total_steps
        self.console = console
        self._start = time.time()
        self._start_step: int | None = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        """Records scalar `metrics` at `step`."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, int(step))
        self._tb.flush()

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
        eta_text = _format_duration(eta) if math.isfinite(eta) else "--:--"
        print(f"[{bar}] {step}/{self.total_steps} eta {eta_text}  {shown}", file=self.console, flush=True)

    def log(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.console, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
