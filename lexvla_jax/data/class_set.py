"""Image-classification eval sets for zero-shot classification, read whole: images with one class index each.

Sources (a `format` and its fields, as `config.evals.<name>` declares them):
- `clip_benchmark` (`root`, `split`): CLIP_benchmark's webdataset layout (`clip_benchmark.py`): `KEY.cls` is the
  class index into `ROOT/classnames.txt`; the set's own templates come with it.
- `webdataset` (`shards`, `classes`): tars of `KEY.jpg|png|webp` with `KEY.cls` (class index, 0-based), or, for
  sets with class masks (the embedded job's synthetic eval set), the one class of `KEY.mask.png` (labels 1..C name
  `classes[label - 1]`): images whose mask holds several classes or none are left out (`num_multi_class`).

Images get the evaluation transform (`eval_set.eval_image`). Bad samples are skipped and counted: the data
pipeline's reasons plus `missing_label` (no or unreadable `cls`) and `label_out_of_range`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from etils import epath

from lexvla_jax.data import clip_benchmark
from lexvla_jax.data.config import DataConfigError, resolve_shards
from lexvla_jax.data.eval_set import decode_in_order, eval_image
from lexvla_jax.data.masks import IGNORE, open_mask
from lexvla_jax.data.records import SKIP_REASONS, BadSample
from lexvla_jax.data.tar_reader import iter_samples

CLASS_FORMATS = ("clip_benchmark", "webdataset")
LABEL_REASONS = (clip_benchmark.MISSING_LABEL, clip_benchmark.LABEL_OUT_OF_RANGE)
MULTI_CLASS = -2  # a mask with several classes (or none): not a one-class image


def _mask_label(data: bytes, key: str) -> int:
    """The 0-based class of a one-class mask, or `MULTI_CLASS`."""
    labels = set(np.unique(np.asarray(open_mask(data, key)))) - {0, IGNORE}
    return int(labels.pop()) - 1 if len(labels) == 1 else MULTI_CLASS


def webdataset_records(shards, where: str) -> list[dict]:
    """Records as `clip_benchmark.sample_record`, the label from `cls` or else from a one-class `mask.png`."""
    records = []
    for path in resolve_shards(shards, f"{where}.shards", ".tar"):
        with epath.Path(path).open("rb") as f:
            for sample in iter_samples(f):
                record = clip_benchmark.sample_record(sample, path, "classification")
                if record["error"] == clip_benchmark.MISSING_LABEL and "mask.png" in sample.files:
                    record["label"], record["error"] = _mask_label(sample.files["mask.png"], record["key"]), None
                records.append(record)
    return records


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


def load_class_set(source: Mapping, data_config, where: str) -> dict:
    """The classification set of `source` in memory.

    Returns `image` uint8 [N,S,S,3], `label` int32 [N], `classes` (names in class-index order), `templates` (the
    set's own, `[]` when it has none), `keys`, `skipped` ({reason: count}) and `num_multi_class`.
    """
    kind = source["format"]
    if kind == "clip_benchmark":
        records = clip_benchmark.records(source["root"], source["split"], where, "classification")
        classes, templates = clip_benchmark.classnames(source["root"], where), clip_benchmark.templates(source["root"])
    elif kind == "webdataset":
        classes = source["classes"]
        if isinstance(classes, str) or not classes:
            raise DataConfigError(
                f"{where}.classes={classes!r}: a webdataset classification set needs its class names in "
                "class-index order, e.g. classes=('circle', 'square')"
            )
        records, classes, templates = webdataset_records(source["shards"], where), list(classes), []
    else:
        raise DataConfigError(f"{where}.format={kind!r}: use one of {', '.join(CLASS_FORMATS)}")
    skipped = dict.fromkeys((*SKIP_REASONS, *LABEL_REASONS), 0)
    multi_class = 0
    images, labels, keys = [], [], []
    decode = _DecodeLabelled(data_config, len(classes))
    for element in decode_in_order(records, decode, data_config, source.get("max_images"), where):
        if element.get("skip") == "multi_class":
            multi_class += 1
        elif "skip" in element:
            skipped[element["skip"]] += 1
        else:
            images.append(element["image"])
            labels.append(element["label"])
            keys.append(element["key"])
    if not images:
        counts = {reason: n for reason, n in skipped.items() if n}
        raise DataConfigError(
            f"{where}: no usable images (skipped: {counts}; images of several classes or none: {multi_class})"
        )
    return {
        "image": np.stack(images),
        "label": np.asarray(labels, np.int32),
        "classes": list(classes),
        "templates": templates,
        "keys": keys,
        "skipped": skipped,
        "num_multi_class": multi_class,
    }
