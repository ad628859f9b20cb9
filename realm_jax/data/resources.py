"""Where the experiment gin files and the embedded data are: the installed package or the checkout.

A checkout (and an editable install) has them at the top of the repository, `experiments/**/*.gin`
and `data/` (the embedded SQuAD files, `data/squad/`). A wheel ships the same two folders as
package data under `realm_jax/_resources/` (`[tool.setuptools]` in pyproject.toml). Both layouts are
the same below `root()`, so gin's `include 'experiments/models/tiny.gin'` and the data paths
resolve against it whichever way the package was installed.
"""

from __future__ import annotations

import importlib.resources
import pathlib

# The folder, inside the installed package, that holds the packaged `experiments/` and `data/`.
PACKAGED_DIR = "_resources"
# The top of the checkout this module belongs to (meaningful only when running from a checkout).
CHECKOUT_ROOT = pathlib.Path(__file__).resolve().parents[2]


def root() -> pathlib.Path:
  """The folder holding `experiments/` and `data/`.

  Returns:
    `realm_jax/_resources` of an installed wheel when present, else the checkout's top folder.
  """
  packaged = importlib.resources.files("realm_jax") / PACKAGED_DIR
  if isinstance(packaged, pathlib.Path) and packaged.is_dir():
    return packaged
  return CHECKOUT_ROOT


def path(relative: str) -> pathlib.Path:
  """`root() / relative`, e.g. `path("experiments/cpu/squad_minilm.gin")` (it may not exist)."""
  return root() / relative
