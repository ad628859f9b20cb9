"""Tests for realm_jax/index_builder.py: the asynchronous index refresher job (REALM §3.4).

In-process tests call `index_builder.run` directly; the crash test runs the real job
(`python -m realm_jax.cli index-builder`) in a subprocess, SIGKILLs it mid-write and restarts it.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
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

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = realm.ModelConfig(
    init_checkpoint=None, pooling="cls_projection", projection_size=8,
    bert=bert.BertConfig(vocab_size=30522, hidden_size=16, num_layers=1, num_heads=2,
                         intermediate_size=32, max_position_embeddings=64))
MAX_BLOCK_LENGTH = 64
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon").split()


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
  """A 40-block JSONL corpus, prepared once (TFDS) in a shared data dir: `(CorpusConfig, Corpus)`."""
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
  assert len(corpus) == 40
  return data, corpus


@pytest.fixture(scope="module")
def base_params():
  """Randomly initialised retriever params of the tiny model (jitted once), on the host."""
  cfg = MODEL.retriever_config()
  return jax.device_get(jax.jit(lambda k: realm.init_retriever(cfg, k))(jax.random.key(1)))


def _trained_params(base, step):
  """The retriever params a stand-in trainer has at `step`: `base` plus step-dependent noise."""
  rng = np.random.default_rng(step)
  return jax.tree_util.tree_map(
      lambda x: (x + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype), base)


def _save_checkpoint(workdir, base, step):
  """Writes what the trainer writes: params {retriever, encoder}, an optimiser state, meta."""
  manager = checkpointing.CheckpointManager(checkpointing.checkpoint_dir(str(workdir)),
                                            save_interval_steps=1, async_save=False)
  retriever = _trained_params(base, step)
  params = {"retriever": retriever, "encoder": {"w": np.full((4,), float(step), np.float32)}}
  manager.save(step, params, {"count": np.asarray(step, np.int32)}, {"data": {}}, force=True)
  manager.close()
  return retriever


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
  """`realm-jax index-builder` in its own process, on 2 simulated CPU devices, logging to a file."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             TF_CPP_MIN_LOG_LEVEL="3")
  log = open(log_path, "w")
  return subprocess.Popen(
      [sys.executable, "-m", "realm_jax.cli", "index-builder", "--gin_file", str(gin_file),
       "--workdir", str(workdir)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT)


def _wait_until(predicate, timeout_s, what):
  deadline = time.monotonic() + timeout_s
  while not predicate():
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
    time.sleep(0.02)


# ----------------------------------------------------------------------------------------------------
# Policy and helpers
# ----------------------------------------------------------------------------------------------------


def test_next_params_step_policy():
  # No checkpoint, no index: the first index from the initial params.
  assert index_builder.next_params_step([], []) == 0
  # An index and no newer checkpoint: wait.
  assert index_builder.next_params_step([], [0]) is None
  assert index_builder.next_params_step([100], [100]) is None
  # Newer checkpoints: the newest one, skipping the intermediate ones.
  assert index_builder.next_params_step([100, 200, 300], [0]) == 300
  # A trainer resumed from a checkpoint in a work directory without snapshots.
  assert index_builder.next_params_step([700], []) == 700


def test_done_marker_round_trip(tmp_path):
  assert trainer_done.trainer_final_step(str(tmp_path)) is None
  trainer_done.mark_trainer_done(str(tmp_path), 1234)
  assert trainer_done.trainer_final_step(str(tmp_path)) == 1234
  trainer_done.clear_trainer_done(str(tmp_path))
  assert trainer_done.trainer_final_step(str(tmp_path)) is None
  (tmp_path / trainer_done.TRAINER_DONE_NAME).write_text("{not json")
  assert trainer_done.trainer_final_step(str(tmp_path)) is None


def test_as_corpus_config_accepts_a_trainer_data_config():
  from realm_jax.training import finetune
  corpus = corpus_config.CorpusConfig(sources=("a.jsonl",), max_block_length=128, data_dir="/d")
  assert corpus_config.as_corpus_config(finetune.OpenQADataConfig(corpus=corpus)) is corpus
  assert corpus_config.as_corpus_config(corpus) is corpus
  with pytest.raises(TypeError, match="CorpusConfig"):
    corpus_config.as_corpus_config(object())
  with pytest.raises(TypeError, match="CorpusConfig"):  # No duck typing of look-alike fields.
    finetune.OpenQADataConfig(corpus={"sources": ("a.jsonl",)})


def test_builder_and_trainer_block_the_same_embedded_subset(tmp_path):
  """`embedded_dev_articles` reaches the index builder: both jobs get the same corpus fingerprint."""
  from realm_jax.training import pretrain
  data = pretrain.PretrainDataConfig(
      corpus=corpus_config.CorpusConfig(embedded_dev_articles=1, max_block_length=128,
                                        data_dir=str(tmp_path / "tfds")), masking="random_token")
  config = corpus_config.as_corpus_config(data)
  assert config.embedded_dev_articles == 1
  sources = corpus_config.corpus_sources(config, config.data_dir)
  assert len(sources) == 1 and sources[0].endswith("squad-dev-first1.json")
  _, builder_corpus = corpus_config.load_corpus(data, MODEL.checkpoint_dir(), str(tmp_path),
                                               show_progress=False)
  _, trainer_corpus = pretrain.load_pretraining_data(
      data, MODEL, pretrain.PretrainConfig(query_length=32, max_masks=3), str(tmp_path))[:2]
  assert builder_corpus.fingerprint == trainer_corpus.fingerprint
  assert 20 < len(builder_corpus) < 200  # one article, not the 3,997-block default corpus


def test_partial_restore_reads_only_the_retriever(tmp_path, base_params):
  expected = _save_checkpoint(tmp_path, base_params, 7)
  mesh = sharding.make_mesh(devices=jax.devices()[:2])
  abstract = index_builder.abstract_retriever_params(MODEL.retriever_config(), mesh)
  ckpt_dir = checkpointing.checkpoint_dir(str(tmp_path))
  assert index_builder.checkpoint_steps(ckpt_dir) == [7]
  params, step = checkpointing.restore_partial_params(ckpt_dir, {"retriever": abstract})
  params = params["retriever"]
  assert step == 7
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(params), expected)
  leaf = jax.tree_util.tree_leaves(params)[0]
  assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 2
  with pytest.raises(FileNotFoundError, match="step 8"):
    checkpointing.restore_partial_params(ckpt_dir, {"retriever": abstract}, 8)
  other = realm.ModelConfig(init_checkpoint=None, pooling="cls_projection", projection_size=4,
                            bert=MODEL.bert)
  with pytest.raises(ValueError, match="retriever"):
    checkpointing.restore_partial_params(
        ckpt_dir, {"retriever": index_builder.abstract_retriever_params(other.retriever_config(),
                                                                        mesh)}, 7)


