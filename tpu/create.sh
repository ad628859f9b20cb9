#!/usr/bin/env bash
# Creates the TPU slice(s) of a run: one slice, or with --with-index-builder two (NAME-train for the
# trainer, NAME-index for the index builder), directly or as queued resources.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tpu/create.sh --name NAME --zone ZONE --accelerator-type TYPE [--project ID]
                     [--runtime-version V] [--with-index-builder [--index-accelerator-type TYPE]]
                     [--queued [--wait]] [--spot | --preemptible | --best-effort | --reserved]
                     [--valid-until-duration D] [--internal-ip] [--dry-run] [-- GCLOUD_FLAGS...]

Creates a TPU VM or pod slice with `gcloud compute tpus tpu-vm create`, or with --queued a queued
resource (`gcloud compute tpus queued-resources create`, the recommended route for big slices).

  --accelerator-type TYPE     v3-64, v4-64, v5litepod-16, v5p-128, v6e-64, ...
  --runtime-version V         default by generation: tpu-ubuntu2204-base (v2-v4), v2-alpha-tpuv5-lite
                              (v5e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
  --with-index-builder        create NAME-train (--accelerator-type) and NAME-index
                              (--index-accelerator-type, default: the same type)
  --queued                    request a queued resource (id = node id = the slice name)
  --wait                      with --queued: poll until the request is ACTIVE (or FAILED/SUSPENDED)
  --spot                      Spot capacity (cheaper, can be preempted at any time)
  --preemptible               legacy preemptible TPU (without --queued)
  --best-effort               with --queued: best-effort capacity (uses `gcloud alpha`)
  --reserved                  with --queued: use the project's reservation
  --valid-until-duration D    with --queued: drop the request if not filled within D (e.g. 6h)
  --internal-ip               (accepted for symmetry; creation does not ssh)
  --dry-run                   print the gcloud commands instead of running them
  -- GCLOUD_FLAGS...          passed unchanged to every create command (e.g. --network=NET)

Environment: TPU_PROJECT, TPU_ZONE, TPU_NAME, TPU_ACCELERATOR_TYPE, TPU_RUNTIME_VERSION.
Example (REALM pre-training: 64 TPU cores train, 16 embed the corpus):
  tpu/create.sh --name realm --zone europe-west4-a --accelerator-type v3-64 \
      --with-index-builder --index-accelerator-type v3-16 --queued --spot
EOF
}

# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

INDEX_ACCELERATOR_TYPE=""
QUEUED=0
WAIT=0
CAPACITY=""  # spot | preemptible | best-effort | reserved
VALID_UNTIL=""
EXTRA_FLAGS=()

set_capacity() {
  if [[ -n "$CAPACITY" && "$CAPACITY" != "$1" ]]; then
    usage_error "--${CAPACITY} and --$1 exclude each other"
  fi
  CAPACITY="$1"
}

while (($#)); do
  if parse_common_flag "$@"; then
    shift "$SHIFT_BY"
    continue
  fi
  case "$1" in
    --index-accelerator-type | --index-accelerator-type=*)
      flag_value "$@"
      INDEX_ACCELERATOR_TYPE="$FLAG_VALUE"
      ;;
    --queued | --queued=*) no_value "$1"; QUEUED=1 ;;
    --wait | --wait=*) no_value "$1"; WAIT=1 ;;
    --spot | --spot=*) no_value "$1"; set_capacity spot ;;
    --preemptible | --preemptible=*) no_value "$1"; set_capacity preemptible ;;
    --best-effort | --best-effort=*) no_value "$1"; set_capacity best-effort ;;
    --reserved | --reserved=*) no_value "$1"; set_capacity reserved ;;
    --valid-until-duration | --valid-until-duration=*)
      flag_value "$@"
      VALID_UNTIL="$FLAG_VALUE"
      ;;
    --)
      shift
      EXTRA_FLAGS=("$@")
      break
      ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
  shift "$SHIFT_BY"
done

