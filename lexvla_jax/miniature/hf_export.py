"""NNX towers → Hugging Face checkpoint directories: the inverse of loading.

`save_hf_llama` writes `config.json` (transformers' `LlamaConfig` fields) and `model.safetensors` with the
`LlamaForCausalLM` tensor names, so `transformers.LlamaForCausalLM.from_pretrained(dir)` and
`hf_loader.load_hf_llama(dir)` both load it; `save_hf_dinov2` does the same for a `Dinov2Model`
(or `Dinov2WithRegistersModel`). Each tensor is the model parameter run backwards through its
`hf_layout.Source` (the same `{nnx path: Source}` mapping loading uses): per layer, axes permuted back.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from lexvla_jax import hf_layout
from lexvla_jax.models import dinov2 as dinov2_lib
from lexvla_jax.models import llama as llama_lib


def to_checkpoint_tensors(model: nnx.Module, sources: Mapping[str, hf_layout.Source]) -> dict[str, np.ndarray]:
    """`{checkpoint tensor name: array in checkpoint layout}` for every parameter in `sources`.

    LoRA parameters have no checkpoint tensor: merge or drop them first. Two parameters mapped to one tensor
    (tied embeddings) must hold equal values; it is written once. Parameters that are row subsets of one tensor
    (SwiGLU's fused gate and up projections) are written into it, and together must cover every row exactly once.
    """
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    lora = [".".join(map(str, p)) for p, v in params.items() if isinstance(v, nnx.LoRAParam)]
    if lora:
        raise ValueError(f"model has LoRA parameters ({lora[0]}, ...); a plain checkpoint cannot hold them")
    tensors: dict[str, np.ndarray] = {}
    row_parts: dict[str, list[tuple[tuple[int, ...], np.ndarray]]] = {}
    for path, variable in params.items():
        name = ".".join(map(str, path))
        if name not in sources:
            raise ValueError(f"parameter {name} has no checkpoint source; the layout mapping is incomplete")
        source = sources[name]
        value = np.asarray(jax.device_get(variable.get_value()))
        parts = value if source.num_layers is not None else value[None]
        inverse = None if source.perm is None else tuple(np.argsort(source.perm))
        for key, part in zip(source.keys(), parts, strict=True):
            part = np.ascontiguousarray(part if inverse is None else part.transpose(inverse))
            if source.rows is not None:
                row_parts.setdefault(key, []).append((source.rows, part))
                continue
            if key in tensors and not np.array_equal(tensors[key], part):
                raise ValueError(f"parameters mapped to {key} differ; tied weights must be equal")
            tensors[key] = part
    for key, parts in row_parts.items():
        rows = np.concatenate([np.asarray(r) for r, _ in parts])
        if sorted(rows.tolist()) != list(range(len(rows))):
            raise ValueError(f"the parameters mapped to rows of {key} do not cover each of its rows exactly once")
        whole = np.empty((len(rows), *parts[0][1].shape[1:]), parts[0][1].dtype)
        for r, part in parts:
            whole[np.asarray(r)] = part
        tensors[key] = whole
    return tensors


def hf_llama_config(config: llama_lib.LlamaConfig, bos_id: int = 1, eos_id: int = 2) -> dict:
    """transformers' `config.json` of a `LlamaForCausalLM` with `config`'s architecture."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": config.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": config.mlp_bias,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "dtype": str(np.dtype(config.param_dtype)),
    }


def save_hf_llama(
    model: llama_lib.LlamaModel, out_dir: str, *, tokenizer_path: str | None = None, bos_id: int = 1, eos_id: int = 2
) -> str:
    """Writes `model` (with its lm_head) as a Hugging Face Llama directory (`write_hf_dir`); copies
    `tokenizer_path` in as well."""
    if model.lm_head is None and not model.config.tie_word_embeddings:
        raise ValueError("model was built with_lm_head=False; a LlamaForCausalLM checkpoint needs its lm_head")
    sources = hf_layout.llama_sources(model.config, with_lm_head=model.lm_head is not None)
    extra = [tokenizer_path] if tokenizer_path else []
    tensors = to_checkpoint_tensors(model, sources)
    return write_hf_dir(out_dir, tensors, hf_llama_config(model.config, bos_id, eos_id), extra)


def hf_dinov2_config(config: dinov2_lib.Dinov2Config) -> dict:
    """transformers' `config.json` of a `Dinov2Model` (`Dinov2WithRegistersModel` with registers) with `config`'s
    architecture. `drop_path_rate` is 0: the directory holds a tower to freeze or fine-tune, not its training
    regularisation. `image_norm` (ours; transformers ignores it) names the pixel normalisation it was trained with."""
    registers = config.num_register_tokens > 0
    if config.pos_embed_antialias != registers:
        raise ValueError(
            "pos_embed_antialias must be True exactly when the tower has registers: transformers resamples "
            "Dinov2WithRegistersModel's position embeddings antialiased and Dinov2Model's without"
        )
    if not float(config.mlp_ratio).is_integer():
        raise ValueError(f"mlp_ratio {config.mlp_ratio} is not a whole number; transformers' DINOv2 config needs one")
    hf = {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "mlp_ratio": int(config.mlp_ratio),
        "patch_size": config.patch_size,
        "image_size": config.image_size,
        "num_channels": config.num_channels,
        "use_swiglu_ffn": config.use_swiglu_ffn,
        "layerscale_value": config.layerscale_value,
        "layer_norm_eps": config.layer_norm_eps,
        "hidden_act": config.hidden_act,
        "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "qkv_bias": config.qkv_bias,
        "initializer_range": config.initializer_range,
        "image_norm": config.image_norm,
        "dtype": str(np.dtype(config.param_dtype)),
    }
    if registers:
        hf["num_register_tokens"] = config.num_register_tokens
    return hf


def save_hf_dinov2(model: dinov2_lib.Dinov2Model, out_dir: str, *, mask_token: np.ndarray | None = None) -> str:
    """Writes `model` as a Hugging Face DINOv2 directory. `mask_token` `[D]` (the masked-image-modelling token of
    pre-training, which our tower does not hold) is written as `embeddings.mask_token`; zeros when None."""
    tensors = to_checkpoint_tensors(model, hf_layout.dinov2_sources(model.config))
    d = model.config.hidden_size
    token = np.zeros((d,), np.float32) if mask_token is None else np.asarray(mask_token, np.float32)
    tensors[hf_layout.DINOV2_IGNORED[0]] = token.reshape(1, d).astype(tensors["embeddings.cls_token"].dtype)
    return write_hf_dir(out_dir, tensors, hf_dinov2_config(model.config))


def write_hf_dir(out_dir: str, tensors: Mapping[str, np.ndarray], hf_config: Mapping, extra_files=()) -> str:
    """`out_dir` with `model.safetensors`, `config.json` and copies of `extra_files`. The directory appears complete
    or not at all: it is written beside `out_dir` and renamed into place."""
    out_dir = os.path.abspath(out_dir)
    partial = out_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    save_file(dict(tensors), os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(partial, "config.json"), "w") as f:
        json.dump(dict(hf_config), f, indent=2)
    for path in extra_files:
        shutil.copy(path, os.path.join(partial, os.path.basename(path)))
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(partial, out_dir)
    return out_dir
