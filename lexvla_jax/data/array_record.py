"""ArrayRecord shards: `lexvla convert-data` and a globally shuffled grain `MapDataset` over them.

Conversion keeps every raw sample, damaged ones included (a truncated tar becomes an error record), one
`.array_record` file per input tar, so reading converted data skips and counts exactly what reading the
tars would. Reading: shuffle the whole dataset with `(seed, epoch)`, repeat, then give process `i` of
`n` the elements `i::n` — a true global shuffle, resumable by element index.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Sequence
from concurrent import futures

import grain
from etils import epath

from lexvla_jax.data.config import resolve_shards
from lexvla_jax.data.records import SKIP_REASONS, decode_record, encode_record, raw_sample
from lexvla_jax.data.tar_reader import iter_samples

SUFFIX = ".array_record"
STATS_FILE = "conversion_stats.json"


def convert_shard(tar_path: str, output_dir: str) -> dict:
    """Writes one tar's raw samples to `output_dir/<tar stem>.array_record`; returns record counts."""
    from array_record.python.array_record_module import ArrayRecordWriter

    name = epath.Path(tar_path).name.removesuffix(".tar") + SUFFIX
    out_path = str(epath.Path(output_dir) / name)
    counts = {"records": 0, **{reason: 0 for reason in SKIP_REASONS}}
    writer = ArrayRecordWriter(out_path + ".tmp", "group_size:1")
    with epath.Path(tar_path).open("rb") as f:
        for sample in iter_samples(f):
            key = sample.key if sample.key is not None else f"{tar_path}@{sample.offset}"
            writer.write(encode_record(raw_sample(key, sample.files, sample.error)))
            counts["records"] += 1
            if sample.error:
                counts[sample.error] += 1
    writer.close()
    epath.Path(out_path + ".tmp").rename(out_path)
    return counts


def convert(inputs: str | Sequence[str], output_dir: str, workers: int = 1) -> dict:
    """Converts tars (glob/list/dir) to ArrayRecord shards in `output_dir`; writes and returns totals."""
    tars = resolve_shards(inputs, "--input", ".tar")
    epath.Path(output_dir).mkdir(parents=True, exist_ok=True)
    totals = {"shards": len(tars), "records": 0, **{reason: 0 for reason in SKIP_REASONS}}
    spawn = multiprocessing.get_context("spawn")  # safe when the caller has started threads (JAX)
    with futures.ProcessPoolExecutor(workers, mp_context=spawn) if workers > 1 else _Inline() as pool:
        for counts in pool.map(convert_shard, tars, [output_dir] * len(tars)):
            for name, n in counts.items():
                totals[name] += n
    (epath.Path(output_dir) / STATS_FILE).write_text(json.dumps(totals, indent=2))
    return totals


class _Inline:
    """`ProcessPoolExecutor`'s `map` in the calling process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, *iterables):
        return map(fn, *iterables)


class DecodeRecord:
    """`map_with_index` function: record bytes → raw sample seeded by its position in the shuffled stream."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, index: int, record: bytes) -> dict:
        return decode_record(record, seed=[self.seed, index])


def array_record_dataset(
    paths: Sequence[str], *, seed: int, num_epochs: int | None, process_index: int, process_count: int
) -> grain.MapDataset:
    """Raw samples of this process: globally shuffled per epoch, repeated, then every n-th element."""
    source = grain.sources.ArrayRecordDataSource(list(paths))
    if len(source) == 0:
        raise ValueError(f"the ArrayRecord shards {list(paths)[:3]}... hold no records; re-run convert-data")
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
    ds = ds.map_with_index(DecodeRecord(seed))
    return ds[process_index::process_count]
