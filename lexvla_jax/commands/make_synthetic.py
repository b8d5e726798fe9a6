"""`lexvla make-synthetic`: write the embedded job's synthetic captioned-shapes set (webdataset)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from lexvla_jax.miniature.synthetic import make_synthetic


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lexvla make-synthetic", description="Write the synthetic captioned-shapes dataset (webdataset)."
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=20_000, help="training samples")
    parser.add_argument("--eval", type=int, default=500, help="eval images (5 captions each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    manifest = make_synthetic(
        args.out, args.train, args.eval, args.seed, args.image_size, args.shard_size, args.workers
    )
    seconds = time.perf_counter() - start
    print(
        f"wrote {args.train} train ({len(manifest['train']['shards'])} shards) and {args.eval} eval samples "
        f"({len(manifest['eval']['shards'])} shards) to {args.out} in {seconds:.1f}s"
    )
    return 0
