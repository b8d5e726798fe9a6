"""Frozen towers run deterministic, weight decay by each layer's own shape, LoRA's init, position-table resampling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from support import tiny_lexvla as tiny

from lexvla_jax import optim
from lexvla_jax.models import dinov2, layers, lexvla
from lexvla_jax.models.split import SplitModel


def _images(graphdef, params, frozen, rest, seed):
    """The image vectors of a training-mode (`deterministic=False`) pass with key `seed`, compiled as one program."""
    batch = jax.tree.map(jnp.asarray, tiny.tiny_batch(4))
    encode = jax.jit(lambda *args: SplitModel(graphdef).encode(*args, deterministic=False)[0])
    return np.asarray(encode(params, frozen, rest, batch, jax.random.key(seed)))


@pytest.mark.slow
def test_frozen_vision_tower_ignores_its_drop_path_rate():
    """A frozen DINOv2 with drop_path_rate=0.3: two training-mode passes with different keys agree; the same tower
    made trainable draws drop-path masks (the passes differ), so the check can fail."""
    model = tiny.tiny_model(drop_path_rate=0.3)
    frozen_split = nnx.split(model, optim.trainable_filter(tiny.TRAINABLE), nnx.Param, ...)
    first, second = (_images(*frozen_split, seed) for seed in (0, 1))
    np.testing.assert_array_equal(first, second)
    training_split = nnx.split(model, optim.trainable_filter((*tiny.TRAINABLE, "vision")), nnx.Param, ...)
    assert np.abs(_images(*training_split, 0) - _images(*training_split, 1)).max() > 1e-4


def test_weight_decay_mask_uses_each_layers_own_shape():
    """Stacked norms and biases (`[L, D]`) are vectors of L layers: no decay; stacked kernels (`[L, in, out]`),
    codebook rows and the adapter's matrices decay; the logit scale does not."""
    params = nnx.state(nnx.eval_shape(lambda: lexvla.LexVLA(tiny.tiny_config(), rngs=nnx.Rngs(0))), nnx.Param)  # shapes
    mask = optim.decay_mask()(params)
    flat = {"/".join(map(str, path)): (v, m) for (path, v), (_, m) in zip(
        nnx.to_flat_state(params), nnx.to_flat_state(mask), strict=True)}  # fmt: skip
    stacked_vectors = [k for k, (v, _) in flat.items() if "/layers/" in k and v.get_value().ndim == 2]
    stacked_matrices = [k for k, (v, _) in flat.items() if "/layers/" in k and v.get_value().ndim == 3]
    assert any("norm" in k for k in stacked_vectors) and any("bias" in k for k in stacked_vectors)
    assert stacked_vectors and not any(flat[k][1].get_value() for k in stacked_vectors), stacked_vectors
    assert stacked_matrices and all(flat[k][1].get_value() for k in stacked_matrices)
    assert flat["visual_codebook"][1].get_value() and flat["adapter/fc1/kernel"][1].get_value()
    assert not flat["logit_scale"][1].get_value() and not flat["adapter/norm1/scale"][1].get_value()
    assert optim.decay_mask(("visual_codebook",))(params)["visual_codebook"].get_value() is False


@pytest.mark.parametrize("init, bound", [("peft", lambda n: 1 / np.sqrt(n)), ("he_uniform", lambda n: np.sqrt(6 / n))])
def test_lora_a_init_bound(init, bound):
    """LoRA's A is uniform in ±bound(in): PEFT's default (kaiming_uniform(a=√5) = 1/√in) or He's √(6/in)."""
    in_features = 256
    linear = layers.Linear(in_features, 64, ("embed", "mlp"), lora_rank=64, lora_init=init, rngs=nnx.Rngs(0))
    a = np.asarray(linear.lora_a[...])
    limit = bound(in_features)
    assert np.abs(a).max() <= limit and np.abs(a).max() > 0.99 * limit
    assert abs(a.std() - limit / np.sqrt(3)) < 0.02 * limit  # uniform: std = bound/√3
    np.testing.assert_array_equal(np.asarray(linear.lora_b[...]), 0)


def test_lora_init_default_is_peft():
    assert tiny.tiny_config().text.lora_init == "peft"
    with pytest.raises(ValueError, match="lora_init='xavier' unknown"):
        dataclasses.replace(tiny.tiny_config().text, lora_init="xavier")


