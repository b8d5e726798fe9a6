"""`lexvla encode` throughput: images/s per device through the whole path, against the model on images already in
memory, so the data path's cost is visible.

For a model (the main job's, `configs/tiny.py:scratch` at 64 px, or the reference shapes of
`benchmarks/train_step.py`: DINOv2 ViT-S/14 at 224 px, V' = 17,149; random weights, no checkpoint needed) and a
synthetic webdataset collection (JPEG images larger than the model's input, so every one is decoded, cropped and
resized as in `lexvla encode`), one process times, interleaved over `--reps` repetitions:

- `model only`: the jitted encoder (`encode.DeviceEncoder`: images → quantised sparse impacts, read back to the
  host) on the collection's images decoded beforehand, in batches;
- `data path only`: `data.corpus.image_batches` with 0, 1 and 2 worker processes, no model;
- `encode`: the whole `encode.encode_kind` (data path, model, part files written) with 0, 1 and 2 workers.

Rates of the data path and of encode count from the first batch delivered (worker start-up, a few seconds once per
run, is left out).

The data path is not the bottleneck when `encode` runs at the `model only` rate. On this CPU the model is slow (a
few images/s at the reference shapes), so that says nothing about an accelerator: `--host` measures what one host
process sustains with the model taken out, to compare with an accelerator's model-only rate. There a stand-in
(`FixedImpacts`) returns, at no cost, impacts `[batch, V']` with `--words` active words per vector (default 1,081,
the paper's average) as the jitted encoder returns them, and the rows are

- `write only`: `encode.encode_kind` on images already decoded in memory: reading the impacts back, CSR
  conversion, JSON lines and part files (the host's cost per vector, without decoding);
- `data path only, W workers`: as above;
- `host side, W workers`: the whole `encode.encode_kind` with the stand-in: decoding + writing.

    JAX_PLATFORMS=cpu python benchmarks/encode.py [--tiny] [--images 512] [--batch 32] [--reps 3]
    JAX_PLATFORMS=cpu python benchmarks/encode.py --host [--images 1024] [--words 1081] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
import types

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
WORKERS = (0, 1, 2)


class NumberedWords:
    """Stands in for a tokenizer: word j is "wj"."""

    def id_to_piece(self, i: int) -> str:
        return f"w{i}"

    def word(self, i: int) -> str:
        return self.id_to_piece(i)


class ImagesOnly:
    """Stands in for the caption encoder: this benchmark encodes images only."""

    tokenizer = NumberedWords()

    def batch(self, captions):
        raise NotImplementedError("images only")


def make_encoder(config, num_words: int, batch: int):
    """A `LexicalEncoder` of the config's model with its initial (random) weights on all local devices."""
    from lexvla_jax import build, sharding
    from lexvla_jax.inference import LexicalEncoder
    from lexvla_jax.program import make_program

    mesh = sharding.mesh_from_config(config.mesh)
    rules = tuple(tuple(r) for r in config.sharding.rules)
    with sharding.use_mesh_rules(mesh, rules):
        model = build.build_model(config, mesh, np.arange(num_words))
        program, params, frozen, rest = make_program(config, mesh, model)
    config.eval.batch_size = batch
    patch_size = model.config.vision.patch_size
    kept = np.arange(num_words)
    return LexicalEncoder.for_program(config, program, params, frozen, rest, ImagesOnly(), kept, patch_size)


