"""Soak (issue #14 §6): the CPU pipeline, trainer plus index builder, for a set time with index
refreshes, SIGKILLs and restarts; it ends with the same final metrics as a run without them, and
leaves no process, temporary directory or unbounded log behind.

    # The 30-minute soak (~65 minutes in all: ~1 minute of calibration, the reference, the soak)
    REALM_JAX_SOAK_MINUTES=30 .venv/bin/python -m pytest -m slow tests/test_soak.py -s
    # A fixed number of steps instead (no calibration), e.g. a quick check:
    REALM_JAX_SOAK_STEPS=40 .venv/bin/python -m pytest -m slow tests/test_soak.py -s

The pipeline is what scripts/local_async_pretrain.sh runs: `python -m realm_jax.launch_local` starts
`realm-jax index-builder` and `realm-jax pretrain` (index_refresh='async') on one work directory,
each pinned to its own CPU cores with its own log (WORKDIR/logs); the trainer checkpoints every
`REFRESH_EVERY` steps, the builder re-embeds the corpus with each checkpoint's retriever and commits
a snapshot, and the trainer's `IndexWatcher` swaps it in. Tiny model (experiments/models/tiny.gin),
a 48-block corpus in two length buckets, random-token masking, ScaNN (brute force at this size) as
the trainer's searcher, 8 held-out examples evaluated at the end.

The soak test:
  1. sets the number of steps: REALM_JAX_SOAK_STEPS, or from REALM_JAX_SOAK_MINUTES (default 30)
     with the step time (refresh waits included) and the start-up time measured by a short
     calibration run of the same pipeline, so that the soak run with its restarts lasts about that
     long;
  2. runs the reference: the launcher, uninterrupted;
  3. runs the soak: the same command; SIGKILLs the trainer at a seeded random moment after a seeded
     random step of the first half (the launcher then stops the builder with SIGTERM) and restarts
     the same command; SIGKILLs the index builder at the first refresh after a seeded random step of
     the second half, while it is embedding the corpus (a seeded number of shards, not all, of the
     snapshot staged; the launcher then stops the waiting trainer) and restarts again; runs to the
     end (REALM_JAX_SOAK_KILLS chooses the victims, default "trainer,builder");
  4. compares: every step the trainer logged in any segment, the final segment's history, the final
     evaluation, the final checkpoint's params and data position and the final snapshot against the
     reference run, and checks that each restart resumed (the trainer from its newest checkpoint,
     the builder from its staged shards);
  5. checks for leaks in all its runs: no process of the runs is left (by work directory, and no
     child of this test), the TMPDIR given to the jobs is empty, no staging or temporary entry is
     left in a work directory (snapshots/.tmp-*, orbax tmp checkpoints, *.partial, TFDS
     incomplete.*, corpus staging), at most 3 checkpoints and 3 snapshots are kept, and every log is
     below `LOG_BYTES_PER_START` per start plus `*_LOG_BYTES_PER_STEP` per step.

Noise: none, the comparison is exact. The refresh points are made deterministic: with
MAX_INDEX_STALENESS_STEPS = REFRESH_EVERY - 1, step s (s updates done) can only search the
snapshot of checkpoint floor(s / REFRESH_EVERY) * REFRESH_EVERY: an older one is over the staleness
bound (the trainer waits for the builder), a newer one cannot exist before that step is trained. The
asynchrony left is in when things happen, not in what each step computes, and on CPU the steps
are deterministic (see tests/training/test_preemption.py), so the killed run must match bit for bit.
A free-running pipeline (a larger bound) swaps indexes in at timing-dependent steps, so two runs
differ without any fault, and a tolerance wide enough for that would also pass a resume that uses
the wrong index: tests/training/test_preemption.py measured such an error at ~1e-6 relative on the
tiny model.

The fast tests at the end are the regression tests of the two defects the soak found.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
REFRESH_EVERY = 10  # checkpoint interval = refresh cadence
NUM_BLOCKS = 48
BLOCKS_PER_SHARD = 8  # 6 shards per snapshot, 0.1 s pause after each: the builder can be caught
NUM_SHARDS = NUM_BLOCKS // BLOCKS_PER_SHARD
SHARD_PAUSE_S = 0.1
KEEP = 3  # checkpoints (LoopConfig.keep_checkpoints) and snapshots (INDEX_KEEP_SNAPSHOTS) kept
MINUTES = float(os.environ.get("REALM_JAX_SOAK_MINUTES", "30"))
STEPS = os.environ.get("REALM_JAX_SOAK_STEPS", "")
SEED = int(os.environ.get("REALM_JAX_SOAK_SEED", "6"))
KILLS = tuple(k for k in os.environ.get("REALM_JAX_SOAK_KILLS", "trainer,builder").split(",") if k)
# Log bounds. Measured on 2 CPU cores: the trainer writes ~1.4 KiB per step (one metrics line per
# step, log_every_steps=1, and its progress bar), the builder ~0.25 KiB per step (~2.3 KiB per
# refresh: one bar and two lines per shard, every 10 steps); each start adds ~10-20 KiB (data
# preparation bars, compilation warnings).
LOG_BYTES_PER_START = 64 << 10
TRAINER_LOG_BYTES_PER_STEP = 2 << 10
BUILDER_LOG_BYTES_PER_STEP = 1 << 10
_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
          "sigma tau upsilon").split()
_STEP_LINE = re.compile(r"INFO root: REALM pre-training step (\d+): (\{[^\n\r]*\})")
# Metrics that are not a function of the training state: timings and per-process counters.
_NONDETERMINISTIC = ("perf/", "index/age_s", "index/swaps", "index/wait_s", "index/swap_latency_ms")

GIN = """
from __gin__ import dynamic_registration
from realm_jax.data import corpus_config
from realm_jax import index_builder
from realm_jax.training import pretrain
from realm_jax.training import loop

