"""The train step: what trains, gradient accumulation, non-finite skipping, and sharded == single device."""

import dataclasses
import functools
import inspect
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from support import tiny_lexvla as tiny

from lexvla_jax import build, configlib, optim, sharding
from lexvla_jax import step as step_lib
from lexvla_jax.models.split import SplitModel
from lexvla_jax.program import make_program


def _loss(s_img, s_txt, scale):
    """The step's loss (`tiny.loss_config`, step 0) of lexical vectors."""
    return step_lib.losses.lexvla_loss(s_img, s_txt, scale, step=0, **dataclasses.asdict(tiny.loss_config()))[0]


@pytest.fixture(scope="module")
def setup():
    graphdef, params, frozen, rest = tiny.split(tiny.tiny_model())
    tx, schedule = optim.make_optimizer(tiny.OPTIM, num_steps=10)
    return graphdef, params, frozen, rest, tx, schedule


@pytest.mark.slow
def test_only_trainable_parameters_get_gradients(setup):
    graphdef, params, frozen, rest, *_ = setup
    model = tiny.split_model(graphdef)
    batch = jax.tree.map(jnp.asarray, tiny.tiny_batch(8))

    def loss(p, f):
        s_img, s_txt = model.encode(p, f, rest, batch, None, deterministic=True)
        return step_lib.losses.lexvla_loss(s_img, s_txt, model.logit_scale(p, f, rest), lambda_img=0.1, lambda_txt=0.1)[
            0
        ]

    grad_params, grad_frozen = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, frozen)
    flat = dict(nnx.to_flat_state(grad_params))
    groups = {path[0] for path in flat}
    assert groups == {"adapter", "visual_codebook", "logit_scale", "text"}  # text: its LoRA only
    assert all(type(v).__name__ == "LoRAParam" for p, v in flat.items() if p[0] == "text")
    for path, value in flat.items():
        assert np.any(np.asarray(value[...]) != 0), f"no gradient reaches {path}"
    # The frozen towers and the text codebook sit behind stop_gradient: exactly zero.
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(grad_frozen))
    frozen_groups = {path[0] for path in dict(nnx.to_flat_state(frozen))}
    assert frozen_groups == {"vision", "text", "text_codebook"}


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1)], ids=["data8", "data2xfsdp4"])
def test_gradient_accumulation_matches_one_batch(setup, mesh_shape):
    """GradCache with 4 strided micro-batches equals one pass, with the batch split over a mesh (data-parallel, and
    data × FSDP)."""
    graphdef, params, frozen, rest, *_ = setup
    model = tiny.split_model(graphdef)
    batch = jax.tree.map(jnp.asarray, tiny.tiny_batch(16))
    rng = jax.random.key(0)
    mesh = sharding.make_mesh(mesh_shape)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh, sharding.DEFAULT_RULES))

    def run(num_micro):
        fn = functools.partial(step_lib.loss_and_grads, model, tiny.loss_config(), num_micro)
        with sharding.use_mesh_rules(mesh, sharding.DEFAULT_RULES):
            return jax.jit(fn)(params, frozen, rest, batch, rng, jnp.int32(0))

    (loss1, metrics1), grads1 = run(1)
    (loss4, metrics4), grads4 = run(4)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-6)
    np.testing.assert_allclose(metrics4["penalty_img"], metrics1["penalty_img"], rtol=1e-6)
    for g4, g1 in zip(jax.tree.leaves(grads4), jax.tree.leaves(grads1), strict=True):
        np.testing.assert_allclose(g4, g1, rtol=2e-4, atol=1e-6)  # summation order differs across micro-batches


TOKENS = 12  # tiny_batch's text length: no parameter or other activation has this size


def _collectives_on_inputs(num_micro: int) -> list[str]:
    """Collectives in the compiled train step (8-device data-parallel mesh) that move batch inputs or
    per-token activations: uint8 images, or arrays with a token axis."""
    graphdef, params, frozen, rest = tiny.split(tiny.tiny_model())
    tx, schedule = optim.make_optimizer(tiny.OPTIM, num_steps=10)
    mesh = sharding.make_mesh((8, 1, 1))
    with sharding.use_mesh_rules(mesh, sharding.DEFAULT_RULES):
        step, (frozen, rest, state) = tiny.sharded_step(
            mesh, graphdef, params, frozen, rest, tx, schedule, num_micro=num_micro
        )
        batch = jax.device_put(
            tiny.tiny_batch(16, length=TOKENS), sharding.batch_sharding(mesh, sharding.DEFAULT_RULES)
        )
        hlo = step.lower(frozen, rest, state, batch).compile().as_text()
    pattern = r"= (\w+)\[([\d,]*)\]\S* (all-gather|all-to-all|collective-permute|reduce-scatter|all-reduce)"
    ops = re.findall(pattern, hlo)
    assert any(op == "all-reduce" for *_, op in ops)  # the pattern does find the gradient reduction
    moved = []
    for dtype, dims, op in ops:
        if dtype == "u8" or str(TOKENS) in dims.split(",") or op in ("all-to-all", "collective-permute"):
            moved.append(f"{op} {dtype}[{dims}]")
    return moved