# ----------------------------------------------------------------------------------------------------
# The job, in process
# ----------------------------------------------------------------------------------------------------


def test_first_index_without_any_checkpoint(embed_each_block, tiny_corpus, tmp_path):
  """(e) No checkpoint yet: the builder embeds the initial params as snapshot 0 (the trainer waits)."""
  data, corpus = tiny_corpus
  summary = index_builder.run(str(tmp_path), model=MODEL, data=data, poll_interval_s=0.1,
                              batch_size=8, blocks_per_shard=16, max_refreshes=1, seed=3)
  assert summary["stopped_because"] == "max_refreshes=1 reached"
  assert summary["corpus_fingerprint"] == corpus.fingerprint and summary["num_blocks"] == 40
  path = snap.latest_snapshot(tmp_path / "snapshots")
  assert path == tmp_path / "snapshots" / "0"
  s = snap.read_snapshot(path, validate=True)
  assert s.corpus_fingerprint == corpus.fingerprint and s.num_shards == 3
  assert s.metadata["source"] == "init" and s.metadata["pooling"] == "cls_projection"
  np.testing.assert_array_equal(s.block_ids, corpus.block_ids)
  # The trainer's initialisation (`realm.init_params` with its seed, 3) embeds the same way.
  init = jax.jit(lambda k: realm.init_params(MODEL, k, parts=("retriever", "encoder")))(
      jax.random.key(3))["retriever"]
  np.testing.assert_allclose(s.embeddings, embed_each_block(MODEL, corpus, init), atol=1e-5)
  [record] = index_builder.read_refreshes(str(tmp_path))
  assert record["params_step"] == 0 and record["source"] == "init"
  assert record["written_shards"] == [0, 1, 2] and record["skipped_shards"] == []
  status = json.loads((tmp_path / "index_builder" / "status.json").read_text())
  assert status["phase"] == "stopped" and status["last_snapshot_step"] == 0


