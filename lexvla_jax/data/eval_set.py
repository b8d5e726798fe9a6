"""Image–text eval sets, read whole: every image with all its captions (one-to-many ground truth).

Sources (a `format` and its fields, as `config.evals.<name>` declares them):
- `webdataset` (`shards`): tars as written by `make-synthetic` or img2dataset; a sample's captions are its
  json's `captions` list when present, else its `txt`.
- `karpathy` (`json`, `image_root`, `split`): `dataset_coco.json` / `dataset_flickr30k.json` (images with
  `sentences`, `split`, `filename` and for COCO `filepath`) and the folder the paths are relative to;
  `split="test"` is COCO's 5k and Flickr30k's 1k test set.
- `tfds` (`tfds_name`, `tfds_data_dir`, `split`, `image_key`, `caption_key`): a TFDS dataset prepared with
  `file_format="array_record"`, read through `tfds.data_source` (no TensorFlow), e.g. `coco_captions`
  (whose `test` split is Karpathy's) with `caption_key="captions/text"`.
- `clip_benchmark` (`root`, `split`): CLIP_benchmark's webdataset layout as downloaded, e.g. `wds_mscoco_captions`
  or `wds_flickr30k` (`clip_benchmark.py`; captions are the lines of `KEY.txt`).

Every caption of an image is kept unless `captions_per_image` caps it (COCO's Karpathy 5k test has 25,010).

Images get the evaluation transform (`eval_image`: the shorter side resized to `image_size / eval_crop_pct`,
bicubic, centre crop, no reduced-scale JPEG decoding); bad ones are skipped and counted like in training. The
order is deterministic (shard order, then tar order; json order; dataset index), the same on every process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence

import grain
import numpy as np
from etils import epath
from PIL import Image

from lexvla_jax.configlib import first_line
from lexvla_jax.data import clip_benchmark
from lexvla_jax.data.config import DataConfigError, resolve_shards
from lexvla_jax.data.records import (
    CAPTION_EXTENSION,
    EMPTY_CAPTION,
    MISSING_CAPTION,
    REASON_INDEX,
    SKIP_REASONS,
    BadSample,
    skip_counts_dict,
)
from lexvla_jax.data.tar_reader import iter_samples
from lexvla_jax.data.transforms import (
    EVAL_CROP_PCT,
    Box,
    crop_resize,
    decode_caption,
    eval_box,
    image_member,
    open_image,
)

SOURCE_FORMATS = ("webdataset", "karpathy", "tfds", "clip_benchmark")


def sample_captions(files: Mapping[str, bytes]) -> list[bytes]:
    """A webdataset sample's captions: the `captions` list of its `.json` (several paraphrases), else its `.txt`."""
    if "json" in files:
        try:
            listed = json.loads(files["json"]).get("captions")
        except (ValueError, AttributeError):
            listed = None
        if isinstance(listed, list):
            return [str(c).encode() for c in listed]
    return [files[CAPTION_EXTENSION]] if CAPTION_EXTENSION in files else []


def read_captions(paths: Sequence[str]) -> list[str]:
    """Every readable caption of the webdataset tars `paths` (all paraphrases), in order; bad ones are skipped."""
    captions = []
    for path in paths:
        with epath.Path(path).open("rb") as f:
            for sample in iter_samples(f):
                for caption in sample_captions(sample.files):
                    try:
                        captions.append(decode_caption(caption))
                    except BadSample:
                        continue
    return captions


def webdataset_eval_records(paths: list[str]) -> list[dict]:
    """`{"key", "image": bytes | None, "captions": [bytes], "error"}` per sample, in order."""
    records = []
    for path in paths:
        with epath.Path(path).open("rb") as f:
            for sample in iter_samples(f):
                files, captions = sample.files, sample_captions(sample.files)
                try:
                    image = image_member(files) if sample.error is None else None
                except BadSample as e:
                    records.append({"key": sample.key, "image": None, "captions": captions, "error": e.reason})
                    continue
                key = sample.key if sample.key is not None else f"{path}@{sample.offset}"
                records.append({"key": key, "image": image, "captions": captions, "error": sample.error})
    return records


def check_exists(path: str, field: str, what: str) -> None:
    """One line naming `field` when `path` is unset or missing."""
    if not path:
        raise DataConfigError(f"{field} is not set; point it at {what}")
    if not epath.Path(path).exists():
        raise DataConfigError(f"{field}={path!r} does not exist; point it at {what}")


