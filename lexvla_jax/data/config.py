"""Every data setting with its default, and shard lists resolved from globs.

Config files do `config.data = default_data_config()` and override fields. `train_shards` and
`eval_shards` accept a glob, a comma-separated string of globs, a directory, a webdataset brace range
(`cc12m/{00000..01242}.tar`) or a list of any of these; local paths and any path `etils.epath` opens.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Sequence

import ml_collections
from etils import epath

from lexvla_jax.configlib import ConfigError
from lexvla_jax.text.prompt import DEFAULT_PROMPT

FORMATS = ("webdataset", "array_record")
RESAMPLE_FILTERS = ("bilinear", "bicubic")


def default_data_config() -> ml_collections.ConfigDict:
    """All data fields with defaults; `train_shards`/`eval_shards` must be set by the experiment config."""
    return ml_collections.ConfigDict(
        {
            # Sources.
            "train_shards": None,  # glob | "a,b" | dir | brace range | list
            "eval_shards": None,
            "format": "webdataset",  # webdataset | array_record
            "num_epochs": None,  # None: repeat forever (training)
            "seed": 0,
            # Independent data streams (`streams.py`): a checkpoint resumes on any process count dividing
            # it. 0: one per process.
            "num_streams": 0,
            # Reading: grain worker processes (mp_prefetch) and their buffers.
            "num_workers": 2,
            "prefetch_buffer": 4,  # batches buffered per worker
            "read_threads": 1,  # threads per worker reading an array_record MapDataset
            "interleave_shards": 4,  # webdataset shards each worker reads round-robin
            "shuffle_buffer": 1000,  # webdataset: window shuffle per worker; resumable exactly
            # Bad samples.
            "min_image_size": 16,  # shorter side, pixels
            "max_image_pixels": 64_000_000,  # decompression-bomb guard (header only, before decoding)
            "max_consecutive_skips": 10_000,  # more bad samples in a row than this is an error
            # Images: uint8 on the host, normalised on the device.
            "image_size": 224,
            "crop_scale": (0.9, 1.0),  # random-resized-crop area range (open_clip's default)
            "crop_ratio": (3 / 4, 4 / 3),
            "random_flip": True,  # a flipped image gets "left" and "right" swapped in its caption
            "resample": "bilinear",  # training: bilinear | bicubic (antialiased); bicubic costs ~25% more CPU
            "jpeg_draft": True,  # training: decode a JPEG at 1/2–1/8 scale when its crop is ≥ 2× the output
            # Evaluation (DINOv2's and CLIP's): shorter side to image_size / eval_crop_pct, centre crop, full-scale
            # decoding (`transforms.eval_box`); 0.875: 256 → 224 as DINOv2, 1.0 as CLIP's own transform.
            "eval_resample": "bicubic",
            "eval_crop_pct": 0.875,
            # Text.
            "tokenizer": "",  # sentencepiece model path
            "prompt_template": DEFAULT_PROMPT,
            "max_caption_tokens": 32,
            "max_length": None,  # None: template length + max_caption_tokens
        }
    )


class DataConfigError(ConfigError):
    """Data settings or data that cannot work; the message (one line) names the field and the fix."""


_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_GLOB_CHARS = re.compile(r"[*?\[]")


def _expand_braces(pattern: str) -> list[str]:
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    first, last = match.group(1), match.group(2)
    width = len(first)
    head, tail = pattern[: match.start()], pattern[match.end() :]
    out = []
    for i in range(int(first), int(last) + 1):
        out.extend(_expand_braces(f"{head}{i:0{width}d}{tail}"))
    return out


def _glob(pattern: str) -> list[str]:
    if "://" not in pattern:
        return sorted(glob.glob(pattern))
    magic = _GLOB_CHARS.search(pattern)
    root, _, rest = pattern[: magic.start()].rpartition("/")
    rest = rest + pattern[magic.start() :]
    return sorted(str(p) for p in epath.Path(root).glob(rest))


def resolve_shards(spec: str | Sequence[str] | None, field: str, suffix: str = ".tar") -> list[str]:
    """Expands a shard spec into a sorted list of files; nothing matched is an error naming `field`."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise DataConfigError(f"{field} is not set; set it to a glob such as 'data/train/*{suffix}'")
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    paths: list[str] = []
    for item in items:
        for pattern in _expand_braces(item):
            if _GLOB_CHARS.search(pattern):
                paths.extend(_glob(pattern))
            elif epath.Path(pattern).is_dir():
                paths.extend(_glob(str(epath.Path(pattern) / f"*{suffix}")))
            elif epath.Path(pattern).exists():
                paths.append(pattern)
            else:
                raise DataConfigError(f"{field}: {pattern!r} does not exist; check the path or glob")
    if not paths:
        raise DataConfigError(f"{field}={spec!r} matches no {suffix} files; check the glob or directory")
    return paths


def check_eval_transform(config: ml_collections.ConfigDict) -> None:
    """The evaluation transform's fields (`eval_resample`, `eval_crop_pct`), one line naming a bad one."""
    if config.get("eval_resample", "bicubic") not in RESAMPLE_FILTERS:
        raise DataConfigError(
            f"config.data.eval_resample={config.eval_resample!r}: use one of {', '.join(RESAMPLE_FILTERS)}"
        )
    if not 0 < config.get("eval_crop_pct", 0.875) <= 1:
        raise DataConfigError(
            f"config.data.eval_crop_pct={config.eval_crop_pct}: give the kept fraction in (0, 1], e.g. 0.875"
        )


def check_data_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, with the field named, on settings the pipeline cannot use."""
    if config.format not in FORMATS:
        raise DataConfigError(f"config.data.format={config.format!r}: use one of {', '.join(FORMATS)}")
    if config.resample not in RESAMPLE_FILTERS:
        raise DataConfigError(f"config.data.resample={config.resample!r}: use one of {', '.join(RESAMPLE_FILTERS)}")
    check_eval_transform(config)
    if config.num_workers < 0:
        raise DataConfigError(f"config.data.num_workers={config.num_workers}: must be >= 0 (0 reads in-process)")
    low, high = config.crop_scale
    if not 0 < low <= high <= 1:
        raise DataConfigError(f"config.data.crop_scale={tuple(config.crop_scale)}: need 0 < low <= high <= 1")
    if config.image_size < 1 or config.min_image_size < 1:
        raise DataConfigError("config.data.image_size and min_image_size must be positive")
