"""Raw sample → `{"image": uint8 [S,S,3], "input_ids", "attention_mask"}` or a skip marker (PIL + numpy).

This runs inside grain workers, so it imports no JAX. Images stay uint8 on the host (4× less
host→device traffic than float32); `models/image_norm.py` applies the vision tower's mean/std on the
device. Checks run cheapest first: container error, missing members, caption, image header (pixel
limit, minimum size), then decoding. The first failing check names the reason.
"""

from __future__ import annotations

import io
import math
import re
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from lexvla_jax.data.records import (
    CAPTION_EXTENSION,
    EMPTY_CAPTION,
    IMAGE_EXTENSIONS,
    IMAGE_TOO_LARGE,
    IMAGE_TOO_SMALL,
    MISSING_CAPTION,
    MISSING_IMAGE,
    NON_UTF8_CAPTION,
    REASON_INDEX,
    TRUNCATED_IMAGE,
    UNDECODABLE_IMAGE,
    BadSample,
)

# Our own pixel limit is checked from the header; PIL's warning between its limits is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def decode_caption(data: bytes) -> str:
    """UTF-8 caption without surrounding whitespace; raises `BadSample` if not UTF-8 or empty."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample(NON_UTF8_CAPTION) from None
    text = text.lstrip("\ufeff").strip()
    if not text:
        raise BadSample(EMPTY_CAPTION)
    return text


def _bad_image(error: Exception) -> BadSample:
    reason = TRUNCATED_IMAGE if "truncat" in str(error).lower() else UNDECODABLE_IMAGE
    return BadSample(reason, f"{type(error).__name__}: {error}")


def open_image(data: bytes, *, max_pixels: int, min_size: int) -> Image.Image:
    """Parses the header only (no pixels decoded) and applies the pixel limit and minimum size."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadSample(IMAGE_TOO_LARGE, str(e)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise _bad_image(e) from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadSample(IMAGE_TOO_LARGE, f"{width}x{height} > {max_pixels} pixels")
    if min(width, height) < min_size:
        raise BadSample(IMAGE_TOO_SMALL, f"{width}x{height}, shorter side < {min_size}")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: alpha composited on white, 16-bit scaled to 8-bit, CMYK/P/L/... converted."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _HIGH_BIT_MODES or mode == "F":
        values = np.asarray(image, dtype=np.float32)
        values = values / 257.0 if mode != "F" else values
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
        return image.convert("RGB")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


