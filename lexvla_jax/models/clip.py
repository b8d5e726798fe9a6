"""CLIP and SigLIP ViT image towers in Flax NNX, loadable from Hugging Face `CLIPVisionModel` / `CLIPModel` and
`SiglipVisionModel` / `SiglipModel`.

CLIP: pixels `[B,H,W,C]` → p×p patch embedding without bias → `[class, patches]` + learned position embeddings
(resampled to the input's grid as transformers does) → `pre_layrnorm` → pre-norm blocks (`vit.Block`, `quick_gelu`)
→ `last_hidden_state`; `pooler_output` is `post_layernorm` of the class token.
SigLIP is the same tower with four switches: no class token, a patch bias, no pre-LayerNorm, and `post_layernorm`
on every token followed by a multi-head attention-pooling ("MAP") head (`gelu_pytorch_tanh`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lexvla_jax.models import image_norm, layers, vit
from lexvla_jax.models.vit import ViTOutput

POOLINGS = ("cls", "map", "none")

# The two families' values where they differ from `ClipVisionConfig`'s CLIP defaults.
FAMILIES: dict[str, dict[str, Any]] = {
    "clip": {},
    "siglip": dict(
        patch_size=16,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        class_token=False,
        patch_bias=True,
        pre_layernorm=False,
        pooling="map",
        image_norm="siglip",
    ),
}
# HF model types → (family, the key of the vision config inside a joint image-text config.json, or None).
MODEL_TYPES = {
    "clip_vision_model": ("clip", None),
    "clip": ("clip", "vision_config"),
    "siglip_vision_model": ("siglip", None),
    "siglip": ("siglip", "vision_config"),
}
_HF_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "initializer_range",
)


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    """CLIP / SigLIP vision architecture (Hugging Face field names and CLIP's defaults), the switches between the
    two families, and runtime settings.

    class_token: a learned class token precedes the patches (CLIP); SigLIP has none.
    patch_bias: the patch embedding has a bias (SigLIP).
    pre_layernorm: LayerNorm on the embeddings before the first block (CLIP's `pre_layrnorm`).
    pooling: "cls" (CLIP): `last_hidden_state` is the last block's output and `pooler_output` is `post_layernorm` of
      the class token; "map" (SigLIP): `post_layernorm` on every token, then the attention-pooling head gives
      `pooler_output`; "none": SigLIP without its head (`vision_use_head=False`), no `pooler_output`.
    image_norm: the pixel normalisation the tower was trained with (`image_norm.py`).
    dtype: compute dtype; param_dtype: parameter dtype; remat: a policy name in `layers.REMAT_POLICIES`.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    qkv_bias: bool = True  # CLIP and SigLIP always have q/k/v biases
    class_token: bool = True
    patch_bias: bool = False
    pre_layernorm: bool = True
    pooling: str = "cls"
    image_norm: str = "clip"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"

    # What `vit.Block` reads that these families never have: LayerScale, a SwiGLU FFN, drop path.
    layer_scale = False
    use_swiglu_ffn = False
    drop_path_rate = 0.0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        vit.check_hidden_act(self.hidden_act)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} unknown; choose one of {POOLINGS}")
        if self.pooling == "cls" and not self.class_token:
            raise ValueError("pooling 'cls' needs class_token=True; SigLIP-style towers pool with 'map' or 'none'")
        if self.remat not in layers.REMAT_POLICIES:
            raise ValueError(f"remat policy {self.remat!r} unknown; choose one of {sorted(layers.REMAT_POLICIES)}")
        image_norm.check_image_norm(self.image_norm)

    @property
    def family(self) -> str:
        """The family: `clip` with a class token, else `siglip`."""
        return "clip" if self.class_token else "siglip"

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size

    @property
    def grid_size(self) -> int:
        """Side of the square patch grid the position embeddings were trained on."""
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: the class token, if any."""
        return int(self.class_token)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **runtime) -> ClipVisionConfig:
        """From a `config.json` dict of `clip_vision_model` / `siglip_vision_model`, or of a joint `clip` / `siglip`
        model (its `vision_config`); `runtime` sets dtype/param_dtype/remat. Absent fields take HF's defaults."""
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"config model_type {model_type!r} is not CLIP or SigLIP; expected one of {sorted(MODEL_TYPES)}"
            )
        family, nested = MODEL_TYPES[model_type]
        if nested:
            hf = hf.get(nested) or {}
        values = {**FAMILIES[family], **{name: hf[name] for name in _HF_FIELDS if name in hf}}
        if family == "siglip" and not hf.get("vision_use_head", True):
            values["pooling"] = "none"
        for name in ("image_size", "patch_size"):
            if name in values:
                values[name] = vit.square(name, values[name])
        return cls(**values, **runtime)


_PRESETS = {
    "clip_vitb32": dict(patch_size=32),
    "clip_vitb16": dict(patch_size=16),
    "clip_vitl14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        patch_size=14),
    "clip_vitl14_336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            patch_size=14, image_size=336),
    "siglip_vitb16": dict(FAMILIES["siglip"]),
    "siglip_so400m14": dict(FAMILIES["siglip"], hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                            num_attention_heads=16, patch_size=14),
}  # fmt: skip
PRESETS = tuple(sorted(_PRESETS))


