"""Image-classification eval sets for zero-shot classification: images with one class index each, read in batches.

Sources (a `format` and its fields, as `config.evals.<name>` declares them):
- `clip_benchmark` (`root`, `split`): CLIP_benchmark's webdataset layout (`clip_benchmark.py`): `KEY.cls` is the
  class index into `ROOT/classnames.txt`; the set's own templates come with it.
- `webdataset` (`shards`, `classes`): tars of `KEY.jpg|png|webp` with `KEY.cls` (class index, 0-based), or, for
  sets with class masks (the embedded job's synthetic eval set), the one class of `KEY.mask.png` (labels 1..C name
  `classes[label - 1]`): images whose mask holds several classes or none are left out (`num_multi_class`).

The set is never held whole (ImageNet's 50,000 validation images are 7.5 GB of pixels at 224 px, besides their
encoded files): `ClassSet` reads the class names and templates at once and checks that one image is usable;
`ClassSet.batches(n)` then reads the tars lazily, decodes `n` records at a time in `data_config.num_workers` threads
(the next `n` while the caller encodes the current batch) and yields batches of `n` images (the last one smaller), in
the set's order, the same on every process. Images get the evaluation transform (`eval_set.eval_image`). Bad samples
are skipped and counted (`ReadCounts`): the data pipeline's reasons plus `missing_label` (no or unreadable `cls`)
and `label_out_of_range`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
from etils import epath

from lexvla_jax.data import clip_benchmark
from lexvla_jax.data.config import DataConfigError, resolve_shards
from lexvla_jax.data.eval_set import eval_image
from lexvla_jax.data.masks import IGNORE, open_mask
from lexvla_jax.data.records import SKIP_REASONS, BadSample
from lexvla_jax.data.tar_reader import iter_samples

CLASS_FORMATS = ("clip_benchmark", "webdataset")
LABEL_REASONS = (clip_benchmark.MISSING_LABEL, clip_benchmark.LABEL_OUT_OF_RANGE)
SKIPPED_REASONS = (*SKIP_REASONS, *LABEL_REASONS)
MULTI_CLASS = -2  # a mask with several classes (or none): not a one-class image


def _mask_label(data: bytes, key: str) -> int:
    """The 0-based class of a one-class mask, or `MULTI_CLASS`."""
    labels = set(np.unique(np.asarray(open_mask(data, key)))) - {0, IGNORE}
    return int(labels.pop()) - 1 if len(labels) == 1 else MULTI_CLASS


def webdataset_records(paths: list[str]) -> Iterator[dict]:
    """Records as `clip_benchmark.sample_record`, the label from `cls` or else from a one-class `mask.png`; lazily."""
    for path in paths:
        with epath.Path(path).open("rb") as f:
            for sample in iter_samples(f):
                record = clip_benchmark.sample_record(sample, path, "classification")
                if record["error"] == clip_benchmark.MISSING_LABEL and "mask.png" in sample.files:
                    record["label"], record["error"] = _mask_label(sample.files["mask.png"], record["key"]), None
                yield record


class _DecodeLabelled:
    """Record → `{"key", "image", "label"}` or `{"skip": reason}` (a pipeline reason or a label reason)."""

    def __init__(self, data_config, num_classes: int):
        self.data_config, self.num_classes = data_config, num_classes

    def __call__(self, record: dict) -> dict:
        try:
            if record["error"] is not None:
                raise BadSample(record["error"])
            if record["label"] == MULTI_CLASS:
                return {"skip": "multi_class"}
            if not 0 <= record["label"] < self.num_classes:
                raise BadSample(clip_benchmark.LABEL_OUT_OF_RANGE)
            return {"key": record["key"], "image": eval_image(record, self.data_config), "label": record["label"]}
        except BadSample as e:
            return {"skip": e.reason}
        except OSError as e:
            return {"error": f"{record['key']}: {e}"}


@dataclasses.dataclass
class ReadCounts:
    """What one pass of `ClassSet.batches` read: usable images, skipped samples by reason, images of several
    classes (or none) in a mask set."""

    images: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SKIPPED_REASONS, 0))
    multi_class: int = 0


def decoded_chunks(records: Iterable[dict], decode: Callable[[dict], dict], threads: int, size: int) -> Iterator[list]:
    """`decode` of `records`, `size` records at a time in `threads` threads, in order: while the caller holds one
    chunk, the next is decoding, so at most two chunks of records and images are in memory."""
    records = iter(records)
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        pending = None
        while chunk := list(itertools.islice(records, size)):
            futures = [pool.submit(decode, record) for record in chunk]
            if pending is not None:
                yield [f.result() for f in pending]
            pending = futures
        if pending is not None:
            yield [f.result() for f in pending]


class ClassSet:
    """A classification set: `classes` (names in class-index order), `templates` (the set's own, `[]` when it has
    none), and its images read in batches (`batches`). Construction checks the layout and reads until the first
    usable image, so a wrong path or a set with no usable image fails at once, in one line."""

    def __init__(self, source: Mapping, data_config, where: str):
        self.data_config, self.where, self.max_images = data_config, where, source.get("max_images")
        kind = source["format"]
        if kind == "clip_benchmark":
            root, split = source["root"], source["split"]
            clip_benchmark.iter_records(root, split, where, "classification")  # checks the layout now
            self._records = lambda: clip_benchmark.iter_records(root, split, where, "classification")
            self.classes, self.templates = clip_benchmark.classnames(root, where), clip_benchmark.templates(root)
        elif kind == "webdataset":
            classes = source["classes"]
            if isinstance(classes, str) or not classes:
                raise DataConfigError(
                    f"{where}.classes={classes!r}: a webdataset classification set needs its class names in "
                    "class-index order, e.g. classes=('circle', 'square')"
                )
            paths = resolve_shards(source["shards"], f"{where}.shards", ".tar")
            self._records = lambda: webdataset_records(paths)
            self.classes, self.templates = list(classes), []
        else:
            raise DataConfigError(f"{where}.format={kind!r}: use one of {', '.join(CLASS_FORMATS)}")
        self._decode = _DecodeLabelled(data_config, len(self.classes))
        probe = self.batches(1)  # one usable image, or the one-line error
        try:
            next(probe)
        finally:
            probe.close()

    def records(self) -> Iterator[dict]:
        """The set's records (the first `max_images` of them), read lazily."""
        return itertools.islice(self._records(), self.max_images)

    def batches(self, batch_size: int, counts: ReadCounts | None = None) -> Iterator[dict]:
        """`{"image": uint8 [n,S,S,3], "label": int32 [n], "keys": [n]}` with `n = batch_size` (the last batch: the
        rest), over the usable images in order; `counts` (filled as the batches are read) counts them and the skipped
        samples. A set with no usable image is a one-line `DataConfigError` naming the skip reasons."""
        counts = counts if counts is not None else ReadCounts()
        held: list[dict] = []
        threads = self.data_config.num_workers
        for chunk in decoded_chunks(self.records(), self._decode, threads, batch_size):
            for element in chunk:
                if "error" in element:
                    raise DataConfigError(f"{self.where}: {element['error']}")
                if element.get("skip") == "multi_class":
                    counts.multi_class += 1
                elif "skip" in element:
                    counts.skipped[element["skip"]] += 1
                else:
                    held.append(element)
            while len(held) >= batch_size:
                yield self._batch(held[:batch_size], counts)
                del held[:batch_size]
        if held:
            yield self._batch(held, counts)
        if not counts.images:
            reasons = {reason: n for reason, n in counts.skipped.items() if n}
            raise DataConfigError(
                f"{self.where}: no usable images (skipped: {reasons}; images of several classes or none: "
                f"{counts.multi_class})"
            )

    @staticmethod
    def _batch(elements: list[dict], counts: ReadCounts) -> dict:
        counts.images += len(elements)
        return {
            "image": np.stack([e["image"] for e in elements]),
            "label": np.asarray([e["label"] for e in elements], np.int32),
            "keys": [e["key"] for e in elements],
        }
