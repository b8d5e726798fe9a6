"""A test double of `inference.LexicalEncoder` built from constructed arrays (no model, no JAX).

Patch vectors come from patch colours: a patch's mean RGB (in [0, 1]) times a fixed non-negative table
[3, V'] plus a small floor, L2-normalised per patch; the table makes "red", "green" and "blue" fire on their
channel. An image vector is the max over its patches, L2-normalised, like the model's. A text vector marks the
vocabulary words the text contains (plus the floor), L2-normalised.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

COLOUR_WORDS = ("red", "green", "blue")
FLOOR = 1e-3


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class FakeLexicalEncoder:
    def __init__(self, extra_words: Sequence[str] = (), image_size: int = 32, patch_size: int = 8, seed: int = 0):
        self.words = [*COLOUR_WORDS, *extra_words]
        vocab_size = len(self.words)
        self.kept_ids = np.arange(vocab_size, dtype=np.int32)
        self.tokenizer = None
        self.image_size, self.patch_size = image_size, patch_size
        self.patch_grid = (image_size // patch_size, image_size // patch_size)
        self.batch_size = 3
        table = np.random.default_rng(seed).uniform(0.0, 0.3, (3, vocab_size))
        table[:, :3] = 0.0
        table[[0, 1, 2], [0, 1, 2]] = 3.0
        self.table = table.astype(np.float32)

    def prompt(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(4, np.int32), np.ones(4, np.int32)

    def encode_patches(self, images: np.ndarray, project: np.ndarray | None = None) -> np.ndarray:
        images = np.asarray(images, np.float32) / 255.0
        n, (rows, cols), p = len(images), self.patch_grid, self.patch_size
        colours = images.reshape(n, rows, p, cols, p, 3).mean(axis=(2, 4)).reshape(n, rows * cols, 3)
        patches = _normalise(colours @ self.table + FLOOR)
        return patches if project is None else patches @ project

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        return _normalise(self.encode_patches(images).max(axis=1))

    def encode_texts(self, captions: Sequence[str]) -> np.ndarray:
        index = {w: j for j, w in enumerate(self.words)}
        s = np.full((len(captions), len(self.words)), FLOOR, np.float32)
        for i, caption in enumerate(captions):
            for word in caption.lower().split():
                if word in index:
                    s[i, index[word]] += 1.0
        return _normalise(s)
