"""Retrieval metrics: recall@k of image↔text similarity with several captions per image (pure `jax.numpy`)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lexvla_jax.losses import check_lexical, to_float


def _top_indices(sim: jax.Array, k: int) -> jax.Array:
    """Indices of the `min(k, D)` most similar documents per query; ties go to the lower index."""
    if sim.ndim != 2:
        raise ValueError(f"sim must be a [queries, documents] matrix, got shape {sim.shape}")
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    return jax.lax.top_k(sim, min(k, sim.shape[1]))[1]


def recall_at_k(sim: jax.Array, k: int, positives: jax.Array) -> jax.Array:
    """Fraction of queries with at least one relevant document among their top k.

    sim: `[Q, D]` similarities. positives: boolean `[Q, D]` (True where document d is relevant to query q)
    or integer `[Q]` (the one relevant document of each query). Ranking is a stable sort by descending
    similarity: among equal scores the lower document index ranks first (`jax.lax.top_k`). For k ≥ D every
    document is retrieved. A query with no relevant document counts as a miss.
    """
    top = _top_indices(sim, k)
    positives = jnp.asarray(positives)
    if positives.dtype == jnp.bool_:
        if positives.shape != sim.shape:
            raise ValueError(f"boolean positives {positives.shape} must match sim {sim.shape}")
        hits = jnp.take_along_axis(positives, top, axis=1)
    else:
        if positives.shape != sim.shape[:1]:
            raise ValueError(
                f"integer positives {positives.shape} must hold one document index per query {sim.shape[:1]}"
            )
        hits = top == positives[:, None]
    return jnp.mean(jnp.any(hits, axis=1))


def retrieval_metrics(
    s_img: jax.Array, s_txt: jax.Array, image_of_text: jax.Array, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, jax.Array]:
    """Image↔text recall@k (fractions in [0, 1]) with several captions per image.

    s_img: `[I, V]`; s_txt: `[T, V]`; image_of_text: int `[T]`, the image each caption describes (e.g.
    `arange(T) // 5` for five captions per image). Image→text: an image is a hit when any of its captions
    is in its top k. Text→image: a caption is a hit when its image is in its top k. Ties as `recall_at_k`.
    Keys: `i2t_r@{k}` and `t2i_r@{k}` for each k in `ks`.
    """
    check_lexical(s_img, "s_img")
    check_lexical(s_txt, "s_txt")
    image_of_text = jnp.asarray(image_of_text)
    if image_of_text.shape != s_txt.shape[:1]:
        raise ValueError(f"image_of_text {image_of_text.shape} must give one image index per caption {s_txt.shape[:1]}")
    sim = to_float(s_img) @ to_float(s_txt).T  # [I, T]
    top_texts = _top_indices(sim, max(ks))
    top_images = _top_indices(sim.T, max(ks))
    i2t_hits = image_of_text[top_texts] == jnp.arange(sim.shape[0])[:, None]  # [I, k]
    t2i_hits = top_images == image_of_text[:, None]  # [T, k]
    metrics = {}
    for k in ks:
        metrics[f"i2t_r@{k}"] = jnp.mean(jnp.any(i2t_hits[:, :k], axis=1))
    for k in ks:
        metrics[f"t2i_r@{k}"] = jnp.mean(jnp.any(t2i_hits[:, :k], axis=1))
    return metrics
