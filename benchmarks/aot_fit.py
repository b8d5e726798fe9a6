"""Largest global batch of the paper config's train step per TPU topology, compiled ahead of time.

For each topology: compile at a probe batch, extrapolate the batch at which the per-device memory reaches
the HBM (arguments hardly depend on the batch; temporaries grow about linearly with it), verify it with a
compile and refine by linear interpolation / bisection between the largest fitting and the smallest
failing batch until they are within `--tolerance` (or `--max-compiles` is spent). Then, unless the paper's
global batch already fits, pick the fewest GradCache micro-batches that bring the per-pass batch under
the largest fitting one and verify the paper batch with them (GradCache keeps the whole batch as
negatives; activation memory scales with batch / micro_batches).

  JAX_PLATFORMS=cpu python benchmarks/aot_fit.py [--topologies v5p:2x2x1 v4:2x2x1 v5e:4x4 v6e:2x2x1] \\
      [--config configs/lexvla_cc12m.py] [--config.x=y ...] [--markdown BENCHMARKS.md] [--json out.json]

Every compile is minutes of CPU for the 7B config; the log line of each is printed as it finishes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys

from lexvla_jax import aot, configlib, sharding

GIB = aot.GIB
HEADING = "## Ahead-of-time TPU compiles (paper config)"


def topology_candidates(name: str) -> list[str]:
    """`name`, then its nearest spellings (`v6e:2x2x1` ↔ `v6e:2x2`)."""
    generation, _, dims = name.partition(":")
    parts = dims.split("x")
    near = []
    if len(parts) == 3 and parts[-1] == "1":
        near.append(f"{generation}:{parts[0]}x{parts[1]}")
    if len(parts) == 2:
        near.append(f"{generation}:{dims}x1")
    return [name, *near]


def resolve_topology(name: str):
    """(the name that libtpu accepts, its devices); says so when a nearby name stood in."""
    for candidate in topology_candidates(name):
        try:
            devices = aot.topology_devices(candidate)
        except SystemExit:
            continue
        if candidate != name:
            print(f"# topology {name!r} unavailable; using nearest valid {candidate!r}", flush=True)
        return candidate, devices
    raise SystemExit(f"aot_fit: topology {name!r} unavailable (tried {', '.join(topology_candidates(name))})")


@dataclasses.dataclass
class Fit:
    """The search's results for one topology."""

    requested: str
    topology: str
    data_parallel: int
    reports: list[aot.CompileReport] = dataclasses.field(default_factory=list)
    micro: dict[int, aot.CompileReport] = dataclasses.field(default_factory=dict)  # paper batch, by micro-batches

    def at_micro1(self, fitting: bool) -> list[aot.CompileReport]:
        return [r for r in self.reports if r.fits == fitting]

    @property
    def largest(self) -> aot.CompileReport | None:
        fitting = self.at_micro1(True)
        return max(fitting, key=lambda r: r.global_batch) if fitting else None

    @property
    def smallest_failing(self) -> aot.CompileReport | None:
        failing = self.at_micro1(False)
        return min(failing, key=lambda r: r.global_batch) if failing else None

    def micro_for(self, paper_batch: int) -> int | None:
        if self.largest and self.largest.global_batch >= paper_batch:
            return 1
        fitting = [m for m, r in self.micro.items() if r.fits]
        return min(fitting) if fitting else None


class Compiler:
    """Compiles the configured step at a given global batch and micro-batch count on one topology."""

    def __init__(self, spec: str, overrides: list[str], topology: str, devices):
        self.spec, self.overrides, self.topology, self.devices = spec, overrides, topology, devices
        self.count = 0

    def config(self, batch: int | None = None, micro: int | None = None):
        extra = [f"train.global_batch_size={batch}"] if batch else []
        extra += [f"train.micro_batches={micro}"] if micro else []
        return configlib.load_config(self.spec, [*self.overrides, *extra])

    def __call__(self, batch: int, micro: int = 1) -> aot.CompileReport:
        report = aot.compile_train_step(self.config(batch, micro), self.devices, self.topology)
        self.count += 1
        used = "compiler OOM" if report.oom else f"{report.used_bytes / GIB:.2f} GiB"
        print(
            f"# {self.topology} batch {batch} micro {micro}: args {report.argument_bytes / GIB:.2f} GiB, "
            f"temp {report.temp_bytes / GIB:.2f} GiB, used {used} of {report.hbm_bytes / GIB:.2f} GiB "
            f"({'fits' if report.fits else 'does not fit'}), {report.compile_seconds:.0f} s",
            flush=True,
        )
        return report


