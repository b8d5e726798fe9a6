"""What the model-reading commands share: restoring the encoder and reading image files."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np

from lexvla_jax.configlib import ConfigError
from lexvla_jax.data.records import BadSample
from lexvla_jax.data.transforms import load_image


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", help="the training run's directory (its checkpoints are read)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")


def restore_encoder(config, workdir: str | None, step: int | None = None, *, with_step: bool = False):
    """The trained `LexicalEncoder` of `workdir` (latest step, or `step`); with `with_step`, (encoder, step)."""
    if not workdir:
        raise ConfigError("--workdir is required to encode with the model, e.g. --workdir runs/tiny")
    from lexvla_jax import inference

    encoder, step = inference.restore(config, workdir, step)
    return (encoder, step) if with_step else encoder


def read_images(paths: Sequence[str], data_config, size: int) -> np.ndarray:
    """uint8 [N, size, size, 3]: each file centre-cropped and resized like evaluation images."""
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
                resample=data_config.resample,
            )
        except BadSample as e:
            raise ConfigError(f"image {path!r} cannot be used ({e}); pass a JPEG/PNG/WebP image") from None
        images.append(image)
    return np.stack(images)