include 'experiments/models/tiny.gin'
include 'experiments/runs/pretrain.gin'
include 'experiments/runs/index_builder.gin'

TRAIN_STEPS = {steps}
BATCH_SIZE = 8
LEARNING_RATE = 1e-3
WARMUP_STEPS = 2
SEED = 0
DATA = @pretrain.PretrainDataConfig()
TASK = @pretrain.PretrainConfig()
INDEX_REFRESH = 'async'
REFRESH_EVERY_STEPS = {refresh}
MAX_INDEX_STALENESS_STEPS = {staleness}  # deterministic refresh points (module docstring)
INDEX_POLL_INTERVAL_S = 0.2
INDEX_EMBED_BATCH_SIZE = 8
INDEX_KEEP_SNAPSHOTS = {keep}

pretrain.PretrainDataConfig:
  corpus = @corpus_config.CorpusConfig()
  masking = 'random_token'
corpus_config.CorpusConfig:
  sources = ('{docs}',)
  max_block_length = 64

pretrain.PretrainConfig:
  num_candidates = 4
  query_length = 16
  candidate_length = 32
  max_masks = 3

pretrain.train:
  poll_interval_s = %INDEX_POLL_INTERVAL_S
  index_batch_size = %INDEX_EMBED_BATCH_SIZE
  seed = %SEED
  num_eval_examples = 8

index_builder.run:
  blocks_per_shard = {blocks_per_shard}
  shard_pause_s = {shard_pause}

loop.LoopConfig:
  log_every_steps = 1
  checkpoint_every_steps = %REFRESH_EVERY_STEPS
  keep_checkpoints = {keep}
"""


# ------------------------------------------------------------------------------------ processes


def _cmdlines() -> dict[int, list[str]]:
  """Every process's command line (/proc), by pid."""
  out = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/cmdline", "rb") as f:
          out[int(entry)] = f.read().decode(errors="replace").split("\0")
      except OSError:
        pass  # exited meanwhile
  return out


def _descendants(pid: int) -> list[int]:
  """Living descendants of `pid` (psutil when installed, else /proc/*/stat)."""
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    return [p.pid for p in psutil.Process(pid).children(recursive=True)
            if p.status() != psutil.STATUS_ZOMBIE]
  except ImportError:
    pass
  parents = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
      except OSError:
        continue
      fields = stat[stat.rindex(")") + 2:].split()
      if fields[0] != "Z":
        parents[int(entry)] = int(fields[1])
  found, frontier = [], [pid]
  while frontier:
    kids = [p for p, parent in parents.items() if parent in frontier]
    found += kids
    frontier = kids
  return found


def _processes_of(workdir: pathlib.Path) -> dict[int, str]:
  """Processes with `workdir` as an argument (the launcher and both jobs: `--workdir W`)."""
  names = {str(workdir), str(workdir.resolve())}
  return {pid: " ".join(argv) for pid, argv in _cmdlines().items()
          if names & set(argv) and pid != os.getpid()}


