"""The embedded dataset: procedurally drawn shapes with captions that describe them.

`lexvla make-synthetic --out DIR --train N --eval M --seed S` writes img2dataset-style webdataset
shards: `DIR/train/shard-00000.tar`, ..., `DIR/eval/shard-00000.tar`, ... with `KEY.jpg`, `KEY.txt`
(the caption) and `KEY.json` (key, caption, width, height, status, the objects with their boxes; eval
samples also hold 5 paraphrases in `captions`), plus `DIR/manifest.json`. An image holds one object at
a position ("a large red circle at the top") or two in a spatial relation ("a small red circle above a
large blue square"): 6 shapes × 8 colours × 2 sizes, 4 relations, 4 backgrounds, so two eval captions
rarely collide. Every sample is a pure function of `(seed, split, index)`, and tars are byte-identical
for a seed (fixed member metadata). Eval samples also carry `KEY.mask.png`, each pixel's class (0 the
background, 1 + the `SHAPES` index of the object there) as a palette PNG, for PatchDis.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import tarfile
from collections.abc import Iterable
from concurrent import futures

import numpy as np
from PIL import Image, ImageDraw

from lexvla_jax.data.eval_set import read_captions
from lexvla_jax.data.masks import encode_mask_png

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUNDS = {"gray": (128, 128, 128), "beige": (225, 210, 170), "brown": (110, 70, 40), "teal": (40, 130, 130)}
SIZES = {"small": 0.22, "large": 0.40}  # object extent as a fraction of the image side
RELATIONS = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
POSITIONS = {
    "in the center": (0.5, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
}
TWO_OBJECT_FRACTION = 0.85
SPLITS = {"train": 0, "eval": 1}
SUPERSAMPLE = 2
MANIFEST = "manifest.json"


def _describe(obj: dict) -> str:
    return f"{obj['size']} {obj['color']} {obj['shape']}"


def _short_names(a: dict, b: dict) -> tuple[str, str]:
    """How a caption refers back to each object: the shortest description that tells them apart."""
    for fields in (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape")):
        na, nb = (" ".join(o[f] for f in fields) for o in (a, b))
        if na != nb:
            return na, nb
    return _describe(a), _describe(b)


def captions_for(scene: dict) -> list[str]:
    """Five paraphrases of a scene; the first is the canonical caption."""
    bg, objects = scene["background"], scene["objects"]
    if len(objects) == 1:
        a, pos = _describe(objects[0]), scene["position"]
        return [
            f"a {a} {pos}",
            f"a {a} {pos} on a {bg} background",
            f"a {bg} background with a {a} {pos}",
            f"there is a {a} {pos}",
            f"a picture of a {a} {pos}",
        ]
    a, b = (_describe(o) for o in objects)
    rel = scene["relation"]
    inv = RELATIONS[rel]
    sa, sb = _short_names(*objects)
    return [
        f"a {a} {rel} a {b}",
        f"a {b} {inv} a {a}",
        f"a {a} {rel} a {b} on a {bg} background",
        f"there is a {a} and a {b}; the {sa} is {rel} the {sb}",
        f"a {bg} picture with a {b} {inv} a {a}",
    ]


def _random_object(rng: np.random.Generator, background: str) -> dict:
    colors = [c for c in COLORS if COLORS[c] != BACKGROUNDS[background]]
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "color": colors[rng.integers(len(colors))],
        "size": ("small", "large")[rng.integers(2)],
    }


def random_scene(rng: np.random.Generator) -> dict:
    """Background, one or two objects with centres (fractions of the side), position or relation."""
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    jitter = lambda: rng.uniform(-0.04, 0.04)
    if rng.random() >= TWO_OBJECT_FRACTION:
        obj = _random_object(rng, background)
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        cx, cy = POSITIONS[position]
        obj["center"] = (cx + jitter(), cy + jitter())
        return {"background": background, "objects": [obj], "position": position}
    a = _random_object(rng, background)
    b = _random_object(rng, background)
    while _describe(a) == _describe(b):
        b = _random_object(rng, background)
    relation = list(RELATIONS)[rng.integers(len(RELATIONS))]
    near, far = 0.27 + jitter(), 0.73 + jitter()
    free_a, free_b = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
    first, second = (near, far) if relation in ("above", "left of") else (far, near)
    if relation in ("above", "below"):
        a["center"], b["center"] = (free_a, first), (free_b, second)
    else:
        a["center"], b["center"] = (first, free_a), (second, free_b)
    return {"background": background, "objects": [a, b], "relation": relation}


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        return [
            (cx + rad * math.cos(math.pi * (i / 5 - 0.5)), cy + rad * math.sin(math.pi * (i / 5 - 0.5)))
            for i, rad in ((i, r if i % 2 == 0 else 0.45 * r) for i in range(10))
        ]
    w = 0.36 * r  # cross: half the arm width
    return [
        (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx + w, cy + w),
        (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
    ]  # fmt: skip


def _draw_objects(draw: ImageDraw.ImageDraw, scene: dict, side: int, fill_of) -> None:
    """Draws the scene's objects on a `side`² canvas, each filled with `fill_of(obj)`, later ones on top."""
    for obj in scene["objects"]:
        r = SIZES[obj["size"]] * side / 2
        cx, cy = obj["center"][0] * side, obj["center"][1] * side
        fill = fill_of(obj)
        if obj["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj["shape"] == "square":
            s = 0.85 * r
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        else:
            draw.polygon(_shape_points(obj["shape"], cx, cy, r), fill=fill)


def render(scene: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [size, size, 3]: shapes drawn at 2× and box-downsampled, plus faint noise."""
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[scene["background"]])
    _draw_objects(ImageDraw.Draw(canvas), scene, big, lambda obj: COLORS[obj["color"]])
    pixels = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.int16)
    pixels = pixels + rng.integers(-6, 7, size=(size, size, 1), dtype=np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def render_mask(scene: dict, size: int) -> np.ndarray:
    """uint8 [size, size] class mask of `render`'s picture: 0 background, 1 + `SHAPES` index per object.

    Drawn on the same 2× canvas; each pixel takes the label at its centre (nearest-neighbour reduction).
    """
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    _draw_objects(ImageDraw.Draw(canvas), scene, big, lambda obj: 1 + SHAPES.index(obj["shape"]))
    return np.asarray(canvas.resize((size, size), Image.Resampling.NEAREST), np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


def make_sample(seed: int, split: str, index: int, key: str, image_size: int) -> dict[str, bytes]:
    """`{"jpg", "txt", "json"}` of one sample; eval samples carry all five captions in the json and their
    class mask (`render_mask`) as `mask.png`, a palette PNG."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    scene = random_scene(rng)
    captions = captions_for(scene)
    caption = captions[0] if split == "eval" else captions[rng.integers(len(captions))]
    pixels = render(scene, image_size, rng)
    objects = []
    for obj in scene["objects"]:
        half = SIZES[obj["size"]] * image_size / 2
        cx, cy = obj["center"][0] * image_size, obj["center"][1] * image_size
        box = [round(cx - half, 1), round(cy - half, 1), round(cx + half, 1), round(cy + half, 1)]
        objects.append({"shape": obj["shape"], "color": obj["color"], "size": obj["size"], "bbox": box})
    meta = {
        "key": key,
        "caption": caption,
        "url": None,
        "status": "success",
        "error_message": None,
        "width": image_size,
        "height": image_size,
        "original_width": image_size,
        "original_height": image_size,
        "background": scene["background"],
        "objects": objects,
    }
    if split == "eval":
        meta["captions"] = captions
    files = {"jpg": encode_jpeg(pixels), "txt": caption.encode(), "json": json.dumps(meta).encode()}
    if split == "eval":
        files["mask.png"] = encode_mask_png(render_mask(scene, image_size))
    return files


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> tuple[bytes, list[int]]:
    """A tar with fixed metadata (byte-identical for the same members) and each member's header offset."""
    out, offsets = io.BytesIO(), []
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            offsets.append(tar.offset)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue(), offsets


def sample_members(key: str, files: dict[str, bytes]) -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", data) for ext, data in files.items()]


def write_shard(path: str, split: str, shard: int, start: int, stop: int, seed: int, image_size: int) -> str:
    """Writes samples `start..stop-1` of `split` as shard number `shard`."""
    members = []
    for i in range(start, stop):
        key = f"{shard:05d}{i - start:04d}"
        members += sample_members(key, make_sample(seed, split, i, key, image_size))
    with open(path, "wb") as f:
        f.write(tar_bytes(members)[0])
    return path


def make_synthetic(
    out_dir: str,
    num_train: int,
    num_eval: int,
    seed: int = 0,
    image_size: int = 64,
    shard_size: int = 1000,
    workers: int | None = None,
) -> dict:
    """Writes the train and eval splits and `manifest.json` (shards in parallel processes); returns the manifest."""
    if not 0 < shard_size <= 10_000:
        raise ValueError(f"--shard-size {shard_size}: use 1..10000 (keys hold 4 digits for the index in a shard)")
    tasks = []
    counts = {"train": num_train, "eval": num_eval}
    for split, count in counts.items():
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        for shard in range(math.ceil(count / shard_size)):
            path = os.path.join(out_dir, split, f"shard-{shard:05d}.tar")
            start, stop = shard * shard_size, min(count, (shard + 1) * shard_size)
            tasks.append((path, split, shard, start, stop, seed, image_size))
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    if workers > 1 and num_train + num_eval >= 4000:
        context = multiprocessing.get_context("spawn")  # safe when the caller has started threads (JAX)
        with futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            paths = list(pool.map(write_shard, *zip(*tasks, strict=True)))
    else:
        paths = [write_shard(*task) for task in tasks]
    manifest = {
        "format": "img2dataset webdataset (KEY.jpg, KEY.txt, KEY.json; eval also KEY.mask.png)",
        "seed": seed,
        "image_size": image_size,
        "shard_size": shard_size,
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "backgrounds": list(BACKGROUNDS),
        "captions_per_eval_image": 5,
    }
    for split, count in counts.items():
        shards = [os.path.relpath(p, out_dir) for p, task in zip(paths, tasks, strict=True) if task[1] == split]
        manifest[split] = {"samples": count, "shards": shards}
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def exists(out_dir: str) -> bool:
    """Whether `out_dir` holds a complete synthetic set (its manifest and every shard it lists)."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        manifest = json.load(f)
    shards = [s for split in SPLITS for s in manifest.get(split, {}).get("shards", [])]
    return all(os.path.isfile(os.path.join(out_dir, s)) for s in shards)


def all_captions(out_dir: str) -> list[str]:
    """Every caption of the set (train captions, all eval paraphrases), in shard order: tokenizer training text."""
    with open(os.path.join(out_dir, MANIFEST)) as f:
        manifest = json.load(f)
    return read_captions([os.path.join(out_dir, shard) for split in SPLITS for shard in manifest[split]["shards"]])