def boundary_estimate(reports: list[aot.CompileReport], hbm: int) -> float:
    """The batch at which the used bytes reach `hbm`, from a line through the two compiles nearest to it.

    With one compile the line assumes all of its temporaries scale with the batch (an underestimate of
    the largest batch when part of them does not).
    """
    measured = sorted((r for r in reports if not r.oom), key=lambda r: abs(r.used_bytes - hbm))[:2]
    if not measured:
        return math.nan
    if len(measured) == 1 or measured[0].global_batch == measured[1].global_batch:
        r = measured[0]
        slope, fixed = r.temp_bytes / r.global_batch, r.used_bytes - r.temp_bytes
    else:
        a, b = measured
        slope = (a.used_bytes - b.used_bytes) / (a.global_batch - b.global_batch)
        fixed = a.used_bytes - slope * a.global_batch
    return (hbm - fixed) / slope if slope > 0 else math.inf


def search_largest_batch(
    fit: Fit, compile_at: Compiler, probe: int, tolerance: float, max_compiles: int, margin: float = 0.97
) -> None:
    """Fills `fit.reports` with compiles at micro_batches=1 bracketing the largest fitting global batch."""
    dp = fit.data_parallel
    round_down = lambda b: max(dp, int(b) // dp * dp)
    report = compile_at(round_down(probe))
    fit.reports.append(report)
    while not report.fits and report.global_batch > dp and compile_at.count < max_compiles:
        report = compile_at(round_down(report.global_batch // 2))
        fit.reports.append(report)
    while fit.largest and compile_at.count < max_compiles:
        lo = fit.largest.global_batch
        hi = fit.smallest_failing.global_batch if fit.smallest_failing else math.inf
        if hi - lo <= max(dp, tolerance * lo):
            return
        estimate = boundary_estimate(fit.reports, fit.largest.hbm_bytes)
        if not math.isfinite(estimate):
            estimate = 2 * lo if hi == math.inf else (lo + hi) / 2
        if estimate <= lo * (1 + tolerance) and hi == math.inf:
            return  # the line says the boundary is within tolerance above the largest fitting batch
        aim = margin * estimate  # a little under the line, so the verifying compile is likely to fit
        candidate = round_down(min(aim, hi - dp))
        if candidate <= lo:
            candidate = round_down((lo + hi) / 2) if hi < math.inf else 2 * lo
        if candidate <= lo or candidate >= hi:
            return
        fit.reports.append(compile_at(candidate))


def search_micro_batches(fit: Fit, compile_at: Compiler, paper_batch: int, max_tries: int) -> None:
    """Compiles the paper batch with the fewest micro-batches the largest fitting batch suggests."""
    largest = fit.largest
    if largest is None or largest.global_batch >= paper_batch:
        return
    valid = [m for m in range(2, paper_batch // fit.data_parallel + 1) if paper_batch % (fit.data_parallel * m) == 0]
    enough = [m for m in valid if paper_batch / m <= largest.global_batch]
    for micro in enough[:max_tries]:
        fit.micro[micro] = compile_at(paper_batch, micro)
        if fit.micro[micro].fits:
            return


def fit_topology(name: str, args, spec: str, overrides: list[str]) -> Fit:
    topology, devices = resolve_topology(name)
    compile_at = Compiler(spec, overrides, topology, devices)
    config = compile_at.config()
    mesh, rules = sharding.mesh_and_rules(config, devices)
    dp = sharding.data_parallel_size(mesh, rules)
    fit = Fit(requested=name, topology=topology, data_parallel=dp)
    search_largest_batch(fit, compile_at, args.probe_per_device * dp, args.tolerance, args.max_compiles)
    search_micro_batches(fit, compile_at, args.paper_batch, args.micro_tries)
    return fit


def table_header(paper_batch: int) -> list[str]:
    return [
        f"| topology | devices | HBM/device | arguments/device | temp at largest batch | largest global batch "
        f"(micro 1) | smallest failing | micro-batches for {paper_batch} | used at {paper_batch} | "
        f"FLOPs/step/device at largest (XLA) | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]


def table_row(fit: Fit, paper_batch: int) -> str:
    largest, failing = fit.largest, fit.smallest_failing
    any_report = largest or fit.reports[0]
    gib = lambda b: f"{b / GIB:.2f} GiB"
    name = fit.topology if fit.topology == fit.requested else f"{fit.topology} (for {fit.requested})"
    micro = fit.micro_for(paper_batch)
    if micro is None:
        micro_text, used_text = "none tried fits", "—"
    elif micro == 1:
        micro_text, used_text = "1", "≤ " + (f"{largest.used_bytes / largest.hbm_bytes:.0%}")
    else:
        r = fit.micro[micro]
        micro_text, used_text = str(micro), f"{gib(r.used_bytes)} ({r.used_bytes / r.hbm_bytes:.0%})"
    failing_text = "—" if failing is None else (f"{failing.global_batch}" + (" (OOM)" if failing.oom else ""))
    if largest is None:
        return (
            f"| {name} | {any_report.num_devices} | {gib(any_report.hbm_bytes)} | {gib(any_report.argument_bytes)} "
            f"| — | none | {failing_text} | {micro_text} | {used_text} | — | — |"
        )
    return (
        f"| {name} | {largest.num_devices} | {gib(largest.hbm_bytes)} | {gib(largest.argument_bytes)} "
        f"| {gib(largest.temp_bytes)} | **{largest.global_batch}** | {failing_text} | {micro_text} | {used_text} "
        f"| {largest.matmul_flops:.3e} ({largest.flops:.2e}) | {largest.compile_seconds:.0f} |"
    )


def markdown_block(fits: list[Fit], paper_batch: int, command: str, heading: bool) -> str:
    today = datetime.date.today().isoformat()
    lines = [HEADING, ""] if heading else []
    lines += [f"Measured {today}:", "", "```", command, "```", ""]
    lines += table_header(paper_batch) + [table_row(f, paper_batch) for f in fits]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    spec, overrides, rest = configlib.split_config_args(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topologies", nargs="+", default=["v5p:2x2x1", "v4:2x2x1", "v5e:4x4", "v6e:2x2x1"])
    parser.add_argument("--paper-batch", type=int, default=0, help="global batch to fit (default: the config's)")
    parser.add_argument("--probe-per-device", type=int, default=16, help="first compile's batch per data shard")
    parser.add_argument("--tolerance", type=float, default=0.1, help="stop when the bracket is this tight")
    parser.add_argument("--max-compiles", type=int, default=4, help="compiles per topology for the batch search")
    parser.add_argument("--micro-tries", type=int, default=2, help="compiles per topology for the micro-batches")
    parser.add_argument("--markdown", default="", help="append the table to this file (e.g. BENCHMARKS.md)")
    parser.add_argument("--json", default="", help="write every compile report to this file")
    args = parser.parse_args(rest)
    spec = spec or "configs/lexvla_cc12m.py"
    args.paper_batch = args.paper_batch or configlib.load_config(spec, overrides).train.global_batch_size

    fits = []
    print("\n".join(table_header(args.paper_batch)), flush=True)
    for name in args.topologies:
        try:
            fits.append(fit_topology(name, args, spec, overrides))
        except SystemExit as e:  # an unavailable topology: report it and go on with the others
            print(f"# {e}", flush=True)
            continue
        print(table_row(fits[-1], args.paper_batch), flush=True)
    print("\n".join(table_header(args.paper_batch) + [table_row(f, args.paper_batch) for f in fits]))

    if args.json:
        records = [
            dict(vars(r), requested=f.requested, data_parallel=f.data_parallel, micro_batches=m)
            for f in fits
            for m, r in [(1, r) for r in f.reports] + sorted(f.micro.items())
        ]
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)
    if args.markdown:
        command = "JAX_PLATFORMS=cpu python benchmarks/aot_fit.py " + " ".join(argv)
        with open(args.markdown) as fh:
            has_heading = HEADING in fh.read()
        with open(args.markdown, "a") as fh:
            fh.write("\n" + markdown_block(fits, args.paper_batch, command.strip(), heading=not has_heading))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