# ------------------------------------------------------------------------------------ the runs


class _Pipeline:
  """Runs `python -m realm_jax.launch_local` on one gin file in work directories under `base`."""

  def __init__(self, base: pathlib.Path, gin: pathlib.Path, env: dict[str, str]):
    self.base, self.gin, self.env = base, gin, env

  def start(self, workdir: pathlib.Path, segment: int) -> tuple[subprocess.Popen, pathlib.Path]:
    out = self.base / f"{workdir.name}.launcher-{segment}.out"
    with open(out, "w") as f:
      proc = subprocess.Popen(
          [sys.executable, "-m", "realm_jax.launch_local", "--gin_file", str(self.gin),
           "--workdir", str(workdir), "--quiet"],
          cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, out

  def run(self, workdir: pathlib.Path, timeout_s: float, segment: int = 1) -> float:
    """Runs the launcher to the end; returns its wall time (s)."""
    t0 = time.monotonic()
    proc, out = self.start(workdir, segment)
    try:
      rc = proc.wait(timeout=timeout_s)
    finally:
      if proc.poll() is None:
        _stop_launcher(proc)
    assert rc == 0, (f"launch_local exited with {rc}:\n{_tail(out)}\n"
                     f"{_tail(workdir / 'logs' / 'trainer.log')}")
    return time.monotonic() - t0


def _stop_launcher(proc: subprocess.Popen) -> None:
  """Stops a launcher that overran (SIGTERM: it forwards it to both jobs)."""
  proc.send_signal(signal.SIGTERM)
  try:
    proc.wait(timeout=60)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


def _child_pid(launcher_out: pathlib.Path, name: str) -> int | None:
  match = re.search(rf"launch_local: {name} pid (\d+)", launcher_out.read_text(errors="replace"))
  return int(match.group(1)) if match else None


def _tail(path: pathlib.Path, n: int = 3000) -> str:
  try:
    return path.read_text(errors="replace")[-n:]
  except FileNotFoundError:
    return f"({path} missing)"


def _logged_steps(text: str) -> dict[int, dict[str, float]]:
  """The trainer's per-step metric lines ("REALM pre-training step N: {...}"), by step."""
  return {int(m.group(1)): ast.literal_eval(m.group(2)) for m in _STEP_LINE.finditer(text)}


def _logged_since(log: pathlib.Path, offset: int) -> dict[int, dict[str, float]]:
  """`_logged_steps` of what `log` got after its first `offset` bytes (this segment's lines)."""
  if not log.exists():
    return {}
  with open(log, "rb") as f:
    f.seek(offset)
    return _logged_steps(f.read().decode(errors="replace"))


def _committed(directory: pathlib.Path) -> list[int]:
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _builder_status(workdir: pathlib.Path) -> dict[str, Any]:
  try:
    return json.loads((workdir / "index_builder" / "status.json").read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return {}


def _shard_records(tmp_dir: pathlib.Path) -> list[int]:
  try:
    return sorted(int(p.name.split("-")[1]) for p in tmp_dir.glob("shard-*.json"))
  except FileNotFoundError:
    return []


def _wait(predicate, proc: subprocess.Popen, out: pathlib.Path, timeout_s: float, what: str):
  deadline = time.monotonic() + timeout_s
  while True:
    value = predicate()
    if value:
      return value
    if proc.poll() is not None:
      pytest.fail(f"the pipeline ended (rc {proc.returncode}) before {what}:\n{_tail(out)}")
    if time.monotonic() > deadline:
      pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}:\n{_tail(out)}")
    time.sleep(0.01)


def _kill_trainer(pipe: _Pipeline, workdir: pathlib.Path, segment: int, after_step: int,
                  delay_s: float, timeout_s: float) -> dict[str, Any]:
  """Starts the pipeline, SIGKILLs the trainer `delay_s` after it has logged `after_step`."""
  log = workdir / "logs" / "trainer.log"
  offset = log.stat().st_size if log.exists() else 0
  proc, out = pipe.start(workdir, segment)

  def logged() -> bool:
    steps = _logged_since(log, offset)
    return bool(steps) and max(steps) >= after_step

  try:
    _wait(logged, proc, out, timeout_s, f"the trainer to log step {after_step}")
    time.sleep(delay_s)  # somewhere in the next step(s): batch, retrieval, update or a save
    os.kill(_child_pid(out, "trainer"), signal.SIGKILL)
    rc = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      _stop_launcher(proc)
  assert rc == 128 + signal.SIGKILL, (rc, _tail(out))  # the launcher reports the trainer's death
  status = _builder_status(workdir)
  assert status.get("phase") == "stopped" and "signal 15" in status.get("stopped_because", ""), (
      status)  # the launcher stopped the builder with SIGTERM, and it stopped cleanly
  return {"victim": "trainer", "after_step": after_step,
          "checkpoints": _committed(workdir / "checkpoints"),
          "logged": max(_logged_since(log, offset))}


def _kill_builder(pipe: _Pipeline, workdir: pathlib.Path, segment: int, after_step: int,
                  at_least: int, timeout_s: float) -> dict[str, Any]:
  """Starts the pipeline; once the trainer has logged `after_step`, SIGKILLs the builder while it
  embeds the corpus: `at_least` but not all shards of its snapshot staged."""
  log = workdir / "logs" / "trainer.log"
  offset = log.stat().st_size if log.exists() else 0
  proc, out = pipe.start(workdir, segment)
  builder_pid = None

  def mid_corpus():
    nonlocal builder_pid
    builder_pid = builder_pid or _child_pid(out, "index-builder")
    status = _builder_status(workdir)
    if (builder_pid is None or status.get("pid") != builder_pid
        or status.get("phase") != "embedding"):
      return None
    steps = _logged_since(log, offset)
    if not steps or max(steps) < after_step:
      return None
    step = status["params_step"]
    records = _shard_records(workdir / "snapshots" / f".tmp-{step}")
    return (step, records) if at_least <= len(records) < NUM_SHARDS else None

  try:
    step, _ = _wait(mid_corpus, proc, out, timeout_s,
                    f"the builder to embed a snapshot after step {after_step}")
    os.kill(builder_pid, signal.SIGKILL)
    rc = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      _stop_launcher(proc)
  assert rc == 128 + signal.SIGKILL, (rc, _tail(out))  # the launcher reports the builder's death
  records = _shard_records(workdir / "snapshots" / f".tmp-{step}")
  assert at_least <= len(records) < NUM_SHARDS, records
  assert not (workdir / "snapshots" / str(step)).exists()
  return {"victim": "builder", "after_step": after_step, "params_step": step, "records": records,
          "checkpoints": _committed(workdir / "checkpoints"),
          "logged": max(_logged_since(log, offset))}


# ------------------------------------------------------------------------------------ checks


def _deterministic(metrics: dict[str, float]) -> dict[str, float]:
  return {k: v for k, v in metrics.items() if k != "step" and not k.startswith(_NONDETERMINISTIC)}


def _assert_same_metrics(got: dict[str, float], want: dict[str, float], where: str) -> None:
  got, want = _deterministic(got), _deterministic(want)
  assert got.keys() == want.keys(), (where, sorted(got.keys() ^ want.keys()))
  differ = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
  assert not differ, (f"{where} differs from the uninterrupted run: {{key: (soak, reference)}} = "
                     f"{differ}")


def _final_checkpoint(workdir: pathlib.Path, step: int):
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step_dir = workdir / "checkpoints" / str(step)
  with warnings.catch_warnings():  # "Sharding info not provided": read from the checkpoint
    warnings.simplefilter("ignore", UserWarning)
    params = ocp.PyTreeCheckpointer().restore(str(step_dir / "params"))
  meta = json.loads((step_dir / "meta" / "metadata").read_text())
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)], meta


