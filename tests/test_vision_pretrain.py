"""Stage 0: the Hugging Face DINOv2 export, the views, the shape probe, and the self-distillation step."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lexvla_jax import configlib, hf_loader
from lexvla_jax.evaluate.patchdis import UNSCORED
from lexvla_jax.miniature import hf_export, shape_probe, vision_pretrain
from lexvla_jax.models import dinov2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "configs", "tiny.py")


def _params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _randomise(model, seed: int = 0) -> None:
    """Every parameter moved by noise (norm scales off 1, biases and LayerScale off their init), so a misplaced
    tensor shows in the outputs."""
    rng = np.random.default_rng(seed)  # numpy noise: a jax.random draw would compile once per shape
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = variable.get_value()
        variable.set_value(value + 0.2 * rng.normal(size=value.shape).astype(value.dtype))


@pytest.mark.slow
@pytest.mark.parametrize(
    "fields",
    [dict(), dict(num_register_tokens=2, pos_embed_antialias=True, use_swiglu_ffn=True, qkv_bias=False)],
    ids=["dinov2", "registers_swiglu"],
)
def test_dinov2_export_matches_transformers_and_round_trips(tmp_path, fields):
    config = dinov2.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2.0, patch_size=8, image_size=32,
        drop_path_rate=0.1, **fields,
    )  # fmt: skip
    model = dinov2.Dinov2Model(config, rngs=nnx.Rngs(0))
    _randomise(model)
    token = np.linspace(-1, 1, 32).astype(np.float32)
    out = hf_export.save_hf_dinov2(model, str(tmp_path / "tower"), mask_token=token)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["drop_path_rate"] == 0.0  # a tower to freeze carries no training regularisation

    cls = transformers.Dinov2WithRegistersModel if fields else transformers.Dinov2Model
    reference = cls.from_pretrained(out).eval()
    np.testing.assert_array_equal(reference.embeddings.mask_token.detach().numpy()[0], token)
    pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    masked = np.zeros((2, 16), bool)
    masked[0, [1, 5, 6]] = masked[1, 0] = True
    forward = nnx.jit(lambda m, x, mask: m(x, masked=mask, mask_token=jnp.asarray(token)).last_hidden_state)
    for size, mask in ((32, None), (32, masked), (48, None)):  # 48 px: position embeddings resampled
        x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32) if size != 32 else pixels
        with torch.no_grad():
            expected = reference(
                torch.tensor(x.transpose(0, 3, 1, 2)),
                bool_masked_pos=None if mask is None else torch.tensor(mask),
            ).last_hidden_state.numpy()
        ours = np.asarray(forward(model, x, mask))  # one program, not op by op
        assert np.abs(ours - expected).max() < 1e-5 * max(1.0, np.abs(expected).max()), (size, mask is None)

    loaded = hf_loader.load_hf_dinov2(out)
    assert loaded.config.drop_path_rate == 0.0
    assert loaded.config.num_register_tokens == config.num_register_tokens
    original, again = _params(model), _params(loaded)
    assert original.keys() == again.keys()
    for path, value in original.items():
        np.testing.assert_array_equal(again[path], value, err_msg=str(path))


def test_crop_views_are_crops_of_the_image():
    """A constant image stays constant under any crop; a full crop without jitter of a gradient image keeps its
    values in range and mirrors it for about half of the images."""
    key = jax.random.key(0)
    crop_views = jax.jit(vision_pretrain.crop_views, static_argnums=(2, 3, 4))  # as in the step (op by op: ~15 s)
    flat = jnp.full((8, 16, 16, 3), 77, jnp.uint8)
    views = crop_views(flat, key, 8, (0.2, 0.5), 0.0)
    assert views.shape == (8, 8, 8, 3)
    np.testing.assert_allclose(np.asarray(views), 77.0, atol=1e-3)
    ramp = jnp.broadcast_to(jnp.arange(16, dtype=jnp.float32)[None, None, :, None] * 10, (64, 16, 16, 3))
    full = np.asarray(crop_views(ramp.astype(jnp.uint8), key, 16, (1.0, 1.0), 0.0))
    assert full.min() >= 0 and full.max() <= 150
    increasing = full[:, 8, -1, 0] > full[:, 8, 0, 0]
    assert 16 < increasing.sum() < 48  # mirrored with probability 1/2


def test_ridge_probe_reads_a_linearly_coded_label():
    """Features that hold the label in one coordinate probe near 1; pure noise near the majority rate."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=(40, 16)).astype(np.int32)
    labels[:, :4] = UNSCORED
    noise = rng.normal(size=(40, 16, 8)).astype(np.float32)
    coded = noise.copy()
    coded[..., :6] += 4 * np.eye(6)[np.maximum(labels, 0)]
    assert shape_probe.ridge_probe(coded, labels, 6)["accuracy"] > 0.95
    blind = shape_probe.ridge_probe(noise, labels, 6)
    assert blind["accuracy"] < 0.3 and blind["test_patches"] == 20 * 12


def test_probe_set_masks_match_the_images():
    images, masks = shape_probe.probe_set(4, 32, seed=3)
    assert images.shape == (4, 32, 32, 3) and masks.shape == (4, 32, 32) and images.dtype == np.uint8
    background = masks == 0
    for image, mask, bg in zip(images, masks, background, strict=True):
        assert mask.max() >= 1  # every scene has an object
        # background pixels are one colour (up to JPEG and noise), object pixels differ from it
        colour = np.median(image[bg], axis=0)
        assert np.abs(image[bg].astype(float) - colour).mean() < 12
        assert np.abs(image[~bg].astype(float) - colour).mean() > 20


