"""`lexvla train`: make what the config's `miniature` section asks for (the embedded job), then train (`train.run`)."""

from __future__ import annotations

import argparse
import sys

from lexvla_jax import configlib, goodput, sharding, train
from lexvla_jax.miniature import prepare


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lexvla train", description=train.__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard files go here")
    started_at = goodput.process_start_time()  # start-up counts from the process's start (goodput.py)
    config, args = configlib.parse_command(argv, parser)
    sharding.initialize_distributed(config.dist)
    sharding.mesh_and_rules(config)  # a mesh that cannot be made fails in one line before minutes of preparation
    prepare.prepare(config, print if sharding.is_main_process() else lambda _: None)
    try:
        train.run(config, args.workdir, started_at=started_at)
    except train.TrainingError as e:
        print(f"lexvla train: {e}", file=sys.stderr)
        return 1
    return 0