_LEFTOVER = re.compile(r"(^\.tmp-|^\.old-|^\.deleting-|orbax-checkpoint-tmp|\.partial$|"
                       r"^incomplete\.|^\.realm_corpus|^\.part-|^tmp)")


def _check_leaks(workdir: pathlib.Path, steps: int, starts: int) -> dict[str, int]:
  """No process, staging entry or unbounded log of the run in `workdir`; returns the log sizes."""
  assert not _processes_of(workdir), _processes_of(workdir)
  leftovers = [str(p.relative_to(workdir)) for p in workdir.rglob("*") if _LEFTOVER.search(p.name)]
  assert not leftovers, leftovers
  for kept in ("checkpoints", "snapshots"):  # only committed steps, at most KEEP of them
    names = sorted(os.listdir(workdir / kept))
    assert names == sorted(str(s) for s in _committed(workdir / kept)) and len(names) <= KEEP, (
        kept, names)
  sizes = {p.name: p.stat().st_size for p in (workdir / "logs").iterdir()}
  limits = {"trainer.log": starts * LOG_BYTES_PER_START + steps * TRAINER_LOG_BYTES_PER_STEP,
            "index-builder.log": starts * LOG_BYTES_PER_START + steps * BUILDER_LOG_BYTES_PER_STEP}
  assert sizes.keys() == limits.keys(), sizes
  for name, size in sizes.items():
    assert size <= limits[name], f"{workdir}/logs/{name}: {size} bytes > {limits[name]}"
  journal = (workdir / "index_builder" / "refreshes.jsonl").read_text().splitlines()
  assert len(journal) <= steps // REFRESH_EVERY + 1 + starts, len(journal)  # one line per commit
  return sizes


