"""Keeps libtpu quiet on hosts without a TPU; imports nothing heavy, so it runs before JAX is imported.

libtpu (installed by the `test` extra, for ahead-of-time TPU compiles) is loaded whenever JAX starts
its backends. On a machine without TPU chips it cannot find the TPU VM metadata and prints warnings
("could not determine TPU accelerator type", "unexpected worker hostname ...") to stderr. Setting the
values it looks for silences it. On a TPU VM nothing is touched: there the real values matter.
"""

from __future__ import annotations

import glob
import os
from collections.abc import MutableMapping

_GOOGLE_PCI_VENDOR = "0x1ae0"
# Google PCI devices that are not TPUs (GCE's virtual NIC and NVMe); any other Google device counts as a TPU.
_GOOGLE_NON_TPU_DEVICES = {"0x0042", "0x001f"}

QUIET_DEFAULTS = (
    ("TPU_SKIP_MDS_QUERY", "1"),
    ("TPU_WORKER_HOSTNAMES", "localhost"),
    ("TPU_WORKER_ID", "0"),
    ("TPU_ACCELERATOR_TYPE", "v5p-8"),
    ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),  # several processes on one host may load libtpu at once
)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def has_tpu(root: str = "/") -> bool:
    """True when anything suggests TPU chips: a Google PCI device other than a NIC or disk, /dev/accel*, /dev/vfio/N.

    Errs towards True: on a TPU VM the variables this module sets would be wrong.
    """
    for device in glob.glob(os.path.join(root, "sys/bus/pci/devices/*")):
        if _read(os.path.join(device, "vendor")) == _GOOGLE_PCI_VENDOR:
            if _read(os.path.join(device, "device")) not in _GOOGLE_NON_TPU_DEVICES:
                return True
    return bool(glob.glob(os.path.join(root, "dev/accel*")) or glob.glob(os.path.join(root, "dev/vfio/[0-9]*")))


def quiet_libtpu_without_tpu(environ: MutableMapping[str, str] = os.environ, root: str = "/") -> None:
    """Sets libtpu's metadata variables (where unset) on a host without a TPU; does nothing on a TPU VM."""
    if has_tpu(root):
        return
    for name, value in QUIET_DEFAULTS:
        environ.setdefault(name, value)
