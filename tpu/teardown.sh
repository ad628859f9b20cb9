#!/usr/bin/env bash
# Stops the runs on every worker, then deletes the slice(s) (or their queued resources).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tpu/teardown.sh --name NAME --zone ZONE [--project ID] [--with-index-builder]
                       [--queued] [--stop-only | --no-stop] [--timeout SECONDS] [--yes]
                       [--internal-ip] [--dry-run]

Stops every realm-jax run on all workers (SIGTERM to each run's process group, SIGKILL after
--timeout, default 30 s), then deletes the slice(s) with --quiet, after asking for confirmation.
  --queued              the slices came from tpu/create.sh --queued: delete the queued resources
                        (with --force, which deletes their nodes too)
  --stop-only           stop the runs and keep the slices
  --no-stop             delete without stopping the runs first (e.g. a preempted, unreachable slice)
  --yes                 do not ask for confirmation
  --with-index-builder  NAME-train and NAME-index
  --dry-run             print the commands instead of running them (asks nothing)

The work directory on GCS is kept: launching again with the same --workdir resumes the run.
Environment: TPU_PROJECT, TPU_ZONE, TPU_NAME.
Example: tpu/teardown.sh --name realm --zone europe-west4-a --with-index-builder --queued
EOF
}

# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
STOP=1
DELETE=1
YES=0
TIMEOUT=30

while (($#)); do
  if parse_common_flag "$@"; then
    shift "$SHIFT_BY"
    continue
  fi
  case "$1" in
    --queued | --queued=*) no_value "$1"; QUEUED=1 ;;
    --stop-only | --stop-only=*) no_value "$1"; DELETE=0 ;;
    --no-stop | --no-stop=*) no_value "$1"; STOP=0 ;;
    --yes | --yes=* | -y) no_value "$1"; YES=1 ;;
    --timeout | --timeout=*) flag_value "$@"; TIMEOUT="$FLAG_VALUE" ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
  shift "$SHIFT_BY"
done

require_name_and_zone
((STOP || DELETE)) || usage_error "--stop-only and --no-stop together leave nothing to do"
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || usage_error "--timeout expects whole seconds, got '${TIMEOUT}'"
if ((QUEUED && !DELETE)); then usage_error "--queued is about deleting; it does not go with --stop-only"; fi

mapfile -t SLICES < <(slice_names)

if ((DELETE && !YES && !DRY_RUN)); then
  what="TPU slice(s)"
  if ((QUEUED)); then what="queued resource(s) and their TPU slice(s)"; fi
  printf 'Delete the %s %s in %s%s? [y/N] ' "$what" "${SLICES[*]}" "$ZONE" "${PROJECT:+ (project ${PROJECT})}" >&2
  answer=""
  read -r answer || true
  case "$answer" in
    y | Y | yes | YES) ;;
    *) die "aborted: nothing was stopped or deleted" ;;
  esac
fi

failed=()
if ((STOP)); then
  for node in "${SLICES[@]}"; do
    info "==> ${node}: stopping the runs on every worker"
    if ! tpu_ssh "$node" all "$(worker_sh stop --timeout "$TIMEOUT")"; then
      if ((DELETE)); then
        warn "could not stop the runs on ${node} (unreachable?); deleting it anyway"
      else
        warn "could not stop the runs on ${node}"
        failed+=("stop ${node}")
      fi
    fi
  done
fi

if ((DELETE)); then
  for node in "${SLICES[@]}"; do
    info "==> ${node}: deleting"
    if ((QUEUED)); then
      tpu_gcloud queued-resources delete "$node" --force --quiet || failed+=("delete ${node}")
    else
      tpu_gcloud tpu-vm delete "$node" --quiet || failed+=("delete ${node}")
    fi
  done
fi

if ((${#failed[@]})); then
  die "failed: $(IFS=,; echo "${failed[*]}")"
fi
