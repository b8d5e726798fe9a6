"""LexVLA: DINOv2 and Llama 2 mapped into one shared lexical vocabulary.

```
image ─ DINOv2 (frozen) ─ patch tokens [B,P,Dv] ─ adapter ─ [B,P,Dt] ─ · Z_imgᵀ ─ ELU1p ─ max_P ─ L2 ─ s_img [B,V']
text  ─ prompt ─ Llama (+LoRA) ─ final-norm hidden of the last real token [B,Dt] ─ · Z_txtᵀ ─ ELU1p ─ L2 ─ s_txt [B,V']
```
The image tower is DINOv2 as in the paper, or CLIP / SigLIP (`models/vision.py`; Q(CLIP) of Table 1,
`configs/variants/qclip.py`): whichever it is, its patch tokens (not the class token) feed the adapter, and images
are normalised as that tower was trained (`config.vision.image_norm`).
`Z_txt` holds the rows of Llama's `lm_head` for the kept vocabulary (frozen); `Z_img` starts as a copy
of it and trains. Which parameters train is decided by the optimiser's filter, not here.

With `text_encoder="bow"` (Q(BoW), `configs/variants/qbow.py`) there is no language model and no text codebook:
the text side reads kept-vocabulary columns (`bow.BowEncoder`) and its vector is their L2-normalised indicator,
`s_txt = L2(bag_of_words)`. The image side is unchanged; its codebook `Z_img [V',Dt]` (Dt: the text config's
hidden size, only a width here) starts from random rows, having no `lm_head` to copy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lexvla_jax.models import image_norm, layers, lexical, llama, vit
from lexvla_jax.models.vision import VisionConfig, make_tower


@dataclasses.dataclass(frozen=True)
class LexVLAConfig:
    """Sizes of the joint model.

    vision: the image tower's config (`models/vision.py`: DINOv2, CLIP or SigLIP).
    vocab_size: V', the number of kept words (rows of both codebooks).
    adapter_heads / adapter_mlp_dim: the adapter's attention heads and MLP width.
    adapter_shape: `ADAPTER_SHAPES`; "mlp" (Dv → mlp → Dt) or "block" (a whole Dv-wide transformer block, then a
      Dv → Dt projection). See `Adapter`.
    text_encoder: `TEXT_ENCODERS`; "llm" (Llama + text codebook) or "bow" (bag of words, no text tower; `text`
      then only gives the codebook width Dt).
    logit_scale_init / logit_scale_max: CLIP-style learnable temperature, stored as a log and clamped.
    max_pool_chunk: vocabulary chunk of the memory-lean max-pool.
    """

    vision: VisionConfig
    text: llama.LlamaConfig
    vocab_size: int
    adapter_heads: int = 16
    adapter_mlp_dim: int = 4096
    adapter_shape: str = "mlp"
    text_encoder: str = "llm"
    logit_scale_init: float = 1 / 0.07
    logit_scale_max: float = 100.0
    max_pool_chunk: int = lexical.DEFAULT_CHUNK_SIZE
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.adapter_shape not in ADAPTER_SHAPES:
            raise ValueError(f"adapter_shape={self.adapter_shape!r} unknown; choose one of {ADAPTER_SHAPES}")
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder={self.text_encoder!r} unknown; choose one of {TEXT_ENCODERS}")


ADAPTER_SHAPES = ("mlp", "block")
TEXT_ENCODERS = ("llm", "bow")


class Adapter(nnx.Module):
    """Patch tokens `[B,P,Dv]` → text width `[B,P,Dt]`, in one of two shapes (`LexVLAConfig.adapter_shape`).

    - "mlp" (default): `x + attn(norm(x))`, then a two-layer MLP `Dv → mlp → Dt` whose output is not added back
      (the widths differ). For DINOv2 ViT-L into Llama-2-7B with mlp 4096: 25.2M parameters, most of them in the
      4096 × 4096 second layer.
    - "block": a whole pre-norm transformer block at width Dv (`x + attn(norm(x))`, `x + mlp(norm(x))` with
      `Dv → mlp → Dv`), then a final norm and a `Dv → Dt` projection. For ViT-L into Llama-2-7B: 16.8M parameters,
      the shape that fits the paper's reported ~17M adapter.
    The paper's public material gives the count, not the layout. "mlp" stays the default, the layout this model
    has always had, so checkpoints trained with it keep loading and results stay comparable; "block" is one config
    line away (`model.adapter_shape`, `configs/variants/adapter17m.py`).
    """

    def __init__(self, config: LexVLAConfig, *, rngs: nnx.Rngs):
        dv, dt = config.vision.hidden_size, config.text.hidden_size
        block = dataclasses.replace(
            config.vision,
            num_attention_heads=config.adapter_heads,
            qkv_bias=True,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
        )
        norm = dict(eps=config.vision.layer_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        linear = dict(use_bias=True, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.norm1 = layers.LayerNorm(dv, **norm)
        self.attention = vit.Attention(block, rngs=rngs)
        self.norm2 = layers.LayerNorm(dv, **norm)
        self.block = config.adapter_shape == "block"
        self.fc1 = layers.Linear(dv, config.adapter_mlp_dim, ("embed", "mlp"), **linear)
        self.fc2 = layers.Linear(config.adapter_mlp_dim, dv if self.block else dt, ("mlp", "embed"), **linear)
        if self.block:
            self.norm_out = layers.LayerNorm(dv, **norm)
            self.proj = layers.Linear(dv, dt, ("embed", "mlp"), **linear)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.norm1(x))
        h = layers.constrain(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False), ("batch", "patches", "act_mlp"))
        out = self.fc2(h)
        if self.block:
            out = self.proj(self.norm_out(x + out))
        return layers.constrain(out, ("batch", "patches", "act_embed"))


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of each row's last real token `[B]` (works for left and right padding)."""
    positions = jnp.arange(attention_mask.shape[1])
    return jnp.max(jnp.where(attention_mask.astype(bool), positions, -1), axis=1)


