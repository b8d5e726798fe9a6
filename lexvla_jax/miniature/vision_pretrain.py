"""Stage 0 of the embedded job: the tiny vision tower pretrained self-supervised, DINOv2's recipe in small.

LexVLA freezes a *pretrained* DINOv2, chosen for its local features, and only learns to map its patches into words.
No such tower exists for the synthetic images, so this stage makes one from the train images alone: no captions,
no labels, no masks. The objective is DINOv2's two self-distillation losses with an EMA teacher, plus masked-patch
pixel reconstruction:

- Views (on the device, per image): two global crops (random-resized, `global_scale` of the area, at the tower's
  `image_size`) and `local_crops` small ones (`local_scale`, at `local_size` px; the position embeddings are
  resampled), each mirrored with probability 1/2, jittered in brightness and contrast by up to `jitter`, its colour
  channels shuffled with probability `permute` and made grey with probability `gray`. The colour changes are per
  view: DINO's image-level target, which compares *different* views, cannot be met by matching colours alone (the
  synthetic images' easiest invariant: four backgrounds, eight object colours), while the patch-level targets below
  compare a view with itself, so the patch tokens still have to carry colour, half of what the captions say.
- Student and teacher: the DINOv2 backbone plus two heads (DINO's for the CLS token, iBOT's for patch tokens):
  a 3-layer MLP, L2 normalisation, and `prototypes` weight-normalised prototypes. The teacher is the exponential
  moving average of the student (momentum cosine from `momentum` to 1) and receives no gradient.
- DINO loss (weight `dino_weight`): the student's CLS distribution (temperature `student_temp`) of every view
  matches the teacher's of each *other* global view, centred (a running mean of the teacher's logits,
  `center_momentum`) and sharpened (`teacher_temp`, warmed up linearly over the first `teacher_warmup` steps).
  Part-to-whole: a local crop of a shape's corner must predict what the teacher sees in the whole image.
- iBOT loss (weight `ibot_weight`): in each global view of the student a random fraction `mask_ratio` of the
  patches is replaced by a learned mask token; each masked patch's distribution matches the teacher's for the
  same, unmasked, patch: meant to give every patch the context of the object it lies on.
- Pixel reconstruction (weight `pixel_weight`, SimMIM's): a linear head predicts each masked patch's normalised
  pixels from the student's token there; unlike the teacher's targets it carries signal from the first step.
- KoLeo (weight `koleo_weight`, DINOv2's): spreads the student's CLS features of a batch apart.
With `dino_weight` and `ibot_weight` both 0 the teacher's forward pass is skipped (pixel reconstruction alone).

Measured (BENCHMARKS.md, "Stage 0"): up to 300 steps of batch 64 of either family leave the linear shape probe of
the patch tokens at the majority rate: within the job's budget the tiny tower does not learn shapes this way yet.

The teacher's backbone is the result (DINO's choice), saved as a Hugging Face `Dinov2Model` directory
(`hf_export.save_hf_dinov2`: `config.json` with `drop_path_rate` 0, `model.safetensors`, and
`pretrain_report.json`) that `transformers.Dinov2Model` and `hf_loader.load_hf_dinov2` both load. The report holds
the losses and the linear shape probe (`shape_probe.py`) of the pretrained tower against the same tower at its
random initialisation. `ensure_pretrained_vision` skips the stage when the directory is complete. `lexvla train`
runs it first (`prepare.py`) when `config.model.vision_checkpoint` is `miniature.vision.dir`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx

from lexvla_jax import build, configlib
from lexvla_jax.data.config import resolve_shards
from lexvla_jax.data.records import BadSample
from lexvla_jax.data.tar_reader import iter_samples
from lexvla_jax.data.transforms import image_member, load_image
from lexvla_jax.miniature import hf_export, shape_probe
from lexvla_jax.models import dinov2, image_norm

REPORT = "pretrain_report.json"
_print = functools.partial(print, flush=True)


def read_images(data_config: ml_collections.ConfigDict, image_size: int) -> tuple[np.ndarray, int]:
    """(uint8 `[N, S, S, 3]`: every readable image of `data_config.train_shards`, centre-cropped and resized to
    `image_size` as evaluation reads images; the number of samples skipped as bad, by the pipeline's own rules)."""
    images, skipped = [], 0
    spec = data_config.train_shards
    for path in resolve_shards(spec, "data.train_shards"):
        with epath.Path(path).open("rb") as f:
            for sample in iter_samples(f):
                try:
                    data = image_member(sample.files)
                    images.append(
                        load_image(
                            data,
                            image_size,
                            max_pixels=data_config.max_image_pixels,
                            min_size=data_config.min_image_size,
                        )
                    )
                except BadSample:
                    skipped += 1
    if not images:
        raise configlib.ConfigError(f"config.data.train_shards={spec!r} holds no readable images to pretrain on")
    return np.stack(images), skipped


def vision_config(config: ml_collections.ConfigDict) -> dinov2.Dinov2Config:
    """`config.model.vision` as a plain float32 tower without drop path (whatever `vision_checkpoint` says: stage 0
    makes that checkpoint)."""
    fields = ml_collections.ConfigDict(config.to_dict())
    fields.model.vision_checkpoint = ""
    return dataclasses.replace(
        build.vision_config(fields), dtype=jnp.float32, param_dtype=jnp.float32, remat="none", drop_path_rate=0.0
    )


# ----------------------------------------------------------------------------------------------------------------
# Views.


def crop_views(
    images: jax.Array,
    key: jax.Array,
    size: int,
    scale: tuple[float, float],
    jitter: float,
    permute: float = 0.0,
    gray: float = 0.0,
) -> jax.Array:
    """float32 `[B, size, size, 3]` in 0..255: per image a random-resized crop (area fraction in `scale`, aspect
    ratio 3/4..4/3), bilinear, mirrored with probability 1/2, brightness and contrast scaled by 1 ± `jitter`, its
    colour channels shuffled with probability `permute` and made grey with probability `gray`."""
    b, side = images.shape[0], images.shape[1]
    k_area, k_ratio, k_x, k_y, k_flip, k_bright, k_contrast, k_perm, k_gray = jax.random.split(key, 9)
    area = jax.random.uniform(k_area, (b,), minval=scale[0], maxval=scale[1])
    log_ratio = jax.random.uniform(k_ratio, (b,), minval=math.log(3 / 4), maxval=math.log(4 / 3))
    ratio = jnp.exp(log_ratio)
    w = jnp.minimum(side * jnp.sqrt(area * ratio), side)
    h = jnp.minimum(side * jnp.sqrt(area / ratio), side)
    x0 = jax.random.uniform(k_x, (b,)) * (side - w)
    y0 = jax.random.uniform(k_y, (b,)) * (side - h)
    steps = (jnp.arange(size) + 0.5) / size
    flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    steps_x = jnp.where(flip[:, None], steps[::-1], steps)
    ys = y0[:, None] + steps[None] * h[:, None] - 0.5  # [B, size]
    xs = x0[:, None] + steps_x * w[:, None] - 0.5

    def sample(image, y, x):
        grid_y, grid_x = jnp.meshgrid(y, x, indexing="ij")
        channel = lambda c: jax.scipy.ndimage.map_coordinates(c, [grid_y, grid_x], order=1, mode="nearest")
        return jax.vmap(channel, in_axes=2, out_axes=2)(image)

    views = jax.vmap(sample)(images.astype(jnp.float32), ys, xs)
    bright = jax.random.uniform(k_bright, (b, 1, 1, 1), minval=1 - jitter, maxval=1 + jitter)
    contrast = jax.random.uniform(k_contrast, (b, 1, 1, 1), minval=1 - jitter, maxval=1 + jitter)
    mean = views.mean(axis=(1, 2, 3), keepdims=True)
    views = (views - mean) * contrast + mean * bright
    if permute > 0:
        orders = jax.vmap(lambda k: jax.random.permutation(k, 3))(jax.random.split(k_perm, b))
        shuffled = jnp.take_along_axis(views, orders[:, None, None, :], axis=3)
        views = jnp.where(jax.random.bernoulli(k_perm, permute, (b, 1, 1, 1)), shuffled, views)
    if gray > 0:
        luma = jnp.broadcast_to(views @ jnp.asarray([0.299, 0.587, 0.114])[:, None], views.shape)
        views = jnp.where(jax.random.bernoulli(k_gray, gray, (b, 1, 1, 1)), luma, views)
    return jnp.clip(views, 0.0, 255.0)


# ----------------------------------------------------------------------------------------------------------------
# Student / teacher.


class Head(nnx.Module):
    """DINO's projection head: MLP (GELU) → bottleneck → L2 normalisation → weight-normalised prototypes."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, prototypes: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.fc3 = nnx.Linear(hidden, bottleneck, rngs=rngs)
        self.prototypes = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (bottleneck, prototypes)))

    def __call__(self, x: jax.Array) -> jax.Array:
        z = self.fc3(jax.nn.gelu(self.fc2(jax.nn.gelu(self.fc1(x)))))
        z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-6)
        w = self.prototypes[...]
        return z @ (w / jnp.linalg.norm(w, axis=0, keepdims=True))


class Learner(nnx.Module):
    """The backbone, the mask token of masked patches, the CLS (DINO) and patch (iBOT) heads, and the linear
    pixel head of masked-patch reconstruction."""

    def __init__(self, config: dinov2.Dinov2Config, hidden: int, bottleneck: int, prototypes: int, *, rngs):
        d = config.hidden_size
        self.backbone = dinov2.Dinov2Model(config, rngs=rngs)
        self.mask_token = nnx.Param(jnp.zeros((d,), jnp.float32))
        self.cls_head = Head(d, hidden, bottleneck, prototypes, rngs=rngs)
        self.patch_head = Head(d, hidden, bottleneck, prototypes, rngs=rngs)
        self.pixel_head = nnx.Linear(d, config.patch_size**2 * config.num_channels, rngs=rngs)

    def __call__(self, pixels: jax.Array, masked: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(CLS token `[B, D]`, patch tokens `[B, P, D]`) of normalised pixels, `masked` patches replaced."""
        tokens = self.backbone(pixels, masked=masked, mask_token=self.mask_token[...]).last_hidden_state
        return tokens[:, 0], tokens[:, self.backbone.num_prefix_tokens :]


def patchify(pixels: jax.Array, patch: int) -> jax.Array:
    """`[B, H, W, C]` → `[B, (H/p)·(W/p), p·p·C]`, patches in row-major order (the tower's token order)."""
    b, h, w, c = pixels.shape
    x = pixels.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def new_learner(config: ml_collections.ConfigDict) -> Learner:
    """The student at its initialisation (seed `miniature.vision.seed`); the teacher starts as its copy."""
    cfg = config.miniature.vision
    tower = vision_config(config)
    return Learner(tower, cfg.head_hidden, cfg.head_bottleneck, cfg.prototypes, rngs=nnx.Rngs(cfg.seed))


def koleo(features: jax.Array) -> jax.Array:
    """DINOv2's KoLeo regulariser: −mean log of each L2-normalised feature's distance to its nearest neighbour."""
    x = features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-6)
    dots = x @ x.T - 2.0 * jnp.eye(len(x))
    nearest = jnp.sqrt(jnp.maximum(2.0 - 2.0 * dots.max(axis=1), 1e-8))
    return -jnp.mean(jnp.log(nearest + 1e-8))


