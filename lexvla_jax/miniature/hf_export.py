"""NNX Llama → Hugging Face checkpoint directory: the inverse of loading.

`save_hf_llama` writes `config.json` (transformers' `LlamaConfig` fields) and `model.safetensors` with the
`LlamaForCausalLM` tensor names, so `transformers.LlamaForCausalLM.from_pretrained(dir)` and
`hf_loader.load_hf_llama(dir)` both load it. Each tensor is the model parameter run backwards through its
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
from lexvla_jax.models import llama as llama_lib


def to_checkpoint_tensors(model: nnx.Module, sources: Mapping[str, hf_layout.Source]) -> dict[str, np.ndarray]:
    """`{checkpoint tensor name: array in checkpoint layout}` for every parameter in `sources`.

    LoRA parameters have no checkpoint tensor: merge or drop them first. Two parameters mapped to one tensor
    (tied embeddings) must hold equal values; it is written once.
    """
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    lora = [".".join(map(str, p)) for p, v in params.items() if isinstance(v, nnx.LoRAParam)]
    if lora:
        raise ValueError(f"model has LoRA parameters ({lora[0]}, ...); a plain checkpoint cannot hold them")
    tensors: dict[str, np.ndarray] = {}
    for path, variable in params.items():
        name = ".".join(map(str, path))
        if name not in sources:
            raise ValueError(f"parameter {name} has no checkpoint source; the layout mapping is incomplete")
        source = sources[name]
        if source.rows is not None:
            raise ValueError(f"parameter {name} is a row subset of {source.key}; it cannot be written back whole")
        value = np.asarray(jax.device_get(variable.get_value()))
        parts = value if source.num_layers is not None else value[None]
        inverse = None if source.perm is None else tuple(np.argsort(source.perm))
        for key, part in zip(source.keys(), parts, strict=True):
            part = np.ascontiguousarray(part if inverse is None else part.transpose(inverse))
            if key in tensors and not np.array_equal(tensors[key], part):
                raise ValueError(f"parameters mapped to {key} differ; tied weights must be equal")
            tensors[key] = part
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
    """Writes `model` (with its lm_head) as a Hugging Face Llama directory; copies `tokenizer_path` in as well.

    The directory appears complete or not at all: it is written beside `out_dir` and renamed into place.
    """
    if model.lm_head is None and not model.config.tie_word_embeddings:
        raise ValueError("model was built with_lm_head=False; a LlamaForCausalLM checkpoint needs its lm_head")
    sources = hf_layout.llama_sources(model.config, with_lm_head=model.lm_head is not None)
    tensors = to_checkpoint_tensors(model, sources)
    out_dir = os.path.abspath(out_dir)
    partial = out_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    save_file(tensors, os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(partial, "config.json"), "w") as f:
        json.dump(hf_llama_config(model.config, bos_id, eos_id), f, indent=2)
    if tokenizer_path:
        shutil.copy(tokenizer_path, os.path.join(partial, os.path.basename(tokenizer_path)))
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(partial, out_dir)
    return out_dir
