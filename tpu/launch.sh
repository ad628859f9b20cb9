#!/usr/bin/env bash
# Launches `realm-jax COMMAND` on every worker of a slice, detached, one log file per worker; with
# --with-index-builder also `realm-jax index-builder` on the index slice, with the same work directory
# and gin configuration. Before anything reaches a worker, the configuration is checked here
# (python -m realm_jax.config_check): the gin files parse, every %gin.REQUIRED macro is bound, and the
# bucket paths are well formed.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tpu/launch.sh --name NAME --zone ZONE [--project ID] COMMAND
                     [--gin_file FILE]... [--gin_param 'NAME=VALUE']...
                     (--workdir gs://BUCKET/PATH | --bucket BUCKET) [--with-index-builder]
                     [--index_gin_param 'NAME=VALUE']... [--env NAME=VALUE]... [--stage MACRO]...
                     [--allow-local-paths] [--no-config-check] [--internal-ip] [--dry-run]

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
  --stage MACRO         copy the gs:// directory that the gin macro MACRO names to ~/realm_jax_staged/MACRO
                        on every worker before the run, and bind MACRO to that copy (repeatable;
                        BERT_BASE_DIR always is staged)
  --allow-local-paths   accept local paths for the path macros (BERT_BASE_DIR, WIKIPEDIA, ...) when
                        every worker has those files; by default they must be gs:// paths
  --no-config-check     skip the local configuration check (and so the staging): for gin files that
                        exist only on the workers
  --dry-run             print the commands instead of running them

Before it starts anything, and with --dry-run too, the configuration is checked on this machine with
`python -m realm_jax.config_check` (python: $REALM_JAX_PYTHON, else .venv/bin/python of this
checkout, else python3): the gin files parse, every %gin.REQUIRED macro is bound (by the gin files or
--gin_param), every bucket path is a well-formed gs://BUCKET/PATH and the path macros are in the
bucket. Each problem is one `error:` line; nothing is started (exit status 2).

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
STAGE_MACROS=(BERT_BASE_DIR)
ALLOW_LOCAL_PATHS=0
CONFIG_CHECK=1
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
    --stage | --stage=*)
      flag_value "$@"
      [[ "$FLAG_VALUE" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || usage_error "--stage expects a macro name, got '${FLAG_VALUE}'"
      STAGE_MACROS+=("$FLAG_VALUE")
      ;;
    --allow-local-paths | --allow-local-paths=*) no_value "$1"; ALLOW_LOCAL_PATHS=1 ;;
    --no-config-check | --no-config-check=*) no_value "$1"; CONFIG_CHECK=0 ;;
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

# check_config EXTRA_GIN_PARAMS...: checks the configuration (GIN_FILES, GIN_PARAMS, then the extra
# params) on this machine with realm_jax.config_check; on a problem prints its lines and exits 2, else
# sets STAGED to the `MACRO=gs://...` directories to copy to the workers.
STAGED=()
check_config() {
  local python="${REALM_JAX_PYTHON:-}"
  if [[ -z "$python" ]]; then
    if [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then python="${REPO_ROOT}/.venv/bin/python"; else python=python3; fi
  fi
  command -v "$python" >/dev/null 2>&1 ||
    die "no python to check the configuration with ('${python}'): set REALM_JAX_PYTHON, or pass --no-config-check"
  local args=(-m realm_jax.config_check --workdir "$WORKDIR") f p m out rc=0
  for f in "${GIN_FILES[@]}"; do args+=(--gin_file "$f"); done
  for p in "${GIN_PARAMS[@]}" "$@"; do args+=(--gin_param "$p"); done
  for m in "${STAGE_MACROS[@]}"; do args+=(--stage "$m"); done
  if ((!ALLOW_LOCAL_PATHS)); then args+=(--require_bucket); fi
  out="$(cd "$REPO_ROOT" && PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}" "$python" "${args[@]}")" || rc=$?
  if ((rc != 0)); then
    printf 'error: the configuration check failed (%s -m realm_jax.config_check, status %s): nothing was started\n' \
      "$python" "$rc" >&2
    exit 2
  fi
  STAGED=()
  local line
  while IFS= read -r line; do
    if [[ "$line" == "stage "* ]]; then STAGED+=("${line#stage }"); fi
  done <<<"$out"
}

TRAIN_STAGED=()
INDEX_STAGED=()
if ((CONFIG_CHECK)); then
  check_config
  TRAIN_STAGED=("${STAGED[@]}")
  if ((WITH_INDEX_BUILDER)); then
    check_config "${INDEX_GIN_PARAMS[@]}"
    INDEX_STAGED=("${STAGED[@]}")
  fi
else
  warn "--no-config-check: the configuration is not checked here and nothing is staged (${STAGE_MACROS[*]} must be readable on every worker as given)"
fi

# start_on NODE COMMAND STAGED_COUNT STAGED... EXTRA_GIN_PARAMS...: starts `realm-jax COMMAND` on every
# worker of NODE, after worker.sh copied the STAGED `MACRO=gs://...` directories there.
start_on() {
  local node="$1" cmd="$2" n="$3"
  shift 3
  local args=() env f p s
  for env in "${ENVS[@]}"; do args+=(--env "$env"); done
  for s in "${@:1:n}"; do args+=(--stage "$s"); done
  shift "$n"
  args+=("$cmd")
  for f in "${GIN_FILES[@]}"; do args+=(--gin_file "$f"); done
  for p in "${GIN_PARAMS[@]}" "$@"; do args+=(--gin_param "$p"); done
  args+=(--workdir "$WORKDIR")
  info "==> ${node}: starting realm-jax ${cmd} on every worker"
  tpu_ssh "$node" all "$(worker_sh start "${args[@]}")"
}

start_on "$(train_slice)" "$COMMAND" "${#TRAIN_STAGED[@]}" "${TRAIN_STAGED[@]}"
if ((WITH_INDEX_BUILDER)); then
  start_on "$(index_slice)" index-builder "${#INDEX_STAGED[@]}" "${INDEX_STAGED[@]}" "${INDEX_GIN_PARAMS[@]}"
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