def test_newest_checkpoint_then_prune_then_stop_at_num_train_steps(tiny_corpus, base_params,
                                                                   tmp_path, embed_each_block):
  data, corpus = tiny_corpus
  root = tmp_path / "snapshots"
  for step in (1, 2, 3, 4):  # Older snapshots of this corpus.
    snap.write_snapshot(root, step, corpus.block_ids, np.ones((40, 8), np.float32),
                        corpus.fingerprint)
  stale = snap.SnapshotWriter(root, 2_000, 1, corpus.fingerprint, 8)  # A crashed writer's leftover...
  obsolete = snap.SnapshotWriter(root, 5, 1, corpus.fingerprint, 8)  # ...and one never committable.
  _save_checkpoint(tmp_path, base_params, 6)
  expected = _save_checkpoint(tmp_path, base_params, 9)
  summary = index_builder.run(str(tmp_path), model=MODEL, data=data, poll_interval_s=0.1,
                              batch_size=8, blocks_per_shard=64, keep_snapshots=3,
                              num_train_steps=9)
  assert "trainer is done (final step 9" in summary["stopped_because"]
  assert [r["params_step"] for r in summary["refreshes"]] == [9]  # Step 6 skipped: 9 is newer.
  assert [s for s, _ in snap.list_snapshots(root)] == [3, 4, 9]
  assert not obsolete.tmp_dir.exists() and stale.tmp_dir.exists()  # Young: maybe still written.
  s = snap.read_snapshot(root / "9")
  assert s.metadata["source"] == "checkpoint" and s.metadata["checkpoint_mtime"] > 0
  np.testing.assert_allclose(s.embeddings, embed_each_block(MODEL, corpus, expected), atol=1e-5)


def test_snapshots_of_another_corpus_are_refused(tiny_corpus, tmp_path):
  data, _ = tiny_corpus
  snap.write_snapshot(tmp_path / "snapshots", 0, np.arange(3), np.ones((3, 8), np.float32),
                      "some-other-corpus")
  with pytest.raises(snap.SnapshotError, match="another corpus"):
    index_builder.run(str(tmp_path), model=MODEL, data=data, poll_interval_s=0.1, max_refreshes=1)


# ----------------------------------------------------------------------------------------------------
# The job as a separate process: SIGKILL mid-write, restart, resume
# ----------------------------------------------------------------------------------------------------


