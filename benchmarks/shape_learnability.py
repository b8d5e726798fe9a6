"""Can the tiny vision tower learn shapes at all in stage 0's budget? A supervised upper bound.

Stage 0 asks a self-supervised objective to make the tiny tower's patch tokens say which shape they lie on. This
benchmark asks the easier question first: trained *with* the answer (each object patch labelled with its shape,
cross-entropy through a linear head on the patch tokens), how far does each tower get in a given number of steps?
No self-supervised objective can beat the same tower trained on the labels, so a tower that stays at the majority
rate here cannot pass the shape targets of the main job within that budget, whatever stage 0 does.

Towers: the main job's (`configs/tiny.py`'s `model.vision`: DINOv2 layout, 2 layers, width 64, 8×8 patches of
64 px), wider/deeper and 4×4-patch variants of it, and a 6-layer CNN (3×3 convolutions, three stride-2 steps) whose
output is the same 8×8 grid. Data: fresh synthetic scenes (`shape_probe.probe_set`: the probe's split, JPEG like
the train images), `--train` for training and `--test` held out; held-out patch accuracy over object patches at
the listed steps, batch 64, AdamW (warm-up 30 steps, cosine), learning rate `--lr`.

  JAX_PLATFORMS=cpu python benchmarks/shape_learnability.py [--steps 300 1000] [--only tiny cnn]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lexvla_jax import configlib
from lexvla_jax.evaluate.patchdis import UNSCORED, patch_labels
from lexvla_jax.miniature import shape_probe, synthetic
from lexvla_jax.models import dinov2, image_norm

IMAGE_SIZE = 64
TOWERS = {  # name: changes to configs/tiny.py's model.vision (None: the CNN)
    "tiny": {},
    "tiny, width 128, 4 layers": {"hidden_size": 128, "num_hidden_layers": 4},
    "tiny, 4x4 patches": {"patch_size": 4},
    "cnn": None,
}


class ViTPatches(nnx.Module):
    """A DINOv2 tower and a linear shape head on its patch tokens."""

    def __init__(self, config: dinov2.Dinov2Config, rngs: nnx.Rngs):
        self.tower = dinov2.Dinov2Model(config, rngs=rngs)
        self.head = nnx.Linear(config.hidden_size, len(synthetic.SHAPES), rngs=rngs)

    def __call__(self, pixels):
        tokens = self.tower(pixels).last_hidden_state[:, self.tower.num_prefix_tokens :]
        return self.head(tokens)


class CNNPatches(nnx.Module):
    """Six 3×3 convolutions (GELU; strides 1, 2, 2, 2, 1, 1: an 8×8 grid at 64 px) and a linear shape head."""

    def __init__(self, width: int, rngs: nnx.Rngs):
        channels = [3, width // 2, width, width, width, width, width]
        strides = [1, 2, 2, 2, 1, 1]
        self.convs = nnx.List(
            [
                nnx.Conv(c_in, c_out, (3, 3), strides=s, rngs=rngs)
                for c_in, c_out, s in zip(channels[:-1], channels[1:], strides, strict=True)
            ]
        )
        self.head = nnx.Linear(width, len(synthetic.SHAPES), rngs=rngs)

    def __call__(self, pixels):
        x = pixels
        for conv in self.convs:
            x = jax.nn.gelu(conv(x))
        return self.head(x.reshape(x.shape[0], -1, x.shape[-1]))


def make_model(name: str) -> tuple[nnx.Module, int]:
    """(model, patch size of its output grid)."""
    fields = configlib.load_config("configs/tiny.py").model.vision.to_dict()
    fields = {k: v for k, v in fields.items() if k not in ("tower", "preset")}
    if TOWERS[name] is None:
        return CNNPatches(fields["hidden_size"], nnx.Rngs(0)), 8
    config = dinov2.Dinov2Config(**{**fields, **TOWERS[name]})
    return ViTPatches(config, nnx.Rngs(0)), config.patch_size


def run(name: str, images, masks, train: int, checkpoints: list[int], lr: float) -> dict:
    model, patch = make_model(name)
    labels = patch_labels(masks, (IMAGE_SIZE // patch,) * 2, len(synthetic.SHAPES))
    steps = max(checkpoints)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, 30, steps), weight_decay=0.05)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(model, pixels, y):
        logits = model(image_norm.normalize_images(pixels, "imagenet"))
        scored = y != UNSCORED
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(scored, y, 0))
        return jnp.sum(ce * scored) / jnp.maximum(scored.sum(), 1)

    @nnx.jit
    def step(model, optimizer, pixels, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, pixels, y)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def predict(model, pixels):
        return model(image_norm.normalize_images(pixels, "imagenet")).argmax(-1)

    def accuracy():
        predicted = np.concatenate(
            [np.asarray(predict(model, images[i : i + 250])) for i in range(train, len(images), 250)]
        )
        y = labels[train:]
        return float(np.mean(predicted[y != UNSCORED] == y[y != UNSCORED]))

    rng = np.random.default_rng(0)
    row, start, loss = {}, time.perf_counter(), float("nan")
    for i in range(1, steps + 1):
        batch = rng.integers(train, size=64)
        loss = step(model, optimizer, jnp.asarray(images[batch]), jnp.asarray(labels[batch]))
        if i in checkpoints:
            row[i] = accuracy()
            print(f"{name}: step {i} loss {float(loss):.3f} held-out accuracy {row[i]:.3f}", flush=True)
    test = labels[train:]
    majority = np.bincount(labels[:train][labels[:train] != UNSCORED]).argmax()
    row["majority"] = float(np.mean(test[test != UNSCORED] == majority))
    row["seconds"] = time.perf_counter() - start
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--train", type=int, default=12000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--only", nargs="+", choices=sorted(TOWERS), default=list(TOWERS))
    args = parser.parse_args()
    images, masks = shape_probe.probe_set(args.train + args.test, IMAGE_SIZE, seed=1)
    rows = {name: run(name, images, masks, args.train, sorted(args.steps), args.lr) for name in args.only}
    steps = sorted(args.steps)
    print(f"\n| tower | {' | '.join(f'{s} steps' for s in steps)} | majority | seconds |")
    print(f"|---|{'---:|' * (len(steps) + 2)}")
    for name, row in rows.items():
        cells = " | ".join(f"{row[s]:.3f}" for s in steps)
        print(f"| {name} | {cells} | {row['majority']:.3f} | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()
