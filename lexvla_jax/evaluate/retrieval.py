"""Zero-shot image↔text retrieval, R@K both ways with all captions of an image as positives.

Three kinds of vectors (`modes`), each scored on the same encoded set:
- `dense`: the L2-normalised lexical vectors as the model outputs them;
- `threshold`: entries below `1/√V′` set to 0 (the paper's default; `threshold` overrides the value);
- `topk`: all but each vector's `top_k` largest entries set to 0 (`top_k=512` is the paper's Q(512)).
Sparse vectors are not renormalised: their dot product is what an inverted index over the kept weights
returns. For each sparse mode the mean number of active (non-zero) words per image and per text is reported.

Metric keys (after the evaluator's name): `<mode>/i2t_r@k` (an image is a hit when one of its captions is
among its top k texts) and `<mode>/t2i_r@k` (a caption is a hit when its image is among its top k), the same
numbers under CLIP_benchmark's names, `<mode>/text_retrieval_recall@k` (= i2t: texts retrieved for an image
query) and `<mode>/image_retrieval_recall@k` (= t2i), `<mode>/active_words_image|text`, `chance/i2t_r@k`,
`chance/t2i_r@k`, `num_images`, `num_texts`, `num_skipped` (bad images or captions) and `num_empty_texts`
(captions whose vector is all zero: a bag-of-words text with no kept word, `text/bow.py`). Recalls are fractions in
[0, 1].

From the same dense vectors, word precision (`word_precision.py`): `word_precision/image` and
`word_precision/text`, the share of each image's (caption's) `word_k` strongest words that are content words of
its captions (its own), and `word_precision/image_random`, `word_precision/text_random` for random words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lexvla_jax import losses
from lexvla_jax.data.eval_set import SOURCE_FORMATS, image_text_records, read_image_text_set
from lexvla_jax.evaluate import word_precision
from lexvla_jax.evaluate.base import EvalConfigError, Evaluator
from lexvla_jax.evaluate.metrics import retrieval_metrics

MODES = ("dense", "threshold", "topk")


def sparse_vectors(s: np.ndarray, mode: str, threshold: float | None = None, top_k: int = 512) -> np.ndarray:
    """`s` `[N, V']` as `mode` scores it (see the module docstring)."""
    if mode == "dense":
        return s
    if mode == "threshold":
        return np.asarray(losses.sparsify(s, threshold=threshold))
    return np.asarray(losses.sparsify(s, top_k=top_k))


def retrieval_scores(
    s_img: np.ndarray,
    s_txt: np.ndarray,
    image_of_text: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    modes: Sequence[str] = MODES,
    threshold: float | None = None,
    top_k: int = 512,
) -> dict[str, float]:
    """Recalls and active-word means of every mode (keys as in the module docstring, without `chance/`)."""
    metrics = {}
    for mode in modes:
        images = sparse_vectors(s_img, mode, threshold, top_k)
        texts = sparse_vectors(s_txt, mode, threshold, top_k)
        recalls = retrieval_metrics(images, texts, image_of_text, ks=ks)
        for k in ks:
            i2t, t2i = float(recalls[f"i2t_r@{k}"]), float(recalls[f"t2i_r@{k}"])
            metrics[f"{mode}/i2t_r@{k}"] = metrics[f"{mode}/text_retrieval_recall@{k}"] = i2t
            metrics[f"{mode}/t2i_r@{k}"] = metrics[f"{mode}/image_retrieval_recall@{k}"] = t2i
        if mode != "dense":
            metrics[f"{mode}/active_words_image"] = float(np.mean(np.count_nonzero(images, axis=1)))
            metrics[f"{mode}/active_words_text"] = float(np.mean(np.count_nonzero(texts, axis=1)))
    return metrics


def check_modes(evaluator: Evaluator) -> tuple[str, ...]:
    """The entry's `modes`, checked (one line naming the field)."""
    modes = tuple(evaluator.settings["modes"])
    if not modes or set(modes) - set(MODES):
        raise EvalConfigError(f"{evaluator.where}.modes={modes}: choose from {', '.join(MODES)}")
    if int(evaluator.settings["top_k"]) < 1:
        raise EvalConfigError(f"{evaluator.where}.top_k={evaluator.settings['top_k']}: must be >= 1")
    return modes


def check_top_k(evaluator: Evaluator, vocab: int) -> None:
    """`top_k` fits the model's vocabulary when the entry scores top-k vectors."""
    if "topk" in evaluator.modes and evaluator.settings["top_k"] > vocab:
        raise EvalConfigError(
            f"{evaluator.where}.top_k={evaluator.settings['top_k']} exceeds the vocabulary (V'={vocab}); lower it"
        )


