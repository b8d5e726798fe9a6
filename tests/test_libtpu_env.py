"""No libtpu metadata warnings from `lexvla` commands on a host without a TPU; TPU VMs left untouched."""

import os
import pathlib
import subprocess
import sys

import pytest

from lexvla_jax import libtpu_env

REPO = pathlib.Path(__file__).resolve().parents[1]
# Lines libtpu prints when it looks for TPU VM metadata that is not there.
LIBTPU_NOISE = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "libtpu", "InitGoogle")


def host(tmp_path, pci=(), dev=()):
    """A fake root with PCI devices `(vendor, device)` and /dev entries."""
    for i, (vendor, device) in enumerate(pci):
        d = tmp_path / f"sys/bus/pci/devices/0000:00:0{i}.0"
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
        (d / "device").write_text(device + "\n")
    for name in dev:
        (tmp_path / "dev" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "dev" / name).write_text("")
    return str(tmp_path)


@pytest.mark.parametrize(
    ("pci", "dev", "tpu"),
    [
        ([("0x8086", "0x1237"), ("0x1af4", "0x1000")], [], False),  # a plain VM
        ([("0x1ae0", "0x0042"), ("0x10de", "0x2330")], ["vfio/vfio"], False),  # GCE GPU VM: gVNIC + H100
        ([("0x1ae0", "0x0062")], [], True),  # TPU v5p chip
        ([("0x1ae0", "0x0099")], [], True),  # an unknown Google device: assume a TPU
        ([], ["accel0"], True),  # TPU v4 / v5e device files
        ([], ["vfio/0"], True),  # TPU v5p / v6e device files
    ],
)
def test_has_tpu(tmp_path, pci, dev, tpu):
    assert libtpu_env.has_tpu(host(tmp_path, pci, dev)) is tpu


def test_defaults_only_without_tpu_and_never_override(tmp_path):
    env = {"TPU_ACCELERATOR_TYPE": "v6e-8"}
    libtpu_env.quiet_libtpu_without_tpu(env, host(tmp_path / "cpu"))
    assert env["TPU_WORKER_HOSTNAMES"] == "localhost" and env["TPU_ACCELERATOR_TYPE"] == "v6e-8"
    env = {}
    libtpu_env.quiet_libtpu_without_tpu(env, host(tmp_path / "tpu", dev=["accel0"]))
    assert env == {}


def run_python(code: str) -> subprocess.CompletedProcess:
    # A user's environment: none of the suite's TPU variables, no forced CPU platform. libtpu may be
    # loaded only once per host unless allowed; allowing it makes the child load libtpu even while
    # this test process (after the AOT tests) holds it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k != "JAX_PLATFORMS"}
    env.update(ALLOW_MULTIPLE_LIBTPU_LOAD="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(word in line for word in LIBTPU_NOISE)]


@pytest.fixture(scope="module")
def libtpu_warns():
    """Skips unless this is a TPU-less host where libtpu, left alone, prints its warnings."""
    if libtpu_env.has_tpu():
        pytest.skip("this host has a TPU")
    result = run_python("import jax; jax.devices()")
    if not noise(result.stderr):
        pytest.skip("libtpu is not installed or prints nothing here")


def test_lexvla_command_prints_no_libtpu_warnings(libtpu_warns, tmp_path):
    # `lexvla train` starts JAX's backends (the mesh needs devices), then stops at an impossible mesh.
    code = (
        "import sys; from lexvla_jax import cli; sys.exit(cli.main(["
        f"'train', '--config', '{REPO}/configs/tiny.py', '--workdir', '{tmp_path}', '--config.mesh.shape=(3,1,1)']))"
    )
    result = run_python(code)
    assert "mesh shape (3, 1, 1)" in result.stderr  # it got as far as counting devices
    assert noise(result.stderr) == []