@pytest.mark.parametrize("antialias", [False, True])
def test_resize_matrix_with_offset_matches_torch_scale_factor(antialias):
    """facebookresearch's DINOv2 resamples with `scale_factor=(n + 0.1)/N`: torch's weights for that call."""
    for n, m in ((37, 16), (37, 32), (16, 37), (4, 3)):
        eye = torch.eye(n, dtype=torch.float64).reshape(1, 1, n, n)
        factor = (m + 0.1) / n
        expected = torch.nn.functional.interpolate(
            eye, scale_factor=(factor, 1.0), mode="bicubic", align_corners=False, antialias=antialias
        )[0, 0].numpy()
        assert expected.shape == (m, n)
        got = dinov2.bicubic_resize_matrix(n, m, antialias=antialias, offset=0.1)
        np.testing.assert_allclose(got, expected, atol=1e-12, err_msg=f"{n}->{m}")


def _torch_position_table(table: np.ndarray, n: int, out: int, **kwargs) -> np.ndarray:
    """The reference formulas on a `[N·N, D]` table: transformers' (`size=`) or facebookresearch's (`scale_factor=`)."""
    grid = torch.from_numpy(table.astype(np.float64)).reshape(1, n, n, -1).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(grid, mode="bicubic", align_corners=False, **kwargs)
    assert resized.shape[-2:] == (out, out)
    return resized.permute(0, 2, 3, 1).reshape(out * out, -1).numpy()


@pytest.mark.parametrize("mode", ["hf", "dinov2"])
def test_position_embedding_resampling_matches_its_reference(mode):
    """A 10×10 table resampled to the 4×4 grid of a 32 px image (patch 8): "hf" as transformers (by output size),
    "dinov2" as facebookresearch (`scale_factor=(4 + 0.1)/10`); the two differ."""
    config = dinov2.Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, patch_size=8, image_size=80, pos_interpolation=mode
    )
    model = nnx.eval_shape(lambda: dinov2.Dinov2Model(config, rngs=nnx.Rngs(0)))  # no init: only the table is read
    shape = model.position_embeddings.get_value().shape
    model.position_embeddings.set_value(jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32))
    table = np.asarray(model.position_embeddings[...])[0, 1:]
    got = np.asarray(model.interpolate_pos_encoding(4, 4, True))[0]
    kwargs = {"size": (4, 4)} if mode == "hf" else {"scale_factor": ((4 + 0.1) / 10,) * 2}
    np.testing.assert_allclose(got[1:], _torch_position_table(table, 10, 4, **kwargs), atol=1e-6)
    np.testing.assert_array_equal(got[0], np.asarray(model.position_embeddings[...])[0, 0])
    by_size = _torch_position_table(table, 10, 4, size=(4, 4))
    assert (np.abs(got[1:] - by_size).max() > 1e-3) == (mode == "dinov2")


def test_unknown_pos_interpolation_is_an_error():
    with pytest.raises(ValueError, match="pos_interpolation='torch' unknown"):
        dinov2.Dinov2Config(pos_interpolation="torch")


def test_config_fields_reach_the_towers():
    """`model.vision.pos_interpolation` and `model.lora.init` from the paper config (and overrides) to the towers."""
    import os

    from lexvla_jax import build, configlib

    paper = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "lexvla_cc12m.py")
    config = configlib.load_config(paper)
    assert build.vision_config(config).pos_interpolation == "hf" and build.text_config(config).lora_init == "peft"
    other = configlib.load_config(paper, ["model.vision.pos_interpolation=dinov2", "model.lora.init=he_uniform"])
    assert build.vision_config(other).pos_interpolation == "dinov2"
    assert build.text_config(other).lora_init == "he_uniform"
    bad = configlib.load_config(paper, ["model.vision.pos_interpolation=torch"])
    with pytest.raises(
        configlib.ConfigError,
        match=r"config.model.vision: pos_interpolation='torch' unknown; choose one of \['dinov2', 'hf'\]",
    ) as info:
        build.vision_config(bad)
    assert "\n" not in str(info.value)
    assert config.model.adapter_shape == "block" and tuple(config.optim.no_decay) == ("visual_codebook",)