def check_image_root(first_image: str, image_root: str, where: str, layout: str) -> None:
    """One line when a json's first image is not under `image_root` (e.g. the folder one level too deep)."""
    if not epath.Path(first_image).exists():
        raise DataConfigError(
            f"{where}.image_root={image_root!r} does not hold the json's images ({first_image} does not "
            f"exist); point it at the folder the json's {layout} paths start from"
        )


def karpathy_eval_records(json_path: str, image_root: str, split: str, where: str) -> list[dict]:
    """Records of the Karpathy-split json's `split` images; image bytes are read later, in parallel."""
    check_exists(json_path, f"{where}.json", "dataset_coco.json or dataset_flickr30k.json")
    check_exists(image_root, f"{where}.image_root", "the folder holding the json's images")
    with epath.Path(json_path).open() as f:
        entries = json.load(f)["images"]
    records = []
    for entry in entries:
        if entry.get("split") != split:
            continue
        path = os.path.join(image_root, entry.get("filepath", ""), entry["filename"])
        captions = [s["raw"].encode() for s in entry["sentences"]]
        records.append({"key": entry["filename"], "path": path, "captions": captions, "error": None})
    if not records:
        raise DataConfigError(f"{json_path} has no images with split={split!r}; check {where}.split")
    layout = "filepath/filename" if "filepath" in entries[0] else "filename"
    check_image_root(records[0]["path"], image_root, where, layout)
    return records


def _field(example: Mapping, key: str):
    """`example["a"]["b"]` for `key="a/b"`, or the flat `example["a/b"]` (TFDS's names contain slashes)."""
    if key in example:
        return example[key]
    value = example
    for part in key.split("/"):
        value = value[part]
    return value


class _TfdsRecord:
    """A TFDS example → `{"key", "pixels", "captions", "error"}` (the image already decoded by TFDS)."""

    def __init__(self, split: str, image_key: str, caption_key: str):
        self.split, self.image_key, self.caption_key = split, image_key, caption_key

    def __call__(self, index: int, example: Mapping) -> dict:
        captions = _field(example, self.caption_key)
        captions = [captions] if isinstance(captions, (bytes, str)) else list(captions)
        captions = [c.encode() if isinstance(c, str) else bytes(c) for c in captions]
        key = f"{self.split}[{index}]"
        return {"key": key, "pixels": np.asarray(_field(example, self.image_key)), "captions": captions, "error": None}


def _has_field(example: Mapping, key: str) -> bool:
    try:
        _field(example, key)
    except (KeyError, TypeError):
        return False
    return True


def tfds_eval_records(name: str, split: str, data_dir: str, image_key: str, caption_key: str, where: str):
    """A `grain.MapDataset` of records read lazily from a TFDS array_record dataset."""
    import tensorflow_datasets as tfds

    if not name:
        raise DataConfigError(f"{where}.tfds_name is not set; name a TFDS dataset such as 'coco_captions/2014'")
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises several types (not found, wrong file format); all mean the same here
        raise DataConfigError(
            f"{where}: TFDS {name!r} split {split!r} cannot be read from data_dir={data_dir!r} ({first_line(e)}); "
            "prepare it there with file_format='array_record'"
        ) from None
    if len(source):
        example = source[0]
        for field, key in (("image_key", image_key), ("caption_key", caption_key)):
            if not _has_field(example, key):
                raise DataConfigError(
                    f"{where}.{field}={key!r} is not a feature of {name!r}; it has {', '.join(sorted(example))}"
                )
    return grain.MapDataset.source(source).map_with_index(_TfdsRecord(split, image_key, caption_key))


def _captions(raw: list[bytes], limit: int) -> list[str]:
    """Valid captions (the first `limit`; 0: all); raises `BadSample` when none is usable."""
    if not raw:
        raise BadSample(MISSING_CAPTION)
    texts, first_error = [], None
    for data in raw:
        try:
            texts.append(decode_caption(data))
        except BadSample as e:
            first_error = first_error or e
    if not texts:
        raise first_error or BadSample(EMPTY_CAPTION)
    return texts[:limit] if limit else texts


def eval_transform(data_config) -> dict:
    """The evaluation transform's settings (`transforms.eval_box`): `crop_pct` and `resample`."""
    return {
        "crop_pct": data_config.get("eval_crop_pct", EVAL_CROP_PCT),
        "resample": data_config.get("eval_resample", "bicubic"),
    }