def test_sigkill_mid_write_is_invisible_and_the_restart_resumes(tiny_corpus, base_params, tmp_path,
                                                                embed_each_block):
  """(b) No partial snapshot is ever visible; the watcher keeps its index; the restart resumes."""
  data, corpus = tiny_corpus
  workdir = tmp_path / "run"
  root = workdir / "snapshots"
  snap.write_snapshot(root, 0, corpus.block_ids,
                      np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32),
                      corpus.fingerprint)
  w = watcher_lib.IndexWatcher(root, corpus.fingerprint,
                               lambda s: searchers.searcher_from_snapshot(s, kind="scann"),
                               poll_interval_s=0.05, max_index_staleness_steps=None,
                               wait_timeout_s=60)
  # A reader that looks at the snapshots directory all the time: every snapshot it can list must be
  # complete and valid.
  seen, errors, stop = set(), [], threading.Event()

  def reader():
    while not stop.is_set():
      for step, path in snap.list_snapshots(root):
        try:
          snap.read_snapshot(path, validate=True)
          seen.add(step)
        except snap.SnapshotError as e:
          if path.exists():
            errors.append(str(e))

  checker = threading.Thread(target=reader, daemon=True)
  checker.start()
  try:
    assert w.before_step(0).params_step == 0
    expected = _save_checkpoint(workdir, base_params, 5)
    # 10 shards of 4 blocks, a pause after each: the kill lands while shards are being written.
    gin_slow = _builder_gin(tmp_path / "slow.gin", data, poll_interval_s=0.1, batch_size=4,
                            blocks_per_shard=4, shard_pause_s=0.5, max_refreshes=1)
    builder = _start_builder(workdir, gin_slow, tmp_path / "builder-1.log")
    tmp_dir = root / ".tmp-5"
    try:
      _wait_until(lambda: len(list(tmp_dir.glob("shard-*.json"))) >= 3, 90,
                  "3 shards written by the first builder")
    finally:
      os.kill(builder.pid, signal.SIGKILL)
      builder.wait()
    done_before = sorted(int(p.name.split("-")[1]) for p in tmp_dir.glob("shard-*.json"))
    assert 3 <= len(done_before) < 10, done_before
    mtimes = {i: (tmp_dir / snap.embeddings_file_name(i, 10)).stat().st_mtime_ns
              for i in done_before}
    # Nothing of step 5 is visible; the watcher keeps the index it has.
    assert snap.latest_snapshot(root) == root / "0"
    assert [s for s, _ in snap.list_snapshots(root)] == [0]
    w.poll_now()
    time.sleep(0.3)
    assert w.before_step(6).params_step == 0 and w.pending is None and not w.rejected

    # The restarted job resumes the half-written snapshot: only the missing shards are embedded.
    gin_fast = _builder_gin(tmp_path / "fast.gin", data, poll_interval_s=0.1, batch_size=4,
                            blocks_per_shard=4, max_refreshes=1)
    builder = _start_builder(workdir, gin_fast, tmp_path / "builder-2.log")
    assert builder.wait(timeout=120) == 0, (tmp_path / "builder-2.log").read_text()[-3000:]
    [record] = index_builder.read_refreshes(str(workdir))
    assert record["params_step"] == 5 and record["skipped_shards"] == done_before
    assert sorted(record["written_shards"] + record["skipped_shards"]) == list(range(10))
    log = (tmp_path / "builder-2.log").read_text()
    assert log.count("already written, skipped") == len(done_before)
    committed = root / "5"
    for i, mtime in mtimes.items():  # The resumed shards are the files the killed job wrote.
      assert (committed / snap.embeddings_file_name(i, 10)).stat().st_mtime_ns == mtime
    s = snap.read_snapshot(committed, validate=True)
    np.testing.assert_allclose(s.embeddings, embed_each_block(MODEL, corpus, expected), atol=1e-5)
    np.testing.assert_array_equal(s.block_ids, corpus.block_ids)
    _wait_until(lambda: w.pending is not None, 30, "the watcher to load snapshot 5")
    assert w.before_step(7).params_step == 5 and w.swap_count == 2
  finally:
    stop.set()
    checker.join()
    w.close()
  assert not errors, errors[:3]
  assert seen == {0, 5}


# Seeds the two kill points below; another value (REALM_JAX_PREEMPTION_SEED=…) kills elsewhere.
KILL_SEED = int(os.environ.get("REALM_JAX_PREEMPTION_SEED", "14"))


def _shard_records(tmp_dir) -> list[int]:
  """Shards of a staging directory whose commit record exists (what a restart skips)."""
  return sorted(int(p.name.split("-")[1]) for p in tmp_dir.glob("shard-*.json"))


