"""`lexvla goodput --workdir DIR`: what the run's wall time went to, over every start of the workdir (`goodput.py`)."""

from __future__ import annotations

import argparse
import json

from lexvla_jax import goodput
from lexvla_jax.configlib import ConfigError
from lexvla_jax.metric_writers import format_duration


def totals(workdir: str) -> dict:
    """`goodput.summarize` of `workdir`'s starts; a one-line error when it has none."""
    runs = goodput.read_runs(workdir)
    if not runs:
        raise ConfigError(f"no {goodput.FILE} in {workdir}; pass the --workdir of a `lexvla train` run")
    return goodput.summarize(runs)


def report(workdir: str) -> str:
    """The goodput table of `workdir` (local or remote)."""
    total = totals(workdir)
    lines = [
        f"{workdir}: {total['runs']} start(s), {total['restores']} resumed from a checkpoint, "
        f"last step {total['last_step']}, wall time {format_duration(total['wall_seconds'])}",
        f"goodput {100 * total['fractions']['productive']:.1f}% (productive steps)",
        "badput by cause:",
    ]
    for cause in goodput.CAUSES[1:]:
        note = f"  ({total['redone_steps']} steps)" if cause == "redone" else ""
        lines.append(f"  {cause:<11} {total['seconds'][cause]:10.1f} s  {100 * total['fractions'][cause]:5.1f}%{note}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lexvla goodput", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the training run's directory (local or gs://)")
    parser.add_argument("--json", action="store_true", help="print the totals as one JSON object")
    args = parser.parse_args(argv)
    print(json.dumps(totals(args.workdir)) if args.json else report(args.workdir))
    return 0
