"""Pieces every ViT image tower here shares (DINOv2, CLIP, SigLIP): patch embedding, attention, MLPs, the pre-norm
block, position-embedding resampling as transformers does it, and the scanned stack of blocks.

The pieces read their sizes from the tower's config by attribute: `hidden_size`, `num_attention_heads`, `qkv_bias`,
`mlp_dim`, `hidden_act`, `layer_norm_eps`, `initializer_range`, `dtype`, `param_dtype`, and for the block
`layer_scale` (DINOv2's LayerScale, with `layerscale_value`), `use_swiglu_ffn` and `drop_path_rate`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from lexvla_jax.models import layers

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

ACT = ("batch", "length", "act_embed")


def check_hidden_act(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} unsupported; choose one of {sorted(ACTIVATIONS)}")
    return name


def square(name: str, value) -> int:
    """An HF size field (an int or an `[h, w]` pair) as one int; non-square sizes are an error."""
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise ValueError(f"{name} {list(value)} is not square; only square {name} is supported")
    return int(value[0])


def check_pixels(pixels: jax.Array, num_channels: int, patch_size: int) -> None:
    """One-line errors for images a ViT cannot take: not NHWC, or smaller than one patch."""
    if pixels.ndim != 4 or pixels.shape[-1] != num_channels:
        raise ValueError(f"pixels of shape {pixels.shape}: expected NHWC [B,H,W,{num_channels}] (channels last)")
    if min(pixels.shape[1:3]) < patch_size:
        raise ValueError(f"image {pixels.shape[1]}x{pixels.shape[2]} is smaller than one {patch_size}px patch")


@struct.dataclass
class ViTOutput:
    """HF-compatible outputs of a ViT tower.

    last_hidden_state: `[B, T, D]` every token, as the tower's HF model returns it.
    pooler_output: `[B, D]` the tower's pooled vector (None for a SigLIP tower without its head).
    hidden_states: the embeddings and every layer's output, when asked for.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None
    hidden_states: tuple[jax.Array, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------
# Position-embedding resampling: torch's bicubic as explicit weight matrices (static shapes, NumPy, float64).


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter `a`."""
    x = np.abs(x)
    inner = ((a + 2) * x - (a + 3)) * x * x + 1
    outer = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, inner, np.where(x < 2, outer, 0.0))


def bicubic_resize_matrix(in_size: int, out_size: int, *, antialias: bool = False, offset: float = 0.0) -> np.ndarray:
    """`[out_size, in_size]` weights of torch's `interpolate(size=..., mode="bicubic", align_corners=False)`, or with
    `offset` of `interpolate(scale_factor=(out_size + offset)/in_size, ...)` (the same output size, a scale of
    `in/(out + offset)`).

    Without antialias: a=-0.75, source `(i + 0.5)·scale − 0.5`, border taps clamped. With antialias (torch's
    `_upsample_bicubic2d_aa`, PIL-style): a=-0.5, the kernel stretched by `scale` when downsampling, taps outside
    the input dropped and the rest renormalised.
    """
    scale = in_size / (out_size + offset)
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


def resample_positions(
    grid: jax.Array, grid_h: int, grid_w: int, square_pixels: bool, *, antialias: bool = False, offset: float = 0.0
) -> jax.Array:
    """Patch position embeddings `[n·n, D]` trained on an n×n grid → `[grid_h·grid_w, D]`, as transformers does
    (`offset` 0) or as facebookresearch's DINOv2 does (`offset` 0.1: `scale_factor=(grid + 0.1)/n`).

    Unchanged when the grid has n·n patches and the image is square (transformers' condition); otherwise torch's
    bicubic resize to `(grid_h, grid_w)`, computed in float32 and returned in the input's dtype.
    """
    n = int(round(grid.shape[0] ** 0.5))
    if grid_h * grid_w == n * n and square_pixels:
        return grid
    rows = jnp.asarray(bicubic_resize_matrix(n, grid_h, antialias=antialias, offset=offset), jnp.float32)
    cols = jnp.asarray(bicubic_resize_matrix(n, grid_w, antialias=antialias, offset=offset), jnp.float32)
    out = grid.astype(jnp.float32).reshape(n, n, -1)
    out = jnp.einsum("ih,hwd->iwd", rows, out, precision=jax.lax.Precision.HIGHEST)
    out = jnp.einsum("jw,iwd->ijd", cols, out, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(grid_h * grid_w, -1).astype(grid.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Modules.


class PatchEmbed(nnx.Module):
    """Non-overlapping p×p patches → `hidden_size`; kernel `[p,p,C,D]` (HF's `[D,C,p,p]` permuted); optional bias."""

    def __init__(self, config, *, use_bias: bool = True, rngs: nnx.Rngs):
        p, c, d = config.patch_size, config.num_channels, config.hidden_size
        self.patch_size = p
        self.dtype = config.dtype
        init = nnx.initializers.truncated_normal(config.initializer_range)
        self.kernel = layers.param(rngs, init, (p, p, c, d), (None, None, None, "embed"), config.param_dtype)
        self.bias = (
            layers.param(rngs, nnx.initializers.zeros, (d,), ("embed",), config.param_dtype) if use_bias else None
        )

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """`[B,H,W,C]` → `[B,H//p,W//p,D]`; trailing rows/columns that do not fill a patch are dropped."""
        b, height, width, c = pixels.shape
        p = self.patch_size
        h, w = height // p, width // p
        x = pixels[:, : h * p, : w * p].astype(self.dtype).reshape(b, h, p, w, p, c)
        y = jnp.einsum("bipjqc,pqcd->bijd", x, self.kernel[...].astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


def _linear(config, rngs: nnx.Rngs):
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
    """Bidirectional multi-head attention with HF's q/k/v (optional bias) and output projections.

    Self-attention by default; with `context`, queries come from `x` and keys/values from `context` (SigLIP's
    attention-pooling head).
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        linear = _linear(config, rngs)
        self.q_proj = linear(d, d, ("embed", "heads"), use_bias=config.qkv_bias)
        self.k_proj = linear(d, d, ("embed", "heads"), use_bias=config.qkv_bias)
        self.v_proj = linear(d, d, ("embed", "heads"), use_bias=config.qkv_bias)
        self.o_proj = linear(d, d, ("heads", "embed"), use_bias=True)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        b, t, d = x.shape
        context = x if context is None else context

        def heads(y):
            y = y.reshape(b, y.shape[1], self.num_heads, -1)
            return layers.constrain(y, ("batch", "length", "act_heads", None))

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(context)), heads(self.v_proj(context))
        return self.o_proj(layers.dot_product_attention(q, k, v).reshape(b, t, d))


class Mlp(nnx.Module):
    """`fc2(act(fc1(x)))`."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        linear = _linear(config, rngs)
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = linear(config.hidden_size, config.mlp_dim, ("embed", "mlp"))
        self.fc2 = linear(config.mlp_dim, config.hidden_size, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.constrain(self.act(self.fc1(x)), ("batch", "length", "act_mlp"))
        return self.fc2(h)


class SwiGLUFFN(nnx.Module):
    """`down(silu(gate(x)) · up(x))` (DINOv2 ViT-g)."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        linear = _linear(config, rngs)
        self.gate_proj = linear(config.hidden_size, config.mlp_dim, ("embed", "mlp"))
        self.up_proj = linear(config.hidden_size, config.mlp_dim, ("embed", "mlp"))
        self.down_proj = linear(config.mlp_dim, config.hidden_size, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), ("batch", "length", "act_mlp"))
        return self.down_proj(h)


class Block(nnx.Module):
    """Pre-norm block: `x + drop(ls1 · attn(norm1 x))`, then `x + drop(ls2 · ffn(norm2 x))`.

    LayerScale (`ls`, DINOv2) only when `config.layer_scale`; drop path only when `config.drop_path_rate > 0`.
    Without both it is CLIP's and SigLIP's encoder layer.
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        d = config.hidden_size
        norm = functools.partial(
            layers.LayerNorm, d, eps=config.layer_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype
        )
        # LayerScale's parameters are created between the others, as they always were: the same seed gives the same
        # initial weights.
        scale = nnx.initializers.constant(config.layerscale_value) if config.layer_scale else None
        layer_scale = lambda: layers.param(rngs, scale, (d,), ("embed",), config.param_dtype) if scale else None
        self.dtype = config.dtype
        self.norm1 = norm(rngs=rngs)
        self.attention = Attention(config, rngs=rngs)
        self.layer_scale1 = layer_scale()
        self.norm2 = norm(rngs=rngs)
        self.mlp = SwiGLUFFN(config, rngs=rngs) if config.use_swiglu_ffn else Mlp(config, rngs=rngs)
        self.layer_scale2 = layer_scale()
        # Stochastic depth: one keep/drop draw per sample, rescaled by 1/(1-rate), as dropout broadcast over T, D.
        rate = config.drop_path_rate
        self.drop_path = nnx.Dropout(rate, broadcast_dims=(1, 2), rngs=rngs) if rate > 0 else None

    def _residual(self, branch: jax.Array, scale: nnx.Param | None, deterministic: bool) -> jax.Array:
        if scale is not None:
            branch = branch * scale[...].astype(self.dtype)
        if self.drop_path is not None:
            branch = self.drop_path(branch, deterministic=deterministic)
        return branch

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        x = x + self._residual(self.attention(self.norm1(x)), self.layer_scale1, deterministic)
        x = layers.constrain(x, ACT)
        return x + self._residual(self.mlp(self.norm2(x)), self.layer_scale2, deterministic)


def run_blocks(
    blocks: nnx.Module, x: jax.Array, *, remat: str, output_hidden_states: bool, deterministic: bool
) -> tuple[jax.Array, tuple[jax.Array, ...] | None]:
    """Stacked `Block`s (`layers.stack_layers`) run with scan: the last output and, when asked, the embeddings
    followed by every layer's output."""

    def body(layer: Block, h: jax.Array, _) -> jax.Array:
        return layers.constrain(layer(h, deterministic), ACT)

    run = functools.partial(layers.scan_layers, blocks, body, x, remat=remat)
    if not output_hidden_states:
        return run(), None
    out, per_layer = run(collect=True)
    return out, (x, *(per_layer[i] for i in range(per_layer.shape[0])))
