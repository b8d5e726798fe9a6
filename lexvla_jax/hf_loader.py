"""Hugging Face safetensors checkpoints → sharded NNX models, streamed.

A checkpoint directory holds `config.json` and either `model.safetensors` or sharded
`model-0000i-of-0000n.safetensors` files with `model.safetensors.index.json`. Tensors are opened with
`safetensors.safe_open` and each device's shard is read on its own (`get_slice` inside
`jax.make_array_from_callback`), so no process ever holds a full copy of the model: a host reads only the
slices its devices own.

`load_model` is the one way a model comes into existence: every variable is created directly in its
sharded layout, read from a checkpoint when a `CheckpointPart` names its `Source` (`hf_layout.py`), and
initialised under `jit` otherwise. Each part must cover every parameter under its prefix (LoRA excepted)
and use every tensor of its checkpoint, so a naming mistake is an error, not a silently random weight.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, which safetensors' numpy reader needs)
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open

from lexvla_jax import hf_layout, sharding
from lexvla_jax.configlib import ConfigError
from lexvla_jax.hf_layout import Source
from lexvla_jax.models import clip, dinov2, llama, vision

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class CheckpointError(ConfigError):
    """A checkpoint directory that cannot be loaded; the message is one line with the fix."""


class HFCheckpoint:
    """Lazy view of a local Hugging Face safetensors checkpoint directory (`hf_layout.TensorReader`)."""

    def __init__(self, path: str | os.PathLike, field: str = ""):
        self.path = os.fspath(path)
        where = f" (set {field})" if field else ""
        if not os.path.isdir(self.path):
            raise CheckpointError(f"checkpoint directory {self.path!r} does not exist{where}")
        config_path = os.path.join(self.path, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{self.path!r} has no config.json; pass a Hugging Face model directory{where}")
        with open(config_path) as f:
            self.config = json.load(f)
        files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        index_path = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                listed = sorted(set(json.load(f).get("weight_map", {}).values()))
            missing = [name for name in listed if name not in files]
            if missing:
                raise CheckpointError(
                    f"shard {os.path.join(self.path, missing[0])!r} is missing ({len(missing)} of {len(listed)} "
                    f"shards in model.safetensors.index.json); download it again{where}"
                )
        if not files:
            pickles = [f for f in os.listdir(self.path) if f.endswith(_PICKLE_SUFFIXES)]
            if pickles:
                raise CheckpointError(
                    f"{self.path!r} holds only pickle weights ({pickles[0]}); pickles are never loaded — convert "
                    "them once with `model.save_pretrained(dir, safe_serialization=True)` in transformers"
                )
            raise CheckpointError(f"{self.path!r} holds no *.safetensors files{where}")
        self._files = {name: safe_open(os.path.join(self.path, name), framework="numpy") for name in files}
        self._file_of = {key: name for name, f in self._files.items() for key in f.keys()}

    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def _slice(self, key: str):
        if key not in self._file_of:
            raise CheckpointError(f"tensor {key!r} missing from checkpoint {self.path!r}")
        return self._files[self._file_of[key]].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """The block `index` of a tensor; only that block is read from disk."""
        return np.asarray(self._slice(key)[tuple(index)])


def read_sharded(ckpt: HFCheckpoint, source: Source, target: jax.sharding.Sharding, dtype) -> jax.Array:
    """One parameter as a global array: each addressable device's shard is read on its own."""
    shape = source.model_shape(ckpt)
    return jax.make_array_from_callback(shape, target, lambda index: source.read(ckpt, index, dtype))


@dataclasses.dataclass(frozen=True)
class CheckpointPart:
    """Parameters of a model read from one checkpoint.

    sources: `{"dotted.nnx.path": Source}` (full paths in the model being built).
    prefix: the sub-module the checkpoint fills; every `nnx.Param` under it (LoRA excepted) needs a source.
    ignore: predicate for checkpoint tensors deliberately unused (buffers, a skipped head).
    """

    ckpt: HFCheckpoint
    sources: Mapping[str, Source]
    prefix: str = ""
    ignore: Callable[[str], bool] = lambda key: False


def _path_str(path: Sequence) -> str:
    return ".".join(str(p) for p in path)


def _under(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + ".")


def _check_part(part: CheckpointPart, flat_abstract: Mapping[tuple, Any]) -> None:
    by_name = {_path_str(p): v for p, v in flat_abstract.items()}
    unknown = [name for name in part.sources if name not in by_name]
    if unknown:
        raise CheckpointError(f"sources name parameter(s) the model does not have: {unknown[:3]}")
    missing = [
        name
        for name, v in by_name.items()
        if _under(name, part.prefix)
        and isinstance(v, nnx.Param)
        and not isinstance(v, nnx.LoRAParam)
        and name not in part.sources
    ]
    if missing:
        raise CheckpointError(f"no checkpoint source for model parameter(s) {missing[:3]}")
    used = {k for s in part.sources.values() for k in s.keys()}
    absent = sorted(k for k in used if k not in part.ckpt)
    if absent:
        raise CheckpointError(
            f"checkpoint {part.ckpt.path!r} lacks tensor(s) {absent[:3]}; is it the right model type?"
        )
    unused = [k for k in part.ckpt.keys() if k not in used and not part.ignore(k)]
    if unused:
        raise CheckpointError(f"checkpoint tensor(s) {unused[:3]} have no place in the model; wrong config?")


