"""A test double of `inference.LexicalEncoder`: its attributes and methods, vectors from constructed arrays (no JAX).

Two ways to make one:
- `FakeEncoder(V', image_vectors=..., text_vectors=..., patch_vector=...)`: tables. Images carry a code in their red
  channel (`colour_of(code)`); `encode_images` looks up the whole image's code, `encode_patches` each patch's (read
  from the patch centre, away from resize blur at its edges); `encode_texts` looks captions up.
- `FakeEncoder.colours(extra_words)`: vectors from colours. A patch's mean RGB (in [0, 1]) times a fixed
  non-negative table [3, V'] plus a small floor, L2-normalised per patch, so "red", "green" and "blue" fire on their
  channel; an image vector is the max over its patches, L2-normalised, like the model's; a text vector marks the
  vocabulary words the text contains (plus the floor), L2-normalised.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

STEP = 8  # red-channel distance between codes: survives JPEG and resizing of flat regions
COLOUR_WORDS = ("red", "green", "blue")
FLOOR = 1e-3


def colour_of(code: int) -> tuple[int, int, int]:
    return (STEP * code + STEP // 2, 128, 128)


def code_of(pixels: np.ndarray) -> int:
    return int(round((float(np.mean(pixels[..., 0])) - STEP // 2) / STEP))


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class FakeEncoder:
    """Has the attributes and methods of `LexicalEncoder`; see the module docstring for where vectors come from.

    image_vectors: image code → `[V']`; text_vectors: caption → `[V']`; patch_vector: patch code → `[V']`.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        image_vectors: Mapping[int, np.ndarray] | None = None,
        text_vectors: Mapping[str, np.ndarray] | None = None,
        patch_vector: Callable[[int], np.ndarray] | None = None,
        image_size: int = 32,
        patch_grid: tuple[int, int] = (4, 4),
        batch_size: int = 4,
        words: Sequence[str] | None = None,
    ):
        self.words = list(words) if words is not None else [f"w{j}" for j in range(vocab_size)]
        self.kept_ids = np.arange(vocab_size, dtype=np.int32)
        self.tokenizer = None
        self.image_size, self.patch_grid, self.batch_size = image_size, patch_grid, batch_size
        self.patch_size = image_size // patch_grid[0]
        self.image_vectors, self.text_vectors, self.patch_vector = image_vectors, text_vectors, patch_vector
        self.calls: list[tuple[str, int]] = []
        self._images = self._images_by_code if image_vectors is not None else self._images_by_patches
        self._texts = lambda captions: np.stack([self.text_vectors[caption] for caption in captions])
        self._patches = self._patches_by_code

    @classmethod
    def colours(cls, extra_words: Sequence[str] = (), image_size: int = 32, patch_size: int = 8, seed: int = 0):
        """Vectors from patch colours and caption words (module docstring)."""
        words = [*COLOUR_WORDS, *extra_words]
        grid = (image_size // patch_size, image_size // patch_size)
        encoder = cls(len(words), words=words, image_size=image_size, patch_grid=grid, batch_size=3)
        table = np.random.default_rng(seed).uniform(0.0, 0.3, (3, len(words)))
        table[:, :3] = 0.0
        table[[0, 1, 2], [0, 1, 2]] = 3.0
        encoder.table = table.astype(np.float32)
        encoder._patches = encoder._patches_by_colour
        encoder._texts = encoder._texts_by_words
        return encoder

    def _check(self, images: np.ndarray) -> None:
        assert images.dtype == np.uint8 and images.shape[1:] == (self.image_size, self.image_size, 3), images.shape

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        self._check(images)
        self.calls.append(("images", len(images)))
        return np.asarray(self._images(images), np.float32)

    def encode_texts(self, captions: Sequence[str]) -> np.ndarray:
        self.calls.append(("texts", len(captions)))
        return np.asarray(self._texts(captions), np.float32)

    def encode_patches(self, images: np.ndarray, project: np.ndarray | None = None) -> np.ndarray:
        self._check(images)
        self.calls.append(("patches", len(images)))
        vectors = np.asarray(self._patches(images), np.float32)
        return vectors if project is None else vectors @ project

    def _images_by_code(self, images: np.ndarray) -> np.ndarray:
        """The table's vector of each image's code; an image whose code is not in it pools its patches."""
        return np.stack(
            [
                self.image_vectors[code_of(image)]
                if code_of(image) in self.image_vectors
                else self._images_by_patches(image[None])[0]
                for image in images
            ]
        )

    def _images_by_patches(self, images: np.ndarray) -> np.ndarray:
        """Without an image table: the max over the image's patch vectors, L2-normalised, as the model pools."""
        return _normalise(np.asarray(self._patches(images), np.float32).max(axis=1))

    def _patches_by_code(self, images: np.ndarray) -> np.ndarray:
        rows, cols = self.patch_grid
        ph, pw = self.image_size // rows, self.image_size // cols
        centre = (slice(ph // 4, ph - ph // 4), slice(pw // 4, pw - pw // 4))
        return np.stack(
            [
                [
                    self.patch_vector(code_of(image[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw][centre]))
                    for r in range(rows)
                    for c in range(cols)
                ]
                for image in images
            ]
        )

    def _patches_by_colour(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32) / 255.0
        n, (rows, cols), p = len(images), self.patch_grid, self.patch_size
        colours = images.reshape(n, rows, p, cols, p, 3).mean(axis=(2, 4)).reshape(n, rows * cols, 3)
        return _normalise(colours @ self.table + FLOOR)

    def _texts_by_words(self, captions: Sequence[str]) -> np.ndarray:
        index = {w: j for j, w in enumerate(self.words)}
        s = np.full((len(captions), len(self.words)), FLOOR, np.float32)
        for i, caption in enumerate(captions):
            for word in caption.lower().split():
                if word in index:
                    s[i, index[word]] += 1.0
        return _normalise(s)
