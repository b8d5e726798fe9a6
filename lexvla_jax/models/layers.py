"""Building blocks shared by both towers and the adapter.

Parameters carry logical axis names (`embed`, `heads`, `kv`, `mlp`, `vocab`, `layers`, ...); the rules
table in the config maps them to mesh axes (see `lexvla_jax.sharding`). Layers are created stacked
(`stack_layers`) and run with `scan_layers`, so an N-layer tower compiles once per layer shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lexvla_jax import sharding

# Logical names stay names: shardings are decided by the rules table when arrays are placed.
nnx.use_eager_sharding(False)

Names = tuple[str | None, ...]


def param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Names, dtype=jnp.float32, kind=nnx.Param):
    """A parameter of `shape` initialised by `init`, annotated with logical axis `names`."""
    return kind(init(rngs.params(), tuple(shape), dtype), sharding_names=tuple(names))


LORA_INITS = {
    "peft": nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),  # bound √(3·⅓/in) = 1/√in
    "he_uniform": nnx.initializers.he_uniform(),  # bound √(6/in)
}


class Linear(nnx.Module):
    """`y = x @ W (+ b)` with logical axis names and an optional LoRA branch `(alpha/r) · x A B`.

    `W` is `[in, out]`. The LoRA branch starts at zero (`B = 0`), so adding it leaves outputs unchanged.
    LoRA weights are `nnx.LoRAParam`s kept in float32 whatever `param_dtype` is: they train, and small
    updates to bfloat16 weights round away. The branch itself is not `nnx.LoRA`, which has no `alpha/r`
    scale and no dropout (PEFT's LoRA, the paper's, has both) and runs on `[B,T,·]` activations.
    `lora_init` (`LORA_INITS`) draws `A`: "peft" as PEFT's default, uniform in ±1/√in (torch's
    `kaiming_uniform_(a=√5)`), or "he_uniform", uniform in ±√(6/in) (2.45× wider).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        names: Names,
        *,
        use_bias: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.lecun_normal(),
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_init: str = "peft",
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.kernel = param(rngs, kernel_init, (in_features, out_features), names, param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (out_features,), names[1:], param_dtype) if use_bias else None
        self.lora_rank = lora_rank
        if lora_rank:
            self.lora_scale = lora_alpha / lora_rank
            lora = dict(dtype=jnp.float32, kind=nnx.LoRAParam)
            init = LORA_INITS[lora_init]
            self.lora_a = param(rngs, init, (in_features, lora_rank), (names[0], None), **lora)
            self.lora_b = param(rngs, nnx.initializers.zeros, (lora_rank, out_features), (None, names[1]), **lora)
            self.lora_dropout = nnx.Dropout(lora_dropout, rngs=rngs) if lora_dropout > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = x @ self.kernel[...].astype(self.dtype)
        if self.lora_rank:
            h = self.lora_dropout(x) if self.lora_dropout is not None else x
            # On 2-D rows: with [B,T,·] activations XLA:CPU transposes the whole output gradient for B's
            # gradient (a quarter of a LoRA Llama's backward time); on [B·T,·] it does not.
            h = h.reshape(-1, h.shape[-1])
            delta = (h @ self.lora_a[...].astype(self.dtype)) @ (self.lora_b[...] * self.lora_scale).astype(self.dtype)
            y = y + delta.reshape(y.shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def merge_lora(self) -> None:
        """Folds the LoRA branch into `W` and removes it (inference export)."""
        if not self.lora_rank:
            return
        delta = self.lora_a[...] @ self.lora_b[...] * self.lora_scale
        self.kernel[...] = (self.kernel[...] + delta).astype(self.kernel[...].dtype)
        self.lora_rank = 0
        del self.lora_a, self.lora_b, self.lora_dropout


def merge_lora(module: nnx.Module) -> None:
    """Merges every LoRA branch below `module` into its base weight (works on stacked layers too)."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, Linear):
            node.merge_lora()


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with learned `scale` and `bias`; statistics in float32, output in `dtype`."""

    def __init__(
        self,
        features: int,
        *,
        eps: float = 1e-6,
        names: Names = ("embed",),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, nnx.initializers.ones, (features,), names, param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (features,), names, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    is_causal: bool = False,
    implementation: str | None = None,
) -> jax.Array:
    """Multi-head / grouped-query attention through `jax.nn.dot_product_attention`.

    q: `[B,T,H,D]`; k, v: `[B,S,K,D]` with `H % K == 0` (K < H is grouped-query attention).
    mask: boolean, broadcastable to `[B,1,T,S]`, True where attention is allowed (e.g. padding on either
    side); `is_causal` adds the causal mask. A query that may attend to nothing gets the mean of `v`.
    Scores and softmax are float32 (bf16 inputs: float32 accumulation); the output has q's dtype.
    `implementation`: "xla", "cudnn" (flash attention), or None for `attention_implementation`'s choice.
    """
    if mask is not None:
        mask = jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
    implementation = implementation or attention_implementation(q, k, has_mask=mask is not None)
    attend = functools.partial(_attention, is_causal=is_causal, implementation=implementation)
    blocks = cpu_attention_blocks(q, k)
    if implementation != "xla" or blocks == 1:
        return attend(q, k, v, mask)
    cpu = functools.partial(_blocked_attention, attend, blocks)
    return jax.lax.platform_dependent(q, k, v, mask, cpu=cpu, default=attend)


# On CPU, attention whose float32 scores exceed this is computed a few examples at a time.
CPU_SCORES_BLOCK_BYTES = 4 * 2**20


def cpu_attention_blocks(q: jax.Array, k: jax.Array) -> int:
    """Into how many strided batch blocks CPU attention is split: the fewest whose `[b,H,T,S]` float32 scores fit in
    `CPU_SCORES_BLOCK_BYTES` (1 when the whole batch's do). Each block's scores, softmax and weighted sum then stay
    in cache (DINOv2's 257 tokens: ~20% faster forward on a 2-core CPU). Other platforms always take one piece."""
    b = q.shape[0]
    per_block = max(1, CPU_SCORES_BLOCK_BYTES // (q.shape[2] * q.shape[1] * k.shape[1] * 4))
    if per_block >= b:
        return 1
    return next(n for n in range(2, b + 1) if b % n == 0 and b // n <= per_block)


def _attention(q, k, v, mask, *, is_causal: bool, implementation: str) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=implementation)


def _blocked_attention(attend: Callable, blocks: int, q, k, v, mask) -> jax.Array:
    """`attend` as a loop over `blocks` strided blocks of the batch (examples i, i + blocks, ...)."""
    split = lambda x: None if x is None else x.reshape(x.shape[0] // blocks, blocks, *x.shape[1:]).swapaxes(0, 1)
    out = jax.lax.map(lambda xs: attend(*xs), (split(q), split(k), split(v), split(mask)))
    return out.swapaxes(0, 1).reshape(q.shape)


@functools.cache
def _on_cuda() -> bool:
    return jax.default_backend() == "gpu" and "cuda" in jax.devices()[0].client.platform_version.lower()


def attention_implementation(q: jax.Array, k: jax.Array, *, has_mask: bool) -> str:
    """ "cudnn" where cuDNN's flash attention takes these inputs, else "xla".

    cuDNN needs an NVIDIA GPU, bf16/fp16 inputs, a head size that is a multiple of 8 and at most 128
    (256 from Hopper on; 128 holds everywhere), and, with a mask (passed as a bias), even lengths.
    """
    lengths_ok = not has_mask or (q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0)
    head = q.shape[-1]
    if _on_cuda() and q.dtype in (jnp.bfloat16, jnp.float16) and head % 8 == 0 and head <= 128 and lengths_ok:
        return "cudnn"
    return "xla"


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """Creates `num_layers` copies of a layer with parameters stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(layer_rngs):
        return make_layer(layer_rngs)

    return make(rngs)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_all": jax.checkpoint_policies.everything_saveable,
}


def scan_layers(
    layers: nnx.Module,
    body: Callable,
    carry,
    per_layer=None,
    *,
    remat: str = "none",
    collect: bool = False,
):
    """Runs stacked `layers` in order with `jax.lax.scan`.

    `body(layer, carry, per_layer_slice) -> carry` sees one merged layer. `per_layer` is a pytree with a
    leading layer axis (e.g. dropout keys) or None. With `collect=True` every layer's output carry is
    also returned, stacked (for `hidden_states`). `remat` names a policy in `REMAT_POLICIES`; "none"
    stores all activations, "full" recomputes the whole layer in the backward pass.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat policy {remat!r} unknown; choose one of {sorted(REMAT_POLICIES)}")
    graphdef, state = nnx.split(layers)

    def step(c, xs):
        layer_state, extra = xs
        layer = nnx.merge(graphdef, layer_state)
        out = body(layer, c, extra)
        # Random-stream counters advance inside the body (dropout); hand them back out of the scan.
        return out, ((out if collect else None), nnx.state(layer, nnx.RngState))

    if remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
    carry, (outs, rng_state) = jax.lax.scan(step, carry, (state, per_layer))
    nnx.update(layers, rng_state)
    return (carry, outs) if collect else carry


def constrain(x: jax.Array, names: Names) -> jax.Array:
    """Constrains an activation's sharding by logical names (a no-op outside `sharding.use_mesh_rules`)."""
    return sharding.constrain(x, names)
