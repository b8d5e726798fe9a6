"""Device side of a batch: per-process host rows → global `jax.Array`s sharded on the batch axes.

Images stay uint8 (`models/image_norm.py` normalises them inside the jitted functions).
"""

from __future__ import annotations

import jax
import numpy as np

from lexvla_jax import sharding
from lexvla_jax.data.config import DataConfigError

HOST_KEYS = ("skipped", "key")  # batch entries that stay on the host


def make_global_batch(local_batch: dict, mesh: jax.sharding.Mesh, rules=sharding.DEFAULT_RULES) -> dict:
    """Per-process numpy batch → global `jax.Array`s split over the mesh axes of logical `batch`.

    Every process passes its own rows; the global batch is their concatenation in process order.
    Host-only entries (`HOST_KEYS`) are left out.
    """
    batch_sharding = sharding.batch_sharding(mesh, rules)
    data_parallel = sharding.data_parallel_size(mesh, rules)
    out = {}
    for name, value in local_batch.items():
        if name in HOST_KEYS:
            continue
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        if global_shape[0] % data_parallel:
            raise DataConfigError(
                f"global batch {global_shape[0]} is not divisible by the data-parallel size {data_parallel}; "
                "change config.train.global_batch_size"
            )
        out[name] = jax.make_array_from_process_local_data(batch_sharding, value, global_shape)
    return out
