"""Reading lexical vectors as words: top words, and word maps over an image's patch grid.

A word map shows where in an image one word fires: the word's activation in each patch's lexical vector (the
per-patch vectors before the max-pool), bilinearly upsampled to the image and overlaid on it. Figures are PNGs
drawn with matplotlib's object API (`Figure`, Agg), never pyplot, so no global state or display is touched.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from lexvla_jax import vocab

MAP_COLUMNS = 4  # word-map panels per row


def word_of(tokenizer: vocab.Tokenizer, token_id: int) -> str:
    """The readable word of a vocabulary piece (SentencePiece's word-start mark removed)."""
    return tokenizer.id_to_piece(int(token_id)).replace(vocab.WORD_START, "")


def strongest(s: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` largest entries of one vector `[V']`, strongest first (ties: lower index first)."""
    return np.argsort(-np.asarray(s, np.float32), kind="stable")[:k]


def top_words(
    s: np.ndarray, kept_ids: Sequence[int], tokenizer: vocab.Tokenizer, k: int = 8
) -> list[tuple[str, float]]:
    """The `k` strongest words of one lexical vector `[V']`, as (word, weight), strongest first."""
    s = np.asarray(s, np.float32)
    return [(word_of(tokenizer, kept_ids[j]), float(s[j])) for j in strongest(s, k)]


def format_top_words(words: Sequence[tuple[str, float]]) -> str:
    return ", ".join(f"{w} {v:.2f}" for w, v in words)


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float [rows, cols] → float32 [height, width], bilinear with pixel centres aligned (each patch's value
    lands on its own pixels)."""
    height, width = size
    return np.asarray(Image.fromarray(np.asarray(grid, np.float32)).resize((width, height), Image.BILINEAR))


@dataclasses.dataclass
class ImageWords:
    """An image's strongest words with their weights, and each word's activation over the patch grid."""

    words: list[str]
    weights: np.ndarray  # [k] the image vector's weights
    grids: np.ndarray  # [k, rows, cols] per-patch activation of each word

    def maps(self, size: tuple[int, int]) -> np.ndarray:
        """[k, height, width] the grids upsampled to the image."""
        return np.stack([upsample(grid, size) for grid in self.grids])


def explain_images(encoder, images: np.ndarray, k: int = 8) -> list[ImageWords]:
    """Top-`k` words of each image (uint8 [N,S,S,3]) and their per-patch activations.

    `encoder` is a `LexicalEncoder`: the patch vectors are projected on device onto the union of the images'
    top words, so [N, P, V'] is never held.
    """
    s = encoder.encode_images(images)
    top = np.stack([strongest(row, k) for row in s])  # [N, k]
    union, position = np.unique(top, return_inverse=True)
    project = np.zeros((s.shape[1], len(union)), np.float32)
    project[union, np.arange(len(union))] = 1.0
    patches = encoder.encode_patches(images, project)  # [N, P, U]
    rows, cols = encoder.patch_grid
    position = position.reshape(top.shape)
    return [
        ImageWords(
            words=[encoder.words[j] for j in top[i]],
            weights=s[i, top[i]],
            grids=patches[i][:, position[i]].T.reshape(k, rows, cols),
        )
        for i in range(len(images))
    ]


def explain_texts(encoder, texts: Sequence[str], k: int = 8) -> list[tuple[list[str], np.ndarray]]:
    """(top-`k` words, their weights) of each text's lexical vector."""
    s = encoder.encode_texts(list(texts))
    return [([encoder.words[j] for j in strongest(row, k)], row[strongest(row, k)]) for row in s]


def _bar_chart(ax, words: Sequence[str], weights: np.ndarray) -> None:
    positions = np.arange(len(words))
    ax.barh(positions, weights, color="tab:blue")
    ax.set_yticks(positions, labels=list(words))
    ax.invert_yaxis()  # strongest at the top
    ax.set_xlabel("weight")


def plot_image_words(image: np.ndarray, explained: ImageWords, path, title: str = "") -> str:
    """One PNG (`path`: a file name or a binary file): the image, one heat map per top word over it, and a bar
    chart of the words' weights."""
    maps = explained.maps(image.shape[:2])
    panels = 1 + len(maps)
    columns = min(MAP_COLUMNS, panels)
    grid_rows = -(-panels // columns)
    fig = Figure(figsize=(2.6 * columns + 3.2, 2.7 * grid_rows + 0.6), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[2.6 * columns, 3.2])
    axes = np.atleast_1d(left.subplots(grid_rows, columns)).ravel()
    for ax in axes:
        ax.set_axis_off()
    axes[0].imshow(image)
    axes[0].set_title("image")
    for ax, word, weight, heat in zip(axes[1:], explained.words, explained.weights, maps, strict=False):
        ax.imshow(image)
        ax.imshow(heat, cmap="jet", alpha=0.5, vmin=heat.min(), vmax=heat.max())
        ax.set_title(f"{word} ({weight:.2f})")
    left.suptitle("per-patch activation of each word (each map from its min to its max)", fontsize="small")
    _bar_chart(right.subplots(), explained.words, explained.weights)
    right.suptitle(title or "top words", fontsize="medium")
    fig.savefig(path, dpi=100)
    return path


def plot_text_words(text: str, words: Sequence[str], weights: np.ndarray, path: str) -> str:
    """One PNG: a bar chart of a text's top words, titled with the text."""
    fig = Figure(figsize=(6, 0.35 * len(words) + 1.6), layout="constrained")
    ax = fig.subplots()
    _bar_chart(ax, words, weights)
    ax.set_title(textwrap.shorten(text, 120), wrap=True, fontsize="medium")
    fig.savefig(path, dpi=100)
    return path
