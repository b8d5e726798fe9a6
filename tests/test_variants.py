"""The paper's variants as config files: each changes exactly what it says and builds."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lexvla_jax import build, configlib, losses
from lexvla_jax.models import dinov2, lexvla, llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = os.path.join(REPO, "configs", "variants")
PAPER_WORDS = 17182  # the default vocabulary rule on Llama 2


def _flat(config) -> dict:
    return {k: config[k] for k in configlib.flat_keys(config) if not hasattr(config[k], "keys")}


def _diff(variant, base) -> dict:
    a, b = _flat(variant), _flat(base)
    return {k: (b.get(k), a.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract(config, num_words: int) -> lexvla.LexVLA:
    cfg = dataclasses.replace(build.model_config(config, num_words), adapter_shape=config.model.adapter_shape)
    return nnx.eval_shape(lambda: lexvla.LexVLA(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize(
    "name, base, expected",
    [
        ("qflops", "paper", {"loss.penalty": ("overuse", "flops")}),
        ("qflops", "tiny", {"loss.penalty": ("overuse", "flops")}),
        ("registers", "paper", {"model.vision.preset": ("dinov2_vitl14", "dinov2_vitl14_reg")}),
        ("registers", "tiny", {"model.vision.num_register_tokens": (None, 4)}),
        ("adapter17m", "paper", {"model.adapter_shape": ("mlp", "block")}),
        ("adapter17m", "tiny", {"model.adapter_shape": ("mlp", "block")}),
    ],
)
def test_variant_changes_exactly_its_setting(name, base, expected):
    path = os.path.join(VARIANTS, f"{name}.py")
    spec = path if base == "paper" else f"{path}:{base}"
    base_config = configlib.load_config(os.path.join(REPO, "configs", configlib.VARIANT_BASES[base]))
    assert _diff(configlib.load_config(spec), base_config) == expected


def test_unknown_variant_base_is_one_line():
    with pytest.raises(configlib.ConfigError, match=r"variant base 'huge' unknown; append :paper or :tiny") as info:
        configlib.load_config(os.path.join(VARIANTS, "qflops.py") + ":huge")
    assert "\n" not in str(info.value)


def test_qflops_loss_is_the_flops_penalty():
    config = configlib.load_config(os.path.join(VARIANTS, "qflops.py") + ":tiny")
    s_img, s_txt = (jax.nn.relu(jax.random.normal(jax.random.key(i), (6, 20))) for i in range(2))
    loss, metrics = losses.lexvla_loss(s_img, s_txt, 10.0, lambda_img=0.5, lambda_txt=0.25, penalty=config.loss.penalty)
    expected = losses.info_nce(s_img, s_txt, 10.0) + 0.5 * jnp.sum(jnp.mean(s_img, 0) ** 2)
    expected += 0.25 * jnp.sum(jnp.mean(s_txt, 0) ** 2)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(metrics["penalty_img"]) != pytest.approx(float(losses.overuse_penalty(s_img)))


def test_registers_variant_builds_dinov2_with_registers():
    model = _abstract(configlib.load_config(os.path.join(VARIANTS, "registers.py")), PAPER_WORDS)
    assert model.vision.config.num_register_tokens == 4 and model.vision.num_prefix_tokens == 5
    assert model.vision.register_tokens.shape == (1, 4, 1024) and model.vision.config.pos_embed_antialias
    tiny = configlib.load_config(os.path.join(VARIANTS, "registers.py") + ":tiny", ["model.text_checkpoint="])
    model = nnx.eval_shape(lambda: lexvla.LexVLA(build.model_config(tiny, 12), rngs=nnx.Rngs(0)))
    pixels = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    # 8×8 patches of width 64: CLS and the 4 registers are dropped.
    assert nnx.eval_shape(lambda m, x: m.patch_features(x), model, pixels).shape == (2, 64, 64)


def test_adapter_shapes_have_the_reported_sizes():
    paper = configlib.load_config(os.path.join(REPO, "configs", "lexvla_cc12m.py"))
    block = configlib.load_config(os.path.join(VARIANTS, "adapter17m.py"))
    counts = {c.model.adapter_shape: _count(nnx.state(_abstract(c, PAPER_WORDS).adapter)) for c in (paper, block)}
    assert counts["mlp"] == pytest.approx(25.2e6, rel=0.005)
    assert counts["block"] == pytest.approx(16.8e6, rel=0.005)  # the paper reports ~17M


def test_block_adapter_shapes_and_parameter_count():
    vision = dinov2.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, patch_size=8, image_size=32
    )
    text = llama.LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    dv, dt, m = 32, 48, 40
    sizes = {}
    for shape in lexvla.ADAPTER_SHAPES:
        config = lexvla.LexVLAConfig(
            vision=vision, text=text, vocab_size=10, adapter_heads=4, adapter_mlp_dim=m, adapter_shape=shape
        )
        adapter = lexvla.Adapter(config, rngs=nnx.Rngs(0))
        assert nnx.eval_shape(lambda a, x: a(x), adapter, jnp.ones((2, 16, dv))).shape == (2, 16, dt)
        sizes[shape] = _count(nnx.state(adapter, nnx.Param))
    attention, norm = 4 * (dv * dv + dv), 2 * dv
    assert sizes["mlp"] == attention + 2 * norm + (dv * m + m) + (m * dt + dt)
    assert sizes["block"] == attention + 3 * norm + (dv * m + m) + (m * dv + dv) + (dv * dt + dt)
    with pytest.raises(ValueError, match=r"adapter_shape='wide' unknown; choose one of \('mlp', 'block'\)"):
        lexvla.LexVLAConfig(vision=vision, text=text, vocab_size=10, adapter_shape="wide")
