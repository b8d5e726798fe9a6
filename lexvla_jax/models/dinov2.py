"""DINOv2 ViT image tower in Flax NNX, loadable from Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel`.

pixels `[B,H,W,C]` → non-overlapping p×p patch embedding → `[CLS, registers, patches]`, where CLS and patches
get position embeddings resampled to the input's patch grid exactly as transformers does → pre-norm blocks
(attention, LayerScale, MLP or SwiGLU FFN, drop path) → final LayerNorm. Token order and outputs follow HF.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from lexvla_jax.models import image_norm, layers

# Hugging Face `hidden_act` names → functions.
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# HF model types → the `Dinov2Config` values they imply where config.json is silent (HF omits its defaults).
MODEL_TYPES: dict[str, dict[str, Any]] = {
    "dinov2": {},
    "dinov2_with_registers": {"patch_size": 16, "num_register_tokens": 4, "pos_embed_antialias": True},
}

_NON_HF_FIELDS = ("dtype", "param_dtype", "remat", "pos_embed_antialias")
ACT = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """DINOv2 architecture (Hugging Face field names and defaults) plus runtime settings.

    pos_embed_antialias: resample position embeddings with torch's antialiased bicubic (what
      `Dinov2WithRegistersModel` does) instead of plain bicubic (`Dinov2Model`).
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
    image_norm: str = "imagenet"  # the pixel normalisation the tower was trained with (`image_norm.py`)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} unsupported; choose one of {sorted(ACTIVATIONS)}")
        if self.remat not in layers.REMAT_POLICIES:
            raise ValueError(f"remat policy {self.remat!r} unknown; choose one of {sorted(layers.REMAT_POLICIES)}")
        image_norm.check_image_norm(self.image_norm)

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
            values[name] = _square(name, values.get(name, getattr(cls, name)))
        return cls(**values, **runtime)


def _square(name: str, value) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise ValueError(f"{name} {list(value)} is not square; only square {name} is supported")
    return int(value[0])


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


