"""The image tower's lexical mapper: patch features → word activations → max over patches → L2-normalise.

For patch features `H [B,P,D]` and a visual codebook `Z [V,D]`, `s = normalize(max_p elu1p(H Zᵀ))`.
Written directly, `H Zᵀ` is a `[B,P,V]` array (B=64, P=256, V=17,149 is 1.1 GB in float32; its forward
and backward need several such buffers, see `benchmarks/maxpool_memory.py`). `lexical_max_pool` never
builds it: it walks the vocabulary in chunks, keeps only each word's largest pre-activation and the patch
it came from (`[B,V]` each; on CPUs a chunk's batch is walked a few examples at a time so their scores stay in
cache), and its custom backward pass sends each word's gradient to that one patch,
again chunk by chunk. Peak memory is `O(B·V + B·P·chunk)` plus the inputs and their gradients.

The backward pass has two forms with equal results. On accelerators it is two one-hot matmuls per
chunk (`2·B·P·C·D` FLOPs each, dense and batch-parallel); on CPUs it walks the batch, gathering each
word's arg-max patch row and scatter-adding into it (`O(B·C·D)`, a factor P less work), several times faster.

Ties between patches: the lean form picks the first patch with the largest value (as `jnp.argmax`) and
gives it the whole gradient; `lexical_max_pool_naive` (via `jnp.max`'s derivative) splits the gradient
equally among tied patches. Values agree either way; gradients agree when there are no ties.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 1024
BACKWARDS = ("auto", "matmul", "gather")


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


def _chunk_start(i: jax.Array, vocab: int, chunk_size: int) -> jax.Array:
    """First word of chunk i. Chunks tile the vocabulary; the last is moved back to end at word V,
    overlapping its predecessor, so every chunk is a full `chunk_size` slice of the unpadded codebook."""
    return jnp.minimum(i * chunk_size, vocab - chunk_size)


def _first_argmax(x: jax.Array, top: jax.Array) -> jax.Array:
    """`argmax` over axis 1 of `x [B,P,C]` (first on ties) given its max `top [B,C]`, as a plain min-reduction.

    Same result as `jnp.argmax` for finite scores (a NaN column gives the last patch), without the (value, index)
    pair reduction that XLA:CPU does not vectorise.
    """
    patches = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.min(jnp.where(x == top[:, None], patches, x.shape[1] - 1), axis=1)


# On CPU, each vocabulary chunk's scores are made a few examples at a time, at most this many bytes of them.
CPU_SCORES_BLOCK_BYTES = 4 * 2**20


def _chunk_max(h: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`max_p` and first `argmax_p` of `H zᵀ` for one chunk `z [C,D]` → `[B,C]` each."""
    x = jnp.einsum("bpd,cd->bpc", h, z, preferred_element_type=jnp.float32)
    top = jnp.max(x, axis=1)
    return top, _first_argmax(x, top)