class FixedImpacts:
    """Stands in for the model (`--host`): a fixed int32 table `[batch, V']` with `words` active words per row (impacts
    5–60, as `round(1000 · w)` of LexVLA weights), returned as a jax array like the jitted encoder's output."""

    def __init__(self, num_words: int, words: int, batch: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        table = np.zeros((batch, num_words), np.int32)
        for row in table:
            active = min(words, num_words)
            row[rng.choice(num_words, active, replace=False)] = rng.integers(5, 61, active)
        self.table, self.local_batch = table, batch
        self.encoder = types.SimpleNamespace(words=[f"w{j}" for j in range(num_words)])

    def dispatch(self, kind: str, batch: dict | None) -> jax.Array:
        return jax.device_put(self.table)


def make_collection(directory: str, count: int, pixels: int) -> list[str]:
    from lexvla_jax.miniature import synthetic

    synthetic.make_synthetic(directory, num_train=count, num_eval=1, seed=0, image_size=pixels, shard_size=count // 4)
    return sorted(str(p) for p in pathlib.Path(directory, "train").glob("*.tar"))


def data_config(config, workers: int):
    data = config.data.copy_and_resolve_references()
    with data.unlocked():
        data.num_workers = workers
    return data


class AfterFirstBatch:
    """A batch source that notes when its first batch came (worker start-up excluded from the rates)."""

    def __init__(self, source):
        self.source, self.first_at, self.first_rows = source, None, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.source)
        if self.first_at is None:
            self.first_at, self.first_rows = time.perf_counter(), len(batch["key"])
        return batch

    def __getattr__(self, name):
        return getattr(self.source, name)

    def rate(self, rows: int, first_done: bool = True) -> float:
        """Rows per second after the first batch came; `first_done=False`: its rows were still to be processed."""
        return (rows - (self.first_rows if first_done else 0)) / (time.perf_counter() - self.first_at)


def time_data_path(config, shards, batch: int, workers: int) -> float:
    from lexvla_jax.data import corpus

    source = AfterFirstBatch(corpus.image_batches(data_config(config, workers), shards, batch, 0, 1))
    rate = source.rate(sum(len(b["key"]) for b in source))
    source.close()
    return rate


def time_model(device, images: np.ndarray) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), device.local_batch):
        rows = images[i : i + device.local_batch]
        device("images", {"key": [""] * len(rows), "image": rows})
    return len(images) / (time.perf_counter() - start)


def time_encode(config, device, shards, workers: int, out: str, images: np.ndarray | None = None) -> float:
    """encode_kind's images/s over the shards with `workers` (or over `images` already decoded, when given)."""
    from lexvla_jax import encode
    from lexvla_jax.data import corpus

    shutil.rmtree(out, ignore_errors=True)
    if images is None:
        batches = corpus.image_batches(data_config(config, workers), shards, device.local_batch, 0, 1)
    else:
        keys = [f"{i:08d}" for i in range(len(images))]
        batches = corpus.ArrayBatches(keys, ["a red circle above a blue square"] * len(keys), {"image": images},
                                      device.local_batch, 0, 1)  # fmt: skip
    source = AfterFirstBatch(batches)
    totals = encode.encode_kind(out, "images", source, device, part_size=10**6, expected=None, compress=False,
                                log_seconds=1e9)  # fmt: skip
    return source.rate(totals["vectors"], first_done=False)


def active_words(out: str) -> float:
    """Mean stored words per vector in the part files of `out/images`."""
    import json

    lengths = [len(json.loads(line)["vector"]) for p in pathlib.Path(out, "images").glob("part-*") for line in open(p)]
    return sum(lengths) / len(lengths)


def load_info() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def print_table(rows: dict[str, list[float]], unit: str, reference: str | None) -> None:
    extra = f" vs {reference} |" if reference else " ms per image |"
    print(f"\n| path | {unit} (median) | min–max |{extra}\n|---|---:|---:|---:|")
    base = statistics.median(rows[reference]) if reference else None
    for name, values in rows.items():
        median = statistics.median(values)
        last = f"{median / base:.2f}" if base else f"{1000 / median:.2f}"
        print(f"| {name} | {median:,.1f} | {min(values):,.0f}–{max(values):,.0f} | {last} |")


def _config(args):
    """(config, V') of the tiny model (`--tiny`) or of the reference shapes at `--batch`."""
    import train_step

    if args.tiny:
        config, num_words, _ = train_step.tiny_config(args)
    else:
        shapes = argparse.ArgumentParser()
        train_step.add_shape_args(shapes)
        config, num_words, _ = train_step.reference_config(shapes.parse_args(["--batch", str(args.batch)]))
    return config, num_words


