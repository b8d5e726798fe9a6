"""The linear shape probe of a vision tower's frozen patch features: does a patch know which shape it lies on?

Fresh synthetic scenes (drawn from `(seed, PROBE_SPLIT, index)`, neither train nor eval images), JPEG-encoded as
the train images are. Each patch whose pixels are mostly an object is labelled with that object's shape
(`evaluate.patchdis.patch_labels`); background patches are left out. A ridge-regression classifier on the
standardised patch tokens (the tower's `last_hidden_state`, what the adapter reads) is fitted on the first half of
the images and scored on the second: `accuracy` of its arg-max, beside `majority` (always the most frequent train
shape) and the chance 1/6.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import jax
import numpy as np
from PIL import Image

from lexvla_jax.evaluate.patchdis import UNSCORED, patch_labels
from lexvla_jax.miniature import synthetic
from lexvla_jax.models import image_norm

PROBE_SPLIT = 2  # synthetic.SPLITS uses 0 (train) and 1 (eval)


def probe_set(num_images: int, image_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images `[N, S, S, 3]`, uint8 class masks `[N, S, S]`) of fresh scenes."""
    images, masks = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, PROBE_SPLIT, index])
        scene = synthetic.random_scene(rng)
        pixels = synthetic.render(scene, image_size, rng)
        images.append(np.asarray(Image.open(io.BytesIO(synthetic.encode_jpeg(pixels))).convert("RGB")))
        masks.append(synthetic.render_mask(scene, image_size))
    return np.stack(images), np.stack(masks)


def patch_features(tower, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """float32 `[N, P, D]`: the tower's patch tokens (after its final norm) of uint8 images."""
    forward = jax.jit(lambda x: tower(image_norm.normalize_images(x, tower.config.image_norm)).last_hidden_state)
    prefix = tower.num_prefix_tokens
    chunks = [np.asarray(forward(images[i : i + batch]))[:, prefix:] for i in range(0, len(images), batch)]
    return np.concatenate(chunks)


def ridge_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, penalty: float = 1.0) -> dict:
    """Fits on the first half of the images, scores on the second (module docstring). `features` `[N, P, D]`,
    `labels` `[N, P]` with `UNSCORED` for left-out patches."""
    half = len(features) // 2

    def rows(part):
        x, y = features[part].reshape(-1, features.shape[-1]), labels[part].reshape(-1)
        keep = y != UNSCORED
        return x[keep].astype(np.float64), y[keep]

    x_train, y_train = rows(slice(0, half))
    x_test, y_test = rows(slice(half, None))
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    design = lambda x: np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)
    a = design(x_train)
    targets = np.eye(num_classes)[y_train]
    weights = np.linalg.solve(a.T @ a + penalty * np.eye(a.shape[1]), a.T @ targets)
    predicted = (design(x_test) @ weights).argmax(1)
    majority = np.bincount(y_train, minlength=num_classes).argmax()
    return {
        "accuracy": float(np.mean(predicted == y_test)),
        "majority": float(np.mean(y_test == majority)),
        "chance": 1.0 / num_classes,
        "train_patches": len(y_train),
        "test_patches": len(y_test),
    }


def compare(towers: Mapping[str, object], num_images: int, image_size: int, seed: int = 0) -> dict[str, dict]:
    """`{name: ridge_probe(...)}` of each tower on the same probe set."""
    images, masks = probe_set(num_images, image_size, seed)
    out = {}
    for name, tower in towers.items():
        grid = (image_size // tower.config.patch_size,) * 2
        labels = patch_labels(masks, grid, len(synthetic.SHAPES))
        out[name] = ridge_probe(patch_features(tower, images), labels, len(synthetic.SHAPES))
    return out
