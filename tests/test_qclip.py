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


# pos_interpolation is DINOv2's choice of position-table resampling; CLIP and SigLIP resample as transformers.
# Evaluation pixels: CLIP's and SigLIP's shorter side goes to the image size (crop fraction 1.0), not DINOv2's 256 → 224
# (`:tiny` already evaluates at 1.0).
PAPER_CROP = {"data.eval_crop_pct": (0.875, 1.0)}


@pytest.mark.parametrize(
    "name, base, expected",
    [
        (
            "qclip",
            "paper",
            {
                "model.vision.tower": ("dinov2", "clip"),
                "model.vision.preset": ("dinov2_vitl14", "clip_vitl14"),
                "model.vision.pos_interpolation": ("hf", None),
                **PAPER_CROP,
            },
        ),
        (
            "siglip",
            "paper",
            {
                "model.vision.tower": ("dinov2", "siglip"),
                "model.vision.preset": ("dinov2_vitl14", "siglip_so400m14"),
                "model.vision.pos_interpolation": ("hf", None),
                **PAPER_CROP,
            },
        ),
        *(
            (
                name,
                "tiny",
                {
                    "model.vision.tower": ("dinov2", tower),
                    "model.vision.mlp_ratio": (2.0, None),
                    "model.vision.intermediate_size": (None, 128),
                },
            )
            for name, tower in (("qclip", "clip"), ("siglip", "siglip"))
        ),
    ],
)
def test_variant_changes_only_the_image_tower_and_its_eval_crop(name, base, expected):
    a, b = _leaves(_load(name, base)), _leaves(_load("", base))
    diff = {k: (b.get(k), a.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    assert diff == expected
    assert _load(name, base).data.eval_crop_pct == 1.0


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


def test_paper_base_with_a_clip_tower_and_checkpoint_loads_the_checkpoints_config(tiny_clip_checkpoint):
    """The paper base sets DINOv2's `pos_interpolation`; with `model.vision.tower=clip` and a CLIP checkpoint the
    tower is the checkpoint's (CLIP resamples as transformers, the 'hf' default); another choice is a one-line error."""
    overrides = [*VISION_ONLY, "model.vision.tower=clip", f"model.vision_checkpoint={tiny_clip_checkpoint}"]
    config = _load("", "paper", overrides)
    assert config.model.vision.pos_interpolation == "hf"
    v = build.vision_config(config)
    assert isinstance(v, clip.ClipVisionConfig) and v.family == "clip" and v.image_norm == "clip"
    assert (v.hidden_size, v.num_hidden_layers, v.patch_size, v.image_size) == (64, 2, 8, 64)
    model = _abstract(config, 12)
    assert model.vision.position_embeddings.shape == (65, 64)
    with pytest.raises(
        configlib.ConfigError,
        match=r"^config.model.vision.pos_interpolation='dinov2' is DINOv2's; a clip tower resamples",
    ) as e:
        build.vision_config(_load("", "paper", [*overrides, "model.vision.pos_interpolation=dinov2"]))
    assert "\n" not in str(e.value)


# After the tests that build CLIP checkpoints: transformers' image processors are then imported already.
@pytest.mark.parametrize("width, height", [(500, 333), (375, 500)])
def test_qclip_evaluates_pixels_as_clips_image_processor(width, height):
    """Q(CLIP)'s evaluation pixels (paper config) are CLIPImageProcessor's: shorter side to 224 (bicubic), centre crop
    224, before its normalisation; within 1 grey level. The base's DINOv2 256 → 224 is far from them."""
    from PIL import Image

    from lexvla_jax.data.eval_set import eval_image

    rng = np.random.default_rng(width)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    waves = np.stack([np.sin(2 * np.pi * (f * x + g * y)) for f, g in rng.uniform(1, 6, (3, 2))], -1)
    pixels = np.clip(127.5 + 90 * waves + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    processor = transformers.CLIPImageProcessorPil(do_rescale=False, do_normalize=False)
    expected = processor(images=Image.fromarray(pixels), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert expected.shape == (224, 224, 3)
    ours = eval_image({"pixels": pixels}, _load("qclip").data).astype(int)
    assert np.abs(ours - expected.astype(int)).max() <= 1
    dinov2 = eval_image({"pixels": pixels}, _load("").data).astype(int)
    assert np.abs(dinov2 - expected.astype(int)).mean() > 10