# ------------------------------------------------------------------------------------ the soak


@pytest.fixture(scope="module")
def soak_base(tmp_path_factory):
  base = tmp_path_factory.mktemp("soak")
  docs = base / "docs.jsonl"
  with open(docs, "w") as f:  # 48 blocks of 24 to 57 wordpieces (two length buckets)
    for i in range(NUM_BLOCKS):
      text = (f"{_WORDS[i % 20].capitalize()} {i} is a town on the {_WORDS[(i * 7) % 20]} river. "
              f"It was founded in {1800 + i} by {_WORDS[(i * 3) % 20]} settlers.")
      text += "".join(f" The {_WORDS[(i + j) % 20]} market opened in {1900 + j}."
                      for j in range(i % 3 * 2))
      f.write(json.dumps({"title": f"Town {i}", "text": text}) + "\n")
  jobs_tmp = base / "jobs-tmp"  # the jobs' TMPDIR: must be empty at the end
  jobs_tmp.mkdir()
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", TMPDIR=str(jobs_tmp),
             JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),  # restarts load the executables
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return base, docs, jobs_tmp, env


def _write_gin(base: pathlib.Path, docs: pathlib.Path, steps: int, name: str) -> pathlib.Path:
  path = base / f"{name}.gin"
  path.write_text(GIN.format(steps=steps, refresh=REFRESH_EVERY, staleness=REFRESH_EVERY - 1,
                             keep=KEEP, docs=docs, blocks_per_shard=BLOCKS_PER_SHARD,
                             shard_pause=SHARD_PAUSE_S))
  return path


