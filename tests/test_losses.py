"""Losses and retrieval metrics against float64 NumPy written from the formulas; sharded == unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from jax.test_util import check_grads

from lexvla_jax import losses
from lexvla_jax.evaluate.metrics import recall_at_k, retrieval_metrics

# ---------------------------------------------------------------- NumPy references (float64)


def np_logsumexp(x, axis):
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def np_info_nce(s_img, s_txt, scale):
    logits = scale * s_img @ s_txt.T
    diag = np.diag(logits)
    return 0.5 * (np.mean(np_logsumexp(logits, 1) - diag) + np.mean(np_logsumexp(logits, 0) - diag))


def np_overuse(s):
    """The poster's first form: V · Σ_j (s̄_j / Σ_k s̄_k) · s̄_j²."""
    mean = s.mean(axis=0)
    if mean.sum() == 0:
        return 0.0
    return s.shape[1] * np.sum(mean / mean.sum() * mean**2)


def np_overuse_second_form(s):
    """The poster's second form: N·V · Σ_j (Σ_i s_ij / N)³ / Σ_j Σ_i s_ij."""
    n, v = s.shape
    return n * v * np.sum((s.sum(axis=0) / n) ** 3) / s.sum()


def np_flops(s):
    return np.sum(s.mean(axis=0) ** 2)


def np_recall(sim, k, is_positive):
    """Brute force: stable sort by descending similarity (lower index first on ties)."""
    hits = []
    for q in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda d: (-sim[q, d], d))
        hits.append(any(is_positive(q, d) for d in order[:k]))
    return float(np.mean(hits))


def lexical(rng, n, v, zero_columns=()):
    s = rng.random((n, v)) * (rng.random((n, v)) < 0.4)
    s[:, list(zero_columns)] = 0.0
    return s


def edge_inputs():
    rng = np.random.default_rng(0)
    one_word = np.zeros((4, 9))
    one_word[:, 3] = rng.random(4) + 0.1
    return {
        "random": lexical(rng, 6, 11),
        "zero_columns": lexical(rng, 5, 13, zero_columns=(0, 4, 12)),
        "one_active_word": one_word,
        "single_row": lexical(rng, 1, 7) + 0.01,
    }


EDGES = edge_inputs()


# ---------------------------------------------------------------- penalties


@pytest.mark.parametrize("name", sorted(EDGES))
@pytest.mark.parametrize("penalty,reference", [("overuse", np_overuse), ("flops", np_flops)])
def test_penalty_matches_numpy_and_gradients_check(name, penalty, reference):
    s = EDGES[name]
    fn = jax.jit(getattr(losses, f"{penalty}_penalty"))
    np.testing.assert_allclose(float(fn(jnp.asarray(s, jnp.float32))), reference(s), rtol=1e-5, atol=1e-7)
    with jax.enable_x64(True):
        s64 = jnp.asarray(s, jnp.float64)
        np.testing.assert_allclose(float(fn(s64)), reference(s), rtol=1e-12)
        check_grads(fn, (s64,), order=1, modes=["rev"])
        assert np.isfinite(np.asarray(jax.grad(fn)(s64))).all()


@pytest.mark.parametrize("fn", [losses.overuse_penalty, losses.flops_penalty])
def test_penalties_are_zero_with_finite_zero_gradient_on_all_zero_input(fn):
    s = jnp.zeros((4, 10))
    value, grad = jax.value_and_grad(fn)(s)
    assert float(value) == 0.0
    assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad).any()


def test_overuse_poster_forms_agree():
    rng = np.random.default_rng(1)
    for n, v in [(1, 5), (8, 37), (32, 200)]:
        s = lexical(rng, n, v) + 1e-3
        np.testing.assert_allclose(np_overuse(s), np_overuse_second_form(s), rtol=1e-12)
        np.testing.assert_allclose(float(losses.overuse_penalty(jnp.asarray(s))), np_overuse_second_form(s), rtol=1e-5)


