"""img2dataset webdataset shards as a resumable grain `IterDataset` of raw samples.

Which shards a reader gets: each epoch the shard list is shuffled with `(seed, epoch)`; process `i` of
`n` takes `shards[i::n]`, and inside a process grain's `mp_prefetch` gives worker `w` of `W` every
`W`-th of those (via `set_slice`). A reader keeps `cycle_length` shards open and takes one sample from
each in turn, reading every shard sequentially; a finished shard is replaced by the next one, moving on
to the next epoch when the list is used up.

Iterator state (JSON): `epoch` and `next_shard` (the next shard to open), `streams` (`[epoch, index,
byte offset]` of each open shard) and `turn`. Restoring opens each shard at its offset, so a resumed
run neither repeats nor skips a sample. The shuffle buffer on top (`shuffle.WindowShuffleDataset`)
stores this state at the start of its window and re-reads the window on restore, so it is exact too.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np
from etils import epath

from lexvla_jax.data.config import DataConfigError
from lexvla_jax.data.records import raw_sample
from lexvla_jax.data.tar_reader import END, iter_samples


def shards_for_process(
    shards: Sequence[str], seed: int, epoch: int, process_index: int, process_count: int, shuffle: bool = True
) -> list[str]:
    """Process `process_index`'s shards for `epoch`: a seeded per-epoch shuffle, then every n-th."""
    if len(shards) < process_count:
        raise DataConfigError(
            f"{len(shards)} shard(s) for {process_count} processes; every process needs at least one shard "
            "(split the data into more shards)"
        )
    order = np.random.default_rng([seed, epoch]).permutation(len(shards)) if shuffle else np.arange(len(shards))
    return [shards[i] for i in order[process_index::process_count]]


class WebDatasetSource(grain.IterDataset):
    """Raw samples (see `records.py`) streamed from tar shards; see the module docstring."""

    def __init__(
        self,
        shards: Sequence[str],
        *,
        process_index: int = 0,
        process_count: int = 1,
        seed: int = 0,
        num_epochs: int | None = None,
        cycle_length: int = 4,
        shuffle_shards: bool = True,
    ):
        super().__init__()
        shards_for_process(shards, seed, 0, process_index, process_count)  # fails early on too few shards
        self.shards = list(shards)
        self.process_index, self.process_count = process_index, process_count
        self.seed, self.num_epochs = seed, num_epochs
        self.cycle_length, self.shuffle_shards = max(1, cycle_length), shuffle_shards
        self.worker_slice = slice(None)
        self._shard_ids = {path: i for i, path in enumerate(self.shards)}

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Called by `mp_prefetch` in each worker: keep this worker's share of the process's shards."""
        del sequential_slice
        self.worker_slice = sl

    def epoch_shards(self, epoch: int) -> list[str]:
        process_shards = shards_for_process(
            self.shards, self.seed, epoch, self.process_index, self.process_count, self.shuffle_shards
        )
        return process_shards[self.worker_slice]

    def shard_id(self, path: str) -> int:
        return self._shard_ids[path]

    def __iter__(self) -> grain.DatasetIterator:
        return _WebDatasetIterator(self)

    def __str__(self) -> str:
        return f"WebDatasetSource({len(self.shards)} shards, process {self.process_index}/{self.process_count})"


class _Stream:
    """One open shard: `[epoch, index]` in its epoch's list and the offset where reading resumes."""

    def __init__(self, source: WebDatasetSource, epoch: int, index: int, offset: int = 0):
        self.source, self.epoch, self.index, self.offset = source, epoch, index, offset
        self.path = source.epoch_shards(epoch)[index]
        self._file, self._samples = None, None
        self.records, self.from_start = 0, offset == 0

    def next(self) -> dict | None:
        """The next raw sample of this shard, or None when it is used up."""
        if self.offset == END:
            return None
        if self._samples is None:
            self._file = epath.Path(self.path).open("rb")
            self._samples = iter_samples(self._file, self.offset)
        sample = next(self._samples, None)
        if sample is None:
            self.offset = END
            return None
        self.offset = sample.resume
        self.records += 1
        seed = [self.source.seed, self.epoch, self.source.shard_id(self.path), sample.offset]
        key = sample.key if sample.key is not None else f"{self.path}@{sample.offset}"
        return raw_sample(key, sample.files, sample.error, seed)

    def state(self) -> list[int]:
        return [self.epoch, self.index, self.offset]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._samples = None


class _WebDatasetIterator(grain.DatasetIterator):
    def __init__(self, source: WebDatasetSource):
        super().__init__()
        self._source = source
        self._epoch_cache: dict[int, int] = {}
        self._set({"epoch": 0, "next_shard": 0, "streams": [], "turn": 0, "started": False})

    def _set(self, state: dict) -> None:
        self._epoch, self._next_shard = state["epoch"], state["next_shard"]
        self._turn, self._started = state["turn"], state["started"]
        self._streams = [_Stream(self._source, *s) for s in state["streams"]]
        self._empty_run = 0  # shards in a row that held no sample at all

    def _epoch_length(self, epoch: int) -> int:
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: len(self._source.epoch_shards(epoch))}
        return self._epoch_cache[epoch]

    def _open_next(self) -> _Stream | None:
        num_epochs = self._source.num_epochs
        while num_epochs is None or self._epoch < num_epochs:
            length = self._epoch_length(self._epoch)
            if length == 0:
                return None  # this worker's share is empty (more workers than shards)
            if self._next_shard < length:
                self._next_shard += 1
                return _Stream(self._source, self._epoch, self._next_shard - 1)
            self._epoch, self._next_shard = self._epoch + 1, 0
        return None

    def __next__(self) -> dict:
        if not self._started:
            self._started = True
            while len(self._streams) < self._source.cycle_length and (stream := self._open_next()) is not None:
                self._streams.append(stream)
        while self._streams:
            turn = self._turn % len(self._streams)
            stream = self._streams[turn]
            sample = stream.next()
            if sample is not None:
                self._empty_run = 0
                self._turn = (turn + 1) % len(self._streams)
                return sample
            stream.close()
            self._check_not_empty(stream)
            replacement = self._open_next()
            if replacement is None:
                del self._streams[turn]
                self._turn = turn
            else:
                self._streams[turn] = replacement
        raise StopIteration

    def _check_not_empty(self, stream: _Stream) -> None:
        self._empty_run = self._empty_run + 1 if stream.records == 0 and stream.from_start else 0
        if self._empty_run > self._epoch_length(stream.epoch):
            raise DataConfigError(
                f"{self._empty_run} shards in a row hold no samples (last: {stream.path}); check the shards"
            )

    def get_state(self) -> dict:
        return {
            "epoch": self._epoch,
            "next_shard": self._next_shard,
            "streams": [s.state() for s in self._streams],
            "turn": self._turn,
            "started": self._started,
        }

    def set_state(self, state: dict) -> None:
        self.close_streams()
        self._set(state)

    def close_streams(self) -> None:
        for stream in getattr(self, "_streams", ()):
            stream.close()

    def close(self) -> None:
        self.close_streams()
        super().close()
