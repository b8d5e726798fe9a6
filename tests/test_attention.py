"""`layers.dot_product_attention` against attention written out in NumPy; which implementation runs where."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lexvla_jax.models import layers


def reference(q, k, v, allowed):
    """Softmax attention in float64; `allowed` is `[B,T,S]`. A row with nothing allowed averages all of `v`."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    allowed = np.broadcast_to(allowed[:, None], scores.shape)
    scores = np.where(allowed, scores, 0.0)
    weights = np.where(allowed, np.exp(scores - scores.max(-1, keepdims=True)), 0.0)
    empty = ~allowed.any(-1, keepdims=True)
    weights = np.where(empty, 1.0, weights)
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", weights, v)


def inputs(heads=4, kv_heads=4, t=7, b=3, d=8, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    shapes = ((b, t, heads, d), (b, t, kv_heads, d), (b, t, kv_heads, d))
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in shapes)


# Row 0 unpadded, row 1 right-padded (2 pads), row 2 left-padded (3 pads).
PADDING = np.array([[1] * 7, [1] * 5 + [0] * 2, [0] * 3 + [1] * 4], bool)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # multi-head, grouped-query, multi-query
def test_bidirectional_matches_reference(kv_heads):
    q, k, v = inputs(kv_heads=kv_heads)
    out = layers.dot_product_attention(q, k, v)
    np.testing.assert_allclose(out, reference(q, k, v, np.ones((3, 7, 7), bool)), atol=2e-6)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_causal_with_left_and_right_padding_matches_reference(kv_heads):
    q, k, v = inputs(kv_heads=kv_heads)
    allowed = np.tril(np.ones((7, 7), bool))[None] & PADDING[:, None, :]
    out = layers.dot_product_attention(q, k, v, jnp.asarray(PADDING)[:, None, None, :], is_causal=True)
    np.testing.assert_allclose(out, reference(q, k, v, allowed), atol=2e-6)
    # Left padding: the first three queries of row 2 may attend to nothing and get the mean of v.
    np.testing.assert_allclose(out[2, 0], np.repeat(np.asarray(v[2]).mean(0), 4 // kv_heads, axis=0), atol=2e-6)


def test_full_mask_equals_causal_flag():
    q, k, v = inputs()
    causal = jnp.tril(jnp.ones((7, 7), bool))[None, None]
    np.testing.assert_array_equal(
        layers.dot_product_attention(q, k, v, causal), layers.dot_product_attention(q, k, v, is_causal=True)
    )


def test_bfloat16_inputs_keep_float32_softmax():
    q, k, v = inputs(dtype=jnp.bfloat16, t=64)
    out = layers.dot_product_attention(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), reference(q, k, v, np.ones((3, 64, 64), bool)), atol=2e-2)


def test_gradients_match_reference_formulation():
    q, k, v = inputs(kv_heads=2)
    pad = jnp.asarray(PADDING)[:, None, None, :]

    def by_einsum(q, k, v):
        k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(8.0)
        allowed = jnp.tril(jnp.ones((7, 7), bool))[None, None] & pad
        probs = jax.nn.softmax(jnp.where(allowed, scores, -1e30), axis=-1)
        return jnp.einsum("bhts,bshd->bthd", probs, v)

    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)) * PADDING[:, :, None, None])
    grad = lambda f: jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))
    ours = grad(lambda *a: layers.dot_product_attention(*a, pad, is_causal=True))(q, k, v)
    theirs = grad(by_einsum)(q, k, v)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_cpu_uses_xla():
    q = jax.ShapeDtypeStruct((2, 8, 4, 64), jnp.bfloat16)
    assert layers.attention_implementation(q, q, has_mask=False) == "xla"


