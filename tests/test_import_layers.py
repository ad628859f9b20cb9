"""Imports run one way: base → data → models → retrieval → training → jobs.

A lower layer importing a higher one (retrieval importing training, a trainer importing the
index-builder job, …) ties the layers into one knot: this test reads every import statement of the
package, module-level and inside functions, and fails naming each edge that points upwards.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "realm_jax"

# Layer of each top-level module or subpackage of realm_jax; a module may import its own layer and
# the layers below it.
LAYERS = {
    "fileio": 0, "tokenization": 0, "sharding": 0, "evaluation": 0,
    "data": 1,
    "models": 2,
    "retrieval": 3,
    "training": 4,
    # Jobs: entry points and what only they use.
    "cli": 5, "index_builder": 5, "convert": 5, "predict": 5, "serve": 5, "reporting": 5,
    "launch_local": 5,
    "config_check": 5, "__init__": 5,
}
LAYER_NAMES = ["fileio/tokenization/sharding/evaluation", "data", "models", "retrieval", "training",
               "jobs"]


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _layer(module: str) -> int:
  """Layer of `realm_jax.x…` by its first component below the package."""
  parts = module.split(".")
  key = parts[1] if len(parts) > 1 else "__init__"
  if key not in LAYERS:
    raise KeyError(f"realm_jax.{key} has no layer: add it to LAYERS in {__file__}")
  return LAYERS[key]


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, imported realm_jax module) for every import in the file, at any depth."""
  tree = ast.parse(path.read_text(encoding="utf-8"))
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == "realm_jax":
        found += [(node.lineno, f"realm_jax.{a.name}") for a in node.names]
      elif node.module.startswith("realm_jax."):
        found.append((node.lineno, node.module))
    elif isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names if a.name.startswith("realm_jax")]
  return found


def upward_imports() -> list[str]:
  """`"file:line: a (layer) imports b (higher layer)"` for every upward edge of the package."""
  problems = []
  for path in sorted(PACKAGE.rglob("*.py")):
    here = _module_name(path)
    for line, target in _imports(path):
      if _layer(target) > _layer(here):
        problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {here} "
                        f"({LAYER_NAMES[_layer(here)]}) imports {target} "
                        f"({LAYER_NAMES[_layer(target)]})")
  return problems


def test_no_lower_layer_imports_a_higher_one():
  problems = upward_imports()
  assert not problems, "imports must run base → data → models → retrieval → training → jobs:\n" + \
      "\n".join(problems)


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
  """The checker itself: a retrieval module that imports a trainer is reported with its line."""
  fake = tmp_path / "realm_jax"
  (fake / "retrieval").mkdir(parents=True)
  (fake / "training").mkdir()
  (fake / "retrieval" / "bad.py").write_text("import os\n\ndef f():\n"
                                             "  from realm_jax.training import finetune\n")
  (fake / "training" / "ok.py").write_text("from realm_jax.retrieval import bad\n")
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
  assert upward_imports() == [
      "realm_jax/retrieval/bad.py:4: realm_jax.retrieval.bad (retrieval) imports "
      "realm_jax.training (training)"]


def test_every_module_has_a_layer():
  for path in PACKAGE.rglob("*.py"):
    _layer(_module_name(path))  # KeyError names a module without a layer
    for _, target in _imports(path):
      _layer(target)


if __name__ == "__main__":
  pytest.main([__file__])
