"""Per-pixel class masks: palette PNGs as PASCAL VOC stores them, and the evaluation crop applied to a mask.

A mask is uint8 `[H, W]`: 0 background, 1..C the classes, `IGNORE` (255) pixels that are scored as
nothing (VOC's object boundaries, COCO crowd regions, objects outside the class list). PNGs carry
VOC's colour map as their palette, so they display in VOC colours and read back as label indices.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IGNORE = 255


def voc_palette(count: int = 256) -> np.ndarray:
    """PASCAL VOC's colour map: uint8 `[count, 3]` (label 1 is (128, 0, 0), 255 is (224, 224, 192))."""
    palette = np.zeros((count, 3), np.uint8)
    for label in range(count):
        value, r, g, b = label, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[label] = (r, g, b)
    return palette


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A label mask as a palette ("P" mode) PNG with VOC's colour map."""
    image = Image.fromarray(np.asarray(mask, np.uint8), "P")
    image.putpalette(voc_palette().reshape(-1).tolist())
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def open_mask(data: bytes, name: str) -> Image.Image:
    """A label PNG (palette or grayscale) opened without converting its indices to colours."""
    image = Image.open(io.BytesIO(data))
    if image.mode not in ("P", "L"):
        raise ValueError(
            f"mask {name} is a {image.mode} image; masks must hold label indices (palette or grayscale PNGs "
            "such as VOC's SegmentationClass), not colours"
        )
    return image


def crop_mask(mask: Image.Image, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """uint8 `[size, size]`: the source `box` of the mask (the one its image got) resized nearest-neighbour."""
    return np.asarray(mask.resize((size, size), Image.Resampling.NEAREST, box=box), np.uint8)
