#!/usr/bin/env bash
# Launches `realm-jax COMMAND` on every worker of a slice, detached, one log file per worker; with
# --with-index-builder also `realm-jax index-builder` on the index slice, with the same work directory
# and gin configuration.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tpu/launch.sh --name NAME --zone ZONE [--project ID] COMMAND
                     [--gin_file FILE]... [--gin_param 'NAME=VALUE']...
                     (--workdir gs://BUCKET/PATH | --bucket BUCKET) [--with-index-builder]
                     [--index_gin_param 'NAME=VALUE']... [--env NAME=VALUE]... [--internal-ip] [--dry-run]

Starts `realm-jax COMMAND --gin_file ... --gin_param ... --workdir WORKDIR` on every worker (--worker=all)
under nohup, detached from ssh; each worker appends to its own ~/realm_jax_logs/COMMAND-worker<ID>.log.
  COMMAND               pretrain, ict, finetune, evaluate or index-builder
  --gin_file FILE       gin file, relative to the repository root (repeatable, in order)
  --gin_param P         gin binding NAME=VALUE (repeatable, in order; quote it for your shell)
  --workdir DIR         work directory (a gs:// path: every worker and both slices must see it)
  --bucket BUCKET       default --workdir: gs://BUCKET/realm_jax/<YYYYmmdd-HHMMSS>-NAME
  --with-index-builder  pretrain on NAME-train and index-builder on NAME-index, same workdir and gin
  --index_gin_param P   extra gin binding for the index builder only (repeatable)
  --env NAME=VALUE      environment variable for the run on every worker (repeatable; e.g. LIBTPU_INIT_ARGS)
  --dry-run             print the commands instead of running them

A run whose work directory already holds checkpoints resumes from the newest one: to resume after a
preemption, launch again with the same --workdir.

Environment: TPU_PROJECT, TPU_ZONE, TPU_NAME.
Example:
  tpu/launch.sh --name realm --zone europe-west4-a --with-index-builder --bucket my-bucket pretrain \
      --gin_file experiments/paper/realm_pretrain_wikipedia.gin --gin_param 'TRAIN_STEPS=200000'
EOF
}

# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LAUNCH_COMMANDS=(pretrain ict finetune evaluate index-builder)
COMMAND=""
GIN_FILES=()
GIN_PARAMS=()
INDEX_GIN_PARAMS=()
ENVS=()
WORKDIR=""
BUCKET=""

is_launch_command() {
  local c
  for c in "${LAUNCH_COMMANDS[@]}"; do
    if [[ "$c" == "$1" ]]; then return 0; fi
  done
  return 1
}

while (($#)); do
  if parse_common_flag "$@"; then
    shift "$SHIFT_BY"
    continue
  fi
  case "$1" in
    --gin_file | --gin_file=* | --gin-file | --gin-file=*) flag_value "$@"; GIN_FILES+=("$FLAG_VALUE") ;;
    --gin_param | --gin_param=* | --gin-param | --gin-param=*) flag_value "$@"; GIN_PARAMS+=("$FLAG_VALUE") ;;
    --index_gin_param | --index_gin_param=* | --index-gin-param | --index-gin-param=*)
      flag_value "$@"
      INDEX_GIN_PARAMS+=("$FLAG_VALUE")
      ;;
    --env | --env=*)
      flag_value "$@"
      [[ "$FLAG_VALUE" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env expects NAME=VALUE, got '${FLAG_VALUE}'"
      ENVS+=("$FLAG_VALUE")
      ;;
    --workdir | --workdir=*) flag_value "$@"; WORKDIR="$FLAG_VALUE" ;;
    --bucket | --bucket=*) flag_value "$@"; BUCKET="$FLAG_VALUE" ;;
    -*) usage_error "unknown argument '$1'" ;;
    *)
      [[ -z "$COMMAND" ]] || usage_error "one COMMAND only (got '${COMMAND}' and '$1')"
      is_launch_command "$1" || usage_error "unknown COMMAND '$1' (one of: ${LAUNCH_COMMANDS[*]})"
      COMMAND="$1"
      SHIFT_BY=1
      ;;
  esac
  shift "$SHIFT_BY"
done

