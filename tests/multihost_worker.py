"""One process of a local CPU cluster running the tiny LexVLA train step (driven by test_multihost.py).

usage: multihost_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES STEPS OUT_JSON
Every process builds the same model and the same deterministic global batches, feeds only the rows its
devices own (`make_global_batch`), and runs the jitted, sharded train step. Process 0 writes the losses.
"""

import json
import os
import sys

process_id, num_processes, port, local_devices, steps = (int(a) for a in sys.argv[1:6])
out_path = sys.argv[6]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from lexvla_jax import optim, sharding  # noqa: E402
from lexvla_jax.data import device_batch  # noqa: E402

import tiny_lexvla as tiny  # noqa: E402

if num_processes > 1:
    dist = ml_collections.ConfigDict(
        dict(
            mode="explicit", coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id
        )
    )
    sharding.initialize_distributed(dist)
assert jax.process_count() == num_processes and jax.device_count() == 8

mesh = sharding.make_mesh((4, 2, 1))  # data × fsdp across both processes
rules = sharding.DEFAULT_RULES
graphdef, params, frozen, rest = tiny.split(tiny.tiny_model())
tx, schedule = optim.make_optimizer(tiny.OPTIM, num_steps=steps)
with sharding.use_mesh_rules(mesh, rules):
    train_step, (frozen, rest, state) = tiny.sharded_step(mesh, graphdef, params, frozen, rest, tx, schedule)
    batch_sh = sharding.batch_sharding(mesh, rules)
    losses = []
    for i in range(steps):
        full = tiny.tiny_batch(16, seed=100 + i)
        # The rows this process's devices own, in order: its process-local batch.
        rows = sorted({idx[0].start or 0 for idx in batch_sh.addressable_devices_indices_map((16,)).values()})
        per_device = 16 // int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
        local_rows = np.concatenate([np.arange(r, r + per_device) for r in rows])
        local = {k: v[local_rows] for k, v in full.items()}
        batch = device_batch.make_global_batch(local, mesh, rules)
        state, metrics = train_step(frozen, rest, state, batch)
        losses.append(float(metrics["loss"]))
    checksum = float(jax.jit(lambda p: sum(x.astype("float32").sum() for x in jax.tree.leaves(p)))(state.params))

if process_id == 0:
    with open(out_path, "w") as f:
        json.dump({"losses": losses, "checksum": checksum, "local_rows": local_rows.tolist()}, f)