require_name_and_zone
[[ -n "$ACCELERATOR_TYPE" ]] || usage_error "--accelerator-type is required (e.g. v3-64)"
check_accelerator_type "$ACCELERATOR_TYPE"
if [[ -n "$INDEX_ACCELERATOR_TYPE" ]]; then
  ((WITH_INDEX_BUILDER)) || usage_error "--index-accelerator-type needs --with-index-builder"
  check_accelerator_type "$INDEX_ACCELERATOR_TYPE"
else
  INDEX_ACCELERATOR_TYPE="$ACCELERATOR_TYPE"
fi
if ((QUEUED)); then
  [[ "$CAPACITY" != preemptible ]] || usage_error "--preemptible is not for queued resources: use --spot"
else
  [[ "$CAPACITY" != best-effort && "$CAPACITY" != reserved ]] || usage_error "--${CAPACITY} needs --queued"
  [[ -z "$VALID_UNTIL" ]] || usage_error "--valid-until-duration needs --queued"
  ((!WAIT)) || usage_error "--wait needs --queued (tpu-vm create already waits)"
fi

# create_slice NODE ACCELERATOR_TYPE
create_slice() {
  local node="$1" type="$2" version="$RUNTIME_VERSION"
  if [[ -z "$version" ]]; then version="$(default_runtime_version "$type")"; fi
  local capacity=()
  if [[ -n "$CAPACITY" ]]; then capacity=("--${CAPACITY}"); fi
  if ((QUEUED)); then
    local alpha=() valid=()
    if [[ "$CAPACITY" == best-effort ]]; then alpha=(--alpha); fi
    if [[ -n "$VALID_UNTIL" ]]; then valid=("--valid-until-duration=${VALID_UNTIL}"); fi
    tpu_gcloud "${alpha[@]}" queued-resources create "$node" "--node-id=${node}" \
      "--accelerator-type=${type}" "--runtime-version=${version}" "${capacity[@]}" "${valid[@]}" \
      "${EXTRA_FLAGS[@]}"
  else
    tpu_gcloud tpu-vm create "$node" "--accelerator-type=${type}" "--version=${version}" \
      "${capacity[@]}" "${EXTRA_FLAGS[@]}"
  fi
}

# wait_active NODE: polls the queued resource until it is ACTIVE; fails on FAILED / SUSPENDED.
wait_active() {
  local node="$1" state
  if ((DRY_RUN)); then
    tpu_gcloud queued-resources describe "$node" "--format=value(state.state)"
    return 0
  fi
  while true; do
    state="$(tpu_gcloud queued-resources describe "$node" "--format=value(state.state)" 2>/dev/null)" ||
      die "could not describe the queued resource ${node}"
    case "$state" in
      ACTIVE)
        info "${node}: ACTIVE"
        return 0
        ;;
      FAILED | SUSPENDED | SUSPENDING)
        die "${node}: ${state} (see: gcloud compute tpus queued-resources describe ${node} --zone=${ZONE})"
        ;;
      *)
        info "${node}: ${state:-unknown}; checking again in 60 s"
        sleep 60
        ;;
    esac
  done
}

mapfile -t SLICES < <(slice_names)
for node in "${SLICES[@]}"; do
  type="$ACCELERATOR_TYPE"
  if ((WITH_INDEX_BUILDER)) && [[ "$node" == "$(index_slice)" ]]; then type="$INDEX_ACCELERATOR_TYPE"; fi
  create_slice "$node" "$type"
done
if ((QUEUED && WAIT)); then
  for node in "${SLICES[@]}"; do wait_active "$node"; done
fi

hint_flags="$(common_flags_for_hint)"
if ((QUEUED && !WAIT)); then
  info "Queued. The slices exist once their requests are ACTIVE:"
  for node in "${SLICES[@]}"; do
    info "  gcloud compute tpus queued-resources describe ${node} --zone=${ZONE} --format='value(state.state)'"
  done
fi
info "Next: tpu/setup.sh ${hint_flags}"
