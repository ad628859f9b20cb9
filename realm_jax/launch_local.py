"""One command for asynchronous REALM pre-training on one machine: the trainer and the index builder.

REALM §3.4 runs the trainer and the index refresher as separate jobs that share only the work
directory (on Cloud TPU: `tpu/launch.sh --with-index-builder`). This launcher does the same on one host,
as two local processes started from ONE gin experiment:

    scripts/local_async_pretrain.sh                      # experiments/cpu/pretrain_async_minilm.gin
    python -m realm_jax.launch_local --gin_file experiments/cpu/pretrain_async_minilm.gin \\
        --workdir workdirs/async --gin_param 'TRAIN_STEPS=20'

  * `realm-jax index-builder` starts first (it prepares the corpus and builds the first index from the
    initial parameters), then, once the corpus is ready, `realm-jax pretrain` (`index_refresh='async'`
    in the experiment), which waits in `IndexWatcher.before_step` for that first index;
  * each process gets its own devices: on a CPU host, its own share of the cores (CPU affinity) and
    its own `--xla_force_host_platform_device_count`;
  * each writes its own log, `WORKDIR/logs/trainer.log` and `WORKDIR/logs/index-builder.log`, echoed
    here line by line with a `[trainer]` / `[index-builder]` prefix (`--quiet` turns that off);
  * Ctrl-C / SIGTERM are forwarded to both process groups (a second Ctrl-C kills them);
  * when the trainer ends, the builder embeds its final checkpoint and exits by itself (`TRAIN_STEPS`
    is bound for both); after `--builder_grace_s` it is stopped. A failing builder stops the trainer.

The exit code is the trainer's (or the builder's when the builder failed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

from realm_jax import cli
from realm_jax.retrieval import trainer_done

DEFAULT_EXPERIMENT = "experiments/cpu/pretrain_async_minilm.gin"
TRAINER, BUILDER = "trainer", "index-builder"
START_CONDITIONS = ("now", "corpus", "first_index")


def split_cpus(cpus: Sequence[int], trainer_share: float = 0.5) -> tuple[list[int], list[int]]:
  """Splits the usable CPU ids into (trainer, builder) sets, each non-empty when there are ≥ 2 CPUs.

  Args:
    cpus: CPU ids this process may run on (`os.sched_getaffinity(0)`).
    trainer_share: the trainer's fraction of the CPUs (rounded, at least one CPU each).

  Returns:
    `(trainer_cpus, builder_cpus)`; both equal to all CPUs when there is only one.
  """
  cpus = sorted(cpus)
  if len(cpus) < 2:
    return list(cpus), list(cpus)
  n = min(len(cpus) - 1, max(1, round(len(cpus) * trainer_share)))
  return cpus[:n], cpus[n:]


def child_env(num_devices: int | None, base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of one child: unbuffered output and, on CPU, its own simulated device count.

  An `--xla_force_host_platform_device_count` already in `XLA_FLAGS` is replaced.
  """
  env = dict(os.environ if base is None else base)
  env["PYTHONUNBUFFERED"] = "1"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if num_devices is not None:
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={num_devices}")
    env["XLA_FLAGS"] = " ".join(flags)
  return env


@dataclasses.dataclass
class Child:
  """One started job: its name, process (own process group), log file and CPU set."""

  name: str
  process: subprocess.Popen
  log_path: pathlib.Path
  cpus: list[int] | None

  def signal(self, signum: int) -> None:
    """Sends `signum` to the job's whole process group (no-op once it has exited)."""
    if self.process.poll() is None:
      try:
        os.killpg(self.process.pid, signum)
      except ProcessLookupError:
        pass  # Exited between poll() and killpg().


def start_child(name: str, command: str, gin_files: Sequence[str], gin_params: Sequence[str],
                workdir: str, log_path: pathlib.Path, num_devices: int | None,
                cpus: Sequence[int] | None) -> Child:
  """Starts `python -m realm_jax.cli COMMAND …` in its own session, output appended to `log_path`."""
  argv = [sys.executable, "-m", "realm_jax.cli", command]
  for f in gin_files:
    argv += ["--gin_file", f]
  for p in gin_params:
    argv += ["--gin_param", p]
  argv += ["--workdir", workdir]
  log_path.parent.mkdir(parents=True, exist_ok=True)
  log = open(log_path, "ab")
  log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
  log.flush()
  process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=child_env(num_devices), cwd=cli.PROJECT_ROOT,
                             start_new_session=True)
  log.close()
  if cpus:
    # Set right after the exec, before the interpreter starts any thread: every thread inherits it.
    try:
      os.sched_setaffinity(process.pid, set(cpus))
    except (OSError, AttributeError):
      cpus = None
  return Child(name, process, log_path, list(cpus) if cpus else None)


