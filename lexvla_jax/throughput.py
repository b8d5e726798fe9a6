"""Training speed: step time, samples/s, model TFLOP/s and MFU per device, input wait; a profiler window.

MFU is the step's model FLOPs (matmuls and convolutions of the jitted step, `matmul_flops`, per
device) per second over the device's peak dense bf16 FLOP/s:

| device (JAX `device_kind`)     | peak TFLOP/s | source                                  |
|--------------------------------|-------------:|-----------------------------------------|
| TPU v4                         |          275 | Cloud TPU docs, per chip                |
| TPU v5e (`TPU v5 lite`)        |          197 | Cloud TPU docs, per chip                |
| TPU v5p (`TPU v5`)             |          459 | Cloud TPU docs, per chip                |
| TPU v6e (`TPU v6 lite`)        |          918 | Cloud TPU docs, per chip                |
| NVIDIA A100 (SXM and PCIe)     |          312 | A100 datasheet, dense (624 is sparse)   |
| NVIDIA H100 SXM / H200         |          989 | H100 datasheet, dense (1979 is sparse)  |
| NVIDIA H100 PCIe               |          756 | H100 datasheet, dense                   |

A JAX device on v4 and v5p is a whole chip (two TensorCores as one "megacore" device); when each
TensorCore is its own device (`core_on_chip` takes two values), each gets half the chip's peak. On CPU
the peak is measured: a jitted float32 matmul on this host, shared by its local devices.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp

TERA = 1e12

# (substring of `device_kind`, peak dense bf16 FLOP/s per chip); first match wins, so specific names first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v4", 275 * TERA),
    ("TPU v5 lite", 197 * TERA),
    ("TPU v5e", 197 * TERA),
    ("TPU v5p", 459 * TERA),
    ("TPU v5", 459 * TERA),
    ("TPU v6 lite", 918 * TERA),
    ("TPU v6e", 918 * TERA),
    ("A100", 312 * TERA),
    ("H100 PCIe", 756 * TERA),
    ("H100", 989 * TERA),
    ("H200", 989 * TERA),
)


def matmul_flops(jaxpr, platform: str | None = None) -> float:
    """FLOPs of the `dot_general`s and convolutions in a (closed) jaxpr, scan bodies times their length.

    Nested jaxprs (jit, remat, custom derivatives, scan, while) are walked; a `while` body counts once
    and a `cond` counts its most expensive branch, except a `jax.lax.platform_dependent` one when
    `platform` ("tpu", "cpu", "gpu") is given: that counts the branch compiled for `platform`.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    count = functools.partial(matmul_flops, platform=platform)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
            rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
            total += 2.0 * math.prod(lhs) * math.prod(rhs_free)
        elif name == "conv_general_dilated":
            out, kernel = eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape
            out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * math.prod(out) * math.prod(kernel) / out_features
        elif name == "cond" and platform and eqn.params.get("branches_platforms"):
            total += count(_platform_branch(eqn.params, platform))
        elif name == "cond":
            total += max(count(branch) for branch in eqn.params["branches"])
        else:
            inner = sum(count(v) for v in eqn.params.values() if hasattr(v, "eqns") or hasattr(v, "jaxpr"))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def _platform_branch(params, platform: str):
    """The branch of a `platform_dependent` cond that `platform` runs (the default branch has platforms None)."""
    for branch, platforms in zip(params["branches"], params["branches_platforms"], strict=True):
        if platforms is None or platform in platforms:
            return branch
    raise ValueError(f"platform_dependent has no branch for platform {platform!r}")


def chip_peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one chip of `device_kind`; None when the table does not know it."""
    for pattern, peak in PEAK_BF16_FLOPS:
        if pattern in device_kind:
            return peak
    return None


@functools.cache
def measured_cpu_flops(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of this host's fastest jitted `size × size` float32 matmul on the first CPU device (cached)."""
    device = jax.devices("cpu")[0]
    x = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_flops_per_device(devices: Sequence[jax.Device] | None = None) -> float | None:
    """Peak FLOP/s of one of `devices` (default: this process's local devices); None if unknown."""
    devices = list(devices if devices is not None else jax.local_devices())
    first = devices[0]
    if first.platform == "cpu":
        return measured_cpu_flops() / len(devices)
    peak = chip_peak_flops(first.device_kind)
    if peak is None:
        return None
    cores_per_chip = len({getattr(d, "core_on_chip", 0) for d in devices})
    return peak / cores_per_chip