class RetrievalEvaluator(Evaluator):
    """Image↔text retrieval on a Karpathy json, webdataset tars or a TFDS dataset (`data.eval_set`)."""

    type = "retrieval"
    defaults = {
        "format": "webdataset",  # webdataset | karpathy | tfds | clip_benchmark
        "shards": "",  # webdataset
        "root": "",  # clip_benchmark: e.g. wds_mscoco_captions (holding test/nshards.txt, test/0.tar, ...)
        "json": "",  # karpathy: dataset_coco.json / dataset_flickr30k.json
        "image_root": "",  # karpathy: the folder the json's paths are relative to
        "split": "test",  # karpathy, tfds, clip_benchmark
        "tfds_name": "",  # tfds, e.g. "coco_captions/2014"
        "tfds_data_dir": "",  # tfds: its data_dir ("" = TFDS's default)
        "image_key": "image",  # tfds feature of the image
        "caption_key": "captions/text",  # tfds feature of the captions ("a/b" reaches into nested features)
        "captions_per_image": 0,  # 0: every caption (COCO 5k: 25,010, as CLIP_benchmark); n: the first n
        "ks": (1, 5, 10),
        "modes": MODES,
        "threshold": None,  # None: 1/√V′
        "top_k": 512,
        "word_k": 5,  # word precision of the `word_k` strongest words (0: not computed)
    }

    def __init__(self, name: str, settings: Mapping, data_config):
        super().__init__(name, settings, data_config)
        s = self.settings
        if s["format"] not in SOURCE_FORMATS:
            raise EvalConfigError(f"{self.where}.format={s['format']!r}: use one of {', '.join(SOURCE_FORMATS)}")
        self.modes, self.ks = check_modes(self), tuple(int(k) for k in s["ks"])
        if not self.ks or min(self.ks) < 1:
            raise EvalConfigError(f"{self.where}.ks={self.ks}: give recall cut-offs >= 1, e.g. (1, 5, 10)")
        if int(s["captions_per_image"]) < 0:
            raise EvalConfigError(f"{self.where}.captions_per_image={s['captions_per_image']}: give 0 (all) or more")
        if int(s["word_k"]) < 0:
            raise EvalConfigError(f"{self.where}.word_k={s['word_k']}: give 0 (off) or the number of words, e.g. 5")
        records = image_text_records(s, self.where)
        self.data = read_image_text_set(records, data_config, int(s["captions_per_image"]), s["max_images"], self.where)

    def run(self, encoder) -> dict[str, float]:
        self.check_image_size(encoder, self.data["image"].shape[1])
        vocab = len(encoder.kept_ids)
        check_top_k(self, vocab)
        s_img = np.asarray(encoder.encode_images(self.data["image"]), np.float32)
        s_txt = np.asarray(encoder.encode_texts(self.data["captions"]), np.float32)
        metrics = retrieval_scores(
            s_img, s_txt, self.data["image_of_text"], self.ks, self.modes, self.settings["threshold"],
            int(self.settings["top_k"]),
        )  # fmt: skip
        word_k = int(self.settings["word_k"])
        if word_k:
            words = word_precision.word_precision(
                s_img, s_txt, self.data["image_of_text"], self.data["captions"], encoder.words, min(word_k, vocab)
            )
            metrics.update({f"word_precision/{k}": v for k, v in words.items()})
        num_images, num_texts = len(s_img), len(s_txt)
        counts = np.bincount(self.data["image_of_text"], minlength=num_images)
        for k in self.ks:
            chance = chance_recall(num_images, counts, k)
            metrics[f"chance/i2t_r@{k}"], metrics[f"chance/t2i_r@{k}"] = chance[f"i2t_r@{k}"], chance[f"t2i_r@{k}"]
        metrics["num_images"], metrics["num_texts"] = num_images, num_texts
        metrics["num_skipped"] = sum(self.data["skipped"].values())
        metrics["num_empty_texts"] = int(np.sum(~s_txt.any(axis=1)))
        return self.prefixed(metrics)


def chance_recall(num_images: int, captions_per_image: int | Sequence[int], k: int) -> dict[str, float]:
    """Expected R@k of a random ranking: i2t hits one of an image's c captions among all T, averaged over the
    images (`captions_per_image`: one count for all, or each image's); t2i one image among N."""
    counts = np.broadcast_to(np.asarray(captions_per_image, np.int64), (num_images,))
    total = int(counts.sum())
    hits = []
    for count in counts:
        miss = 1.0
        for i in range(min(k, total)):  # k beyond the T texts retrieves them all
            miss *= max(0, total - count - i) / (total - i)
        hits.append(1.0 - miss)
    return {f"i2t_r@{k}": float(np.mean(hits)), f"t2i_r@{k}": min(1.0, k / num_images)}