class LogEcho:
  """Follows the children's log files and prints their complete lines with a `[name]` prefix.

  Progress bars (`\\r` updates) are reduced to their last state of each line.
  """

  def __init__(self, out: IO[str] = sys.stdout, interval_s: float = 0.5):
    self.out, self.interval_s = out, interval_s
    self._files: list[tuple[str, pathlib.Path, int]] = []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name="log-echo", daemon=True)
    self._lock = threading.Lock()

  def follow(self, name: str, path: pathlib.Path) -> None:
    offset = path.stat().st_size if path.exists() else 0
    with self._lock:
      self._files.append((name, path, offset))
    if not self._thread.is_alive():
      self._thread.start()

  def _pump(self) -> None:
    with self._lock:
      files = list(self._files)
    updated = []
    for name, path, offset in files:
      try:
        with open(path, "rb") as f:
          f.seek(offset)
          chunk = f.read()
      except FileNotFoundError:
        chunk = b""
      end = chunk.rfind(b"\n") + 1
      for line in chunk[:end].decode("utf-8", "replace").split("\n"):
        line = line.split("\r")[-1].rstrip()
        if line:
          self.out.write(f"[{name}] {line}\n")
      updated.append((name, path, offset + end))
    self.out.flush()
    with self._lock:
      self._files = updated

  def _loop(self) -> None:
    while not self._stop.wait(self.interval_s):
      self._pump()

  def close(self) -> None:
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join()
    self._pump()


def _builder_status(workdir: str) -> dict:
  try:
    return json.loads((pathlib.Path(workdir) / "index_builder" / "status.json").read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return {}


def wait_for_builder(builder: Child, workdir: str, condition: str, timeout_s: float) -> None:
  """Blocks until the builder has loaded its corpus (`corpus`) or committed an index (`first_index`).

  Raises:
    RuntimeError: if the builder exits first, or `timeout_s` passes.
  """
  if condition == "now":
    return
  from realm_jax.retrieval import snapshot as snapshot_lib
  deadline = time.monotonic() + timeout_s
  snapshots = pathlib.Path(workdir) / "snapshots"
  while True:
    status = _builder_status(workdir)
    if (condition == "corpus" and status.get("pid") == builder.process.pid
        and status.get("phase") not in (None, "loading_corpus")):
      return
    if condition == "first_index" and snapshot_lib.latest_snapshot(snapshots) is not None:
      return
    if builder.process.poll() is not None:
      raise RuntimeError(f"the index builder exited with code {builder.process.returncode} before "
                         f"the trainer could start; see {builder.log_path}")
    if time.monotonic() > deadline:
      raise RuntimeError(f"the index builder did not reach '{condition}' in {timeout_s:.0f} s; see "
                         f"{builder.log_path}")
    time.sleep(0.5)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="realm_jax.launch_local", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", action="append", default=[],
                 help=f"experiment gin file(s) for both jobs (default {DEFAULT_EXPERIMENT})")
  p.add_argument("--gin_param", action="append", default=[], help="binding for both jobs")
  p.add_argument("--trainer_gin_param", action="append", default=[], help="trainer-only binding")
  p.add_argument("--index_gin_param", action="append", default=[],
                 help="index-builder-only binding")
  p.add_argument("--workdir", default=None,
                 help="shared work directory (default workdirs/<experiment name>)")
  p.add_argument("--trainer_command", default="pretrain", choices=("pretrain",),
                 help="the trainer's realm-jax command")
  p.add_argument("--trainer_devices", type=int, default=1,
                 help="simulated CPU devices of the trainer (XLA flag); 0 leaves XLA_FLAGS alone")
  p.add_argument("--index_devices", type=int, default=1,
                 help="simulated CPU devices of the index builder; 0 leaves XLA_FLAGS alone")
  p.add_argument("--trainer_cpu_share", type=float, default=0.5,
                 help="fraction of the CPU cores pinned to the trainer (the rest: the builder)")
  p.add_argument("--no_pin_cpus", action="store_true", help="do not set CPU affinities")
  p.add_argument("--trainer_starts_after", choices=START_CONDITIONS, default="corpus",
                 help="start the trainer once the builder has prepared the corpus (default: the two "
                      "never prepare the same TFDS data at once; the trainer's own data preparation "
                      "overlaps the first index), has committed its first index, or now")
  p.add_argument("--start_timeout_s", type=float, default=3600.0)
  p.add_argument("--builder_grace_s", type=float, default=1800.0,
                 help="after the trainer ends, how long the builder may take to embed the final "
                      "checkpoint before it is stopped")
  p.add_argument("--quiet", action="store_true", help="do not echo the logs here")
  return p


def exit_code(returncode: int | None) -> int:
  """A child's return code as a shell exit status: killed by signal N → 128 + N."""
  if returncode is None:
    return 1
  return 128 - returncode if returncode < 0 else returncode


