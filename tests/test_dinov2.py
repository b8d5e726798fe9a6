"""DINOv2 tower: parity with transformers' Dinov2Model / Dinov2WithRegistersModel, loading, sharding, remat."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P
from support import jaxpr_counts

from lexvla_jax import hf_layout, hf_loader, sharding
from lexvla_jax.models import dinov2

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=4, image_size=16)

# name → (HF config class, HF model class, extra config fields)
VARIANTS = {
    "plain_mlp": (transformers.Dinov2Config, transformers.Dinov2Model, {}),
    "plain_swiglu": (transformers.Dinov2Config, transformers.Dinov2Model, {"use_swiglu_ffn": True}),
    "reg_mlp": (
        transformers.Dinov2WithRegistersConfig,
        transformers.Dinov2WithRegistersModel,
        {"num_register_tokens": 3},
    ),
    "reg_swiglu": (
        transformers.Dinov2WithRegistersConfig,
        transformers.Dinov2WithRegistersModel,
        {"num_register_tokens": 2, "use_swiglu_ffn": True},
    ),
}

# (H, W) in pixels: the config's size (no resampling), square upsampling, and a non-square 5x3 grid (up- and
# downsampling) with pixels left over beyond the last full patch.
SIZES = [(16, 16), (24, 24), (22, 13)]


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, incl. LayerNorm scale/bias and LayerScale, so that no term can hide."""
    gen = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=gen)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * randn(p.shape))
            elif p.ndim >= 2 and name.endswith("weight"):
                p.copy_(randn(p.shape) / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_((1.0 if "embeddings." in name else 0.3) * randn(p.shape))


def _pixels(batch: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *size, 3)).astype(np.float32)


def _torch_run(model, pixels: np.ndarray):
    with torch.no_grad():
        return model(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)