def cross_entropy(teacher_probs: jax.Array, student_logits: jax.Array, temperature: float) -> jax.Array:
    """−Σ_k p_teacher · log softmax(student / T), over the last axis."""
    return -jnp.sum(teacher_probs * jax.nn.log_softmax(student_logits / temperature, axis=-1), axis=-1)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-step values of the stage's schedules (`config.miniature.vision`)."""

    cfg: ml_collections.ConfigDict

    def teacher_temp(self, step: jax.Array) -> jax.Array:
        start, end = self.cfg.teacher_temp
        frac = jnp.minimum(step / max(1, self.cfg.teacher_warmup), 1.0)
        return start + (end - start) * frac

    def momentum(self, step: jax.Array) -> jax.Array:
        start = self.cfg.momentum
        return 1.0 - (1.0 - start) * (jnp.cos(jnp.pi * step / self.cfg.steps) + 1.0) / 2.0


def pretrain_step_fn(graphdef, tx, cfg: ml_collections.ConfigDict, tower: dinov2.Dinov2Config):
    """The jitted step `(student, teacher, opt_state, centers, images, key, step) → (..., losses)`."""
    schedule = Schedule(cfg)
    n_global, n_local = 2, cfg.local_crops
    image_size, norm, grid = tower.image_size, tower.image_norm, tower.grid_size**2

    def views(images, key):
        keys = jax.random.split(key, n_global + n_local + 1)
        colour = dict(permute=cfg.permute, gray=cfg.gray)
        glob = [
            crop_views(images, keys[i], image_size, tuple(cfg.global_scale), cfg.jitter, **colour) for i in range(2)
        ]
        local = [
            crop_views(images, keys[2 + i], cfg.local_size, tuple(cfg.local_scale), cfg.jitter, **colour)
            for i in range(n_local)
        ]
        prep = lambda v: image_norm.normalize_images(v, norm)
        return [prep(v) for v in glob], [prep(v) for v in local], keys[-1]

    distil = cfg.dino_weight > 0 or cfg.ibot_weight > 0

    def loss_fn(student, teacher, centers, images, key, step):
        glob, local, key = views(images, key)
        b = images.shape[0]
        k_ratio, k_mask = jax.random.split(key)
        ratio = jax.random.uniform(k_ratio, (n_global, b, 1), minval=cfg.mask_ratio[0], maxval=cfg.mask_ratio[1])
        masked = jax.random.uniform(k_mask, (n_global, b, grid)) < ratio
        weight = masked.astype(jnp.float32)
        s_model = nnx.merge(graphdef, student)
        s_global = [s_model(v, masked[i]) for i, v in enumerate(glob)]
        terms = {"koleo": sum(koleo(cls) for cls, _ in s_global) / n_global}
        errors = [
            jnp.mean(jnp.square(s_model.pixel_head(p) - patchify(v, tower.patch_size)), axis=-1)
            for (_, p), v in zip(s_global, glob, strict=True)
        ]
        terms["pixel"] = sum(jnp.sum(e * w) / jnp.maximum(w.sum(), 1.0) for e, w in zip(errors, weight, strict=True))
        terms["pixel"] /= n_global
        new_centers = centers
        if distil:
            t_model = nnx.merge(graphdef, teacher)
            temp = schedule.teacher_temp(step)
            t_out = [jax.lax.stop_gradient(t_model(v)) for v in glob]
            t_cls = [t_model.cls_head(c) for c, _ in t_out]
            t_patch = [t_model.patch_head(p) for _, p in t_out]
            t_cls_probs = [jax.nn.softmax((c - centers["cls"]) / temp, axis=-1) for c in t_cls]
            t_patch_probs = [jax.nn.softmax((p - centers["patch"]) / temp, axis=-1) for p in t_patch]
            s_cls = [s_model.cls_head(c) for c, _ in s_global]
            s_local = [s_model.cls_head(s_model(v)[0]) for v in local]
            dino_terms = []
            for i in range(n_global):
                dino_terms += [
                    cross_entropy(t_cls_probs[i], c, cfg.student_temp).mean() for j, c in enumerate(s_cls) if j != i
                ]
                dino_terms += [cross_entropy(t_cls_probs[i], c, cfg.student_temp).mean() for c in s_local]
            terms["dino"] = sum(dino_terms) / len(dino_terms)
            ibot_terms = [
                jnp.sum(cross_entropy(t_patch_probs[i], s_model.patch_head(p), cfg.student_temp) * weight[i])
                / jnp.maximum(weight[i].sum(), 1.0)
                for i, (_, p) in enumerate(s_global)
            ]
            terms["ibot"] = sum(ibot_terms) / n_global
            new_centers = {
                "cls": jnp.mean(jnp.stack(t_cls), axis=(0, 1)),
                "patch": jnp.mean(jnp.stack(t_patch), axis=(0, 1, 2)),
            }
        else:
            terms["dino"] = terms["ibot"] = jnp.zeros(())
        loss = sum(cfg[f"{name}_weight"] * value for name, value in terms.items())
        return loss, (terms, new_centers)

    @jax.jit
    def step_fn(student, teacher, opt_state, centers, images, key, step):
        grads, (terms, batch_centers) = jax.grad(loss_fn, has_aux=True)(student, teacher, centers, images, key, step)
        updates, opt_state = tx.update(grads, opt_state, student)
        student = optax.apply_updates(student, updates)
        m = schedule.momentum(step)
        teacher = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, teacher, student)
        cm = cfg.center_momentum
        centers = jax.tree.map(lambda c, n: cm * c + (1.0 - cm) * n, centers, batch_centers)
        return student, teacher, opt_state, centers, terms

    return step_fn


