"""Input pipeline throughput: decode + random-resized crop to 224 + tokenise, per core and with 0/1/2 workers.

Writes realistic 500×375 quality-90 JPEGs (smooth multi-scale colour fields with a gradient and film
grain, about photo-sized files) with captions into webdataset tars, then measures
1. per core: `SampleDecoder` on in-memory raw samples in this process, as CPU time per sample (robust to
   other load on the machine), split into image (decode + crop + resize) and text (prompt + tokenise);
2. the whole training pipeline (`pipeline.train_iterator`) with `num_workers` = 0, 1, 2: samples/s of
   wall time after the first batch (worker start-up and shuffle-buffer fill excluded), and the CPU time
   per sample spent in each worker, in all workers and in the consuming process (from /proc: meaningful
   on a shared machine, where wall-clock rates depend on everyone else's load). The cores other
   processes kept busy meanwhile (/proc/stat minus ours) say whether the machine was idle; when it was
   not, the run says so.

Tokenisation uses Llama 2's tokenizer from ../shared/data when present, else a small trained one.

    JAX_PLATFORMS=cpu python benchmarks/data_throughput.py [--samples 512] [--workers 0 1 2] [--resample bicubic]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image

SAMPLES_PER_SHARD = 128
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
    from lexvla_jax.data import records
    from lexvla_jax.miniature import synthetic

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
    from lexvla_jax.text.prompt import DEFAULT_PROMPT
    from lexvla_jax.text.tokenizer import load_tokenizer, train_tokenizer

    if LLAMA2_TOKENIZER.is_file():
        return load_tokenizer(str(LLAMA2_TOKENIZER)), "Llama 2"
    captions = [r["files"]["txt"].decode() for r in raws] + [DEFAULT_PROMPT]
    return train_tokenizer(captions, 512, os.path.join(out_dir, "tok.model")), "trained (512 pieces)"


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


def children_cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) used so far by each live child process of this one (grain workers), by pid."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) != os.getpid():  # fields[1] is the parent pid
            continue
        with open(f"/proc/{entry}/cmdline", "rb") as f:
            if b"resource_tracker" in f.read():  # multiprocessing's bookkeeping process, not a worker
                continue
        out[int(entry)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all processes on this machine have been busy (non-idle) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def pipeline_rate(config, prompt, batch_size: int, batches: int) -> dict:
    """Over the timed batches (after the first): wall samples/s; CPU ms per sample of each worker (its CPU time
    over the samples it made: workers take batches in turn), of all workers and of this (consuming) process;
    and the cores other processes on the machine kept busy meanwhile (0 on an idle machine)."""
    from lexvla_jax.data import pipeline

    start = time.perf_counter()
    iterator = pipeline.train_iterator(config, batch_size, 0, 1, prompt)
    next(iterator)
    first, main_cpu, busy = time.perf_counter(), time.process_time(), machine_busy_seconds()
    workers_cpu = children_cpu_seconds()
    for _ in range(batches):
        next(iterator)
    wall = time.perf_counter() - first
    samples = batches * batch_size
    used = {pid: cpu - workers_cpu.get(pid, 0.0) for pid, cpu in children_cpu_seconds().items()}
    main_s = time.process_time() - main_cpu
    per_worker = samples / max(config.num_workers, 1)
    out = {
        "rate": samples / wall,
        "first": first - start,
        "per_worker_ms": sorted(cpu / per_worker * 1e3 for cpu in used.values()) if config.num_workers else [],
        "worker_ms": sum(used.values()) / samples * 1e3,
        "main_ms": main_s / samples * 1e3,
        "others_cores": max(0.0, (machine_busy_seconds() - busy - main_s - sum(used.values())) / wall),
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
    shards = -(-args.samples // SAMPLES_PER_SHARD)
    if shards < max(args.workers):
        parser.error(
            f"--samples {args.samples} makes {shards} shard(s); give every worker one: --samples >= "
            f"{SAMPLES_PER_SHARD * max(args.workers)}"
        )

    from lexvla_jax.data.config import default_data_config
    from lexvla_jax.text.prompt import PromptEncoder

    with tempfile.TemporaryDirectory() as tmp:
        paths, raws = write_shards(tmp, args.samples, SAMPLES_PER_SHARD, seed=0)
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
        print(
            "| workers | wall samples/s | CPU ms/sample of each worker | all workers' CPU ms/sample | "
            "consumer CPU ms/sample | first batch s | other processes' busy cores | load |"
        )
        print("|--:|--:|--:|--:|--:|--:|--:|--:|")
        others = []
        for workers in args.workers:
            config.num_workers = workers
            r = pipeline_rate(config, prompt, args.batch_size, args.batches)
            each = ", ".join(f"{ms:.2f}" for ms in r["per_worker_ms"]) or "—"
            print(
                f"| {workers} | {r['rate']:.0f} | {each} | {r['worker_ms']:.2f} | {r['main_ms']:.2f} | "
                f"{r['first']:.1f} | {r['others_cores']:.1f} of {os.cpu_count()} | {os.getloadavg()[0]:.1f} |"
            )
            others.append(r["others_cores"])
        if max(others) > 0.1:
            print(
                f"the machine was not idle: other processes kept {min(others):.1f}–{max(others):.1f} of its "
                f"{os.cpu_count()} cores busy, so wall rates are lower bounds; CPU ms per sample is the stable number"
            )


if __name__ == "__main__":
    main()