def test_builder_killed_twice_mid_corpus_commits_what_an_uninterrupted_builder_commits(
    tiny_corpus, base_params, tmp_path, embed_each_block, comparable_manifest):
  """Issue #14 §1: the index builder SIGKILLed twice while embedding the corpus for a snapshot (at
  seeded random shard counts, at a random moment of the shard cycle), restarted each time with the
  same command. The second run resumes the first run's shards, the third the second's; the committed
  snapshot is the one an uninterrupted builder commits, byte for byte (every shard's checksums, the
  block ids, the serialized searcher), and a trainer-side watcher polling the same directory only
  ever serves complete snapshots, in step order, ending at the newest.

  (The test above kills once at a fixed point and compares with a per-block reference within 1e-5.)
  """
  data, corpus = tiny_corpus
  rng = np.random.default_rng([KILL_SEED, 1])
  # One command for every builder run: 10 shards of 4 blocks, 0.2 s after each, then wait for the
  # trainer's final checkpoint (step 8).
  gin = _builder_gin(tmp_path / "builder.gin", data, poll_interval_s=0.05, batch_size=4,
                     blocks_per_shard=4, shard_pause_s=0.2, num_train_steps=8)
  num_shards = 10
  initial = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
  workdirs = {}
  for name in ("reference", "killed"):
    workdirs[name] = tmp_path / name
    snap.write_snapshot(workdirs[name] / "snapshots", 0, corpus.block_ids, initial,
                        corpus.fingerprint)
    _save_checkpoint(workdirs[name], base_params, 5)

  def run_to_the_end(workdir, log_name, before_exit=lambda: None):
    """One builder run: commits 5, then (after `before_exit`) the trainer's final checkpoint 8."""
    builder = _start_builder(workdir, gin, tmp_path / log_name)
    try:
      _wait_until(lambda: snap.is_committed(workdir / "snapshots" / "5") or
                  builder.poll() is not None, 120, f"snapshot 5 in {workdir}")
      before_exit()
      _save_checkpoint(workdir, base_params, 8)
      assert builder.wait(timeout=120) == 0, (tmp_path / log_name).read_text()[-3000:]
    finally:
      if builder.poll() is None:
        builder.kill()
        builder.wait()

  # The reference: one uninterrupted builder.
  run_to_the_end(workdirs["reference"], "reference.log")
  assert [r["skipped_shards"] for r in index_builder.read_refreshes(str(workdirs["reference"]))
          ] == [[], []]

  workdir = workdirs["killed"]
  root = workdir / "snapshots"
  tmp_dir = root / ".tmp-5"
  # The trainer side: its watcher over the same directory, a "training thread" asking for the
  # index before every step, and a reader validating every snapshot it can list.
  w = watcher_lib.IndexWatcher(root, corpus.fingerprint,
                               lambda s: searchers.searcher_from_snapshot(s, kind="scann"),
                               poll_interval_s=0.02, max_index_staleness_steps=None,
                               wait_timeout_s=60)
  served, listed, errors, stop = [], set(), [], threading.Event()

  def training_thread():
    step = 0
    while not stop.is_set():
      index = w.before_step(step)
      if not served or served[-1][1] != index.snapshot.path:
        served.append((index.params_step, index.snapshot.path, index.snapshot.num_blocks))
      step += 1
      time.sleep(0.005)

  def reader():
    while not stop.is_set():
      for step, path in snap.list_snapshots(root):
        try:
          snap.read_snapshot(path, validate=True)
          listed.add(step)
        except snap.SnapshotError as e:
          if path.exists():
            errors.append(str(e))

  threads = [threading.Thread(target=f, daemon=True) for f in (training_thread, reader)]
  for t in threads:
    t.start()
  try:
    # Two runs SIGKILLed mid-corpus: after `at_least` shard records, plus a random part of a shard
    # cycle (the kill lands in the pause or while the next shard is embedded and written).
    kills = []
    for run in range(2):
      done = _shard_records(tmp_dir) if tmp_dir.exists() else []
      at_least = int(rng.integers(len(done) + 1, 6 if run == 0 else num_shards - 1))
      log = tmp_path / f"killed-{run + 1}.log"
      builder = _start_builder(workdir, gin, log)
      try:
        _wait_until(lambda: tmp_dir.exists() and len(_shard_records(tmp_dir)) >= at_least, 120,
                    f"{at_least} shard records of run {run + 1}")
        time.sleep(float(rng.uniform(0.0, 0.2)))
      finally:
        os.kill(builder.pid, signal.SIGKILL)
        builder.wait()
      assert builder.returncode == -signal.SIGKILL
      records = _shard_records(tmp_dir)
      assert records == list(range(len(records))) and at_least <= len(records) < num_shards, (
          at_least, records)
      # Nothing of step 5 is visible; the trainer still searches snapshot 0.
      assert [s for s, _ in snap.list_snapshots(root)] == [0]
      assert w.live.params_step == 0 and w.pending is None and not w.rejected
      text = log.read_text()
      assert text.count("already written, skipped") == len(done), text[-3000:]
      kills.append({"at_least": at_least, "records": records,
                    "mtimes": {i: (tmp_dir / snap.embeddings_file_name(i, num_shards)).stat()
                               .st_mtime_ns for i in records}})
    assert len(kills[1]["records"]) > len(kills[0]["records"])  # The second run wrote more.
    for i, mtime in kills[0]["mtimes"].items():  # ...and did not rewrite the first run's shards.
      assert kills[1]["mtimes"][i] == mtime, i

    # The third run, the same command, runs to the end; the trainer reaches step 8 meanwhile.
    def trainer_swapped_to_5():
      _wait_until(lambda: w.live.params_step == 5, 60, "the training thread to search snapshot 5")

    run_to_the_end(workdir, "killed-3.log", before_exit=trainer_swapped_to_5)
    _wait_until(lambda: w.live.params_step == 8, 60, "the training thread to search snapshot 8")
  finally:
    stop.set()
    for t in threads:
      t.join(timeout=60)
    w.close()

  # The resumes: the third run embedded only what the second one had not.
  record_5, record_8 = index_builder.read_refreshes(str(workdir))
  assert record_5["params_step"] == 5 and record_5["skipped_shards"] == kills[1]["records"]
  assert sorted(record_5["written_shards"] + record_5["skipped_shards"]) == list(range(num_shards))
  assert record_8["params_step"] == 8 and record_8["skipped_shards"] == []
  committed = root / "5"
  for i, mtime in kills[1]["mtimes"].items():  # The resumed shards are the killed runs' files.
    assert (committed / snap.embeddings_file_name(i, num_shards)).stat().st_mtime_ns == mtime
  # The same snapshots as the uninterrupted builder's: every file's checksum in the manifests, the
  # arrays (bit for bit), the block ids; and nothing left in staging.
  for step in (5, 8):
    ours, reference = root / str(step), workdirs["reference"] / "snapshots" / str(step)
    assert comparable_manifest(ours) == comparable_manifest(reference), step
    a, b = snap.read_snapshot(ours, validate=True), snap.read_snapshot(reference, validate=True)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(a.block_ids, corpus.block_ids)
    np.testing.assert_array_equal(b.block_ids, corpus.block_ids)
  np.testing.assert_allclose(snap.read_snapshot(committed).embeddings,
                             embed_each_block(MODEL, corpus, _trained_params(base_params, 5)),
                             atol=1e-5)
  assert sorted(p.name for p in root.iterdir()) == ["0", "5", "8"]
  # The trainer side: complete snapshots only, in step order, ending at the newest.
  assert not errors, errors[:3]
  assert listed == {0, 5, 8}
  assert [(s, n) for s, _, n in served] == [(0, 40), (5, 40), (8, 40)], served
  assert w.swap_count == 3 and not w.rejected
  print(f"kills after {[k['records'] for k in kills]} shard records")


