"""Zero-shot image↔text retrieval: encode an eval set in fixed-size batches, then R@K (one-to-many)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from lexvla_jax import losses, sharding


def place_batch(arrays: Mapping[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
    """Host arrays that every process holds in full → global arrays split over the batch axis."""
    out = {}
    for name, array in arrays.items():
        names = ("batch",) + (None,) * (array.ndim - 1)
        target = sharding.named_sharding(mesh, names, rules, array.shape)
        out[name] = jax.make_array_from_callback(array.shape, target, lambda index, a=array: a[index])
    return out


def encode_in_batches(
    encode: Callable[[dict], jax.Array], arrays: Mapping[str, np.ndarray], batch_size: int, mesh: Mesh, rules
) -> np.ndarray:
    """Runs `encode` over rows of `arrays` in batches of `batch_size` (the last one padded) → `[N, V]`."""
    n = len(next(iter(arrays.values())))
    outputs = []
    for start in range(0, n, batch_size):
        chunk = {k: v[start : start + batch_size] for k, v in arrays.items()}
        rows = len(next(iter(chunk.values())))
        if rows < batch_size:
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - rows, axis=0)]) for k, v in chunk.items()}
        result = encode(place_batch(chunk, mesh, rules))
        outputs.append(np.asarray(jax.device_get(result))[:rows])
    return np.concatenate(outputs)


def retrieval_eval(
    encode_image: Callable[[dict], jax.Array],
    encode_text: Callable[[dict], jax.Array],
    eval_set: Mapping[str, np.ndarray],
    batch_size: int,
    mesh: Mesh,
    rules,
    ks=(1, 5, 10),
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """R@K both ways on `eval_set` (`image`, `input_ids`, `attention_mask`, `image_of_text`).

    Returns (`{"eval/i2t_r@1": ..., "eval/t2i_r@1": ...}`, image vectors, text vectors).
    """
    s_img = encode_in_batches(encode_image, {"image": eval_set["image"]}, batch_size, mesh, rules)
    text = {k: eval_set[k] for k in ("input_ids", "attention_mask")}
    s_txt = encode_in_batches(encode_text, text, batch_size, mesh, rules)
    metrics = losses.retrieval_metrics(s_img, s_txt, np.asarray(eval_set["image_of_text"]), ks=ks)
    return {f"eval/{k}": float(v) for k, v in metrics.items()}, s_img, s_txt


def chance_recall(num_images: int, captions_per_image: int, k: int) -> dict[str, float]:
    """Expected R@k of a random ranking: i2t hits one of C captions among N·C; t2i one image among N."""
    total = num_images * captions_per_image
    miss = 1.0
    for i in range(k):
        miss *= (total - captions_per_image - i) / (total - i)
    return {f"i2t_r@{k}": 1.0 - miss, f"t2i_r@{k}": min(1.0, k / num_images)}
