"""`lexvla inspect-data --config CFG [--batches N]`: read N training batches and report what happened.

Prints samples read, samples skipped by reason, throughput and the batch shapes. The reading is exactly
the training pipeline's (this process's share, `config.data.num_workers` workers). When
`config.data.tokenizer` is empty, captions are not tokenised (images only) and the report says so.
"""

from __future__ import annotations

import argparse
import time

import jax

from lexvla_jax import configlib
from lexvla_jax.data import layout, pipeline
from lexvla_jax.data.device_batch import HOST_KEYS
from lexvla_jax.text.prompt import prompt_encoder


def inspect(config, num_batches: int, global_batch_size: int) -> dict:
    """Reads `num_batches` batches; returns counts, throughput and shapes."""
    encoder = prompt_encoder(config.data)
    print(layout.check_layout(config.data, jax.process_count()))
    start = time.perf_counter()
    iterator = pipeline.train_iterator(config.data, global_batch_size, prompt_encoder=encoder)
    shapes, batches, first = {}, 0, None
    try:
        for batch in iterator:
            if first is None:
                first = time.perf_counter()
            shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in batch.items() if k not in HOST_KEYS}
            batches += 1
            if batches >= num_batches:
                break
        end = time.perf_counter()
    finally:
        iterator.close()
    steady = iterator.samples - (global_batch_size if batches > 1 else 0)
    return {
        "batches": batches,
        "samples": iterator.samples,
        "skipped": iterator.skip_counts,
        "seconds": end - start,
        "first_batch_seconds": (first or end) - start,
        "samples_per_s": steady / max(end - (first or start), 1e-9) if batches > 1 else 0.0,
        "shapes": shapes,
        "tokenised": encoder is not None,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lexvla inspect-data", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10, help="batches to read")
    config, args = configlib.parse_command(argv, parser)
    report = inspect(config, args.batches, config.train.global_batch_size)
    total_skipped = sum(report["skipped"].values())
    print(f"batches read:    {report['batches']} ({report['samples']} samples)")
    print(f"samples skipped: {total_skipped}")
    for reason, count in report["skipped"].items():
        if count:
            print(f"  {reason:<18} {count}")
    print(f"first batch:     {report['first_batch_seconds']:.2f}s (worker start-up, shuffle buffer fill)")
    print(f"throughput:      {report['samples_per_s']:.1f} samples/s after the first batch")
    for name, (shape, dtype) in report["shapes"].items():
        print(f"  {name:<15} {shape} {dtype}")
    if not report["tokenised"]:
        print("config.data.tokenizer is empty: captions were not tokenised (images only)")
    return 0
