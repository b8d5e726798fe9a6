"""One process of a local CPU cluster building LexVLA from tiny HF checkpoints (driven by test_multihost_build.py).

usage: multihost_build_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES VISION_DIR TEXT_DIR OUT_DIR
Builds the model on a (1, 4, 2) mesh (FSDP across the processes), recording every checkpoint block read
(`hf_layout.Source.read`). Writes `OUT_DIR/process-<i>.npz` (the values of this process's device shards,
keyed `path@index`) and `OUT_DIR/process-<i>.json` (the blocks read, and the blocks its devices hold).
"""

import json
import os
import sys

process_id, num_processes, port, local_devices = (int(a) for a in sys.argv[1:5])
vision_dir, text_dir, out_dir = sys.argv[5:8]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
if num_processes > 1:
    os.environ.update(
        LEXVLA_COORDINATOR=f"127.0.0.1:{port}",
        LEXVLA_NUM_PROCESSES=str(num_processes),
        LEXVLA_PROCESS_ID=str(process_id),
    )

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lexvla_jax import build, hf_layout, sharding  # noqa: E402

import tiny_hf  # noqa: E402

KEPT = tiny_hf.KEPT


def blocks(index, shape) -> list[list[int]]:
    """A tuple of slices as `[[start, stop], ...]` over `shape`."""
    return [list(s.indices(n)[:2]) for s, n in zip(index, shape, strict=False)]


if __name__ == "__main__":
    sharding.initialize_distributed({"mode": "explicit" if num_processes > 1 else "none"})
    assert jax.process_count() == num_processes and jax.device_count() == 8
    cfg = tiny_hf.lexvla_config(vision_dir, text_dir, ["mesh.shape=(1,4,2)"])
    reads = []
    original = hf_layout.Source.read

    def recording_read(self, ckpt, index, dtype):
        reads.append([self.key, blocks(index, self.model_shape(ckpt))])
        return original(self, ckpt, index, dtype)

    hf_layout.Source.read = recording_read
    mesh = sharding.mesh_from_config(cfg.mesh)
    model = build.build_model(cfg, mesh, KEPT)
    sources = {name: s for part in build.recipe(cfg, KEPT).parts for name, s in part.sources.items()}
    held, shards = [], {}
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        value = variable.get_value()
        name = ".".join(map(str, path))
        for shard in value.addressable_shards:
            where = blocks(shard.index, value.shape)
            shards[f"{name}@{json.dumps(where)}"] = np.asarray(shard.data)
            if name in sources:
                held.append([sources[name].key, where])
    np.savez(os.path.join(out_dir, f"process-{process_id}.npz"), **shards)
    with open(os.path.join(out_dir, f"process-{process_id}.json"), "w") as f:
        json.dump({"reads": reads, "held": held}, f)
