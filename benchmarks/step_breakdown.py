"""Where our train step's time goes: each stage of the step jitted on its own, forward and forward + backward.

Stages: vision tower (whichever `models/vision.py` tower, with its own normalisation), adapter, lexical max-pool
(with the L2 normalisation), text tower (with its codebook), loss, optimiser update; plus the host → device batch
copy (`make_global_batch`). Backward = (forward + backward) − forward, with gradients taken with respect to what the
real step differentiates: trainable parameters, and the stage's input when a trainable stage lies before it.
Timings are medians over round-robin repetitions (every stage once per round), so a change in machine load hits all
stages alike.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lexvla_jax import losses
from lexvla_jax.data.device_batch import make_global_batch
from lexvla_jax.models import lexical


def stages(ours) -> list[tuple[str, callable, tuple, tuple[int, ...]]]:
    """`(name, fn, args, argnums to differentiate)` for each stage, with inputs computed by the stages before."""
    model, frozen, rest, params, batch = ours.program.model, ours.frozen, ours.rest, ours.params, ours.batch
    cfg = ours.model_config
    groups = {path[0] for path, _ in nnx.to_flat_state(params)}
    merged = lambda p: model.merge(p, frozen, rest)
    loss_config = ours.program_loss

    def vision(p, images):
        """The tower on images normalised as it expects; its patch tokens (class token and registers dropped)."""
        m = merged(p)
        return m.vision(m.normalize(images)).last_hidden_state[:, m.vision.num_prefix_tokens :]

    def adapter(p, tokens):
        return merged(p).adapter(tokens)

    def max_pool(h, codebook):
        return lexical.image_lexical(h, codebook, chunk_size=cfg.max_pool_chunk)

    def text(p, ids, mask):
        return merged(p).encode_text(ids, mask)

    def loss(s_img, s_txt, scale):
        return losses.lexvla_loss(
            s_img, s_txt, scale, lambda_img=loss_config.lambda_img, lambda_txt=loss_config.lambda_txt
        )[0]

    vision_trains = "vision" in groups
    tokens = jax.jit(vision)(params, batch["image"])
    h = jax.jit(adapter)(params, tokens)
    codebook = params["visual_codebook"][...]
    s_img = jax.jit(max_pool)(h, codebook)
    s_txt = jax.jit(text)(params, batch["input_ids"], batch["attention_mask"])
    scale = jax.jit(lambda p: merged(p).logit_scale_value())(params)
    return [
        ("vision tower", vision, (params, batch["image"]), (0,) if vision_trains else ()),
        ("adapter", adapter, (params, tokens), (0, 1) if vision_trains else (0,)),
        ("lexical max-pool", max_pool, (h, codebook), (0, 1)),
        ("text tower", text, (params, batch["input_ids"], batch["attention_mask"]), (0,)),
        ("loss", loss, (s_img, s_txt, scale), (0, 1, 2)),
    ]


def with_backward(fn, argnums: tuple[int, ...]):
    """`(*args, probe) -> gradients of <fn(*args), probe>` with respect to `argnums`."""

    def grads(*args):
        *inputs, probe = args
        return jax.grad(lambda *a: jnp.vdot(fn(*a), probe), argnums=argnums)(*inputs)

    return grads


def optimiser_update(ours):
    tx = ours.program.tx

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = ours.params
    return jax.jit(update), (params, ours.program.tx.init(params), params)


def report(ours, reps: int) -> None:
    """Times every stage `reps` times, round-robin, and prints a table of medians next to the whole step."""
    runs = {}
    for name, fn, args, argnums in stages(ours):
        runs[(name, "forward")] = (jax.jit(fn), args)
        if argnums:
            out = jax.eval_shape(fn, *args)
            probe = jax.random.normal(jax.random.key(1), out.shape, out.dtype)
            runs[(name, "forward+backward")] = (jax.jit(with_backward(fn, argnums)), (*args, probe))
    runs[("optimiser update", "forward")] = optimiser_update(ours)
    runs[("batch to device", "forward")] = (
        lambda b: make_global_batch(b, ours.mesh, ours.rules),
        (ours.host_batch,),
    )
    runs[("whole step", "forward")] = (lambda: ours.step(), ())
    for fn, args in runs.values():
        jax.block_until_ready(fn(*args))
    times = {key: [] for key in runs}
    for _ in range(reps):
        for key, (fn, args) in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[key].append(time.perf_counter() - start)
    med = {key: statistics.median(t) for key, t in times.items()}
    step = med[("whole step", "forward")]
    print(f"\nbreakdown of our step (medians of {reps} round-robin repetitions, ms; share of the whole step):")
    print("| stage | forward | backward | forward + backward | share |")
    print("|---|--:|--:|--:|--:|")
    names = dict.fromkeys(name for name, _ in runs)
    total = 0.0
    for name in names:
        fwd = med[(name, "forward")]
        both = med.get((name, "forward+backward"))
        cost = both if both is not None else fwd
        if name != "whole step":
            total += cost
        bwd = f"{(both - fwd) * 1e3:.0f}" if both is not None else "—"
        both_text = f"{both * 1e3:.0f}" if both is not None else "—"
        print(f"| {name} | {fwd * 1e3:.0f} | {bwd} | {both_text} | {cost / step:.0%} |")
    print(f"| sum of stages | | | {total * 1e3:.0f} | {total / step:.0%} |")
