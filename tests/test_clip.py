"""CLIP and SigLIP vision towers: parity with transformers, loading from vision-only and joint checkpoints, sharding."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file
from support import jaxpr_counts

from lexvla_jax import hf_loader, sharding
from lexvla_jax.models import clip

# name → (how the checkpoint is saved, vision config fields, input sizes (H, W) in pixels). Every variant is run at
# the checkpoint's size (no resampling), a non-square size and another square size; some leave pixels over beyond
# the last full patch.
B32 = dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, patch_size=32)
L14 = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, patch_size=14)
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8)
VARIANTS = {
    "clip_b32_vision": ("CLIPVisionModel", {**B32, "image_size": 224}, [(224, 224), (160, 256), (288, 288)]),
    "clip_l14_joint": ("CLIPModel", {**L14, "image_size": 224}, [(224, 224), (196, 150), (112, 112)]),
    "clip_l14_gelu": ("CLIPVisionModel", {**L14, "image_size": 56, "hidden_act": "gelu"}, [(56, 56), (70, 43)]),
    "siglip_vision": ("SiglipVisionModel", {**SIGLIP, "image_size": 32}, [(32, 32), (40, 27), (48, 48)]),
    "siglip_joint": ("SiglipModel", {**SIGLIP, "image_size": 32}, [(32, 32), (24, 41)]),
    "siglip_no_head": ("SiglipVisionModel", {**SIGLIP, "image_size": 32, "vision_use_head": False}, [(40, 27)]),
}
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)


def _hf_model(kind: str, fields: dict) -> torch.nn.Module:
    family = "Siglip" if kind.startswith("Siglip") else "CLIP"
    vision_config = getattr(transformers, f"{family}VisionConfig")(**fields)
    if kind.endswith("VisionModel"):
        return getattr(transformers, kind)(vision_config)
    text = getattr(transformers, f"{family}TextConfig")(**TEXT, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = getattr(transformers, f"{family}Config")(text_config=text.to_dict(), vision_config=vision_config.to_dict())
    return getattr(transformers, kind)(config)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, LayerNorm scales and biases included, so that no term can hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            elif p.ndim >= 2 and "embedding" not in name and name.endswith("weight"):
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_((1.0 if "embedding" in name or "probe" in name else 0.3) * noise)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """`get(variant) -> (torch vision tower in eval mode, safetensors dir)`, saved once per module."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            kind, fields, _ = VARIANTS[variant]
            torch.manual_seed(0)
            model = _hf_model(kind, fields).eval()
            _randomize(model, seed=list(VARIANTS).index(variant))
            path = tmp_path_factory.mktemp(variant)
            model.save_pretrained(path)
            cache[variant] = (getattr(model, "vision_model", model), path)
        return cache[variant]

    return get


def _pixels(batch: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *size, 3)).astype(np.float32)


def _max_diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float32) - theirs.numpy())))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_transformers(variant, checkpoint):
    torch_model, path = checkpoint(variant)
    model = hf_loader.load_hf_clip_vision(path)
    family = "siglip" if variant.startswith("siglip") else "clip"
    assert model.config.family == family and model.num_prefix_tokens == (family == "clip")
    forward = nnx.jit(lambda m, x: m(x, output_hidden_states=True))
    worst = 0.0
    for size in VARIANTS[variant][2]:
        pixels = _pixels(2, size)
        ours = forward(model, jnp.asarray(pixels))
        with torch.no_grad():
            theirs = torch_model(
                torch.from_numpy(pixels.transpose(0, 3, 1, 2)), interpolate_pos_encoding=True, output_hidden_states=True
            )
        grid = (size[0] // model.config.patch_size) * (size[1] // model.config.patch_size)
        assert ours.last_hidden_state.shape == (2, grid + model.num_prefix_tokens, model.config.hidden_size)
        diffs = [
            _max_diff(ours.last_hidden_state, theirs.last_hidden_state),
            *(_max_diff(a, b) for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True)),
        ]
        if theirs.pooler_output is None:
            assert ours.pooler_output is None
        else:
            diffs.append(_max_diff(ours.pooler_output, theirs.pooler_output))
        assert max(diffs) <= 1e-4, f"{variant} at {size}: max abs diff {max(diffs):.2e}"
        worst = max(worst, *diffs)
    print(f"{variant}: float32 max abs diff {worst:.2e}")


