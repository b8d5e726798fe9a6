"""Zero-shot image classification, scored as CLIP_benchmark scores it.

Protocol: every class's prompt name (through `name_map`) fills each template, the caption prompt makes a text
lexical vector of it, and a class's vector is the normalised mean over its templates (`class_text.py`). Each
image's lexical vector ranks the classes by dot product (ties: the lower class index). Templates: the entry's
`templates`, else the set's own (`zeroshot_classification_templates.txt` of a CLIP_benchmark set), else
`("a photo of a {c}.",)`.

Keys (after the evaluator's name), for each kind of vector (`modes`, as retrieval: `dense`, `threshold` at
1/√V′, `topk`; sparse image and class vectors are not renormalised): `<mode>/acc1`, `<mode>/acc5` (the true class
among the top 5; top C when there are fewer classes) and `<mode>/mean_per_class_recall` (top-1 recall per class,
averaged over the classes that have images: CLIP_benchmark's balanced accuracy), `<mode>/active_words_image` and
`<mode>/active_words_class` for sparse modes; `chance/acc1`, `chance/acc5`, `chance/mean_per_class_recall` (a
uniformly random ranking: 1/C, min(5, C)/C, 1/C); `num_images`, `num_classes`, `num_templates`, `num_skipped`
(bad samples) and `num_multi_class` (images of a mask set with several classes, left out). Fractions in [0, 1].

Memory: the set is streamed (`data.class_set.ClassSet.batches`), never held: each `run` reads and decodes it in
batches of the encoder's `batch_size`, encodes each batch and keeps only each image's label and its top-5 classes
per mode, so a process holds two batches of pixels and `[N, 5]` class indices (ImageNet's 50k: ~1 MB per mode), at
the cost of decoding the set again at every run. Every process reads the same batches in the same order and the
encoder replicates its outputs (`inference.LexicalEncoder`), so multi-process evaluation sees the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from lexvla_jax.data.class_set import CLASS_FORMATS, ClassSet, ReadCounts
from lexvla_jax.evaluate import class_text
from lexvla_jax.evaluate.base import EvalConfigError, Evaluator
from lexvla_jax.evaluate.retrieval import MODES, check_modes, check_top_k, sparse_vectors

FALLBACK_TEMPLATES = ("a photo of a {c}.",)


def top_classes(similarity: np.ndarray, num_classes: int) -> np.ndarray:
    """int32 `[N, min(5, C)]`: each row's classes by descending similarity (ties: the lower class index)."""
    return np.argsort(-similarity, axis=1, kind="stable")[:, : min(5, num_classes)].astype(np.int32)


def scores_of_top(top: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """`acc1`, `acc5` and `mean_per_class_recall` of the `top_classes` of N images against int labels `[N]`."""
    hit1, hit5 = top[:, 0] == labels, (top == labels[:, None]).any(axis=1)
    present = np.bincount(labels, minlength=num_classes) > 0
    per_class = np.bincount(labels, weights=hit1, minlength=num_classes)[present] / np.bincount(labels)[present]
    return {"acc1": float(hit1.mean()), "acc5": float(hit5.mean()), "mean_per_class_recall": float(per_class.mean())}


def classification_scores(similarity: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """`acc1`, `acc5` and `mean_per_class_recall` of `[N, C]` similarities against int labels `[N]`."""
    return scores_of_top(top_classes(similarity, num_classes), labels, num_classes)


class ClassificationEvaluator(Evaluator):
    """Zero-shot classification on a CLIP_benchmark set or labelled webdataset tars (`data.class_set`)."""

    type = "classification"
    defaults = {
        "format": "clip_benchmark",  # clip_benchmark | webdataset
        "root": "",  # clip_benchmark: e.g. wds_imagenet1k (holding classnames.txt and SPLIT/nshards.txt)
        "split": "test",  # clip_benchmark
        "shards": "",  # webdataset: tars with KEY.cls (class index) or one-class KEY.mask.png
        "classes": "",  # webdataset: the class names in class-index order
        "name_map": "none",  # class names → prompt names: "none", a class_text.NAME_MAPS key, or a dict
        "templates": None,  # each with {c}; None: the set's own templates, else FALLBACK_TEMPLATES
        "modes": MODES,
        "threshold": None,  # None: 1/√V′
        "top_k": 512,
    }

    def __init__(self, name: str, settings: Mapping, data_config):
        super().__init__(name, settings, data_config)
        s = self.settings
        if s["format"] not in CLASS_FORMATS:
            raise EvalConfigError(f"{self.where}.format={s['format']!r}: use one of {', '.join(CLASS_FORMATS)}")
        self.modes = check_modes(self)
        self.data = ClassSet(s, data_config, self.where)
        self.classes = self.data.classes
        templates = s["templates"] if s["templates"] is not None else self.data.templates or FALLBACK_TEMPLATES
        self.templates = class_text.check_templates(templates, self.where)
        self.prompt_names = class_text.prompt_names(self.classes, s["name_map"], self.where)

    def run(self, encoder) -> dict[str, float]:
        self.check_image_size(encoder, self.data_config.image_size)
        check_top_k(self, len(encoder.kept_ids))
        threshold, top_k, num_classes = self.settings["threshold"], int(self.settings["top_k"]), len(self.classes)
        s_cls = class_text.class_vectors(encoder, self.prompt_names, self.templates)
        classes = {mode: sparse_vectors(s_cls, mode, threshold, top_k) for mode in self.modes}
        tops, active = {mode: [] for mode in self.modes}, dict.fromkeys(self.modes, 0)
        labels, counts = [], ReadCounts()
        for batch in self.data.batches(encoder.batch_size, counts):
            s_img = np.asarray(encoder.encode_images(batch["image"]), np.float32)
            labels.append(batch["label"])
            for mode in self.modes:
                images = sparse_vectors(s_img, mode, threshold, top_k)
                tops[mode].append(top_classes(images @ classes[mode].T, num_classes))
                active[mode] += int(np.count_nonzero(images))
        labels = np.concatenate(labels)
        metrics = {}
        for mode in self.modes:
            scores = scores_of_top(np.concatenate(tops[mode]), labels, num_classes)
            metrics.update({f"{mode}/{key}": value for key, value in scores.items()})
            if mode != "dense":
                metrics[f"{mode}/active_words_image"] = active[mode] / len(labels)
                metrics[f"{mode}/active_words_class"] = float(np.mean(np.count_nonzero(classes[mode], axis=1)))
        metrics["chance/acc1"] = metrics["chance/mean_per_class_recall"] = 1 / num_classes
        metrics["chance/acc5"] = min(5, num_classes) / num_classes
        metrics["num_images"], metrics["num_classes"] = len(labels), num_classes
        metrics["num_templates"] = len(self.templates)
        metrics["num_skipped"] = sum(counts.skipped.values())
        metrics["num_multi_class"] = counts.multi_class
        return self.prefixed(metrics)
