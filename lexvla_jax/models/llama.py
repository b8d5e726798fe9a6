"""Llama 2 decoder (text tower) in Flax NNX, numerically matching `transformers.LlamaForCausalLM`.

RMSNorm in float32, rotate-half RoPE, multi-head or grouped-query attention, SwiGLU MLP. Decoder layers
are stacked (`layers.stack_layers`) and scanned with the config's remat policy. Any of the seven linears
can carry a LoRA branch (`LlamaConfig.lora_targets`); LoRA weights are `nnx.LoRAParam`, so an
optimiser or checkpoint selects them by type.

`lm_head` is stored `[vocab, embed]` (the checkpoint's own layout): logits are `h @ Wᵀ`, and rows of it —
a vocabulary subset — can be taken directly. Build the model with `with_lm_head=False` to get only the
final-norm hidden states without materialising `[B, T, vocab]` logits.

Positions: when `positions` is not given they are `arange(T)` for every row whatever the padding, as in
transformers' `LlamaForCausalLM` without `position_ids`. Right padding then changes nothing for the real
tokens. Left padding shifts a row's positions by its pad count; RoPE attention depends only on position
differences, so that changes the real tokens' outputs by rounding only. Pass
`positions=padded_positions(attention_mask)` to give every row exactly its unpadded positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lexvla_jax.models import layers

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

# Activation logical names.
_HIDDEN = ("batch", "length", "act_embed")
_HEADS = ("batch", "length", "act_heads", None)
_MLP = ("batch", "length", "act_mlp")
_LOGITS = ("batch", "length", "act_vocab")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture (Hugging Face `LlamaConfig` field names and defaults) plus runtime settings.

    `num_key_value_heads` and `head_dim` default to `num_attention_heads` and `hidden_size // heads`.
    Runtime: `dtype` is the compute dtype, `param_dtype` the storage dtype of freshly built parameters,
    `remat` a policy name in `layers.REMAT_POLICIES`, and LoRA of rank `lora_rank` goes on the linears
    named in `lora_targets` (a subset of `LORA_TARGETS`; rank 0 or no targets means no LoRA), its `A` drawn as
    `lora_init` says (`layers.LORA_INITS`; "peft": PEFT's default).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # Runtime.
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()
    lora_init: str = "peft"

    def __post_init__(self):
        set_field = lambda name, value: object.__setattr__(self, name, value)
        if self.num_key_value_heads is None:
            set_field("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            set_field("head_dim", self.hidden_size // self.num_attention_heads)
        set_field("dtype", jnp.dtype(self.dtype))
        set_field("param_dtype", jnp.dtype(self.param_dtype))
        set_field("lora_targets", tuple(self.lora_targets))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; pick a divisor"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not implemented; Llama uses 'silu'")
        if self.remat not in layers.REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} unknown; choose one of {sorted(layers.REMAT_POLICIES)}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"lora_targets {unknown} unknown; choose from {LORA_TARGETS}")
        if self.lora_init not in layers.LORA_INITS:
            raise ValueError(f"lora_init={self.lora_init!r} unknown; choose one of {sorted(layers.LORA_INITS)}")

    def lora_rank_for(self, target: str) -> int:
        """The LoRA rank of linear `target` (0: no LoRA)."""
        return self.lora_rank if target in self.lora_targets else 0

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **runtime) -> LlamaConfig:
        """A config from a Hugging Face `config.json` dict; `runtime` sets the runtime fields."""
        if hf.get("model_type") != "llama":
            raise ValueError(f"config model_type is {hf.get('model_type')!r}, not 'llama'; pass a Llama checkpoint")
        # transformers >= 5 writes `rope_parameters`; older files have `rope_theta` and `rope_scaling`.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not implemented; only default RoPE (no rope_scaling) is")
        if hf.get("attention_dropout", 0.0):
            raise ValueError(f"attention_dropout={hf['attention_dropout']} is not implemented; set it to 0.0")
        arch = {f.name for f in dataclasses.fields(cls)} - set(_RUNTIME_FIELDS)
        fields = {k: v for k, v in hf.items() if k in arch and v is not None}
        theta = rope.get("rope_theta", hf.get("rope_theta"))
        if theta is not None:
            fields["rope_theta"] = float(theta)
        unknown = set(runtime) - set(_RUNTIME_FIELDS)
        if unknown:
            raise TypeError(f"unknown runtime field(s) {sorted(unknown)}; choose from {_RUNTIME_FIELDS}")
        return cls(**fields, **runtime)


_RUNTIME_FIELDS = (
    "dtype", "param_dtype", "remat", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_init",
)  # fmt: skip

_LLAMA2 = dict(vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096, rope_theta=10000.0)
PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama2-13b": dict(
        _LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40
    ),
    "llama2-70b": dict(
        _LLAMA2,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
    # Llama 2's vocabulary on a toy body, for debug configs that use the real tokenizer.
    "llama2-tiny": dict(
        _LLAMA2,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


def llama_preset(name: str, **overrides) -> LlamaConfig:
    """The config of a named Llama 2 shape (`PRESETS`), with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown Llama preset {name!r}; choose one of {sorted(PRESETS)}")
    return LlamaConfig(**{**PRESETS[name], **overrides})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LlamaOutput:
    """logits: `[B,T,V]` float32 (None without an lm_head); last_hidden_state: `[B,T,E]` after the final norm."""

    logits: jax.Array | None
    last_hidden_state: jax.Array