def clip_vision_config(family: str = "clip", preset: str = "", **fields) -> ClipVisionConfig:
    """A `family` ("clip" / "siglip") tower: its defaults, then the preset (released sizes at 224 px:
    `clip_vit{b32,b16,l14}`, `clip_vitl14_336`, `siglip_vitb16`, `siglip_so400m14`), then `fields`."""
    if family not in FAMILIES:
        raise ValueError(f"vision family {family!r} unknown; choose one of {sorted(FAMILIES)}")
    choices = [p for p in PRESETS if p.startswith(family + "_")]
    if preset and preset not in choices:
        raise ValueError(f"unknown {family} preset {preset!r}; choose one of {choices}")
    return ClipVisionConfig(**{**FAMILIES[family], **_PRESETS.get(preset, {}), **fields})


class MapHead(nnx.Module):
    """SigLIP's multi-head attention pooling: a learned probe attends over the tokens, then `h + mlp(norm(h))`."""

    def __init__(self, config: ClipVisionConfig, *, rngs: nnx.Rngs):
        d = config.hidden_size
        init = nnx.initializers.truncated_normal(config.initializer_range)
        self.dtype = config.dtype
        self.probe = layers.param(rngs, init, (1, 1, d), (None, None, "embed"), config.param_dtype)
        self.attention = vit.Attention(config, rngs=rngs)
        self.layernorm = layers.LayerNorm(
            d, eps=config.layer_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs
        )
        self.mlp = vit.Mlp(config, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B,T,D]` → `[B,D]`."""
        probe = jnp.broadcast_to(self.probe[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
        h = self.attention(probe, context=x)
        return (h + self.mlp(self.layernorm(h)))[:, 0]


class ClipVisionModel(nnx.Module):
    """The CLIP (or SigLIP) vision transformer, with transformers' outputs."""

    def __init__(self, config: ClipVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, pdt = config.hidden_size, config.param_dtype
        init = nnx.initializers.truncated_normal(config.initializer_range)
        norm = dict(eps=config.layer_norm_eps, dtype=config.dtype, param_dtype=pdt, rngs=rngs)
        self.patch_embeddings = vit.PatchEmbed(config, use_bias=config.patch_bias, rngs=rngs)
        self.class_embedding = layers.param(rngs, init, (d,), ("embed",), pdt) if config.class_token else None
        positions = config.grid_size**2 + config.num_prefix_tokens
        self.position_embeddings = layers.param(rngs, init, (positions, d), (None, "embed"), pdt)
        self.pre_layernorm = layers.LayerNorm(d, **norm) if config.pre_layernorm else None
        self.layers = layers.stack_layers(lambda r: vit.Block(config, rngs=r), config.num_hidden_layers, rngs)
        self.post_layernorm = layers.LayerNorm(d, **norm)
        self.head = MapHead(config, rngs=rngs) if config.pooling == "map" else None

    @property
    def num_prefix_tokens(self) -> int:
        """The class token (CLIP) or nothing (SigLIP); `last_hidden_state[:, num_prefix_tokens:]` are the patches."""
        return self.config.num_prefix_tokens

    def embed(self, pixels: jax.Array) -> jax.Array:
        """`[B,H,W,C]` pixels → `[B, prefix+P, D]` input tokens of the first block (after `pre_layrnorm`)."""
        config = self.config
        vit.check_pixels(pixels, config.num_channels, config.patch_size)
        b, height, width, _ = pixels.shape
        patches = self.patch_embeddings(pixels)
        _, grid_h, grid_w, d = patches.shape
        dtype, k = config.dtype, config.num_prefix_tokens
        x = patches.reshape(b, grid_h * grid_w, d)
        pos = self.position_embeddings[...]
        grid = vit.resample_positions(pos[k:], grid_h, grid_w, height == width)
        if self.class_embedding is not None:
            cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (b, 1, d))
            x = jnp.concatenate([cls, x], axis=1)
            grid = jnp.concatenate([pos[:k], grid], axis=0)
        x = x + grid.astype(dtype)
        if self.pre_layernorm is not None:
            x = self.pre_layernorm(x)
        return layers.constrain(x, vit.ACT)

    def __call__(
        self, pixels: jax.Array, *, output_hidden_states: bool = False, deterministic: bool = True
    ) -> ViTOutput:
        """`pixels`: `[B,H,W,C]` normalised floats, any size ≥ one patch (position embeddings are resampled)."""
        x = self.embed(pixels)
        out, hidden_states = vit.run_blocks(
            self.layers,
            x,
            remat=self.config.remat,
            output_hidden_states=output_hidden_states,
            deterministic=deterministic,
        )
        if self.config.pooling == "cls":
            return ViTOutput(out, self.post_layernorm(out[:, 0]), hidden_states)
        sequence = layers.constrain(self.post_layernorm(out), vit.ACT)
        pooled = self.head(sequence) if self.head is not None else None
        return ViTOutput(sequence, pooled, hidden_states)