def _plan_steps(base, docs, env) -> tuple[int, dict[str, float]]:
  """The soak's step count: REALM_JAX_SOAK_STEPS, or calibrated to REALM_JAX_SOAK_MINUTES."""
  if STEPS:
    return int(STEPS), {}
  steps = 3 * REFRESH_EVERY
  workdir = base / "calibration"
  wall = _Pipeline(base, _write_gin(base, docs, steps, "calibration"), env).run(workdir, 1800)
  history = json.loads((workdir / "summary.json").read_text())["history"]
  # Steady state: steps REFRESH_EVERY+1 … 3 REFRESH_EVERY hold 2 refresh waits per 2 REFRESH_EVERY.
  step_s = float(np.mean([h["perf/step_time_s"] for h in history if h["step"] > REFRESH_EVERY]))
  startup_s = max(wall - sum(h["perf/step_time_s"] for h in history), 0.0)
  budget_s = MINUTES * 60 - (1 + len(KILLS)) * startup_s
  planned = max(4, int(budget_s / step_s) // REFRESH_EVERY) * REFRESH_EVERY
  _check_leaks(workdir, steps, 1)
  return planned, {"step_s": step_s, "startup_s": startup_s, "calibration_wall_s": wall}


@pytest.mark.slow
def test_soak_pipeline_with_sigkills_matches_an_uninterrupted_run(soak_base, comparable_manifest):
  base, docs, jobs_tmp, env = soak_base
  assert set(KILLS) <= {"trainer", "builder"}, KILLS
  t_start = time.monotonic()
  steps, calibration = _plan_steps(base, docs, env)
  assert steps >= 4 * REFRESH_EVERY, steps
  pipe = _Pipeline(base, _write_gin(base, docs, steps, "soak"), env)
  timeout_s = 3 * (MINUTES * 60 if not STEPS else steps * 2) + 900

  reference_dir = base / "reference"
  reference_wall = pipe.run(reference_dir, timeout_s)
  reference = json.loads((reference_dir / "summary.json").read_text())
  assert reference["start_step"] == 0 and reference["steps"] == steps

  # The soak run: seeded random kill points, the trainer's in the first half, the builder's in the
  # second half of the steps.
  rng = np.random.default_rng(SEED)
  workdir = base / "soak"
  t0 = time.monotonic()
  kills = []
  for segment, victim in enumerate(KILLS, start=1):
    lo, hi = (0.15, 0.45) if segment == 1 else (0.55, 0.85)
    after_step = int(rng.integers(int(lo * steps), int(hi * steps)))
    if victim == "trainer":
      kill = _kill_trainer(pipe, workdir, segment, after_step, float(rng.uniform(0.0, 0.5)),
                           timeout_s)
    else:
      kill = _kill_builder(pipe, workdir, segment, after_step,
                           int(rng.integers(1, NUM_SHARDS - 1)), timeout_s)
    kills.append(kill)
    print(f"soak: killed the {victim} after step {kill['logged']} (wanted >= {after_step}); "
          f"checkpoints {kill['checkpoints']}" +
          (f", staged shards {kill['records']} of snapshot {kill['params_step']}"
           if victim == "builder" else ""))
  pipe.run(workdir, timeout_s, segment=len(KILLS) + 1)
  soak_wall = time.monotonic() - t0
  soak = json.loads((workdir / "summary.json").read_text())

  # Each restart resumed: the trainer at its newest checkpoint (the next segment's first logged
  # step follows it), the builder from its staged shards.
  text = (workdir / "logs" / "trainer.log").read_text(errors="replace")
  segments = text.split("==== ")[1:]  # the launcher starts each segment's log with "==== "
  assert len(segments) == len(KILLS) + 1
  for kill, segment_text in zip(kills, segments[1:]):
    first = min(_logged_steps(segment_text))
    assert first == kill["checkpoints"][-1] + 1, (kill, first)
  assert soak["start_step"] == (kills[-1]["checkpoints"][-1] if kills else 0)
  refreshes = [json.loads(line) for line in
               (workdir / "index_builder" / "refreshes.jsonl").read_text().splitlines()]
  for kill in kills:
    if kill["victim"] == "builder":
      [resumed] = [r for r in refreshes if r["params_step"] == kill["params_step"]]
      assert resumed["skipped_shards"] == kill["records"], (resumed, kill)

  # The same metrics as the uninterrupted run, bit for bit: every step logged by any segment (the
  # steps trained twice too), the final history, the final evaluation, params and index.
  want = {h["step"]: h for h in reference["history"]}
  logged_all = [(step, metrics) for segment_text in segments
                for step, metrics in _logged_steps(segment_text).items()]
  assert {s for s, _ in logged_all} == set(range(1, steps + 1))
  for step, metrics in logged_all:
    _assert_same_metrics(metrics, want[step], f"logged step {step}")
  assert [h["step"] for h in soak["history"]] == list(range(soak["start_step"] + 1, steps + 1))
  for h in soak["history"]:
    _assert_same_metrics(h, want[h["step"]], f"step {h['step']}")
  assert all(h["index/params_step"] == (h["step"] - 1) // REFRESH_EVERY * REFRESH_EVERY
             for h in soak["history"])  # the pinned refresh points
  assert soak["eval_final"] == reference["eval_final"]
  assert soak["final_snapshot_params_step"] == reference["final_snapshot_params_step"]
  got_params, got_meta = _final_checkpoint(workdir, steps)
  want_params, want_meta = _final_checkpoint(reference_dir, steps)
  assert got_meta["data"] == want_meta["data"]
  for got, wanted in zip(got_params, want_params, strict=True):
    np.testing.assert_array_equal(got, wanted)
  assert (comparable_manifest(workdir / "snapshots" / str(steps)) ==
          comparable_manifest(reference_dir / "snapshots" / str(steps)))

  # No leaks: processes, temporary directories, staging entries; bounded logs and disk.
  starts = len(KILLS) + 1
  sizes = {"reference": _check_leaks(reference_dir, steps, 1),
           "soak": _check_leaks(workdir, steps, starts)}
  assert not _descendants(os.getpid()), _descendants(os.getpid())
  assert not list(jobs_tmp.iterdir()), sorted(p.name for p in jobs_tmp.iterdir())
  print(f"soak: {steps} steps; reference {reference_wall:.0f} s, soak run {soak_wall:.0f} s "
        f"({starts} starts), test {time.monotonic() - t_start:.0f} s; calibration {calibration}; "
        f"{len(refreshes)} snapshots committed in the soak run; kills {kills}; log bytes {sizes}; "
        f"final train/loss {soak['history'][-1]['train/loss']}, eval {soak['eval_final']}")


# ------------------------------------------------------------------------------------ regressions


def test_tfds_builders_leave_no_temporary_directory(tmp_path, monkeypatch):
  """A TFDS builder of this package looked its dataset up on gs://tfds-data before preparing it,
  through `DatasetInfo.initialize_from_bucket`, which leaves an empty `tmp*tfds` directory in the
  system temp directory: two per fresh pre-training data preparation, one per question set."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from realm_jax.data import pretraining  # pylint: disable=g-import-not-at-top
  from realm_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  system_tmp = tmp_path / "system-tmp"
  system_tmp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
  for cls in (pretraining.RealmSalientSentences, pretraining.RealmPretrainingExamples):
    builder = cls(data_dir=str(tmp_path / "tfds"), file_format="array_record",
                  config=tfds.core.BuilderConfig(name=f"never-prepared-{cls.__name__.lower()}"))
    assert isinstance(builder.info, tfds_builders.LocalDatasetInfo)
  questions = tfds_builders.build_questions(
      {"dev": str(ROOT / "tests" / "fixtures" / "data" / "nq_open_dev_head5.jsonl")}, "nq_open",
      tmp_path / "tfds")
  assert len(questions["dev"]) == 5
  assert not list(system_tmp.iterdir()), sorted(p.name for p in system_tmp.iterdir())


def test_no_checkpoint_before_the_first_interval(tmp_path):
  """orbax's default policy also saved the first step of a fresh run: in asynchronous pre-training
  the index builder then re-embedded the whole corpus for step-1 params, and whether steps 2 … 9
  searched that index or the initial one depended on timing."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from realm_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  manager = checkpointing.CheckpointManager(str(tmp_path / "checkpoints"), save_interval_steps=3,
                                            async_save=False)
  try:
    assert [manager.should_save(s) for s in (1, 2, 3, 4, 6)] == [False, False, True, False, True]
    for step in (1, 2, 3, 4):
      manager.save(step, {"w": jnp.ones(2)}, {"m": jnp.zeros(1)}, {"data": step},
                   force=step == 4)  # the loop forces the final step's save
    manager.wait_until_finished()
    assert manager.all_steps() == [3, 4]
  finally:
    manager.close()


