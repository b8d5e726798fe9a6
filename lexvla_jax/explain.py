"""Reading lexical vectors as words: top words, and word maps over an image's patch grid.

A word map shows where in an image one word fires: the word's activation in each patch's lexical vector (the
per-patch vectors before the max-pool), bilinearly upsampled to the image and overlaid on a grey copy of it.
Figures are PNGs drawn with matplotlib's object API (`Figure`, Agg), never pyplot, so no global state or display
is touched.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Sequence

import numpy as np
from matplotlib import cm, colors
from matplotlib.figure import Figure
from PIL import Image

from lexvla_jax.text.tokenizer import Tokenizer

MAP_COLUMNS = 4  # word-map panels per row
CHART_TITLE_CHARACTERS = 30  # per line of the bar chart's title (its column is 3.2 inches wide)
HEAT_MAP = "jet"  # word-map colours, low (blue) to high (red), over a grey copy of the image


def strongest(s: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` largest entries of one vector `[V']`, strongest first (ties: lower index first)."""
    return np.argsort(-np.asarray(s, np.float32), kind="stable")[:k]


def top_words(s: np.ndarray, kept_ids: Sequence[int], tokenizer: Tokenizer, k: int = 8) -> list[tuple[str, float]]:
    """The `k` strongest words of one lexical vector `[V']`, as (word, weight), strongest first."""
    s = np.asarray(s, np.float32)
    return [(tokenizer.word(kept_ids[j]), float(s[j])) for j in strongest(s, k)]


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
    """Top-`k` words of each image (uint8 [N,S,S,3]) and their per-patch activations (all V' words if k > V').

    `encoder` is a `LexicalEncoder`: the patch vectors are projected on device onto the union of the images'
    top words, so [N, P, V'] is never held.
    """
    s = encoder.encode_images(images)
    top = np.stack([strongest(row, k) for row in s])  # [N, min(k, V')]
    k = top.shape[1]
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
    bars = ax.barh(positions, weights, color="tab:blue")
    ax.bar_label(bars, labels=[f"{w:.2f}" for w in weights], padding=2, fontsize="small")
    ax.set_xlim(0, 1.2 * max(float(np.max(weights)), 1e-6))  # room for the labels
    ax.set_yticks(positions, labels=list(words))
    ax.invert_yaxis()  # strongest at the top
    ax.set_xlabel("weight")


def plot_image_words(image: np.ndarray, explained: ImageWords, path, title: str = "") -> str:
    """One PNG (`path`: a file name or a binary file): the image, one heat map per top word over it, and a bar
    chart of the words' weights."""
    image_words_figure(image, explained, title).savefig(path, dpi=100)
    return path


def image_words_figure(image: np.ndarray, explained: ImageWords, title: str = "") -> Figure:
    """The figure of `plot_image_words`: a grid of the image and its word maps (grey image under each map, one
    colour bar), and the bar chart titled `title` on the right."""
    maps = explained.maps(image.shape[:2])
    panels = 1 + len(maps)
    columns = min(MAP_COLUMNS, panels)
    grid_rows = -(-panels // columns)
    fig = Figure(figsize=(2.6 * columns + 3.2, 2.7 * grid_rows + 1.2), layout="compressed")  # + the colour bar
    grid = fig.add_gridspec(grid_rows, columns + 1, width_ratios=[2.6] * columns + [3.2])
    axes = [fig.add_subplot(grid[row, column]) for row in range(grid_rows) for column in range(columns)]
    for ax in axes:
        ax.set_axis_off()
    axes[0].imshow(image)
    axes[0].set_title("image")
    grey = np.asarray(Image.fromarray(np.asarray(image, np.uint8)).convert("L"))  # the maps' colours stay unmixed
    for ax, word, weight, heat in zip(axes[1:], explained.words, explained.weights, maps, strict=False):
        ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
        ax.imshow(heat, cmap=HEAT_MAP, alpha=0.5, vmin=heat.min(), vmax=heat.max())
        ax.set_title(f"{word} ({weight:.2f})")
    scale = cm.ScalarMappable(colors.Normalize(0.0, 1.0), HEAT_MAP)
    bar = fig.colorbar(scale, ax=axes, location="bottom", shrink=0.4, aspect=30, ticks=[0.0, 1.0])
    bar.ax.set_xticklabels(["lowest", "highest"])
    bar.set_label("per-patch activation of the word (each map from its own lowest to highest)", fontsize="small")
    chart = fig.add_subplot(grid[:, columns])
    _bar_chart(chart, explained.words, explained.weights)
    chart.set_title(textwrap.fill(title or "top words", CHART_TITLE_CHARACTERS), fontsize="medium")
    return fig


def plot_text_words(text: str, words: Sequence[str], weights: np.ndarray, path: str) -> str:
    """One PNG: a bar chart of a text's top words, titled with the text."""
    text_words_figure(text, words, weights).savefig(path, dpi=100)
    return path


def text_words_figure(text: str, words: Sequence[str], weights: np.ndarray) -> Figure:
    fig = Figure(figsize=(6, 0.35 * len(words) + 1.6), layout="constrained")
    ax = fig.subplots()
    _bar_chart(ax, words, weights)
    ax.set_title(textwrap.shorten(text, 120), wrap=True, fontsize="medium")
    return fig
