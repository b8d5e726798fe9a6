"""`lexvla prepare --config CFG`: make what the embedded job trains on (synthetic set, tokenizer, pretrained towers).

The same preparation `lexvla train` runs first; each part is skipped when its output exists.
"""

from __future__ import annotations

import argparse

from lexvla_jax import configlib, sharding
from lexvla_jax.miniature import prepare


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lexvla prepare", description=__doc__.splitlines()[0])
    config, _ = configlib.parse_command(argv, parser)
    if "miniature" not in config:
        raise configlib.ConfigError("the config has no miniature section; use e.g. --config configs/tiny.py")
    sharding.initialize_distributed(config.dist)
    prepare.prepare(config)
    return 0