require_name_and_zone
[[ -n "$COMMAND" ]] || usage_error "missing COMMAND (one of: ${LAUNCH_COMMANDS[*]})"
if ((WITH_INDEX_BUILDER)) && [[ "$COMMAND" != pretrain ]]; then
  usage_error "--with-index-builder goes with pretrain (the index builder refreshes the index of REALM pre-training)"
fi
if ((${#INDEX_GIN_PARAMS[@]})) && ((!WITH_INDEX_BUILDER)); then
  usage_error "--index_gin_param needs --with-index-builder"
fi
((${#GIN_FILES[@]})) || usage_error "give at least one --gin_file (e.g. experiments/paper/realm_pretrain_wikipedia.gin)"
for param in "${GIN_PARAMS[@]}" "${INDEX_GIN_PARAMS[@]}"; do
  [[ "$param" == *=* ]] || usage_error "--gin_param expects NAME=VALUE, got '${param}'"
done
for gin_file in "${GIN_FILES[@]}"; do
  if [[ "$gin_file" != /* && "$gin_file" != gs://* && ! -f "${REPO_ROOT}/${gin_file}" ]]; then
    warn "gin file ${gin_file} is not in ${REPO_ROOT}: the run fails unless the workers have it (tpu/setup.sh ships the committed tree)"
  fi
done

if [[ -n "$WORKDIR" && -n "$BUCKET" ]]; then
  usage_error "give --workdir or --bucket, not both"
elif [[ -n "$BUCKET" ]]; then
  BUCKET="${BUCKET#gs://}"
  BUCKET="${BUCKET%/}"
  [[ "$BUCKET" =~ ^[a-z0-9][-a-z0-9_.]*[a-z0-9]$ ]] || usage_error "bad --bucket '${BUCKET}'"
  WORKDIR="gs://${BUCKET}/realm_jax/$(date +%Y%m%d-%H%M%S)-${NAME}"
elif [[ -z "$WORKDIR" ]]; then
  usage_error "give --workdir gs://BUCKET/PATH or --bucket BUCKET"
fi
WORKDIR="${WORKDIR%/}"
if [[ "$WORKDIR" != gs://* ]]; then
  if ((WITH_INDEX_BUILDER)); then
    usage_error "--with-index-builder needs a gs:// --workdir: the trainer and the index builder share it"
  fi
  warn "--workdir ${WORKDIR} is not on GCS: on a pod every worker writes its own local copy"
fi

# start_on NODE COMMAND EXTRA_GIN_PARAMS...: starts `realm-jax COMMAND` on every worker of NODE.
start_on() {
  local node="$1" cmd="$2"
  shift 2
  local args=() env f p
  for env in "${ENVS[@]}"; do args+=(--env "$env"); done
  args+=("$cmd")
  for f in "${GIN_FILES[@]}"; do args+=(--gin_file "$f"); done
  for p in "${GIN_PARAMS[@]}" "$@"; do args+=(--gin_param "$p"); done
  args+=(--workdir "$WORKDIR")
  info "==> ${node}: starting realm-jax ${cmd} on every worker"
  tpu_ssh "$node" all "$(worker_sh start "${args[@]}")"
}

start_on "$(train_slice)" "$COMMAND"
if ((WITH_INDEX_BUILDER)); then
  start_on "$(index_slice)" index-builder "${INDEX_GIN_PARAMS[@]}"
fi

hint="$(common_flags_for_hint)"
# shellcheck disable=SC2088  # a path on the workers, printed for the reader
log_dir="~/${REMOTE_LOG_DIR}"
logs="${log_dir}/${COMMAND}-worker<ID>.log on each worker of $(train_slice)"
if ((WITH_INDEX_BUILDER)); then
  logs+=", ${log_dir}/index-builder-worker<ID>.log on each worker of $(index_slice)"
fi
cat <<EOF

Work directory: ${WORKDIR}
Logs:        ${logs}
Watch:       tpu/watch.sh ${hint} --workdir $(posix_quote "$WORKDIR") --follow
TensorBoard: tensorboard --logdir $(posix_quote "${WORKDIR}/tensorboard")
Resume:      the same tpu/launch.sh command with --workdir $(posix_quote "$WORKDIR")
Stop:        tpu/teardown.sh ${hint} --stop-only
EOF
