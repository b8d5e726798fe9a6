"""LexVLA assembled from Hugging Face checkpoints: codebooks, towers, text read at the last real token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import tiny_hf

from lexvla_jax import build, hf_loader, optim, sharding
from lexvla_jax.models import lexical

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

KEPT = tiny_hf.KEPT


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return tiny_hf.write_tiny_hf(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def model(hf_dirs):
    vision_dir, text_dir, _, _ = hf_dirs
    return build.build_model(tiny_hf.lexvla_config(vision_dir, text_dir), sharding.make_mesh((2, 2, 2)), KEPT)


def test_codebooks_are_the_kept_lm_head_rows(hf_dirs, model):
    lm_head = hf_dirs[3].lm_head.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(model.text_codebook[...]), lm_head[KEPT])
    np.testing.assert_array_equal(np.asarray(model.visual_codebook[...]), lm_head[KEPT])
    assert len(model.text_codebook[...].sharding.device_set) == 8  # placed on the mesh


def test_towers_are_the_checkpoints(hf_dirs, model):
    _, _, vision, text = hf_dirs
    pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    theirs = vision(torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state.detach().numpy()
    ours = np.asarray(nnx.jit(lambda m, x: m.vision(x).last_hidden_state)(model, jnp.asarray(pixels)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    ids = np.array([[1, 7, 9, 11]])
    theirs = text(torch.from_numpy(ids), output_hidden_states=True).hidden_states[-1].detach().numpy()
    ours = np.asarray(
        nnx.jit(lambda m, x: m.text(x).last_hidden_state)(model, jnp.asarray(ids))
    )  # LoRA B = 0: the base
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_text_vector_is_read_at_the_last_real_token(hf_dirs, model):
    _, _, _, text = hf_dirs
    ids = np.array([[1, 7, 9, 11, 0, 0], [1, 4, 4, 4, 4, 2]])
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    s = np.asarray(nnx.jit(lambda m, i, a: m.encode_text(i, a))(model, jnp.asarray(ids), jnp.asarray(mask)))
    hidden = text(torch.from_numpy(ids[:1, :4]), output_hidden_states=True).hidden_states[-1][0, -1].detach().numpy()
    lm_head = text.lm_head.weight.detach().numpy()[KEPT]
    expected = np.asarray(lexical.l2_normalize(lexical.elu1p(jnp.asarray(lm_head @ hidden))))
    np.testing.assert_allclose(s[0], expected, atol=1e-5)
    assert s.shape == (2, len(KEPT)) and np.all(s > 0)
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1.0, rtol=1e-5)


def test_image_vector_pools_patches_only(model):
    pixels = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    per_patch = nnx.jit(lambda m, x: m.patch_lexical(x, normalize=False))(model, pixels)
    assert per_patch.shape == (2, 16, len(KEPT))  # a 4×4 grid: CLS excluded
    pooled = lexical.l2_normalize(per_patch.max(axis=1))
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m.encode_image(x))(model, pixels)), pooled, atol=1e-5)


def test_logit_scale_is_clamped(model):
    clone = nnx.clone(model)
    clone.logit_scale[...] = jnp.float32(10.0)  # exp(10) > logit_scale_max
    assert float(clone.logit_scale_value()) == pytest.approx(clone.config.logit_scale_max)
    assert float(model.logit_scale_value()) == pytest.approx(model.config.logit_scale_init, rel=1e-5)


@pytest.mark.slow
def test_random_and_loaded_models_are_made_one_way_in_their_rule_shardings(model, monkeypatch):
    """A random build goes through `hf_loader.load_model` like a loaded one, and every variable of both is
    created in the sharding the rules give it (split over the mesh, not replicated then moved)."""
    made = []
    load_model = hf_loader.load_model
    monkeypatch.setattr(hf_loader, "load_model", lambda *a, **k: made.append(a[1]) or load_model(*a, **k))
    mesh = sharding.make_mesh((2, 2, 2))
    random = build.build_model(tiny_hf.lexvla_config(), mesh, KEPT)
    assert made == [()]  # no checkpoint parts: the random-initialisation path of the same function
    for built in (random, model):
        state = nnx.state(built)
        rules = sharding.state_shardings(state, mesh, sharding.DEFAULT_RULES)
        split = 0
        for (path, variable), (_, want) in zip(nnx.to_flat_state(state), nnx.to_flat_state(rules), strict=True):
            value = variable.get_value()
            assert value.sharding.is_equivalent_to(want.get_value(), value.ndim), path
            split += value.sharding.shard_shape(value.shape) != value.shape
        assert split > 10
    kernel = random.adapter.fc1.kernel[...]
    assert kernel.sharding.shard_shape(kernel.shape) != kernel.shape  # a randomly initialised weight, split


def test_a_resumed_build_leaves_trainable_parameters_abstract_and_makes_the_rest_alike(hf_dirs, model):
    """`trainable_abstract=True` (a run that restores its trainable parameters): those stay shapes with the dtype
    and sharding a real build gives them, nothing read or initialised; every other variable equals the real
    build's, value and sharding."""
    vision_dir, text_dir, _, _ = hf_dirs
    config = tiny_hf.lexvla_config(vision_dir, text_dir)
    resumed = build.build_model(config, sharding.make_mesh((2, 2, 2)), KEPT, trainable_abstract=True)
    trainable = nnx.filterlib.to_predicate(optim.trainable_filter(config.train.trainable))
    abstract = 0
    pairs = zip(nnx.to_flat_state(nnx.state(resumed)), nnx.to_flat_state(nnx.state(model)), strict=True)
    for (path, got), (_, want) in pairs:
        value, real = got.get_value(), want.get_value()
        assert value.shape == real.shape and value.dtype == real.dtype, path
        assert value.sharding.is_equivalent_to(real.sharding, real.ndim), path
        if trainable(path, want):
            assert isinstance(value, jax.ShapeDtypeStruct), path
            abstract += 1
        else:
            np.testing.assert_array_equal(np.asarray(value), np.asarray(real), err_msg=str(path))
    assert abstract and {"adapter", "visual_codebook", "logit_scale"} <= {
        p[0] for p, v in nnx.to_flat_state(nnx.state(resumed)) if isinstance(v.get_value(), jax.ShapeDtypeStruct)
    }