def test_overuse_penalises_shared_words_more_than_flops_does():
    # Same FLOPs-style mass, but one word fires for every row: overuse grows by the word's share.
    spread = np.eye(4)
    shared = np.zeros((4, 4))
    shared[:, 0] = 0.5
    assert np_flops(spread) == pytest.approx(np_flops(shared))
    assert float(losses.overuse_penalty(jnp.asarray(shared))) > 3 * float(losses.overuse_penalty(jnp.asarray(spread)))


# ---------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize("n,v", [(1, 5), (6, 11), (16, 40)])
def test_info_nce_matches_numpy_and_gradients_check(n, v):
    rng = np.random.default_rng(n)
    s_img, s_txt = lexical(rng, n, v), lexical(rng, n, v)
    expected = np_info_nce(s_img, s_txt, 7.0)
    info_nce = jax.jit(losses.info_nce)
    np.testing.assert_allclose(
        float(info_nce(jnp.asarray(s_img, jnp.float32), jnp.asarray(s_txt, jnp.float32), 7.0)),
        expected,
        rtol=1e-5,
        atol=1e-6,
    )
    with jax.enable_x64(True):
        args = (jnp.asarray(s_img), jnp.asarray(s_txt), jnp.asarray(7.0))
        np.testing.assert_allclose(float(info_nce(*args)), expected, rtol=1e-12)
        check_grads(info_nce, args, order=1, modes=["rev"])


def test_info_nce_logits_are_float32_for_bfloat16_inputs():
    rng = np.random.default_rng(2)
    s_img, s_txt = (jnp.asarray(lexical(rng, 5, 9), jnp.bfloat16) for _ in range(2))
    loss = jax.jit(losses.info_nce)(s_img, s_txt, 10.0)
    expected = np_info_nce(np.asarray(s_img, np.float64), np.asarray(s_txt, np.float64), 10.0)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_info_nce_rejects_unpaired_batches():
    with pytest.raises(ValueError, match="paired rows"):
        losses.info_nce(jnp.ones((3, 4)), jnp.ones((2, 4)), 1.0)


# ---------------------------------------------------------------- sparsification


def test_sparsify_default_threshold_is_one_over_sqrt_v():
    rng = np.random.default_rng(3)
    s = rng.random((5, 16)) * 0.5  # threshold 0.25
    kept = np.asarray(losses.sparsify(jnp.asarray(s)))
    np.testing.assert_array_equal(kept, np.where(s >= 0.25, s, 0.0).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(losses.active_words(kept)), (s >= 0.25).sum(1))


def test_sparsify_explicit_threshold_and_top_k_with_ties():
    s = np.array([[0.1, 0.5, 0.5, 0.2, 0.5], [0.0, 0.3, 0.0, 0.9, 0.0]], np.float32)
    np.testing.assert_array_equal(
        np.asarray(losses.sparsify(jnp.asarray(s), threshold=0.3)), np.where(s >= 0.3, s, 0.0)
    )
    top2 = np.asarray(losses.sparsify(jnp.asarray(s), top_k=2))
    # Ties go to the lower word index: of the three 0.5s in row 0, words 1 and 2 are kept.
    np.testing.assert_array_equal(top2, np.array([[0, 0.5, 0.5, 0, 0], [0, 0.3, 0, 0.9, 0]], np.float32))
    np.testing.assert_array_equal(np.asarray(losses.active_words(top2)), [2, 2])
    batched = np.asarray(losses.sparsify(jnp.asarray(np.stack([s, s[::-1]])), top_k=2))
    np.testing.assert_array_equal(batched[0], top2)


def test_sparsify_rejects_bad_arguments():
    with pytest.raises(ValueError, match="not both"):
        losses.sparsify(jnp.ones((2, 4)), threshold=0.1, top_k=2)
    with pytest.raises(ValueError, match="top_k=5"):
        losses.sparsify(jnp.ones((2, 4)), top_k=5)


# ---------------------------------------------------------------- retrieval


