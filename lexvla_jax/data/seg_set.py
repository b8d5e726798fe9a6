"""Segmentation eval sets for PatchDis, read whole: images with per-pixel class masks.

Sources (a `format` and its fields, as `config.evals.<name>` declares them):
- `voc` (`root`, `split`): PASCAL VOC's layout under `root` (e.g. `VOCdevkit/VOC2012`):
  `ImageSets/Segmentation/<split>.txt` lists ids; `JPEGImages/<id>.jpg` and `SegmentationClass/<id>.png`
  (palette indices: 0 background, 1..20 the classes, 255 object boundaries).
- `coco` (`json`, `image_root`): a COCO instances json (`instances_val2017.json`, read with pycocotools)
  and its image folder. An image's mask is painted from its annotations: crowd regions 255, then
  instances from the largest to the smallest (small objects stay visible on top). With `classes="coco"`
  label i is the json's i-th category by id; with `classes="voc"` COCO's 20 VOC categories get VOC's
  labels and every other object 255. Images without a scored object are left out.
- `webdataset` (`shards`, `classes`): tars of `KEY.jpg` with its `KEY.mask.png` (labels 1..C are the names in
  `classes`, a list given in the entry), e.g. the embedded job's synthetic eval set.

Image and mask get the same box resized to `image_size` (the image antialiased, the mask nearest-neighbour):
with `crop="center"` the evaluation transform's centre crop (`transforms.eval_box`), with `crop="none"` the whole
image. Returns masks with labels 0 (background), 1..C (`classes[label - 1]`) and 255 (ignore).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping

import numpy as np
from etils import epath
from PIL import Image

from lexvla_jax.data.config import DataConfigError, resolve_shards
from lexvla_jax.data.eval_set import check_exists, check_image_root, decode_in_order, eval_image, eval_transform
from lexvla_jax.data.masks import IGNORE, crop_mask, open_mask
from lexvla_jax.data.records import MISSING_IMAGE, REASON_INDEX, SKIP_REASONS, BadSample, skip_counts_dict
from lexvla_jax.data.tar_reader import iter_samples
from lexvla_jax.data.transforms import eval_box, image_member, open_image

SEG_FORMATS = ("voc", "coco", "webdataset")

# VOC's 20 classes in label order (1..20), as text: VOC's own names with their words separated.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor",
)  # fmt: skip
# COCO's names of the VOC classes (the others are spelled the same).
COCO_TO_VOC = {"airplane": "aeroplane", "motorcycle": "motorbike", "couch": "sofa", "tv": "tv monitor"}
# Which class lists each format can be scored with; the first is its default.
CLASS_LISTS = {"voc": ("voc",), "coco": ("coco", "voc")}


def voc_records(root: str, split: str, where: str) -> list[dict]:
    check_exists(root, f"{where}.root", "a VOC folder holding JPEGImages/, SegmentationClass/ and ImageSets/")
    base = epath.Path(root)
    for folder in ("JPEGImages", "SegmentationClass"):
        check_exists(str(base / folder), f"{where}.root", f"a VOC folder holding {folder}/")
    listing = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    check_exists(str(listing), f"{where}.split", f"a list in {root}/ImageSets/Segmentation/ (e.g. val)")
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    return [
        {
            "key": i,
            "path": str(base / "JPEGImages" / f"{i}.jpg"),
            "mask_path": str(base / "SegmentationClass" / f"{i}.png"),
        }
        for i in ids
    ]


def webdataset_records(shards, where: str) -> list[dict]:
    records = []
    for path in resolve_shards(shards, f"{where}.shards", ".tar"):
        with epath.Path(path).open("rb") as f:
            for sample in iter_samples(f):
                if sample.error is not None:
                    raise DataConfigError(f"{path} is damaged ({sample.error}); rewrite it")
                if "mask.png" not in sample.files:
                    raise DataConfigError(
                        f"{path}: sample {sample.key} has no mask.png; rewrite the set "
                        "(sets written before class masks existed lack them)"
                    )
                try:
                    image = image_member(sample.files)
                except BadSample:
                    image = None
                records.append({"key": sample.key, "image": image, "mask": sample.files["mask.png"]})
    return records


class _CocoMasks:
    """Paints an image's label mask from its COCO instance annotations (see the module docstring)."""

    def __init__(self, coco, label_of_category: Mapping[int, int]):
        self.coco, self.label_of_category = coco, label_of_category

    def __call__(self, image_id: int) -> np.ndarray:
        info = self.coco.imgs[image_id]
        mask = np.zeros((info["height"], info["width"]), np.uint8)
        annotations = self.coco.imgToAnns[image_id]
        for ann in annotations:
            if ann.get("iscrowd"):
                mask[self.coco.annToMask(ann) > 0] = IGNORE
        for ann in sorted((a for a in annotations if not a.get("iscrowd")), key=lambda a: -a["area"]):
            mask[self.coco.annToMask(ann) > 0] = self.label_of_category.get(ann["category_id"], IGNORE)
        return mask


