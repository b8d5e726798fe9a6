"""Trainable weights and their AdamW moments are float32 whatever dtype the frozen towers are stored in."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import tiny_lexvla as tiny

from lexvla_jax import build, configlib, sharding
from lexvla_jax.program import make_program

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_WORDS = 17149


def _moments(opt_state) -> dict[str, list]:
    """AdamW's first and second moments (`mu`, `nu`) as lists of leaves."""
    found = {"mu": [], "nu": []}
    for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        names = {getattr(k, "name", None) for k in path}
        for moment in found:
            if moment in names:
                found[moment].append(leaf)
    return found


def test_paper_config_trains_float32_master_weights():
    config = configlib.load_config(os.path.join(REPO, "configs", "lexvla_cc12m.py"))
    assert config.model.frozen_param_dtype == "bfloat16"
    mesh = sharding.mesh_from_config(config.mesh)
    with sharding.use_mesh_rules(mesh, tuple(config.sharding.rules)):
        program, params, frozen, _ = make_program(config, mesh, build.abstract_model(config, PAPER_WORDS))
    state = program.abstract_state
    trainable = jax.tree.leaves(state.params)
    assert {x.dtype for x in trainable} == {jnp.dtype(jnp.float32)}
    lora = [v for _, v in nnx.to_flat_state(params) if isinstance(v, nnx.LoRAParam)]
    assert sum(int(np.prod(v.get_value().shape)) for v in lora) == 19_988_480  # r=8 on the 7 linears of 32 layers
    moments = _moments(state.opt_state)
    for name, leaves in moments.items():
        assert len(leaves) == len(trainable), name
        assert {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)}, name
    frozen_floats = [x for x in jax.tree.leaves(frozen) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert len(frozen_floats) > 10 and {x.dtype for x in frozen_floats} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.slow
def test_bfloat16_frozen_towers_with_float32_lora_train():
    """A tiny model stored like the paper's (bf16 frozen towers, f32 LoRA) fits a fixed batch: the loss falls."""
    overrides = [
        "model.frozen_param_dtype=bfloat16",
        "model.vision.image_size=32",
        "model.vision.num_hidden_layers=1",
        "model.text.num_hidden_layers=1",
        "train.trainable=('adapter','visual_codebook','logit_scale','lora')",
        "train.global_batch_size=16",
        "train.num_steps=30",
        "optim.warmup_steps=2",
        "mesh.shape=(1,1,1)",
    ]
    config = configlib.load_config(os.path.join(REPO, "configs", "tiny.py:scratch"), overrides)
    mesh = sharding.mesh_from_config(config.mesh, devices=jax.devices()[:1])
    rules = tuple(config.sharding.rules)
    with sharding.use_mesh_rules(mesh, rules):
        model = build.build_model(config, mesh, np.arange(40))
        program, params, frozen, rest = make_program(config, mesh, model)
        state = program.init_state(params)
        lora_before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state.params) if "lora_a" in p}
        frozen_before = [np.asarray(x) for x in jax.tree.leaves(frozen)]
        batch = jax.device_put(tiny.tiny_batch(16), program.batch_sharding)
        losses = []
        for _ in range(config.train.num_steps):
            state, metrics = program.step(frozen, rest, state, batch)
            losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.75 * losses[0], losses  # measured: 2.77 → 1.63
    lora_after = {p: v.get_value() for p, v in nnx.to_flat_state(state.params) if "lora_a" in p}
    assert lora_before and all(lora_after[p].dtype == jnp.float32 for p in lora_after)
    assert all(np.any(np.asarray(lora_after[p]) != lora_before[p]) for p in lora_before)  # LoRA trained
    assert {x.dtype for x in jax.tree.leaves(frozen) if jnp.issubdtype(x.dtype, jnp.floating)} == {
        jnp.dtype(jnp.bfloat16)
    }
    for before, after in zip(frozen_before, jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(before, np.asarray(after))
