"""LexVLA in JAX / Flax NNX: interpretable vision-language alignment through one lexical vocabulary."""

__version__ = "0.1.0"
