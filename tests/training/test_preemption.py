"""Preemption (issue #14 §1): SIGKILL a trainer at a random step, restart it with the same command.

For fine-tuning, ICT and REALM pre-training, each test

  1. runs `realm-jax <trainer>` for `STEPS` steps uninterrupted in a subprocess (the reference;
     one history entry per step, `log_every_steps=1`);
  2. starts the same command in a subprocess, waits until it has logged a seeded random step and a
     checkpoint at step >= 2 is committed, and kills it with SIGKILL (no clean-up runs: an
     asynchronous orbax save may be cut half-way);
  3. restarts the same command and checks that it resumed from the newest committed checkpoint
     (`summary.json` `start_step`), that it logged exactly the steps after it, and that every
     deterministic metric of those steps (loss, gradient norm, accuracies, learning rate, retrieval
     and index metrics) equals the reference's, bit for bit; and that the final checkpoints hold the
     same params and the same data-order position.

Bit-for-bit, not within a tolerance: on CPU the steps are deterministic (one seeded permutation per
epoch for the data, dropout keys folded with the step), and a real resume error can be small on
these tiny models: training on an index one refresh too new moves the tiny REALM loss by ~1e-6
relative, below any `rtol=1e-5`.

The subprocesses share one JAX persistent compilation cache (the restarted runs load the reference
run's executables), which cuts each restart from ~40 s to ~10 s on 2 CPU cores. Wall times on 2
shared CPU cores: ICT ~60 s, pre-training ~80 s (+ ~40 s for the kill between refresh and
checkpoint, which reuses its reference run), fine-tuning ~85 s (marked slow).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

import numpy as np
import pytest

import realm_fixtures as fx

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 8
CHECKPOINT_EVERY = 2
REFRESH_EVERY = 3  # pre-training's inline index refresh (not a multiple of CHECKPOINT_EVERY)
# Seeds the kill steps; another value (REALM_JAX_PREEMPTION_SEED=…) kills at other steps.
SEED = int(os.environ.get("REALM_JAX_PREEMPTION_SEED", "14"))
TIMEOUT_S = 300
_STEP_LINE = re.compile(r" INFO root: [^\n]* step (\d+): \{")
# Metrics that are not a function of the training state (timings, per-process counters).
_NONDETERMINISTIC = ("perf/", "index/refresh_s", "index/refreshes")

_LOOP = f"""
loop.LoopConfig:
  log_every_steps = 1
  checkpoint_every_steps = {CHECKPOINT_EVERY}
"""

FINETUNE_GIN = """
from __gin__ import dynamic_registration
from realm_jax.data import corpus_config
from realm_jax.training import finetune
from realm_jax.training import loop

include 'experiments/models/tiny.gin'
include 'experiments/runs/finetune.gin'

FIXTURE = 'tests/fixtures/data/squad_dev_tiny.json'
TRAIN_STEPS = {steps}
BATCH_SIZE = 8
LEARNING_RATE = 1e-3
SEARCHER = 'exact'
DATA = @finetune.OpenQADataConfig()
TASK = @finetune.OpenQAConfig()

finetune.OpenQADataConfig:
  corpus = @corpus_config.CorpusConfig()
  train_questions = %FIXTURE
  eval_questions = %FIXTURE
corpus_config.CorpusConfig:
  sources = (%FIXTURE,)
  max_block_length = 64

finetune.OpenQAConfig:
  num_retrieved = 3
  num_read = 2
  query_length = 16
  reader_length = 64
  reader_query_length = 16

finetune.train_and_evaluate:
  index_batch_size = 8
  zero_shot_eval = False
{loop}"""

ICT_GIN = """
from __gin__ import dynamic_registration
from realm_jax.data import corpus_config
from realm_jax.training import ict
from realm_jax.training import loop

include 'experiments/models/tiny.gin'
include 'experiments/runs/ict.gin'

TRAIN_STEPS = {steps}
BATCH_SIZE = 8
LEARNING_RATE = 1e-3
WARMUP_STEPS = 2
DATA = @corpus_config.CorpusConfig()
TASK = @ict.IctConfig()