@pytest.mark.parametrize(
    ("dtype", "head", "length", "has_mask", "expected"),
    [
        (jnp.bfloat16, 64, 257, False, "cudnn"),  # DINOv2 ViT-L/14 at 224 px: odd length, no mask
        (jnp.bfloat16, 128, 96, True, "cudnn"),  # Llama 2 with a padding mask, even length
        (jnp.float16, 64, 8, True, "cudnn"),
        (jnp.bfloat16, 128, 97, True, "xla"),  # a mask becomes a bias, which needs even lengths
        (jnp.float32, 64, 8, False, "xla"),  # float32: cuDNN flash attention is 16-bit only
        (jnp.bfloat16, 256, 8, False, "xla"),  # head size over 128
        (jnp.bfloat16, 60, 8, False, "xla"),  # head size not a multiple of 8
    ],
)
def test_cudnn_chosen_only_where_it_applies(monkeypatch, dtype, head, length, has_mask, expected):
    monkeypatch.setattr(layers, "_on_cuda", lambda: True)
    q = jax.ShapeDtypeStruct((2, length, 4, head), dtype)
    assert layers.attention_implementation(q, q, has_mask=has_mask) == expected


def test_large_cpu_attention_is_split_into_batch_blocks(monkeypatch):
    q = jax.ShapeDtypeStruct((32, 257, 6, 64), jnp.float32)  # DINOv2 ViT-S/14 at 224 px: 1.6 MB of scores each
    assert layers.cpu_attention_blocks(q, q) == 16
    small = jax.ShapeDtypeStruct((32, 64, 8, 64), jnp.float32)  # the whole batch's scores fit in 4 MiB
    assert layers.cpu_attention_blocks(small, small) == 1
    monkeypatch.setattr(layers, "CPU_SCORES_BLOCK_BYTES", 2 * 4 * 7 * 7 * 4)  # two examples of `inputs` per block
    assert layers.cpu_attention_blocks(*inputs(t=7, b=6)[:2]) == 3
    assert layers.cpu_attention_blocks(*inputs(t=7, b=3)[:2]) == 3  # 3 has no divisor giving blocks of 2


def test_blocked_attention_matches_one_piece_in_values_and_gradients(monkeypatch):
    q, k, v = inputs(kv_heads=2, b=6)
    pad = jnp.asarray(np.concatenate([PADDING, PADDING[::-1]]))[:, None, None, :]
    # A fresh function per trace: the block size is read when tracing, and traces are cached per function.
    loss = lambda: lambda *a: jnp.sum(jnp.sin(layers.dot_product_attention(*a, pad, is_causal=True)))
    one_piece = jax.jit(jax.value_and_grad(loss(), argnums=(0, 1, 2)))(q, k, v)
    assert "while" not in jax.jit(loss()).lower(q, k, v).as_text()
    monkeypatch.setattr(layers, "CPU_SCORES_BLOCK_BYTES", 2 * 4 * 7 * 7 * 4)
    blocked = jax.jit(jax.value_and_grad(loss(), argnums=(0, 1, 2)))(q, k, v)
    assert "while" in jax.jit(loss()).lower(q, k, v).as_text()  # the CPU branch loops over the 3 blocks
    for a, b in zip(jax.tree.leaves(blocked), jax.tree.leaves(one_piece), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)  # the loss sums in another order


@pytest.mark.parametrize(("platform", "blocked"), [("cpu", True), ("cuda", False), ("rocm", False), ("tpu", False)])
def test_blocked_path_is_compiled_for_cpu_only(monkeypatch, platform, blocked):
    """Lowered for each platform (no such device needed): only CPU gets the loop over batch blocks; GPUs and TPUs get
    `jax.nn.dot_product_attention` in one piece (on NVIDIA GPUs with bf16 inputs, cuDNN: see the test above)."""
    from jax import export

    monkeypatch.setattr(layers, "CPU_SCORES_BLOCK_BYTES", 2 * 4 * 7 * 7 * 4)  # 3 blocks of 2 examples
    q, k, v = inputs(b=6)
    pad = jnp.ones((6, 1, 1, 7), bool)
    attend = jax.jit(lambda q, k, v: layers.dot_product_attention(q, k, v, pad, is_causal=True))
    module = export.export(attend, platforms=(platform,))(q, k, v).mlir_module()
    assert ("stablehlo.while" in module) == blocked