def _max_diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float32) - theirs.numpy())))


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """`get(variant, **config) -> (torch model in eval mode, safetensors dir)`, built once per session.

    The weights depend on the variant only, so extra `config` fields (e.g. drop_path_rate) keep them.
    """
    cache = {}

    def get(variant: str, **fields):
        key = (variant, tuple(sorted(fields.items())))
        if key not in cache:
            config_cls, model_cls, extra = VARIANTS[variant]
            torch.manual_seed(0)
            model = model_cls(config_cls(**TINY, **extra, **fields)).eval()
            _randomize(model, seed=list(VARIANTS).index(variant))
            path = tmp_path_factory.mktemp(variant)
            model.save_pretrained(path)
            cache[key] = (model, path)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def loaded(hf_checkpoint):
    """`get(variant) -> (torch model, our float32 model)`, loaded once per session."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            torch_model, path = hf_checkpoint(variant)
            cache[variant] = (torch_model, hf_loader.load_hf_dinov2(path))
        return cache[variant]

    return get


@pytest.mark.parametrize("antialias", [False, True])
def test_resize_matrix_matches_torch_bicubic(antialias):
    for n in (1, 3, 4, 16, 37):
        for m in (1, 2, 5, 13, 16, 40):
            eye = torch.eye(n, dtype=torch.float64).reshape(1, 1, n, n)
            expected = torch.nn.functional.interpolate(
                eye, size=(m, n), mode="bicubic", align_corners=False, antialias=antialias
            )[0, 0].numpy()
            got = dinov2.bicubic_resize_matrix(n, m, antialias=antialias)
            np.testing.assert_allclose(got, expected, atol=1e-12, err_msg=f"{n}->{m}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_with_transformers(loaded, variant):
    torch_model, model = loaded(variant)
    registers = VARIANTS[variant][2].get("num_register_tokens", 0)
    assert model.num_prefix_tokens == 1 + registers
    forward = nnx.jit(lambda m, x: m(x, output_hidden_states=True))
    worst = 0.0
    for size in SIZES:
        pixels = _pixels(2, size)
        theirs = _torch_run(torch_model, pixels)
        ours = forward(model, jnp.asarray(pixels))
        patches = (size[0] // TINY["patch_size"]) * (size[1] // TINY["patch_size"])
        assert ours.last_hidden_state.shape == tuple(theirs.last_hidden_state.shape) == (2, 1 + registers + patches, 32)
        np.testing.assert_array_equal(ours.pooler_output, ours.last_hidden_state[:, 0])
        assert len(ours.hidden_states) == len(theirs.hidden_states) == TINY["num_hidden_layers"] + 1
        diffs = [
            _max_diff(ours.last_hidden_state, theirs.last_hidden_state),
            _max_diff(ours.pooler_output, theirs.pooler_output),
            *(_max_diff(a, b) for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True)),
        ]
        assert max(diffs) <= 1e-4, f"{variant} at {size}: max abs diff {max(diffs):.2e}"
        worst = max(worst, *diffs)
    print(f"{variant}: float32 max abs diff {worst:.2e}")


def test_sharded_load_matches_and_is_sharded(hf_checkpoint, loaded):
    _, path = hf_checkpoint("reg_swiglu")
    _, reference = loaded("reg_swiglu")
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    model = hf_loader.load_hf_dinov2(path, mesh=mesh)
    assert model.layers.mlp.gate_proj.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
    assert model.layers.attention.o_proj.kernel[...].sharding.spec == P(None, "tensor", "fsdp")
    assert model.position_embeddings[...].sharding.spec == P(None, None, "fsdp")
    for (path_, ours), (_, ref) in zip(
        nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(nnx.state(reference, nnx.Param)), strict=True
    ):
        np.testing.assert_array_equal(ours[...], ref[...], err_msg=str(path_))

    pixels = jnp.asarray(_pixels(4, (24, 24)))
    with sharding.use_mesh_rules(mesh, sharding.DEFAULT_RULES):
        out = nnx.jit(lambda m, x: m(x))(model, pixels)
    assert out.last_hidden_state.sharding.spec[0] == ("data", "fsdp")
    expected = nnx.jit(lambda m, x: m(x))(reference, pixels)  # one program, not op by op
    np.testing.assert_allclose(out.last_hidden_state, expected.last_hidden_state, atol=1e-5)


def test_bfloat16_compute_stays_close(hf_checkpoint):
    torch_model, path = hf_checkpoint("plain_swiglu")
    model = hf_loader.load_hf_dinov2(path, compute_dtype=jnp.bfloat16)
    assert model.layers.mlp.gate_proj.kernel[...].dtype == jnp.float32
    pixels = _pixels(2, (24, 24))
    out = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(pixels))
    assert out.last_hidden_state.dtype == jnp.bfloat16
    diff = _max_diff(out.last_hidden_state, _torch_run(torch_model, pixels).last_hidden_state)
    print(f"bfloat16 compute: max abs diff {diff:.3e}")
    assert diff <= 0.1


@pytest.fixture(scope="session")
def forward_with():
    """`forward(model, pixels, deterministic)`, jitted."""
    return nnx.jit(
        lambda m, x, deterministic: m(x, deterministic=deterministic, output_hidden_states=True), static_argnums=2
    )


def test_drop_path_only_when_not_deterministic(hf_checkpoint, loaded, forward_with):
    _, reference = loaded("plain_mlp")
    model = hf_loader.load_hf_dinov2(hf_checkpoint("plain_mlp", drop_path_rate=0.5)[1])
    assert model.config.drop_path_rate == 0.5
    pixels = jnp.asarray(_pixels(8, (16, 16)))
    expected = forward_with(reference, pixels, True).last_hidden_state
    np.testing.assert_array_equal(forward_with(model, pixels, True).last_hidden_state, expected)
    first = forward_with(model, pixels, False).last_hidden_state
    second = forward_with(model, pixels, False).last_hidden_state
    assert np.abs(first - expected).max() > 1e-2
    assert np.abs(first - second).max() > 1e-2  # the random stream advances between calls
    np.testing.assert_array_equal(forward_with(model, pixels, True).last_hidden_state, expected)


def test_drop_path_rate_one_skips_every_branch(hf_checkpoint, forward_with):
    model = hf_loader.load_hf_dinov2(hf_checkpoint("plain_mlp", drop_path_rate=1.0)[1])
    pixels = jnp.asarray(_pixels(2, (16, 16)))
    dropped = forward_with(model, pixels, False).hidden_states
    for h in dropped[1:]:
        np.testing.assert_array_equal(h, dropped[0])
    kept = forward_with(model, pixels, True).hidden_states
    assert np.abs(kept[-1] - kept[0]).max() > 1e-2


@pytest.mark.slow
def test_remat_gives_same_outputs_and_gradients(hf_checkpoint, loaded):
    _, path = hf_checkpoint("plain_mlp")
    pixels = jnp.asarray(_pixels(2, (20, 20)))

    def loss(model):
        return jnp.mean(model(pixels).last_hidden_state ** 2)

    models = {"none": loaded("plain_mlp")[1], "full": hf_loader.load_hf_dinov2(path, remat="full")}
    flat_none = jaxpr_counts.remat_gradients_agree(models, loss)
    assert np.abs(flat_none[0][1][...]).max() > 0
    # Remat really happens: the backward pass recomputes every forward matmul of the layer, in a checkpoint.
    plain, remat = (jaxpr_counts.param_grad_counts(models[name], loss) for name in ("none", "full"))
    assert (plain[jaxpr_counts.CHECKPOINT], remat[jaxpr_counts.CHECKPOINT]) == (0, 1)
    layer_dots = jaxpr_counts.layer_forward_dots(models["full"], loss)
    assert layer_dots == 8  # q, k, v, scores, mix, output, fc1, fc2
    assert remat["dot_general"] - plain["dot_general"] == layer_dots


def test_rejects_pickle_and_other_models(hf_checkpoint, tmp_path):
    torch_model, path = hf_checkpoint("plain_mlp")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((path / "config.json").read_text())
    torch.save(torch_model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(hf_loader.CheckpointError, match="only pickle weights"):
        hf_loader.load_hf_dinov2(pickled)

    other = tmp_path / "vit"
    other.mkdir()
    (other / "config.json").write_text(
        json.dumps({**json.loads((path / "config.json").read_text()), "model_type": "vit"})
    )
    (other / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(hf_loader.CheckpointError, match="'vit' is not DINOv2") as error:
        hf_loader.load_hf_dinov2(other)
    assert "\n" not in str(error.value)


def test_config_from_hf_fills_model_type_defaults():
    config = dinov2.Dinov2Config.from_hf(
        {"model_type": "dinov2_with_registers", "hidden_size": 64, "num_attention_heads": 2}
    )
    hf = transformers.Dinov2WithRegistersConfig()
    assert (config.patch_size, config.num_register_tokens, config.image_size) == (
        hf.patch_size,
        hf.num_register_tokens,
        hf.image_size,
    )
    assert config.pos_embed_antialias and config.hidden_size == 64
    plain = dinov2.Dinov2Config.from_hf({"model_type": "dinov2", "image_size": [518, 518]}, dtype=jnp.bfloat16)
    assert (plain.patch_size, plain.num_register_tokens, plain.image_size) == (14, 0, 518)
    assert not plain.pos_embed_antialias and plain.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="not square"):
        dinov2.Dinov2Config.from_hf({"model_type": "dinov2", "image_size": [224, 256]})


@pytest.mark.parametrize("name", dinov2.PRESETS)
def test_presets_match_hf_architectures(name):
    config = dinov2.dinov2_preset(name)
    hf_fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for runtime in ("dtype", "param_dtype", "remat", "pos_embed_antialias"):
        hf_fields.pop(runtime)
    if config.num_register_tokens:
        hf_config, hf_cls = transformers.Dinov2WithRegistersConfig(**hf_fields), transformers.Dinov2WithRegistersModel
    else:
        hf_fields.pop("num_register_tokens")
        hf_config, hf_cls = transformers.Dinov2Config(**hf_fields), transformers.Dinov2Model
    with torch.device("meta"):
        hf_model = hf_cls(hf_config)
    hf_count = sum(p.numel() for n, p in hf_model.named_parameters() if n not in hf_layout.DINOV2_IGNORED)
    model = nnx.eval_shape(lambda: dinov2.Dinov2Model(config, rngs=nnx.Rngs(0)))
    count = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert count == hf_count
    expected_mlp = {"dinov2_vitg14": 4096}.get(name.removesuffix("_reg"), 4 * config.hidden_size)
    assert config.mlp_dim == expected_mlp and config.image_size == 518 and config.patch_size == 14