@pytest.mark.slow
def test_strided_micro_batches_move_no_input_between_devices():
    """Strided micro-batches each take an equal share of every device's rows: in the compiled step, 2
    micro-batches add no collective on the images, the token rows or their activations (1 needs none)."""
    assert _collectives_on_inputs(1) == []
    assert _collectives_on_inputs(2) == []


@pytest.mark.slow
def test_contiguous_micro_batches_would_move_inputs(monkeypatch):
    """The check above can fail: contiguous blocks (each micro-batch on half of the devices) reshard."""
    monkeypatch.setattr(step_lib, "split_micro", lambda b, m: jax.tree.map(lambda x: x.reshape(m, -1, *x.shape[1:]), b))
    monkeypatch.setattr(step_lib, "merge_micro", lambda x: x.reshape(-1, *x.shape[2:]))
    moved = _collectives_on_inputs(2)
    assert any(m.startswith("all-gather u8[") for m in moved), moved


class _OtherKeysInPass2(SplitModel):
    """Encodes with a different key once the loss's logit scale was read, i.e. in GradCache's pass 2."""

    loss_seen = False

    def logit_scale(self, params, frozen, rest):
        self.loss_seen = True
        return super().logit_scale(params, frozen, rest)

    def encode(self, params, frozen, rest, batch, rng, deterministic):
        rng = jax.random.fold_in(rng, 1) if self.loss_seen else rng
        return super().encode(params, frozen, rest, batch, rng, deterministic)


@pytest.mark.slow
def test_gradient_accumulation_replays_dropout_keys():
    """With drop path and LoRA dropout on, GradCache's gradient is that of the loss pass 1 computed.

    Each micro-batch draws its own masks, so the result cannot equal one pass over the whole batch; it must
    equal a direct `jax.grad` of the loss over the same micro-batches and keys. Pass 2 replays them: a
    different key in pass 2 changes the gradient (and the test sees it).
    """
    graphdef, params, frozen, rest = tiny.split(tiny.tiny_model(drop_path_rate=0.3, lora_dropout=0.3))
    batch = jax.tree.map(jnp.asarray, tiny.tiny_batch(8))
    rng, num_micro = jax.random.key(0), 2
    model = tiny.split_model(graphdef)

    def direct_loss(p):
        micro, keys = step_lib.split_micro(batch, num_micro), jax.random.split(rng, num_micro)
        rows = [jax.tree.map(lambda x, i=i: x[i], micro) for i in range(num_micro)]
        parts = [model.encode(p, frozen, rest, mb, k, deterministic=False) for mb, k in zip(rows, keys, strict=True)]
        s_img, s_txt = (step_lib.merge_micro(jnp.stack(vectors)) for vectors in zip(*parts, strict=True))
        return _loss(s_img, s_txt, model.logit_scale(p, frozen, rest))

    def grad_cache(split_model):
        fn = functools.partial(step_lib.loss_and_grads, split_model, tiny.loss_config(), num_micro)
        (loss, _), grads = jax.jit(fn)(params, frozen, rest, batch, rng, jnp.int32(0))
        return float(loss), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])

    want_loss, want = jax.jit(jax.value_and_grad(direct_loss))(params)
    want = np.concatenate([np.ravel(g) for g in jax.tree.leaves(want)])
    loss, got = grad_cache(model)
    np.testing.assert_allclose(loss, float(want_loss), rtol=1e-6)
    relative_error = lambda g: np.linalg.norm(g - want) / np.linalg.norm(want)
    assert relative_error(got) < 1e-5
    other_loss, other = grad_cache(_OtherKeysInPass2(graphdef))
    np.testing.assert_allclose(other_loss, float(want_loss), rtol=1e-6)  # pass 1 is unchanged
    print(
        f"\nGradCache vs direct grad: relative error {relative_error(got):.1e}; other keys in pass 2: "
        f"{relative_error(other):.1e}"
    )
    assert relative_error(other) > 1e-2