def load_model(
    make_model: Callable[[], nnx.Module],
    parts: Sequence[CheckpointPart] = (),
    *,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    dtype_of: Callable[[tuple, nnx.Variable], Any] | None = None,
    leave_abstract: Callable[[tuple, nnx.Variable], bool] | None = None,
) -> nnx.Module:
    """`make_model()` with every variable created directly in its sharded layout.

    Parameters named by a part's sources are read from its checkpoint (each device its own block);
    everything else (random initialisation, LoRA, RNG state) is computed under `jit` with the target
    shardings, so XLA drops the initialisers of what is loaded. `dtype_of(path, abstract_variable)`
    may return a storage dtype for a parameter (None: the model's own); with no parts this is the
    random-initialisation path. Variables for which `leave_abstract(path, variable)` holds are neither read
    nor initialised: they stay `ShapeDtypeStruct`s with their dtype and sharding (what a resumed run restores
    from its own checkpoint).
    """
    mesh = mesh or single_device_mesh()
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))
    shardings = dict(nnx.to_flat_state(sharding.state_shardings(abstract_state, mesh, rules)))
    flat_abstract = dict(nnx.to_flat_state(abstract_state))
    for part in parts:
        _check_part(part, flat_abstract)

    def storage_dtype(path, variable):
        value = variable.get_value()
        wanted = dtype_of(path, variable) if dtype_of is not None else None
        if wanted is None or not jnp.issubdtype(value.dtype, jnp.floating):
            return value.dtype
        return jnp.dtype(wanted)

    sources = {name: (part.ckpt, s) for part in parts for name, s in part.sources.items()}
    skipped = {p for p, v in flat_abstract.items() if leave_abstract is not None and leave_abstract(p, v)}
    made = [p for p in flat_abstract if p not in skipped]
    loaded = [p for p in made if _path_str(p) in sources]
    fresh = [p for p in made if _path_str(p) not in sources]

    def init_fresh():
        flat = dict(nnx.to_flat_state(nnx.state(make_model())))
        out = {}
        for p in fresh:
            value = flat[p].get_value()
            out[p] = flat[p].replace(value.astype(storage_dtype(p, flat_abstract[p])))
        return out

    values = jax.jit(init_fresh, out_shardings={p: shardings[p] for p in fresh})() if fresh else {}
    for path in skipped:
        variable = flat_abstract[path]
        value = variable.get_value()
        target = shardings[path].get_value()
        values[path] = variable.replace(
            jax.ShapeDtypeStruct(value.shape, storage_dtype(path, variable), sharding=target)
        )
    for path in loaded:
        variable = flat_abstract[path]
        ckpt, source = sources[_path_str(path)]
        found, expected = source.model_shape(ckpt), tuple(variable.get_value().shape)
        if found != expected:
            raise CheckpointError(f"{_path_str(path)}: checkpoint gives shape {found}, model expects {expected}")
        target = shardings[path].get_value()
        values[path] = variable.replace(read_sharded(ckpt, source, target, storage_dtype(path, variable)))
    return nnx.merge(graphdef, nnx.from_flat_state([(p, values[p]) for p in flat_abstract]))


def single_device_mesh() -> Mesh:
    """A `('data','fsdp','tensor')` mesh of one device, for loading without a mesh."""
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)


def prefixed(prefix: str, sources: Mapping[str, Source]) -> dict[str, Source]:
    """`sources` of a sub-module, with paths as seen from its parent."""
    return {f"{prefix}.{name}": s for name, s in sources.items()}


def llama_config(ckpt: HFCheckpoint, **runtime) -> llama.LlamaConfig:
    """The `LlamaConfig` of a `LlamaForCausalLM` checkpoint (one-line error for other model types)."""
    if ckpt.config.get("model_type") != "llama":
        raise CheckpointError(
            f"{ckpt.path!r} holds a {ckpt.config.get('model_type')!r} model, not 'llama'; pass a Llama checkpoint"
        )
    return llama.LlamaConfig.from_hf(ckpt.config, **runtime)


def vision_config(ckpt: HFCheckpoint, **runtime) -> vision.VisionConfig:
    """The config of whichever vision tower (`vision.TOWERS`) a checkpoint holds."""
    try:
        return vision.config_from_hf(ckpt.config, **runtime)
    except ValueError as e:
        raise CheckpointError(f"{ckpt.path!r}: {e}") from None


def llama_part(ckpt: HFCheckpoint, config: llama.LlamaConfig, prefix: str = "", with_lm_head: bool = True):
    """The `CheckpointPart` of a Llama tower (at `prefix` in the model being built)."""
    head_key = hf_layout.llama_lm_head_key(config)
    skip_head = not with_lm_head and not config.tie_word_embeddings
    sources = hf_layout.llama_sources(config, with_lm_head=with_lm_head)
    return CheckpointPart(
        ckpt,
        prefixed(prefix, sources) if prefix else sources,
        prefix,
        lambda key: key.endswith(hf_layout.LLAMA_IGNORED_SUFFIXES) or (skip_head and key == head_key),
    )