corpus_config.CorpusConfig:
  sources = ('{docs}',)
  max_block_length = 64

ict.IctConfig:
  query_length = 16
  block_length = 32
{loop}"""

PRETRAIN_GIN = """
from __gin__ import dynamic_registration
from realm_jax.data import corpus_config
from realm_jax.training import pretrain
from realm_jax.training import loop

include 'experiments/models/tiny.gin'
include 'experiments/runs/pretrain.gin'

TRAIN_STEPS = {steps}
BATCH_SIZE = 8
LEARNING_RATE = 1e-3
WARMUP_STEPS = 2
SEARCHER = 'exact'
INDEX_REFRESH = 'inline'
REFRESH_EVERY_STEPS = {refresh}
DATA = @pretrain.PretrainDataConfig()
TASK = @pretrain.PretrainConfig()

pretrain.PretrainDataConfig:
  corpus = @corpus_config.CorpusConfig()
  masking = 'random_token'  # no spaCy pass: seconds saved per start
corpus_config.CorpusConfig:
  sources = ('{docs}',)
  max_block_length = 64

pretrain.PretrainConfig:
  num_candidates = 4
  query_length = 16
  candidate_length = 32
  max_masks = 3

pretrain.train:
  index_batch_size = 8
{loop}"""

# trainer -> (CLI command, gin template). The tiny BERT of models/tiny.gin has dropout 0.1, so the
# dropout keys (the step folded into the run's key) must resume too.
TRAINERS = {"finetune": ("finetune", FINETUNE_GIN), "ict": ("ict", ICT_GIN),
            "pretrain": ("pretrain", PRETRAIN_GIN)}


# ------------------------------------------------------------------------------------ harness


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
  """Gin files, the subprocess environment and the reference runs (computed once per trainer)."""
  base = tmp_path_factory.mktemp("preemption")
  docs = fx.write_jsonl(base / "docs.jsonl")
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  flags = env.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:  # conftest.py sets 8 devices
    env["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
  return _Harness(base, docs, env)


class _Harness:
  """Runs, kills and restarts `realm-jax` trainers in subprocesses."""

  def __init__(self, base: pathlib.Path, docs: str, env: dict[str, str]):
    self.base, self.env = base, env
    self.gin: dict[str, str] = {}
    for name, (_, template) in TRAINERS.items():
      path = base / f"{name}.gin"
      path.write_text(template.format(steps=STEPS, docs=docs, refresh=REFRESH_EVERY, loop=_LOOP))
      self.gin[name] = str(path)
    self._references: dict[str, dict[str, Any]] = {}

  def command(self, trainer: str, workdir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "realm_jax.cli", TRAINERS[trainer][0], "--gin_file",
            self.gin[trainer], "--workdir", str(workdir)]

  def run(self, trainer: str, workdir: pathlib.Path, log_name: str) -> dict[str, Any]:
    """Runs the trainer to the end; returns its `summary.json`."""
    log = self.base / f"{workdir.name}.{log_name}.log"
    with open(log, "w") as out:
      rc = subprocess.run(self.command(trainer, workdir), cwd=ROOT, env=self.env, stdout=out,
                          stderr=subprocess.STDOUT, timeout=TIMEOUT_S).returncode
    assert rc == 0, f"{trainer} exited with {rc}:\n{_tail(log)}"
    return json.loads((workdir / "summary.json").read_text())

  def reference(self, trainer: str) -> dict[str, Any]:
    """The uninterrupted run: its summary and work directory (run once per module)."""
    if trainer not in self._references:
      workdir = self.base / f"{trainer}-reference"
      summary = self.run(trainer, workdir, "reference")
      assert summary["start_step"] == 0
      assert [h["step"] for h in summary["history"]] == list(range(1, STEPS + 1))
      self._references[trainer] = {"summary": summary, "workdir": workdir}
    return self._references[trainer]

  def kill(self, trainer: str, workdir: pathlib.Path, at_step: int,
           ready: Callable[[pathlib.Path], bool] = lambda w: True) -> dict[str, Any]:
    """Starts the trainer and SIGKILLs it once it has logged `at_step`, a checkpoint at step >= 2
    is committed and `ready(workdir)` holds.

    Returns:
      What was on disk and in the log when it died: `logged` (the last step logged),
      `checkpoints` (committed steps), `partial_checkpoints` (orbax temporary directories).
    """
    log = self.base / f"{workdir.name}.killed.log"
    with open(log, "w") as out:
      proc = subprocess.Popen(self.command(trainer, workdir), cwd=ROOT, env=self.env, stdout=out,
                              stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT_S
    try:
      while True:
        if proc.poll() is not None:
          pytest.fail(f"{trainer} ended (rc {proc.returncode}) before it could be killed at step "
                      f"{at_step}:\n{_tail(log)}")
        if time.monotonic() > deadline:
          pytest.fail(f"{trainer} did not reach step {at_step} in {TIMEOUT_S} s:\n{_tail(log)}")
        committed = _committed_checkpoints(workdir)
        if (_logged_steps(log) and max(_logged_steps(log)) >= at_step and committed
            and max(committed) >= 2 and ready(workdir)):
          proc.kill()  # SIGKILL
          break
        time.sleep(0.01)
    finally:
      if proc.poll() is None:
        proc.kill()
      proc.wait(timeout=60)
    assert proc.returncode == -9, proc.returncode
    assert not (workdir / "summary.json").exists()  # it never got to the end
    ckpt_dir = workdir / "checkpoints"
    return {"logged": max(_logged_steps(log)), "checkpoints": _committed_checkpoints(workdir),
            "partial_checkpoints": sorted(p.name for p in ckpt_dir.iterdir()
                                          if not p.name.isdigit())}


def _tail(log: pathlib.Path, n: int = 4000) -> str:
  return log.read_text(errors="replace")[-n:]


def _logged_steps(log: pathlib.Path) -> list[int]:
  return [int(s) for s in _STEP_LINE.findall(log.read_text(errors="replace"))]


def _committed_checkpoints(workdir: pathlib.Path) -> list[int]:
  """Steps of the committed orbax checkpoints (orbax renames `<step>.orbax-checkpoint-tmp-*` to
  `<step>` when a save is complete; that is what its `latest_step` lists)."""
  ckpt_dir = workdir / "checkpoints"
  if not ckpt_dir.is_dir():
    return []
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def _committed_snapshots(workdir: pathlib.Path) -> list[int]:
  root = workdir / "snapshots"
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and (p / "manifest.json").is_file())


def _deterministic(entry: dict[str, Any]) -> dict[str, float]:
  return {k: v for k, v in entry.items() if k != "step" and not k.startswith(_NONDETERMINISTIC)}


def _assert_same_steps(resumed: dict[str, Any], reference: dict[str, Any]) -> int:
  """Every step of `resumed` has the reference's deterministic metrics, bit for bit.

  Returns:
    The number of steps compared.
  """
  by_step = {h["step"]: _deterministic(h) for h in reference["history"]}
  for entry in resumed["history"]:
    got, want = _deterministic(entry), by_step[entry["step"]]
    assert got.keys() == want.keys(), (entry["step"], sorted(got.keys() ^ want.keys()))
    differ = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not differ, (f"step {entry['step']} (resumed at {resumed['start_step']}) differs from "
                        f"the uninterrupted run: {{key: (resumed, reference)}} = {differ}")
  return len(resumed["history"])


def _final_checkpoint(workdir: pathlib.Path) -> tuple[list[np.ndarray], dict[str, Any]]:
  """The params leaves and the metadata of the step-`STEPS` checkpoint."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  step_dir = workdir / "checkpoints" / str(STEPS)
  with warnings.catch_warnings():  # "Sharding info not provided": read from the checkpoint
    warnings.simplefilter("ignore", UserWarning)
    params = ocp.PyTreeCheckpointer().restore(str(step_dir / "params"))
  meta = json.loads((step_dir / "meta" / "metadata").read_text())
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)], meta


