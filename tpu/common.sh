# shellcheck shell=bash disable=SC2034  # the variables set here are read by the scripts that source it
# Shared flags and helpers of the tpu/ scripts. Sourced by create.sh, setup.sh, launch.sh, watch.sh and
# teardown.sh; never run on its own.
#
# Shared flags (each may also come from the environment variable in brackets):
#   --project ID            GCP project [TPU_PROJECT]; left out: gcloud's configured project
#   --zone ZONE             zone of the slices, e.g. europe-west4-a [TPU_ZONE]
#   --name NAME             slice name; with --with-index-builder the slices are NAME-train, NAME-index [TPU_NAME]
#   --accelerator-type T    e.g. v3-64, v4-64, v5litepod-16, v5p-128, v6e-64 [TPU_ACCELERATOR_TYPE]
#   --runtime-version V     TPU software version; default from the accelerator type [TPU_RUNTIME_VERSION]
#   --with-index-builder    two slices: NAME-train (trainer) and NAME-index (index builder)
#   --internal-ip           ssh/scp to the workers' internal IPs (from a VM in the same network)
#   --dry-run               print every command instead of running it (one a line, `+ ` first, shell-quoted
#                           so that it can be pasted); needs no gcloud
#   -h, --help              print the usage
#
# A script using this file defines `usage` (prints to stdout) before sourcing it, then parses its flags with:
#   while (($#)); do
#     if parse_common_flag "$@"; then shift "$SHIFT_BY"; continue; fi
#     case "$1" in ... esac
#   done

if [[ -n "${_REALM_TPU_COMMON_SOURCED:-}" ]]; then
  return 0
fi
_REALM_TPU_COMMON_SOURCED=1

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  printf 'error: the tpu/ scripts need bash >= 4.4 (this is %s); on macOS: brew install bash\n' \
    "$BASH_VERSION" >&2
  exit 1
fi

TPU_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${TPU_SCRIPTS_DIR}/.." && pwd)"

# Where things live on every worker, relative to the remote home directory.
REMOTE_REPO="realm_jax"
REMOTE_WORKER_SH="${REMOTE_REPO}/tpu/worker.sh"
REMOTE_LOG_DIR="realm_jax_logs"

PROJECT="${TPU_PROJECT:-}"
ZONE="${TPU_ZONE:-}"
NAME="${TPU_NAME:-}"
ACCELERATOR_TYPE="${TPU_ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${TPU_RUNTIME_VERSION:-}"
WITH_INDEX_BUILDER=0
INTERNAL_IP=0
DRY_RUN=0
SHIFT_BY=0
FLAG_VALUE=""

# ----------------------------------------------------------------------------------------------------
# Messages and errors
# ----------------------------------------------------------------------------------------------------

info() { printf '%s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}
# A bad command line: the message, then the usage, on stderr; exit status 2.
usage_error() {
  printf 'error: %s\n\n' "$*" >&2
  usage >&2
  exit 2
}

# ----------------------------------------------------------------------------------------------------
# Flag parsing
# ----------------------------------------------------------------------------------------------------

# flag_value "$@": the value of the flag in $1, given as `--flag=VALUE` or `--flag VALUE`.
# Sets FLAG_VALUE and SHIFT_BY (the number of words to shift).
flag_value() {
  local flag="$1"
  if [[ "$flag" == --*=* ]]; then
    FLAG_VALUE="${flag#*=}"
    SHIFT_BY=1
  elif (($# < 2)) || [[ "$2" == --* ]]; then
    usage_error "${flag} needs a value"
  else
    FLAG_VALUE="$2"
    SHIFT_BY=2
  fi
}

# no_value "$1": rejects `--switch=VALUE` for a flag that takes no value; sets SHIFT_BY=1.
no_value() {
  if [[ "$1" == *=* ]]; then
    usage_error "${1%%=*} takes no value"
  fi
  SHIFT_BY=1
}

# parse_common_flag "$@": consumes a shared flag in $1 (and its value). Returns 1 when $1 is not one.
parse_common_flag() {
  case "$1" in
    --project | --project=*) flag_value "$@"; PROJECT="$FLAG_VALUE" ;;
    --zone | --zone=*) flag_value "$@"; ZONE="$FLAG_VALUE" ;;
    --name | --name=*) flag_value "$@"; NAME="$FLAG_VALUE" ;;
    --accelerator-type | --accelerator-type=*) flag_value "$@"; ACCELERATOR_TYPE="$FLAG_VALUE" ;;
    --runtime-version | --runtime-version=*) flag_value "$@"; RUNTIME_VERSION="$FLAG_VALUE" ;;
    --with-index-builder | --with-index-builder=*) no_value "$1"; WITH_INDEX_BUILDER=1 ;;
    --internal-ip | --internal-ip=*) no_value "$1"; INTERNAL_IP=1 ;;
    --dry-run | --dry-run=*) no_value "$1"; DRY_RUN=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) return 1 ;;
  esac
  return 0
}

# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------