def _stop(children: Sequence[Child], signum: int, wait_s: float = 30.0) -> None:
  """Sends `signum` to every running child, then SIGKILL to those still running after `wait_s`."""
  for child in children:
    child.signal(signum)
  deadline = time.monotonic() + wait_s
  for child in children:
    try:
      child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      child.signal(signal.SIGKILL)
      child.process.wait()


def main(argv: Sequence[str] | None = None) -> int:
  """Runs both jobs to completion; returns the exit code (see the module docstring)."""
  args = _parser().parse_args(argv)
  gin_files = args.gin_file or [DEFAULT_EXPERIMENT]
  workdir = args.workdir or cli.default_workdir(args.trainer_command, gin_files)
  workdir = str(pathlib.Path(workdir).resolve())
  logs = pathlib.Path(workdir) / "logs"
  trainer_cpus = builder_cpus = None
  if not args.no_pin_cpus and hasattr(os, "sched_getaffinity"):
    trainer_cpus, builder_cpus = split_cpus(os.sched_getaffinity(0), args.trainer_cpu_share)
  echo = None if args.quiet else LogEcho()
  children: list[Child] = []
  interrupted = {"count": 0}

  def forward(signum, frame):  # noqa: ARG001
    interrupted["count"] += 1
    sig = signum if interrupted["count"] == 1 else signal.SIGKILL
    print(f"launch_local: forwarding {signal.Signals(sig).name} to "
          f"{', '.join(c.name for c in children)}", file=sys.stderr, flush=True)
    for child in children:
      child.signal(sig)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    trainer_done.clear_trainer_done(workdir)  # A new trainer run: an old "done" marker is void.
    builder = start_child(BUILDER, "index-builder", gin_files,
                          [*args.gin_param, *args.index_gin_param], workdir,
                          logs / f"{BUILDER}.log", args.index_devices or None, builder_cpus)
    children.append(builder)
    print(f"launch_local: {BUILDER} pid {builder.process.pid} (CPUs {builder_cpus}), log "
          f"{builder.log_path}", flush=True)
    if echo is not None:
      echo.follow(BUILDER, builder.log_path)
    try:
      wait_for_builder(builder, workdir, args.trainer_starts_after, args.start_timeout_s)
    except RuntimeError as e:
      if interrupted["count"]:
        return 130
      print(f"launch_local: {e}", file=sys.stderr)
      _stop(children, signal.SIGTERM)
      return exit_code(builder.process.returncode) or 1
    if interrupted["count"]:
      _stop(children, signal.SIGTERM)
      return 130
    trainer = start_child(TRAINER, args.trainer_command, gin_files,
                          [*args.gin_param, *args.trainer_gin_param], workdir,
                          logs / f"{TRAINER}.log", args.trainer_devices or None, trainer_cpus)
    children.append(trainer)
    print(f"launch_local: {TRAINER} pid {trainer.process.pid} (CPUs {trainer_cpus}), log "
          f"{trainer.log_path}", flush=True)
    if echo is not None:
      echo.follow(TRAINER, trainer.log_path)

    while trainer.process.poll() is None:
      if builder.process.poll() not in (None, 0):
        print(f"launch_local: the index builder failed (exit {builder.process.returncode}); "
              f"stopping the trainer, which would wait for fresh indexes. See {builder.log_path}",
              file=sys.stderr, flush=True)
        _stop([trainer], signal.SIGTERM)
        return exit_code(builder.process.returncode)
      time.sleep(0.5)
    code = exit_code(trainer.process.returncode)
    if interrupted["count"]:
      code = code or 130
    if code == 0 and builder.process.poll() is None:
      print(f"launch_local: trainer done; waiting up to {args.builder_grace_s:.0f} s for the index "
            "builder to embed the final checkpoint", flush=True)
      try:
        builder.process.wait(timeout=args.builder_grace_s)
      except subprocess.TimeoutExpired:
        _stop([builder], signal.SIGTERM)
    elif builder.process.poll() is None:
      _stop([builder], signal.SIGTERM)
    _print_refreshes(workdir)
    return code
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    if any(c.process.poll() is None for c in children):
      _stop(children, signal.SIGTERM)
    if echo is not None:
      echo.close()


def _print_refreshes(workdir: str) -> None:
  """A short table of the snapshots the builder committed (from `refreshes.jsonl`)."""
  from realm_jax import index_builder
  records = index_builder.read_refreshes(workdir)
  if not records:
    return
  print(f"launch_local: {len(records)} snapshot(s) committed under {workdir}/snapshots")
  print("  params_step  source      embed_s  total_s  resumed_shards")
  for r in records:
    print(f"  {r['params_step']:>11}  {r['source']:<10} {r['embed_s']:>8.1f} {r['total_s']:>8.1f}  "
          f"{len(r['skipped_shards']):>14}")


if __name__ == "__main__":
  sys.exit(main())
