"""A streaming tar reader that groups webdataset members into samples and resumes at a byte offset.

It reads ustar/GNU/pax tars (what `tarfile` and img2dataset write) block by block from any binary file
object, so the position after every sample is an exact byte offset: the header of the first member of
the next sample. Damage is reported, not raised: a tar that ends inside a member's data, ends inside a
header or without its end-of-archive block, or has a header with a bad checksum ends its shard with one
error event, which also accounts for the sample it cut.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

from lexvla_jax.data.records import CORRUPT_TAR, TRUNCATED_MEMBER, TRUNCATED_TAR

BLOCK = 512
END = -1  # resume offset of a shard that has been read to its end
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR_TYPES = (b"0", b"\0", b"7")


class TarSample(NamedTuple):
    """One sample (`files` by extension) or one damage event (`error` set, `files` empty)."""

    key: str | None
    files: dict[str, bytes]
    error: str | None
    offset: int  # where the sample starts
    resume: int  # where reading continues after it (END after the last one)


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    digits = field.replace(b"\0", b" ").strip()
    return int(digits, 8) if digits else 0


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = _number(block[148:156])
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored == unsigned:
        return True
    return stored == unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)  # old signed-char tars


def _pax_path(data: bytes) -> str | None:
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "replace")
        pos += length
    return None


def iter_members(f: BinaryIO, offset: int = 0) -> Iterator[tuple[int, str | None, bytes | str]]:
    """Yields `(header_offset, name, data)` per regular member, then `(offset, None, reason)` on damage."""
    f.seek(offset)
    pos, start, long_name = offset, None, None
    while True:
        block = f.read(BLOCK)
        if len(block) < BLOCK:
            yield pos, None, TRUNCATED_TAR
            return
        if block == _ZERO_BLOCK:
            return
        if not _checksum_ok(block):
            yield pos, None, CORRUPT_TAR
            return
        header_start = pos if start is None else start
        size, kind = _number(block[124:136]), block[156:157]
        data = f.read(size)
        if len(data) < size:
            yield header_start, None, TRUNCATED_MEMBER
            return
        padding = -size % BLOCK
        if padding:
            f.read(padding)
        pos += BLOCK + size + padding
        if kind == b"L":
            long_name, start = data.rstrip(b"\0").decode("utf-8", "replace"), header_start
            continue
        if kind == b"x":
            long_name, start = _pax_path(data) or long_name, header_start
            continue
        if kind not in _REGULAR_TYPES:
            long_name = start = None
            continue
        name = long_name
        if name is None:
            name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            prefix = block[345:500].split(b"\0", 1)[0] if block[257:263] == b"ustar\0" else b""
            if prefix:
                name = prefix.decode("utf-8", "replace") + "/" + name
        long_name = start = None
        yield header_start, name, data


def split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the basename; the rest is the extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_samples(f: BinaryIO, offset: int = 0) -> Iterator[TarSample]:
    """Groups consecutive members sharing a key into samples; see `TarSample`."""
    key, files, start = None, {}, offset
    for member_offset, name, data in iter_members(f, offset):
        if name is None:
            yield TarSample(key, {}, data, start if key is not None else member_offset, END)
            return
        member_key, ext = split_name(name)
        if not ext or member_key.rpartition("/")[2].startswith("__"):
            continue
        if member_key != key:
            if key is not None:
                yield TarSample(key, files, None, start, member_offset)
            key, files, start = member_key, {}, member_offset
        files.setdefault(ext, data)
    if key is not None:
        yield TarSample(key, files, None, start, END)
