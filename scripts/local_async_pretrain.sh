#!/usr/bin/env bash
# Asynchronous REALM pre-training on this machine (REALM §3.4): the trainer (`realm-jax pretrain`,
# index_refresh='async') and the index builder (`realm-jax index-builder`) as two processes that share
# one work directory, each on its own CPU cores and simulated devices, one log each
# (WORKDIR/logs/{trainer,index-builder}.log, echoed here), Ctrl-C forwarded to both.
#
#   scripts/local_async_pretrain.sh                                   # the CPU demo experiment
#   scripts/local_async_pretrain.sh --workdir workdirs/async --gin_param 'TRAIN_STEPS=20'
#   scripts/local_async_pretrain.sh --help                            # every option
#
# Defaults: experiments/cpu/pretrain_async_minilm.gin, work directory workdirs/pretrain_async_minilm.
# Arguments are passed to `python -m realm_jax.launch_local`.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${REALM_PYTHON:-${REPO_ROOT}/.venv/bin/python}"
if [[ ! -x "$PYTHON" ]]; then
  echo "local_async_pretrain.sh: ${PYTHON} not found; run scripts/install.sh (or set REALM_PYTHON)" >&2
  exit 2
fi
cd "$REPO_ROOT"
exec "$PYTHON" -m realm_jax.launch_local "$@"
