"""Raw samples, the reasons a sample is skipped, and the ArrayRecord record layout.

A raw sample is what a source yields before decoding: `{"key": str, "files": {ext: bytes},
"error": reason | None, "seed": [int, ...]}` — the webdataset members of one key (`jpg`, `txt`, `json`,
...), or an error when the container itself was broken there (a truncated tar). `seed` makes the
sample's random augmentation a pure function of its position in the data, so a resumed run crops
exactly as an uninterrupted one.

Bad samples are never dropped silently: each becomes a skip marker carrying one of `SKIP_REASONS`, the
consumer counts it, and the count is part of the iterator state.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence

import numpy as np

MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
NON_UTF8_CAPTION = "non_utf8_caption"
UNDECODABLE_IMAGE = "undecodable_image"
TRUNCATED_IMAGE = "truncated_image"
IMAGE_TOO_LARGE = "image_too_large"
IMAGE_TOO_SMALL = "image_too_small"
TRUNCATED_MEMBER = "truncated_member"  # a tar ends inside a member's data
TRUNCATED_TAR = "truncated_tar"  # a tar ends inside a header or without its end-of-archive marker
CORRUPT_TAR = "corrupt_tar"  # a tar header with a bad checksum; the rest of that shard is unreadable

SKIP_REASONS: tuple[str, ...] = (
    MISSING_IMAGE,
    MISSING_CAPTION,
    EMPTY_CAPTION,
    NON_UTF8_CAPTION,
    UNDECODABLE_IMAGE,
    TRUNCATED_IMAGE,
    IMAGE_TOO_LARGE,
    IMAGE_TOO_SMALL,
    TRUNCATED_MEMBER,
    TRUNCATED_TAR,
    CORRUPT_TAR,
)
REASON_INDEX = {reason: i for i, reason in enumerate(SKIP_REASONS)}

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTENSION = "txt"


class BadSample(Exception):
    """Raised while decoding a sample; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def skip_counts_dict(counts: Sequence[int] | np.ndarray) -> dict[str, int]:
    """`{reason: count}` from a counts vector indexed like `SKIP_REASONS`."""
    return {reason: int(n) for reason, n in zip(SKIP_REASONS, counts, strict=True)}


def raw_sample(key: str, files: Mapping[str, bytes], error: str | None = None, seed: Sequence[int] = ()) -> dict:
    return {"key": key, "files": dict(files), "error": error, "seed": list(seed)}


_MAGIC = b"LXR1"


def encode_record(sample: Mapping) -> bytes:
    """One raw sample (key, error, member bytes) as an ArrayRecord record."""
    names = sorted(sample["files"])
    header = json.dumps(
        {"key": sample["key"], "error": sample["error"], "files": [[n, len(sample["files"][n])] for n in names]}
    ).encode()
    return b"".join([_MAGIC, struct.pack("<I", len(header)), header, *(sample["files"][n] for n in names)])


def decode_record(record: bytes, seed: Sequence[int] = ()) -> dict:
    """Inverse of `encode_record`."""
    if record[:4] != _MAGIC:
        raise ValueError("not a lexvla ArrayRecord record; convert tars with `lexvla convert-data`")
    (size,) = struct.unpack_from("<I", record, 4)
    header = json.loads(record[8 : 8 + size])
    files, pos = {}, 8 + size
    for name, length in header["files"]:
        files[name] = record[pos : pos + length]
        pos += length
    return raw_sample(header["key"], files, header["error"], seed)
