"""A `LexicalEncoder` test double: lexical vectors constructed from image colours and caption text.

Images carry a code in their red channel (`colour_of(code)`): `encode_images` looks up the whole image's
code, `encode_patches` each patch's (read from the patch centre, away from resize blur at its edges).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

STEP = 8  # red-channel distance between codes: survives JPEG and resizing of flat regions


def colour_of(code: int) -> tuple[int, int, int]:
    return (STEP * code + STEP // 2, 128, 128)


def code_of(pixels: np.ndarray) -> int:
    return int(round((float(np.mean(pixels[..., 0])) - STEP // 2) / STEP))


class FakeEncoder:
    """Has the attributes and methods of `LexicalEncoder`; every vector comes from the given tables.

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
    ):
        self.kept_ids = np.arange(vocab_size, dtype=np.int32)
        self.words = [f"w{j}" for j in range(vocab_size)]
        self.image_size, self.patch_grid, self.batch_size = image_size, patch_grid, batch_size
        self.image_vectors, self.text_vectors, self.patch_vector = image_vectors, text_vectors, patch_vector
        self.calls: list[tuple[str, int]] = []

    def _check(self, images: np.ndarray) -> None:
        assert images.dtype == np.uint8 and images.shape[1:] == (self.image_size, self.image_size, 3), images.shape

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        self._check(images)
        self.calls.append(("images", len(images)))
        return np.stack([self.image_vectors[code_of(image)] for image in images]).astype(np.float32)

    def encode_texts(self, captions: Sequence[str]) -> np.ndarray:
        self.calls.append(("texts", len(captions)))
        return np.stack([self.text_vectors[caption] for caption in captions]).astype(np.float32)

    def encode_patches(self, images: np.ndarray, project: np.ndarray | None = None) -> np.ndarray:
        self._check(images)
        self.calls.append(("patches", len(images)))
        rows, cols = self.patch_grid
        ph, pw = self.image_size // rows, self.image_size // cols
        centre = (slice(ph // 4, ph - ph // 4), slice(pw // 4, pw - pw // 4))
        vectors = np.stack(
            [
                [
                    self.patch_vector(code_of(image[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw][centre]))
                    for r in range(rows)
                    for c in range(cols)
                ]
                for image in images
            ]
        ).astype(np.float32)
        return vectors if project is None else vectors @ project
