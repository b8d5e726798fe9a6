"""Logical-axis sharding: one mesh `('data','fsdp','tensor')` and a rules table from the config.

Layers only name their axes (`embed`, `mlp`, `heads`, `kv`, `vocab`, `layers`, `batch`, ...). A rules
table — a sequence of `(logical_name, mesh_axes)` pairs, first match wins — decides which mesh axes
each name is split over. A mesh axis is used at most once per array, and an axis that does not divide
a dimension is dropped for that dimension (the array is then replicated along it).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lexvla_jax import cluster
from lexvla_jax.configlib import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). Parameters: FSDP over `embed`, tensor parallelism over heads/mlp/vocab.
# Activations: the batch is split over every data-parallel axis.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("patches", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("layers", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
)

Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def logical_to_spec(
    names: Sequence[str | None] | None, rules: Rules, mesh: Mesh | None = None, shape: Sequence[int] | None = None
) -> PartitionSpec:
    """Maps logical axis names to a `PartitionSpec` over mesh axes.

    With `mesh` and `shape`, mesh axes that do not divide a dimension are dropped for that dimension.
    """
    if names is None:
        return PartitionSpec()
    table = {}
    for name, axes in rules:
        table.setdefault(name, _as_tuple(axes))
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        axes = [a for a in table.get(name, ()) if a not in used] if name is not None else []
        if mesh is not None:
            axes = [a for a in axes if a in mesh.shape]
            if shape is not None:
                kept, size = [], 1
                for a in axes:
                    if shape[i] % (size * mesh.shape[a]) == 0:
                        kept.append(a)
                        size *= mesh.shape[a]
                axes = kept
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, names, rules: Rules, shape=None) -> NamedSharding:
    """`NamedSharding` for an array with logical axis `names`."""
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


def _variable_names(variable) -> tuple[str | None, ...] | None:
    metadata = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    names = metadata.get("out_sharding") or metadata.get("sharding_names")
    return tuple(names) if names is not None else None


def state_shardings(state, mesh: Mesh, rules: Rules):
    """A tree of `NamedSharding`s matching an `nnx.State` (abstract or concrete) of annotated variables."""
    from flax import nnx

    def one(variable):
        value = variable.get_value() if hasattr(variable, "get_value") else variable[...]
        shape = getattr(value, "shape", ())
        return variable.replace(named_sharding(mesh, _variable_names(variable), rules, shape))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


_ACTIVE = threading.local()


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Within this context, `constrain` places activations on `mesh` by `rules`."""
    previous = getattr(_ACTIVE, "value", None)
    _ACTIVE.value = (mesh, tuple(rules))
    try:
        yield
    finally:
        _ACTIVE.value = previous


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op outside `use_mesh_rules`."""
    active = getattr(_ACTIVE, "value", None)
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, rules, x.shape))


class MeshError(ConfigError):
    """A mesh or batch layout that cannot work on these devices; the message is one line."""


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills one `-1` in `shape` so the product equals `num_devices`; raises `MeshError` otherwise."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise MeshError(f"mesh shape {shape} needs {len(MESH_AXES)} sizes for axes {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"mesh shape {shape}: sizes must be positive, with at most one -1 to infer")
    known = 1
    for s in shape:
        known *= s if s != -1 else 1
    if -1 in shape:
        if num_devices % known:
            raise MeshError(
                f"mesh shape {shape}: {known} does not divide the {num_devices} devices; change --config.mesh.shape"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    elif known != num_devices:
        raise MeshError(f"mesh shape {shape} has {known} devices but {num_devices} are available; use -1 for one axis")
    return shape


def make_mesh(
    shape: Sequence[int] = (-1, 1, 1), dcn_shape: Sequence[int] = (1, 1, 1), devices: Sequence | None = None
) -> Mesh:
    """A `('data','fsdp','tensor')` mesh with Auto axis types.

    shape: per-slice (ICI) sizes, one may be -1. dcn_shape: how many slices each axis spans (multi-slice
    TPU or multi-node GPU); the full mesh is `shape * dcn_shape` elementwise.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn_shape = tuple(int(s) for s in dcn_shape)
    num_slices = 1
    for s in dcn_shape:
        num_slices *= s
    if len(devices) % num_slices:
        raise MeshError(f"dcn shape {dcn_shape} needs a multiple of {num_slices} devices, have {len(devices)}")
    ici_shape = resolve_mesh_shape(shape, len(devices) // num_slices)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if num_slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    try:  # topology-aware device order (TPU/GPU interconnect)
        grid = mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        # Devices without a physical topology (CPU, fake devices) have no better order than their own.
        grid = np.asarray(devices).reshape(ici_shape)
    return Mesh(grid, MESH_AXES, axis_types=auto)


def mesh_from_config(mesh_config, devices: Sequence | None = None) -> Mesh:
    """Mesh from `config.mesh` (`shape`, `dcn_shape`)."""
    return make_mesh(tuple(mesh_config.shape), tuple(mesh_config.get("dcn_shape", (1, 1, 1))), devices)


def rules_of(config) -> Rules:
    """The logical-axis rules of `config.sharding.rules` as a tuple of pairs."""
    return tuple(tuple(rule) for rule in config.sharding.rules)


def mesh_and_rules(config, devices: Sequence | None = None) -> tuple[Mesh, Rules]:
    """The mesh (`config.mesh`, over `devices` or all devices) and the logical-axis rules of a config."""
    return mesh_from_config(config.mesh, devices), rules_of(config)


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways the `batch` logical axis is split on `mesh`."""
    size = 1
    for axis in _as_tuple(dict((n, a) for n, a in reversed(list(rules))).get("batch")):
        size *= mesh.shape.get(axis, 1)
    return size


def check_batch_size(global_batch: int, mesh: Mesh, rules: Rules, num_micro_batches: int = 1) -> None:
    """Fails with one line when the global batch cannot be split over data parallelism and micro-batches."""
    dp = data_parallel_size(mesh, rules)
    per_step = dp * num_micro_batches
    if global_batch % per_step:
        raise MeshError(
            f"global batch {global_batch} is not divisible by data-parallel size {dp} × {num_micro_batches} "
            f"micro-batches; use a multiple of {per_step}"
        )
    if global_batch % jax.process_count():
        raise MeshError(f"global batch {global_batch} is not divisible by {jax.process_count()} processes")


def initialize_distributed(dist_config) -> None:
    """Starts multi-process JAX when `config.dist` asks for it.

    `dist_config.mode`: "none" (one process), "auto" (TPU pods, SLURM and other clusters JAX detects),
    or "explicit" (`coordinator_address`, `num_processes`, `process_id`; e.g. a local CPU cluster).
    Each of the explicit fields falls back to the environment variables LEXVLA_COORDINATOR,
    LEXVLA_NUM_PROCESSES and LEXVLA_PROCESS_ID.
    """
    import os

    mode = dist_config.get("mode", "none")
    if mode == "none" or jax.distributed.is_initialized():  # a command may start them before the library does
        return
    if mode == "auto":
        # SLURM with one task per node or GPUs bound per task: which local GPUs this process drives.
        jax.distributed.initialize(**cluster.distributed_kwargs(os.environ))
        return
    if mode != "explicit":
        raise MeshError(f"config.dist.mode={mode!r}: choose none, auto or explicit")
    coordinator = dist_config.get("coordinator_address") or os.environ.get("LEXVLA_COORDINATOR")
    num = dist_config.get("num_processes") or os.environ.get("LEXVLA_NUM_PROCESSES")
    pid = dist_config.get("process_id")
    pid = os.environ.get("LEXVLA_PROCESS_ID") if pid is None or pid < 0 else pid
    if not coordinator or num is None or pid is None:
        raise MeshError("config.dist.mode=explicit needs coordinator_address, num_processes and process_id")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(num), process_id=int(pid))


def is_main_process() -> bool:
    """True on the process that logs and writes metrics."""
    return jax.process_index() == 0


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of every batch array: the leading (batch) axis split over the data-parallel mesh axes."""
    return NamedSharding(mesh, logical_to_spec(("batch",), rules, mesh))
