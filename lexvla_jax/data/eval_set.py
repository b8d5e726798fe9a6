"""Retrieval eval sets, read whole: every image with all its captions (one-to-many ground truth).

Two formats (`config.data.eval_format`):
- `webdataset`: tars as written by `make-synthetic` or img2dataset; a sample's captions are its json's
  `captions` list when present, else its `txt`.
- `karpathy`: `dataset_coco.json` / `dataset_flickr30k.json` (images with `sentences`, `split`, `filename`
  and for COCO `filepath`) plus the image folder; the `karpathy_split` images (default `test`).

Images get the evaluation transform (centre crop); bad ones are skipped and counted like in training.
The order is deterministic (shard order, then tar order; json order), the same on every process.
"""

from __future__ import annotations

import json
import os

import grain
import numpy as np
from etils import epath

from lexvla_jax.data.config import DataConfigError, check_data_config, resolve_shards
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
from lexvla_jax.data.transforms import decode_caption, image_member, load_image


def webdataset_eval_records(paths: list[str]) -> list[dict]:
    """`{"key", "image": bytes | None, "captions": [bytes], "error"}` per sample, in order."""
    records = []
    for path in paths:
        with epath.Path(path).open("rb") as f:
            for sample in iter_samples(f):
                files, captions = sample.files, []
                if "json" in files:
                    try:
                        listed = json.loads(files["json"]).get("captions")
                    except (ValueError, AttributeError):
                        listed = None
                    if isinstance(listed, list):
                        captions = [str(c).encode() for c in listed]
                if not captions and CAPTION_EXTENSION in files:
                    captions = [files[CAPTION_EXTENSION]]
                try:
                    image = image_member(files) if sample.error is None else None
                except BadSample as e:
                    records.append({"key": sample.key, "image": None, "captions": captions, "error": e.reason})
                    continue
                key = sample.key if sample.key is not None else f"{path}@{sample.offset}"
                records.append({"key": key, "image": image, "captions": captions, "error": sample.error})
    return records


def karpathy_eval_records(json_path: str, image_root: str, split: str) -> list[dict]:
    """Records of the Karpathy-split json's `split` images; image bytes are read later, in parallel."""
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
        raise DataConfigError(f"{json_path} has no images with split={split!r}; check config.data.karpathy_split")
    return records


class _DecodeEvalImage:
    """Record → `{"image"}` (centre crop) or `{"skip": reason index}`; reads the file of a Karpathy record."""

    def __init__(self, config):
        self.size, self.min_size, self.max_pixels = config.image_size, config.min_image_size, config.max_image_pixels
        self.resample = config.resample

    def __call__(self, record: dict) -> dict:
        try:
            data = record.get("image")
            if data is None:
                with epath.Path(record["path"]).open("rb") as f:
                    data = f.read()
            image = load_image(
                data, self.size, max_pixels=self.max_pixels, min_size=self.min_size, resample=self.resample
            )
            return {"image": image}
        except BadSample as e:
            return {"skip": REASON_INDEX[e.reason]}


def _captions(raw: list[bytes], limit: int) -> list[str]:
    """Valid captions (first `limit`); raises `BadSample` when none is usable."""
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
    return texts[:limit]


def load_eval_set(config, prompt_encoder, *, max_images: int | None = None) -> dict:
    """The eval set of `config.data`, fully in memory.

    Returns `image` uint8 [N,S,S,3], `input_ids`/`attention_mask` int32 [T,L] for all T captions,
    `image_of_text` int32 [T] (the image each caption belongs to), `captions` (T strings), `keys`
    (N), and `skipped` ({reason: count}).
    """
    check_data_config(config)
    if config.eval_format == "karpathy":
        if not config.karpathy_json:
            raise DataConfigError("config.data.karpathy_json is empty; point it at dataset_coco.json or similar")
        records = karpathy_eval_records(config.karpathy_json, config.karpathy_image_root, config.karpathy_split)
    else:
        records = webdataset_eval_records(resolve_shards(config.eval_shards, "config.data.eval_shards", ".tar"))
    if max_images is not None:
        records = records[:max_images]
    skipped = np.zeros(len(SKIP_REASONS), np.int64)
    kept, captions = [], []
    for record in records:
        if record["error"] is not None:
            skipped[REASON_INDEX[record["error"]]] += 1
            continue
        try:
            captions.append(_captions(record["captions"], config.eval_captions_per_image))
            kept.append(record)
        except BadSample as e:
            skipped[REASON_INDEX[e.reason]] += 1
    read = grain.ReadOptions(num_threads=max(1, config.num_workers), prefetch_buffer_size=64)
    decoded = grain.MapDataset.source(kept).map(_DecodeEvalImage(config)).to_iter_dataset(read)
    images, keys, texts, image_of_text = [], [], [], []
    for record, element, record_captions in zip(kept, decoded, captions, strict=True):
        if "skip" in element:
            skipped[element["skip"]] += 1
            continue
        texts += record_captions
        image_of_text += [len(images)] * len(record_captions)
        images.append(element["image"])
        keys.append(record["key"])
    if not images:
        raise DataConfigError(f"the eval set has no usable images (skipped: {skip_counts_dict(skipped)})")
    rows = [prompt_encoder(text) for text in texts]
    return {
        "image": np.stack(images),
        "input_ids": np.stack([ids for ids, _ in rows]),
        "attention_mask": np.stack([mask for _, mask in rows]),
        "image_of_text": np.asarray(image_of_text, np.int32),
        "captions": texts,
        "keys": keys,
        "skipped": skip_counts_dict(skipped),
    }