def train_vision(
    config: ml_collections.ConfigDict, images: np.ndarray, log: Callable[[str], None] = _print
) -> tuple[Learner, dict]:
    """Trains stage 0 on `images` (uint8 `[N, S, S, 3]`); returns the teacher and the logged losses."""
    cfg = config.miniature.vision
    if not 0 <= cfg.warmup_steps < cfg.steps:
        raise configlib.ConfigError(
            f"config.miniature.vision.warmup_steps={cfg.warmup_steps} must be at least 0 and below "
            f"steps={cfg.steps}; lower it or train longer"
        )
    tower = vision_config(config)
    graphdef, student = nnx.split(new_learner(config), nnx.Param)
    teacher = jax.tree.map(jnp.copy, student)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps, 0.0)
    tx = optax.chain(optax.clip_by_global_norm(3.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))
    opt_state = tx.init(student)
    centers = {"cls": jnp.zeros((cfg.prototypes,)), "patch": jnp.zeros((cfg.prototypes,))}
    step_fn = pretrain_step_fn(graphdef, tx, cfg, tower)
    rng = np.random.default_rng(cfg.seed)
    key = jax.random.key(cfg.seed)
    history: dict[str, list[float]] = {"dino": [], "ibot": [], "pixel": [], "koleo": []}
    start = time.perf_counter()
    for i in range(1, cfg.steps + 1):
        batch = images[rng.integers(len(images), size=cfg.batch_size)]
        key, sub = jax.random.split(key)
        student, teacher, opt_state, centers, losses = step_fn(
            student, teacher, opt_state, centers, batch, sub, jnp.float32(i - 1)
        )
        if i % cfg.log_every == 0 or i == cfg.steps:
            for name, value in losses.items():
                history[name].append(float(value))
            rate = i * cfg.batch_size / (time.perf_counter() - start)
            terms = " ".join(f"{name} {values[-1]:.3f}" for name, values in history.items())
            log(f"stage 0 (vision tower): step {i}/{cfg.steps} {terms} ({rate:.0f} images/s)")
    return nnx.merge(graphdef, teacher), history