def _kill_and_resume(harness: _Harness, trainer: str, index: int,
                     ready: Callable[[pathlib.Path], bool] = lambda w: True) -> dict[str, Any]:
  """Reference, kill at a seeded random step, restart, compare; returns what happened."""
  reference = harness.reference(trainer)
  at_step = int(np.random.default_rng([SEED, index]).integers(3, STEPS - 1))  # 3 … STEPS - 2
  workdir = harness.base / f"{trainer}-killed"
  killed = harness.kill(trainer, workdir, at_step, ready)
  resumed = harness.run(trainer, workdir, "restarted")
  # It resumed from the newest committed checkpoint and ran exactly the remaining steps.
  assert resumed["start_step"] == killed["checkpoints"][-1] >= 2, (resumed["start_step"], killed)
  assert resumed["start_step"] <= killed["logged"]
  assert [h["step"] for h in resumed["history"]] == list(
      range(resumed["start_step"] + 1, STEPS + 1))
  compared = _assert_same_steps(resumed, reference["summary"])
  # The end state: the same params, bit for bit, and the data order at the same example.
  want_params, want_meta = _final_checkpoint(reference["workdir"])
  got_params, got_meta = _final_checkpoint(workdir)
  assert got_meta["data"] == want_meta["data"]
  assert len(got_params) == len(want_params)
  for got, want in zip(got_params, want_params):
    np.testing.assert_array_equal(got, want)
  out = dict(killed, at_step=at_step, start_step=resumed["start_step"], compared=compared)
  print(f"{trainer}: {out}")  # what the kill hit (shown with -s)
  return out


