"""CLIP_benchmark's webdataset layout, read as downloaded (`wds_mscoco_captions`, `wds_flickr30k`, `wds_imagenet1k`,
`wds_vtab-*`, ...):

```
ROOT/SPLIT/nshards.txt                        the number of shards N
ROOT/SPLIT/0.tar … ROOT/SPLIT/{N-1}.tar       samples KEY.webp|png|jpg with KEY.cls (class index) or KEY.txt
                                              (captions, one per line)
ROOT/classnames.txt                           class names, one per line, in class-index order (classification)
ROOT/zeroshot_classification_templates.txt    prompt templates with {c}, one per line (classification)
ROOT/dataset_type.txt                         "retrieval" for retrieval sets; absent for classification
```
`dataset_type.txt` is read as CLIP_benchmark reads it (stripped, lower-cased: "Retrieval" is a retrieval set);
"multilabel" sets (`KEY.npy` label vectors) are not supported, a one-line error. A missing `nshards.txt` or shard is
a one-line error; a sample without its image, its `cls` or `txt`, or with an unreadable one, is a record carrying
the skip reason (counted by the readers, never fatal). Records are read lazily, shard by shard (`iter_records`).
"""

from __future__ import annotations

from collections.abc import Iterator

from etils import epath

from lexvla_jax.data.config import DataConfigError
from lexvla_jax.data.records import MISSING_CAPTION, MISSING_IMAGE, BadSample
from lexvla_jax.data.tar_reader import TarSample, iter_samples
from lexvla_jax.data.transforms import image_member

CLASS_EXTENSION = "cls"
MISSING_LABEL = "missing_label"  # classification: no KEY.cls, or not an integer
LABEL_OUT_OF_RANGE = "label_out_of_range"  # classification: a class index beyond classnames.txt


def _lines(path: epath.Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def shard_paths(root: str, split: str, where: str) -> list[str]:
    """`ROOT/SPLIT/0.tar … N-1.tar` as `nshards.txt` lists them; a missing file is a one-line error."""
    if not root:
        raise DataConfigError(f"{where}.root is not set; point it at a CLIP_benchmark folder, e.g. wds_imagenet1k")
    count_file = epath.Path(root) / split / "nshards.txt"
    if not count_file.exists():
        raise DataConfigError(
            f"{where}: {count_file} does not exist; point {where}.root at a CLIP_benchmark webdataset folder "
            f"and {where}.split at one of its splits (a folder holding nshards.txt and 0.tar, 1.tar, ...)"
        )
    try:
        count = int(count_file.read_text().strip())
    except ValueError:
        raise DataConfigError(f"{where}: {count_file} must hold the number of shards") from None
    paths = [epath.Path(root) / split / f"{i}.tar" for i in range(count)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise DataConfigError(f"{where}: {count_file} lists {count} shards but {', '.join(missing[:3])} is missing")
    return [str(p) for p in paths]


DATASET_TYPES = ("classification", "retrieval")


def dataset_type(root: str, where: str) -> str:
    """ "retrieval" or "classification" (`dataset_type.txt` absent or empty), read as CLIP_benchmark reads it:
    stripped and lower-cased. "multilabel" and unknown types are one-line errors."""
    path = epath.Path(root) / "dataset_type.txt"
    found = path.read_text().strip().lower() if path.exists() else ""
    if found in ("", "classification"):
        return "classification"
    if found == "retrieval":
        return found
    if found == "multilabel":
        raise DataConfigError(
            f"{where}: {path} says 'multilabel': multilabel sets (KEY.npy labels) are not supported; "
            "classification sets (KEY.cls, type='classification') and retrieval sets (KEY.txt, type='retrieval') are"
        )
    raise DataConfigError(
        f"{where}: {path} says {found!r}; a CLIP_benchmark set is 'retrieval' or classification (no dataset_type.txt)"
    )


def classnames(root: str, where: str) -> list[str]:
    path = epath.Path(root) / "classnames.txt"
    if not path.exists():
        raise DataConfigError(f"{where}: {path} does not exist; a classification set needs its class names")
    return _lines(path)


def templates(root: str) -> list[str]:
    """The set's zero-shot templates (each with `{c}`), or `[]` when the file is absent."""
    path = epath.Path(root) / "zeroshot_classification_templates.txt"
    return _lines(path) if path.exists() else []


def check_type(root: str, expected: str, where: str) -> None:
    found = dataset_type(root, where)
    if found != expected:
        raise DataConfigError(
            f"{where}: {root} is a {found} set (dataset_type.txt), not a {expected} one; use an evaluator of type "
            f"{found!r}"
        )


def iter_records(root: str, split: str, where: str, kind: str) -> Iterator[dict]:
    """`sample_record`s of every sample, in shard order then tar order (`kind`: "retrieval" or "classification"),
    read lazily: only the current sample's members are in memory. The layout (type, `nshards.txt`, every shard) is
    checked now, before the first record is read."""
    check_type(root, kind, where)
    return _read_shards(shard_paths(root, split, where), kind)


def _read_shards(paths: list[str], kind: str) -> Iterator[dict]:
    for path in paths:
        with epath.Path(path).open("rb") as f:
            for sample in iter_samples(f):
                yield sample_record(sample, path, kind)


def records(root: str, split: str, where: str, kind: str) -> list[dict]:
    """Every record of `iter_records`, in a list (retrieval holds its set in memory)."""
    return list(iter_records(root, split, where, kind))


def sample_record(sample: TarSample, path: str, kind: str) -> dict:
    """`{"key", "image", "error"}` plus `captions` (`kind="retrieval"`: the lines of `txt`) or `label`
    (`"classification"`: `cls` as an int, None when absent or unreadable); `error` is a skip reason or None."""
    key = sample.key if sample.key is not None else f"{path}@{sample.offset}"
    record = {"key": key, "image": None, "error": sample.error, "captions": [], "label": None}
    if sample.error is not None:
        return record
    try:
        record["image"] = image_member(sample.files)
    except BadSample:
        record["error"] = MISSING_IMAGE
    if kind == "retrieval":
        text = sample.files.get("txt")
        record["captions"] = text.split(b"\n") if text is not None else []
        missing = MISSING_CAPTION if text is None else None
    else:
        record["label"] = parse_label(sample.files.get(CLASS_EXTENSION))
        missing = MISSING_LABEL if record["label"] is None else None
    record["error"] = record["error"] or missing
    return record


def parse_label(data: bytes | None) -> int | None:
    """A `cls` member's class index, or None when absent or not an integer."""
    try:
        return int(data.decode().strip()) if data is not None else None
    except (UnicodeDecodeError, ValueError):
        return None
