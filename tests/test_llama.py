"""Llama tower: parity with transformers, padding, LoRA, sharded streaming load, bf16 compute, remat."""

import copy
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from support import jaxpr_counts

from lexvla_jax import configlib, hf_layout, hf_loader, sharding
from lexvla_jax.models import layers, llama
from lexvla_jax.program import make_program

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
HF_CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2, rope_theta=5000.0),
    "mqa": dict(num_key_value_heads=1, rope_theta=500000.0, attention_bias=True, mlp_bias=True),
}
TINY_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py") + ":scratch"
LENGTHS = (10, 7, 4, 1)  # real tokens per row; rows are padded to 10


def _randomise(model) -> None:
    """Random weights of a sensible scale, RMSNorm scales included (HF initialises those to exactly 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0, 1)
            else:
                p.normal_(0, 0.125)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """`{name: (LlamaForCausalLM, checkpoint dir)}` for MHA, GQA and MQA (with biases) tiny models."""
    out = {}
    for i, (name, extra) in enumerate(HF_CONFIGS.items()):
        torch.manual_seed(i)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, **extra)).eval()
        _randomise(model)
        path = tmp_path_factory.mktemp(f"llama_{name}")
        model.save_pretrained(path)
        out[name] = (model, str(path))
    return out


@pytest.fixture(scope="session")
def batch():
    """Token ids `[4,10]` with right- and left-padding masks (padded slots hold arbitrary tokens)."""
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (len(LENGTHS), 10))
    right = (np.arange(10)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
    return ids, {"right": right, "left": right[:, ::-1].copy()}


@nnx.jit(static_argnames="deterministic")
def _forward(model, ids, mask=None, positions=None, deterministic=True):
    return model(ids, mask, positions, deterministic=deterministic)


def _hf_forward(model, ids, mask):
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    return out.logits.float().numpy(), out.hidden_states[-1].float().numpy()


def _max_diff(a, b, mask=None):
    diff = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    return float(diff[np.asarray(mask).astype(bool)].max() if mask is not None else diff.max())


def _loss(model):
    ids = jnp.asarray(np.arange(24).reshape(2, 12) % TINY["vocab_size"])
    return jnp.mean(jnp.square(model(ids).logits))


# --- config ------------------------------------------------------------------------------------------


def test_from_hf_reads_gqa_rope_and_biases(hf_checkpoints):
    config = llama.LlamaConfig.from_hf(hf_checkpoints["mqa"][0].config.to_dict(), remat="full")
    assert (config.num_key_value_heads, config.head_dim, config.rope_theta) == (1, 16, 500000.0)
    assert config.attention_bias and config.mlp_bias and config.remat == "full"
    # transformers < 5 files: rope_theta at top level, rope_scaling null.
    old = llama.LlamaConfig.from_hf({"model_type": "llama", "rope_theta": 1e6, "rope_scaling": None, **TINY})
    assert old.rope_theta == 1e6 and old.num_key_value_heads == 4


@pytest.mark.parametrize(
    "hf, message",
    [
        ({"model_type": "mistral"}, "model_type is 'mistral', not 'llama'"),
        ({"model_type": "llama", "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope type 'linear'"),
        ({"model_type": "llama", "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
        ({"model_type": "llama", "num_attention_heads": 6, "num_key_value_heads": 4}, "not a multiple"),
    ],
)
def test_from_hf_rejects_unsupported_configs_in_one_line(hf, message):
    with pytest.raises(ValueError, match=message) as info:
        llama.LlamaConfig.from_hf(hf)
    assert "\n" not in str(info.value)


def test_bad_runtime_fields_are_rejected():
    with pytest.raises(ValueError, match=r"lora_targets \['qkv'\] unknown"):
        llama.LlamaConfig(**TINY, lora_rank=4, lora_targets=("qkv",))
    with pytest.raises(ValueError, match="remat='some' unknown"):
        llama.LlamaConfig(**TINY, remat="some")
    with pytest.raises(ValueError, match="unknown Llama preset 'llama3-8b'"):
        llama.llama_preset("llama3-8b")


def _count(config, kind):
    abstract = nnx.eval_shape(lambda: llama.LlamaModel(config, rngs=nnx.Rngs(0)))
    return sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(abstract, kind)))


def test_presets_have_llama2_parameter_counts():
    # Llama-2-7b-hf has 6,738,415,616 parameters; r=8 LoRA on all seven linears adds 32·8·(4·8192 + 3·15104).
    config = llama.llama_preset("llama2-7b", lora_rank=8, lora_targets=llama.LORA_TARGETS)
    assert _count(config, nnx.Not(nnx.LoRAParam)) == 6_738_415_616
    assert _count(config, nnx.LoRAParam) == 19_988_480
    big = llama.llama_preset("llama2-70b")
    assert (big.num_attention_heads, big.num_key_value_heads, big.head_dim) == (64, 8, 128)
    assert llama.llama_preset("llama2-13b", rope_theta=1e6).rope_theta == 1e6
    tiny = llama.llama_preset("llama2-tiny")
    assert (
        tiny.vocab_size == 32000
        and _count(tiny, nnx.Param) == 2 * 32000 * 64 + 2 * (4 * 64 * 48 + 3 * 64 * 192 + 128) + 64
    )


# --- parity with transformers -------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_matches_transformers(hf_checkpoints, batch, name, side):
    hf_model, path = hf_checkpoints[name]
    ids, masks = batch
    mask = masks[side]
    want_logits, want_hidden = _hf_forward(hf_model, ids, mask)
    out = _forward(hf_loader.load_hf_llama(path), jnp.asarray(ids), jnp.asarray(mask))
    logits_diff = _max_diff(out.logits, want_logits, mask)
    hidden_diff = _max_diff(out.last_hidden_state, want_hidden, mask)
    print(
        f"\n{name}/{side}: logits max|Δ| {logits_diff:.2e} (|logits| ≤ {np.abs(want_logits).max():.1f}), "
        f"hidden max|Δ| {hidden_diff:.2e}"
    )
    assert logits_diff <= 1e-4 and hidden_diff <= 1e-4
    assert out.logits.dtype == jnp.float32
    # Fully padded query rows (left padding) attend to nothing; they must still be finite.
    assert np.isfinite(np.asarray(out.logits)).all()


def test_hf_last_hidden_state_is_after_the_final_norm(hf_checkpoints, batch):
    hf_model, _ = hf_checkpoints["gqa"]
    ids, masks = batch
    _, hidden = _hf_forward(hf_model, ids, masks["right"])
    with torch.no_grad():
        base = hf_model.model(torch.tensor(ids), attention_mask=torch.tensor(masks["right"])).last_hidden_state
    np.testing.assert_array_equal(hidden, base.numpy())


def test_lm_head_rows_select_a_vocabulary_subset(hf_checkpoints, batch):
    hf_model, path = hf_checkpoints["gqa"]
    ids, masks = batch
    ids, mask = jnp.asarray(ids), jnp.asarray(masks["right"])
    full = hf_loader.load_hf_llama(path)
    headless = hf_loader.load_hf_llama(path, with_lm_head=False)
    assert "lm_head" not in nnx.state(headless) and headless.lm_head is None
    np.testing.assert_array_equal(np.asarray(full.lm_head[...]), hf_model.lm_head.weight.detach().numpy())
    out, hidden_only = _forward(full, ids, mask), _forward(headless, ids, mask)
    assert hidden_only.logits is None
    np.testing.assert_array_equal(np.asarray(hidden_only.last_hidden_state), np.asarray(out.last_hidden_state))
    rows = np.array([3, 17, 64, 127])
    subset = np.asarray(out.last_hidden_state) @ np.asarray(full.lm_head[...])[rows].T
    np.testing.assert_allclose(subset, np.asarray(out.logits)[..., rows], atol=1e-5)


def test_tied_checkpoint_loads_the_embedding_as_lm_head(tmp_path):
    torch.manual_seed(5)
    tied = dict(TINY, num_hidden_layers=1, tie_word_embeddings=True)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**tied)).eval()
    _randomise(hf_model)
    hf_model.save_pretrained(tmp_path)
    model = hf_loader.load_hf_llama(tmp_path)
    np.testing.assert_array_equal(np.asarray(model.lm_head[...]), np.asarray(model.embed_tokens[...]))
    ids = np.random.default_rng(2).integers(0, TINY["vocab_size"], (2, 8))
    want, _ = _hf_forward(hf_model, ids, np.ones_like(ids))
    assert _max_diff(_forward(model, jnp.asarray(ids)).logits, want) <= 1e-4


def test_load_rejects_other_model_types(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(hf_loader.CheckpointError, match="holds a 'mistral' model, not 'llama'"):
        hf_loader.load_hf_llama(tmp_path)


# --- padding -------------------------------------------------------------------------------------------


def test_real_tokens_ignore_padding(hf_checkpoints):
    model = hf_loader.load_hf_llama(hf_checkpoints["gqa"][1])
    rng = np.random.default_rng(1)
    row, tail, pads, other = (rng.integers(0, 128, n) for n in (6, 4, 4, 10))
    ids = np.stack([np.r_[row, tail], np.r_[row, pads], np.r_[pads, row], other])
    real = np.r_[np.ones(6), np.zeros(4)].astype(np.int32)
    mask = jnp.asarray(np.stack([np.ones(10, np.int32), real, real[::-1], np.ones(10, np.int32)]))
    out = np.asarray(_forward(model, jnp.asarray(ids), mask, llama.padded_positions(mask)).logits)
    reference = out[0, :6]  # the same six tokens with no padding anywhere
    np.testing.assert_allclose(out[1, :6], reference, atol=1e-5)  # right padding
    np.testing.assert_allclose(out[2, 4:], reference, atol=1e-5)  # left padding, positions from the mask
    assert np.isfinite(out).all()
    # Default positions are arange(T) as in transformers: left padding shifts them, which RoPE attention
    # (relative positions only) undoes up to rounding.
    shifted = np.asarray(_forward(model, jnp.asarray(ids), mask).logits)
    np.testing.assert_allclose(shifted[2, 4:], reference, atol=1e-4)
    np.testing.assert_array_equal(llama.padded_positions(mask[2]), [0, 0, 0, 0, 0, 1, 2, 3, 4, 5])


# --- LoRA ---------------------------------------------------------------------------------------------


def _lora_model(path, **runtime):
    return hf_loader.load_hf_llama(path, lora_rank=4, lora_alpha=8.0, lora_targets=llama.LORA_TARGETS, **runtime)


@pytest.fixture(scope="session")
def lora_loaded(hf_checkpoints):
    """The GQA checkpoint with r=4 LoRA on all seven linears, loaded once; tests take `nnx.clone`s."""
    return _lora_model(hf_checkpoints["gqa"][1])


def _randomise_lora_b(model, seed=0):
    """Random LoRA `B` matrices (in place, same shardings), so the adapters change the outputs."""
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        if path[-1] == "lora_b":
            value = variable.get_value()
            random = 0.05 * rng.standard_normal(value.shape).astype(value.dtype)
            variable.set_value(jax.device_put(random, value.sharding))


def _lora_b_leaves(model):
    flat = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    return {p: v.get_value() for p, v in flat if p[-1] == "lora_b"}


def test_lora_starts_as_the_base_model_and_merges_exactly(hf_checkpoints, lora_loaded, batch):
    path = hf_checkpoints["gqa"][1]
    ids, masks = batch
    ids, mask = jnp.asarray(ids), jnp.asarray(masks["right"])
    base = np.asarray(_forward(hf_loader.load_hf_llama(path), ids, mask).logits)
    model = nnx.clone(lora_loaded)
    assert len(_lora_b_leaves(model)) == 7 and all(not np.any(b) for b in _lora_b_leaves(model).values())
    np.testing.assert_array_equal(np.asarray(_forward(model, ids, mask).logits), base)

    _randomise_lora_b(model)
    unmerged = np.asarray(_forward(model, ids, mask).logits)
    assert _max_diff(unmerged, base) > 1e-2
    layers.merge_lora(model)
    assert not nnx.state(model, nnx.LoRAParam)
    merged_diff = _max_diff(_forward(model, ids, mask).logits, unmerged)
    print(f"\nLoRA merged vs unmerged logits max|Δ| {merged_diff:.2e}")
    assert merged_diff <= 1e-4


_param_grad = nnx.jit(nnx.grad(_loss))  # w.r.t. every nnx.Param, LoRAParam included


def _flat_numpy(state):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.mark.slow
def test_training_split_freezes_all_but_lora(lora_loaded):
    """`train.trainable=("lora",)` through the split training makes (`program.make_program`)."""
    model = nnx.clone(lora_loaded)
    _randomise_lora_b(model)
    config = configlib.load_config(str(TINY_CONFIG), ["optim.warmup_steps=0"])
    config.train.trainable = ("lora",)
    config.optim.no_decay = ()  # a Llama alone: no visual codebook
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    program, params, frozen, rest = make_program(config, mesh, model)
    trained = _flat_numpy(params)
    assert len(trained) == 14 and all(p[-1] in ("lora_a", "lora_b") for p in trained)
    frozen_paths = {p for p, _ in nnx.to_flat_state(frozen)}
    assert {("embed_tokens",), ("layers", "self_attn", "q_proj", "kernel"), ("norm", "scale")} <= frozen_paths
    assert not any(p[-1].startswith("lora") for p in frozen_paths)

    grads = jax.jit(jax.grad(lambda p: _loss(program.model.merge(p, frozen, rest))))(params)
    assert all(np.abs(g).max() > 0 for g in _flat_numpy(grads).values())
    # The same loss differentiated w.r.t. every Param reaches the base weights: only the split freezes them.
    all_grads = _flat_numpy(_param_grad(model))
    assert np.abs(all_grads[("layers", "self_attn", "q_proj", "kernel")]).max() > 0
    assert np.abs(all_grads[("embed_tokens",)]).max() > 0

    # The optimiser holds moments for the LoRA weights only, and its step moves every one of them.
    state = jax.jit(program.init_state)(params)  # one program each, not op by op
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]  # the rest are step counts
    assert len(moments) == 2 * len(trained)  # AdamW's mu and nu
    update = jax.jit(lambda g, opt_state, p: optax.apply_updates(p, program.tx.update(g, opt_state, p)[0]))
    after = _flat_numpy(update(grads, state.opt_state, params))
    assert not any(np.array_equal(trained[p], after[p]) for p in trained)


def test_lora_dropout_only_when_not_deterministic(hf_checkpoints, lora_loaded, batch):
    path = hf_checkpoints["gqa"][1]
    ids, mask = jnp.asarray(batch[0]), jnp.asarray(batch[1]["right"])
    model = _lora_model(path, lora_dropout=0.5)
    _randomise_lora_b(model)
    eval_a, eval_b = (np.asarray(_forward(model, ids, mask).logits) for _ in range(2))
    np.testing.assert_array_equal(eval_a, eval_b)
    no_dropout = nnx.clone(lora_loaded)
    nnx.update(no_dropout, nnx.state(model, nnx.LoRAParam))
    np.testing.assert_allclose(eval_a, np.asarray(_forward(no_dropout, ids, mask).logits), atol=1e-6)
    train_a, train_b = (np.asarray(_forward(model, ids, mask, deterministic=False).logits) for _ in range(2))
    assert _max_diff(train_a, eval_a) > 1e-3 and _max_diff(train_a, train_b) > 1e-3  # fresh masks each call


# --- sharded, streamed loading ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mesh():
    return jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def test_sharded_load_matches_and_follows_the_rules(hf_checkpoints, batch, mesh):
    hf_model, path = hf_checkpoints["gqa"]
    ids, masks = batch
    mask = masks["left"]
    model = hf_loader.load_hf_llama(path, mesh=mesh)
    attn, mlp = model.layers.self_attn, model.layers.mlp
    expected = {
        "embed_tokens": (model.embed_tokens, P("tensor", "fsdp")),
        "lm_head": (model.lm_head, P("tensor", "fsdp")),
        "q_proj": (attn.q_proj.kernel, P(None, "fsdp", "tensor")),
        "k_proj": (attn.k_proj.kernel, P(None, "fsdp", "tensor")),
        "o_proj": (attn.o_proj.kernel, P(None, "tensor", "fsdp")),
        "down_proj": (mlp.down_proj.kernel, P(None, "tensor", "fsdp")),
        "norm": (model.norm.scale, P("fsdp")),
    }
    for name, (variable, spec) in expected.items():
        assert variable[...].sharding.spec == spec, name
    batch_sharding = sharding.named_sharding(mesh, ("batch", "length"), sharding.DEFAULT_RULES)
    with sharding.use_mesh_rules(mesh, sharding.DEFAULT_RULES):
        out = _forward(model, jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding))
    assert out.logits.sharding.spec == P(("data", "fsdp"), None, "tensor")
    want_logits, _ = _hf_forward(hf_model, ids, mask)
    unsharded = _forward(hf_loader.load_hf_llama(path), jnp.asarray(ids), jnp.asarray(mask))
    sharded_diff = _max_diff(out.logits, unsharded.logits, mask)
    print(
        f"\nsharded vs unsharded logits max|Δ| {sharded_diff:.2e}, vs HF {_max_diff(out.logits, want_logits, mask):.2e}"
    )
    assert sharded_diff <= 1e-5 and _max_diff(out.logits, want_logits, mask) <= 1e-4


def test_loader_reads_only_each_devices_shard(hf_checkpoints, mesh, monkeypatch):
    reads = []
    original = hf_layout.Source.read

    def recording_read(self, ckpt, index, dtype):
        part = original(self, ckpt, index, dtype)
        reads.append((self.key, part.shape))
        return part

    monkeypatch.setattr(hf_layout.Source, "read", recording_read)
    model = hf_loader.load_hf_llama(hf_checkpoints["gqa"][1], mesh=mesh)
    config = model.config
    by_key = {s.key: path for path, s in hf_layout.llama_sources(config).items()}
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    assert {key for key, _ in reads} == set(by_key)
    for key, shape in reads:
        array = flat[by_key[key]]
        assert shape == array.sharding.shard_shape(array.shape), key
    full_reads = [key for key, shape in reads if shape == flat[by_key[key]].shape]
    assert full_reads == [], f"full tensors read for sharded parameters: {full_reads}"


# --- precision and remat ------------------------------------------------------------------------------


def test_bf16_compute_stays_close(hf_checkpoints, batch):
    hf_model, path = hf_checkpoints["gqa"]
    ids, masks = batch
    mask = masks["right"]
    want, _ = _hf_forward(hf_model, ids, mask)
    hf_bf16, _ = _hf_forward(copy.deepcopy(hf_model).to(torch.bfloat16), ids, mask)
    hf_diff = _max_diff(hf_bf16, want, mask)
    mixed = _forward(hf_loader.load_hf_llama(path, compute_dtype=jnp.bfloat16), jnp.asarray(ids), jnp.asarray(mask))
    assert mixed.logits.dtype == jnp.float32 and mixed.last_hidden_state.dtype == jnp.bfloat16
    diff = _max_diff(mixed.logits, want, mask)
    scale = float(np.abs(want).max())
    print(f"\nbf16 compute logits max|Δ| {diff:.3f} (transformers in bf16: {hf_diff:.3f}; |logits| ≤ {scale:.1f})")
    assert diff <= 0.02 * scale and diff <= 1.5 * hf_diff
    stored = hf_loader.load_hf_llama(path, jnp.bfloat16)
    assert stored.layers.mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    bf16_diff = _max_diff(_forward(stored, jnp.asarray(ids), jnp.asarray(mask)).logits, mixed.logits, mask)
    assert bf16_diff <= 1e-3 * scale


@pytest.mark.slow
def test_full_remat_gives_same_outputs_and_grads(hf_checkpoints, lora_loaded, batch):
    path = hf_checkpoints["gqa"][1]
    ids, mask = jnp.asarray(batch[0]), jnp.asarray(batch[1]["right"])
    plain, remat = nnx.clone(lora_loaded), _lora_model(path, remat="full")
    _randomise_lora_b(plain)
    nnx.update(remat, nnx.state(plain, nnx.LoRAParam))
    assert remat.config.remat == "full"
    out_diff = _max_diff(_forward(remat, ids, mask).logits, _forward(plain, ids, mask).logits)
    want, got = _flat_numpy(_param_grad(plain)), _flat_numpy(_param_grad(remat))
    grad_diff = max(_max_diff(want[p], got[p]) for p in want)
    print(f"\nremat full vs none: logits max|Δ| {out_diff:.2e}, grads max|Δ| {grad_diff:.2e}")
    assert out_diff <= 1e-6 and grad_diff <= 1e-5
    assert np.abs(got[("layers", "mlp", "down_proj", "lora_b")]).max() > 0
    # Remat really happens: the backward pass recomputes the layer's forward matmuls in a checkpoint, all
    # but down_proj's two (base and LoRA B), whose outputs only feed the residual sum.
    counts = {name: jaxpr_counts.param_grad_counts(m, _loss) for name, m in (("none", plain), ("full", remat))}
    assert (counts["none"][jaxpr_counts.CHECKPOINT], counts["full"][jaxpr_counts.CHECKPOINT]) == (0, 1)
    layer_dots = jaxpr_counts.layer_forward_dots(remat, _loss)
    assert layer_dots == 7 + 7 * 2 + 2  # seven linears, their LoRA A and B, attention scores and mix
    assert counts["full"]["dot_general"] - counts["none"]["dot_general"] == layer_dots - 2
