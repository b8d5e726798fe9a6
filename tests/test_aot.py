"""`lexvla compile`: ahead-of-time TPU compiles of the train step (needs libtpu; skipped without it)."""

import numpy as np
import pytest

pytest.importorskip("libtpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from lexvla_jax import aot, build, configlib, throughput  # noqa: E402
from lexvla_jax.commands import compile as compile_command
from lexvla_jax.models import clip

TOPOLOGY = "v5p:2x2x1"
# The tiny config without its tokenizer file: shapes come from these fields.
TINY = ["--config", "configs/tiny.py:scratch", "--config.data.tokenizer=", "--config.model.vocab_size=64"]
TINY += ["--config.data.max_length=40"]


@pytest.fixture(scope="module")
def devices():
    return aot.topology_devices(TOPOLOGY)


@pytest.fixture(scope="module")
def tiny_report(devices):
    spec, overrides, _ = configlib.split_config_args([*TINY, "--config.train.global_batch_size=16"])
    return aot.compile_train_step(configlib.load_config(spec, overrides), devices, TOPOLOGY)


@pytest.mark.slow
def test_tiny_config_compiles_and_fits(tiny_report):
    r = tiny_report
    assert (r.num_devices, r.device_kind, r.global_batch) == (4, "TPU v5", 16)
    assert r.hbm_bytes == aot.HBM_BYTES["TPU v5"]
    assert r.argument_bytes > 0 and r.temp_bytes > 0 and r.output_bytes > 0
    assert 0 < r.used_bytes < r.hbm_bytes and r.fits and not r.oom
    assert r.flops > 0 and r.matmul_flops > 0 and r.compile_seconds > 0
    assert r.lines()[-1] == "fits"


@pytest.mark.slow
def test_batch_that_cannot_fit_is_reported_and_fails_the_command(capsys):
    code = compile_command.main([*TINY, "--config.train.global_batch_size=1048576", "--topology", TOPOLOGY])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert lines[-1] == "does not fit"
    assert any("RESOURCE_EXHAUSTED" in line for line in lines)


@pytest.mark.slow  # ~12 s
def test_qclip_tiny_compiles_and_fits(devices):
    """Q(CLIP) (`configs/variants/qclip.py:tiny`: a frozen CLIP tower) compiles for a TPU topology and fits."""
    shapes = ["data.tokenizer=", "model.vocab_size=64", "data.max_length=40", "train.global_batch_size=16"]
    checkpoints = ["model.vision_checkpoint=", "model.text_checkpoint="]  # no stage 0 or 1 here: shapes only
    config = configlib.load_config("configs/variants/qclip.py:tiny", [*shapes, *checkpoints])
    vision = build.vision_config(config)
    assert isinstance(vision, clip.ClipVisionConfig) and vision.family == "clip"
    assert "vision" not in config.train.trainable
    r = aot.compile_train_step(config, devices, TOPOLOGY)
    assert (r.num_devices, r.device_kind, r.global_batch) == (4, "TPU v5", 16)
    assert r.argument_bytes > 0 and r.temp_bytes > 0 and r.flops > 0 and r.matmul_flops > 0
    assert r.fits and r.lines()[-1] == "fits"


def _report(**overrides):
    fields = dict(
        topology="t",
        device_kind="TPU v5",
        num_devices=4,
        global_batch=8,
        argument_bytes=60,
        temp_bytes=30,
        output_bytes=20,
        alias_bytes=10,
        hbm_bytes=100,
        flops=1.0,
    )
    return aot.CompileReport(**{**fields, **overrides})


def test_fits_counts_arguments_temporaries_and_unaliased_outputs():
    assert _report().used_bytes == 100 and _report().fits
    assert not _report(temp_bytes=31).fits
    assert _report(temp_bytes=31, alias_bytes=11).fits
    assert not _report(oom="RESOURCE_EXHAUSTED: Ran out of memory").fits
    assert _report(temp_bytes=31).lines()[-1] == "does not fit"


def test_xla_flops_are_per_device_and_match_the_jaxpr_count_without_loops():
    x, w = jax.ShapeDtypeStruct((64, 128), jnp.float32), jnp.ones((128, 256), jnp.float32)
    total = 2 * 64 * 128 * 256
    for name in ("v5p:2x2x1", "v5p:2x2x2"):
        devs = aot.topology_devices(name)
        mesh = jax.sharding.Mesh(np.array(devs), ("batch",))
        sharded = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, PartitionSpec("batch")))
        traced = jax.jit(lambda a: a @ w).trace(sharded)
        cost = traced.lower().compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        assert cost["flops"] == pytest.approx(total / len(devs), rel=0.01)
        assert throughput.matmul_flops(traced.jaxpr) == total


@pytest.mark.slow
def test_local_compile_reports_the_same_fields_for_this_machine(capsys, tiny_report):
    """`lexvla compile --local`: the train step compiled for the local devices (8 fake CPUs here), reported line
    for line like the TPU compile of the same config."""
    code = compile_command.main([*TINY, "--config.train.global_batch_size=16", "--local"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and lines[-1] == "fits"
    assert lines[0].startswith("topology      local cpu (8 × cpu)")
    label = lambda line: line[:14]
    assert [label(line) for line in lines] == [label(line) for line in tiny_report.lines()]
    assert not any("nan" in line for line in lines)  # every number known on CPU too
    host_ram = aot.device_memory_bytes(jax.devices()[0])
    assert host_ram > 2**30 and any(line.startswith("HBM") for line in lines)


def test_missing_tokenizer_file_is_named_and_the_config_fields_used(capsys, tmp_path):
    missing = str(tmp_path / "tokenizer.model")
    config = configlib.load_config(TINY[1], [a[len("--config.") :] for a in TINY[2:]])
    config.data.tokenizer = missing
    assert aot._vocab_and_length(config) == (64, 40)
    err = capsys.readouterr().err
    assert f"tokenizer {missing} not found; shapes from config.model.vocab_size" in err and err.count("\n") == 1
    config.data.tokenizer = ""
    assert aot._vocab_and_length(config) == (64, 40) and capsys.readouterr().err == ""
