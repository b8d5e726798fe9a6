"""The configs a Table 1 variant modifies: `:paper` (the default, configs/lexvla_cc12m.py) or `:tiny` (configs/tiny.py,
the main job, for a few test steps). Variant files start from `configlib.variant_base(__file__, arg)`, which loads
this file."""

import os

from lexvla_jax import configlib

BASES = {"paper": "lexvla_cc12m.py", "tiny": "tiny.py"}


def get_config(arg=None):
    name = arg or "paper"
    if name not in BASES:
        raise configlib.ConfigError(f"variant base {name!r} unknown; append :{' or :'.join(BASES)} to the config path")
    return configlib.load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", BASES[name]))
