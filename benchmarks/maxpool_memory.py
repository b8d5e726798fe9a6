"""Compiled memory of the lexical max-pool's forward + backward: naive `[B,P,V]` form vs the chunked one.

Lowers `jax.grad` (w.r.t. patch features and codebook) of a linear functional of the normalised image
vector for abstract inputs, compiles it and reads XLA's memory analysis; nothing is executed. With
`--topology` it compiles ahead of time for one chip of a TPU topology (needs libtpu, not a TPU).

    JAX_PLATFORMS=cpu python benchmarks/maxpool_memory.py --dim 4096
    python benchmarks/maxpool_memory.py --topology v5p:2x2x1
"""

from __future__ import annotations

import argparse
import functools
import os

# libtpu (for --topology) must not probe for TPU metadata on a host without a TPU.
for _key, _value in [
    ("TPU_SKIP_MDS_QUERY", "1"),
    ("TPU_WORKER_HOSTNAMES", "localhost"),
    ("TPU_WORKER_ID", "0"),
    ("TPU_ACCELERATOR_TYPE", "v5p-8"),
]:
    os.environ.setdefault(_key, _value)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from lexvla_jax.models import lexical  # noqa: E402

MIB = 2**20


def compiled_memory(pool, batch: int, patches: int, dim: int, vocab: int, dtype, device=None) -> dict[str, int]:
    """Bytes XLA plans for `grad(Σ probe · normalize(pool(h, codebook)))` w.r.t. `(h, codebook)`."""

    def objective(h, codebook, probe):
        return jnp.sum(probe * lexical.l2_normalize(pool(h, codebook)))

    sharding = SingleDeviceSharding(device) if device is not None else None
    args = (
        jax.ShapeDtypeStruct((batch, patches, dim), dtype, sharding=sharding),
        jax.ShapeDtypeStruct((vocab, dim), dtype, sharding=sharding),
        jax.ShapeDtypeStruct((batch, vocab), jnp.float32, sharding=sharding),
    )
    analysis = jax.jit(jax.grad(objective, argnums=(0, 1))).lower(*args).compile().memory_analysis()
    return {
        "temp": analysis.temp_size_in_bytes,
        "argument": analysis.argument_size_in_bytes,
        "output": analysis.output_size_in_bytes,
        "peak": analysis.temp_size_in_bytes + analysis.output_size_in_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--patches", type=int, default=256)
    parser.add_argument("--dim", type=int, default=4096, help="feature width D (1024 compiles faster)")
    parser.add_argument("--vocab", type=int, default=17149)
    parser.add_argument("--chunk-size", type=int, default=lexical.DEFAULT_CHUNK_SIZE)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--topology", help="compile for one chip of this TPU topology, e.g. v5p:2x2x1")
    args = parser.parse_args()

    device, backend = None, jax.default_backend()
    if args.topology:
        from jax.experimental import topologies

        device = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices[0]
        backend = f"tpu {args.topology} (ahead of time, one chip)"
    shape = (args.batch, args.patches, args.dim, args.vocab, jnp.dtype(args.dtype), device)
    print(
        f"backend={backend} B={args.batch} P={args.patches} D={args.dim} V={args.vocab} "
        f"chunk={args.chunk_size} dtype={args.dtype}"
    )
    rows = {
        "naive": compiled_memory(lexical.lexical_max_pool_naive, *shape),
        "lean": compiled_memory(functools.partial(lexical.lexical_max_pool, chunk_size=args.chunk_size), *shape),
    }
    print(f"{'':6} {'temp MiB':>10} {'argument MiB':>13} {'output MiB':>11} {'peak MiB':>10}")
    for name, m in rows.items():
        print(
            f"{name:6} {m['temp'] / MIB:10.1f} {m['argument'] / MIB:13.1f} {m['output'] / MIB:11.1f} "
            f"{m['peak'] / MIB:10.1f}"
        )
    print(f"peak (temp + output) ratio naive/lean: {rows['naive']['peak'] / rows['lean']['peak']:.2f}x")


if __name__ == "__main__":
    main()
