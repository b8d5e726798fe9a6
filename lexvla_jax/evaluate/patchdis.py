"""PatchDis: does each patch's lexical vector name the object under it?

Protocol:
1. Classes: each class's prompt name (the label name through the set's name map, e.g. VOC's "tv monitor" →
   "tv") fills each template (default "{c}", the name alone) and the model's caption prompt; the class vector t_c
   is the normalised mean of those text vectors (`class_text.py`).
2. Assignment: each image patch's lexical vector p (`LexicalEncoder.encode_patches`: ELU1p(H Zᵀ) per patch,
   L2-normalised, no max-pool) gets the class of highest similarity, argmax_c p·t_c (ties: lower index).
3. Ground truth on the patch grid: the mask gets the image's crop (`crop="center"`: the evaluation transform's
   centre crop; `"none"`: the whole image) and is resized nearest-neighbour to the image size; each patch takes
   the most frequent label among its pixels, pixels labelled 255 not voting (ties: the smaller label). A patch
   is *scored* when that label is a class (1..C). Patches whose label is background (0) or that hold only 255
   pixels enter neither intersection nor union: background has no class name, and 255 marks what VOC does not
   score.
4. Scores, over scored patches: `miou` sums, per class c, the intersection I_c (patches of class c
   assigned c) and the union U_c (patches of class c or assigned c) over all images, then averages
   I_c / U_c over the classes with U_c > 0. `miou_per_image`, the headline (the one Table 2's "Random Dis. 5.0"
   matches, below): per image, the IoU of each class in its ground truth, averaged over those classes, then over
   images. Also `mean_class_recall` (I_c over the patches of class c, averaged over the classes present),
   `patch_accuracy` and `iou/<class>`.
5. Image level, on the images whose ground truth holds exactly one class (a single object): the class whose text
   vector is most similar to the image's lexical vector (max-pooled, as retrieval encodes it) should be that
   class. `top_class` is the fraction where it is (random: 1/C), `top_class_images` the number of such images,
   and `confusion/<true>/<ranked first>` counts every pair (`confusion_table` prints them as a matrix).
6. Random baseline: `random_miou`, `random_miou_per_image` and `random_mean_class_recall` score, by the
   same code, an assignment of every patch to a class drawn uniformly (numpy, seeded by `random_seed`).

Which protocol gives the paper's "Random Dis. 5.0"? 5.0 = 100/C with VOC's C = 20. Under a uniform
assignment a class's expected recall is exactly 1/C, and so is its expected IoU within one image whose
scored patches all belong to it (the union is then the class's own patches). Summed over a set, class c's
union also collects the 1/C of every other class's patches assigned to c, so for n_c of N scored patches
the expected IoU_c is about n_c / (C·n_c + N − n_c): 1/(2C − 1) ≈ 2.6% on balanced classes. So the random
`mean_class_recall` is 100/C exactly, the random `miou_per_image` is 100/C on single-class images (most of
VOC's; images with several classes score a little lower), and the random `miou` is about half of it: the
paper's 5.0 matches per-image IoU (or class recall), not the set-level `miou`.

Sources: VOC layout, COCO instance masks, synthetic shapes (`data.seg_set`). Keys (after the
evaluator's name) are fractions in [0, 1], plus `num_images`, `num_patches` (scored), `num_classes`
and `num_skipped` (bad images).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lexvla_jax.data.masks import IGNORE
from lexvla_jax.data.seg_set import SEG_FORMATS, VOC_CLASSES, load_segmentation_set
from lexvla_jax.evaluate import class_text
from lexvla_jax.evaluate.base import EvalConfigError, Evaluator

UNSCORED = -1
CROPS = ("center", "none")


def patch_labels(masks: np.ndarray, grid: tuple[int, int], num_classes: int, chunk: int = 256) -> np.ndarray:
    """int32 `[N, rows·cols]` (row-major): each patch's class index 0..C-1, or `UNSCORED` (protocol step 3)."""
    n, height, width = masks.shape
    rows, cols = grid
    if height % rows or width % cols:
        raise ValueError(f"masks {height}x{width} do not split into a {rows}x{cols} patch grid")
    ph, pw, patches = height // rows, width // cols, rows * cols
    out = np.empty((n, patches), np.int32)
    for start in range(0, n, chunk):
        block = masks[start : start + chunk].astype(np.int64)
        m = len(block)
        block = block.reshape(m, rows, ph, cols, pw).transpose(0, 1, 3, 2, 4).reshape(m * patches, ph * pw)
        votes = block != IGNORE
        index = np.broadcast_to(np.arange(m * patches)[:, None], block.shape)[votes] * (num_classes + 1)
        counts = np.bincount(index + block[votes], minlength=m * patches * (num_classes + 1))
        counts = counts.reshape(m * patches, num_classes + 1)
        best = counts.argmax(axis=1)
        scored = (counts.sum(axis=1) > 0) & (best > 0)
        out[start : start + m] = np.where(scored, best - 1, UNSCORED).reshape(m, patches)
    return out


