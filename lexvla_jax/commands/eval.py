"""Runs every evaluator of config.evals on a trained checkpoint, prints tables, writes DIR/eval/step_<N>.json.

Tables: retrieval as the paper's Table 1, PatchDis as its Table 2 (per-image mIoU first), zero-shot classification.

`lexvla eval --config CFG --workdir DIR [--step N] [--config.x=y ...]` restores the latest checkpoint
(or step N) onto the config's mesh.

The evaluators' data is read first, so a bad path fails before the model loads. Run as several processes
like `lexvla train`; every process reads the data and encodes its share, process 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json

import jax
from etils import epath

from lexvla_jax import configlib, inference
from lexvla_jax.evaluate import registry, table
from lexvla_jax.evaluate.base import EvalConfigError, Evaluator


def _metrics_of(name: str, metrics: dict[str, float]) -> dict[str, float]:
    return {key.removeprefix(f"{name}/"): value for key, value in metrics.items() if key.startswith(f"{name}/")}


def write_results(workdir: str, step: int, evaluators: list[Evaluator], metrics: dict[str, float]) -> epath.Path:
    """`<workdir>/eval/step_<step>.json`: the step, every evaluator's settings, the flat metrics and, under
    `results`, each dataset's metrics by its entry's name."""
    path = epath.Path(workdir) / "eval" / f"step_{step}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "step": step,
        "workdir": str(workdir),
        "evals": {e.name: {"type": e.type, **e.settings} for e in evaluators},
        "metrics": metrics,
        "results": {e.name: _metrics_of(e.name, metrics) for e in evaluators},
    }
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lexvla eval", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the training run's folder (any etils.epath path)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    config, args = configlib.parse_command(argv, parser)
    evaluators = registry.build_evaluators(config)
    if not evaluators:
        raise EvalConfigError(
            "config.evals declares no evaluators; add e.g. config.evals.coco = dict(type='retrieval', ...)"
        )
    encoder, step = inference.restore(config, args.workdir, args.step)
    lead = jax.process_index() == 0
    metrics = registry.run_evaluators(evaluators, encoder, log=print if lead else None)
    if lead:
        print(table.format_results(evaluators, metrics))
        print(f"wrote {write_results(args.workdir, step, evaluators, metrics)}")
    return 0
