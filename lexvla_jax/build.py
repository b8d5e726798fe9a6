"""The LexVLA model from a config: one construction path for random, loaded and abstract models.

`config.model.vision` / `config.model.text` name a preset (`preset`) and/or set architecture fields;
`config.model.vision.tower` picks the image tower ("dinov2", "clip" or "siglip": `models/vision.py`);
`config.model.vision_checkpoint` / `text_checkpoint` point at local Hugging Face directories (empty:
random initialisation, e.g. for debugging or ahead-of-time compiles). The rows of both codebooks are the
kept vocabulary (`filter_vocabulary` of `config.data.tokenizer`). `config.model.text_encoder="bow"`
(Q(BoW)) builds no language model and no text codebook, and reads no text checkpoint.

Every variable is created directly in its sharded layout (`hf_loader.load_model`): checkpoint tensors are
read shard by shard on the processes that own them, everything else is initialised under `jit`. Trainable
parameters (`config.train.trainable`) are float32 master weights; every other parameter (the frozen towers
and the text codebook) is stored in `frozen_param_dtype`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from flax.nnx import filterlib
from jax.sharding import Mesh

from lexvla_jax import hf_layout, hf_loader, optim, sharding
from lexvla_jax.configlib import ConfigError
from lexvla_jax.models import lexvla, llama, vision
from lexvla_jax.text import bow
from lexvla_jax.text.prompt import prompt_encoder
from lexvla_jax.text.tokenizer import Tokenizer, load_tokenizer
from lexvla_jax.text.vocabulary import DEFAULT_RULE, filter_vocabulary


def _fields(section: ml_collections.ConfigDict) -> dict:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in section.to_dict().items() if k != "preset"}


def _runtime(config: ml_collections.ConfigDict) -> dict:
    m = config.model
    return dict(dtype=jnp.dtype(m.compute_dtype), param_dtype=jnp.dtype(m.frozen_param_dtype), remat=m.remat)


def _lora(config: ml_collections.ConfigDict) -> dict:
    lora = config.model.lora
    return dict(
        lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, lora_targets=tuple(lora.targets),
        lora_init=lora.get("init", "peft"),
    )  # fmt: skip


def vision_tower(config: ml_collections.ConfigDict) -> str:
    """`config.model.vision.tower` ("dinov2" when absent), checked against `vision.TOWERS`."""
    tower = config.model.vision.get("tower", "dinov2")
    if tower not in vision.TOWERS:
        raise ConfigError(f"config.model.vision.tower={tower!r} unknown; choose one of {vision.TOWERS}")
    return tower


def vision_config(config: ml_collections.ConfigDict) -> vision.VisionConfig:
    """The image tower's config (`config.model.vision.tower`): the checkpoint's, else preset (if any) then explicit
    fields; runtime dtypes. A checkpoint must hold the configured tower; `image_norm`, when set, applies to it too."""
    m = config.model
    tower = vision_tower(config)
    fields = {k: v for k, v in _fields(m.vision).items() if k != "tower"}
    if m.vision_checkpoint:
        ckpt = hf_loader.HFCheckpoint(m.vision_checkpoint, "config.model.vision_checkpoint")
        # Our choices, not the checkpoint's: the normalisation and how position embeddings are resampled. Only
        # DINOv2 has the latter: a CLIP / SigLIP checkpoint under a base that sets it (the paper's) loads as is.
        choices = ("image_norm", "pos_interpolation") if tower == "dinov2" else ("image_norm",)
        if tower != "dinov2" and fields.get("pos_interpolation", "hf") != "hf":
            raise ConfigError(
                f"config.model.vision.pos_interpolation={fields['pos_interpolation']!r} is DINOv2's; a {tower} tower "
                "resamples position embeddings as transformers does: leave it 'hf'"
            )
        ours = {k: fields[k] for k in choices if fields.get(k)}
        loaded = hf_loader.vision_config(ckpt, **_runtime(config), **ours)
        found = vision.tower_name(loaded)
        if found != tower:
            raise ConfigError(
                f"config.model.vision_checkpoint holds a {found} tower but config.model.vision.tower={tower!r}; "
                f"set --config.model.vision.tower={found}"
            )
        return loaded
    try:
        return vision.tower_config(tower, m.vision.get("preset") or "", **fields, **_runtime(config))
    except ValueError as e:
        raise ConfigError(f"config.model.vision: {e}") from None


def text_config(config: ml_collections.ConfigDict) -> llama.LlamaConfig:
    """The Llama config: the checkpoint's, else preset (if any) then explicit fields; runtime dtypes and LoRA."""
    m = config.model
    runtime = {**_runtime(config), **_lora(config)}
    if m.text_checkpoint:
        return hf_loader.llama_config(
            hf_loader.HFCheckpoint(m.text_checkpoint, "config.model.text_checkpoint"), **runtime
        )
    fields = {**_fields(m.text), **runtime}
    if m.text.get("preset"):
        return llama.llama_preset(m.text.preset, **fields)
    return llama.LlamaConfig(**fields)


def text_encoder(config: ml_collections.ConfigDict) -> str:
    """`config.model.text_encoder` ("llm" when absent), checked: "bow" loads no language model."""
    m = config.model
    name = m.get("text_encoder", "llm")
    if name not in lexvla.TEXT_ENCODERS:
        raise ConfigError(f"config.model.text_encoder={name!r} unknown; choose one of {lexvla.TEXT_ENCODERS}")
    if name == "bow" and m.text_checkpoint:
        raise ConfigError(
            "config.model.text_encoder='bow' uses no language model; set config.model.text_checkpoint='' "
            "(the visual codebook then starts from random rows)"
        )
    return name