class StepMeter:
    """Throughput over each logging interval, excluding paused time (evaluation, checkpoints).

    Per step call `step_done()`; wrap fetching the next batch in `with meter.waiting_for_input():` and
    evaluation or checkpointing in `with meter.paused():`; `report()` returns the interval's numbers
    and starts the next interval. Steps are dispatched asynchronously, so call `report()` after
    something that waits for the device (e.g. reading the step's metrics); then the interval's wall
    time covers the device work of its steps. `restart()` drops what was counted (e.g. the first,
    compiling step).
    """

    def __init__(
        self,
        *,
        global_batch: int,
        num_devices: int,
        flops_per_step_per_device: float,
        peak_flops_per_device: float | None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.global_batch = global_batch
        self.num_devices = num_devices
        self.flops_per_step_per_device = flops_per_step_per_device
        self.peak_flops_per_device = peak_flops_per_device
        self._clock = clock
        self.restart()

    def restart(self) -> None:
        """Starts a fresh interval now."""
        self._start = self._clock()
        self._steps = 0
        self._paused_s = 0.0
        self._input_s = 0.0
        self._paused_at: float | None = None

    def step_done(self) -> None:
        self._steps += 1

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = self._clock()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._paused_s += self._clock() - self._paused_at
            self._paused_at = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside is not part of the interval."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    @contextlib.contextmanager
    def waiting_for_input(self) -> Iterator[None]:
        """Time inside counts as waiting for the input pipeline."""
        start = self._clock()
        try:
            yield
        finally:
            self._input_s += self._clock() - start

    def report(self) -> dict[str, float]:
        """The interval's step_time_s, samples_per_s(_per_device), tflops_per_device, mfu, input_wait_fraction."""
        self.resume()
        active = self._clock() - self._start - self._paused_s
        steps, input_s = self._steps, self._input_s
        self.restart()
        if steps == 0 or active <= 0:
            return {}
        samples_per_s = steps * self.global_batch / active
        flops_per_s = steps * self.flops_per_step_per_device / active
        peak = self.peak_flops_per_device
        return {
            "step_time_s": active / steps,
            "samples_per_s": samples_per_s,
            "samples_per_s_per_device": samples_per_s / self.num_devices,
            "tflops_per_device": flops_per_s / TERA,
            "mfu": flops_per_s / peak if peak else math.nan,
            "input_wait_fraction": input_s / active,
        }


class Profiler:
    """A `jax.profiler` trace of steps `start` (inclusive) to `stop` (exclusive), written under `logdir`.

    Call `before_step(step)` as each step begins (a resumed run that starts inside the window traces
    from its first step) and `close()` at the end. Pass the previous step's outputs as `pending` so the
    trace ends after their device work, not at their dispatch. TensorBoard's profile plugin reads
    `logdir/plugins/profile/<run>/*.xplane.pb`.
    """

    def __init__(self, logdir: str, steps: Sequence[int] | None):
        self.logdir = logdir
        self.window = None
        if steps:
            if len(steps) != 2 or not 0 <= steps[0] < steps[1]:
                raise ValueError(f"profile_steps={tuple(steps)}: give (start, stop) with 0 <= start < stop")
            self.window = (int(steps[0]), int(steps[1]))
        self.active = False
        self.done = False

    def before_step(self, step: int, pending=None) -> None:
        if self.window is None or self.done:
            return
        start, stop = self.window
        if not self.active and start <= step < stop:
            jax.profiler.start_trace(self.logdir)
            self.active = True
        elif self.active and step >= stop:
            self.close(pending)

    def close(self, pending=None) -> None:
        if self.active:
            if pending is not None:
                jax.block_until_ready(pending)
            jax.profiler.stop_trace()
            self.active = False
            self.done = True