Box = tuple[float, float, float, float]


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> Box:
    """torchvision's RandomResizedCrop box: area fraction in `scale`, aspect ratio (log-uniform) in `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return (x0, y0, x0 + w, y0 + h)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    x0, y0 = (width - w) // 2, (height - h) // 2
    return (x0, y0, x0 + w, y0 + h)


# Evaluation keeps the centre `crop_pct` of the resized image (DINOv2's 224/256, timm's default).
EVAL_CROP_PCT = 0.875


def eval_box(width: int, height: int, size: int, crop_pct: float = EVAL_CROP_PCT) -> Box:
    """What DINOv2's and CLIP's evaluation transform keeps of a `width`×`height` image, in its pixels.

    That transform resizes the shorter side to `floor(size / crop_pct)` (torchvision's `Resize(int)`: the longer
    side becomes `int(short · long / short_side)`) and centre-crops `size`² (torchvision's `CenterCrop` offsets,
    `int(round((side − size) / 2))`): 256 then 224 for `size=224, crop_pct=0.875`; CLIP's own is `crop_pct=1`.
    Resizing this box to `size`² in one step samples the same source positions.
    """
    short = math.floor(size / crop_pct + 1e-9)
    if width <= height:
        new_width, new_height = short, int(short * height / width)
    else:
        new_width, new_height = int(short * width / height), short
    left, top = int(round((new_width - size) / 2.0)), int(round((new_height - size) / 2.0))
    sx, sy = width / new_width, height / new_height
    return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def crop_resize(
    image: Image.Image, box: Box, size: int, resample: str = "bilinear", flip: bool = False, draft: bool = False
) -> np.ndarray:
    """Decodes `image`, crops `box`, resizes to `size`² with antialiasing (`resample`: bilinear or bicubic), and
    mirrors it left-right if `flip`. With `draft` a JPEG whose crop is ≥ 2× the output is decoded at a reduced
    scale (1/2 to 1/8: faster, pixels change by a few grey levels; training only)."""
    width, height = image.size
    shrink = min((box[2] - box[0]) / size, (box[3] - box[1]) / size)
    try:
        if draft and image.format == "JPEG" and shrink >= 2:
            image.draft(image.mode, (math.ceil(width / shrink), math.ceil(height / shrink)))
            sx, sy = image.size[0] / width, image.size[1] / height
            box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        image = to_rgb(image)
        out = image.resize((size, size), RESAMPLE[resample], box=box)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise _bad_image(e) from None
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def load_image(
    data: bytes,
    size: int,
    *,
    max_pixels: int,
    min_size: int,
    rng: np.random.Generator | None = None,
    scale=(0.9, 1.0),
    ratio=(3 / 4, 4 / 3),
    resample: str = "bilinear",
    flip: bool = False,
    draft: bool = True,
    crop_pct: float = EVAL_CROP_PCT,
) -> np.ndarray:
    """uint8 [size, size, 3]: with `rng`, a random-resized crop (JPEG draft decoding if `draft`), mirrored if `flip`;
    without, the evaluation transform (`eval_box` with `crop_pct`, full-scale decoding)."""
    image = open_image(data, max_pixels=max_pixels, min_size=min_size)
    if rng is None:
        return crop_resize(image, eval_box(*image.size, size, crop_pct), size, resample, flip)
    return crop_resize(image, random_resized_crop_box(*image.size, rng, scale, ratio), size, resample, flip, draft)


_LEFT_RIGHT = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}


def swap_left_right(caption: str) -> str:
    """The caption of the mirrored image."""
    return _LEFT_RIGHT.sub(lambda m: _SWAP[m.group(0)], caption)


def image_member(files: dict) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in files:
            return files[ext]
    raise BadSample(MISSING_IMAGE)


class SampleDecoder:
    """Raw sample → model inputs, or `{"skip": reason index, "key": key}` for a bad sample.

    Training (`train=True`): random-resized crop and a horizontal flip (with "left"/"right" swapped in
    the caption) drawn from the sample's own seed, so augmentation is reproducible after a resume; `resample`
    and JPEG draft decoding (`jpeg_draft`). Evaluation: `eval_box` with `eval_crop_pct`, `eval_resample`, full-scale
    decoding. `prompt_encoder=None` leaves the caption untokenised (images only).
    """

    def __init__(
        self,
        *,
        image_size: int,
        train: bool,
        min_image_size: int,
        max_image_pixels: int,
        crop_scale=(0.9, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        random_flip: bool = True,
        resample: str = "bilinear",
        jpeg_draft: bool = True,
        eval_resample: str = "bicubic",
        eval_crop_pct: float = EVAL_CROP_PCT,
        prompt_encoder=None,
    ):
        self.image_size, self.train = image_size, train
        self.min_image_size, self.max_image_pixels = min_image_size, max_image_pixels
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        self.random_flip, self.prompt_encoder = random_flip, prompt_encoder
        self.resample = resample if train else eval_resample
        self.jpeg_draft, self.eval_crop_pct = jpeg_draft, eval_crop_pct

    @classmethod
    def from_config(cls, config, *, train: bool, prompt_encoder=None) -> SampleDecoder:
        return cls(
            image_size=config.image_size,
            train=train,
            min_image_size=config.min_image_size,
            max_image_pixels=config.max_image_pixels,
            crop_scale=config.crop_scale,
            crop_ratio=config.crop_ratio,
            random_flip=config.random_flip,
            resample=config.resample,
            jpeg_draft=config.get("jpeg_draft", True),
            eval_resample=config.get("eval_resample", "bicubic"),
            eval_crop_pct=config.get("eval_crop_pct", EVAL_CROP_PCT),
            prompt_encoder=prompt_encoder,
        )

    def __call__(self, sample: dict) -> dict:
        try:
            return self.decode(sample)
        except BadSample as e:
            return {"skip": REASON_INDEX[e.reason], "key": sample["key"]}

    def decode(self, sample: dict) -> dict:
        if sample["error"] is not None:
            raise BadSample(sample["error"])
        files = sample["files"]
        data = image_member(files)
        if CAPTION_EXTENSION not in files:
            raise BadSample(MISSING_CAPTION)
        caption = decode_caption(files[CAPTION_EXTENSION])
        rng = np.random.default_rng(sample["seed"]) if self.train else None
        coin = rng.random() if rng is not None else 1.0  # drawn either way: the crop does not depend on flipping
        flip = self.random_flip and coin < 0.5
        image = load_image(
            data,
            self.image_size,
            max_pixels=self.max_image_pixels,
            min_size=self.min_image_size,
            rng=rng,
            scale=self.crop_scale,
            ratio=self.crop_ratio,
            resample=self.resample,
            flip=flip,
            draft=self.jpeg_draft,
            crop_pct=self.eval_crop_pct,
        )
        if flip:
            caption = swap_left_right(caption)
        element = {"image": image, "key": sample["key"]}
        if self.prompt_encoder is not None:
            element["input_ids"], element["attention_mask"] = self.prompt_encoder(caption)
        return element
