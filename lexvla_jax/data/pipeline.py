"""From `config.data` to this process's host batches (numpy); `device_batch.py` makes them global `jax.Array`s.

    raw samples (webdataset stream + window shuffle | ArrayRecord global shuffle), this process's share
      → decode, crop, tokenise (SampleDecoder; a bad sample → skip marker)  ─┐ in each of `num_workers`
      → batch good samples, count markers by reason (batching.py)           ─┘ grain worker processes
      → mp_prefetch (image batches through shared memory; workers exit when the trainer dies)
      → total the counts, drop short batches (batching.py; totals are iterator state)
      → (device_batch.py) global arrays sharded over the mesh's batch axes; normalisation on the device

Each batch is `{"image": uint8 [B,S,S,3], "input_ids": int32 [B,L], "attention_mask": int32 [B,L],
"skipped": int64 [len(SKIP_REASONS)]}` where `skipped` counts the samples skipped since the previous
batch (`records.skip_counts_dict` names them). `make_train_dataset` is one data stream (B = global batch //
number of streams); `train_iterator` joins this process's streams (`streams.StreamsIterator`: B = global
batch // process count), which `checkpoints.py` saves next to the train state (`streams.StreamsSave`) and
restores exactly where they were. Workers take turns delivering whole batches, so the order depends on
`num_workers` (deterministic for a given count; restore with the count that saved).
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time

import grain
import jax
from absl import flags

from lexvla_jax.data import streams
from lexvla_jax.data.array_record import SUFFIX, array_record_dataset
from lexvla_jax.data.batching import SkipCountingBatchDataset, SkipTotalsDataset
from lexvla_jax.data.config import DataConfigError, check_data_config, resolve_shards
from lexvla_jax.data.shuffle import WindowShuffleDataset
from lexvla_jax.data.streams import StreamsIterator
from lexvla_jax.data.transforms import SampleDecoder
from lexvla_jax.data.webdataset import WebDatasetSource

MIN_SHM_BYTES = 64 * 1024


def raw_dataset(config, process_index: int, process_count: int) -> grain.IterDataset | grain.MapDataset:
    """This process's raw training samples in `config.format`."""
    if config.format == "array_record":
        paths = resolve_shards(config.train_shards, "config.data.train_shards", SUFFIX)
        return array_record_dataset(
            paths,
            seed=config.seed,
            num_epochs=config.num_epochs,
            process_index=process_index,
            process_count=process_count,
        )
    paths = resolve_shards(config.train_shards, "config.data.train_shards", ".tar")
    ds = WebDatasetSource(
        paths,
        process_index=process_index,
        process_count=process_count,
        seed=config.seed,
        num_epochs=config.num_epochs,
        cycle_length=config.interleave_shards,
    )
    if config.shuffle_buffer > 1:
        ds = WindowShuffleDataset(ds, window=config.shuffle_buffer, seed=config.seed)
    return ds


def make_train_dataset(
    config,
    global_batch_size: int,
    prompt_encoder=None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    keep_keys: bool = False,
) -> grain.IterDataset:
    """The training batches of one process (`iter()` it); see the module docstring.

    `config` is `config.data`. Process index/count default to JAX's; tests pass them to simulate
    several processes in one. `keep_keys=True` adds the sample keys (`"key"`, host only).
    """
    check_data_config(config)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise DataConfigError(
            f"global batch size {global_batch_size} is not divisible by {process_count} processes; change "
            "config.train.global_batch_size"
        )
    batch_size = global_batch_size // process_count
    decoder = SampleDecoder.from_config(config, train=True, prompt_encoder=prompt_encoder)
    ds = raw_dataset(config, process_index, process_count).map(decoder)
    ds = decoded_batches(ds, config, batch_size, keep_keys)
    return SkipTotalsDataset(ds, batch_size=batch_size, drop_remainder=drop_remainder)


def decoded_batches(ds, config, batch_size: int, keep_keys: bool) -> grain.IterDataset:
    """Samples mapped to decoded elements or skip markers → batches with their skip counts (`batching.py`), made in
    `config.num_workers` grain worker processes (none: in this one)."""
    if isinstance(ds, grain.MapDataset):
        read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=batch_size)
        ds = ds.to_iter_dataset(read)
    ds = SkipCountingBatchDataset(
        ds, batch_size=batch_size, keep_keys=keep_keys, max_consecutive_skips=config.max_consecutive_skips
    )
    if config.num_workers > 0:
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
        # Arrays under MIN_SHM_BYTES travel pickled; the image batch goes through shared memory.
        options = grain.experimental.DatasetOptions(min_shm_size=MIN_SHM_BYTES)
        ds = grain.experimental.WithOptionsIterDataset(ds, options)
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.num_workers, per_worker_buffer_size=config.prefetch_buffer),
            worker_init_fn=functools.partial(end_with_parent, trainer=os.getpid()),
        )
    return ds


def end_with_parent(worker_index: int = 0, worker_count: int = 0, *, trainer: int, poll_seconds: float = 0.2) -> None:
    """In a data worker: exit within `poll_seconds` once the trainer process `trainer` is gone (even SIGKILLed).

    The worker ignores SIGINT: a terminal's Ctrl-C reaches the whole process group, and the trainer, which stops
    at the next step (`train.StopRequest`), closes its workers itself.

    A daemon thread watches the parent pid. Linux's `PR_SET_PDEATHSIG` is no substitute: it fires when the
    *thread* that started the worker ends, and grain starts workers from its prefetch threads (and orbax
    restores from its own), so it would kill healthy workers in the middle of a write.
    """
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while os.getppid() == trainer:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-trainer", daemon=True).start()


def train_iterator(
    config, global_batch_size: int, process_index=None, process_count=None, prompt_encoder=None, **kwargs
) -> StreamsIterator:
    """This process's training batches: its share of the data streams (`streams.py`), checkpointable."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    count = streams.num_streams(config, process_count)
    if global_batch_size % count:
        raise DataConfigError(
            f"global batch size {global_batch_size} is not divisible by {count} data streams; change "
            "config.train.global_batch_size or config.data.num_streams"
        )
    iterators = {
        s: iter(
            make_train_dataset(
                config, global_batch_size, prompt_encoder, process_index=s, process_count=count, **kwargs
            )
        )
        for s in streams.owned_streams(count, process_index, process_count)
    }
    return StreamsIterator(iterators, count, config.num_workers)