def test_checkpoint_pruned_while_the_index_builder_lists_them(tmp_path, monkeypatch):
  """The index builder's read-only orbax manager lists the step directories, then reads each
  step's metadata; the trainer pruned the oldest one in between, and orbax raised
  `NotADirectoryError: Path is not a directory: …/checkpoints/5350`, which killed the builder
  (found by the 30-minute soak). The listing is now taken again."""
  import shutil  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.metadata import checkpoint as ocp_metadata  # pylint: disable=g-import-not-at-top
  from realm_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  directory = tmp_path / "checkpoints"
  manager = checkpointing.CheckpointManager(str(directory), save_interval_steps=1,
                                            async_save=False)
  try:
    for step in (10, 20, 30):
      manager.save(step, {"retriever": {"w": jnp.full(2, float(step))}}, {"m": jnp.zeros(1)},
                   {"data": step})
    manager.wait_until_finished()
  finally:
    manager.close()
  original = ocp_metadata._sanitize_metadata_path  # pylint: disable=protected-access
  pruned = []

  def prune_then_read(path):  # The trainer deletes step 10 just as its metadata is read.
    if os.path.basename(str(path)) == "10" and not pruned:
      shutil.rmtree(path)
      pruned.append(str(path))
    return original(path)

  monkeypatch.setattr(ocp_metadata, "_sanitize_metadata_path", prune_then_read)
  target = {"retriever": {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}}
  params, step = checkpointing.restore_partial_params(str(directory), target)
  assert pruned and step == 30
  np.testing.assert_array_equal(np.asarray(params["retriever"]["w"]), [30.0, 30.0])
  # A directory that keeps changing under every listing: a FileNotFoundError, which the index
  # builder answers by polling again (never a traceback that ends the job).
  monkeypatch.setattr(ocp_metadata, "_sanitize_metadata_path",
                      lambda path: (_ for _ in ()).throw(NotADirectoryError(str(path))))
  with pytest.raises(FileNotFoundError, match="deleted while being listed"):
    checkpointing.restore_partial_params(str(directory), target)