def class_counts(labels: np.ndarray, assigned: np.ndarray, num_classes: int) -> tuple[np.ndarray, ...]:
    """Per image and class, over scored patches: (intersection, ground truth, assigned), int64 `[N, C]`."""
    n = len(labels)
    scored = labels != UNSCORED
    image = np.broadcast_to(np.arange(n)[:, None], labels.shape)[scored] * num_classes
    truth, guess = labels[scored], assigned[scored]

    def count(index):
        return np.bincount(index, minlength=n * num_classes).reshape(n, num_classes)

    return count((image + truth)[truth == guess]), count(image + truth), count(image + guess)


def patchdis_scores(labels: np.ndarray, assigned: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """`miou`, `miou_per_image`, `mean_class_recall`, `patch_accuracy`, `iou/<class>` (protocol step 4)."""
    inter, truth, guess = class_counts(labels, assigned, len(classes))
    i, t, g = inter.sum(0), truth.sum(0), guess.sum(0)
    union = t + g - i
    iou = np.where(union > 0, i / np.maximum(union, 1), np.nan)
    present = truth > 0
    image_iou = np.where(present, inter / np.maximum(truth + guess - inter, 1), 0.0)
    classes_in_image = present.sum(1)
    has_class = classes_in_image > 0
    metrics = {
        "miou": float(np.nanmean(iou)),
        "miou_per_image": float(np.mean(image_iou.sum(1)[has_class] / classes_in_image[has_class])),
        "mean_class_recall": float(np.mean(i[t > 0] / t[t > 0])),
        "patch_accuracy": float(i.sum() / t.sum()),
    }
    for name, value in zip(classes, iou, strict=True):
        if not np.isnan(value):
            metrics[f"iou/{name.replace(' ', '_')}"] = float(value)
    return metrics


def random_assignment(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """Every patch's class drawn uniformly from `num_classes` (protocol step 5)."""
    return np.random.default_rng(seed).integers(num_classes, size=labels.shape, dtype=np.int32)


def single_class_images(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, class) of the images whose scored patches all belong to one class (protocol step 5)."""
    present = np.stack([(labels == c).any(axis=1) for c in range(num_classes)], axis=1)
    single = np.flatnonzero(present.sum(axis=1) == 1)
    return single, present[single].argmax(axis=1)


def top_class_scores(truth: np.ndarray, ranked_first: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """`top_class`, `top_class_images` and `confusion/<true>/<ranked first>` counts (protocol step 5)."""
    metrics = {"top_class": float(np.mean(truth == ranked_first)) if len(truth) else 0.0}
    metrics["top_class_images"] = len(truth)
    counts = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(counts, (truth, ranked_first), 1)
    for i, a in enumerate(classes):
        for j, b in enumerate(classes):
            metrics[f"confusion/{a.replace(' ', '_')}/{b.replace(' ', '_')}"] = int(counts[i, j])
    return metrics


def confusion_table(metrics: Mapping[str, float], prefix: str, classes: Sequence[str]) -> str:
    """The `confusion/` counts under `prefix` as rows (true class) × columns (class ranked first)."""
    names = [c.replace(" ", "_") for c in classes]
    width = max(len(n) for n in names) + 2
    lines = ["true \\ first".ljust(width) + "".join(n.rjust(width) for n in names)]
    for a in names:
        cells = "".join(str(int(metrics.get(f"{prefix}confusion/{a}/{b}", 0))).rjust(width) for b in names)
        lines.append(a.ljust(width) + cells)
    return "\n".join(lines)


def assign_patches(encoder, images: np.ndarray, class_vectors: np.ndarray) -> np.ndarray:
    """int32 `[N, P]`: the class of highest similarity for each patch (protocol step 2)."""
    project = np.ascontiguousarray(np.asarray(class_vectors, np.float32).T)  # [V', C]
    chunk = max(1, encoder.batch_size) * 8
    out = []
    for start in range(0, len(images), chunk):
        scores = np.asarray(encoder.encode_patches(images[start : start + chunk], project=project))
        out.append(scores.argmax(axis=-1).astype(np.int32))
    return np.concatenate(out)


class PatchDisEvaluator(Evaluator):
    """PatchDis mIoU with its random baseline on VOC, COCO or synthetic masks (module docstring)."""

    type = "patchdis"
    defaults = {
        "format": "voc",  # voc | coco | synthetic
        "root": "",  # voc: the folder holding JPEGImages/, SegmentationClass/, ImageSets/
        "split": "val",  # voc: ImageSets/Segmentation/<split>.txt
        "json": "",  # coco: instances json
        "image_root": "",  # coco: its image folder
        "shards": "",  # webdataset: eval tars with KEY.mask.png
        # "": the format's own list; coco data can also use "voc" (its 20 VOC categories); webdataset: the names
        "classes": "",
        # "center": image and mask get the evaluation transform's centre crop; "none": the whole image and mask
        # resized to the model's input (nothing cut off, aspect ratio not kept).
        "crop": "center",
        # Label names → the words the text prompt uses (`class_text.NAME_MAPS`): "auto" (VOC's map for VOC's
        # classes, else none), "none", "voc", or a dict.
        "name_map": "auto",
        "templates": class_text.DEFAULT_TEMPLATES,  # each with {c}; a class's vector combines them (class_text.py)
        "random_seed": 0,
    }

    def __init__(self, name: str, settings: Mapping, data_config):
        super().__init__(name, settings, data_config)
        s = self.settings
        if s["format"] not in SEG_FORMATS:
            raise EvalConfigError(f"{self.where}.format={s['format']!r}: use one of {', '.join(SEG_FORMATS)}")
        if s["crop"] not in CROPS:
            raise EvalConfigError(f"{self.where}.crop={s['crop']!r}: use one of {', '.join(CROPS)}")
        self.templates = class_text.check_templates(s["templates"], self.where)
        self.data = load_segmentation_set(s, data_config, self.where)
        self.classes = self.data["classes"]
        name_map = s["name_map"]
        if name_map == "auto":
            name_map = "voc" if tuple(self.classes) == VOC_CLASSES else "none"
        self.prompt_names = class_text.prompt_names(self.classes, name_map, self.where)

    def run(self, encoder) -> dict[str, float]:
        images = self.data["image"]
        self.check_image_size(encoder, images.shape[1])
        labels = patch_labels(self.data["mask"], tuple(encoder.patch_grid), len(self.classes))
        if not (labels != UNSCORED).any():
            raise EvalConfigError(f"{self.where}: no patch has a class label; check the masks and classes")
        class_vectors = class_text.class_vectors(encoder, self.prompt_names, self.templates)
        metrics = patchdis_scores(labels, assign_patches(encoder, images, class_vectors), self.classes)
        chance = patchdis_scores(
            labels, random_assignment(labels, len(self.classes), int(self.settings["random_seed"])), self.classes
        )
        for key in ("miou", "miou_per_image", "mean_class_recall"):
            metrics[f"random_{key}"] = chance[key]
        single, truth = single_class_images(labels, len(self.classes))
        if len(single):
            scores = np.asarray(encoder.encode_images(images[single]), np.float32) @ class_vectors.T
            metrics.update(top_class_scores(truth, scores.argmax(axis=1), self.classes))
            metrics["random_top_class"] = 1.0 / len(self.classes)
        metrics["num_images"] = len(images)
        metrics["num_patches"] = int((labels != UNSCORED).sum())
        metrics["num_classes"] = len(self.classes)
        metrics["num_skipped"] = sum(self.data["skipped"].values())
        return self.prefixed(metrics)
