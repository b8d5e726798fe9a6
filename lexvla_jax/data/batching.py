"""Batching that counts bad samples exactly, across grain worker processes and restarts.

Two stages. `SkipCountingBatchDataset` runs where samples are decoded (inside each grain worker): it
stacks good elements into batches and attaches `skipped`, the skip markers (by reason) it passed over
while filling that batch; at the end of the data it emits what is left, even a batch of skips only, so
no count is lost. `SkipTotalsDataset` runs in the consuming process: it sums those counts into totals
(part of its checkpointable state), drops short batches when asked, and re-labels each batch's
`skipped` as "since the previous batch delivered". Data that yields no sample and no skip at all is an error
for training (`empty_error`); `lexvla encode` passes `empty_error=None`, so a process whose share is empty
just ends. No JAX here: this module runs in the workers.
"""

from __future__ import annotations

import grain
import numpy as np

from lexvla_jax.data.config import DataConfigError
from lexvla_jax.data.records import SKIP_REASONS, skip_counts_dict


class SkipCountingBatchDataset(grain.IterDataset):
    """Elements or `{"skip": reason index}` markers → batches with a `skipped` counts vector."""

    def __init__(
        self, parent: grain.IterDataset, *, batch_size: int, keep_keys: bool = False, max_consecutive_skips: int
    ):
        super().__init__(parent)
        self.batch_size, self.keep_keys, self.max_consecutive_skips = batch_size, keep_keys, max_consecutive_skips

    def __iter__(self) -> grain.DatasetIterator:
        return _SkipCountingBatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"SkipCountingBatchDataset(batch_size={self.batch_size})"


class _SkipCountingBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, spec: SkipCountingBatchDataset):
        super().__init__(parent)
        self._spec = spec
        self._skip_run = 0
        self._exhausted = False

    def __next__(self) -> dict:
        if self._exhausted:
            raise StopIteration
        spec, elements = self._spec, []
        skipped = np.zeros(len(SKIP_REASONS), np.int64)
        while len(elements) < spec.batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            if "skip" in element:
                skipped[element["skip"]] += 1
                self._skip_run += 1
                if self._skip_run > spec.max_consecutive_skips:
                    raise DataConfigError(
                        f"{self._skip_run} bad samples in a row ({skip_counts_dict(skipped)} in this batch); "
                        "inspect the data with `lexvla inspect-data`"
                    )
                continue
            self._skip_run = 0
            elements.append(element)
        if not elements and not skipped.any():
            raise StopIteration
        batch = {
            name: np.stack([e[name] for e in elements]) for name in (elements[0] if elements else ()) if name != "key"
        }
        if spec.keep_keys and elements:
            batch["key"] = np.array([e["key"] for e in elements])
        batch["skipped"] = skipped
        return batch

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "exhausted": self._exhausted}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._exhausted, self._skip_run = state["exhausted"], 0


def batch_rows(batch: dict) -> int:
    """Rows of a batch (0 for a batch that only carries skip counts)."""
    return next((len(v) for k, v in batch.items() if k != "skipped"), 0)


EMPTY_TRAINING_DATA = "the training data yielded no samples at all; check config.data.train_shards"


class SkipTotalsDataset(grain.IterDataset):
    """Consumer side: totals of skips by reason, short batches dropped (`drop_remainder`). Data without a single
    sample or skip raises `DataConfigError(empty_error)`, or just ends when `empty_error` is None."""

    def __init__(
        self,
        parent: grain.IterDataset,
        *,
        batch_size: int,
        drop_remainder: bool = True,
        empty_error: str | None = EMPTY_TRAINING_DATA,
    ):
        super().__init__(parent)
        self.batch_size, self.drop_remainder, self.empty_error = batch_size, drop_remainder, empty_error

    def __iter__(self) -> SkipTotalsIterator:
        return SkipTotalsIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"SkipTotalsDataset(batch_size={self.batch_size}, drop_remainder={self.drop_remainder})"


class SkipTotalsIterator(grain.DatasetIterator):
    """`samples` (good samples delivered), `skipped`/`skip_counts` (totals); all part of the state."""

    def __init__(self, parent: grain.DatasetIterator, spec: SkipTotalsDataset):
        super().__init__(parent)
        self._spec = spec
        self.samples = 0
        self.skipped = np.zeros(len(SKIP_REASONS), np.int64)
        self._reported = np.zeros(len(SKIP_REASONS), np.int64)

    @property
    def skip_counts(self) -> dict[str, int]:
        return skip_counts_dict(self.skipped)

    def __next__(self) -> dict:
        while True:
            try:
                batch = next(self._parent)
            except StopIteration:
                if self.samples == 0 and not self.skipped.any() and self._spec.empty_error is not None:
                    raise DataConfigError(self._spec.empty_error) from None
                raise
            self.skipped += batch["skipped"]
            rows = batch_rows(batch)
            if rows == self._spec.batch_size or (rows and not self._spec.drop_remainder):
                break
        batch = dict(batch, skipped=self.skipped - self._reported)
        self._reported = self.skipped.copy()
        self.samples += rows
        return batch

    def get_state(self) -> dict:
        return {
            "parent": self._parent.get_state(),
            "samples": int(self.samples),
            "skipped": self.skipped.tolist(),
            "reported": self._reported.tolist(),
        }

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self.samples = state["samples"]
        self.skipped = np.asarray(state["skipped"], np.int64)
        self._reported = np.asarray(state["reported"], np.int64)
