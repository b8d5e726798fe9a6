"""How the training shards split over data streams and their workers, checked before anything is built.

Webdataset shards go to streams `shards[i::S]` and, inside a stream, to its `W` workers `[w::W]`
(`webdataset.py`): a worker with no shard stalls its stream's turn-taking, and a worker with fewer shards than
another finishes its epoch sooner and starts repeating samples while the others are still in theirs. So every
worker needs at least one shard (`DataConfigError` otherwise), and a count that is not a multiple of S·W is
reported. ArrayRecord records are split by index, so there the shard count does not matter.
"""

from __future__ import annotations

import math

from lexvla_jax.data import streams
from lexvla_jax.data.array_record import SUFFIX
from lexvla_jax.data.config import DataConfigError, check_data_config, resolve_shards


def check_layout(config, process_count: int) -> str:
    """One line describing how `config.data`'s training shards split; `DataConfigError` when a worker gets none."""
    check_data_config(config)
    num_streams = streams.num_streams(config, process_count)
    workers = max(config.num_workers, 1)
    readers = num_streams * workers
    layout = f"{num_streams} data stream(s) × {workers} worker(s) over {process_count} process(es)"
    if config.format == "array_record":
        count = len(resolve_shards(config.train_shards, "config.data.train_shards", SUFFIX))
        return f"data layout: {count} ArrayRecord shard(s), records split by index over {layout}"
    count = len(resolve_shards(config.train_shards, "config.data.train_shards", ".tar"))
    fewest, most = (count // num_streams) // workers, math.ceil(math.ceil(count / num_streams) / workers)
    if fewest == 0:
        raise DataConfigError(
            f"{count} training shard(s) for {layout}: some workers would get no shard and stall; split the data "
            f"into at least {readers} shards or lower config.data.num_workers / config.data.num_streams"
        )
    if fewest != most:
        return (
            f"data layout: {count} shards over {layout}: workers read {fewest} to {most} shards, so the ones with "
            f"fewer finish an epoch sooner and repeat samples before the others finish theirs; use a multiple of "
            f"{readers} shards for equal shares"
        )
    return f"data layout: {count} shards over {layout}: {fewest} shard(s) per worker"