def tied_embeddings(rng, images, captions_per_image, v=6):
    """Small-integer vectors, so similarities tie often."""
    s_img = rng.integers(0, 2, (images, v)).astype(np.float32)
    s_txt = rng.integers(0, 2, (images * captions_per_image, v)).astype(np.float32)
    return s_img, s_txt


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_metrics_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    s_img, s_txt = tied_embeddings(rng, 12, 5)
    image_of_text = np.arange(60) // 5
    sim = s_img @ s_txt.T
    assert len(np.unique(sim)) < sim.size // 4  # many ties
    metrics = retrieval_metrics(jnp.asarray(s_img), jnp.asarray(s_txt), jnp.asarray(image_of_text))
    assert sorted(metrics) == sorted([f"{d}_r@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)])
    for k in (1, 5, 10):
        i2t = np_recall(sim, k, lambda q, d: image_of_text[d] == q)
        t2i = np_recall(sim.T, k, lambda q, d: image_of_text[q] == d)
        assert float(metrics[f"i2t_r@{k}"]) == pytest.approx(i2t)
        assert float(metrics[f"t2i_r@{k}"]) == pytest.approx(t2i)


def test_retrieval_metrics_with_uneven_captions_and_shuffled_order():
    rng = np.random.default_rng(4)
    s_img, _ = tied_embeddings(rng, 7, 1, v=5)
    image_of_text = rng.permutation(np.repeat(np.arange(7), [1, 2, 3, 5, 1, 4, 2]))
    s_txt = (s_img[image_of_text] + rng.integers(0, 2, (len(image_of_text), 5))).astype(np.float32)
    sim = s_img @ s_txt.T
    metrics = retrieval_metrics(jnp.asarray(s_img), jnp.asarray(s_txt), jnp.asarray(image_of_text), ks=(1, 3))
    for k in (1, 3):
        assert float(metrics[f"i2t_r@{k}"]) == pytest.approx(np_recall(sim, k, lambda q, d: image_of_text[d] == q))
        assert float(metrics[f"t2i_r@{k}"]) == pytest.approx(np_recall(sim.T, k, lambda q, d: image_of_text[q] == d))


def test_recall_at_k_boolean_and_index_positives_match_brute_force():
    rng = np.random.default_rng(5)
    sim = rng.integers(0, 4, (9, 20)).astype(np.float32)
    mask = rng.random((9, 20)) < 0.15
    mask[0] = False  # a query with no relevant document is a miss
    index = rng.integers(0, 20, 9)
    for k in (1, 3, 20, 50):
        got = float(recall_at_k(jnp.asarray(sim), k, jnp.asarray(mask)))
        assert got == pytest.approx(np_recall(sim, k, lambda q, d: mask[q, d]))
        got = float(recall_at_k(jnp.asarray(sim), k, jnp.asarray(index)))
        assert got == pytest.approx(np_recall(sim, k, lambda q, d: index[q] == d))


def test_recall_at_k_ties_rank_lower_index_first():
    sim = jnp.array([[1.0, 1.0, 1.0]])
    assert float(recall_at_k(sim, 1, jnp.array([0]))) == 1.0
    assert float(recall_at_k(sim, 1, jnp.array([2]))) == 0.0
    assert float(recall_at_k(sim, 3, jnp.array([2]))) == 1.0


# ---------------------------------------------------------------- the full objective


def np_lexvla(s_img, s_txt, scale, lam_img, lam_txt, penalty, ramp=1.0):
    pen = np_overuse if penalty == "overuse" else np_flops
    return np_info_nce(s_img, s_txt, scale) + ramp * (lam_img * pen(s_img) + lam_txt * pen(s_txt))


@pytest.mark.parametrize("penalty", ["overuse", "flops"])
def test_lexvla_loss_sums_terms_and_reports_metrics(penalty):
    rng = np.random.default_rng(6)
    s_img, s_txt = lexical(rng, 8, 25), lexical(rng, 8, 25)
    loss, metrics = jax.jit(  # one program, not op by op
        lambda a, b: losses.lexvla_loss(a, b, 5.0, lambda_img=0.3, lambda_txt=0.1, penalty=penalty)
    )(jnp.asarray(s_img), jnp.asarray(s_txt))
    pen = np_overuse if penalty == "overuse" else np_flops
    np.testing.assert_allclose(float(loss), np_lexvla(s_img, s_txt, 5.0, 0.3, 0.1, penalty), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss))
    np.testing.assert_allclose(float(metrics["info_nce"]), np_info_nce(s_img, s_txt, 5.0), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["penalty_img"]), pen(s_img), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["penalty_txt"]), pen(s_txt), rtol=1e-5)
    assert float(metrics["active_words_img"]) == pytest.approx((s_img >= 25**-0.5).sum(1).mean())
    assert float(metrics["active_words_txt"]) == pytest.approx((s_txt >= 25**-0.5).sum(1).mean())
    assert float(metrics["logit_scale"]) == 5.0
    assert float(metrics["lambda_img"]) == pytest.approx(0.3)
    assert int(metrics["empty_img"]) == int(metrics["empty_txt"]) == 0 and "topk_words_img" not in metrics


