"""Primitive counts of a function's jaxpr, nested jaxprs (scan bodies, remat blocks) included.

Used to check that rematerialisation really happens: with `remat="full"` the backward pass recomputes
the forward matmuls of each scanned layer, inside a `jax.checkpoint` block.
"""

import collections

import jax
import numpy as np
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


def remat_gradients_agree(models: dict, loss) -> list:
    """Asserts that `models["none"]` and `models["full"]` (the same tower without and with `remat="full"`) give
    the same loss and gradients; returns the flat gradients `[(path, value)]` (more than 10) of the plain one."""
    results = {}
    for remat, model in models.items():
        assert model.config.remat == remat
        results[remat] = nnx.jit(nnx.value_and_grad(loss))(model)
    (loss_none, grads_none), (loss_full, grads_full) = results["none"], results["full"]
    np.testing.assert_allclose(loss_full, loss_none, rtol=1e-6)
    flat_none, flat_full = nnx.to_flat_state(grads_none), nnx.to_flat_state(grads_full)
    assert len(flat_none) == len(flat_full) > 10
    for (path, a), (_, b) in zip(flat_none, flat_full, strict=True):
        np.testing.assert_allclose(b[...], a[...], rtol=1e-5, atol=1e-7, err_msg=str(path))
    return list(flat_none)
