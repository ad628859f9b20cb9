#!/usr/bin/env bash
# Shows how a run is doing: the state and health of the slice(s), the checkpoints and snapshots in the
# work directory, and the logs of all workers (or of one).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tpu/watch.sh --name NAME --zone ZONE [--project ID] [--with-index-builder]
                    [--worker N|all] [--lines N] [--follow] [--cmd COMMAND] [--workdir gs://...]
                    [--no-describe] [--internal-ip] [--dry-run]

  --worker N|all     whose logs to show (default all; N = the worker number, 0 is the first host)
  --lines N          lines of each log (default 50)
  --follow           keep following the logs (tail -F) until Ctrl-C
  --cmd COMMAND      only the logs of this realm-jax command (pretrain, index-builder, ...)
  --workdir DIR      also list DIR/checkpoints/ and DIR/snapshots/ (gcloud storage ls)
  --no-describe      skip `gcloud compute tpus tpu-vm describe` (state, health, type)
  --with-index-builder  watch NAME-train and NAME-index
  --dry-run          print the commands instead of running them

Each log line is prefixed with [w<worker>]. Environment: TPU_PROJECT, TPU_ZONE, TPU_NAME.
Example: tpu/watch.sh --name realm --zone europe-west4-a --with-index-builder --worker 0 --follow
EOF
}

# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER="all"
LINES=50
FOLLOW=0
CMD=""
WORKDIR=""
DESCRIBE=1

while (($#)); do
  if parse_common_flag "$@"; then
    shift "$SHIFT_BY"
    continue
  fi
  case "$1" in
    --worker | --worker=*) flag_value "$@"; WORKER="$FLAG_VALUE" ;;
    --lines | --lines=*) flag_value "$@"; LINES="$FLAG_VALUE" ;;
    --follow | --follow=*) no_value "$1"; FOLLOW=1 ;;
    --cmd | --cmd=*) flag_value "$@"; CMD="$FLAG_VALUE" ;;
    --workdir | --workdir=*) flag_value "$@"; WORKDIR="$FLAG_VALUE" ;;
    --no-describe | --no-describe=*) no_value "$1"; DESCRIBE=0 ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
  shift "$SHIFT_BY"
done

require_name_and_zone
[[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || usage_error "--worker expects a number or 'all', got '${WORKER}'"
[[ "$LINES" =~ ^[0-9]+$ ]] || usage_error "--lines expects a number, got '${LINES}'"
case "$CMD" in
  "" | pretrain | ict | finetune | evaluate | index-builder | main) ;;
  *) usage_error "--cmd: unknown command '${CMD}'" ;;
esac
WORKDIR="${WORKDIR%/}"

mapfile -t SLICES < <(slice_names)

if ((DESCRIBE)); then
  for node in "${SLICES[@]}"; do
    info "==> ${node}: state"
    tpu_gcloud tpu-vm describe "$node" \
      "--format=yaml(name.basename(),state,health,healthDescription,acceleratorType,runtimeVersion,schedulingConfig)" ||
      warn "could not describe ${node} (deleted, or still queued?)"
  done
fi

if [[ -n "$WORKDIR" ]]; then
  for sub in checkpoints snapshots; do
    info "==> ${WORKDIR}/${sub}/"
    gcloud_cmd storage ls "${WORKDIR}/${sub}/" || warn "nothing in ${WORKDIR}/${sub}/ yet"
  done
fi

log_args=(logs --lines "$LINES")
if ((FOLLOW)); then log_args+=(--follow); fi
if [[ -n "$CMD" ]]; then log_args+=(--cmd "$CMD"); fi
remote="$(worker_sh "${log_args[@]}")"

if ((FOLLOW && ${#SLICES[@]} > 1 && !DRY_RUN)); then
  # Follow both slices at once; Ctrl-C stops both.
  pids=()
  trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM EXIT
  for node in "${SLICES[@]}"; do
    tpu_ssh "$node" "$WORKER" "$remote" &
    pids+=("$!")
  done
  wait
else
  for node in "${SLICES[@]}"; do
    info "==> ${node}: logs"
    tpu_ssh "$node" "$WORKER" "$remote" || warn "could not read the logs of ${node}"
  done
fi
