"""Hugging Face safetensors checkpoints → sharded NNX models, streamed.

A checkpoint directory holds `config.json` and either `model.safetensors` or sharded
`model-0000i-of-0000n.safetensors` files with `model.safetensors.index.json`. Tensors are memory-mapped
and each device's shard is read on its own (`jax.make_array_from_callback`), so no process ever holds a
full copy of the model: a host reads only the slices its devices own.

Each model module describes its checkpoint layout as a mapping `{nnx path: Source}`; `load_model`
checks that the mapping covers every checkpoint tensor and every model parameter (parameters of the
types in `fresh` — e.g. LoRA — are initialised instead), so a naming mistake is an error, not a silently
random weight.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lexvla_jax import sharding

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message is one line with the fix."""


def _read_safetensors_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return header, 8 + length


class HFCheckpoint:
    """Lazy, memory-mapped view of a local Hugging Face safetensors checkpoint directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"checkpoint directory {self.path!r} does not exist")
        config_path = os.path.join(self.path, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{self.path!r} has no config.json; pass a Hugging Face model directory")
        with open(config_path) as f:
            self.config = json.load(f)
        files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not files:
            pickles = [f for f in os.listdir(self.path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            if pickles:
                raise CheckpointError(
                    f"{self.path!r} holds only pickle weights ({pickles[0]}); pickles are never loaded — convert "
                    "them once with `model.save_pretrained(dir, safe_serialization=True)` in transformers"
                )
            raise CheckpointError(f"{self.path!r} holds no *.safetensors files")
        self._tensors: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            file_path = os.path.join(self.path, name)
            header, offset = _read_safetensors_header(file_path)
            for key, info in header.items():
                if key != "__metadata__":
                    self._tensors[key] = (file_path, info, offset)
        self._maps: dict[str, np.memmap] = {}

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key][1]["shape"])

    def array(self, key: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped NumPy array (nothing is read until sliced)."""
        if key not in self._tensors:
            raise CheckpointError(f"tensor {key!r} missing from checkpoint {self.path!r}")
        file_path, info, offset = self._tensors[key]
        if file_path not in self._maps:
            self._maps[file_path] = np.memmap(file_path, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        raw = self._maps[file_path][offset + start : offset + end]
        return raw.view(dtype).reshape(info["shape"])


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

    def model_shape(self, ckpt: HFCheckpoint) -> tuple[int, ...]:
        """The parameter's shape in model layout."""
        shape = list(ckpt.shape(self.keys()[0]))
        if self.rows is not None:
            shape[0] = len(self.rows)
        shape = [shape[a] for a in (self.perm or range(len(shape)))]
        return tuple([self.num_layers, *shape] if self.num_layers is not None else shape)

    def read(self, ckpt: HFCheckpoint, index: tuple[slice, ...], dtype) -> np.ndarray:
        """Reads the part `index` of the model-layout parameter."""
        index = tuple(index)
        if self.num_layers is not None:
            layers = range(self.num_layers)[index[0]]
            parts = [self._read_one(ckpt, self.key.format(layer=i), index[1:], dtype) for i in layers]
            return np.stack(parts) if parts else np.zeros((0,), dtype)
        return self._read_one(ckpt, self.key, index, dtype)

    def _read_one(self, ckpt: HFCheckpoint, key: str, index: tuple[slice, ...], dtype) -> np.ndarray:
        tensor = ckpt.array(key)
        perm = self.perm or tuple(range(tensor.ndim))
        source_index = [slice(None)] * tensor.ndim
        for model_axis, ckpt_axis in enumerate(perm):
            if model_axis < len(index):
                source_index[ckpt_axis] = index[model_axis]
        if self.rows is not None:
            rows = np.asarray(self.rows)[source_index[0]]
            part = tensor[(rows, *source_index[1:])]
        else:
            part = tensor[tuple(source_index)]
        return np.asarray(part.transpose(perm), dtype=dtype)


def read_sharded(ckpt: HFCheckpoint, source: Source, target: jax.sharding.Sharding, dtype) -> jax.Array:
    """One parameter as a global array: each addressable device's shard is read on its own."""
    shape = source.model_shape(ckpt)
    return jax.make_array_from_callback(shape, target, lambda index: source.read(ckpt, index, dtype))


def load_tensor(ckpt: HFCheckpoint, source: Source, mesh: Mesh, names, rules=sharding.DEFAULT_RULES, dtype=None):
    """One checkpoint tensor (model layout) placed on `mesh` by logical axis `names`."""
    shape = source.model_shape(ckpt)
    dtype = dtype or ckpt.array(source.keys()[0]).dtype
    return read_sharded(ckpt, source, sharding.named_sharding(mesh, names, rules, shape), dtype)


def single_device_mesh() -> Mesh:
    """A `('data','fsdp','tensor')` mesh of one device, for loading without a mesh."""
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)


def _path_str(path: Sequence) -> str:
    return ".".join(str(p) for p in path)


