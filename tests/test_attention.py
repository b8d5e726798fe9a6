"""Attention computed in batch blocks on CPU equals attention in one piece, in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lexvla_jax.models import layers


def qkv_mask(b=6, t=5, h=4, kv=4, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, t, kv, d)), jnp.float32) for _ in range(2))
    lengths = rng.integers(1, t + 1, size=(b,))
    padding = jnp.arange(t)[None, None, None] < lengths[:, None, None, None]
    return q, k, v, jnp.tril(jnp.ones((t, t), bool))[None, None] & padding


def value_and_grads(attention, q, k, v, mask):
    probe = jax.random.normal(jax.random.key(1), q.shape)
    loss = lambda q, k, v: jnp.sum(probe * attention(q, k, v, mask))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("kv,with_mask,blocks", [(4, True, 2), (4, False, 3), (2, True, 6)])
def test_blocked_attention_matches_one_piece(kv, with_mask, blocks):
    q, k, v, mask = qkv_mask(kv=kv)
    mask = mask if with_mask else None
    blocked = lambda q, k, v, m: layers.blocked_attention(q, k, v, m, blocks=blocks)
    value, grads = value_and_grads(blocked, q, k, v, mask)
    expected, expected_grads = value_and_grads(layers._attention, q, k, v, mask)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_cpu_takes_blocks_only_when_the_scores_are_large(monkeypatch):
    q, k, v, mask = qkv_mask()  # scores: 4 heads x 5 x 5 x 4 bytes = 400 bytes per example
    jaxpr = lambda: str(jax.make_jaxpr(lambda *a: layers.dot_product_attention(*a))(q, k, v, mask))  # no cache
    assert "platform_index" not in jaxpr()  # the default 4 MiB holds the whole batch
    attend = lambda: jax.jit(lambda *a: layers.dot_product_attention(*a))(q, k, v, mask)
    expected = attend()
    monkeypatch.setattr(layers, "CPU_SCORES_BLOCK_BYTES", 800)  # two examples per block: three blocks
    assert "platform_index" in jaxpr() and "length=3" in jaxpr()
    np.testing.assert_allclose(attend(), expected, rtol=1e-5)
