"""The chunked, custom-VJP lexical max-pool equals the naive `[B,P,V]` form in values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from lexvla_jax import throughput
from lexvla_jax.models import lexical

# (batch, patches, dim, vocab, chunk_size): vocab not a multiple of the chunk; B=1 with vocab a multiple;
# P=1 with the chunk larger than the vocabulary.
SHAPES = [(3, 7, 16, 50, 16), (1, 5, 8, 32, 8), (2, 1, 8, 20, 64)]


def inputs(b, p, d, v, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((b, p, d)), dtype)
    codebook = jnp.asarray(rng.standard_normal((v, d)) / np.sqrt(d), dtype)
    probe = jnp.asarray(rng.standard_normal((b, v)), jnp.float32)
    return h, codebook, probe


naive = jax.jit(lexical.lexical_max_pool_naive)


def probed(pool, probe):
    """A random linear functional of the normalised image vector, as a function of (h, codebook)."""
    return lambda h, codebook: jnp.sum(probe * lexical.l2_normalize(pool(h, codebook)))


def grads(pool, h, codebook, probe):
    return jax.jit(jax.grad(probed(pool, probe), argnums=(0, 1)))(h, codebook)


def assert_close(actual, expected, rel):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * np.abs(expected).max())


@pytest.mark.parametrize("backward", ["matmul", "gather", "auto"])
@pytest.mark.parametrize("b,p,d,v,chunk", SHAPES)
def test_lean_max_pool_matches_naive_values_and_gradients(b, p, d, v, chunk, backward):
    h, codebook, probe = inputs(b, p, d, v)
    lean = functools.partial(lexical.lexical_max_pool, chunk_size=chunk, backward=backward)
    pooled = jax.jit(lean)(h, codebook)
    assert pooled.shape == (b, v) and pooled.dtype == jnp.float32
    assert_close(pooled, naive(h, codebook), 1e-6)
    expected = grads(lexical.lexical_max_pool_naive, h, codebook, probe)
    for got, want in zip(grads(lean, h, codebook, probe), expected, strict=True):
        assert got.shape == want.shape
        assert_close(got, want, 1e-5)


@pytest.mark.parametrize("backward", ["matmul", "gather"])
def test_lean_max_pool_bfloat16_inputs(backward):
    h, codebook, probe = inputs(4, 9, 32, 70, dtype=jnp.bfloat16, seed=1)
    lean = functools.partial(lexical.lexical_max_pool, chunk_size=32, backward=backward)
    pooled = jax.jit(lean)(h, codebook)
    assert pooled.dtype == jnp.float32
    # Reference: the naive form in float32 on the same (bf16-rounded) numbers.
    h32, codebook32 = h.astype(jnp.float32), codebook.astype(jnp.float32)
    assert_close(pooled, naive(h32, codebook32), 1e-5)
    lean_grads = grads(lean, h, codebook, probe)
    assert [g.dtype for g in lean_grads] == [jnp.bfloat16, jnp.bfloat16]
    for got, want in zip(lean_grads, grads(lexical.lexical_max_pool_naive, h32, codebook32, probe), strict=True):
        assert_close(got, want, 2e-2)


@pytest.mark.parametrize("backward", ["matmul", "gather"])
def test_tied_patches_get_the_whole_gradient_at_the_first_one(backward):
    h, codebook, probe = inputs(2, 4, 8, 30)
    h = h.at[:, 2].set(h[:, 0])  # patches 0 and 2 tie for every word
    lean = functools.partial(lexical.lexical_max_pool, chunk_size=8, backward=backward)
    dh_lean, dz_lean = grads(lean, h, codebook, probe)
    dh_naive, dz_naive = grads(lexical.lexical_max_pool_naive, h, codebook, probe)
    assert not np.asarray(dh_lean[:, 2]).any() and np.asarray(dh_naive[:, 2]).any()
    assert_close(dh_lean[:, 0] + dh_lean[:, 2], dh_naive[:, 0] + dh_naive[:, 2], 1e-5)
    assert_close(dz_lean, dz_naive, 1e-5)


def test_lean_backward_never_builds_a_batch_patch_vocab_array():
    b, p, d, v = 2, 3, 8, 40  # distinct sizes, so the shape pattern is unambiguous
    h, codebook, probe = inputs(b, p, d, v)

    def hlo(pool):
        return jax.jit(jax.grad(probed(pool, probe), argnums=(0, 1))).lower(h, codebook).compile().as_text()

    pattern = f"[{b},{p},{v}]"
    assert pattern in hlo(lexical.lexical_max_pool_naive)
    assert pattern not in hlo(functools.partial(lexical.lexical_max_pool, chunk_size=8))


@pytest.mark.parametrize("backward", ["matmul", "gather"])
def test_lean_max_pool_under_sharding_matches_single_device(backward):
    h, codebook, probe = inputs(8, 5, 16, 44)
    lean = functools.partial(lexical.lexical_max_pool, chunk_size=16, backward=backward)
    expected = grads(lean, h, codebook, probe)
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    place = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))
    # Batch over every data axis; the codebook's vocabulary split over `fsdp` as the parameter rules do.
    sharded = grads(lean, place(h, ("data", "fsdp")), place(codebook, "fsdp"), place(probe, ("data", "fsdp")))
    for got, want in zip(sharded, expected, strict=True):
        assert_close(got, want, 1e-6)


def test_backward_gathers_on_cpu_and_is_one_hot_matmuls_elsewhere():
    b, p, d, v, chunk = 2, 3, 8, 40, 16
    h, codebook, probe = inputs(b, p, d, v)
    lean = functools.partial(lexical.lexical_max_pool, chunk_size=chunk)
    jaxpr = jax.make_jaxpr(jax.grad(probed(lean, probe), argnums=(0, 1)))(h, codebook)
    forward = 2 * b * p * d * chunk * 3  # three chunks cover the 40 words
    routing = 2 * forward  # dH and dZ, each a [B,P,C] x [.,D] matmul per chunk
    assert throughput.matmul_flops(jaxpr, platform="tpu") == forward + routing
    assert throughput.matmul_flops(jaxpr, platform="gpu") == forward + routing
    assert throughput.matmul_flops(jaxpr, platform="cpu") == forward  # gathers and scatter-adds: no matmuls


def test_image_and_patch_lexical():
    h, codebook, _ = inputs(2, 5, 8, 26)

    @jax.jit
    def outputs(h, codebook):
        return (
            lexical.image_lexical(h, codebook, chunk_size=8),
            lexical.lexical_max_pool(h, codebook, chunk_size=8),
            lexical.patch_lexical(h, codebook, normalize=False),
            lexical.patch_lexical(h, codebook),
        )

    image, pooled, patches, unit_patches = (np.asarray(x) for x in outputs(h, codebook))
    np.testing.assert_allclose(np.linalg.norm(image, axis=-1), 1.0, rtol=1e-6)
    assert_close(image, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-6)
    assert patches.shape == (2, 5, 26) and patches.min() > 0
    assert_close(patches.max(axis=1), pooled, 1e-6)
    assert_close(unit_patches, patches / np.linalg.norm(patches, axis=-1, keepdims=True), 1e-6)


def test_elu1p_and_l2_normalize():
    x = jnp.array([-30.0, -1.0, 0.0, 2.0])
    value, slope = jax.jit(lambda x: (lexical.elu1p(x), jax.vmap(jax.grad(lexical.elu1p))(x)))(x)
    np.testing.assert_allclose(np.asarray(value), [np.exp(-30.0), np.exp(-1.0), 1.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(slope), [np.exp(-30.0), np.exp(-1.0), 1.0, 1.0], rtol=1e-6)
    zero = jnp.zeros((1, 4))
    value, grad = jax.jit(jax.value_and_grad(lambda z: jnp.sum(lexical.l2_normalize(z))))(zero)
    assert not np.asarray(value).any() and np.isfinite(np.asarray(grad)).all()


def test_bad_shapes_and_chunk_size_are_rejected():
    with pytest.raises(ValueError, match=r"\[B,P,D\] and a codebook \[V,D\]"):
        lexical.lexical_max_pool(jnp.ones((2, 3, 4)), jnp.ones((10, 5)))
    with pytest.raises(ValueError, match="chunk_size=0"):
        lexical.lexical_max_pool(jnp.ones((2, 3, 4)), jnp.ones((10, 4)), chunk_size=0)
    with pytest.raises(ValueError, match="backward='dense' unknown"):
        lexical.lexical_max_pool(jnp.ones((2, 3, 4)), jnp.ones((10, 4)), backward="dense")


def test_first_argmax_equals_jnp_argmax_with_ties():
    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, (4, 9, 11)), jnp.float32)  # many ties
    got = lexical._first_argmax(x, jnp.max(x, axis=1))
    np.testing.assert_array_equal(got, jnp.argmax(x, axis=1))


def test_cpu_forward_walks_the_batch_in_blocks_with_the_same_result(monkeypatch):
    assert lexical.cpu_score_blocks(32, 256, 1024) == 8  # reference shapes: 4 examples' scores (4 MiB) per block
    assert lexical.cpu_score_blocks(64, 64, 256) == 1  # the tiny config: the whole batch's scores fit
    h, codebook, probe = inputs(6, 7, 16, 50)
    pool = lambda: functools.partial(lexical.lexical_max_pool, chunk_size=16)  # a fresh function per trace
    one_piece = jax.jit(pool())(h, codebook), grads(pool(), h, codebook, probe)
    assert "platform_index" not in str(jax.make_jaxpr(pool())(h, codebook))
    monkeypatch.setattr(lexical, "CPU_SCORES_BLOCK_BYTES", 2 * 7 * 16 * 4)  # two examples per block
    assert lexical.cpu_score_blocks(6, 7, 16) == 3
    assert "platform_index" in str(jax.make_jaxpr(pool())(h, codebook))  # the CPU / other-platform switch
    blocked = jax.jit(pool())(h, codebook), grads(pool(), h, codebook, probe)
    for got, want in zip(jax.tree.leaves(blocked), jax.tree.leaves(one_piece), strict=True):
        np.testing.assert_array_equal(got, want)
