"""Q(FLOPs), Table 1: SPLADE's FLOPs regulariser `Σ_j s̄_j²` in place of the overuse penalty.

Everything else is the base config (`:paper`, the default, or `:tiny`). The λs stay: for evenly used words the
two penalties are equal (`V · Σ_j (1/V) · s̄²` = `V · s̄²`); the overuse penalty weighs frequently used words more.

  lexvla train --config configs/variants/qflops.py --workdir DIR ...
"""

from lexvla_jax import configlib


def get_config(arg=None):
    config = configlib.variant_base(__file__, arg)
    config.loss.penalty = "flops"
    return config