def test_joint_checkpoint_ignores_the_text_tower_and_a_missing_tensor_is_an_error(checkpoint, tmp_path):
    _, path = checkpoint("clip_l14_joint")
    tensors = load_file(path / "model.safetensors")
    assert any(k.startswith("text_model.") for k in tensors) and "visual_projection.weight" in tensors
    config = json.loads((path / "config.json").read_text())
    for name, drop in (("missing", "vision_model.pre_layrnorm.bias"), ("missing_layer", "encoder.layers.1.mlp.fc1")):
        broken = tmp_path / name
        broken.mkdir()
        (broken / "config.json").write_text(json.dumps(config))
        save_file({k: v for k, v in tensors.items() if drop not in k}, broken / "model.safetensors")
        with pytest.raises(hf_loader.CheckpointError, match="lacks tensor") as error:
            hf_loader.load_hf_clip_vision(broken)
        assert "\n" not in str(error.value)
    # A vision-only directory holds nothing to ignore: a stray tensor is an error, not silently dropped.
    _, vision_only = checkpoint("clip_b32_vision")
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "config.json").write_text((vision_only / "config.json").read_text())
    save_file(
        {**load_file(vision_only / "model.safetensors"), "head.probe": np.zeros(3, np.float32)}, stray / "x.safetensors"
    )
    with pytest.raises(hf_loader.CheckpointError, match=r"\['head.probe'\] have no place"):
        hf_loader.load_hf_clip_vision(stray)


def test_other_model_types_are_one_line_errors(checkpoint):
    _, clip_path = checkpoint("clip_b32_vision")
    with pytest.raises(hf_loader.CheckpointError, match="model_type 'clip_vision_model' is not DINOv2; pass a DINOv2"):
        hf_loader.load_hf_dinov2(clip_path)
    dinov2_dir = clip_path.parent / "dinov2_for_clip_test"
    transformers.Dinov2Model(
        transformers.Dinov2Config(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
        )
    ).save_pretrained(dinov2_dir)
    with pytest.raises(hf_loader.CheckpointError, match="'dinov2' is not CLIP or SigLIP; pass a CLIP or SigLIP") as e:
        hf_loader.load_hf_clip_vision(dinov2_dir)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("variant, size", [("siglip_joint", (40, 24)), ("clip_l14_gelu", (56, 42))])
def test_sharded_load_matches_and_is_sharded(variant, size, checkpoint):
    _, path = checkpoint(variant)
    reference = hf_loader.load_hf_clip_vision(path)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    model = hf_loader.load_hf_clip_vision(path, mesh=mesh)
    assert model.layers.mlp.fc1.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
    assert model.layers.attention.q_proj.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
    assert model.position_embeddings[...].sharding.spec == P(None, "fsdp")
    if variant.startswith("siglip"):
        assert model.head.attention.k_proj.kernel[...].sharding.spec == P("fsdp", "tensor")
    else:  # CLIP's own parameters: the class token and the pre-LayerNorm
        assert model.class_embedding[...].sharding.spec == P("fsdp")
        assert model.pre_layernorm.scale[...].sharding.spec == P("fsdp")
    ours, ref = nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(nnx.state(reference, nnx.Param))
    assert len(ours) == len(ref) > 10
    for (name, a), (name_ref, b) in zip(ours, ref, strict=True):
        assert name == name_ref and len(a[...].sharding.device_set) == 8
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(name))
    pixels = jnp.asarray(_pixels(4, size))
    forward = nnx.jit(lambda m, x: m(x))
    with sharding.use_mesh_rules(mesh, sharding.DEFAULT_RULES):
        out = forward(model, pixels)
    assert out.last_hidden_state.sharding.spec[0] == ("data", "fsdp")
    expected = forward(reference, pixels)
    np.testing.assert_allclose(out.last_hidden_state, expected.last_hidden_state, atol=1e-5)
    np.testing.assert_allclose(out.pooler_output, expected.pooler_output, atol=1e-5)


def _copy_checkpoint(source, target, tensors: dict) -> None:
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    save_file(tensors, target / "model.safetensors")


def test_bfloat16_load_is_close_to_float32(checkpoint):
    _, path = checkpoint("clip_l14_gelu")
    f32, bf16 = hf_loader.load_hf_clip_vision(path), hf_loader.load_hf_clip_vision(path, dtype=jnp.bfloat16)
    assert bf16.config.dtype == bf16.config.param_dtype == jnp.bfloat16
    full, half = nnx.to_flat_state(nnx.state(f32, nnx.Param)), nnx.to_flat_state(nnx.state(bf16, nnx.Param))
    for (name, a), (_, b) in zip(full, half, strict=True):  # the checkpoint's float32 tensors, rounded once
        assert b[...].dtype == jnp.bfloat16, name
        np.testing.assert_array_equal(b[...], a[...].astype(jnp.bfloat16), err_msg=str(name))
    pixels = jnp.asarray(_pixels(2, (56, 70)))
    forward = nnx.jit(lambda m, x: m(x))
    ours, reference = forward(bf16, pixels.astype(jnp.bfloat16)), forward(f32, pixels)
    for got, want in (
        (ours.last_hidden_state, reference.last_hidden_state),
        (ours.pooler_output, reference.pooler_output),
    ):
        assert got.dtype == jnp.bfloat16 and got.shape == want.shape
        error = np.abs(np.asarray(got, np.float32) - np.asarray(want))
        scale = np.abs(np.asarray(want)).max()
        assert error.max() <= 0.1 * scale and error.mean() <= 0.02 * scale, (error.max(), error.mean(), scale)
        assert error.max() > 0  # really computed in bfloat16