# ----------------------------------------------------------------------------------------------------
# The local launcher's helpers (realm_jax/launch_local.py)
# ----------------------------------------------------------------------------------------------------


def test_launcher_splits_cores_and_gives_each_job_its_devices():
  from realm_jax import launch_local
  assert launch_local.split_cpus({0, 1}) == ([0], [1])
  assert launch_local.split_cpus(range(16), 0.75) == (list(range(12)), list(range(12, 16)))
  assert launch_local.split_cpus([3]) == ([3], [3])
  assert launch_local.split_cpus(range(4), 0.99) == ([0, 1, 2], [3])  # Each keeps one core.
  env = launch_local.child_env(2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"})
  assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=2"
  assert env["PYTHONUNBUFFERED"] == "1"
  assert launch_local.child_env(None, {"XLA_FLAGS": "--bar"})["XLA_FLAGS"] == "--bar"
  assert [launch_local.exit_code(c) for c in (0, 3, -2, -9)] == [0, 3, 130, 137]


def test_launcher_echoes_complete_log_lines_with_a_prefix(tmp_path):
  import io
  from realm_jax import launch_local
  out = io.StringIO()
  echo = launch_local.LogEcho(out, interval_s=0.01)
  log = tmp_path / "trainer.log"
  log.write_text("old line\n")
  echo.follow("trainer", log)  # Starts at the end: only new output is echoed.
  with open(log, "a") as f:
    f.write("step 1\nbar  10%\rbar 100%\npartial")
  time.sleep(0.2)
  echo.close()
  assert out.getvalue() == "[trainer] step 1\n[trainer] bar 100%\n"
