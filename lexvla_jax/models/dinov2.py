"""DINOv2 ViT image tower in Flax NNX, loadable from Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel`.

pixels `[B,H,W,C]` → non-overlapping p×p patch embedding → `[CLS, registers, patches]`, where CLS and patches
get position embeddings resampled to the input's patch grid exactly as transformers does → pre-norm blocks
(attention, LayerScale, MLP or SwiGLU FFN, drop path) → final LayerNorm. Token order and outputs follow HF.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lexvla_jax.models import image_norm, layers, vit
from lexvla_jax.models.vit import ViTOutput as Dinov2Output
from lexvla_jax.models.vit import bicubic_resize_matrix  # noqa: F401  (where it has always been found)

# HF model types → the `Dinov2Config` values they imply where config.json is silent (HF omits its defaults).
MODEL_TYPES: dict[str, dict[str, Any]] = {
    "dinov2": {},
    "dinov2_with_registers": {"patch_size": 16, "num_register_tokens": 4, "pos_embed_antialias": True},
}

_NON_HF_FIELDS = ("dtype", "param_dtype", "remat", "pos_embed_antialias", "image_norm", "pos_interpolation")
# How position embeddings are resampled to another patch grid: the source offset of each (`Dinov2Config`).
POS_INTERPOLATION_OFFSETS = {"hf": 0.0, "dinov2": 0.1}


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """DINOv2 architecture (Hugging Face field names and defaults) plus runtime settings.

    pos_embed_antialias: resample position embeddings with torch's antialiased bicubic (what
      `Dinov2WithRegistersModel` does) instead of plain bicubic (`Dinov2Model`).
    pos_interpolation: "hf" resamples the N×N table to an n×n grid by output size, as transformers does;
      "dinov2" by `scale_factor=(n + 0.1)/N`, as facebookresearch's DINOv2 does (`interpolate_offset=0.1`, the
      default of its models without registers), which moves source positions by up to ~0.2 cells.
    dtype: compute dtype; param_dtype: parameter dtype; remat: a policy name in `layers.REMAT_POLICIES`.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    patch_size: int = 14
    image_size: int = 224
    num_channels: int = 3
    num_register_tokens: int = 0
    use_swiglu_ffn: bool = False
    layerscale_value: float = 1.0
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    drop_path_rate: float = 0.0
    qkv_bias: bool = True
    initializer_range: float = 0.02
    pos_embed_antialias: bool = False
    pos_interpolation: str = "hf"
    image_norm: str = "imagenet"  # the pixel normalisation the tower was trained with (`image_norm.py`)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        vit.check_hidden_act(self.hidden_act)
        if self.remat not in layers.REMAT_POLICIES:
            raise ValueError(f"remat policy {self.remat!r} unknown; choose one of {sorted(layers.REMAT_POLICIES)}")
        image_norm.check_image_norm(self.image_norm)
        if self.pos_interpolation not in POS_INTERPOLATION_OFFSETS:
            raise ValueError(
                f"pos_interpolation={self.pos_interpolation!r} unknown; "
                f"choose one of {sorted(POS_INTERPOLATION_OFFSETS)}"
            )

    @property
    def layer_scale(self) -> bool:
        """Blocks scale both residual branches by learned LayerScale vectors (`vit.Block`)."""
        return True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_dim(self) -> int:
        """FFN hidden width; SwiGLU keeps two thirds of it, rounded up to a multiple of 8 (as HF)."""
        width = int(self.hidden_size * self.mlp_ratio)
        return (int(width * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else width

    @property
    def grid_size(self) -> int:
        """Side of the square patch grid the position embeddings were trained on."""
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens, which precede the patch tokens."""
        return 1 + self.num_register_tokens

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **runtime) -> Dinov2Config:
        """From a `config.json` dict of `dinov2` or `dinov2_with_registers`; `runtime` sets dtype/param_dtype/remat."""
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"config model_type {model_type!r} is not DINOv2; expected one of {sorted(MODEL_TYPES)}")
        names = [f.name for f in dataclasses.fields(cls) if f.name not in _NON_HF_FIELDS]
        if model_type == "dinov2":
            names.remove("num_register_tokens")
        values = {**MODEL_TYPES[model_type], **{name: hf[name] for name in names if name in hf}}
        for name in ("image_size", "patch_size"):
            values[name] = vit.square(name, values.get(name, getattr(cls, name)))
        return cls(**values, **runtime)


_PRESETS = {
    "dinov2_vits14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "dinov2_vitb14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "dinov2_vitl14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "dinov2_vitg14": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True),
}
PRESETS = tuple(sorted([*_PRESETS, *(name + "_reg" for name in _PRESETS)]))


def dinov2_preset(name: str, **overrides) -> Dinov2Config:
    """The released DINOv2 sizes (`dinov2_vit{s,b,l,g}14`, `_reg` for 4 registers), 518 px, patch 14."""
    base = name.removesuffix("_reg")
    if base not in _PRESETS:
        raise ValueError(f"unknown DINOv2 preset {name!r}; choose one of {PRESETS}")
    fields = dict(patch_size=14, image_size=518, **_PRESETS[base])
    if name.endswith("_reg"):
        fields.update(num_register_tokens=4, pos_embed_antialias=True)
    return Dinov2Config(**{**fields, **overrides})


class Dinov2Model(nnx.Module):
    """DINOv2 ViT. Drop path (if `drop_path_rate > 0`) draws from the `dropout` stream of the `rngs` given here."""

    def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
        self.config = config
        d, pdt = config.hidden_size, config.param_dtype
        init = nnx.initializers.truncated_normal(config.initializer_range)
        self.patch_embeddings = vit.PatchEmbed(config, rngs=rngs)
        self.cls_token = layers.param(rngs, init, (1, 1, d), (None, None, "embed"), pdt)
        self.register_tokens = (
            layers.param(rngs, nnx.initializers.zeros, (1, config.num_register_tokens, d), (None, None, "embed"), pdt)
            if config.num_register_tokens
            else None
        )
        self.position_embeddings = layers.param(rngs, init, (1, config.grid_size**2 + 1, d), (None, None, "embed"), pdt)
        self.layers = layers.stack_layers(lambda r: vit.Block(config, rngs=r), config.num_hidden_layers, rngs)
        self.layernorm = layers.LayerNorm(d, eps=config.layer_norm_eps, dtype=config.dtype, param_dtype=pdt, rngs=rngs)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens; `last_hidden_state[:, num_prefix_tokens:]` are the patch tokens."""
        return self.config.num_prefix_tokens

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int, square_pixels: bool) -> jax.Array:
        """Position embeddings `[1, 1+grid_h·grid_w, D]` for a patch grid, resampled as `pos_interpolation` says."""
        pos = self.position_embeddings[...]
        grid = vit.resample_positions(
            pos[0, 1:], grid_h, grid_w, square_pixels, antialias=self.config.pos_embed_antialias,
            offset=POS_INTERPOLATION_OFFSETS[self.config.pos_interpolation],
        )  # fmt: skip
        return jnp.concatenate([pos[:, :1], grid[None]], axis=1)

    def embed(
        self, pixels: jax.Array, masked: jax.Array | None = None, mask_token: jax.Array | None = None
    ) -> jax.Array:
        """`[B,H,W,C]` pixels → `[B, 1+R+P, D]` input tokens of the first block.

        `masked` (bool `[B, P]`, with `mask_token` `[D]`): those patch embeddings are replaced by the token before
        position embeddings are added, as HF's `bool_masked_pos` does (masked-image modelling in pre-training).
        """
        config = self.config
        vit.check_pixels(pixels, config.num_channels, config.patch_size)
        b, height, width, _ = pixels.shape
        patches = self.patch_embeddings(pixels)
        _, grid_h, grid_w, d = patches.shape
        dtype = config.dtype
        cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (b, 1, d))
        patches = patches.reshape(b, grid_h * grid_w, d)
        if masked is not None:
            patches = jnp.where(masked[..., None], mask_token.astype(dtype), patches)
        x = jnp.concatenate([cls, patches], axis=1)
        x = x + self.interpolate_pos_encoding(grid_h, grid_w, height == width).astype(dtype)
        if self.register_tokens is not None:
            registers = jnp.broadcast_to(self.register_tokens[...].astype(dtype), (b, config.num_register_tokens, d))
            x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)
        return layers.constrain(x, vit.ACT)

    def __call__(
        self,
        pixels: jax.Array,
        *,
        output_hidden_states: bool = False,
        deterministic: bool = True,
        masked: jax.Array | None = None,
        mask_token: jax.Array | None = None,
    ) -> Dinov2Output:
        """`pixels`: `[B,H,W,C]` normalised floats, any size ≥ one patch (position embeddings are resampled);
        `masked`, `mask_token`: see `embed`."""
        x = self.embed(pixels, masked, mask_token)
        out, hidden_states = vit.run_blocks(
            self.layers,
            x,
            remat=self.config.remat,
            output_hidden_states=output_hidden_states,
            deterministic=deterministic,
        )
        sequence = layers.constrain(self.layernorm(out), vit.ACT)
        return Dinov2Output(last_hidden_state=sequence, pooler_output=sequence[:, 0], hidden_states=hidden_states)
