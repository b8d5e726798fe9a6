"""LexVLA's objective and sparsification as pure `jax.numpy` functions.

Lexical vectors `s` are `[N, V]`: N images or texts, V vocabulary words, non-negative entries. Every batch
statistic here is a plain `jnp` reduction over axis 0, so under `jax.jit` with the batch sharded over
devices (and hosts) XLA computes it over the *global* batch: the overuse penalty and InfoNCE see all
N rows, never a per-device slice. Losses and logits are computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PENALTIES = ("overuse", "flops")


def to_float(x) -> jax.Array:
    """`x` as an array of at least float32 precision (float64 stays float64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_lexical(s: jax.Array, name: str = "s") -> None:
    if s.ndim != 2:
        raise ValueError(f"{name} must be [N, V] lexical vectors, got shape {s.shape}; flatten leading axes first")


def info_nce(s_img: jax.Array, s_txt: jax.Array, logit_scale: jax.Array | float) -> jax.Array:
    """Symmetric CLIP-style InfoNCE; row i of `s_img` and row i of `s_txt` are the positive pair.

    `logit_scale` is the multiplier itself (e.g. `exp(learned_log_scale)`), not its logarithm. Logits
    `logit_scale · s_img @ s_txtᵀ` are at least float32; the loss is the mean of the image→text and text→image
    cross-entropies.
    """
    check_lexical(s_img, "s_img")
    check_lexical(s_txt, "s_txt")
    if s_img.shape != s_txt.shape:
        raise ValueError(f"s_img {s_img.shape} and s_txt {s_txt.shape} must both be [N, V] with paired rows")
    s_img, s_txt = to_float(s_img), to_float(s_txt)
    logits = to_float(logit_scale) * (s_img @ s_txt.T)
    positives = jnp.diagonal(logits)
    image_to_text = jnp.mean(jax.nn.logsumexp(logits, axis=1) - positives)
    text_to_image = jnp.mean(jax.nn.logsumexp(logits, axis=0) - positives)
    return 0.5 * (image_to_text + text_to_image)


def overuse_penalty(s: jax.Array) -> jax.Array:
    """The poster's overuse penalty `V · Σ_j (s̄_j / Σ_k s̄_k) · s̄_j²` with `s̄_j = mean_i s_ij`.

    Each word's squared mean activation is weighted by its share of the total activation, so words that
    fire for the whole batch are pushed down hardest. For all-zero `s` the value is 0 (its limit: the
    penalty is homogeneous of degree 2) and the gradient is finite: the division is guarded by a `where`.
    """
    check_lexical(s)
    mean = jnp.mean(to_float(s), axis=0)
    total = jnp.sum(mean)
    nonzero = total > 0
    safe_total = jnp.where(nonzero, total, 1.0)
    return jnp.where(nonzero, s.shape[1] * jnp.sum(mean**3) / safe_total, 0.0)


def flops_penalty(s: jax.Array) -> jax.Array:
    """SPLADE's FLOPs regulariser `Σ_j s̄_j²` with `s̄_j = mean_i s_ij` (the baseline to overuse)."""
    check_lexical(s)
    return jnp.sum(jnp.mean(to_float(s), axis=0) ** 2)


def default_threshold(vocab_size: int) -> float:
    """The paper's sparsification threshold `1/√V`."""
    return float(vocab_size) ** -0.5


def sparsify(s: jax.Array, threshold: float | None = None, top_k: int | None = None) -> jax.Array:
    """Zeroes all but the strong entries of lexical vectors `[..., V]`; same shape and dtype.

    Keeps entries `>= threshold`, or the `top_k` largest of each row (ties: lower word index first,
    as `jax.lax.top_k`). With neither given, the threshold is `1/√V`.
    """
    if threshold is not None and top_k is not None:
        raise ValueError("sparsify takes a threshold or a top_k, not both; pass one of them")
    vocab = s.shape[-1]
    if top_k is None:
        cut = default_threshold(vocab) if threshold is None else threshold
        return jnp.where(s >= cut, s, jnp.zeros_like(s))
    if not 0 < top_k <= vocab:
        raise ValueError(f"top_k={top_k} must be in [1, V={vocab}]")
    rows = s.reshape(-1, vocab)
    _, index = jax.lax.top_k(rows, top_k)
    keep = jnp.zeros(rows.shape, bool).at[jnp.arange(rows.shape[0])[:, None], index].set(True)
    return jnp.where(keep, rows, jnp.zeros_like(rows)).reshape(s.shape)


def active_words(s: jax.Array) -> jax.Array:
    """Number of non-zero entries of each lexical vector `[..., V]` → `[...]` (int32)."""
    return jnp.sum(s != 0, axis=-1, dtype=jnp.int32)


def lexvla_loss(
    s_img: jax.Array,
    s_txt: jax.Array,
    logit_scale: jax.Array | float,
    *,
    lambda_img: float,
    lambda_txt: float,
    penalty: str = "overuse",
    step: jax.Array | int | None = None,
    warmup_steps: int = 0,
    top_k: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`info_nce + λ_img · pen(s_img) + λ_txt · pen(s_txt)`, with `pen` the overuse or FLOPs penalty.

    With `warmup_steps > 0` both λs ramp linearly, `λ · min(1, step / warmup_steps)` (so `step` is then
    required). With `top_k > 0` (Q(512)), InfoNCE scores `sparsify(s, top_k=top_k)` of both sides: each
    vector's `top_k` largest entries, not renormalised, so training ranks pairs by the very dot products that
    top-k retrieval (`evaluate/retrieval.py`, mode "topk") and an inverted index over the kept weights compute.
    The gradient reaches the kept entries only; the penalties still see the whole vectors, which decide what
    the top k are. Returns `(loss, metrics)`: `loss`, `info_nce`, `penalty_img` and `penalty_txt` (unweighted),
    `lambda_img` and `lambda_txt` (in effect), `active_words_img` and `active_words_txt` (mean per vector
    at the default `1/√V` threshold), `empty_img` and `empty_txt` (all-zero vectors in the batch, e.g. a
    bag-of-words text with no kept word), `logit_scale`, and with `top_k` `topk_words_img` and
    `topk_words_txt` (mean non-zero entries per vector that InfoNCE saw).
    """
    if penalty not in PENALTIES:
        raise ValueError(f"penalty={penalty!r} unknown; choose one of {PENALTIES}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
    ramp = jnp.ones((), jnp.float32)
    if warmup_steps > 0:
        if step is None:
            raise ValueError(f"warmup_steps={warmup_steps} needs the current step; pass step=")
        ramp = jnp.minimum(1.0, to_float(step) / warmup_steps)
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0: InfoNCE on the whole vectors)")
    penalty_fn = overuse_penalty if penalty == "overuse" else flops_penalty
    scored_img, scored_txt = (sparsify(s, top_k=top_k) for s in (s_img, s_txt)) if top_k else (s_img, s_txt)
    contrastive = info_nce(scored_img, scored_txt, logit_scale)
    penalty_img = penalty_fn(s_img)
    penalty_txt = penalty_fn(s_txt)
    weight_img = lambda_img * ramp
    weight_txt = lambda_txt * ramp
    loss = contrastive + weight_img * penalty_img + weight_txt * penalty_txt
    metrics = {
        "loss": loss,
        "info_nce": contrastive,
        "penalty_img": penalty_img,
        "penalty_txt": penalty_txt,
        "lambda_img": weight_img,
        "lambda_txt": weight_txt,
        "active_words_img": jnp.mean(active_words(sparsify(s_img)).astype(jnp.float32)),
        "active_words_txt": jnp.mean(active_words(sparsify(s_txt)).astype(jnp.float32)),
        "empty_img": jnp.sum(jnp.all(s_img == 0, axis=1), dtype=jnp.int32),
        "empty_txt": jnp.sum(jnp.all(s_txt == 0, axis=1), dtype=jnp.int32),
        "logit_scale": to_float(logit_scale),
    }
    if top_k:
        metrics["topk_words_img"] = jnp.mean(active_words(scored_img).astype(jnp.float32))
        metrics["topk_words_txt"] = jnp.mean(active_words(scored_txt).astype(jnp.float32))
    return loss, metrics