# ------------------------------------------------------------------------------------- tests


def test_ict_resumes_after_sigkill_with_identical_losses(harness):
  out = _kill_and_resume(harness, "ict", 0)
  assert out["compared"] == STEPS - out["start_step"] > 0


@pytest.mark.slow  # ~85 s: the slowest trainer to start; test_cli.py resumes it (without a kill)
def test_finetune_resumes_after_sigkill_with_identical_losses(harness):
  out = _kill_and_resume(harness, "finetune", 1)
  assert out["compared"] == STEPS - out["start_step"] > 0


def _index_not_ahead_of_checkpoint(workdir: pathlib.Path) -> bool:
  """No committed snapshot is newer than the newest committed checkpoint (see the xfail below)."""
  snapshots, checkpoints = _committed_snapshots(workdir), _committed_checkpoints(workdir)
  return bool(snapshots) and bool(checkpoints) and snapshots[-1] <= checkpoints[-1]


def test_pretrain_resumes_after_sigkill_with_identical_losses(harness):
  """Inline index refresh every 3 steps, checkpoints every 2: the kill lands at a random step where
  the newest snapshot is not newer than the newest checkpoint (the other case: the xfail below)."""
  out = _kill_and_resume(harness, "pretrain", 2, ready=_index_not_ahead_of_checkpoint)
  assert out["compared"] == STEPS - out["start_step"] > 0
  resumed = json.loads((harness.base / "pretrain-killed" / "summary.json").read_text())
  # The refresh policy resumed too: the index the reference used at every step.
  assert all(h["retrieval/index_staleness_steps"] >= 0 for h in resumed["history"])


def _index_ahead_of_checkpoint(workdir: pathlib.Path) -> bool:
  snapshots, checkpoints = _committed_snapshots(workdir), _committed_checkpoints(workdir)
  return bool(snapshots) and bool(checkpoints) and snapshots[-1] > checkpoints[-1]


def test_pretrain_killed_between_refresh_and_checkpoint(harness):
  """The kill lands after an inline refresh committed snapshot s, before checkpoint >= s."""
  reference = harness.reference("pretrain")
  workdir = harness.base / "pretrain-killed-after-refresh"
  killed = harness.kill("pretrain", workdir, REFRESH_EVERY - 1, ready=_index_ahead_of_checkpoint)
  if _committed_snapshots(workdir)[-1] <= killed["checkpoints"][-1]:
    pytest.fail(f"the checkpoint was committed before the kill landed: {killed}")
  resumed = harness.run("pretrain", workdir, "restarted")
  assert resumed["start_step"] == killed["checkpoints"][-1]
  _assert_same_steps(resumed, reference["summary"])