def dinov2_part(ckpt: HFCheckpoint, config: dinov2.Dinov2Config, prefix: str = ""):
    """The `CheckpointPart` of a DINOv2 tower (at `prefix` in the model being built)."""
    sources = hf_layout.dinov2_sources(config)
    return CheckpointPart(
        ckpt, prefixed(prefix, sources) if prefix else sources, prefix, lambda key: key in hf_layout.DINOV2_IGNORED
    )


def clip_vision_part(ckpt: HFCheckpoint, config: clip.ClipVisionConfig, prefix: str = ""):
    """The `CheckpointPart` of a CLIP / SigLIP vision tower (at `prefix` in the model being built), from a vision-only
    or a joint image-text checkpoint: the other tower's tensors are ignored by name."""
    where = hf_layout.clip_vision_prefix(ckpt.keys())
    sources = hf_layout.clip_vision_sources(config, where)
    return CheckpointPart(
        ckpt, prefixed(prefix, sources) if prefix else sources, prefix, hf_layout.clip_vision_ignored(where)
    )


def vision_part(ckpt: HFCheckpoint, config: vision.VisionConfig, prefix: str = ""):
    """The `CheckpointPart` of the vision tower `config` describes."""
    if isinstance(config, dinov2.Dinov2Config):
        return dinov2_part(ckpt, config, prefix)
    return clip_vision_part(ckpt, config, prefix)


def load_hf_llama(
    path: str | os.PathLike,
    dtype=jnp.float32,
    *,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    with_lm_head: bool = True,
    compute_dtype=None,
    seed: int = 0,
    **runtime,
) -> llama.LlamaModel:
    """A `LlamaModel` from a local `LlamaForCausalLM` checkpoint, streamed into its sharded layout.

    dtype: storage dtype of the parameters; compute_dtype: matmul dtype (default `dtype`). `runtime`
    sets the other `LlamaConfig` runtime fields (remat, lora_*). LoRA weights (float32) are initialised
    from `seed` (`B = 0`, so outputs equal the checkpoint's). Without an lm_head, `lm_head.weight` is skipped.
    """
    ckpt = HFCheckpoint(path)
    config = llama_config(ckpt, dtype=compute_dtype or dtype, param_dtype=dtype, **runtime)
    return load_model(
        lambda: llama.LlamaModel(config, with_lm_head=with_lm_head, rngs=nnx.Rngs(seed)),
        [llama_part(ckpt, config, with_lm_head=with_lm_head)],
        mesh=mesh,
        rules=rules,
    )


_TOWER_NAMES = {"dinov2": "DINOv2", "clip": "CLIP", "siglip": "SigLIP"}


def load_hf_vision(
    path: str | os.PathLike,
    dtype=jnp.float32,
    *,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    compute_dtype=None,
    remat: str = "none",
    seed: int = 0,
    towers: tuple[str, ...] = vision.TOWERS,
) -> dinov2.Dinov2Model | clip.ClipVisionModel:
    """The vision tower of a local checkpoint (any of `towers`), streamed into its sharded layout.

    dtype: storage dtype of the parameters; compute_dtype: matmul dtype (default `dtype`); remat: a policy in
    `layers.REMAT_POLICIES`; seed: the drop-path random stream (used only when `deterministic=False`).
    """
    ckpt = HFCheckpoint(path)
    runtime = dict(dtype=compute_dtype or dtype, param_dtype=dtype, remat=remat)
    model_type = ckpt.config.get("model_type")
    if vision.tower_of_model_type(model_type) not in towers:
        names = " or ".join(_TOWER_NAMES[t] for t in towers)
        message = f"config model_type {model_type!r} is not {names}; pass a {names} checkpoint"
        raise CheckpointError(f"{ckpt.path!r}: {message}")
    config = vision_config(ckpt, **runtime)
    return load_model(
        lambda: vision.make_tower(config, rngs=nnx.Rngs(seed)), [vision_part(ckpt, config)], mesh=mesh, rules=rules
    )


def load_hf_dinov2(path: str | os.PathLike, dtype=jnp.float32, **kwargs) -> dinov2.Dinov2Model:
    """A `Dinov2Model` from a local `Dinov2Model` / `Dinov2WithRegistersModel` checkpoint (`load_hf_vision`'s
    arguments)."""
    return load_hf_vision(path, dtype, towers=("dinov2",), **kwargs)


def load_hf_clip_vision(path: str | os.PathLike, dtype=jnp.float32, **kwargs) -> clip.ClipVisionModel:
    """A `ClipVisionModel` from a local `CLIPVisionModel` / `CLIPModel` (or `SiglipVisionModel` / `SiglipModel`)
    checkpoint (`load_hf_vision`'s arguments); its call on NHWC images returns `last_hidden_state` and
    `pooler_output`."""
    return load_hf_vision(path, dtype, towers=("clip", "siglip"), **kwargs)
