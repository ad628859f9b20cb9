"""Tests for realm_jax/retrieval/watcher.py: the trainer side of the asynchronous index refresh (§3.4).

Fast tests write snapshots directly (`snapshot.write_snapshot`); the end-to-end test runs the real index
builder (`python -m realm_jax.cli index-builder`) in a separate process next to a stand-in trainer loop
in this process that writes orbax checkpoints and calls `before_step` every step.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from realm_jax import index_builder
from realm_jax.models import bert
from realm_jax.models import realm
from realm_jax.retrieval import searchers
from realm_jax.retrieval import snapshot as snap
from realm_jax.retrieval import watcher as watcher_lib
from realm_jax.training import checkpointing
from realm_jax import sharding
from realm_jax.data import corpus_config
from realm_jax.retrieval import embedding
from realm_jax.retrieval import trainer_done

FP = "corpus-fp-watcher"
PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _write(root, step, n=30, dim=8, fp=FP, seed=None):
  rng = np.random.default_rng(step if seed is None else seed)
  return snap.write_snapshot(root, step, np.arange(n, dtype=np.int64),
                             rng.normal(size=(n, dim)).astype(np.float32), fp, num_shards=2)


def _scann(snapshot):
  return searchers.searcher_from_snapshot(snapshot, kind="scann")


def _wait_until(predicate, timeout_s, what):
  deadline = time.monotonic() + timeout_s
  while not predicate():
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
    time.sleep(0.02)


# ----------------------------------------------------------------------------------------------------
# In-process: snapshots written directly
# ----------------------------------------------------------------------------------------------------


def test_first_index_then_swap_at_next_step_without_blocking(tmp_path):
  _write(tmp_path, 0)
  with watcher_lib.IndexWatcher(tmp_path, FP, _scann, poll_interval_s=0.05,
                                max_index_staleness_steps=100, wait_timeout_s=30) as w:
    index = w.before_step(0)  # Blocks until the first index is loaded.
    assert index.params_step == 0 and w.swap_count == 1
    assert index.snapshot.num_blocks == 30 and index.swapped_in_step == 0
    scores, ids = index.searcher.search(np.ones((2, 8), np.float32), 3)
    assert ids.shape == (2, 3)
    _write(tmp_path, 40)
    _wait_until(lambda: w.pending is not None, 30, "snapshot 40 to load in the background")
    assert w.live.params_step == 0  # Loaded, but not live until the next step.
    t0 = time.perf_counter()
    index = w.before_step(41)
    swap_s = time.perf_counter() - t0
    assert index.params_step == 40 and w.swap_count == 2 and index.swapped_in_step == 41
    assert swap_s < 0.05, swap_s  # A reference swap, no I/O.
    m = w.metrics(45)
    assert m["index/staleness_steps"] == 5 and m["index/params_step"] == 40
    assert m["index/swaps"] == 2 and m["index/rejected_snapshots"] == 0
    assert w.staleness(45) == 5


def test_corrupted_snapshot_is_rejected_once_and_current_index_kept(tmp_path, caplog):
  _write(tmp_path, 0)
  with watcher_lib.IndexWatcher(tmp_path, FP, _scann, poll_interval_s=0.05,
                                max_index_staleness_steps=None, wait_timeout_s=30) as w:
    assert w.before_step(0).params_step == 0
    # Committed elsewhere, one byte of the last embedding row flipped after the commit, then moved in
    # (so that the watcher never sees it before the corruption).
    staged = _write(tmp_path / "staging", 10)
    shard = staged / snap.embeddings_file_name(1, 2)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = tmp_path / "10"
    os.rename(staged, bad)
    with caplog.at_level(logging.WARNING, logger="root"):
      _wait_until(lambda: str(bad) in w.rejected, 30, "the corrupt snapshot to be rejected")
      for _ in range(5):  # Several more polls: it is not loaded again.
        w.poll_now()
        time.sleep(0.1)
    assert "checksum does not match" in w.rejected[str(bad)]
    warnings = [r for r in caplog.records if "skipping snapshot" in r.getMessage()]
    assert len(warnings) == 1 and str(bad) in warnings[0].getMessage()
    assert w.before_step(11).params_step == 0 and w.swap_count == 1  # Kept the current index.
    # A snapshot of another corpus is rejected too; a good newer one is taken.
    _write(tmp_path, 20, fp="another-corpus")
    _write(tmp_path, 15)
    _wait_until(lambda: w.pending is not None, 30, "snapshot 15")
    assert w.before_step(21).params_step == 15
    assert str(tmp_path / "20") in w.rejected and "another-corpus"[:12] in w.rejected[
        str(tmp_path / "20")]


def test_staleness_bound_blocks_and_releases_when_a_fresh_snapshot_lands(tmp_path):
  _write(tmp_path, 0)
  with watcher_lib.IndexWatcher(tmp_path, FP, _scann, poll_interval_s=0.05,
                                max_index_staleness_steps=10, wait_timeout_s=30,
                                log_every_s=0.2) as w:
    assert w.before_step(10).params_step == 0  # 10 steps behind: allowed.
    writer = threading.Timer(1.0, lambda: _write(tmp_path, 8))
    writer.start()
    t0 = time.perf_counter()
    index = w.before_step(18)  # 18 steps behind the index at step 0 > 10: blocks until step 8 lands.
    waited = time.perf_counter() - t0
    writer.join()
    assert index.params_step == 8 and waited >= 0.9, waited
    assert w.metrics(18)["index/wait_s"] >= 0.9


def test_staleness_timeout_raises_a_clear_error(tmp_path):
  _write(tmp_path, 0)
  with watcher_lib.IndexWatcher(tmp_path, FP, _scann, poll_interval_s=0.05,
                                max_index_staleness_steps=5, wait_timeout_s=0.5) as w:
    w.before_step(0)
    with pytest.raises(watcher_lib.IndexStalenessError, match="index builder running"):
      w.before_step(100)


def test_no_index_at_all_times_out(tmp_path):
  with watcher_lib.IndexWatcher(tmp_path, FP, _scann, poll_interval_s=0.05,
                                wait_timeout_s=0.3) as w:
    with pytest.raises(watcher_lib.IndexStalenessError, match="first index"):
      w.before_step(0)
    assert w.metrics(0) == {}


def test_pruned_while_pending_takes_the_newest(tmp_path):
  """Several snapshots land between two steps: only the newest is swapped in."""
  _write(tmp_path, 0)
  with watcher_lib.IndexWatcher(tmp_path, FP, _scann, poll_interval_s=0.05,
                                max_index_staleness_steps=None) as w:
    w.before_step(0)
    for step in (5, 10, 15):
      _write(tmp_path, step)
    snap.prune_snapshots(tmp_path, keep=1)
    _wait_until(lambda: w.pending is not None and w.pending.params_step == 15, 30, "snapshot 15")
    assert w.before_step(16).params_step == 15 and w.swap_count == 2
    assert not w.rejected


# ----------------------------------------------------------------------------------------------------
# Real processes: the index builder job next to a stand-in trainer loop
# ----------------------------------------------------------------------------------------------------

MODEL = realm.ModelConfig(
    init_checkpoint=None, pooling="cls_projection", projection_size=8,
    bert=bert.BertConfig(vocab_size=30522, hidden_size=16, num_layers=1, num_heads=2,
                         intermediate_size=32, max_position_embeddings=64))
MAX_BLOCK_LENGTH = 64
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon").split()


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
  """A 40-block JSONL corpus, prepared once (TFDS) in a shared data dir."""
  root = tmp_path_factory.mktemp("corpus")
  source = root / "corpus.jsonl"
  with open(source, "w") as f:
    for i in range(40):
      text = (f"{WORDS[i % 20].capitalize()} {i} is a town on the {WORDS[(i * 7) % 20]} river. It "
              f"was founded in {1800 + i} by {WORDS[(i * 3) % 20]} settlers.")
      # 0, 2 or 4 more sentences: blocks of 24 to 57 wordpieces, in three length buckets (32, 48, 64).
      text += "".join(f" The {WORDS[(i + j) % 20]} market opened in {1900 + j}."
                      for j in range(i % 3 * 2))
      f.write(json.dumps({"title": f"Town {i}", "text": text}) + "\n")
  data = corpus_config.CorpusConfig(sources=(str(source),), max_block_length=MAX_BLOCK_LENGTH,
                                    data_dir=str(root / "tfds"))
  _, corpus = corpus_config.load_corpus(data, MODEL.checkpoint_dir(), str(root),
                                       show_progress=False)
  lengths = corpus.retrieval_inputs(np.arange(len(corpus)))["input_mask"].sum(axis=1)
  assert embedding.plan_batches(lengths, 8, MAX_BLOCK_LENGTH).shapes == (32, 48, 64)  # bucketing runs
  return data, corpus


def _builder_gin(path, data, **bindings):
  """A gin file configuring `index_builder.run` for the tiny model and corpus, plus `bindings`."""
  lines = [
      "from __gin__ import dynamic_registration",
      "from realm_jax import index_builder",
      "from realm_jax.data import corpus_config",
      "from realm_jax.models import bert",
      "from realm_jax.models import realm",
      "index_builder.run.model = @realm.ModelConfig()",
      "index_builder.run.data = @corpus_config.CorpusConfig()",
      *(f"index_builder.run.{k} = {v!r}" for k, v in bindings.items()),
      f"corpus_config.CorpusConfig.sources = {tuple(data.sources)!r}",
      f"corpus_config.CorpusConfig.max_block_length = {data.max_block_length}",
      f"corpus_config.CorpusConfig.data_dir = {data.data_dir!r}",
      "realm.ModelConfig.init_checkpoint = None",
      "realm.ModelConfig.bert = @bert.BertConfig()",
      "realm.ModelConfig.pooling = 'cls_projection'",
      "realm.ModelConfig.projection_size = 8",
      *(f"bert.BertConfig.{k} = {getattr(MODEL.bert, k)!r}"
        for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                  "max_position_embeddings")),
  ]
  path.write_text("\n".join(lines) + "\n")
  return path


def _start_builder(workdir, gin_file, log_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             TF_CPP_MIN_LOG_LEVEL="3")
  log = open(log_path, "w")
  return subprocess.Popen(
      [sys.executable, "-m", "realm_jax.cli", "index-builder", "--gin_file", str(gin_file),
       "--workdir", str(workdir)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT)


@pytest.fixture(scope="module")
def base_params():
  """Randomly initialised retriever params of the tiny model (jitted once)."""
  cfg = MODEL.retriever_config()
  return jax.device_get(jax.jit(lambda k: realm.init_retriever(cfg, k))(jax.random.key(1)))


def _trained_params(base, step):
  """The retriever params a stand-in trainer has at `step`: `base` plus step-dependent noise."""
  rng = np.random.default_rng(step)
  return jax.tree_util.tree_map(
      lambda x: (x + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype), base)


def _save_checkpoint(manager, base, step):
  """What the trainer's CheckpointManager writes: params {retriever, encoder}, opt state, meta."""
  retriever = _trained_params(base, step)
  params = {"retriever": retriever, "encoder": {"w": np.full((4,), float(step), np.float32)}}
  manager.save(step, params, {"count": np.asarray(step, np.int32)}, {"data": {}}, force=True)
  manager.wait_until_finished()
  return retriever