def coco_records(json_path: str, image_root: str, classes: str, where: str) -> tuple[list[dict], tuple[str, ...]]:
    """Records with the image's path and `coco_mask` (a painter); the class names in label order."""
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise DataConfigError(
            f"{where}: COCO instance masks need pycocotools: pip install 'lexvla_jax[eval]'"
        ) from None
    check_exists(json_path, f"{where}.json", "a COCO instances json such as instances_val2017.json")
    check_exists(image_root, f"{where}.image_root", "the folder holding the json's images")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO(str(json_path))
    categories = sorted(coco.cats.values(), key=lambda c: c["id"])
    if classes == "voc":
        names = VOC_CLASSES
        voc_name = {c["id"]: COCO_TO_VOC.get(c["name"], c["name"]) for c in categories}
        label_of = {cid: VOC_CLASSES.index(n) + 1 for cid, n in voc_name.items() if n in VOC_CLASSES}
    else:
        names = tuple(c["name"] for c in categories)
        label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    painter = _CocoMasks(coco, label_of)
    records = []
    for image_id in sorted(coco.imgs):
        if not any(ann["category_id"] in label_of and not ann.get("iscrowd") for ann in coco.imgToAnns[image_id]):
            continue
        info = coco.imgs[image_id]
        path = os.path.join(image_root, info["file_name"])
        records.append({"key": info["file_name"], "path": path, "coco_id": image_id, "coco_mask": painter})
    if records:
        check_image_root(records[0]["path"], image_root, where, "file_name")
    return records, names


class _DecodeImageAndMask:
    """Record → `{"key", "image", "mask"}`, `{"skip": reason index}` for a bad image, or `{"error": line}`.

    `crop="center"`: image and mask get the evaluation transform's box (`transforms.eval_box`); `"none"`: the
    whole image and mask are resized to the model's input (aspect ratio not kept, nothing cut off).
    """

    def __init__(self, data_config, crop: str):
        self.data_config, self.crop = data_config, crop

    def _mask(self, record: dict) -> Image.Image:
        if "coco_mask" in record:
            return Image.fromarray(record["coco_mask"](record["coco_id"]), "L")
        data = record.get("mask")
        if data is None:
            with epath.Path(record["mask_path"]).open("rb") as f:
                data = f.read()
        return open_mask(data, record["key"])

    def __call__(self, record: dict) -> dict:
        try:
            data = record.get("image")
            if data is None:
                if "path" not in record:
                    raise BadSample(MISSING_IMAGE)
                with epath.Path(record["path"]).open("rb") as f:
                    data = f.read()
            mask = self._mask(record)
            width, height = open_image(data, max_pixels=self.data_config.max_image_pixels, min_size=1).size
            if (width, height) != mask.size:
                raise ValueError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {width}x{height}")
            size = self.data_config.image_size
            if self.crop == "none":
                box = (0, 0, width, height)
            else:
                box = eval_box(width, height, size, eval_transform(self.data_config)["crop_pct"])
            image = eval_image({"image": data}, self.data_config, box)
        except BadSample as e:
            return {"skip": REASON_INDEX[e.reason]}
        except (OSError, ValueError) as e:
            return {"error": f"{record['key']}: {e}"}
        return {"key": record["key"], "image": image, "mask": crop_mask(mask, box, size)}


def load_segmentation_set(source: Mapping, data_config, where: str) -> dict:
    """The PatchDis set of `source` (`format`, `classes` and the format's fields), in memory.

    Returns `image` uint8 [N,S,S,3], `mask` uint8 [N,S,S], `classes` (the class names, label i+1 is
    `classes[i]`), `keys` (N) and `skipped` ({reason: count}).
    """
    kind, classes = source["format"], source["classes"] or CLASS_LISTS.get(source["format"], ("",))[0]
    if kind not in SEG_FORMATS:
        raise DataConfigError(f"{where}.format={kind!r}: use one of {', '.join(SEG_FORMATS)}")
    if kind == "webdataset":
        if isinstance(classes, str) or not classes:
            raise DataConfigError(
                f"{where}.classes={classes!r}: a webdataset segmentation set needs its class names in label order, "
                "e.g. classes=('circle', 'square')"
            )
    elif classes not in CLASS_LISTS[kind]:
        raise DataConfigError(
            f"{where}.classes={classes!r} is not a class list for {kind} data; use {' or '.join(CLASS_LISTS[kind])}"
        )
    if kind == "voc":
        records, names = voc_records(source["root"], source["split"], where), VOC_CLASSES
    elif kind == "coco":
        records, names = coco_records(source["json"], source["image_root"], classes, where)
    else:
        records, names = webdataset_records(source["shards"], where), tuple(classes)
    decode = _DecodeImageAndMask(data_config, source.get("crop", "center"))
    skipped = np.zeros(len(SKIP_REASONS), np.int64)
    images, masks, keys = [], [], []
    for element in decode_in_order(records, decode, data_config, source.get("max_images"), where):
        if "skip" in element:
            skipped[element["skip"]] += 1
            continue
        top = element["mask"][element["mask"] != IGNORE].max(initial=0)
        if top > len(names):
            raise DataConfigError(
                f"{where}: mask of {element['key']} has label {top} but the class list has {len(names)} classes"
            )
        images.append(element["image"])
        masks.append(element["mask"])
        keys.append(element["key"])
    if not images:
        raise DataConfigError(f"{where}: no usable images (skipped: {skip_counts_dict(skipped)})")
    return {
        "image": np.stack(images),
        "mask": np.stack(masks),
        "classes": list(names),
        "keys": keys,
        "skipped": skip_counts_dict(skipped),
    }
