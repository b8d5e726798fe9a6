"""Step metrics with a fake clock, peak FLOP/s per device, and the profiler's trace file."""

import math
import types

import jax
import jax.numpy as jnp
import pytest

from lexvla_jax import throughput


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def make_meter(clock, peak=1e12):
    return throughput.StepMeter(
        global_batch=64, num_devices=8, flops_per_step_per_device=2e12, peak_flops_per_device=peak, clock=clock
    )


def test_meter_reports_an_interval_excluding_pauses():
    clock = FakeClock()
    meter = make_meter(clock)
    for _ in range(4):  # 4 steps of 0.5 s, of which 0.1 s waiting for the next batch
        with meter.waiting_for_input():
            clock.advance(0.1)
        clock.advance(0.4)
        meter.step_done()
    with meter.paused():  # an evaluation: 30 s that must not count
        clock.advance(30.0)
    meter.pause()  # a checkpoint through pause/resume: 5 s more
    clock.advance(5.0)
    meter.resume()
    report = meter.report()
    assert report == pytest.approx(
        {
            "step_time_s": 0.5,
            "samples_per_s": 4 * 64 / 2.0,
            "samples_per_s_per_device": 4 * 64 / 2.0 / 8,
            "tflops_per_device": 4 * 2.0 / 2.0,
            "mfu": 4.0,  # 4 TFLOP/s against a 1 TFLOP/s peak
            "input_wait_fraction": 0.2,
        }
    )


def test_each_report_starts_a_new_interval():
    clock = FakeClock()
    meter = make_meter(clock)
    clock.advance(10.0)  # e.g. compiling the first step ...
    meter.step_done()
    meter.restart()  # ... dropped
    for _ in range(2):
        clock.advance(1.0)
        meter.step_done()
    assert meter.report()["step_time_s"] == pytest.approx(1.0)
    clock.advance(3.0)
    meter.step_done()
    assert meter.report()["step_time_s"] == pytest.approx(3.0)
    assert meter.report() == {}  # no steps since the last report


def test_report_while_paused_ends_the_pause():
    clock = FakeClock()
    meter = make_meter(clock, peak=None)
    clock.advance(2.0)
    meter.step_done()
    meter.pause()
    clock.advance(7.0)
    report = meter.report()
    assert report["step_time_s"] == pytest.approx(2.0) and math.isnan(report["mfu"])


@pytest.mark.parametrize(
    ("kind", "tflops"),
    [
        ("TPU v4", 275),
        ("TPU v5 lite", 197),
        ("TPU v5", 459),
        ("TPU v5p", 459),
        ("TPU v6 lite", 918),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("Some Accelerator", None),
    ],
)
def test_chip_peak_flops(kind, tflops):
    peak = throughput.chip_peak_flops(kind)
    assert (peak is None) if tflops is None else peak == tflops * 1e12


def fake_device(kind, core=0, platform="tpu"):
    return types.SimpleNamespace(device_kind=kind, core_on_chip=core, platform=platform)


def test_peak_per_device_megacore_and_per_core():
    megacore = [fake_device("TPU v4") for _ in range(4)]
    assert throughput.peak_flops_per_device(megacore) == 275e12
    per_core = [fake_device("TPU v4", core) for _ in range(2) for core in (0, 1)]
    assert throughput.peak_flops_per_device(per_core) == 275e12 / 2
    assert throughput.peak_flops_per_device([fake_device("Mystery")]) is None


def test_cpu_peak_is_measured_once_and_shared_by_local_devices():
    measured = throughput.measured_cpu_flops()
    assert measured == throughput.measured_cpu_flops()  # cached
    assert 1e8 < measured < 1e13  # a plausible CPU: 0.1 GFLOP/s .. 10 TFLOP/s
    devices = jax.local_devices()
    assert throughput.peak_flops_per_device(devices) == pytest.approx(measured / len(devices))


def test_profiler_writes_a_trace_for_its_window(tmp_path):
    profiler = throughput.Profiler(str(tmp_path), (2, 4))
    f = jax.jit(lambda x: jnp.tanh(x @ x))
    x = jnp.ones((64, 64))
    for step in range(6):
        profiler.before_step(step, pending=x)
        if step == 2:
            assert profiler.active
        x = f(x)
    assert profiler.done and not profiler.active
    profiler.close()  # idempotent
    traces = list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_profiler_disabled_and_bad_window(tmp_path):
    profiler = throughput.Profiler(str(tmp_path), None)
    profiler.before_step(0)
    profiler.close()
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"profile_steps=\(5, 5\)"):
        throughput.Profiler(str(tmp_path), (5, 5))


def test_matmul_flops_counts_scan_iterations_and_rematerialised_backward():
    def loss(w, x):
        step = lambda c, wi: (jax.checkpoint(lambda c: jnp.tanh(c @ wi))(c), None)
        return jax.lax.scan(step, x, w)[0].sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss))(jnp.ones((5, 16, 16)), jnp.ones((8, 16)))
    # Per layer: forward, recomputed forward, and the two products of the backward pass.
    assert throughput.matmul_flops(jaxpr) == 5 * 4 * (2 * 8 * 16 * 16)


def test_matmul_flops_counts_grouped_convolutions():
    image, kernel = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 2, 16))  # 2 groups of 2 input features
    conv = lambda i, k: jax.lax.conv_general_dilated(
        i, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2
    )
    assert throughput.matmul_flops(jax.make_jaxpr(conv)(image, kernel)) == 2 * (8 * 8 * 16) * (3 * 3 * 2)