# ----------------------------------------------------------------------------------------------------------------
# Position-embedding resampling: torch's bicubic as explicit weight matrices (static shapes, NumPy, float64).


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter `a`."""
    x = np.abs(x)
    inner = ((a + 2) * x - (a + 3)) * x * x + 1
    outer = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, inner, np.where(x < 2, outer, 0.0))


def bicubic_resize_matrix(in_size: int, out_size: int, *, antialias: bool = False) -> np.ndarray:
    """`[out_size, in_size]` weights of torch's `interpolate(size=..., mode="bicubic", align_corners=False)`.

    Without antialias: a=-0.75, source `(i + 0.5)·in/out − 0.5`, border taps clamped. With antialias (torch's
    `_upsample_bicubic2d_aa`, PIL-style): a=-0.5, the kernel stretched by `in/out` when downsampling, taps outside
    the input dropped and the rest renormalised.
    """
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    if not antialias:
        source = (rows + 0.5) * scale - 0.5
        base = np.floor(source)
        for tap in range(-1, 3):
            index = np.clip(base + tap, 0, in_size - 1).astype(np.int64)
            np.add.at(weights, (rows, index), _cubic(source - base - tap, -0.75))
        return weights
    support, stretch = (2.0 * scale, scale) if scale >= 1 else (2.0, 1.0)
    for i in rows:
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = _cubic((np.arange(lo, hi) - center + 0.5) / stretch, -0.5)
        weights[i, lo:hi] = taps / taps.sum() if taps.sum() != 0 else taps
    return weights


# ----------------------------------------------------------------------------------------------------------------
# Modules.


class PatchEmbed(nnx.Module):
    """Non-overlapping p×p patches → `hidden_size`; kernel `[p,p,C,D]` (HF's `[D,C,p,p]` permuted)."""

    def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
        p, c, d = config.patch_size, config.num_channels, config.hidden_size
        self.patch_size = p
        self.dtype = config.dtype
        init = nnx.initializers.truncated_normal(config.initializer_range)
        self.kernel = layers.param(rngs, init, (p, p, c, d), (None, None, None, "embed"), config.param_dtype)
        self.bias = layers.param(rngs, nnx.initializers.zeros, (d,), ("embed",), config.param_dtype)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """`[B,H,W,C]` → `[B,H//p,W//p,D]`; trailing rows/columns that do not fill a patch are dropped."""
        b, height, width, c = pixels.shape
        p = self.patch_size
        h, w = height // p, width // p
        x = pixels[:, : h * p, : w * p].astype(self.dtype).reshape(b, h, p, w, p, c)
        y = jnp.einsum("bipjqc,pqcd->bijd", x, self.kernel[...].astype(self.dtype))
        return y + self.bias[...].astype(self.dtype)


def _linear(config: Dinov2Config, rngs: nnx.Rngs):
    """`layers.Linear` with bias, the config's dtypes and HF's truncated-normal init."""
    return functools.partial(
        layers.Linear,
        use_bias=True,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nnx.initializers.truncated_normal(config.initializer_range),
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Bidirectional multi-head self-attention with HF's q/k/v (optional bias) and output projections."""

    def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        linear = _linear(config, rngs)
        self.q_proj = linear(d, d, ("embed", "heads"), use_bias=config.qkv_bias)
        self.k_proj = linear(d, d, ("embed", "heads"), use_bias=config.qkv_bias)
        self.v_proj = linear(d, d, ("embed", "heads"), use_bias=config.qkv_bias)
        self.o_proj = linear(d, d, ("heads", "embed"), use_bias=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape

        def heads(y):
            return layers.constrain(y.reshape(b, t, self.num_heads, -1), ("batch", "length", "act_heads", None))

        out = layers.dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.o_proj(out.reshape(b, t, d))


class Mlp(nnx.Module):
    """`fc2(act(fc1(x)))`."""

    def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
        linear = _linear(config, rngs)
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = linear(config.hidden_size, config.mlp_dim, ("embed", "mlp"))
        self.fc2 = linear(config.mlp_dim, config.hidden_size, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.constrain(self.act(self.fc1(x)), ("batch", "length", "act_mlp"))
        return self.fc2(h)


class SwiGLUFFN(nnx.Module):
    """`down(silu(gate(x)) · up(x))` (DINOv2 ViT-g)."""

    def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
        linear = _linear(config, rngs)
        self.gate_proj = linear(config.hidden_size, config.mlp_dim, ("embed", "mlp"))
        self.up_proj = linear(config.hidden_size, config.mlp_dim, ("embed", "mlp"))
        self.down_proj = linear(config.mlp_dim, config.hidden_size, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), ("batch", "length", "act_mlp"))
        return self.down_proj(h)


class Block(nnx.Module):
    """Pre-norm block: `x + drop(ls1 · attn(norm1 x))`, then `x + drop(ls2 · ffn(norm2 x))`."""

    def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
        d = config.hidden_size
        norm = functools.partial(
            layers.LayerNorm, d, eps=config.layer_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype
        )
        scale = nnx.initializers.constant(config.layerscale_value)
        self.dtype = config.dtype
        self.norm1 = norm(rngs=rngs)
        self.attention = Attention(config, rngs=rngs)
        self.layer_scale1 = layers.param(rngs, scale, (d,), ("embed",), config.param_dtype)
        self.norm2 = norm(rngs=rngs)
        self.mlp = SwiGLUFFN(config, rngs=rngs) if config.use_swiglu_ffn else Mlp(config, rngs=rngs)
        self.layer_scale2 = layers.param(rngs, scale, (d,), ("embed",), config.param_dtype)
        # Stochastic depth: one keep/drop draw per sample, rescaled by 1/(1-rate), as dropout broadcast over T, D.
        rate = config.drop_path_rate
        self.drop_path = nnx.Dropout(rate, broadcast_dims=(1, 2), rngs=rngs) if rate > 0 else None

    def _residual(self, branch: jax.Array, scale: nnx.Param, deterministic: bool) -> jax.Array:
        branch = branch * scale[...].astype(self.dtype)
        if self.drop_path is not None:
            branch = self.drop_path(branch, deterministic=deterministic)
        return branch

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        x = x + self._residual(self.attention(self.norm1(x)), self.layer_scale1, deterministic)
        x = layers.constrain(x, ACT)
        return x + self._residual(self.mlp(self.norm2(x)), self.layer_scale2, deterministic)


@struct.dataclass
class Dinov2Output:
    """HF-compatible outputs.

    last_hidden_state: `[B, 1+R+P, D]` tokens (CLS, registers, patches) after the final LayerNorm.
    pooler_output: `[B, D]` the normalised CLS token.
    hidden_states: the embeddings and every layer's output (before the final LayerNorm), when asked for.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


class Dinov2Model(nnx.Module):
    """DINOv2 ViT. Drop path (if `drop_path_rate > 0`) draws from the `dropout` stream of the `rngs` given here."""

    def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
        self.config = config
        d, pdt = config.hidden_size, config.param_dtype
        init = nnx.initializers.truncated_normal(config.initializer_range)
        self.patch_embeddings = PatchEmbed(config, rngs=rngs)
        self.cls_token = layers.param(rngs, init, (1, 1, d), (None, None, "embed"), pdt)
        self.register_tokens = (
            layers.param(rngs, nnx.initializers.zeros, (1, config.num_register_tokens, d), (None, None, "embed"), pdt)
            if config.num_register_tokens
            else None
        )
        self.position_embeddings = layers.param(rngs, init, (1, config.grid_size**2 + 1, d), (None, None, "embed"), pdt)
        self.layers = layers.stack_layers(lambda r: Block(config, rngs=r), config.num_hidden_layers, rngs)
        self.layernorm = layers.LayerNorm(d, eps=config.layer_norm_eps, dtype=config.dtype, param_dtype=pdt, rngs=rngs)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens; `last_hidden_state[:, num_prefix_tokens:]` are the patch tokens."""
        return self.config.num_prefix_tokens

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int, square_pixels: bool) -> jax.Array:
        """Position embeddings `[1, 1+grid_h·grid_w, D]` for a patch grid, as transformers resamples them."""
        pos = self.position_embeddings[...]
        n = self.config.grid_size
        if grid_h * grid_w == n * n and square_pixels:
            return pos
        antialias = self.config.pos_embed_antialias
        rows = jnp.asarray(bicubic_resize_matrix(n, grid_h, antialias=antialias), jnp.float32)
        cols = jnp.asarray(bicubic_resize_matrix(n, grid_w, antialias=antialias), jnp.float32)
        grid = pos[0, 1:].astype(jnp.float32).reshape(n, n, -1)
        grid = jnp.einsum("ih,hwd->iwd", rows, grid, precision=jax.lax.Precision.HIGHEST)
        grid = jnp.einsum("jw,iwd->ijd", cols, grid, precision=jax.lax.Precision.HIGHEST)
        return jnp.concatenate([pos[:, :1], grid.reshape(1, grid_h * grid_w, -1).astype(pos.dtype)], axis=1)

    def embed(
        self, pixels: jax.Array, masked: jax.Array | None = None, mask_token: jax.Array | None = None
    ) -> jax.Array:
        """`[B,H,W,C]` pixels → `[B, 1+R+P, D]` input tokens of the first block.

        `masked` (bool `[B, P]`, with `mask_token` `[D]`): those patch embeddings are replaced by the token before
        position embeddings are added, as HF's `bool_masked_pos` does (masked-image modelling in pre-training).
        """
        config = self.config
        if pixels.ndim != 4 or pixels.shape[-1] != config.num_channels:
            raise ValueError(
                f"pixels of shape {pixels.shape}: expected NHWC [B,H,W,{config.num_channels}] (channels last)"
            )
        b, height, width, _ = pixels.shape
        if min(height, width) < config.patch_size:
            raise ValueError(f"image {height}x{width} is smaller than one {config.patch_size}px patch")
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
        return layers.constrain(x, ACT)

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

        def body(layer: Block, h: jax.Array, _) -> jax.Array:
            return layers.constrain(layer(h, deterministic), ACT)

        run = functools.partial(layers.scan_layers, self.layers, body, x, remat=self.config.remat)
        hidden_states = None
        if output_hidden_states:
            out, per_layer = run(collect=True)
            hidden_states = (x, *(per_layer[i] for i in range(self.config.num_hidden_layers)))
        else:
            out = run()
        sequence = layers.constrain(self.layernorm(out), ACT)
        return Dinov2Output(last_hidden_state=sequence, pooler_output=sequence[:, 0], hidden_states=hidden_states)