def _chunk_max_in_blocks(blocks: int, h: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`_chunk_max` over `blocks` strided blocks of the batch (examples i, i + blocks, ...), one after another:
    each block's `[b,P,C]` scores stay in cache between the matmul and the reductions."""
    split = h.reshape(h.shape[0] // blocks, blocks, *h.shape[1:]).swapaxes(0, 1)
    merge = lambda x: x.swapaxes(0, 1).reshape(h.shape[0], *x.shape[2:])
    top, arg = jax.lax.map(lambda hb: _chunk_max(hb, z), split)
    return merge(top), merge(arg)


def cpu_score_blocks(batch: int, patches: int, chunk_size: int) -> int:
    """Into how many strided batch blocks the CPU forward splits each chunk: the fewest whose float32 scores fit in
    `CPU_SCORES_BLOCK_BYTES` (1 when the whole batch's do)."""
    per_block = max(1, CPU_SCORES_BLOCK_BYTES // (patches * chunk_size * 4))
    if per_block >= batch:
        return 1
    return next(n for n in range(2, batch + 1) if batch % n == 0 and batch // n <= per_block)


def _max_logits(h: jax.Array, codebook: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """`max_p` and `argmax_p` (first on ties) of `H Zᵀ`, one vocabulary chunk at a time → `[B,V]` each.

    On CPU a chunk's batch is walked in blocks (`cpu_score_blocks`); elsewhere it is one matmul.
    """
    batch, vocab = h.shape[0], codebook.shape[0]
    blocks = cpu_score_blocks(batch, h.shape[1], chunk_size)
    if blocks == 1:
        chunk_max = _chunk_max
    else:
        cpu = functools.partial(_chunk_max_in_blocks, blocks)
        chunk_max = lambda h, z: jax.lax.platform_dependent(h, z, cpu=cpu, default=_chunk_max)

    def one_chunk(i, carry):
        maxima, argmaxes = carry
        start = _chunk_start(i, vocab, chunk_size)
        top, arg = chunk_max(h, jax.lax.dynamic_slice_in_dim(codebook, start, chunk_size))
        maxima = jax.lax.dynamic_update_slice_in_dim(maxima, top, start, axis=1)
        argmaxes = jax.lax.dynamic_update_slice_in_dim(argmaxes, arg, start, axis=1)
        return maxima, argmaxes

    init = (jnp.zeros((batch, vocab), jnp.float32), jnp.zeros((batch, vocab), jnp.int32))
    return jax.lax.fori_loop(0, -(-vocab // chunk_size), one_chunk, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _lean_max_pool(h: jax.Array, codebook: jax.Array, chunk_size: int, backward: str) -> jax.Array:
    return elu1p(_max_logits(h, codebook, chunk_size)[0])


def _lean_max_pool_fwd(h, codebook, chunk_size, backward):
    maxima, argmaxes = _max_logits(h, codebook, chunk_size)
    return elu1p(maxima), (h, codebook, maxima, argmaxes)


def _route_by_matmul(dh, h, z, w, a):
    """One chunk's gradients as two matmuls with the one-hot-weighted `[B,P,C]` matrix `w[b,j]·[p = a_bj]`.

    `2·B·P·C·D` FLOPs each, but dense and batch-parallel: what TPUs and GPUs run fastest.
    """
    patches = jnp.arange(h.shape[1], dtype=jnp.int32)
    routed = jnp.where(a[:, None, :] == patches[None, :, None], w[:, None, :], 0.0).astype(h.dtype)
    dz = jnp.einsum("bpc,bpd->cd", routed, h, preferred_element_type=jnp.float32)
    return dh + jnp.einsum("bpc,cd->bpd", routed, z, preferred_element_type=jnp.float32), dz


def _route_by_gather(dh, h, z, w, a):
    """One chunk's gradients one example at a time: gather each word's arg-max patch row, scatter-add into it.

    `O(B·C·D)` work instead of `O(B·P·C·D)`, and per example only `[C,D]` and `[P,D]` blocks are touched,
    which stay in cache: far faster on CPUs. A loop over the batch, so not for accelerators.
    """
    z = z.astype(jnp.float32)

    def one_example(b, carry):
        dh, dz = carry
        a_b, w_b = a[b], w[b][:, None]  # [C], [C,1]
        dz = dz + w_b * h[b][a_b].astype(jnp.float32)
        return dh.at[b].set(dh[b].at[a_b].add(w_b * z)), dz

    return jax.lax.fori_loop(0, h.shape[0], one_example, (dh, jnp.zeros(z.shape, jnp.float32)))


def _backward(route, chunk_size, h, codebook, weights, argmaxes):
    """dH and dZ, the vocabulary walked `chunk_size` words at a time, each chunk's gradients from `route`.

    dZ rows are complete within their chunk and written in place; dH accumulates in float32. Words the
    overlapping last chunk shares with its predecessor are masked out so they count once.
    """
    vocab = codebook.shape[0]

    def one_chunk(i, carry):
        dh, dz = carry
        start = _chunk_start(i, vocab, chunk_size)
        z = jax.lax.dynamic_slice_in_dim(codebook, start, chunk_size)
        w = jax.lax.dynamic_slice_in_dim(weights, start, chunk_size, axis=1)  # [B,C]
        a = jax.lax.dynamic_slice_in_dim(argmaxes, start, chunk_size, axis=1)  # [B,C]
        new = start + jnp.arange(chunk_size) >= i * chunk_size  # words no earlier chunk handled
        dh, dz_chunk = route(dh, h, z, jnp.where(new, w, 0.0), a)
        kept = jax.lax.dynamic_slice_in_dim(dz, start, chunk_size)
        dz_chunk = jnp.where(new[:, None], dz_chunk.astype(dz.dtype), kept)
        return dh, jax.lax.dynamic_update_slice_in_dim(dz, dz_chunk, start, axis=0)

    init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros_like(codebook))
    dh, dz = jax.lax.fori_loop(0, -(-vocab // chunk_size), one_chunk, init)
    return dh.astype(h.dtype), dz


def _lean_max_pool_bwd(chunk_size, backward, residuals, grad):
    """dH[b,p] = Σ_j w[b,j]·[p = a_bj]·Z[j] and dZ[j] = Σ_b w[b,j]·H[b,a_bj], with w = g·elu1p'(max)."""
    h, codebook, maxima, argmaxes = residuals
    slope = jnp.where(maxima > 0, 1.0, elu1p(maxima))  # elu1p'(x): 1 above 0, exp(x) = elu1p(x) below
    weights = grad.astype(jnp.float32) * slope
    by_matmul = functools.partial(_backward, _route_by_matmul, chunk_size)
    by_gather = functools.partial(_backward, _route_by_gather, chunk_size)
    args = (h, codebook, weights, argmaxes)
    if backward == "matmul":
        return by_matmul(*args)
    if backward == "gather":
        return by_gather(*args)
    return jax.lax.platform_dependent(*args, cpu=by_gather, default=by_matmul)


_lean_max_pool.defvjp(_lean_max_pool_fwd, _lean_max_pool_bwd)


def lexical_max_pool(
    h: jax.Array, codebook: jax.Array, *, chunk_size: int = DEFAULT_CHUNK_SIZE, backward: str = "auto"
) -> jax.Array:
    """`max_p elu1p(H Zᵀ)` → `[B,V]` float32 (before normalisation), without a `[B,P,V]` array.

    h: patch features `[B,P,D]`; codebook: `[V,D]`; bfloat16 inputs are multiplied with float32
    accumulation. The vocabulary is processed `chunk_size` words at a time (the last chunk overlaps its
    predecessor when V is not a multiple of it); the backward pass is a custom VJP that routes each
    word's gradient to its arg-max patch, by one-hot matmuls (`backward="matmul"`) or by gathering and
    scatter-adding patch rows (`"gather"`); `"auto"` takes gathers on CPU and matmuls elsewhere.
    """
    _check(h, codebook)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of vocabulary words")
    if backward not in BACKWARDS:
        raise ValueError(f"backward={backward!r} unknown; choose one of {BACKWARDS}")
    return _lean_max_pool(h, codebook, min(chunk_size, codebook.shape[0]), backward)


def image_lexical(
    h: jax.Array, codebook: jax.Array, *, chunk_size: int = DEFAULT_CHUNK_SIZE, backward: str = "auto"
) -> jax.Array:
    """The image's lexical vector `normalize(max_p elu1p(H Zᵀ))` → `[B,V]` float32."""
    return l2_normalize(lexical_max_pool(h, codebook, chunk_size=chunk_size, backward=backward))
