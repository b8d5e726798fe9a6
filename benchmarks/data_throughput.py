"""Input pipeline throughput: decode + random-resized crop to 224 + tokenise, per core and with 0/1/2 workers.

Writes realistic 500×375 quality-90 JPEGs (smooth multi-scale colour fields with a gradient and film
grain, about photo-sized files) with captions into webdataset tars, then measures
1. per core: `SampleDecoder` on in-memory raw samples in this process, as CPU time per sample (robust to
   other load on the machine), split into image (decode + crop + resize) and text (prompt + tokenise);
2. the whole training pipeline (`pipeline.train_iterator`) with `num_workers` = 0, 1, 2: samples/s of
   wall time after the first batch (worker start-up and shuffle-buffer fill excluded), and the CPU time
   per sample spent in the workers and in the consuming process (from /proc: meaningful on a shared
   machine, where wall-clock rates depend on everyone else's load).

Tokenisation uses Llama 2's tokenizer from ../shared/data when present, else a small trained one.

    JAX_PLATFORMS=cpu python benchmarks/data_throughput.py [--samples 512] [--workers 0 1 2] [--resample bicubic]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pathlib
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image

LLAMA2_TOKENIZER = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "llama2_tokenizer.model"


def natural_image(rng: np.random.Generator, width: int = 500, height: int = 375) -> np.ndarray:
    """Smooth structure at several scales, a lighting gradient and fine grain: JPEG-compresses like a photo."""
    field = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.15)):
        coarse = rng.integers(0, 256, (max(2, height * cells // width), cells, 3), dtype=np.uint8)
        field += weight * np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    field += np.linspace(-30, 30, width, dtype=np.float32)[None, :, None]
    field += rng.normal(0, 6, (height, width, 1)).astype(np.float32)
    return np.clip(field, 0, 255).astype(np.uint8)


def write_shards(out_dir: str, samples: int, per_shard: int, seed: int) -> tuple[list[str], list[dict]]:
    """Tars of `samples` JPEG + caption pairs; returns the paths and the raw samples (for the per-core run)."""
    from lexvla_jax.data import records, synthetic

    rng = np.random.default_rng(seed)
    raws, paths = [], []
    for shard in range((samples + per_shard - 1) // per_shard):
        members = []
        for i in range(shard * per_shard, min(samples, (shard + 1) * per_shard)):
            key = f"{i:09d}"
            caption = synthetic.captions_for(synthetic.random_scene(rng))[0] + ", photographed outdoors in soft light"
            files = {"jpg": synthetic.encode_jpeg(natural_image(rng), quality=90), "txt": caption.encode()}
            members += synthetic.sample_members(key, files)
            raws.append(records.raw_sample(key, files, None, [seed, i]))
        path = os.path.join(out_dir, f"bench-{shard:05d}.tar")
        with open(path, "wb") as f:
            f.write(synthetic.tar_bytes(members)[0])
        paths.append(path)
    return paths, raws


def tokenizer(raws: list[dict], out_dir: str):
    from lexvla_jax import vocab

    if LLAMA2_TOKENIZER.is_file():
        return vocab.load_tokenizer(str(LLAMA2_TOKENIZER)), "Llama 2"
    captions = [r["files"]["txt"].decode() for r in raws] + [vocab.DEFAULT_PROMPT]
    return vocab.train_tokenizer(captions, 512, os.path.join(out_dir, "tok.model")), "trained (512 pieces)"


def per_core(raws: list[dict], config, prompt) -> dict[str, float]:
    """CPU seconds per sample in this process for image, text, and both (the full SampleDecoder)."""
    from lexvla_jax.data.transforms import SampleDecoder

    image_only = SampleDecoder.from_config(config, train=True)
    full = SampleDecoder.from_config(config, train=True, prompt_encoder=prompt)
    captions = [r["files"]["txt"].decode() for r in raws]
    out = {}
    for name, fn, items in (
        ("image", image_only, raws),
        ("text", prompt, captions),
        ("both", full, raws),
    ):
        fn(items[0])
        start = time.process_time()
        for item in items:
            fn(item)
        out[name] = (time.process_time() - start) / len(items)
    return out


def children_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process's live child processes (grain workers)."""
    total = 0
    for child in multiprocessing.active_children():
        with open(f"/proc/{child.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def pipeline_rate(config, prompt, batch_size: int, batches: int) -> dict[str, float]:
    """Wall samples/s after the first batch, seconds to the first batch, and CPU ms per sample in the
    workers and in this (consuming) process, over the timed batches."""
    from lexvla_jax.data import pipeline

    start = time.perf_counter()
    iterator = pipeline.train_iterator(config, batch_size, 0, 1, prompt)
    next(iterator)
    first, workers_cpu, main_cpu = time.perf_counter(), children_cpu_seconds(), time.process_time()
    for _ in range(batches):
        next(iterator)
    samples = batches * batch_size
    out = {
        "rate": samples / (time.perf_counter() - first),
        "first": first - start,
        "worker_ms": (children_cpu_seconds() - workers_cpu) / samples * 1e3,
        "main_ms": (time.process_time() - main_cpu) / samples * 1e3,
    }
    iterator.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512, help="JPEGs written (the pipeline loops over them)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=24, help="batches timed per worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resample", choices=("bilinear", "bicubic"), default="bilinear")
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()

    from lexvla_jax.data.config import default_data_config
    from lexvla_jax.vocab import PromptEncoder

    with tempfile.TemporaryDirectory() as tmp:
        paths, raws = write_shards(tmp, args.samples, 128, seed=0)
        sizes = [len(r["files"]["jpg"]) for r in raws]
        tok, tok_name = tokenizer(raws, tmp)
        prompt = PromptEncoder(tok, max_caption_tokens=32)
        config = default_data_config()
        config.update(
            dict(train_shards=paths, image_size=args.image_size, resample=args.resample, shuffle_buffer=256, seed=0)
        )
        print(
            f"{len(raws)} JPEGs 500x375 q90, mean {np.mean(sizes) / 1024:.0f} KiB; crop scale "
            f"{tuple(config.crop_scale)} -> {args.image_size}px {config.resample}; tokenizer {tok_name}, "
            f"prompt length {prompt.max_length}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
        )
        cost = per_core(raws, config, prompt)
        print(
            f"per core (CPU time): image {cost['image'] * 1e3:.2f} ms, text {cost['text'] * 1e3:.2f} ms, "
            f"both {cost['both'] * 1e3:.2f} ms -> {1 / cost['both']:.0f} samples/s per core"
        )
        print("| workers | samples/s | per worker | worker CPU ms/sample | main CPU ms/sample | first batch s | load |")
        print("|--:|--:|--:|--:|--:|--:|--:|")
        for workers in args.workers:
            config.num_workers = workers
            r = pipeline_rate(config, prompt, args.batch_size, args.batches)
            print(
                f"| {workers} | {r['rate']:.0f} | {r['rate'] / max(workers, 1):.0f} | {r['worker_ms']:.2f} | "
                f"{r['main_ms']:.2f} | {r['first']:.1f} | {os.getloadavg()[0]:.1f} |"
            )


if __name__ == "__main__":
    main()
