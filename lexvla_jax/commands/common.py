"""What the model-reading commands share: restoring the encoder and reading image files."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np

from lexvla_jax import inference
from lexvla_jax.configlib import ConfigError
from lexvla_jax.data.eval_set import eval_transform
from lexvla_jax.data.records import BadSample
from lexvla_jax.data.transforms import load_image


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", help="the training run's directory (its checkpoints are read)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")


def add_sparse_args(parser: argparse.ArgumentParser) -> None:
    """--threshold | --top-k, --scale: how vectors are sparsified and quantised (`sparse/export.py`)."""
    from lexvla_jax.sparse.export import DEFAULT_SCALE

    cut = parser.add_mutually_exclusive_group()
    cut.add_argument("--threshold", type=float, help="keep weights >= this (default 1/sqrt(V'))")
    cut.add_argument("--top-k", type=int, help="keep the k largest weights of each vector instead")
    parser.add_argument("--scale", type=int, default=DEFAULT_SCALE, help="impact = round(scale * weight)")


def check_positive(**values) -> None:
    """A one-line error naming the first option (`top_k` → --top-k) given below 1."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must be a positive integer")


def check_top_k(top_k: int | None, encoder) -> None:
    if top_k is not None and top_k > len(encoder.words):
        raise ConfigError(f"--top-k {top_k}: the model has only {len(encoder.words)} words")


def restore_encoder(config, workdir: str | None, step: int | None = None, *, with_step: bool = False):
    """The trained `LexicalEncoder` of `workdir` (latest step, or `step`); with `with_step`, (encoder, step)."""
    if not workdir:
        raise ConfigError("--workdir is required to encode with the model, e.g. --workdir runs/tiny")
    encoder, step = inference.restore(config, workdir, step)
    return (encoder, step) if with_step else encoder


def read_images(paths: Sequence[str], data_config, size: int) -> np.ndarray:
    """uint8 [N, size, size, 3]: each file through the evaluation transform (`eval_set.eval_transform`)."""
    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"image {path!r} does not exist")
        with open(path, "rb") as f:
            data = f.read()
        try:
            image = load_image(
                data,
                size,
                max_pixels=data_config.max_image_pixels,
                min_size=data_config.min_image_size,
                **eval_transform(data_config),
            )
        except BadSample as e:
            raise ConfigError(f"image {path!r} cannot be used ({e}); pass a JPEG/PNG/WebP image") from None
        images.append(image)
    return np.stack(images)