def _short_config(**extra):
    values = {
        "miniature.vision.steps": 12,
        "miniature.vision.batch_size": 16,
        "miniature.vision.local_crops": 1,
        "miniature.vision.log_every": 4,
        "miniature.vision.warmup_steps": 2,
        "model.vision.image_size": 32,
        **extra,
    }
    return configlib.load_config(TINY_CONFIG, [f"{k}={v}" for k, v in values.items()])


@pytest.mark.slow
def test_a_step_moves_the_teacher_as_an_average_of_the_student():
    """One step: every loss term is positive and finite, the teacher becomes m·teacher + (1−m)·student with the
    step's momentum, and the centres move toward the teacher's mean logits."""
    config = _short_config()
    cfg = config.miniature.vision
    graphdef, student = nnx.split(vision_pretrain.new_learner(config), nnx.Param)
    teacher = jax.tree.map(lambda x: 0.5 * x, student)
    tx = optax.adamw(1e-2)
    centers = {"cls": jnp.zeros((cfg.prototypes,)), "patch": jnp.zeros((cfg.prototypes,))}
    step = vision_pretrain.pretrain_step_fn(graphdef, tx, cfg, vision_pretrain.vision_config(config))
    images = shape_probe.probe_set(8, 32, seed=1)[0]
    new_student, new_teacher, _, new_centers, terms = step(
        student, teacher, tx.init(student), centers, images, jax.random.key(0), jnp.float32(0)
    )
    for name in ("dino", "ibot", "pixel", "koleo"):
        assert np.isfinite(float(terms[name])) and float(terms[name]) > 0, name
    m = float(vision_pretrain.Schedule(cfg).momentum(jnp.float32(0)))
    assert m == pytest.approx(cfg.momentum)
    for t0, s1, t1 in zip(
        jax.tree.leaves(teacher), jax.tree.leaves(new_student), jax.tree.leaves(new_teacher), strict=True
    ):
        np.testing.assert_allclose(np.asarray(t1), m * np.asarray(t0) + (1 - m) * np.asarray(s1), rtol=1e-5, atol=1e-6)
    assert any(
        np.abs(np.asarray(a) - np.asarray(b)).max() > 0
        for a, b in zip(jax.tree.leaves(student), jax.tree.leaves(new_student), strict=True)
    )
    assert float(jnp.abs(new_centers["cls"]).max()) > 0 and float(jnp.abs(new_centers["patch"]).max()) > 0


def test_warmup_longer_than_training_is_one_line():
    config = _short_config(**{"miniature.vision.warmup_steps": 12})
    with pytest.raises(configlib.ConfigError, match=r"^config.miniature.vision.warmup_steps=12 must be .* steps=12"):
        vision_pretrain.train_vision(config, np.zeros((4, 32, 32, 3), np.uint8))


@pytest.mark.slow
def test_without_self_distillation_no_teacher_loss_is_computed():
    """dino_weight = ibot_weight = 0: pixel reconstruction alone; the teacher still follows the student (EMA)."""
    config = _short_config(**{"miniature.vision.dino_weight": 0.0, "miniature.vision.ibot_weight": 0.0})
    logged = []
    teacher, history = vision_pretrain.train_vision(config, shape_probe.probe_set(16, 32, seed=1)[0], logged.append)
    assert history["dino"] == [0.0, 0.0, 0.0] and history["ibot"] == [0.0, 0.0, 0.0]
    assert all(v > 0 for v in history["pixel"]) and "stage 0 (vision tower): step 12/12" in logged[-1]
    start = _params(vision_pretrain.new_learner(config))
    assert any(np.abs(a - start[p]).max() > 0 for p, a in _params(teacher).items())


def test_tiny_config_loads_and_freezes_the_stage_0_tower():
    """configs/tiny.py reads stage 0's directory as its vision checkpoint and trains no vision weight; :scratch and an
    overridden checkpoint pretrain nothing; moving the directory moves the checkpoint."""
    from lexvla_jax.miniature import prepare

    tiny = configlib.load_config(TINY_CONFIG)
    assert tiny.model.vision_checkpoint == tiny.miniature.vision.dir and prepare.uses_pretrained_vision(tiny)
    assert "vision" not in tiny.train.trainable
    assert set(tiny.train.trainable) == {"adapter", "visual_codebook", "logit_scale", "lora"}
    scratch = configlib.load_config(TINY_CONFIG + ":scratch")
    assert not prepare.uses_pretrained_vision(scratch) and "vision" in scratch.train.trainable
    moved = configlib.load_config(TINY_CONFIG, ["miniature.vision.dir=/elsewhere/vision"])
    assert moved.model.vision_checkpoint == "/elsewhere/vision"
    off = configlib.load_config(TINY_CONFIG, ["model.vision_checkpoint="])
    assert off.miniature.vision.dir == tiny.miniature.vision.dir and not prepare.uses_pretrained_vision(off)


def test_bad_train_images_are_skipped_and_counted(tmp_path):
    """Stage 0 reads the train tars with the pipeline's rules: an undecodable image is skipped and counted."""
    from lexvla_jax.miniature import synthetic

    good = synthetic.make_sample(0, "train", 0, "000000000", 32)
    members = synthetic.sample_members("000000000", good)
    members += synthetic.sample_members("000000001", {**good, "jpg": b"not a jpeg"})
    data, _ = synthetic.tar_bytes(members)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "shard-00000.tar").write_bytes(data)
    config = configlib.load_config(TINY_CONFIG, [f"data.train_shards={tmp_path}/train/shard-00000.tar"])
    images, skipped = vision_pretrain.read_images(config.data, 32)
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8 and skipped == 1
