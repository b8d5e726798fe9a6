"""The training program of a config: model split, optimiser, state shardings and the jitted step.

`lexvla train` makes it from a real model and `lexvla compile` from an abstract one (`build.abstract_model`),
so the program compiled ahead of time for a TPU topology is the one that trains.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from lexvla_jax import optim, sharding
from lexvla_jax import step as step_lib
from lexvla_jax.configlib import ConfigError
from lexvla_jax.models.split import SplitModel


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """Everything compiled for training on one mesh.

    `step(frozen, rest, state, batch) -> (state, metrics)` donates `state`; `init_state(params)` makes a
    step-0 state in its shardings. `abstract_state` (shapes + shardings) is the restore target.
    """

    mesh: Mesh
    rules: tuple
    model: SplitModel
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: step_lib.TrainState
    frozen_shardings: nnx.State
    rest_shardings: nnx.State
    batch_sharding: NamedSharding
    abstract_state: step_lib.TrainState
    step: Callable
    init_state: Callable


def with_shardings(tree, shardings):
    """Shapes and dtypes of `tree` as `ShapeDtypeStruct`s carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def make_program(config: ml_collections.ConfigDict, mesh: Mesh, model: nnx.Module):
    """`(program, params, frozen, rest)` for `model` (real or abstract) under `config` on `mesh`."""
    rules = sharding.rules_of(config)
    tc = config.train
    loss_config = step_lib.LossConfig(**config.loss.to_dict())
    if not 0 <= loss_config.top_k <= model.config.vocab_size:
        raise ConfigError(
            f"config.loss.top_k={loss_config.top_k} must be in [0, V'={model.config.vocab_size}] "
            "(0: InfoNCE on the whole vectors)"
        )
    graphdef, params, frozen, rest = nnx.split(model, optim.trainable_filter(tc.trainable), nnx.Param, ...)
    optim.check_groups(config, optim.groups_of(params) | optim.groups_of(frozen))
    tx, schedule = optim.make_optimizer(config.optim, tc.num_steps)
    init = functools.partial(step_lib.init_train_state, tx=tx, seed=tc.seed)
    state_shardings = step_lib.train_state_shardings(jax.eval_shape(init, params), tx, mesh, rules)
    frozen_shardings = sharding.state_shardings(frozen, mesh, rules)
    rest_shardings = sharding.state_shardings(rest, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    split_model = SplitModel(graphdef)
    program = TrainProgram(
        mesh=mesh,
        rules=rules,
        model=split_model,
        tx=tx,
        schedule=schedule,
        state_shardings=state_shardings,
        frozen_shardings=frozen_shardings,
        rest_shardings=rest_shardings,
        batch_sharding=batch_sharding,
        abstract_state=with_shardings(jax.eval_shape(init, params), state_shardings),
        step=step_lib.jit_train_step(
            split_model,
            tx,
            schedule,
            loss_config,
            tc.micro_batches,
            frozen_shardings=frozen_shardings,
            rest_shardings=rest_shardings,
            state_shardings=state_shardings,
            batch_sharding=batch_sharding,
        ),
        init_state=jax.jit(init, out_shardings=state_shardings),
    )
    return program, params, frozen, rest
