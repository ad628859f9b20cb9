"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere.

With REALM_JAX_REQUIRE_TEST_DEPS=1 (`make test`, `make test-all`, hence CI: they install the test
extras first) a skipped test FAILS unless its reason is one of `ALLOWED_SKIPS`: inside the project's
own environment a missing test dependency (the spaCy model, gcsfs, the storage emulator, shellcheck,
playwright, wandb, ScaNN, …) is a broken install, not a reason to drop tests silently.
tests/test_test_dependencies.py checks the same dependencies directly.
"""
import os
import platform
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

REQUIRE_TEST_DEPS_VAR = "REALM_JAX_REQUIRE_TEST_DEPS"

# Skips that stay skips with REALM_JAX_REQUIRE_TEST_DEPS=1: what no extra of pyproject.toml installs.
#   - a Chromium for the serve page (a system package: `apt-get install chromium`);
#   - PyTorch (no extra has it: only the .bin → safetensors conversion test uses it);
#   - ScaNN where the scann extra has no wheel (it is Linux x86-64 only);
#   - tests/test_test_dependencies.py when the variable is not set.
ALLOWED_SKIPS = (
    (re.compile(r"no browser: install Debian's `chromium`"), lambda: True),
    (re.compile(r"could not import 'torch'"), lambda: True),
    (re.compile(r"could not import 'scann'"),
     lambda: not (sys.platform == "linux" and platform.machine() == "x86_64")),
    (re.compile(re.escape(REQUIRE_TEST_DEPS_VAR) + " is not set"), lambda: True),
)


def require_test_deps() -> bool:
  return os.environ.get(REQUIRE_TEST_DEPS_VAR, "") == "1"


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes more than ~20 s on a 2-core CPU")
  config.addinivalue_line("markers", "multiprocess: starts several local JAX processes")


def _skip_reason(report) -> str:
  longrepr = report.longrepr
  if isinstance(longrepr, tuple) and len(longrepr) == 3:
    return str(longrepr[2])
  return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  if not (report.skipped and require_test_deps()) or hasattr(report, "wasxfail"):
    return
  reason = _skip_reason(report)
  if any(pattern.search(reason) and applies() for pattern, applies in ALLOWED_SKIPS):
    return
  report.outcome = "failed"
  report.longrepr = (f"skipped with {REQUIRE_TEST_DEPS_VAR}=1 (the test extras are installed, so a "
                     f"skip hides a broken install or a regression): {reason}\nIf this skip is "
                     f"legitimate in CI, add its reason to ALLOWED_SKIPS in tests/conftest.py.")


@pytest.fixture(scope="session")
def embed_each_block():
  """`embed(model_cfg, corpus, retriever_params) -> [num_blocks, dim] float32`: the independent
  reference for snapshot rows — the document tower applied to each block on its own at the full
  block width (no batching, length buckets, sorting or sharding)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from realm_jax.models import retriever as retriever_lib  # pylint: disable=g-import-not-at-top

  def embed(model_cfg, corpus, params):
    model = retriever_lib.Retriever(model_cfg.retriever_config())
    tower = jax.jit(lambda p, x: model.apply({"params": p}, **x,
                                             method=retriever_lib.Retriever.embed_documents))
    inputs = corpus.retrieval_inputs(np.arange(len(corpus)))
    return np.stack([np.asarray(tower(params, {k: v[i:i + 1] for k, v in inputs.items()}))[0]
                     for i in range(len(corpus))])
  return embed


@pytest.fixture(scope="session")
def comparable_manifest():
  """`comparable(snapshot_dir) -> dict`: a committed snapshot manifest without what differs between
  two correct builds of the same snapshot (the commit times, the checkpoint's mtime and the
  searcher's build timings), for comparing a killed-and-resumed build with an uninterrupted one."""
  from realm_jax.retrieval import snapshot as snap  # pylint: disable=g-import-not-at-top

  def comparable(path):
    manifest = snap.read_manifest(path)
    for key in ("created", "created_unix"):
      manifest.pop(key)
    manifest["metadata"].pop("checkpoint_mtime")
    manifest.get("searcher", {}).pop("info", None)
    return manifest
  return comparable
