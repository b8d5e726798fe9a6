"""The training data as `num_streams` independent streams, so a run can resume on another process count.

Stream s of S reads shard group s (the split `shards_for_process(..., s, S)` gives) through its own
pipeline (`pipeline.make_train_dataset` with batch B/S). Global batch k is stream 0's k-th batch, then
stream 1's, ..., then stream S-1's. Process p of P owns the contiguous streams `[p·S/P, (p+1)·S/P)`, so
its rows are exactly its slice of that global batch: the global batches are the same for any P that
divides S, and a checkpoint (one state file per stream) resumes on any such P with no sample repeated or
skipped. `config.data.num_streams = 0` means one stream per process (no change of process count on
resume). The worker count is part of a stream's order, so resuming with another `num_workers` is refused.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import queue
import threading
import time
from multiprocessing import queues as mp_queues
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from grain._src.python.ipc import shared_memory_array  # grain has no public unlink

from lexvla_jax.data.config import DataConfigError
from lexvla_jax.data.records import skip_counts_dict

MANIFEST = "streams.json"


def num_streams(config, process_count: int) -> int:
    """`config.data.num_streams`, or the process count when it is 0; checked to divide by `process_count`."""
    count = config.num_streams or process_count
    if count % process_count:
        raise DataConfigError(
            f"config.data.num_streams={count} is not divisible by {process_count} processes; use a multiple of the "
            "process counts the run may use (the checkpoint's data streams are split over processes)"
        )
    return count


def owned_streams(count: int, process_index: int, process_count: int) -> range:
    """The streams process `process_index` reads: a contiguous block, in global batch order."""
    per = count // process_count
    return range(process_index * per, (process_index + 1) * per)


class StreamsIterator:
    """Next batch = one batch of each owned stream, concatenated in stream order (host arrays)."""

    def __init__(self, iterators: dict[int, Any], num_streams: int, num_workers: int):
        self.iterators = iterators
        self.num_streams, self.num_workers = num_streams, num_workers

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = [next(self.iterators[s]) for s in sorted(self.iterators)]
        out = {}
        for name in parts[0]:
            if name == "skipped":
                out[name] = np.sum([p[name] for p in parts], axis=0)
            elif isinstance(parts[0][name], np.ndarray):
                out[name] = np.concatenate([p[name] for p in parts])
            else:
                out[name] = [x for p in parts for x in p[name]]
        return out

    @property
    def samples(self) -> int:
        """Good samples delivered so far by this process's streams."""
        return sum(it.samples for it in self.iterators.values())

    @property
    def skip_counts(self) -> dict[str, int]:
        """Samples skipped so far by reason, over this process's streams."""
        return skip_counts_dict(np.sum([it.skipped for it in self.iterators.values()], axis=0))

    def get_state(self) -> dict[str, dict]:
        return {str(s): it.get_state() for s, it in self.iterators.items()}

    def set_state(self, states: dict[str, dict]) -> None:
        for s, it in self.iterators.items():
            it.set_state(states[str(s)])

    def close(self, timeout: float = 5.0) -> None:
        """Stops the streams' data workers, emptying their output queues until they have exited; if their shutdown
        still hangs past `timeout` s, kills them instead.

        grain's stop empties a worker's queue once, then waits for the worker to exit. A worker whose last batch
        is still on its way (its queue's feeder thread writing into the pipe) cannot exit until someone reads it,
        and grain waits 25 s before it kills it (2 closes in 8 here): the queues are read until the workers end."""

        def close_all() -> None:
            for it in self.iterators.values():
                close = getattr(it, "close", None)
                if close is not None:
                    close()

        queues = [q for it in self.iterators.values() for q in _worker_queues(it)]
        closer = threading.Thread(target=close_all, name="lexvla-data-close", daemon=True)
        closer.start()
        deadline = time.monotonic() + timeout
        while closer.is_alive() and time.monotonic() < deadline:
            for q in queues:
                _discard_all(q)
            closer.join(0.05)
        if closer.is_alive():  # a worker died mid-message and its queue never drains: end the workers
            for child in multiprocessing.active_children():
                child.kill()


def _worker_queues(iterator, depth: int = 8) -> list:
    """The output queues (`multiprocessing` queues named `_buffer`) of the grain worker processes under `iterator`,
    found through the attributes of grain's iterator objects."""
    found, seen, frontier = [], set(), [iterator]
    for _ in range(depth):
        following = []
        for obj in frontier:
            if id(obj) in seen or not type(obj).__module__.startswith(("grain", "lexvla_jax")):
                continue
            seen.add(id(obj))
            for name, value in getattr(obj, "__dict__", {}).items():
                if name == "_buffer" and isinstance(value, mp_queues.Queue):
                    found.append(value)
                elif isinstance(value, list | tuple):
                    following.extend(value)
                elif isinstance(value, dict):
                    following.extend(value.values())
                else:
                    following.append(value)
        frontier = following
    return found


def _discard_all(q) -> None:
    """Empties a worker's output queue, releasing the shared memory of what it held."""
    while True:
        try:
            element = q.get_nowait()
        except (queue.Empty, OSError, ValueError):  # empty, or already closed by grain
            return
        shared_memory_array.unlink_shm(element)


class StreamsCheckpointHandler(ocp.CheckpointHandler):
    """Orbax handler writing one JSON state file per stream (each by the process that owns it)."""

    def save(self, directory: epath.Path, args: StreamsSave) -> None:
        it = args.item
        for s, state in it.get_state().items():
            (directory / f"stream-{int(s):05d}.json").write_text(json.dumps(state))
        if 0 in it.iterators:  # the owner of stream 0 writes the manifest
            manifest = {"num_streams": it.num_streams, "num_workers": it.num_workers}
            (directory / MANIFEST).write_text(json.dumps(manifest))

    def restore(self, directory: epath.Path, args: StreamsRestore) -> StreamsIterator:
        it = args.item
        manifest = json.loads((directory / MANIFEST).read_text())
        for field, saved, now in (
            ("num_streams", manifest["num_streams"], it.num_streams),
            ("num_workers", manifest["num_workers"], it.num_workers),
        ):
            if saved != now:
                raise DataConfigError(
                    f"the checkpoint's data position was saved with config.data.{field}={saved} but this run has "
                    f"{now}; set config.data.{field}={saved} to resume it exactly"
                )
        it.set_state({str(s): json.loads((directory / f"stream-{s:05d}.json").read_text()) for s in it.iterators})
        for stream in it.iterators.values():
            getattr(stream, "start_prefetch", lambda: None)()
        return it

    def metadata(self, directory: epath.Path):
        del directory
        return None


@ocp.args.register_with_handler(StreamsCheckpointHandler, for_save=True)
@dataclasses.dataclass
class StreamsSave(ocp.args.CheckpointArgs):
    item: StreamsIterator


@ocp.args.register_with_handler(StreamsCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class StreamsRestore(ocp.args.CheckpointArgs):
    item: StreamsIterator