def load_model(
    make_model: Callable[[], nnx.Module],
    ckpt: HFCheckpoint,
    sources: Mapping[str, Source],
    *,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    dtype=jnp.float32,
    fresh: Sequence[type] = (),
    ignore: Callable[[str], bool] = lambda key: False,
) -> nnx.Module:
    """Builds `make_model()` with its parameters read from `ckpt` straight into their shardings.

    sources: `{"dotted.nnx.path": Source}` for every parameter not of a `fresh` type. Parameters of the
    `fresh` types (e.g. LoRA) keep their initialisation, computed directly in their sharded layout.
    ignore: predicate for checkpoint tensors deliberately unused (e.g. buffers).
    """
    mesh = mesh or single_device_mesh()
    abstract = nnx.eval_shape(make_model)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = sharding.state_shardings(abstract_state, mesh, rules)
    flat_abstract = dict(nnx.to_flat_state(abstract_state))
    flat_shardings = dict(nnx.to_flat_state(shardings))

    fresh_paths = [p for p, v in flat_abstract.items() if isinstance(v, tuple(fresh)) or not isinstance(v, nnx.Param)]
    loaded_paths = [p for p in flat_abstract if p not in fresh_paths]
    missing = [_path_str(p) for p in loaded_paths if _path_str(p) not in sources]
    if missing:
        raise CheckpointError(f"no checkpoint source for model parameter(s) {missing[:3]}")
    used = {k for p in loaded_paths for k in sources[_path_str(p)].keys()}
    absent = sorted(k for k in used if k not in ckpt)
    if absent:
        raise CheckpointError(f"checkpoint {ckpt.path!r} lacks tensor(s) {absent[:3]}; is it the right model type?")
    unused = [k for k in ckpt.keys() if k not in used and not ignore(k)]
    if unused:
        raise CheckpointError(f"checkpoint tensor(s) {unused[:3]} have no place in the model; wrong config?")

    # Fresh variables (LoRA, RNG state, ...) are initialised in their sharded layout; XLA drops the
    # initialisers of everything that is loaded instead.
    def init_rest():
        state = nnx.state(make_model())
        flat = dict(nnx.to_flat_state(state))
        return {p: flat[p] for p in fresh_paths}

    rest_shardings = {p: flat_shardings[p] for p in fresh_paths}
    fresh_values = jax.jit(init_rest, out_shardings=rest_shardings)() if fresh_paths else {}

    flat_values = {}
    for path in loaded_paths:
        variable = flat_abstract[path]
        value = variable.get_value()
        source = sources[_path_str(path)]
        found, expected = source.model_shape(ckpt), tuple(value.shape)
        if found != expected:
            raise CheckpointError(f"{_path_str(path)}: checkpoint gives shape {found}, model expects {expected}")
        param_dtype = dtype if jnp.issubdtype(value.dtype, jnp.floating) else value.dtype
        flat_values[path] = variable.replace(read_sharded(ckpt, source, flat_shardings[path].get_value(), param_dtype))
    flat_values.update(fresh_values)
    state = nnx.from_flat_state([(p, flat_values[p]) for p in flat_abstract])
    return nnx.merge(graphdef, state)


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
):
    """A `LlamaModel` from a local `LlamaForCausalLM` checkpoint, streamed into its sharded layout.

    dtype: storage dtype of the parameters; compute_dtype: matmul dtype (default `dtype`). `runtime`
    sets the other `LlamaConfig` runtime fields (remat, lora_*). LoRA weights are initialised from
    `seed` (`B = 0`, so outputs equal the checkpoint's). Without an lm_head, `lm_head.weight` is skipped.
    """
    from lexvla_jax.models import layers, llama

    ckpt = HFCheckpoint(path)
    if ckpt.config.get("model_type") != "llama":
        raise CheckpointError(
            f"{ckpt.path!r} holds a {ckpt.config.get('model_type')!r} model, not 'llama'; pass a Llama checkpoint"
        )
    config = llama.LlamaConfig.from_hf(ckpt.config, dtype=compute_dtype or dtype, param_dtype=dtype, **runtime)
    skip_lm_head = not with_lm_head or config.tie_word_embeddings
    return load_model(
        lambda: llama.LlamaModel(config, with_lm_head=with_lm_head, rngs=nnx.Rngs(seed)),
        ckpt,
        llama.hf_sources(config),
        mesh=mesh,
        rules=rules,
        dtype=dtype,
        fresh=(layers.LoRAParam,),
        ignore=lambda key: key.endswith("rotary_emb.inv_freq") or (skip_lm_head and key == "lm_head.weight"),
    )


def load_hf_dinov2(
    path: str | os.PathLike,
    dtype=jnp.float32,
    *,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    compute_dtype=None,
    remat: str = "none",
    seed: int = 0,
):
    """A `Dinov2Model` from a local `Dinov2Model` / `Dinov2WithRegistersModel` checkpoint, streamed into its shards.

    dtype: storage dtype of the parameters; compute_dtype: matmul dtype (default `dtype`); remat: a policy in
    `layers.REMAT_POLICIES`; seed: the drop-path random stream (used only when `deterministic=False`).
    """
    from lexvla_jax.models import dinov2

    ckpt = HFCheckpoint(path)
    try:
        config = dinov2.Dinov2Config.from_hf(ckpt.config, dtype=compute_dtype or dtype, param_dtype=dtype, remat=remat)
    except ValueError as e:
        raise CheckpointError(f"{ckpt.path!r}: {e}; pass a DINOv2 checkpoint") from None
    return load_model(
        lambda: dinov2.Dinov2Model(config, rngs=nnx.Rngs(seed)),
        ckpt,
        dinov2.hf_sources(config),
        mesh=mesh,
        rules=rules,
        dtype=dtype,
        ignore=lambda key: key in dinov2.HF_IGNORED,
    )
