"""The train step: loss, gradients and the optax update as one pure function of (state, batch).

The model is split three ways: trainable parameters (in `TrainState`, updated by the optimiser), frozen
parameters (an argument of the step, wrapped in `stop_gradient`, never in the optimiser) and the rest
(random-stream state, reseeded from `TrainState.rng` every step so a resumed run draws the same numbers).

Gradient accumulation is GradCache-style: the lexical vectors of all micro-batches are computed first
without gradients, the loss and its gradient with respect to those vectors are taken over the **whole**
global batch, then each micro-batch is re-run with `jax.vjp` and its parameter gradient accumulated. The
contrastive negatives and the overuse statistics therefore cover the global batch whatever the number of
micro-batches.
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lexvla_jax import losses, sharding
from lexvla_jax.models.split import SplitModel


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed)."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array
    skipped_updates: jax.Array  # total steps whose update was dropped for a non-finite loss/gradient
    consecutive_skips: jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms (see `losses.lexvla_loss`)."""

    lambda_img: float = 1e-3
    lambda_txt: float = 1e-3
    penalty: str = "overuse"
    warmup_steps: int = 0
    top_k: int = 0  # > 0: InfoNCE on each vector's top k entries (Q(512), config.loss.top_k)


def init_train_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state at step 0."""
    zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the state is donated to the step
    return TrainState(
        step=zero(),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        skipped_updates=zero(),
        consecutive_skips=zero(),
    )


def train_state_shardings(abstract_state: TrainState, tx: optax.GradientTransformation, mesh, rules) -> TrainState:
    """Shardings of a train state: parameters (and their optimiser moments) by the rules, scalars replicated."""
    param_shardings = sharding.state_shardings(abstract_state.params, mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_state.opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=opt_shardings,
        rng=replicated,
        skipped_updates=replicated,
        consecutive_skips=replicated,
    )


def split_micro(batch, num_micro: int):
    """`[B, ...]` → `[num_micro, B / num_micro, ...]`, micro-batch i holding rows i, i + M, i + 2M, ...

    Strided rather than contiguous: the batch axis is split over the data-parallel devices in contiguous
    blocks, so a strided micro-batch takes an equal share of every device's block and spans all of them
    without moving data (a contiguous one would sit on 1/M of the devices).
    """
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1), batch)


def merge_micro(x: jax.Array) -> jax.Array:
    """Inverse of `split_micro`: `[M, B / M, ...]` → `[B, ...]` in the original row order."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def loss_and_grads(model: SplitModel, loss_config: LossConfig, num_micro: int, params, frozen, rest, batch, rng, step):
    """(loss, metrics), grads of the LexVLA loss over the whole batch, accumulated over micro-batches."""
    loss_fn = functools.partial(
        losses.lexvla_loss,
        lambda_img=loss_config.lambda_img,
        lambda_txt=loss_config.lambda_txt,
        penalty=loss_config.penalty,
        step=step,
        warmup_steps=loss_config.warmup_steps,
        top_k=loss_config.top_k,
    )
    micro_rngs = jax.random.split(rng, num_micro)
    micro = split_micro(batch, num_micro)

    def encode(p, mb, r):
        return model.encode(p, frozen, rest, mb, r, deterministic=False)

    if num_micro == 1:
        single = jax.tree.map(lambda x: x[0], micro)

        def total(p):
            s_img, s_txt = encode(p, single, micro_rngs[0])
            return loss_fn(s_img, s_txt, model.logit_scale(p, frozen, rest))

        (loss, metrics), grads = jax.value_and_grad(total, has_aux=True)(params)
        return (loss, metrics), grads

    # Pass 1: lexical vectors of every micro-batch, no gradients kept.
    def forward(_, xs):
        mb, r = xs
        return None, encode(params, mb, r)

    _, (s_img, s_txt) = jax.lax.scan(forward, None, (micro, micro_rngs))
    s_img, s_txt = merge_micro(s_img), merge_micro(s_txt)
    scale, scale_vjp = jax.vjp(lambda p: model.logit_scale(p, frozen, rest), params)
    (loss, metrics), (g_img, g_txt, g_scale) = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(
        s_img, s_txt, scale
    )
    (grads,) = scale_vjp(g_scale)

    # Pass 2: re-run each micro-batch and pull its slice of the vector gradient back to the parameters.
    def backward(acc, xs):
        mb, r, gi, gt = xs
        _, vjp = jax.vjp(lambda p: encode(p, mb, r), params)
        (g,) = vjp((gi, gt))
        return jax.tree.map(jnp.add, acc, g), None

    cotangents = split_micro((g_img, g_txt), num_micro)
    grads, _ = jax.lax.scan(backward, grads, (micro, micro_rngs, *cotangents))
    return (loss, metrics), grads


def train_step(
    model: SplitModel,
    tx: optax.GradientTransformation,
    schedule,
    loss_config: LossConfig,
    num_micro: int,
    frozen,
    rest,
    state: TrainState,
    batch,
):
    """One optimiser step. A non-finite loss or gradient leaves params and optimiser state unchanged."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, metrics), grads = loss_and_grads(
        model, loss_config, num_micro, state.params, frozen, rest, batch, rng, state.step
    )
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
        skipped_updates=state.skipped_updates + (~ok).astype(jnp.int32),
        consecutive_skips=jnp.where(ok, 0, state.consecutive_skips + 1),
    )
    metrics = dict(
        metrics,
        loss=loss,
        grad_norm=grad_norm,
        learning_rate=schedule(state.step),
        update_ok=ok,
        skipped_updates=new_state.skipped_updates,
        consecutive_skips=new_state.consecutive_skips,
    )
    return new_state, metrics


def jit_train_step(
    model: SplitModel,
    tx: optax.GradientTransformation,
    schedule,
    loss_config: LossConfig,
    num_micro: int,
    *,
    frozen_shardings,
    rest_shardings,
    state_shardings: TrainState,
    batch_sharding,
):
    """`train_step` compiled with explicit shardings and the state donated: `(frozen, rest, state, batch)`."""
    return jax.jit(
        functools.partial(train_step, model, tx, schedule, loss_config, num_micro),
        in_shardings=(frozen_shardings, rest_shardings, state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=(2,),
    )
