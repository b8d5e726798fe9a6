"""The evaluator interface: one entry of `config.evals`, its data loaded once, run on any lexical encoder.

An entry is `config.evals.<name> = dict(type=..., every_steps=..., <fields>)` (big_vision's pattern).
Fields every type has:
- `every_steps`: run every that many training steps (0: only at the end of training and in `lexvla eval`);
- `label`: the name printed in tables (default: the entry's name);
- `max_images`: read only the first that many images (None: all).
The rest are the type's own (`Evaluator.defaults`); a field the type does not know is an error.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

from lexvla_jax.configlib import ConfigError
from lexvla_jax.data.config import check_eval_transform

COMMON_DEFAULTS: dict[str, Any] = {"every_steps": 0, "label": "", "max_images": None}


class EvalConfigError(ConfigError):
    """An evaluator entry that cannot work; the message (one line) names the field and the fix."""


class Evaluator(abc.ABC):
    """Constructed once per run (every process loads the same data); `run` encodes with the given encoder.

    `run(encoder) -> {f"{name}/{metric}": float}`: the entry's name prefixes every metric key.
    """

    type: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]

    def __init__(self, name: str, settings: Mapping[str, Any], data_config):
        self.name = name
        self.settings = dict(settings)
        self.every_steps = int(settings["every_steps"])
        self.label = settings["label"] or name
        self.where = f"config.evals.{name}"
        if self.every_steps < 0:
            raise EvalConfigError(f"{self.where}.every_steps={self.every_steps} must be >= 0 (0: only at the end)")
        check_eval_transform(data_config)
        self.data_config = data_config

    def due(self, step: int) -> bool:
        """Whether a training run evaluates at `step` (the end of training is the caller's decision)."""
        return self.every_steps > 0 and step % self.every_steps == 0

    @abc.abstractmethod
    def run(self, encoder) -> dict[str, float]:
        """Metrics of `encoder` (a `LexicalEncoder`) on this evaluator's data, keys prefixed by the name."""

    def prefixed(self, metrics: Mapping[str, float]) -> dict[str, float]:
        return {f"{self.name}/{key}": float(value) for key, value in metrics.items()}

    def check_image_size(self, encoder, image_size: int) -> None:
        if encoder.image_size != image_size:
            raise EvalConfigError(
                f"{self.where}: images were read at config.data.image_size={image_size} but the model takes "
                f"{encoder.image_size}; set config.data.image_size={encoder.image_size}"
            )


def entry_settings(name: str, entry: Mapping[str, Any], cls: type[Evaluator]) -> dict[str, Any]:
    """The entry's fields over the common and the type's defaults; unknown fields are an error."""
    known = {"type", *COMMON_DEFAULTS, *cls.defaults}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise EvalConfigError(
            f"config.evals.{name}: {', '.join(unknown)} not a field of type {cls.type!r}; "
            f"its fields are {', '.join(sorted(known))}"
        )
    return {**COMMON_DEFAULTS, **cls.defaults, **{k: v for k, v in entry.items() if k != "type"}}
