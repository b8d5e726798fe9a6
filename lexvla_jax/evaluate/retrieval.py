"""Zero-shot image↔text retrieval: encode an eval set with a `LexicalEncoder`, then R@K (one-to-many)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from lexvla_jax import losses


def retrieval_eval(encoder, eval_set: Mapping[str, np.ndarray], ks=(1, 5, 10)) -> tuple[dict, np.ndarray, np.ndarray]:
    """R@K both ways on `eval_set` (`image`, `input_ids`, `attention_mask`, `image_of_text`).

    Returns (`{"eval/i2t_r@1": ..., "eval/t2i_r@1": ...}`, image vectors, text vectors); every process gets
    the same results.
    """
    s_img = encoder.encode_images(eval_set["image"])
    s_txt = encoder.encode_tokens(eval_set["input_ids"], eval_set["attention_mask"])
    metrics = losses.retrieval_metrics(s_img, s_txt, np.asarray(eval_set["image_of_text"]), ks=ks)
    return {f"eval/{k}": float(v) for k, v in metrics.items()}, s_img, s_txt


def chance_recall(num_images: int, captions_per_image: int, k: int) -> dict[str, float]:
    """Expected R@k of a random ranking: i2t hits one of C captions among N·C; t2i one image among N."""
    total = num_images * captions_per_image
    miss = 1.0
    for i in range(k):
        miss *= (total - captions_per_image - i) / (total - i)
    return {f"i2t_r@{k}": 1.0 - miss, f"t2i_r@{k}": min(1.0, k / num_images)}