def test_vision_only_checkpoint_missing_a_tensor_is_a_one_line_error(checkpoint, tmp_path):
    _, path = checkpoint("clip_b32_vision")
    tensors = load_file(path / "model.safetensors")
    for name in ("embeddings.class_embedding", "pre_layrnorm.weight", "encoder.layers.1.self_attn.out_proj.bias"):
        assert name in tensors
        broken = tmp_path / name
        _copy_checkpoint(path, broken, {k: v for k, v in tensors.items() if k != name})
        with pytest.raises(hf_loader.CheckpointError, match=re.escape(f"lacks tensor(s) ['{name}']")) as error:
            hf_loader.load_hf_clip_vision(broken)
        assert "\n" not in str(error.value)


def test_vision_model_prefixes_and_position_ids_load_equal(checkpoint, tmp_path):
    """transformers v4 wrote a `CLIPVisionModel`'s tensors under `vision_model.` (older versions with the
    `position_ids` buffer); v5 writes them bare. Both load to the same tower."""
    _, path = checkpoint("clip_b32_vision")
    tensors = load_file(path / "model.safetensors")
    assert not [k for k in tensors if k.startswith("vision_model.")]
    positions = tensors["embeddings.position_embedding.weight"].shape[0]
    v4 = {f"vision_model.{k}": v for k, v in tensors.items()}
    v4["vision_model.embeddings.position_ids"] = np.arange(positions, dtype=np.int64)[None]
    _copy_checkpoint(path, tmp_path / "v4", v4)
    reference, model = hf_loader.load_hf_clip_vision(path), hf_loader.load_hf_clip_vision(tmp_path / "v4")
    ours, ref = nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(nnx.state(reference, nnx.Param))
    assert len(ours) == len(ref) > 10
    for (name, a), (name_ref, b) in zip(ours, ref, strict=True):
        assert name == name_ref
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(name))


@pytest.mark.slow
def test_remat_gives_same_outputs_and_gradients(checkpoint):
    _, path = checkpoint("clip_l14_gelu")
    pixels = jnp.asarray(_pixels(2, (42, 56)))

    def loss(model):
        out = model(pixels)
        return jnp.mean(out.last_hidden_state**2) + jnp.mean(out.pooler_output**2)

    models = {remat: hf_loader.load_hf_clip_vision(path, remat=remat) for remat in ("none", "full")}
    for path_, grad in jaxpr_counts.remat_gradients_agree(models, loss):
        assert np.abs(grad[...]).max() > 0, path_  # every parameter, the class token's included, gets a gradient
    # Remat really happens: in a checkpoint, the backward pass recomputes every forward matmul of the layer whose
    # result it needs: all but fc2's, which only feeds the residual sum (DINOv2's LayerScale needs it; CLIP has none).
    plain, remat = (jaxpr_counts.param_grad_counts(models[name], loss) for name in ("none", "full"))
    assert (plain[jaxpr_counts.CHECKPOINT], remat[jaxpr_counts.CHECKPOINT]) == (0, 1)
    layer_dots = jaxpr_counts.layer_forward_dots(models["full"], loss)
    assert layer_dots == 8  # q, k, v, scores, mix, output, fc1, fc2
    assert remat["dot_general"] - plain["dot_general"] == layer_dots - 1


def test_config_from_hf_defaults_and_presets():
    config = clip.ClipVisionConfig.from_hf(
        {"model_type": "clip", "vision_config": {"hidden_size": 64, "num_attention_heads": 4}}
    )
    assert (config.patch_size, config.hidden_act, config.layer_norm_eps, config.image_norm) == (
        32,
        "quick_gelu",
        1e-5,
        "clip",
    )
    siglip = clip.ClipVisionConfig.from_hf({"model_type": "siglip_vision_model", "image_size": [384, 384]})
    assert (siglip.family, siglip.patch_size, siglip.image_size, siglip.pooling, siglip.image_norm) == (
        "siglip",
        16,
        384,
        "map",
        "siglip",
    )
    large = clip.clip_vision_config("clip", "clip_vitl14")
    assert (large.hidden_size, large.num_hidden_layers, large.patch_size, large.grid_size) == (1024, 24, 14, 16)
    with pytest.raises(ValueError, match=r"unknown clip preset 'siglip_vitb16'; choose one of \['clip_vitb16'"):
        clip.clip_vision_config("clip", "siglip_vitb16")
    with pytest.raises(ValueError, match="pooling 'cls' needs class_token=True"):
        clip.ClipVisionConfig(class_token=False)
