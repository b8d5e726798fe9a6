"""Stage 1: training rows, the Hugging Face export, and a short pretraining that learns to name content words."""

import json
import os
from collections import Counter

import jax
import numpy as np
import pytest
from flax import nnx

from lexvla_jax import configlib, hf_loader
from lexvla_jax.miniature import hf_export, lm_pretrain, synthetic
from lexvla_jax.models import llama
from lexvla_jax.text.content_words import content_words
from lexvla_jax.text.prompt import PromptEncoder
from lexvla_jax.text.tokenizer import load_tokenizer
from lexvla_jax.text.vocabulary import filter_vocabulary

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "configs", "tiny.py")
TEMPLATE = configlib.load_config(TINY_CONFIG).data.prompt_template


def _params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _randomise(model, seed: int = 0) -> None:
    """Norm scales away from 1 and biases away from 0, so a misplaced tensor shows in the logits."""
    rng = np.random.default_rng(seed)  # numpy noise: a jax.random draw would compile once per shape
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] in ("scale", "bias"):
            value = variable.get_value()
            variable.set_value(value + 0.2 * rng.normal(size=value.shape).astype(value.dtype))


@pytest.mark.slow
@pytest.mark.parametrize(
    "fields",
    [
        dict(num_key_value_heads=2),
        dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True, rope_theta=500.0, rms_norm_eps=1e-5),
    ],
    ids=["gqa", "mqa_bias"],
)
def test_export_matches_transformers_and_round_trips(tmp_path, fields):
    config = llama.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, **fields
    )
    model = llama.LlamaModel(config, rngs=nnx.Rngs(0))
    _randomise(model)
    out = hf_export.save_hf_llama(model, str(tmp_path / "lm"), bos_id=1, eos_id=2)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]

    reference = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = np.random.default_rng(0).integers(0, 96, (3, 11))
    mask = (np.arange(11)[None] < np.array([[11], [7], [3]])).astype(np.int32)
    with torch.no_grad():
        expected = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    logits = np.asarray(nnx.jit(lambda m, i, a: m(i, a).logits)(model, ids, mask))  # one program, not op by op
    real = mask.astype(bool)
    assert np.abs(logits - expected)[real].max() < 1e-5 * max(1.0, np.abs(expected).max())

    loaded = hf_loader.load_hf_llama(out)
    assert loaded.config.num_key_value_heads == config.num_key_value_heads
    assert loaded.config.rope_theta == config.rope_theta and loaded.config.rms_norm_eps == config.rms_norm_eps
    original, again = _params(model), _params(loaded)
    assert original.keys() == again.keys()
    for path, value in original.items():
        np.testing.assert_array_equal(again[path], value, err_msg=str(path))