def padded_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions counting real tokens only (0, 1, ... from each row's first real token).

    A padding slot gets the position of the last real token before it (0 before the first).
    """
    mask = jnp.asarray(attention_mask).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[B,T,head_dim]` (float32) for rotate-half RoPE, as transformers' default rope."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x` `[B,T,H,D]` by the angles in cos/sin `[B,T,D]` (rotate-half convention)."""
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class RMSNorm(nnx.Module):
    """`scale · x / rms(x)`, normalised in float32 and cast back to the compute dtype."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = layers.param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * x.astype(self.dtype)


def _linear(config: LlamaConfig, target: str, d_in: int, d_out: int, names, bias: bool, rngs: nnx.Rngs):
    return layers.Linear(
        d_in,
        d_out,
        names,
        use_bias=bias,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        lora_rank=config.lora_rank_for(target),
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        lora_init=config.lora_init,
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Causal self-attention with RoPE; grouped-query when `num_key_value_heads < num_attention_heads`."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        e, h, k, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.attention_bias
        self.num_heads, self.num_kv_heads, self.head_dim = h, k, d
        self.q_proj = _linear(config, "q", e, h * d, ("embed", "heads"), bias, rngs)
        self.k_proj = _linear(config, "k", e, k * d, ("embed", "kv_heads"), bias, rngs)
        self.v_proj = _linear(config, "v", e, k * d, ("embed", "kv_heads"), bias, rngs)
        self.o_proj = _linear(config, "o", h * d, e, ("heads", "embed"), bias, rngs)

    def __call__(self, x: jax.Array, padding: jax.Array | None, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """`padding`: `[B,1,1,T]`, True at real tokens (None: no padding); the causal mask is always applied."""
        b, t, _ = x.shape
        q = layers.constrain(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), _HEADS)
        k = layers.constrain(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), _HEADS)
        v = layers.constrain(self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), _HEADS)
        out = layers.dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, padding, is_causal=True)
        return self.o_proj(layers.constrain(out, _HEADS).reshape(b, t, -1))


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) · up(x))`."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        e, m, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = _linear(config, "gate", e, m, ("embed", "mlp"), bias, rngs)
        self.up_proj = _linear(config, "up", e, m, ("embed", "mlp"), bias, rngs)
        self.down_proj = _linear(config, "down", m, e, ("mlp", "embed"), bias, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), _MLP)
        return self.down_proj(h)


class DecoderLayer(nnx.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        norm = lambda: RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs
        )
        self.input_layernorm = norm()
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x: jax.Array, padding: jax.Array | None, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), padding, cos, sin)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return layers.constrain(x, _HIDDEN)


class LlamaModel(nnx.Module):
    """Llama decoder: embedding, stacked decoder layers, final RMSNorm and (optionally) `lm_head`."""

    def __init__(self, config: LlamaConfig, *, with_lm_head: bool = True, rngs: nnx.Rngs):
        self.config = config
        table = (config.vocab_size, config.hidden_size)
        init = nnx.initializers.normal(0.02)
        self.embed_tokens = layers.param(rngs, init, table, ("vocab", "embed"), config.param_dtype)
        self.layers = layers.stack_layers(lambda r: DecoderLayer(config, rngs=r), config.num_hidden_layers, rngs)
        self.norm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs
        )
        self.lm_head = layers.param(rngs, init, table, ("vocab", "embed"), config.param_dtype) if with_lm_head else None

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> LlamaOutput:
        """input_ids, attention_mask (1 = real token), positions: `[B,T]`. Padding may be on either side.

        `deterministic=False` turns LoRA dropout on (it draws from the model's `dropout` random stream).
        """
        config = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids has shape {input_ids.shape}; pass token ids of shape [batch, length]")
        b, t = input_ids.shape
        for name, value in (("attention_mask", attention_mask), ("positions", positions)):
            if value is not None and value.shape != (b, t):
                raise ValueError(f"{name} has shape {value.shape}; it must match input_ids' shape {(b, t)}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        padding = None if attention_mask is None else attention_mask.astype(jnp.bool_)[:, None, None, :]
        cos, sin = rope_tables(positions, config.head_dim, config.rope_theta)

        # Gather the table over `embed` first (as FSDP does for every weight); the lookup is then a plain
        # vocab-sharded gather, which the partitioner handles without replicating activations.
        table = layers.constrain(self.embed_tokens[...], ("vocab", None))
        x = jnp.take(table, input_ids, axis=0).astype(config.dtype)
        x = layers.constrain(x, _HIDDEN)
        stack = nnx.view(self.layers, only=nnx.Dropout, deterministic=deterministic, raise_if_not_found=False)
        x = layers.scan_layers(stack, lambda layer, h, _: layer(h, padding, cos, sin), x, remat=config.remat)
        hidden = self.norm(x)
        logits = None
        if self.lm_head is not None:
            weight = self.lm_head[...].astype(config.dtype)
            logits = jnp.einsum("bte,ve->btv", hidden, weight, preferred_element_type=jnp.float32)
            logits = layers.constrain(logits, _LOGITS)
        return LlamaOutput(logits=logits, last_hidden_state=hidden)