def eval_image(record: Mapping, data_config, box: Box | None = None) -> np.ndarray:
    """The record's image (`image` bytes, a file at `path`, or decoded `pixels`) as evaluation sees it: the
    evaluation transform (`eval_transform`), or the source `box` (e.g. the whole image) resized to `image_size`."""
    size, transform = data_config.image_size, eval_transform(data_config)
    if "pixels" in record:
        pixels = np.asarray(record["pixels"], np.uint8)
        image = Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels)
    else:
        data = record.get("image")
        if data is None:
            with epath.Path(record["path"]).open("rb") as f:
                data = f.read()
        image = open_image(data, max_pixels=data_config.max_image_pixels, min_size=data_config.min_image_size)
    box = box or eval_box(*image.size, size, transform["crop_pct"])
    return crop_resize(image, box, size, transform["resample"])


class _DecodeEvalRecord:
    """Record → `{"key", "image", "captions"}`, `{"skip": reason index}` (checks run cheapest first), or
    `{"error": line}` when an image file cannot be read (a missing file is an error, not a skipped sample)."""

    def __init__(self, data_config, captions_per_image: int):
        self.data_config, self.captions_per_image = data_config, captions_per_image

    def __call__(self, record: dict) -> dict:
        try:
            if record["error"] is not None:
                raise BadSample(record["error"])
            captions = _captions(record["captions"], self.captions_per_image)
            return {"key": record["key"], "image": eval_image(record, self.data_config), "captions": captions}
        except BadSample as e:
            return {"skip": REASON_INDEX[e.reason]}
        except OSError as e:
            return {"error": f"{record['key']}: {e}"}


def decode_in_order(records, decode, data_config, max_images: int | None, where: str) -> Iterator[dict]:
    """`decode` of each of the first `max_images` records (a list or a `grain.MapDataset`), run in parallel threads
    (`data_config.num_workers`), in order; an element `{"error": line}` is a one-line error naming `where`."""
    dataset = records if isinstance(records, grain.MapDataset) else grain.MapDataset.source(list(records))
    if max_images is not None:
        dataset = dataset[:max_images]
    read = grain.ReadOptions(num_threads=max(1, data_config.num_workers), prefetch_buffer_size=64)
    for element in dataset.map(decode).to_iter_dataset(read):
        if "error" in element:
            raise DataConfigError(f"{where}: {element['error']}")
        yield element


def read_image_text_set(
    records: Sequence[dict] | grain.MapDataset,
    data_config,
    captions_per_image: int,
    max_images: int | None = None,
    where: str = "the eval set",
) -> dict:
    """Decodes `records` in parallel threads, in order; an unreadable image file is a one-line error naming `where`.

    Returns `image` uint8 [N,S,S,3], `captions` (all T captions), `image_of_text` int32 [T] (the image
    each caption belongs to), `keys` (N) and `skipped` ({reason: count}).
    """
    decoded = decode_in_order(
        records, _DecodeEvalRecord(data_config, captions_per_image), data_config, max_images, where
    )
    skipped = np.zeros(len(SKIP_REASONS), np.int64)
    images, keys, texts, image_of_text = [], [], [], []
    for element in decoded:
        if "skip" in element:
            skipped[element["skip"]] += 1
            continue
        texts += element["captions"]
        image_of_text += [len(images)] * len(element["captions"])
        images.append(element["image"])
        keys.append(element["key"])
    if not images:
        raise DataConfigError(f"the eval set has no usable images (skipped: {skip_counts_dict(skipped)})")
    return {
        "image": np.stack(images),
        "captions": texts,
        "image_of_text": np.asarray(image_of_text, np.int32),
        "keys": keys,
        "skipped": skip_counts_dict(skipped),
    }


def image_text_records(source: Mapping, where: str):
    """The records of a source spec (`format` and its fields, see the module docstring)."""
    kind = source["format"]
    if kind == "webdataset":
        return webdataset_eval_records(resolve_shards(source["shards"], f"{where}.shards", ".tar"))
    if kind == "karpathy":
        return karpathy_eval_records(source["json"], source["image_root"], source["split"], where)
    if kind == "tfds":
        keys = ("tfds_name", "split", "tfds_data_dir", "image_key", "caption_key")
        return tfds_eval_records(*(source[k] for k in keys), where)
    if kind == "clip_benchmark":
        return clip_benchmark.records(source["root"], source["split"], where, "retrieval")
    raise DataConfigError(f"{where}.format={kind!r}: use one of {', '.join(SOURCE_FORMATS)}")