def host_main(args) -> None:
    """`--host`: images/s one host process sustains around a model that costs nothing (module docstring)."""

    from lexvla_jax.data import corpus

    config, num_words = _config(args)
    device = FixedImpacts(num_words, args.words, args.batch)
    size = config.data.image_size
    pixels = args.pixels or size * 5 // 4
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_collection(os.path.join(tmp, "collection"), args.images, pixels)
        images = np.concatenate([b["image"] for b in corpus.image_batches(data_config(config, 0), shards, 64, 0, 1)])
        out = os.path.join(tmp, "out")
        print(
            f"host side of encode: {size} px from {pixels} px JPEGs, V'={num_words}, {args.words} words per vector, "
            f"batch {args.batch}, {len(images)} images; model replaced by fixed impacts; {os.cpu_count()} CPUs, "
            f"load {load_info()}",
            flush=True,
        )
        rows: dict[str, list[float]] = {}
        for rep in range(args.reps):
            rows.setdefault("write only (images in memory)", []).append(
                time_encode(config, device, shards, 0, out, images)
            )
            for w in WORKERS:
                rows.setdefault(f"data path only, {w} workers", []).append(
                    time_data_path(config, shards, args.batch, w)
                )
                rows.setdefault(f"host side, {w} workers", []).append(time_encode(config, device, shards, w, out))
            print(f"rep {rep} done, {active_words(out):.0f} words per vector, load {load_info()}", flush=True)
    print_table(rows, "images/s per process", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the main job's model instead of the reference shapes")
    parser.add_argument("--images", type=int, default=256, help="images in the synthetic collection")
    parser.add_argument("--pixels", type=int, help="stored image side (default: 1.25 × the model's input)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--host", action="store_true", help="the host side only: the model replaced by fixed impacts")
    parser.add_argument("--words", type=int, default=1081, help="--host: active words per vector")
    args = parser.parse_args()
    if args.host:
        host_main(args)
        return

    import train_step

    from lexvla_jax.data import corpus
    from lexvla_jax.encode import DeviceEncoder

    config, num_words = _config(args)
    config.mesh.shape = (-1, 1, 1)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.tiny:
            train_step.write_hf_towers(config, tmp)
        encoder = make_encoder(config, num_words, args.batch)
        device = DeviceEncoder(encoder, threshold=None, top_k=None, scale=1000, batch_size=args.batch)
        size = config.data.image_size
        shards = make_collection(os.path.join(tmp, "collection"), args.images, args.pixels or size * 5 // 4)
        images = np.concatenate([b["image"] for b in corpus.image_batches(data_config(config, 0), shards, 64, 0, 1)])
        time_model(device, images[: device.local_batch])  # compile
        devices = jax.device_count()
        print(
            f"{'main job (configs/tiny.py)' if args.tiny else 'reference (ViT-S/14)'}: {size} px from "
            f"{args.pixels or size * 5 // 4} px JPEGs, V'={num_words}, batch {device.global_batch}, {len(images)} "
            f"images; {devices} {jax.devices()[0].platform} device(s), {os.cpu_count()} CPUs, "
            f"load {'/'.join(f'{x:.1f}' for x in os.getloadavg())}"
        )
        rows: dict[str, list[float]] = {}
        for rep in range(args.reps):
            rows.setdefault("model only (images in memory)", []).append(time_model(device, images))
            for w in WORKERS:
                data_rate = time_data_path(config, shards, args.batch, w)
                rows.setdefault(f"data path only, {w} workers", []).append(data_rate)
                out = os.path.join(tmp, "out")
                rows.setdefault(f"encode, {w} workers", []).append(time_encode(config, device, shards, w, out))
            words = active_words(out)
            print(f"rep {rep} done, {words:.0f} words per vector, load {os.getloadavg()[0]:.1f}", flush=True)
    model = statistics.median(rows["model only (images in memory)"])
    print("\n| path | images/s per device (median) | vs model only |\n|---|---:|---:|")
    for name, values in rows.items():
        rate = statistics.median(values) / devices
        print(f"| {name} | {rate:,.1f} | {statistics.median(values) / model:.2f} |")


if __name__ == "__main__":
    main()