def is_complete(out_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(out_dir, name)) for name in ("config.json", "model.safetensors"))


def ensure_pretrained_vision(
    config: ml_collections.ConfigDict, out_dir: str | None = None, log: Callable[[str], None] = _print
) -> str:
    """The pretrained vision tower's directory (`config.miniature.vision.dir` by default), trained and saved unless
    complete."""
    cfg = config.miniature.vision
    out_dir = out_dir or cfg.dir
    if is_complete(out_dir):
        log(f"stage 0 (vision tower): using {out_dir}")
        return out_dir
    tower = vision_config(config)
    images, skipped = read_images(config.data, tower.image_size)
    log(
        f"stage 0 (vision tower): {cfg.steps} steps of batch {cfg.batch_size} on {len(images)} train images"
        + (f" ({skipped} unreadable skipped)" if skipped else "")
    )
    start = time.perf_counter()
    teacher, losses = train_vision(config, images, log)
    seconds = time.perf_counter() - start
    report = {"steps": cfg.steps, "batch_size": cfg.batch_size, "seconds": seconds, "losses": losses}
    report["images"], report["skipped_images"] = len(images), skipped
    if cfg.get("probe_images"):
        report["shape_probe"] = shape_probe.compare(
            {"pretrained": teacher.backbone, "random_init": new_learner(config).backbone},
            num_images=cfg.probe_images,
            image_size=tower.image_size,
            seed=cfg.seed,
        )
    hf_export.save_hf_dinov2(teacher.backbone, out_dir, mask_token=np.asarray(teacher.mask_token[...]))
    with open(os.path.join(out_dir, REPORT), "w") as f:
        json.dump(report, f, indent=2)
    probe = report.get("shape_probe")
    summary = (
        f", shape probe {probe['pretrained']['accuracy']:.3f} (random init {probe['random_init']['accuracy']:.3f}, "
        f"majority {probe['pretrained']['majority']:.3f})"
        if probe
        else ""
    )
    log(f"stage 0 (vision tower): saved to {out_dir} ({seconds:.0f}s{summary})")
    return out_dir
