"""`lexvla convert-data`: webdataset tars → ArrayRecord shards."""

from __future__ import annotations

import argparse
import os

from lexvla_jax.data.array_record import convert
from lexvla_jax.data.records import SKIP_REASONS


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lexvla convert-data", description="Convert webdataset tars to ArrayRecord shards."
    )
    parser.add_argument("--input", required=True, help="tar glob, list (a,b), directory or brace range")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel conversions")
    args = parser.parse_args(argv)
    totals = convert(args.input, args.output, args.workers)
    damaged = {k: v for k, v in totals.items() if k in SKIP_REASONS and v}
    print(f"converted {totals['shards']} shards, {totals['records']} records -> {args.output}")
    if damaged:
        print(f"damaged tars (kept as error records, skipped when read): {damaged}")
    return 0