def caption_encoder(config: ml_collections.ConfigDict, tokenizer: Tokenizer, kept_ids: np.ndarray):
    """What the text side reads of a caption: prompt rows ("llm", `PromptEncoder`) or kept-vocabulary
    columns ("bow", `bow.BowEncoder`, at most `config.data.max_caption_tokens` of them)."""
    if text_encoder(config) == "bow":
        return bow.BowEncoder(tokenizer, kept_ids, config.data.max_caption_tokens)
    return prompt_encoder(config.data, tokenizer)


def model_config(config: ml_collections.ConfigDict, num_words: int) -> lexvla.LexVLAConfig:
    m = config.model
    encoder = text_encoder(config)
    return lexvla.LexVLAConfig(
        vision=vision_config(config),
        text=text_config(config),
        vocab_size=num_words,
        adapter_heads=m.adapter_heads,
        adapter_mlp_dim=m.adapter_mlp_dim,
        adapter_shape=m.get("adapter_shape", "mlp"),
        text_encoder=encoder,
        logit_scale_init=m.logit_scale_init,
        logit_scale_max=m.logit_scale_max,
        max_pool_chunk=m.max_pool_chunk,
        dtype=jnp.dtype(m.compute_dtype),
        param_dtype=jnp.float32,
    )


def load_vocabulary(config: ml_collections.ConfigDict) -> tuple[Tokenizer, np.ndarray]:
    """The tokenizer of `config.data.tokenizer` and the token ids of the kept vocabulary (codebook rows)."""
    if not config.data.tokenizer:
        raise ConfigError("config.data.tokenizer is empty; point it at a tokenizer.model / tokenizer.json")
    tokenizer = load_tokenizer(config.data.tokenizer)  # errors name config.data.tokenizer
    size = config.model.text.get("vocab_size", tokenizer.vocab_size)
    if tokenizer.vocab_size != size and not config.model.text_checkpoint:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} pieces but config.model.text.vocab_size={size}; make them equal"
        )
    return tokenizer, filter_vocabulary(tokenizer, config.model.get("vocab_filter", DEFAULT_RULE))


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """How to make the model: its config, a constructor, and the checkpoint parts to read."""

    config: lexvla.LexVLAConfig
    make: object  # () -> LexVLA
    parts: tuple[hf_loader.CheckpointPart, ...]
    trainable: object  # nnx filter of the trainable parameters
    frozen_dtype: jnp.dtype  # storage dtype of the other parameters


def recipe(config: ml_collections.ConfigDict, kept_ids: np.ndarray) -> ModelRecipe:
    """The model of `config` with vocabulary `kept_ids`, and where its pretrained weights come from."""
    m = config.model
    cfg = model_config(config, len(kept_ids))
    seed = config.train.seed
    make = lambda: lexvla.LexVLA(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    parts = []
    if m.vision_checkpoint:
        parts.append(
            hf_loader.vision_part(
                hf_loader.HFCheckpoint(m.vision_checkpoint, "config.model.vision_checkpoint"),
                cfg.vision,
                prefix="vision",
            )
        )
    if m.text_checkpoint:
        ckpt = hf_loader.HFCheckpoint(m.text_checkpoint, "config.model.text_checkpoint")
        text = hf_loader.llama_part(ckpt, cfg.text, prefix="text", with_lm_head=False)
        # Both codebooks start as the lm_head rows of the kept words; the visual one then trains.
        rows = hf_layout.Source(hf_layout.llama_lm_head_key(cfg.text), rows=tuple(int(i) for i in kept_ids))
        codebooks = {"text_codebook": rows, "visual_codebook": rows}
        ignore = lambda key, text=text: text.ignore(key) and key != rows.key
        parts.append(dataclasses.replace(text, sources={**text.sources, **codebooks}, ignore=ignore))
    frozen_dtype = jnp.dtype(m.frozen_param_dtype)
    return ModelRecipe(cfg, make, tuple(parts), optim.trainable_filter(config.train.trainable), frozen_dtype)


def storage_dtypes(r: ModelRecipe):
    """`dtype_of` for `hf_loader.load_model`: float32 master weights for trainable parameters, `r.frozen_dtype`
    for the other parameters, the model's own dtype for non-parameter state."""
    trainable = filterlib.to_predicate(r.trainable)

    def dtype_of(path, variable):
        if trainable(path, variable):
            return jnp.float32
        return r.frozen_dtype if isinstance(variable, nnx.Param) else None

    return dtype_of


def build_model(
    config: ml_collections.ConfigDict, mesh: Mesh, kept_ids: np.ndarray, *, trainable_abstract: bool = False
) -> lexvla.LexVLA:
    """LexVLA with checkpoints loaded where configured, every variable created on `mesh` by the rules.
    `trainable_abstract`: the trainable parameters are left as `ShapeDtypeStruct`s (neither read nor initialised),
    for a run that restores them from its own checkpoint."""
    r = recipe(config, kept_ids)
    return hf_loader.load_model(
        r.make,
        r.parts,
        mesh=mesh,
        rules=sharding.rules_of(config),
        dtype_of=storage_dtypes(r),
        leave_abstract=filterlib.to_predicate(r.trainable) if trainable_abstract else None,
    )


def abstract_model(config: ml_collections.ConfigDict, num_words: int) -> lexvla.LexVLA:
    """The same model as shapes only (no memory, no tensor read), with the same dtypes: for compiles."""
    r = recipe(config, np.arange(num_words))
    dtype_of = storage_dtypes(r)
    graphdef, state = nnx.split(nnx.eval_shape(r.make))

    def cast(path, variable):
        value = variable.get_value()
        dtype = dtype_of(path, variable)
        if dtype is None or not jnp.issubdtype(value.dtype, jnp.floating):
            return variable
        return variable.replace(jax.ShapeDtypeStruct(value.shape, dtype))

    flat = [(p, cast(p, v)) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
