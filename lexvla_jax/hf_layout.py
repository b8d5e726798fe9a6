"""Where each of our parameters lives in a Hugging Face checkpoint: `{nnx path: Source}` per model (DINOv2, CLIP and
SigLIP vision towers, Llama).

The layouts describe tensors as `save_pretrained` writes them (and the released checkpoints hold them):
PyTorch `[out, in]` linear weights, one tensor per layer, fused SwiGLU inputs. The models know nothing of
this; `hf_loader.py` reads checkpoints through these tables (checkpoint loading imports the models, never the
reverse).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from lexvla_jax.models.clip import ClipVisionConfig
from lexvla_jax.models.dinov2 import Dinov2Config
from lexvla_jax.models.llama import LlamaConfig


class TensorReader(Protocol):
    """What a `Source` needs of a checkpoint: shapes, and reading a block of a tensor."""

    def shape(self, key: str) -> tuple[int, ...]: ...

    def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one model parameter comes from in a checkpoint.

    key: tensor name; with `{layer}` in it, the parameter is stacked over `num_layers` layers (leading axis).
    perm: axis permutation from checkpoint layout to model layout (`model = ckpt.transpose(perm)`),
      e.g. `(1, 0)` for a PyTorch `[out, in]` linear weight into an `[in, out]` kernel.
    rows: optional index array selecting rows (axis 0 of the checkpoint tensor), e.g. kept vocabulary.
    """

    key: str
    perm: tuple[int, ...] | None = None
    num_layers: int | None = None
    rows: tuple[int, ...] | None = None

    def keys(self) -> list[str]:
        if self.num_layers is None:
            return [self.key]
        return [self.key.format(layer=i) for i in range(self.num_layers)]

    def model_shape(self, ckpt: TensorReader) -> tuple[int, ...]:
        """The parameter's shape in model layout."""
        shape = list(ckpt.shape(self.keys()[0]))
        if self.rows is not None:
            shape[0] = len(self.rows)
        shape = [shape[a] for a in (self.perm or range(len(shape)))]
        return tuple([self.num_layers, *shape] if self.num_layers is not None else shape)

    def read(self, ckpt: TensorReader, index: tuple[slice, ...], dtype) -> np.ndarray:
        """Reads the block `index` (slices in model layout) of the parameter, and nothing more."""
        index = tuple(index)
        if self.num_layers is not None:
            layers = range(self.num_layers)[index[0]]
            parts = [self._read_one(ckpt, self.key.format(layer=i), index[1:], dtype) for i in layers]
            return np.stack(parts) if parts else np.zeros((0,), dtype)
        return self._read_one(ckpt, self.key, index, dtype)

    def _read_one(self, ckpt: TensorReader, key: str, index: tuple[slice, ...], dtype) -> np.ndarray:
        ndim = len(ckpt.shape(key))
        perm = self.perm or tuple(range(ndim))
        source_index = [slice(None)] * ndim
        for model_axis, ckpt_axis in enumerate(perm):
            if model_axis < len(index):
                source_index[ckpt_axis] = index[model_axis]
        if self.rows is None:
            part = ckpt.read(key, tuple(source_index))
        else:
            # Selected rows: read the span they cover in this block, then pick them.
            rows = np.asarray(self.rows)[source_index[0]]
            lo, hi = int(rows.min()), int(rows.max()) + 1
            part = ckpt.read(key, (slice(lo, hi), *source_index[1:]))[rows - lo]
        return np.asarray(part.transpose(perm), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# DINOv2: HF `Dinov2Model` / `Dinov2WithRegistersModel`.

# Checkpoint tensors the model has no use for: the masked-image-modelling token of pre-training.
DINOV2_IGNORED = ("embeddings.mask_token",)


def dinov2_sources(config: Dinov2Config) -> dict[str, Source]:
    """`{nnx parameter path: Source}` for a HF `Dinov2Model` / `Dinov2WithRegistersModel` safetensors checkpoint."""
    n = config.num_hidden_layers
    layer = "encoder.layer.{layer}."

    def stacked(key: str, perm=None, rows=None) -> Source:
        return Source(layer + key, perm=perm, num_layers=n, rows=rows)

    sources = {
        "patch_embeddings.kernel": Source("embeddings.patch_embeddings.projection.weight", perm=(2, 3, 1, 0)),
        "patch_embeddings.bias": Source("embeddings.patch_embeddings.projection.bias"),
        "cls_token": Source("embeddings.cls_token"),
        "position_embeddings": Source("embeddings.position_embeddings"),
        "layernorm.scale": Source("layernorm.weight"),
        "layernorm.bias": Source("layernorm.bias"),
        "layers.layer_scale1": stacked("layer_scale1.lambda1"),
        "layers.layer_scale2": stacked("layer_scale2.lambda1"),
    }
    if config.num_register_tokens:
        sources["register_tokens"] = Source("embeddings.register_tokens")
    for norm in ("norm1", "norm2"):
        sources[f"layers.{norm}.scale"] = stacked(f"{norm}.weight")
        sources[f"layers.{norm}.bias"] = stacked(f"{norm}.bias")
    linears = {
        "attention.q_proj": "attention.attention.query",
        "attention.k_proj": "attention.attention.key",
        "attention.v_proj": "attention.attention.value",
        "attention.o_proj": "attention.output.dense",
    }
    if config.use_swiglu_ffn:
        linears["mlp.down_proj"] = "mlp.weights_out"
        # `weights_in` is gate and up fused along the output axis: [2F, D].
        f = config.mlp_dim
        for name, rows in (("gate_proj", tuple(range(f))), ("up_proj", tuple(range(f, 2 * f)))):
            sources[f"layers.mlp.{name}.kernel"] = stacked("mlp.weights_in.weight", perm=(1, 0), rows=rows)
            sources[f"layers.mlp.{name}.bias"] = stacked("mlp.weights_in.bias", rows=rows)
    else:
        linears.update({"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"})
    for ours, theirs in linears.items():
        sources[f"layers.{ours}.kernel"] = stacked(f"{theirs}.weight", perm=(1, 0))
        if ours not in ("attention.q_proj", "attention.k_proj", "attention.v_proj") or config.qkv_bias:
            sources[f"layers.{ours}.bias"] = stacked(f"{theirs}.bias")
    return sources


# ---------------------------------------------------------------------------------------------------------
# CLIP / SigLIP: HF `CLIPVisionModel`, `CLIPModel`, `SiglipVisionModel`, `SiglipModel`.

# Where the vision tower's tensors start: joint image-text checkpoints (and vision-only ones written by transformers
# before v5) put them under `vision_model.`; vision-only ones written by transformers v5 at the top.
CLIP_VISION_PREFIXES = ("vision_model.", "")


def clip_vision_prefix(keys) -> str:
    """The prefix of the vision tower's tensors among a checkpoint's `keys` ("" when it has none of them)."""
    keys = set(keys)
    for prefix in CLIP_VISION_PREFIXES:
        if prefix + "embeddings.patch_embedding.weight" in keys:
            return prefix
    return ""


def clip_vision_ignored(prefix: str):
    """Checkpoint tensors a CLIP / SigLIP vision tower leaves unused: everything outside `prefix` (the text tower,
    projections, logit scale and bias of a joint model) and the `position_ids` buffer older checkpoints carry."""
    return lambda key: not key.startswith(prefix) or key.endswith("embeddings.position_ids")


def clip_vision_sources(config: ClipVisionConfig, prefix: str = "vision_model.") -> dict[str, Source]:
    """`{nnx parameter path: Source}` for a CLIP / SigLIP vision tower whose tensors start with `prefix`."""
    n, d = config.num_hidden_layers, config.hidden_size
    embeddings = prefix + "embeddings."
    sources = {
        "patch_embeddings.kernel": Source(embeddings + "patch_embedding.weight", perm=(2, 3, 1, 0)),
        "position_embeddings": Source(embeddings + "position_embedding.weight"),
        "post_layernorm.scale": Source(prefix + "post_layernorm.weight"),
        "post_layernorm.bias": Source(prefix + "post_layernorm.bias"),
    }
    if config.patch_bias:
        sources["patch_embeddings.bias"] = Source(embeddings + "patch_embedding.bias")
    if config.class_token:
        sources["class_embedding"] = Source(embeddings + "class_embedding")
    if config.pre_layernorm:
        sources["pre_layernorm.scale"] = Source(prefix + "pre_layrnorm.weight")  # sic: HF's name
        sources["pre_layernorm.bias"] = Source(prefix + "pre_layrnorm.bias")
    layer = prefix + "encoder.layers.{layer}."
    per_layer = {
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
        "attention.q_proj": "self_attn.q_proj",
        "attention.k_proj": "self_attn.k_proj",
        "attention.v_proj": "self_attn.v_proj",
        "attention.o_proj": "self_attn.out_proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for ours, theirs in per_layer.items():
        norm = ours.startswith("norm")
        sources[f"layers.{ours}.{'scale' if norm else 'kernel'}"] = Source(
            f"{layer}{theirs}.weight", perm=None if norm else (1, 0), num_layers=n
        )
        sources[f"layers.{ours}.bias"] = Source(f"{layer}{theirs}.bias", num_layers=n)
    if config.pooling == "map":
        head = prefix + "head."
        sources["head.probe"] = Source(head + "probe")
        # torch's MultiheadAttention holds q, k and v fused along the output axis: `in_proj_weight [3D, D]`.
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = tuple(range(i * d, (i + 1) * d))
            sources[f"head.attention.{name}.kernel"] = Source(head + "attention.in_proj_weight", (1, 0), rows=rows)
            sources[f"head.attention.{name}.bias"] = Source(head + "attention.in_proj_bias", rows=rows)
        linears = {"attention.o_proj": "attention.out_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        for ours, theirs in linears.items():
            sources[f"head.{ours}.kernel"] = Source(f"{head}{theirs}.weight", perm=(1, 0))
            sources[f"head.{ours}.bias"] = Source(f"{head}{theirs}.bias")
        sources["head.layernorm.scale"] = Source(head + "layernorm.weight")
        sources["head.layernorm.bias"] = Source(head + "layernorm.bias")
    return sources


# ---------------------------------------------------------------------------------------------------------
# Llama: HF `LlamaForCausalLM`.

LLAMA_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer some older checkpoints carry


def llama_lm_head_key(config: LlamaConfig) -> str:
    """The tensor holding the output embedding (the input embedding when they are tied)."""
    return "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"


def llama_sources(config: LlamaConfig, with_lm_head: bool = True) -> dict[str, Source]:
    """Checkpoint source of every non-LoRA parameter, by NNX path (`LlamaForCausalLM` tensor names)."""
    n = config.num_hidden_layers
    per_layer = lambda key, perm=None: Source(f"model.layers.{{layer}}.{key}", perm, n)
    sources = {
        "embed_tokens": Source("model.embed_tokens.weight"),
        "norm.scale": Source("model.norm.weight"),
        "layers.input_layernorm.scale": per_layer("input_layernorm.weight"),
        "layers.post_attention_layernorm.scale": per_layer("post_attention_layernorm.weight"),
    }
    if with_lm_head:
        sources["lm_head"] = Source(llama_lm_head_key(config))
    linears = [("self_attn", p, config.attention_bias) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    linears += [("mlp", p, config.mlp_bias) for p in ("gate_proj", "up_proj", "down_proj")]
    for block, proj, bias in linears:
        sources[f"layers.{block}.{proj}.kernel"] = per_layer(f"{block}.{proj}.weight", (1, 0))
        if bias:
            sources[f"layers.{block}.{proj}.bias"] = per_layer(f"{block}.{proj}.bias")
    return sources
