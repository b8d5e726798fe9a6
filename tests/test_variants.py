"""The paper's variants as config files: each changes exactly what it says and builds."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lexvla_jax import build, configlib, losses, sharding
from lexvla_jax.models import dinov2, lexical, lexvla, llama
from lexvla_jax.program import make_program
from lexvla_jax.text import bow
from lexvla_jax.text.content_words import content_words
from lexvla_jax.text.vocabulary import filter_vocabulary

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
        (
            "registers",
            "tiny",
            {
                "model.vision.num_register_tokens": (None, 4),
                "model.vision.pos_embed_antialias": (None, True),
                "miniature.vision.dir": ("data/synthetic/vision", "data/synthetic/vision_registers"),
                "model.vision_checkpoint": ("data/synthetic/vision", "data/synthetic/vision_registers"),
            },
        ),
        ("adapter17m", "paper", {}),  # the paper config's adapter is "block" already
        ("adapter17m", "tiny", {"model.adapter_shape": ("mlp", "block")}),
        ("q512", "paper", {"loss.top_k": (0, 512)}),  # the paper config's evaluators score top-512 already
        ("q512", "tiny", {"loss.top_k": (0, 16)}),  # and the tiny one's top-16
        ("qbow", "paper", {"model.text_encoder": ("llm", "bow")}),
        ("qbow", "tiny", {"model.text_encoder": ("llm", "bow")}),
    ],
)
def test_variant_changes_exactly_its_setting(name, base, expected):
    path = os.path.join(VARIANTS, f"{name}.py")
    spec = path if base == "paper" else f"{path}:{base}"
    base_config = configlib.load_config(os.path.join(VARIANTS, f"bases.py:{base}"))
    if name == "qbow":  # no language model: nothing to load, no text tower or LoRA to train
        trainable = base_config.train.trainable
        without_text = tuple(g for g in trainable if g not in ("text", "lora"))
        expected = {**expected, "train.trainable": (trainable, without_text)}
        if base_config.model.text_checkpoint:
            expected["model.text_checkpoint"] = (base_config.model.text_checkpoint, "")
        if "lora" in (base_config.optim.get("lr_scales") or {}):
            expected["optim.lr_scales.lora"] = (base_config.optim.lr_scales.lora, None)
    assert _diff(configlib.load_config(spec), base_config) == expected


def test_unknown_variant_base_is_one_line():
    with pytest.raises(configlib.ConfigError, match=r"variant base 'huge' unknown; append :paper or :tiny") as info:
        configlib.load_config(os.path.join(VARIANTS, "qflops.py") + ":huge")
    assert "\n" not in str(info.value)


def test_qflops_loss_is_the_flops_penalty():
    config = configlib.load_config(os.path.join(VARIANTS, "qflops.py") + ":tiny")
    s_img, s_txt = (jax.nn.relu(jax.random.normal(jax.random.key(i), (6, 20))) for i in range(2))
    kwargs = dict(lambda_img=0.5, lambda_txt=0.25, penalty=config.loss.penalty)
    loss, metrics = jax.jit(lambda a, b: losses.lexvla_loss(a, b, 10.0, **kwargs))(s_img, s_txt)  # not op by op
    expected = jax.jit(losses.info_nce)(s_img, s_txt, 10.0) + 0.5 * jnp.sum(jnp.mean(s_img, 0) ** 2)
    expected += 0.25 * jnp.sum(jnp.mean(s_txt, 0) ** 2)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(metrics["penalty_img"]) != pytest.approx(float(losses.overuse_penalty(s_img)))


def test_registers_variant_builds_dinov2_with_registers():
    model = _abstract(configlib.load_config(os.path.join(VARIANTS, "registers.py")), PAPER_WORDS)
    assert model.vision.config.num_register_tokens == 4 and model.vision.num_prefix_tokens == 5
    assert model.vision.register_tokens.shape == (1, 4, 1024) and model.vision.config.pos_embed_antialias
    tiny = configlib.load_config(
        os.path.join(VARIANTS, "registers.py") + ":tiny", ["model.text_checkpoint=", "model.vision_checkpoint="]
    )
    model = nnx.eval_shape(lambda: lexvla.LexVLA(build.model_config(tiny, 12), rngs=nnx.Rngs(0)))
    pixels = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    # 8×8 patches of width 64: CLS and the 4 registers are dropped.
    assert nnx.eval_shape(lambda m, x: m.patch_features(x), model, pixels).shape == (2, 64, 64)


def test_adapter_shapes_have_the_reported_sizes():
    paper = os.path.join(REPO, "configs", "lexvla_cc12m.py")
    block = configlib.load_config(paper)
    mlp = configlib.load_config(paper, ["model.adapter_shape=mlp"])
    counts = {c.model.adapter_shape: _count(nnx.state(_abstract(c, PAPER_WORDS).adapter)) for c in (mlp, block)}
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


# ------------------------------------------------------------------------------------------------------ Q(512)


@functools.partial(jax.jit, static_argnums=(1,))
def _lexical(seed: int, shape=(6, 40)) -> jax.Array:
    return lexical.l2_normalize(jax.nn.softplus(2 * jax.random.normal(jax.random.key(seed), shape)))


def test_q512_sets_training_and_evaluation_top_k():
    paper = configlib.load_config(os.path.join(VARIANTS, "q512.py"))
    tiny = configlib.load_config(os.path.join(VARIANTS, "q512.py") + ":tiny")
    for config, k in ((paper, 512), (tiny, 16)):
        assert config.loss.top_k == k
        retrieval = [e for e in config.evals.values() if e.type == "retrieval"]
        assert retrieval and all("topk" in e.modes and e.top_k == k for e in retrieval)


@pytest.mark.slow
def test_top_k_loss_is_info_nce_of_the_sparsified_vectors():
    s_img, s_txt, k = _lexical(0), _lexical(1), 7
    kwargs = dict(lambda_img=0.5, lambda_txt=0.25, penalty="overuse")
    loss, metrics = jax.jit(lambda a, b: losses.lexvla_loss(a, b, 10.0, top_k=k, **kwargs))(s_img, s_txt)

    def by_hand(x):  # the k largest entries of each row, the rest zero, not renormalised
        x = np.asarray(x)
        keep = np.zeros_like(x, bool)
        np.put_along_axis(keep, np.argsort(-x, axis=1)[:, :k], True, axis=1)
        return np.where(keep, x, 0.0)

    info_nce = jax.jit(losses.info_nce)  # one program each, not op by op
    expected = info_nce(by_hand(s_img), by_hand(s_txt), 10.0)
    np.testing.assert_allclose(metrics["info_nce"], expected, rtol=1e-6)
    penalty = jax.jit(losses.overuse_penalty)
    penalties = 0.5 * penalty(s_img) + 0.25 * penalty(s_txt)  # the whole vectors
    np.testing.assert_allclose(loss, expected + penalties, rtol=1e-6)
    assert float(metrics["info_nce"]) != pytest.approx(float(info_nce(s_img, s_txt, 10.0)), rel=1e-3)
    assert float(metrics["topk_words_img"]) == float(metrics["topk_words_txt"]) == k

    # The contrastive gradient reaches the kept entries only (penalties off: λ = 0), and every kept entry whose
    # word the other side keeps somewhere.
    g_img, g_txt = jax.jit(
        jax.grad(lambda a, b: losses.lexvla_loss(a, b, 10.0, lambda_img=0.0, lambda_txt=0.0, top_k=k)[0], (0, 1))
    )(s_img, s_txt)
    for g, s, other in ((g_img, s_img, s_txt), (g_txt, s_txt, s_img)):
        kept, shared = by_hand(s) != 0, np.any(by_hand(other) != 0, axis=0)
        assert np.all(np.asarray(g)[~kept] == 0) and np.all(np.asarray(g)[kept & shared] != 0)
        assert np.count_nonzero(kept & shared) > len(s)
    with pytest.raises(ValueError, match=r"top_k=-1 must be >= 0"):
        losses.lexvla_loss(s_img, s_txt, 10.0, top_k=-1, **kwargs)


def test_top_k_beyond_the_vocabulary_is_one_line():
    config = configlib.load_config(
        os.path.join(VARIANTS, "q512.py") + ":tiny",
        ["loss.top_k=13", "model.text_checkpoint=", "model.vision_checkpoint="],
    )
    mesh = sharding.mesh_from_config(config.mesh)
    with pytest.raises(configlib.ConfigError, match=r"^config.loss.top_k=13 must be in \[0, V'=12\]"):
        make_program(config, mesh, build.abstract_model(config, 12))


# ------------------------------------------------------------------------------------------------------ Q(BoW)


@pytest.fixture(scope="module")
def bow_setup(synthetic_text):
    """The tiny Q(BoW) model (kept vocabulary of the synthetic tokenizer) and its bag-of-words encoder."""
    captions, tokenizer = synthetic_text
    config = configlib.load_config(os.path.join(VARIANTS, "qbow.py") + ":tiny", ["model.vision_checkpoint="])
    kept_ids = filter_vocabulary(tokenizer, config.model.vocab_filter)
    encoder = build.caption_encoder(config, tokenizer, kept_ids)
    model = lexvla.LexVLA(build.model_config(config, len(kept_ids)), rngs=nnx.Rngs(0))
    return captions, tokenizer, kept_ids, encoder, model


def test_bow_vector_is_the_unit_indicator_of_the_content_words(bow_setup):
    captions, tokenizer, kept_ids, encoder, model = bow_setup
    assert isinstance(encoder, bow.BowEncoder)
    kept = {int(t): c for c, t in enumerate(kept_ids)}
    texts = [*captions[:20], "Potted plants: a small red circle, a small red circle!"]
    batch = encoder.batch(texts)
    encode = nnx.jit(lambda m, ids, mask: m.encode_text(ids, mask))
    s = np.asarray(encode(model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])))
    for text, row in zip(texts, s, strict=True):
        expected = {kept[t] for w in content_words(text) for t in tokenizer.encode(w) if t in kept}
        assert expected and set(np.flatnonzero(row)) == expected, text
        np.testing.assert_allclose(row[sorted(expected)], len(expected) ** -0.5, rtol=1e-6)  # repeats count once
        np.testing.assert_allclose(np.linalg.norm(row), 1.0, rtol=1e-6)
    pieces = [tokenizer.id_to_piece(int(kept_ids[c])) for c in encoder.columns(captions[0])]
    print(f"\n{captions[0]!r} → {pieces}")


def test_bow_text_without_kept_words_is_the_zero_vector_and_counted(bow_setup):
    captions, _, _, encoder, model = bow_setup
    texts = [captions[0], "What is it?", captions[1], "   "]
    batch = encoder.batch(texts)
    assert batch["attention_mask"][[1, 3]].sum() == 0
    encode = nnx.jit(lambda m, ids, mask: m.encode_text(ids, mask))  # one program, not op by op
    s_txt = encode(model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    np.testing.assert_array_equal(np.asarray(s_txt)[[1, 3]], 0.0)
    s_img = _lexical(2, (4, s_txt.shape[1]))
    loss_fn = lambda a: losses.lexvla_loss(a, s_txt, 10.0, lambda_img=1e-3, lambda_txt=1e-3)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(s_img)
    assert np.isfinite(float(loss)) and int(metrics["empty_txt"]) == 2 and int(metrics["empty_img"]) == 0
    assert np.all(np.isfinite(np.asarray(grads)))


def test_bow_rows_keep_the_first_max_words_columns(bow_setup):
    captions, tokenizer, kept_ids, _, _ = bow_setup
    short = bow.BowEncoder(tokenizer, kept_ids, max_words=2)
    full = bow.BowEncoder(tokenizer, kept_ids, max_words=24).columns(captions[0])
    ids, mask = short(captions[0])
    assert len(full) > 2 and list(ids) == full[:2] and list(mask) == [1, 1]


def test_qbow_paper_builds_without_a_text_tower():
    bow_model = _abstract(configlib.load_config(os.path.join(VARIANTS, "qbow.py")), PAPER_WORDS)
    llm_model = _abstract(configlib.load_config(os.path.join(REPO, "configs", "lexvla_cc12m.py")), PAPER_WORDS)
    bow_state, llm_state = nnx.state(bow_model, nnx.Param), nnx.state(llm_model, nnx.Param)
    assert set(bow_state.keys()) == {"vision", "adapter", "visual_codebook", "logit_scale"}
    assert _count(bow_state) == _count(llm_state) - _count(llm_state["text"]) - _count(llm_state["text_codebook"])
    assert bow_state["visual_codebook"].shape == (PAPER_WORDS, 4096)  # Llama-2-7B's width, random rows
    assert _count(llm_state["text"]) > 6.6e9 and _count(bow_state) < 0.4e9


def test_qbow_with_a_text_checkpoint_is_one_line():
    config = configlib.load_config(os.path.join(VARIANTS, "qbow.py"), ["model.text_checkpoint=/ckpt/llama"])
    with pytest.raises(configlib.ConfigError, match=r"^config.model.text_encoder='bow' uses no language model; set"):
        build.model_config(config, 10)
    config = configlib.load_config(os.path.join(VARIANTS, "qbow.py"), ["model.text_encoder=gpt"])
    with pytest.raises(configlib.ConfigError, match=r"text_encoder='gpt' unknown; choose one of \('llm', 'bow'\)"):
        build.model_config(config, 10)


def test_compile_shapes_of_the_bow_text_rows():
    """`lexvla compile` feeds the step text rows of the text side's length: prompt or bag of words."""
    from lexvla_jax import aot

    paper = configlib.load_config(os.path.join(REPO, "configs", "lexvla_cc12m.py"))
    qbow = configlib.load_config(os.path.join(VARIANTS, "qbow.py"))
    assert aot._vocab_and_length(paper) == (17149, paper.data.max_length)
    assert aot._vocab_and_length(qbow) == (17149, qbow.data.max_caption_tokens) != (17149, paper.data.max_length)