def bag_of_words(columns: jax.Array, mask: jax.Array, vocab_size: int) -> jax.Array:
    """`[B,V]` float32: 1 at each row's `columns [B,L]` where `mask [B,L]` is set, 0 elsewhere (repeats count once)."""
    rows = jnp.arange(columns.shape[0])[:, None]
    return jnp.zeros((columns.shape[0], vocab_size), jnp.float32).at[rows, columns].max(mask.astype(jnp.float32))


class LexVLA(nnx.Module):
    """The two towers, the adapter, both codebooks and the logit scale, randomly initialised.

    `hf_loader.load_model` builds it with the towers and codebooks read from checkpoints instead (the text
    codebook and the visual codebook's starting point are then Llama's `lm_head` rows of the kept words).
    """

    def __init__(self, config: LexVLAConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vision = make_tower(config.vision, rngs=rngs)
        with_text = config.text_encoder == "llm"
        if with_text:  # before the codebook, as always: the same seed gives the same "llm" model
            self.text = llama.LlamaModel(config.text, with_lm_head=False, rngs=rngs)
        shape = (config.vocab_size, config.text.hidden_size)
        codebook = nnx.initializers.normal(0.02)(rngs.params(), shape, config.param_dtype)
        if with_text:
            self.text_codebook = nnx.Param(codebook, sharding_names=("vocab", "embed"))
        self.visual_codebook = nnx.Param(jnp.array(codebook), sharding_names=("vocab", "embed"))
        self.adapter = Adapter(config, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(math.log(config.logit_scale_init), jnp.float32))

    def normalize(self, images: jax.Array) -> jax.Array:
        """uint8 images → the vision tower's input, normalised as that tower expects (`image_norm.py`)."""
        return image_norm.normalize_images(images, self.config.vision.image_norm)

    def logit_scale_value(self) -> jax.Array:
        """`exp(logit_scale)` clamped to `logit_scale_max` (float32)."""
        return jnp.minimum(jnp.exp(self.logit_scale[...]), self.config.logit_scale_max)

    def patch_features(self, pixels: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Adapter output on the patch tokens only (class token and registers dropped) → `[B,P,Dt]`."""
        tokens = self.vision(pixels, deterministic=deterministic).last_hidden_state
        patches = layers.constrain(tokens[:, self.vision.num_prefix_tokens :], ("batch", "patches", "act_embed"))
        return self.adapter(patches)

    def encode_image(self, pixels: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Normalised image lexical vectors `[B,V']` (float32)."""
        h = self.patch_features(pixels, deterministic=deterministic)
        codebook = self.visual_codebook[...].astype(self.config.dtype)
        return lexical.image_lexical(h, codebook, chunk_size=self.config.max_pool_chunk)

    def patch_lexical(self, pixels: jax.Array, *, normalize: bool = True) -> jax.Array:
        """Per-patch lexical vectors `[B,P,V']` (no max-pool), for PatchDis and word maps."""
        h = self.patch_features(pixels)
        return lexical.patch_lexical(h, self.visual_codebook[...].astype(self.config.dtype), normalize=normalize)

    def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Normalised text lexical vectors `[B,V']` (float32).

        "llm": `input_ids` are prompt tokens; the vector is read at each row's last real token. "bow": `input_ids`
        are kept-vocabulary columns (`bow.BowEncoder`); a row with none gives the zero vector.
        """
        if self.config.text_encoder == "bow":
            weights = bag_of_words(input_ids, attention_mask, self.config.vocab_size)
        else:
            hidden = self.text(input_ids, attention_mask, deterministic=deterministic).last_hidden_state
            last = hidden[jnp.arange(hidden.shape[0]), last_token_index(attention_mask)]
            codebook = self.text_codebook[...].astype(self.config.dtype)
            weights = lexical.elu1p(jnp.einsum("bd,vd->bv", last, codebook, preferred_element_type=jnp.float32))
        return lexical.l2_normalize(layers.constrain(weights, ("batch", "act_vocab")))
