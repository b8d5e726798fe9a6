"""`config.evals` → evaluators, and running the ones that are due."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import ml_collections

from lexvla_jax.evaluate.base import EvalConfigError, Evaluator, entry_settings
from lexvla_jax.evaluate.classification import ClassificationEvaluator
from lexvla_jax.evaluate.patchdis import PatchDisEvaluator
from lexvla_jax.evaluate.retrieval import RetrievalEvaluator

EVALUATOR_TYPES: dict[str, type[Evaluator]] = {
    cls.type: cls for cls in (RetrievalEvaluator, PatchDisEvaluator, ClassificationEvaluator)
}


def build_evaluators(config: ml_collections.ConfigDict, periodic_only: bool = False) -> list[Evaluator]:
    """One evaluator per `config.evals` entry, in name order, each with its data loaded; `periodic_only`: only
    those that run during training (`every_steps > 0`), for a run that evaluates nothing at its end."""
    entries = config.get("evals") or {}
    evaluators = []
    for name in sorted(entries):
        entry = entries[name]
        if not isinstance(entry, (dict, ml_collections.ConfigDict)):
            raise EvalConfigError(f"config.evals.{name} must be a dict(type=..., ...), got {type(entry).__name__}")
        entry = entry.to_dict() if isinstance(entry, ml_collections.ConfigDict) else dict(entry)
        kind = entry.get("type", "")
        if kind not in EVALUATOR_TYPES:
            raise EvalConfigError(
                f"config.evals.{name}.type={kind!r} is not an evaluator type; use one of {', '.join(EVALUATOR_TYPES)}"
            )
        cls = EVALUATOR_TYPES[kind]
        settings = entry_settings(name, entry, cls)
        if periodic_only and int(settings["every_steps"]) <= 0:
            continue
        evaluators.append(cls(name, settings, config.data))
    return evaluators


def run_evaluators(
    evaluators: Sequence[Evaluator], encoder, step: int | None = None, log: Callable[[str], None] | None = None
) -> dict[str, float]:
    """Runs every evaluator (or, with `step`, those due at it); their metrics and `<name>/seconds`."""
    metrics = {}
    for evaluator in evaluators:
        if step is not None and not evaluator.due(step):
            continue
        start = time.perf_counter()
        metrics.update(evaluator.run(encoder))
        seconds = time.perf_counter() - start
        metrics[f"{evaluator.name}/seconds"] = seconds
        if log is not None:
            log(f"evaluated {evaluator.name} ({evaluator.type}) in {seconds:.1f}s")
    return metrics