@pytest.mark.slow
def test_non_finite_loss_skips_the_update(setup):
    graphdef, params, frozen, rest, tx, schedule = setup
    step = jax.jit(
        functools.partial(step_lib.train_step, tiny.split_model(graphdef), tx, schedule, tiny.loss_config(), 1)
    )
    batch = jax.tree.map(jnp.asarray, tiny.tiny_batch(8))
    state = step_lib.init_train_state(params, tx, seed=0)
    bad_params = jax.tree.map(lambda x: x, params)
    bad_params["logit_scale"][...] = jnp.float32(jnp.nan)
    bad = state.replace(params=bad_params)
    before = tiny.as_numpy(bad)
    after, metrics = step(frozen, rest, bad, batch)
    assert not bool(metrics["update_ok"]) and not np.isfinite(float(metrics["loss"]))
    after = tiny.as_numpy(after)
    for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(before.params), strict=True):
        np.testing.assert_array_equal(a, b)  # NaN stays NaN, everything else bit-identical
    for a, b in zip(jax.tree.leaves(after.opt_state), jax.tree.leaves(before.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (after.step, after.skipped_updates, after.consecutive_skips) == (1, 1, 1)
    good, metrics = step(frozen, rest, state, batch)
    assert bool(metrics["update_ok"]) and int(good.consecutive_skips) == 0 and int(good.skipped_updates) == 0


def _run_step_on(mesh, params, frozen, rest, graphdef, tx, schedule, batch):
    with sharding.use_mesh_rules(mesh, sharding.DEFAULT_RULES):
        step, (frozen, rest, state) = tiny.sharded_step(mesh, graphdef, params, frozen, rest, tx, schedule)
        batch = jax.device_put(batch, sharding.batch_sharding(mesh, sharding.DEFAULT_RULES))
        return step(frozen, rest, state, batch)


def _per_device_loss(mesh, s_img, s_txt, scale):
    """What a per-device loss would report: each device's InfoNCE and penalties over its own rows, averaged."""
    rows = sharding.batch_sharding(mesh, sharding.DEFAULT_RULES).spec
    local = lambda a, b: jax.lax.pmean(_loss(a, b, scale), rows[0])
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(rows, rows), out_specs=P()))(s_img, s_txt)


SHARDED_BATCH_SEED = 3
ADAM_EPS = inspect.signature(optax.adamw).parameters["eps"].default  # optim.make_optimizer keeps optax's ε


@pytest.fixture(scope="module")
def single_device_step(setup):
    """`(state, metrics)` of one train step of `setup` on one device."""
    graphdef, params, frozen, rest, tx, schedule = setup
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return _run_step_on(
        mesh, params, frozen, rest, graphdef, tx, schedule, tiny.tiny_batch(16, seed=SHARDED_BATCH_SEED)
    )


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 4, 2)], ids=["data8", "fsdp4xtensor2"])
def test_sharded_step_equals_single_device(setup, single_device_step, mesh_shape):
    graphdef, params, frozen, rest, tx, schedule = setup
    batch = tiny.tiny_batch(16, seed=SHARDED_BATCH_SEED)
    ref_state, ref_metrics = single_device_step
    mesh = sharding.make_mesh(mesh_shape)
    state, metrics = _run_step_on(mesh, params, frozen, rest, graphdef, tx, schedule, batch)
    # The parameters really are split on the mesh.
    kernel = state.params["adapter"]["fc1"]["kernel"][...]
    assert len(kernel.sharding.device_set) > 1
    for key in ("loss", "info_nce", "penalty_img", "penalty_txt", "grad_norm"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=2e-5, err_msg=key)
    # The check can fail: a loss computed per device over its own rows (InfoNCE with only local negatives,
    # penalties of local statistics) is far from the global loss the step reports.
    model = tiny.split_model(graphdef)
    encode = jax.jit(lambda *args: model.encode(*args, None, deterministic=True))  # one program, not op by op
    s_img, s_txt = encode(params, frozen, rest, jax.tree.map(jnp.asarray, batch))
    scale = model.logit_scale(params, frozen, rest)
    np.testing.assert_allclose(jax.jit(_loss)(s_img, s_txt, scale), ref_metrics["loss"], rtol=2e-5)
    per_device = float(_per_device_loss(mesh, s_img, s_txt, scale))
    print(f"\n{mesh_shape}: global loss {float(metrics['loss']):.4f}, per-device loss {per_device:.4f}")
    assert abs(per_device - float(metrics["loss"])) > 0.2 * float(metrics["loss"])
    # The gradient, entry by entry: after one step Adam's first moment is (1 - b1) × the clipped gradient.
    first_moment = lambda s: jax.tree.leaves(tiny.as_numpy(optax.tree_utils.tree_get(s.opt_state, "mu")))
    moments = list(zip(first_moment(state), first_moment(ref_state), strict=True))
    # Each leaf within 1% of its largest entry (measured: up to 6e-4, in the LoRA A leaf whose entries cancel) plus
    # 1e-6 of the largest gradient entry overall (a leaf with no gradient holds float noise of ~1e-14); a wrong sharding
    # is off by the gradient's own size.
    scale = max(np.abs(ref_mu).max() for _, ref_mu in moments)
    for mu, ref_mu in moments:
        np.testing.assert_allclose(mu, ref_mu, rtol=0, atol=1e-2 * np.abs(ref_mu).max() + 1e-6 * scale)
    # The update. AdamW's first step moves an entry by lr × g / (|g| + ε) (+ decay): where |g| is near ε (1e-8)
    # that ratio turns float32 summation-order noise in g into a few % of a step (one LoRA A entry, g ≈ 8e-9, moved
    # 1-5% of a step apart, run to run), so entries with |g| ≤ 100 ε are left to the gradient check above.
    new, ref = tiny.as_numpy(state.params), tiny.as_numpy(ref_state.params)
    for a, b, (_, ref_mu) in zip(jax.tree.leaves(new), jax.tree.leaves(ref), moments, strict=True):
        well_conditioned = np.abs(ref_mu) > (1 - tiny.OPTIM.b1) * 100 * ADAM_EPS
        np.testing.assert_allclose(a[well_conditioned], b[well_conditioned], rtol=1e-4, atol=1e-5)


