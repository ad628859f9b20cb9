"""The ScaNN searcher serialized into an embedding snapshot, and lazily read snapshots (REALM §3.4).

The index builder writes the ScaNN searcher it built into the snapshot (`add_scann_searcher`, committed
with the snapshot: manifest last, every file checksummed); readers (`searcher_from_snapshot`: the
watcher, `index_source`, `predict`) load it when it matches and rebuild it — silently when there is
none, with exactly one warning when it does not match — locally and on an object store (`memory://`).
"""

from __future__ import annotations

import json
import os
import logging

import fsspec
import numpy as np
import pytest

from realm_jax import fileio
from realm_jax.retrieval import searchers
from realm_jax.retrieval import snapshot as snap
from realm_jax.retrieval import watcher as watcher_lib
from realm_jax.training import index_source

FP = "corpus-fp-serialized-searcher"
# Small enough to build in well under a second, large enough for a real tree + AH + reorder index.
SCANN = {"brute_force_below": 0, "num_leaves": 20, "num_leaves_to_search": 5,
         "training_sample_size": 1200, "num_threads": 1}


@pytest.fixture
def mem():
  """The in-memory fsspec file system, empty before and after the test."""
  fs = fsspec.filesystem("memory")

  def clear():
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")

  clear()
  yield fs
  clear()


