"""The image tower's lexical mapper: patch features → word activations → max over patches → L2-normalise.

For patch features `H [B,P,D]` and a visual codebook `Z [V,D]`, `s = normalize(max_p elu1p(H Zᵀ))`.
Written directly, `H Zᵀ` is a `[B,P,V]` array (B=64, P=256, V=17,149 is 1.1 GB in float32, and its
gradient as much again). `lexical_max_pool` never builds it: it walks the vocabulary in chunks, keeps
only each word's largest pre-activation and the patch it came from (`[B,V]` each), and its custom
backward pass sends each word's gradient to that one patch, again chunk by chunk. Peak memory is
`O(B·V + B·P·chunk)` plus the inputs and their gradients.

Ties between patches: the lean form picks the first patch with the largest value (as `jnp.argmax`) and
gives it the whole gradient; `lexical_max_pool_naive` (via `jnp.max`'s derivative) splits the gradient
equally among tied patches. Values agree either way; gradients agree when there are no ties.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 1024


def elu1p(x: jax.Array) -> jax.Array:
    """`elu(x) + 1`: positive, increasing, linear above 0.

    Computed as `x + 1` for `x > 0` and `exp(x)` otherwise: the same function, but `elu(x) + 1` rounds to
    exactly 0 in float32 below x ≈ -17, while `exp(x)` stays positive and distinct down to x ≈ -87.
    """
    positive = x > 0
    return jnp.where(positive, x + 1, jnp.exp(jnp.where(positive, 0, x)))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """`x / ‖x‖` along `axis`; the squared norm is floored at `eps` so zero vectors stay finite."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def _check(h: jax.Array, codebook: jax.Array) -> None:
    if h.ndim != 3 or codebook.ndim != 2 or h.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"expected patch features [B,P,D] and a codebook [V,D], got {h.shape} and {codebook.shape}")


def patch_logits(h: jax.Array, codebook: jax.Array) -> jax.Array:
    """Every patch's pre-activation word scores `H Zᵀ` → `[B,P,V]` float32."""
    _check(h, codebook)
    return jnp.einsum("bpd,vd->bpv", h, codebook, preferred_element_type=jnp.float32)


def patch_lexical(h: jax.Array, codebook: jax.Array, *, normalize: bool = True) -> jax.Array:
    """Per-patch lexical vectors `elu1p(H Zᵀ)` → `[B,P,V]` float32 (L2-normalised over V by default).

    This is the unpooled map PatchDis classifies patch by patch; it is `[B,P,V]` by nature.
    """
    s = elu1p(patch_logits(h, codebook))
    return l2_normalize(s) if normalize else s


def lexical_max_pool_naive(h: jax.Array, codebook: jax.Array) -> jax.Array:
    """Reference `max_p elu1p(H Zᵀ)` → `[B,V]` float32, materialising `[B,P,V]` (tests and benchmarks)."""
    return jnp.max(elu1p(patch_logits(h, codebook)), axis=1)


