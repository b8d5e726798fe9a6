"""The LexVLA model from a config, created or loaded straight into its sharded layout.

`config.model.vision` / `config.model.text` name a preset (`preset`) and/or set architecture fields;
`config.model.vision_checkpoint` / `text_checkpoint` point at local Hugging Face directories (empty:
random initialisation, e.g. for debugging or ahead-of-time compiles). The kept vocabulary comes from the
tokenizer (`config.data.tokenizer`) through `vocab.filter_vocabulary`; without a tokenizer, the first
`config.model.vocab_size` ids stand in (shapes only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lexvla_jax import convert, sharding, vocab
from lexvla_jax.models import dinov2, lexvla, llama


def _fields(section: ml_collections.ConfigDict) -> dict:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in section.to_dict().items() if k != "preset"}


def vision_config(config: ml_collections.ConfigDict) -> dinov2.Dinov2Config:
    """The DINOv2 config: preset (if any), then explicit fields, then runtime dtypes."""
    m = config.model
    runtime = dict(dtype=jnp.dtype(m.compute_dtype), param_dtype=jnp.dtype(m.frozen_param_dtype), remat=m.remat)
    fields = {**_fields(m.vision), **runtime}
    if m.vision.get("preset"):
        return dinov2.dinov2_preset(m.vision.preset, **fields)
    return dinov2.Dinov2Config(**fields)


def text_config(config: ml_collections.ConfigDict) -> llama.LlamaConfig:
    """The Llama config: preset (if any), explicit fields, runtime dtypes and LoRA."""
    m = config.model
    runtime = dict(
        dtype=jnp.dtype(m.compute_dtype),
        param_dtype=jnp.dtype(m.frozen_param_dtype),
        remat=m.remat,
        lora_rank=m.lora.rank,
        lora_alpha=m.lora.alpha,
        lora_dropout=m.lora.dropout,
        lora_targets=tuple(m.lora.targets),
    )
    fields = {**_fields(m.text), **runtime}
    if m.text.get("preset"):
        return llama.llama_preset(m.text.preset, **fields)
    return llama.LlamaConfig(**fields)


def kept_vocabulary(config: ml_collections.ConfigDict) -> np.ndarray:
    """Token ids of the lexical vocabulary (rows of both codebooks)."""
    if config.data.tokenizer:
        return vocab.filter_vocabulary(vocab.load_tokenizer(config.data.tokenizer))
    return np.arange(config.model.vocab_size, dtype=np.int32)


def model_config(config: ml_collections.ConfigDict, num_words: int) -> lexvla.LexVLAConfig:
    m = config.model
    return lexvla.LexVLAConfig(
        vision=vision_config(config),
        text=text_config(config),
        vocab_size=num_words,
        adapter_heads=m.adapter_heads,
        adapter_mlp_dim=m.adapter_mlp_dim,
        logit_scale_init=m.logit_scale_init,
        logit_scale_max=m.logit_scale_max,
        max_pool_chunk=m.max_pool_chunk,
        dtype=jnp.dtype(m.compute_dtype),
        param_dtype=jnp.float32,
    )


def create_sharded(make: Callable[[], nnx.Module], mesh: Mesh, rules) -> nnx.Module:
    """Runs `make()` under jit with every variable created directly in its sharded layout."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = sharding.state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract_model(config: ml_collections.ConfigDict, num_words: int) -> lexvla.LexVLA:
    """The model as shapes only (no memory): for ahead-of-time compiles."""
    cfg = model_config(config, num_words)
    return nnx.eval_shape(lambda: lexvla.LexVLA(cfg, rngs=nnx.Rngs(config.train.seed)))


def build_model(config: ml_collections.ConfigDict, mesh: Mesh, kept_ids: np.ndarray) -> lexvla.LexVLA:
    """LexVLA with checkpoints loaded where configured, everything placed on `mesh` by the rules."""
    rules = tuple(config.sharding.rules)
    cfg = model_config(config, len(kept_ids))
    rngs = lambda: nnx.Rngs(params=config.train.seed, dropout=config.train.seed + 1)
    m = config.model
    if not m.vision_checkpoint and not m.text_checkpoint:
        return create_sharded(lambda: lexvla.LexVLA(cfg, rngs=rngs()), mesh, rules)
    frozen_dtype = jnp.dtype(m.frozen_param_dtype)
    vision = text = codebook = None
    if m.vision_checkpoint:
        vision = convert.load_hf_dinov2(
            m.vision_checkpoint, frozen_dtype, mesh=mesh, rules=rules, compute_dtype=cfg.dtype, remat=m.remat
        )
        cfg = dataclasses.replace(cfg, vision=vision.config)
    if m.text_checkpoint:
        lora = {f: getattr(cfg.text, f) for f in ("remat", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")}
        text = convert.load_hf_llama(
            m.text_checkpoint, frozen_dtype, mesh=mesh, rules=rules, with_lm_head=False, compute_dtype=cfg.dtype, **lora
        )
        cfg = dataclasses.replace(cfg, text=text.config)
        ckpt = convert.HFCheckpoint(m.text_checkpoint)
        key = "model.embed_tokens.weight" if text.config.tie_word_embeddings else "lm_head.weight"
        source = convert.Source(key, rows=tuple(int(i) for i in kept_ids))
        codebook = convert.load_tensor(ckpt, source, mesh, ("vocab", "embed"), rules, jnp.float32)
    model = lexvla.LexVLA(cfg, rngs=rngs(), vision=vision, text=text, text_codebook=codebook)
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh, rules)))