# require_name_and_zone: checks --name and --zone, the two flags every script needs.
require_name_and_zone() {
  [[ -n "$NAME" ]] || usage_error "--name is required (or set TPU_NAME)"
  [[ -n "$ZONE" ]] || usage_error "--zone is required (or set TPU_ZONE)"
  # TPU node names: lower-case letters, digits and hyphens, starting with a letter; keep room for -index.
  if ! [[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || ((${#NAME} > 57)); then
    usage_error "bad --name '${NAME}': use at most 57 lower-case letters, digits and hyphens, starting with a letter"
  fi
  if ! [[ "$ZONE" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]]; then
    usage_error "bad --zone '${ZONE}': expected a zone such as us-central1-a or europe-west4-a"
  fi
  if [[ -n "$PROJECT" ]] && ! [[ "$PROJECT" =~ ^[a-z][-a-z0-9.:]*[a-z0-9]$ ]]; then
    usage_error "bad --project '${PROJECT}'"
  fi
}

# check_accelerator_type TYPE: v3-64, v4-64, v5litepod-16, v5p-128, v6e-64, ...
check_accelerator_type() {
  if ! [[ "$1" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]]; then
    usage_error "bad accelerator type '$1': expected e.g. v3-64, v4-64, v5litepod-16, v5p-128 or v6e-64"
  fi
}

# default_runtime_version TYPE: the TPU software version Google recommends for JAX on that generation.
default_runtime_version() {
  case "$1" in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) usage_error "no default runtime version for '$1': pass --runtime-version" ;;
  esac
}

# ----------------------------------------------------------------------------------------------------
# Slices
# ----------------------------------------------------------------------------------------------------

train_slice() {
  if ((WITH_INDEX_BUILDER)); then echo "${NAME}-train"; else echo "$NAME"; fi
}
index_slice() { echo "${NAME}-index"; }

# slice_names: the slices this invocation acts on, one per line.
slice_names() {
  train_slice
  if ((WITH_INDEX_BUILDER)); then index_slice; fi
}

# ----------------------------------------------------------------------------------------------------
# Running commands
# ----------------------------------------------------------------------------------------------------

# quote_cmd ARGS...: the words shell-quoted for bash, space-separated, on one line: plain when safe, in
# single quotes when that is enough, else with printf %q (which writes newlines as $'\n').
quote_cmd() {
  local word out="" sep=""
  for word in "$@"; do
    if [[ "$word" == *[[:cntrl:]]* ]]; then
      printf -v word '%q' "$word"
      out+="${sep}${word}"
    else
      out+="${sep}$(posix_quote "$word")"
    fi
    sep=" "
  done
  printf '%s\n' "$out"
}

# posix_quote ARGS...: the words quoted for any POSIX shell (plain when safe, else in single quotes).
# Used for the command strings that run on the workers.
posix_quote() {
  local word out="" sep=""
  for word in "$@"; do
    if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+="${sep}${word}"
    else
      out+="${sep}'${word//\'/\'\\\'\'}'"
    fi
    sep=" "
  done
  printf '%s\n' "$out"
}

# run_cmd ARGS...: runs the command, after echoing it to stderr. With --dry-run: prints `+ CMD` to stdout
# (shell-quoted, one command per line) and runs nothing.
run_cmd() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote_cmd "$@")"
    return 0
  fi
  printf '+ %s\n' "$(quote_cmd "$@")" >&2
  "$@"
}

require_gcloud() {
  if ((DRY_RUN)); then
    return 0
  fi
  command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), or use --dry-run"
}

# gcloud_cmd ARGS...: `gcloud ARGS... [--project=PROJECT]` through run_cmd.
gcloud_cmd() {
  require_gcloud
  local project=()
  if [[ -n "$PROJECT" ]]; then project=("--project=${PROJECT}"); fi
  run_cmd gcloud "$@" "${project[@]}"
}

# tpu_gcloud [--alpha] GROUP VERB ARGS...: `gcloud [alpha] compute tpus GROUP VERB ARGS... --zone=ZONE`.
tpu_gcloud() {
  local release=()
  if [[ "$1" == --alpha ]]; then
    release=(alpha)
    shift
  fi
  gcloud_cmd "${release[@]}" compute tpus "$@" "--zone=${ZONE}"
}

# tpu_ssh NODE WORKER REMOTE_COMMAND: runs REMOTE_COMMAND (a shell command line) on WORKER (a number or
# `all`) of the slice NODE, from the remote home directory.
tpu_ssh() {
  local node="$1" worker="$2" remote="$3"
  local extra=()
  if ((INTERNAL_IP)); then extra+=(--internal-ip); fi
  tpu_gcloud tpu-vm ssh "$node" "--worker=${worker}" "${extra[@]}" "--command=${remote}"
}

# tpu_scp NODE WORKER LOCAL_FILE REMOTE_PATH: copies one local file to WORKER of the slice NODE.
tpu_scp() {
  local node="$1" worker="$2" src="$3" dest="$4"
  local extra=()
  if ((INTERNAL_IP)); then extra+=(--internal-ip); fi
  tpu_gcloud tpu-vm scp "$src" "${node}:${dest}" "--worker=${worker}" "${extra[@]}"
}

# worker_sh ARGS...: the remote command line that runs tpu/worker.sh ARGS... on a worker.
worker_sh() {
  printf 'cd && bash %s\n' "$(posix_quote "$REMOTE_WORKER_SH" "$@")"
}

# common_flags_for_hint: the shared flags to repeat in a follow-up command that we print for the user.
common_flags_for_hint() {
  local words=(--name "$NAME" --zone "$ZONE")
  if [[ -n "$PROJECT" ]]; then words+=(--project "$PROJECT"); fi
  if ((WITH_INDEX_BUILDER)); then words+=(--with-index-builder); fi
  if ((INTERNAL_IP)); then words+=(--internal-ip); fi
  posix_quote "${words[@]}"
}
