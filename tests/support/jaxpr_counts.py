"""Primitive counts of a function's jaxpr, nested jaxprs (scan bodies, remat blocks) included.

Used to check that rematerialisation really happens: with `remat="full"` the backward pass recomputes
the forward matmuls of each scanned layer, inside a `jax.checkpoint` block.
"""

import collections

import jax
from flax import nnx
from jax.extend.core import jaxprs_in_params

CHECKPOINT = "remat2"  # the primitive `jax.checkpoint` binds


def _count(jaxpr, counts: collections.Counter, inside_scan: bool, scan_only: bool) -> collections.Counter:
    for eqn in jaxpr.eqns:
        if inside_scan or not scan_only:
            counts[eqn.primitive.name] += 1
        for sub in jaxprs_in_params(eqn.params):
            _count(sub, counts, inside_scan or eqn.primitive.name == "scan", scan_only)
    return counts


def primitive_counts(fn, *args, scan_only: bool = False) -> collections.Counter:
    """How often each primitive appears in `fn(*args)`'s jaxpr (with `scan_only`, only inside scans)."""
    return _count(jax.make_jaxpr(fn)(*args).jaxpr, collections.Counter(), False, scan_only)


def param_grad_counts(model: nnx.Module, loss) -> collections.Counter:
    """`primitive_counts` of the gradient of `loss(model)` with respect to the model's parameters."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return primitive_counts(jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest))), params)


def layer_forward_dots(model: nnx.Module, loss) -> int:
    """Matmuls in the forward pass of the scanned layers of `loss(model)`."""
    graphdef, state = nnx.split(model)
    return primitive_counts(lambda s: loss(nnx.merge(graphdef, s)), state, scan_only=True)["dot_general"]
