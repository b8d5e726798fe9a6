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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
    ("kv", None),
    ("vocab", "tensor"),
    ("codebook", ("fsdp", "tensor")),
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