def test_swap_to_snapshots_of_a_separate_builder_process(tiny_corpus, base_params, tmp_path,
                                                          embed_each_block):
  """(a) mid-run swap without stalling, (d) the staleness bound, and the done marker, end to end."""
  data, corpus = tiny_corpus
  workdir = tmp_path / "run"
  gin_file = _builder_gin(tmp_path / "builder.gin", data, poll_interval_s=0.2, batch_size=8,
                          blocks_per_shard=8, shard_pause_s=0.3, max_refreshes=5,
                          idle_timeout_s=120.0)
  builder = _start_builder(workdir, gin_file, tmp_path / "builder.log")
  manager = checkpointing.CheckpointManager(checkpointing.checkpoint_dir(str(workdir)),
                                            save_interval_steps=1, async_save=False)
  w = watcher_lib.IndexWatcher(workdir / "snapshots", corpus.fingerprint, _scann,
                               poll_interval_s=0.1, max_index_staleness_steps=1000,
                               wait_timeout_s=90, log_every_s=5)
  try:
    # The builder's first index (no checkpoint yet: the initial params, step 0).
    index = w.before_step(0)
    assert index.params_step == 0 and index.snapshot.metadata["source"] == "init"
    # A trainer step loop: checkpoint at step 3, keep stepping; the swap happens between steps.
    expected = _save_checkpoint(manager, base_params, 3)
    latencies, step = [], 3
    deadline = time.monotonic() + 60
    while w.live.params_step != 3:
      step += 1
      t0 = time.perf_counter()
      index = w.before_step(step)
      latencies.append(time.perf_counter() - t0)
      index.searcher.search(np.ones((1, 8), np.float32), 2)
      time.sleep(0.05)  # The "train step".
      assert time.monotonic() < deadline, "no swap to snapshot 3 within 60 s"
    assert step - 3 >= 5, "the builder should take several steps to re-embed (shard_pause_s)"
    assert max(latencies) < 0.1, max(latencies)  # Never blocked: staleness stayed below 1000.
    assert w.swap_count == 2 and w.metrics(step)["index/staleness_steps"] == step - 3
    np.testing.assert_allclose(index.snapshot.embeddings,
                               embed_each_block(MODEL, corpus, expected), atol=1e-5)
    np.testing.assert_array_equal(index.snapshot.block_ids, corpus.block_ids)
    # (d) The trainer gets more than 1000 steps ahead of the index: before_step blocks until the
    # builder has embedded checkpoint 1500 (1400 or newer is needed at step 2400).
    _save_checkpoint(manager, base_params, 1500)
    t0 = time.perf_counter()
    index = w.before_step(2400)
    waited = time.perf_counter() - t0
    assert index.params_step == 1500 and waited > 0.5, waited
    assert w.metrics(2400)["index/wait_s"] >= waited - 0.01
    # The trainer is done: the builder has embedded the final checkpoint and exits by itself.
    trainer_done.mark_trainer_done(str(workdir), 1500)
    assert builder.wait(timeout=60) == 0
    status = json.loads((workdir / "index_builder" / "status.json").read_text())
    assert status["phase"] == "stopped" and "trainer is done" in status["stopped_because"]
    records = index_builder.read_refreshes(str(workdir))
    assert [r["params_step"] for r in records] == [0, 3, 1500]
    assert [r["source"] for r in records] == ["init", "checkpoint", "checkpoint"]
    assert not w.rejected
  finally:
    w.close()
    manager.close()
    if builder.poll() is None:
      builder.kill()
      builder.wait()