def test_export_refuses_what_a_checkpoint_cannot_hold(tmp_path):
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2)
    with_lora = llama.LlamaModel(llama.LlamaConfig(**base, lora_rank=2, lora_targets=("q",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="LoRA parameters"):
        hf_export.save_hf_llama(with_lora, str(tmp_path / "a"))
    headless = llama.LlamaModel(llama.LlamaConfig(**base), with_lm_head=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="with_lm_head=False"):
        hf_export.save_hf_llama(headless, str(tmp_path / "b"))
    tied = llama.LlamaModel(llama.LlamaConfig(**base, tie_word_embeddings=True), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tied weights must be equal"):
        hf_export.save_hf_llama(tied, str(tmp_path / "c"))
    tied.lm_head.set_value(tied.embed_tokens.get_value())
    out = hf_export.save_hf_llama(tied, str(tmp_path / "c"))
    assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is True
    assert not os.path.exists(out + ".partial")


@pytest.fixture(scope="module")
def prompt(synthetic_text):
    _, tokenizer = synthetic_text
    return PromptEncoder(tokenizer, TEMPLATE, max_caption_tokens=24)


def test_rows_are_the_joined_text_with_shuffled_content_words(synthetic_text, prompt, llama2_tokenizer_path):
    captions, tokenizer = synthetic_text
    llama2 = PromptEncoder(load_tokenizer(llama2_tokenizer_path), TEMPLATE, max_caption_tokens=24)
    for encoder in (prompt, llama2):
        builder = lm_pretrain.ExampleBuilder(encoder, max_word_tokens=24, later_words_weight=0.25)
        tok = encoder.tokenizer
        batch = builder.batch(captions[:40], np.random.default_rng(0))
        assert batch["input_ids"].shape == (40, encoder.max_length + 24)
        orders = set()
        for row, caption in enumerate(captions[:40]):
            length = int(batch["attention_mask"][row].sum())
            ids = batch["input_ids"][row, :length].tolist()
            weight = batch["loss_weight"][row]
            start = int(np.argmax(weight))
            assert ids[:start] == encoder.encode(caption) and ids[-1] == tok.eos_id
            assert weight[start] == 1.0 and (weight[start + 1 : length] == 0.25).all()
            assert weight[:start].sum() == 0 and weight[length:].sum() == 0
            text = tok.decode(ids[start:])
            named = text.rstrip(".").split(", ")
            assert sorted(named) == sorted(content_words(caption)) and text.endswith(".")
            assert ids[:-1] == tok.encode(encoder.fill(caption) + " " + text, add_bos=True)
            orders.add(tuple(named))
        assert len(orders) == 40
    # The order is drawn afresh per example.
    builder = lm_pretrain.ExampleBuilder(prompt, max_word_tokens=24)
    caption = "a small red circle above a large blue square"
    start = len(prompt.encode(caption))
    firsts = {tokenizer.id_to_piece(builder.example(caption, np.random.default_rng(s))[0][start]) for s in range(40)}
    assert firsts == {"▁" + w for w in content_words(caption)}


def test_words_that_do_not_fit_are_dropped_from_the_end(prompt):
    caption = "a small red circle above a large blue square"
    exact = PromptEncoder(prompt.tokenizer, TEMPLATE, max_length=len(prompt.encode(caption)))
    builder = lm_pretrain.ExampleBuilder(exact, max_word_tokens=5)  # room for "w1, w2." + EOS
    ids, start = builder.example(caption, np.random.default_rng(0))
    assert len(ids) <= builder.length and ids[-1] == prompt.tokenizer.eos_id
    named = prompt.tokenizer.decode(ids[start:]).rstrip(".").split(", ")
    assert len(named) == 2 and set(named) <= set(content_words(caption))
    # A caption without content words is the prompt alone, with nothing to learn.
    batch = lm_pretrain.ExampleBuilder(prompt, max_word_tokens=5).batch(["a", caption], np.random.default_rng(0))
    assert batch["attention_mask"][0].sum() == len(prompt.encode("a")) and batch["loss_weight"][0].sum() == 0
    assert batch["loss_weight"][1].sum() > 0


def test_template_must_end_before_a_word(synthetic_text, prompt):
    _, tokenizer = synthetic_text
    lm_pretrain.check_template_ends_before_a_word(prompt)
    for template in ['The focus of "[TEXT]" lies on important words: ', 'The focus of "[TEXT]" lies on words:\n']:
        with pytest.raises(configlib.ConfigError, match="must end so that a word follows") as info:
            lm_pretrain.check_template_ends_before_a_word(PromptEncoder(tokenizer, template))
        assert "\n" not in str(info.value)


def _frequency_baseline(train: list[str], held_out: list[str], k: int = 5) -> float:
    """Precision@k of always naming the k most frequent training content words (no look at the caption)."""
    counts = Counter(w for c in train for w in content_words(c))
    top = [w for w, _ in counts.most_common(k)]
    return float(np.mean([len(set(top) & set(content_words(c))) / k for c in held_out]))


@pytest.mark.slow
def test_short_pretraining_names_the_captions_content_words(synthetic_text, prompt, tmp_path):
    captions, tokenizer = synthetic_text
    config = configlib.load_config(
        TINY_CONFIG, ["miniature.lm.steps=150", "miniature.lm.batch_size=32", "miniature.lm.log_every=50"]
    )
    logged = []
    model, losses = lm_pretrain.train_lm(config, prompt, captions, logged.append)
    assert len(losses) == 3 and losses[-1] < losses[0] and "step 150/150" in logged[-1]

    rng = np.random.default_rng(1)
    held_out = [synthetic.captions_for(synthetic.random_scene(rng))[0] for _ in range(200)]
    kept = filter_vocabulary(tokenizer)
    quality = lm_pretrain.next_word_quality(model, prompt, held_out, kept)
    baseline = _frequency_baseline(captions, held_out)
    assert quality["random"] < 0.06
    assert quality["precision@5"] > max(10 * quality["random"], baseline + 0.1), (quality, baseline)

    # z-loss (lm_pretrain.z_loss in the config) pulls the log-partition after the prompt towards 0: here 4.20
    # after 150 steps, against 6.26 trained without it (it starts at log 512 ≈ 6.2).
    assert config.miniature.lm.z_loss > 0
    batch = prompt.batch(held_out)
    forward = nnx.jit(lambda m, ids, mask: m(ids, mask).logits)  # one program, not op by op
    logits = forward(model, batch["input_ids"], batch["attention_mask"])[np.arange(len(held_out)), batch["last_index"]]
    assert float(jax.nn.logsumexp(logits, axis=-1).mean()) < 5.2

    # What stage 2 loads: the saved directory, in transformers and in our loader, predicts the same.
    out = hf_export.save_hf_llama(model, str(tmp_path / "lm"), tokenizer_path=tokenizer.path)
    assert lm_pretrain.is_complete(out) and os.path.isfile(os.path.join(out, "tokenizer.model"))
    reloaded = hf_loader.load_hf_llama(out)
    again = lm_pretrain.next_word_quality(reloaded, prompt, held_out, kept)
    assert again == pytest.approx(quality)


@pytest.mark.slow
def test_z_loss_adds_the_squared_log_partition_on_the_weighted_tokens():
    config = llama.LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    model = llama.LlamaModel(config, rngs=nnx.Rngs(0))
    ids = np.array([[1, 5, 7, 9, 2], [1, 4, 3, 0, 0]], np.int32)
    batch = dict(
        input_ids=ids,
        attention_mask=(ids > 0).astype(np.int32),
        loss_weight=np.array([[0, 0, 1, 0.1, 0.1], [0, 0, 1, 0, 0]], np.float32),
    )
    forward = nnx.jit(lambda m, i, a: m(i, a).logits)  # one program each, not op by op
    logits = np.asarray(forward(model, ids, batch["attention_mask"])[:, :-1], np.float64)
    lse = np.log(np.exp(logits).sum(-1))
    ce = lse - np.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0]
    weight = batch["loss_weight"][:, 1:]
    for z in (0.0, 0.3):
        expected = ((ce + z * lse**2) * weight).sum() / weight.sum()
        got = float(nnx.jit(lm_pretrain.continuation_loss, static_argnums=2)(model, batch, z))
        assert got == pytest.approx(expected, rel=1e-5)


def test_ensure_pretrained_lm_skips_a_complete_directory(tmp_path):
    config = configlib.load_config(TINY_CONFIG, ["data.tokenizer=/nonexistent/tokenizer.model"])
    out = tmp_path / "lm"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")
    logged = []
    assert lm_pretrain.ensure_pretrained_lm(config, str(out), logged.append) == str(out)
    assert logged == [f"stage 1 (language model): using {out}"]


def test_lm_config_is_the_text_tower_without_lora():
    config = configlib.load_config(TINY_CONFIG)
    cfg = lm_pretrain.lm_config(config)
    text = config.model.text
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (
        text.vocab_size,
        text.hidden_size,
        text.num_hidden_layers,
    )
    assert cfg.lora_rank == 0 and cfg.lora_targets == () and cfg.remat == "none"
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.iter_graph(llama.LlamaModel(cfg, rngs=nnx.Rngs(0))))