def test_lexvla_loss_warms_up_the_lambdas_linearly():
    rng = np.random.default_rng(7)
    s_img, s_txt = jnp.asarray(lexical(rng, 4, 10)), jnp.asarray(lexical(rng, 4, 10))
    kwargs = dict(lambda_img=0.5, lambda_txt=0.2, warmup_steps=100)
    for step, ramp in [(0, 0.0), (25, 0.25), (100, 1.0), (1000, 1.0)]:
        loss, metrics = jax.jit(lambda a, b, t: losses.lexvla_loss(a, b, 3.0, step=t, **kwargs))(s_img, s_txt, step)
        expected = np_lexvla(np.asarray(s_img), np.asarray(s_txt), 3.0, 0.5, 0.2, "overuse", ramp)
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
        assert float(metrics["lambda_txt"]) == pytest.approx(0.2 * ramp)


def test_lexvla_loss_rejects_bad_options():
    s = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="penalty='l1' unknown"):
        losses.lexvla_loss(s, s, 1.0, lambda_img=1.0, lambda_txt=1.0, penalty="l1")
    with pytest.raises(ValueError, match="pass step="):
        losses.lexvla_loss(s, s, 1.0, lambda_img=1.0, lambda_txt=1.0, warmup_steps=10)


# ---------------------------------------------------------------- global batch under sharding


def loss_and_grads(s_img, s_txt, scale):
    fn = lambda a, b, c: losses.lexvla_loss(a, b, c, lambda_img=0.7, lambda_txt=0.4, step=30, warmup_steps=60)
    return jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True)(s_img, s_txt, scale)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(8)
    s_img, s_txt = lexical(rng, 32, 50), lexical(rng, 32, 50)
    s_img[:8, :5] += 1.0  # the first device's rows overuse a few words: local penalties would differ
    return s_img.astype(np.float32), s_txt.astype(np.float32)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1)])
def test_loss_is_global_when_the_batch_is_sharded(batch, mesh_shape):
    s_img, s_txt = batch
    device = jax.devices()[0]
    single = jax.jit(loss_and_grads)(*(jax.device_put(x, device) for x in (s_img, s_txt, np.float32(4.0))))

    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    sharded_in = [jax.device_put(x, rows) for x in (s_img, s_txt)]
    assert len(sharded_in[0].addressable_shards) == 8 and sharded_in[0].addressable_shards[0].data.shape[0] == 4
    sharded = jax.jit(loss_and_grads)(
        *sharded_in, jax.device_put(np.float32(4.0), NamedSharding(mesh, PartitionSpec()))
    )

    (loss_1, metrics_1), grads_1 = single
    (loss_8, metrics_8), grads_8 = sharded
    np.testing.assert_allclose(float(loss_8), float(loss_1), rtol=1e-6)
    for key in metrics_1:
        np.testing.assert_allclose(float(metrics_8[key]), float(metrics_1[key]), rtol=1e-6, err_msg=key)
    for g8, g1 in zip(grads_8, grads_1, strict=True):
        # float32 summation order differs across devices: a few ulps of the largest entry (measured ~6e-7).
        g8, g1 = np.asarray(g8), np.asarray(g1)
        np.testing.assert_allclose(g8, g1, rtol=1e-6, atol=5e-6 * np.abs(g1).max())

    # The check can fail: per-device penalties averaged over devices are not the global penalty.
    local = np.mean([np_overuse(part) for part in np.split(s_img.astype(np.float64), 8)])
    assert abs(local - float(metrics_1["penalty_img"])) > 0.1 * float(metrics_1["penalty_img"])
