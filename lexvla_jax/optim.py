"""The optimiser and its parameter groups: which parameters train, their learning rates and weight decay.

A *group* is an attribute name on a parameter's path ("adapter", "visual_codebook", "logit_scale", "vision",
"text") or "lora" for every LoRA weight. `config.train.trainable` names the groups that train;
`config.optim.lr_scales` scales a group's learning rate; `config.optim.no_decay` exempts groups from weight decay.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections
import optax
from flax import nnx

from lexvla_jax.configlib import ConfigError


def trainable_filter(groups: Sequence[str]):
    """An NNX filter selecting the trainable parameters.

    groups: attribute names of the model (e.g. "adapter", "visual_codebook", "logit_scale", "vision",
    "text") plus "lora" for every `LoRAParam`.
    """
    parts = [nnx.LoRAParam] if "lora" in groups else []
    parts += [nnx.PathContains(name) for name in groups if name != "lora"]
    if not parts:
        raise ValueError("config.train.trainable is empty: name at least one group, e.g. ('adapter', 'lora')")
    return nnx.All(nnx.Param, nnx.Any(*parts))


# The attribute holding stacked layers (`layers.stack_layers`): its parameters carry a leading layer axis.
STACKED = "layers"


def decay_mask(no_decay: Sequence[str] = ()):
    """Weight decay on matrices only (no decay on norms, biases or the logit scale), and on no parameter whose
    path names a group of `no_decay` (groups as in `trainable_filter`). A parameter is a matrix by its own
    layer's shape: a stacked `[L, D]` norm scale or bias is L vectors, not a matrix."""
    no_decay = set(no_decay)
    return lambda params: jax.tree_util.tree_map_with_path(
        lambda path, p: layer_ndim(path, p) >= 2 and not (_group_of(path) & no_decay), params
    )


def layer_ndim(path, p) -> int:
    """Dimensions of one layer's copy of `p`: the stacked layer axis (`STACKED` on the path) not counted."""
    return p.ndim - (STACKED in _group_of(path))


def _group_of(path) -> set[str]:
    """The names along a parameter's path, with "lora" for a LoRA weight (`lora_a`, `lora_b`)."""
    names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    return names | ({"lora"} if names & {"lora_a", "lora_b"} else set())


def groups_of(state: nnx.State) -> set[str]:
    """Every group name (as `_group_of`) that some parameter of `state` is in."""
    return set().union(*(_group_of(path) for path, _ in nnx.to_flat_state(state)))


def scale_by_group(lr_scales: dict[str, float]) -> optax.GradientTransformation:
    """Multiplies the update of every parameter whose path names a group of `lr_scales` by that group's scale
    (groups as in `trainable_filter`: "lora" or a name on the path; the first listed group that matches wins):
    a per-group learning rate, weight decay included."""
    lr_scales = dict(lr_scales)

    def scale_of(path) -> float:
        names = _group_of(path)
        return next((float(v) for k, v in lr_scales.items() if k in names), 1.0)

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(lambda path, u: u * scale_of(path), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(opt_config, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warm-up + cosine decay and global-norm clipping, from `config.optim`; `optim.lr_scales`
    (optional, e.g. `{"lora": 0.1}`) scales the learning rate of parameter groups, `optim.no_decay` (optional,
    e.g. `("visual_codebook",)`) names groups without weight decay."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt_config.learning_rate,
        warmup_steps=opt_config.warmup_steps,
        decay_steps=max(num_steps, opt_config.warmup_steps + 1),
        end_value=opt_config.learning_rate * opt_config.end_lr_fraction,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(opt_config.grad_clip_norm),
        optax.adamw(
            schedule,
            b1=opt_config.b1,
            b2=opt_config.b2,
            weight_decay=opt_config.weight_decay,
            mask=decay_mask(opt_config.get("no_decay") or ()),
        ),
    )
    lr_scales = opt_config.get("lr_scales") or {}
    if lr_scales:
        tx = optax.chain(tx, scale_by_group(lr_scales))
    return tx, schedule


def check_groups(config: ml_collections.ConfigDict, groups: set[str]) -> None:
    """Every group named by `train.trainable`, `optim.lr_scales` or `optim.no_decay` is on the path of some
    parameter of the model (`groups`): a misspelt group would otherwise do nothing."""
    named = [("config.train.trainable", g) for g in config.train.trainable]
    named += [("config.optim.lr_scales", g) for g in config.optim.get("lr_scales") or {}]
    named += [("config.optim.no_decay", g) for g in config.optim.get("no_decay") or ()]
    for field, group in named:
        if group not in groups:
            raise ConfigError(
                f"{field} names {group!r}, which is on the path of no parameter of this model; check the "
                "spelling (groups are attribute names such as 'adapter', 'visual_codebook', 'vision', or 'lora')"
            )