def _data(n=1200, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(12, dim))
  emb = (centres[rng.integers(0, 12, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
  ids = (rng.permutation(5 * n)[:n] + 1000).astype(np.int64)
  queries = (centres[rng.integers(0, 12, 6)] + 0.3 * rng.normal(size=(6, dim))).astype(np.float32)
  return ids, emb, queries


def _write(root, ids, emb, num_shards=3, step=7, scann=SCANN):
  """Writes and commits a snapshot, with the ScaNN searcher when `scann` is not None."""
  writer = snap.SnapshotWriter(root, step, num_shards, FP, emb.shape[1])
  bounds = np.linspace(0, len(ids), num_shards + 1).astype(int)
  for i in range(num_shards):
    writer.write_shard(i, ids[bounds[i]:bounds[i + 1]], emb[bounds[i]:bounds[i + 1]])
  built = searchers.add_scann_searcher(writer, **scann) if scann is not None else None
  return writer.commit(), built


def _warnings(caplog):
  return [r for r in caplog.records if r.levelno >= logging.WARNING]


def _assert_exact_scores(searcher, snapshot, emb, queries, k=5):
  """Every returned id is a snapshot row, and its score is that row's exact inner product."""
  scores, ids = searcher.search(queries, k)
  rows = {int(b): r for r, b in enumerate(snapshot.block_ids)}
  for q in range(len(queries)):
    for s, b in zip(scores[q], ids[q]):
      assert int(b) in rows
      np.testing.assert_allclose(s, queries[q] @ emb[rows[int(b)]], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_round_trip_loaded_searcher_returns_the_built_searchers_neighbours(where, tmp_path, mem,
                                                                           caplog):
  root = str(tmp_path / "snapshots") if where == "local" else "memory://bucket/run/snapshots"
  ids, emb, queries = _data()
  path, built = _write(root, ids, emb)
  manifest = snap.read_manifest(path)
  entry = snap.searcher_entry(manifest, path)
  assert entry["num_rows"] == 1200 and entry["config"] == built.config
  assert entry["config"]["mode"] == "tree_ah" and entry["config"]["num_leaves"] == 20
  names = fileio.listdir(path)
  for f in entry["files"]:  # Every searcher file is in the snapshot, with its checksum.
    assert snap.searcher_file_name(f["name"]) in names
    assert fileio.sha256(fileio.join(path, snap.searcher_file_name(f["name"]))) == f["sha256"]
  assert "scann_assets.pbtxt" in {f["name"] for f in entry["files"]}
  caplog.set_level(logging.INFO)
  snapshot = snap.read_snapshot(path, lazy=True)
  loaded = searchers.searcher_from_snapshot(snapshot, "scann", **SCANN)
  assert loaded.loaded and not built.loaded and not _warnings(caplog)
  for k in (1, 10, 40):
    s0, i0 = built.search(queries, k)
    s1, i1 = loaded.search(queries, k)
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_allclose(s1, s0, rtol=1e-6)
  _assert_exact_scores(loaded, snapshot, emb, queries)


def test_missing_searcher_is_built_without_a_warning(tmp_path, caplog):
  ids, emb, queries = _data()
  path, _ = _write(tmp_path, ids, emb, scann=None)
  assert snap.searcher_entry(snap.read_manifest(path), path) is None
  caplog.set_level(logging.INFO)
  snapshot = snap.read_snapshot(path, lazy=True)
  searcher = searchers.searcher_from_snapshot(snapshot, "scann", **SCANN)
  assert not searcher.loaded and not _warnings(caplog)
  assert any("no serialized searcher" in r.getMessage() for r in caplog.records)
  _assert_exact_scores(searcher, snapshot, emb, queries)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_other_config_is_rebuilt_with_exactly_one_warning(where, tmp_path, mem, caplog):
  root = str(tmp_path) if where == "local" else "memory://bucket/run/snapshots"
  ids, emb, queries = _data()
  path, _ = _write(root, ids, emb)
  snapshot = snap.read_snapshot(path, lazy=True)
  caplog.set_level(logging.INFO)
  wanted = dict(SCANN, reorder_k=50)
  searcher = searchers.searcher_from_snapshot(snapshot, "scann", **wanted)
  assert not searcher.loaded and searcher.reorder_k == 50
  warnings = _warnings(caplog)
  assert len(warnings) == 1, [w.getMessage() for w in warnings]
  assert "another configuration" in warnings[0].getMessage() and "reorder_k" in warnings[0].getMessage()
  _assert_exact_scores(searcher, snapshot, emb, queries)


@pytest.mark.parametrize("where", ["local", "memory"])
@pytest.mark.parametrize("damage", ["corrupt", "missing", "rows", "entry"])
def test_searcher_not_matching_its_snapshot_is_rebuilt_with_one_warning(where, damage, tmp_path, mem,
                                                                        caplog):
  root = str(tmp_path) if where == "local" else "memory://bucket/run/snapshots"
  ids, emb, queries = _data()
  path, _ = _write(root, ids, emb)
  manifest_file = fileio.join(path, snap.MANIFEST_NAME)
  manifest = json.loads(fileio.read_text(manifest_file))
  target = fileio.join(path, snap.searcher_file_name("dataset.npy"))
  if damage == "corrupt":  # Same size, other bytes: only the checksum notices.
    data = bytearray(fileio.read_bytes(target))
    data[-7] ^= 0xFF
    fileio.write_atomic(target, bytes(data))
  elif damage == "missing":
    fileio.remove(target)
  elif damage == "rows":  # A searcher recorded for another number of rows.
    manifest["searcher"]["num_rows"] = 1000
    fileio.write_atomic(manifest_file, json.dumps(manifest))
  else:  # A malformed entry: the snapshot stays valid, the searcher is rebuilt.
    manifest["searcher"]["files"] = "dataset.npy"
    fileio.write_atomic(manifest_file, json.dumps(manifest))
  caplog.set_level(logging.INFO)
  snapshot = snap.read_snapshot(path, lazy=True)  # The embeddings are fine.
  searcher = searchers.searcher_from_snapshot(snapshot, "scann", **SCANN)
  assert not searcher.loaded
  warnings = _warnings(caplog)
  assert len(warnings) == 1, [w.getMessage() for w in warnings]
  assert str(path) in warnings[0].getMessage()
  _assert_exact_scores(searcher, snapshot, emb, queries)


def test_brute_force_searcher_round_trip_and_index_source_loads_it(tmp_path, caplog):
  ids, emb, queries = _data(n=300)
  path, built = _write(tmp_path, ids, emb, scann={})  # Defaults: brute force below 10k rows.
  assert built.config["mode"] == "brute_force"
  caplog.set_level(logging.INFO)
  index = index_source.load_index(path, index_source.make_searcher_factory("scann"), FP)
  assert index.searcher.loaded and not _warnings(caplog)
  assert isinstance(index.snapshot.embeddings, snap.ShardedRows)
  np.testing.assert_array_equal(index.searcher.search(queries, 8)[1], built.search(queries, 8)[1])


def test_watcher_swaps_in_the_loaded_searcher(tmp_path):
  ids, emb, queries = _data()
  _write(tmp_path, ids, emb, step=3)
  with watcher_lib.IndexWatcher(tmp_path, FP, index_source.make_searcher_factory("scann", **SCANN),
                                poll_interval_s=0.05, wait_timeout_s=30) as w:
    live = w.before_step(3)
  assert live.searcher.loaded and live.params_step == 3
  _assert_exact_scores(live.searcher, live.snapshot, emb, queries)


def test_commit_refuses_a_searcher_for_other_rows(tmp_path):
  ids, emb, _ = _data(n=60)
  writer = snap.SnapshotWriter(tmp_path, 1, 1, FP, emb.shape[1])
  writer.write_shard(0, ids, emb)
  local = tmp_path / "fake"
  local.mkdir()
  (local / "scann_assets.pbtxt").write_text("")
  writer.add_searcher(local, "scann", {"mode": "brute_force"}, num_rows=59)
  with pytest.raises(snap.SnapshotError, match="searcher.num_rows"):
    writer.commit()
  (local / "docids.pkl").write_bytes(b"")
  with pytest.raises(snap.SnapshotError, match="no pickles"):
    writer.add_searcher(local, "scann", {}, num_rows=60)


# ----------------------------------------------------------------------------------------------------
# Lazy snapshots (ShardedRows): paper-scale loading without extra host copies
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "memory"])
def test_lazy_snapshot_reads_rows_on_demand(where, tmp_path, mem):
  root = str(tmp_path) if where == "local" else "memory://bucket/run/snapshots"
  ids, emb, _ = _data(n=50, dim=4)
  path = snap.write_snapshot(root, 2, ids, emb, FP, num_shards=4)
  s = snap.read_snapshot(path, lazy=True)
  rows = s.embeddings
  assert isinstance(rows, snap.ShardedRows) and rows.shape == (50, 4) and rows.rows_read == 0
  np.testing.assert_array_equal(s.block_ids, ids)
  np.testing.assert_array_equal(rows[3:41], emb[3:41])
  np.testing.assert_array_equal(rows[-1], emb[-1])
  np.testing.assert_array_equal(rows[::7], emb[::7])
  gather = np.array([[49, 0, 12], [13, 13, 25]])
  np.testing.assert_array_equal(rows[gather], emb[gather])
  np.testing.assert_array_equal(rows[gather, 1:3], emb[gather, 1:3])
  np.testing.assert_array_equal(np.asarray(rows), emb)
  out = np.zeros((10, 4), np.float32)
  rows.read_rows(10, 20, out)
  np.testing.assert_array_equal(out, emb[10:20])
  with pytest.raises(IndexError):
    rows[50]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_lazy_validation_streams_every_file_or_only_the_requested_rows(where, tmp_path, mem):
  root = str(tmp_path) if where == "local" else "memory://bucket/run/snapshots"
  ids, emb, _ = _data(n=40, dim=4)
  path = snap.write_snapshot(root, 2, ids, emb, FP, num_shards=4)  # Rows 0-10-20-30-40.
  target = fileio.join(path, snap.embeddings_file_name(3, 4))
  data = bytearray(fileio.read_bytes(target))
  data[-3] ^= 0x10
  fileio.write_atomic(target, bytes(data))
  with pytest.raises(snap.SnapshotError, match=r"checksum does not match field 'shards\[3\]"):
    snap.read_snapshot(path, lazy=True)
  # A pod host that holds rows [0, 20) checks only shards 0 and 1.
  assert snap.read_snapshot(path, lazy=True, validate_rows=(0, 20)).num_blocks == 40
  with pytest.raises(snap.SnapshotError, match="checksum"):
    snap.read_snapshot(path, lazy=True, validate_rows=(25, 40))


def test_lazy_validation_finds_non_finite_values(tmp_path):
  ids, emb, _ = _data(n=20, dim=4)
  path = snap.write_snapshot(tmp_path, 2, ids, emb, FP, num_shards=2)
  target = path / snap.embeddings_file_name(1, 2)
  bad = np.load(target)
  bad[3, 1] = np.nan
  np.save(target, bad)
  manifest = json.loads((path / snap.MANIFEST_NAME).read_text())
  manifest["shards"][1]["embeddings_sha256"] = fileio.sha256(target)  # Checksum "right", data bad.
  (path / snap.MANIFEST_NAME).write_text(json.dumps(manifest))
  with pytest.raises(snap.SnapshotError, match="non-finite value"):
    snap.read_snapshot(path, lazy=True)


def test_exact_searcher_over_lazy_rows_matches_numpy_and_reads_each_row_once(tmp_path):
  ids, emb, queries = _data(n=203, dim=8)
  path = snap.write_snapshot(tmp_path, 5, ids, emb, FP, num_shards=5)
  snapshot, searcher = searchers.open_exact_searcher(path)
  assert snapshot.embeddings.rows_read == 203  # Straight into the device buffers, once.
  assert searcher.num_rows == 208 and searcher.index_embeddings.shape == (208, 8)
  scores, got = searcher.search(queries, 10)
  exact = queries @ emb.T
  order = np.argsort(-exact, axis=1, kind="stable")[:, :10]
  np.testing.assert_array_equal(got, ids[order])
  np.testing.assert_allclose(scores, np.take_along_axis(exact, order, axis=1), rtol=1e-5)
  assert searchers.process_row_range(searcher.mesh, searcher.num_rows) == (0, 208)


def test_exact_searcher_chunks_large_query_batches(monkeypatch):
  ids, emb, _ = _data(n=100, dim=8)
  queries = np.random.default_rng(1).normal(size=(13, 8)).astype(np.float32)
  searcher = searchers.ExactSearcher(emb, ids)
  whole = searcher.search(queries, 5)
  monkeypatch.setattr(searchers.ExactSearcher, "max_score_bytes", 4 * 104 * 3)  # 3 queries a call.
  chunked = searcher.search(queries, 5)
  np.testing.assert_array_equal(chunked[1], whole[1])
  np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6)


def test_scann_temp_dirs_of_killed_processes_are_removed(tmp_path):
  """A process SIGKILLed while it holds ScaNN's temporary directory leaves it behind; the next use
  on the machine removes it, and never a running process's directory."""
  import subprocess
  import sys
  code = ("import os, signal, sys\n"
          "from realm_jax.retrieval import searchers\n"
          "with searchers.scann_tempdir(sys.argv[1]) as d:\n"
          "  open(os.path.join(d, 'index.bin'), 'wb').write(b'x' * 1000)\n"
          "  os.kill(os.getpid(), signal.SIGKILL)\n")
  r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], timeout=120)
  assert r.returncode == -9
  leftover = list(tmp_path.glob("realm-scann-*"))
  assert len(leftover) == 1 and (leftover[0] / "index.bin").exists()
  alive = tmp_path / f"realm-scann-{os.getppid()}-busy"  # a running process's: kept
  alive.mkdir()
  with searchers.scann_tempdir(str(tmp_path)) as d:
    assert os.path.isdir(d) and f"realm-scann-{os.getpid()}-" in d
    assert not leftover[0].exists() and alive.exists()
  assert not os.path.exists(d) and alive.exists()