def _updates(params, grads, configs: dict) -> dict:
    """{name: {path: the second AdamW update (past the schedule's first step, learning rate 0)}} for each
    optimiser config, from the same gradients."""
    updates = {}
    for name, config in configs.items():
        tx, _ = optim.make_optimizer(config, num_steps=10)
        state, update_fn = jax.jit(tx.init)(params), jax.jit(tx.update)  # one dispatch, not one per array op
        for _ in range(2):
            update, state = update_fn(grads, state, params)
        updates[name] = {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(update)}
    return updates


@pytest.mark.slow
def test_lr_scales_scale_the_update_of_their_group(setup):
    """`optim.lr_scales={"lora": 0.1}`: LoRA weights move a tenth as far as without it, everything else as far."""
    graphdef, params, frozen, rest, *_ = setup
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01), params)
    scaled = tiny.OPTIM.copy_and_resolve_references()
    scaled.lr_scales = {"lora": 0.1}
    updates = _updates(params, grads, {"plain": tiny.OPTIM, "scaled": scaled})
    lora = 0
    for path, plain in updates["plain"].items():
        is_lora = path[-1] in ("lora_a", "lora_b")
        lora += is_lora
        assert np.any(plain != 0), path
        scaled_update = updates["scaled"][path]
        np.testing.assert_allclose(scaled_update, plain * (0.1 if is_lora else 1.0), rtol=1e-6, err_msg=str(path))
    assert lora > 0


@pytest.mark.slow
def test_no_decay_exempts_its_group_from_weight_decay(setup):
    """`optim.no_decay=("visual_codebook",)`: with zero gradients only weight decay moves a parameter, so the
    visual codebook stays put while the adapter's matrices still shrink; vectors (norms, biases) never decay."""
    _, params, *_ = setup
    exempt = tiny.OPTIM.copy_and_resolve_references()
    exempt.no_decay = ("visual_codebook",)
    updates = _updates(params, jax.tree.map(jnp.zeros_like, params), {"plain": tiny.OPTIM, "exempt": exempt})
    codebook = [path for path in updates["plain"] if "visual_codebook" in path]
    assert codebook
    for path, plain in updates["plain"].items():
        decays = plain.ndim >= 2
        assert np.any(plain != 0) == decays, path
        assert np.any(updates["exempt"][path] != 0) == (decays and path not in codebook), path


@pytest.mark.parametrize(
    "section, name, misspelt",
    [
        ("train", "trainable", ("adapter", "visual_codebok")),
        ("optim", "lr_scales", {"lroa": 0.1}),
        ("optim", "no_decay", ("visual_codebok",)),
    ],
)
def test_a_group_that_names_no_parameter_is_one_line(section, name, misspelt):
    """A misspelt group in `train.trainable`, `optim.lr_scales` or `optim.no_decay` would silently do nothing."""
    tiny_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
    config = configlib.load_config(tiny_py, ["model.text_checkpoint=", "model.vision_checkpoint="])
    mesh = sharding.mesh_from_config(config.mesh)
    program, params, *_ = make_program(config, mesh, build.abstract_model(config, 12))  # the defaults name groups
    assert {"visual_codebook", "lora"} <= optim.groups_of(params)
    setattr(config[section], name, misspelt)
    with pytest.raises(configlib.ConfigError, match=rf"^config\.{section}\.{name} names '.*', which is on the path"):
        make_program(config, mesh, build.abstract_model(config, 12))