def _vocab_chunks(codebook: jax.Array, chunk_size: int) -> jax.Array:
    """`[V,D]` → `[V'/C, C, D]`, zero-padded to `V' = ceil(V/C)·C` rows."""
    vocab, dim = codebook.shape
    num_chunks = -(-vocab // chunk_size)
    padded = jnp.pad(codebook, ((0, num_chunks * chunk_size - vocab), (0, 0)))
    return padded.reshape(num_chunks, chunk_size, dim)


def _per_chunk(x: jax.Array, chunk_size: int) -> jax.Array:
    """`[B,V]` → `[V'/C, B, C]`, zero-padded like `_vocab_chunks`."""
    batch, vocab = x.shape
    num_chunks = -(-vocab // chunk_size)
    x = jnp.pad(x, ((0, 0), (0, num_chunks * chunk_size - vocab)))
    return jnp.moveaxis(x.reshape(batch, num_chunks, chunk_size), 1, 0)


def _max_logits(h: jax.Array, codebook: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """`max_p` and `argmax_p` (first on ties) of `H Zᵀ`, one vocabulary chunk at a time → `[B,V]` each."""
    batch, vocab = h.shape[0], codebook.shape[0]

    def one_chunk(z):
        x = jnp.einsum("bpd,cd->bpc", h, z, preferred_element_type=jnp.float32)
        return jnp.max(x, axis=1), jnp.argmax(x, axis=1).astype(jnp.int32)

    maxima, argmaxes = jax.lax.map(one_chunk, _vocab_chunks(codebook, chunk_size))  # [V'/C, B, C]
    unchunk = lambda y: jnp.moveaxis(y, 0, 1).reshape(batch, -1)[:, :vocab]
    return unchunk(maxima), unchunk(argmaxes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lean_max_pool(h: jax.Array, codebook: jax.Array, chunk_size: int) -> jax.Array:
    return elu1p(_max_logits(h, codebook, chunk_size)[0])


def _lean_max_pool_fwd(h, codebook, chunk_size):
    maxima, argmaxes = _max_logits(h, codebook, chunk_size)
    return elu1p(maxima), (h, codebook, maxima, argmaxes)


def _lean_max_pool_bwd(chunk_size, residuals, grad):
    """dH[b,p] = Σ_j w[b,j]·[p = a_bj]·Z[j] and dZ[j] = Σ_b w[b,j]·H[b,a_bj], with w = g·elu1p'(max).

    Per chunk, the one-hot-weighted `[B,P,C]` matrix `w[b,j]·[p = a_bj]` turns both sums into matmuls.
    """
    h, codebook, maxima, argmaxes = residuals
    vocab, dim = codebook.shape
    slope = jnp.where(maxima > 0, 1.0, elu1p(maxima))  # elu1p'(x): 1 above 0, exp(x) = elu1p(x) below
    weights = grad.astype(jnp.float32) * slope
    patches = jnp.arange(h.shape[1], dtype=jnp.int32)

    def one_chunk(dh, chunk):
        z, w, a = chunk  # [C,D], [B,C], [B,C]
        routed = jnp.where(a[:, None, :] == patches[None, :, None], w[:, None, :], 0.0).astype(h.dtype)
        dz = jnp.einsum("bpc,bpd->cd", routed, h, preferred_element_type=jnp.float32)
        dh = dh + jnp.einsum("bpc,cd->bpd", routed, z, preferred_element_type=jnp.float32)
        return dh, dz.astype(codebook.dtype)

    chunks = (_vocab_chunks(codebook, chunk_size), _per_chunk(weights, chunk_size), _per_chunk(argmaxes, chunk_size))
    dh, dz = jax.lax.scan(one_chunk, jnp.zeros(h.shape, jnp.float32), chunks)
    return dh.astype(h.dtype), dz.reshape(-1, dim)[:vocab]


_lean_max_pool.defvjp(_lean_max_pool_fwd, _lean_max_pool_bwd)


def lexical_max_pool(h: jax.Array, codebook: jax.Array, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """`max_p elu1p(H Zᵀ)` → `[B,V]` float32 (before normalisation), without a `[B,P,V]` array.

    h: patch features `[B,P,D]`; codebook: `[V,D]`; bfloat16 inputs are multiplied with float32
    accumulation. The vocabulary is processed `chunk_size` words at a time (padded to a multiple of it);
    the backward pass is a custom VJP routing each word's gradient to its arg-max patch.
    """
    _check(h, codebook)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of vocabulary words")
    return _lean_max_pool(h, codebook, min(chunk_size, codebook.shape[0]))


def image_lexical(h: jax.Array, codebook: jax.Array, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """The image's lexical vector `normalize(max_p elu1p(H Zᵀ))` → `[B,V]` float32."""
    return l2_normalize(lexical_max_pool(h, codebook, chunk_size=chunk_size))
