"""Q(CLIP) and the SigLIP variant: the configs change only the image tower, LexVLA reads its patch tokens, images
are normalised as the tower expects, and `build` loads CLIP checkpoints (and refuses another tower's)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from lexvla_jax import build, configlib, hf_loader, sharding
from lexvla_jax.models import clip, dinov2, image_norm, lexvla

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = os.path.join(REPO, "configs", "variants")
PAPER_WORDS = 17182
NO_TEXT_CHECKPOINT = ["model.text_checkpoint=", "model.vision_checkpoint="]
VISION_ONLY = [*NO_TEXT_CHECKPOINT, "model.text_encoder=bow"]  # no language model to build: the image side is tested


def _load(name: str, base: str = "paper", overrides=()) -> configlib.ml_collections.ConfigDict:
    path = os.path.join(VARIANTS, f"{name or 'bases'}.py")
    return configlib.load_config(f"{path}:{base}", list(overrides))


def _leaves(config) -> dict:
    return {k: config[k] for k in configlib.flat_keys(config) if not hasattr(config[k], "keys")}


@pytest.mark.parametrize(
    "name, base, expected",
    [
        # pos_interpolation is DINOv2's choice of position-table resampling; CLIP and SigLIP resample as transformers.
        (
            "qclip",
            "paper",
            {
                "tower": ("dinov2", "clip"),
                "preset": ("dinov2_vitl14", "clip_vitl14"),
                "pos_interpolation": ("hf", None),
            },
        ),
        (
            "siglip",
            "paper",
            {
                "tower": ("dinov2", "siglip"),
                "preset": ("dinov2_vitl14", "siglip_so400m14"),
                "pos_interpolation": ("hf", None),
            },
        ),
        ("qclip", "tiny", {"tower": ("dinov2", "clip"), "mlp_ratio": (2.0, None), "intermediate_size": (None, 128)}),
        ("siglip", "tiny", {"tower": ("dinov2", "siglip"), "mlp_ratio": (2.0, None), "intermediate_size": (None, 128)}),
    ],
)
def test_variant_changes_only_the_image_tower(name, base, expected):
    a, b = _leaves(_load(name, base)), _leaves(_load("", base))
    diff = {k: (b.get(k), a.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    assert diff == {f"model.vision.{k}": v for k, v in expected.items()}


def _abstract(config, num_words: int) -> lexvla.LexVLA:
    return nnx.eval_shape(lambda: lexvla.LexVLA(build.model_config(config, num_words), rngs=nnx.Rngs(0)))


def test_paper_qclip_is_clip_vitl14_and_its_patch_tokens_feed_the_adapter():
    model = _abstract(_load("qclip"), PAPER_WORDS)
    v = model.vision.config
    assert isinstance(model.vision, clip.ClipVisionModel) and v.family == "clip" and v.image_norm == "clip"
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size) == (
        1024,
        24,
        16,
        14,
        224,
    )
    assert (v.intermediate_size, v.hidden_act, model.vision.position_embeddings.shape) == (
        4096,
        "quick_gelu",
        (257, 1024),
    )
    pixels = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.bfloat16)
    # 16×16 patches at the text width (Llama-2-7B): the class token is dropped.
    assert nnx.eval_shape(lambda m, x: m.patch_features(x), model, pixels).shape == (2, 256, 4096)
    siglip = _abstract(_load("siglip"), PAPER_WORDS)
    assert siglip.vision.config.hidden_size == 1152 and siglip.vision.num_prefix_tokens == 0
    assert nnx.eval_shape(lambda m, x: m.patch_features(x), siglip, pixels).shape == (2, 256, 4096)


@pytest.mark.slow
@pytest.mark.parametrize("name, prefix", [("qclip", 1), ("siglip", 0)])
def test_patch_features_are_the_adapter_on_the_patch_tokens(name, prefix):
    config = _load(name, "tiny", VISION_ONLY)
    model = nnx.jit(lambda: lexvla.LexVLA(build.model_config(config, 12), rngs=nnx.Rngs(0)))()
    assert model.vision.num_prefix_tokens == prefix
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)

    @nnx.jit
    def run(m, x):
        tokens = m.vision(x).last_hidden_state
        return tokens, m.patch_features(x), m.adapter(tokens[:, prefix:])

    tokens, features, by_hand = run(model, pixels)
    assert tokens.shape == (2, 64 + prefix, 64) and features.shape == (2, 64, 64)
    np.testing.assert_allclose(features, by_hand, atol=1e-6)


def test_each_tower_normalises_images_with_its_own_constants():
    image = np.random.default_rng(0).integers(0, 256, size=(1, 8, 8, 3), dtype=np.uint8)
    pixels = {}
    for name, norm in (("", "imagenet"), ("qclip", "clip"), ("siglip", "siglip")):
        model = _abstract(_load(name), PAPER_WORDS)
        assert model.config.vision.image_norm == norm
        pixels[norm] = np.asarray(model.normalize(jnp.asarray(image)))
        mean, std = (np.asarray(c, np.float32) for c in image_norm.NORMALIZATIONS[norm])
        np.testing.assert_allclose(pixels[norm], (image / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    assert np.abs(pixels["imagenet"] - pixels["clip"]).max() > 0.05
    assert np.abs(pixels["clip"] - pixels["siglip"]).max() > 0.05


@pytest.fixture(scope="module")
def tiny_clip_checkpoint(tmp_path_factory):
    """A random `CLIPModel` (vision and text towers) whose vision tower has the tiny config's shape."""
    vision = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=8, image_size=64
    )
    text = transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99, bos_token_id=0
    )
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    return path


def test_build_loads_a_clip_checkpoint_sharded(tiny_clip_checkpoint):
    config = _load("qclip", "tiny", [*VISION_ONLY, f"model.vision_checkpoint={tiny_clip_checkpoint}"])
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    model = build.build_model(config, mesh, np.arange(12))
    reference = hf_loader.load_hf_clip_vision(tiny_clip_checkpoint)
    ours = dict(nnx.to_flat_state(nnx.state(model.vision, nnx.Param)))
    ref = dict(nnx.to_flat_state(nnx.state(reference, nnx.Param)))
    assert ours.keys() == ref.keys()
    for name, value in ref.items():
        np.testing.assert_array_equal(ours[name][...], value[...], err_msg=str(name))
    assert ours[("layers", "mlp", "fc1", "kernel")][...].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor"
    )
    assert sharding.MESH_AXES == ("data", "fsdp", "tensor")


def test_a_checkpoint_of_another_tower_is_a_one_line_config_error(tiny_clip_checkpoint):
    config = _load("", "tiny", [*NO_TEXT_CHECKPOINT, f"model.vision_checkpoint={tiny_clip_checkpoint}"])
    with pytest.raises(
        configlib.ConfigError, match=r"holds a clip tower but config.model.vision.tower='dinov2'; set "
    ) as e:
        build.vision_config(config)
    assert "\n" not in str(e.value)
    with pytest.raises(configlib.ConfigError, match=r"config.model.vision.tower='vit' unknown; choose one of"):
        build.vision_config(_load("", "tiny", ["model.vision.tower=vit"]))
    assert isinstance(build.vision_config(_load("", "tiny", NO_TEXT_CHECKPOINT)), dinov2.Dinov2Config)
    # mlp_ratio is DINOv2's, not CLIP's
    dinov2_fields = _load("", "tiny", [*NO_TEXT_CHECKPOINT, "model.vision.tower=clip"])
    with pytest.raises(configlib.ConfigError, match=r"^config.model.vision: 'mlp_ratio' is no field of the clip tower"):
        build.vision_config(dinov2_fields)
