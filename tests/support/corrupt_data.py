"""Test fixtures: webdataset shards holding every kind of bad sample the pipeline must skip and count."""

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image

from lexvla_jax.data import records as r
from lexvla_jax.miniature.synthetic import encode_jpeg, make_sample, sample_members, tar_bytes


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny PNG whose header claims `width`×`height` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def mode_variants(pixels: np.ndarray) -> dict[str, tuple[str, bytes]]:
    """The same picture in modes the decoder must turn into RGB: name → (extension, bytes)."""
    rgb = Image.fromarray(pixels)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(255)
    cmyk = io.BytesIO()
    rgb.convert("CMYK").save(cmyk, "JPEG", quality=95)
    gray = io.BytesIO()
    rgb.convert("L").save(gray, "JPEG", quality=95)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 0
    wide = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    webp = io.BytesIO()
    rgba.save(webp, "WEBP", lossless=True)
    return {
        "cmyk": ("jpg", cmyk.getvalue()),
        "gray": ("jpg", gray.getvalue()),
        "palette": ("png", _png(palette)),
        "la": ("png", _png(rgb.convert("LA"))),
        "rgba": ("png", _png(rgba)),
        "i16": ("png", _png(Image.fromarray(wide))),
        "webp": ("webp", webp.getvalue()),
    }


CORRUPT_LIMITS = {"min_image_size": 16, "max_image_pixels": 150 * 150}


def write_corrupt_shards(out_dir: str, seed: int = 0, image_size: int = 64) -> dict:
    """Shards mixing good samples with every kind of bad one; returns what a reader must report.

    Returns `{"shards", "good_keys", "skipped": {reason: count}, "limits"}`; `limits` are the
    `min_image_size`/`max_image_pixels` the expectations assume.
    """
    os.makedirs(out_dir, exist_ok=True)
    counter = iter(range(10**6))

    def good(tag: str) -> tuple[str, dict[str, bytes]]:
        i = next(counter)
        key = f"{tag}{i:05d}"
        return key, make_sample(seed, "train", i, key, image_size)

    expected = {reason: 0 for reason in r.SKIP_REASONS}
    good_keys: list[str] = []
    shards = []

    def write(name: str, data: bytes) -> None:
        path = os.path.join(out_dir, name)
        with open(path, "wb") as f:
            f.write(data)
        shards.append(path)

    # Shard 0: bad samples between good ones, plus good samples in every image mode.
    members: list[tuple[str, bytes]] = []

    def add_good(tag: str = "good") -> dict[str, bytes]:
        key, files = good(tag)
        members.extend(sample_members(key, files))
        good_keys.append(key)
        return files

    def add_bad(reason: str, key: str, files: dict[str, bytes]) -> None:
        add_good()
        members.extend(sample_members(key, files))
        expected[reason] += 1

    base = make_sample(seed, "train", 10**5, "base", image_size)
    caption, meta = base["txt"], base["json"]
    small = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    large = encode_jpeg(np.full((200, 200, 3), 90, np.uint8))
    add_bad(r.UNDECODABLE_IMAGE, "bad_undecodable", {"jpg": b"this is not an image" * 20, "txt": caption})
    add_bad(r.TRUNCATED_IMAGE, "bad_truncated", {"jpg": base["jpg"][: len(base["jpg"]) // 2], "txt": caption})
    add_bad(r.MISSING_IMAGE, "bad_noimage", {"txt": caption, "json": meta})
    add_bad(r.MISSING_CAPTION, "bad_nocaption", {"jpg": base["jpg"], "json": meta})
    add_bad(r.EMPTY_CAPTION, "bad_emptycaption", {"jpg": base["jpg"], "txt": b" \n\t "})
    add_bad(r.NON_UTF8_CAPTION, "bad_latin1", {"jpg": base["jpg"], "txt": "caf\xe9 au lait".encode("latin-1")})
    add_bad(r.IMAGE_TOO_LARGE, "bad_bomb", {"png": _png_bomb(), "txt": caption})
    add_bad(r.IMAGE_TOO_LARGE, "bad_large", {"jpg": large, "txt": caption})
    add_bad(r.IMAGE_TOO_SMALL, "bad_small", {"jpg": small, "txt": caption})
    pixels = np.asarray(Image.open(io.BytesIO(base["jpg"])).convert("RGB"))
    for name, (ext, data) in mode_variants(pixels).items():
        members.extend(sample_members(f"mode_{name}", {ext: data, "txt": caption, "json": meta}))
        good_keys.append(f"mode_{name}")
    add_good()
    write("corrupt-00000.tar", tar_bytes(members)[0])

    # Shards 1-3: good samples, then the tar ends inside a member / inside a header / at a bad header.
    for index, reason in enumerate((r.TRUNCATED_MEMBER, r.TRUNCATED_TAR, r.CORRUPT_TAR), start=1):
        members = []
        for _ in range(3):
            add_good(f"s{index}_")
        cut_key, cut_files = good(f"s{index}_")
        members.extend(sample_members(cut_key, cut_files))  # its second member (txt) gets damaged
        members.extend(sample_members(f"s{index}_after", make_sample(seed, "train", 10**5 + index, "x", image_size)))
        data, offsets = tar_bytes(members)
        txt_header = offsets[3 * 3 + 1]
        if reason == r.TRUNCATED_MEMBER:
            data = data[: txt_header + 512 + 5]
        elif reason == r.TRUNCATED_TAR:
            data = data[: txt_header + 100]
        else:
            data = data[:txt_header] + b"X" + data[txt_header + 1 :]
        expected[reason] += 1
        write(f"corrupt-{index:05d}.tar", data)

    # Shard 4: all good.
    members = []
    for _ in range(4):
        add_good("tail")
    write("corrupt-00004.tar", tar_bytes(members)[0])
    return {"shards": shards, "good_keys": sorted(good_keys), "skipped": expected, "limits": dict(CORRUPT_LIMITS)}
