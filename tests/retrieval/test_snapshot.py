"""Tests for realm_jax/retrieval/snapshot.py: atomic, resumable, validated embedding snapshots."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from realm_jax.retrieval import snapshot as snap

FP = "corpus-fp-0123"


def _data(n=23, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.permutation(10 * n)[:n].astype(np.int64)  # Unique, unordered ids.
  return ids, rng.normal(size=(n, dim)).astype(np.float32)


def test_round_trip_sharded_with_metadata(tmp_path):
  ids, emb = _data()
  path = snap.write_snapshot(tmp_path, 500, ids, emb, FP, num_shards=3,
                             metadata={"embedder": "tiny", "layers": 2})
  assert path == tmp_path / "500"
  assert sorted(p.name for p in path.glob("*.npy")) == [
      "block_ids-00000-of-00003.npy", "block_ids-00001-of-00003.npy", "block_ids-00002-of-00003.npy",
      "embeddings-00000-of-00003.npy", "embeddings-00001-of-00003.npy",
      "embeddings-00002-of-00003.npy"]
  manifest = json.loads((path / "manifest.json").read_text())
  assert manifest["num_blocks"] == 23 and manifest["dim"] == 8 and manifest["dtype"] == "float32"
  assert [(s["row_start"], s["row_end"]) for s in manifest["shards"]] == [(0, 8), (8, 16), (16, 23)]
  assert manifest["corpus_fingerprint"] == FP and manifest["params_step"] == 500
  for mmap in (False, True):
    s = snap.read_snapshot(path, validate=True, mmap=mmap)
    np.testing.assert_array_equal(s.block_ids, ids)
    np.testing.assert_array_equal(s.embeddings, emb)
    assert s.embeddings.dtype == np.float32 and s.block_ids.dtype == np.int64
    assert (s.params_step, s.corpus_fingerprint, s.num_blocks, s.dim) == (500, FP, 23, 8)
    assert s.metadata == {"embedder": "tiny", "layers": 2}
    assert s.shard_row_ranges == ((0, 8), (8, 16), (16, 23))
  # One host of a multi-host job loads only its shards; a single mmapped shard stays on disk.
  part = snap.read_snapshot(path, mmap=True, shard_indices=[1])
  assert isinstance(part.embeddings, np.memmap)
  np.testing.assert_array_equal(part.embeddings, emb[8:16])
  np.testing.assert_array_equal(part.block_ids, ids[8:16])
  assert snap.list_snapshots(tmp_path) == [(500, path)]
  assert snap.latest_snapshot(tmp_path) == path
  assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.rglob("*.partial"))


def test_float16_storage_and_more_shards_than_rows(tmp_path):
  ids, emb = _data(n=3, dim=4)
  path = snap.write_snapshot(tmp_path, 7, ids, emb, FP, num_shards=5, dtype="float16")
  s = snap.read_snapshot(path)
  assert s.embeddings.dtype == np.float16
  np.testing.assert_array_equal(s.embeddings, emb.astype(np.float16))
  assert s.shard_row_ranges == ((0, 1), (1, 2), (2, 3), (3, 3), (3, 3))


def test_missing_manifest_is_invisible(tmp_path):
  ids, emb = _data()
  old = snap.write_snapshot(tmp_path, 100, ids, emb, FP)
  new = snap.write_snapshot(tmp_path, 200, ids, emb, FP)
  (new / "manifest.json").unlink()
  # An uncommitted temporary directory and a stray numbered file are not snapshots either.
  writer = snap.SnapshotWriter(tmp_path, 300, 1, FP, emb.shape[1])
  writer.write_shard(0, ids, emb)
  (tmp_path / "400").write_text("not a directory")
  assert snap.list_snapshots(tmp_path) == [(100, old)]
  assert snap.latest_snapshot(tmp_path) == old
  with pytest.raises(snap.SnapshotError, match=r"200/manifest\.json: file not found"):
    snap.read_snapshot(new)
  assert snap.latest_snapshot(tmp_path / "nothing-here") is None


def test_corrupted_shard_is_rejected_naming_the_file(tmp_path):
  ids, emb = _data()
  path = snap.write_snapshot(tmp_path, 3, ids, emb, FP, num_shards=3)
  target = path / "embeddings-00001-of-00003.npy"
  raw = bytearray(target.read_bytes())
  raw[-5] ^= 0x40  # One bit of one float in the data section.
  target.write_bytes(bytes(raw))
  with pytest.raises(snap.SnapshotError,
                     match=r"embeddings-00001-of-00003\.npy: checksum does not match field "
                           r"'shards\[1\]\.embeddings_sha256'"):
    snap.read_snapshot(path)
  # Without validation the (wrong) data loads: the checksum is the only guard against bit flips.
  loaded = snap.read_snapshot(path, validate=False)
  assert not np.array_equal(loaded.embeddings, emb)
  # A truncated file fails to load even without validation, naming the file.
  target.write_bytes(bytes(raw[:40]))
  with pytest.raises(snap.SnapshotError, match=r"embeddings-00001-of-00003\.npy"):
    snap.read_snapshot(path, validate=False)
  # A missing shard file (shard 1 restored first).
  raw[-5] ^= 0x40
  target.write_bytes(bytes(raw))
  snap.read_snapshot(path)
  (path / "block_ids-00002-of-00003.npy").unlink()
  with pytest.raises(snap.SnapshotError, match=r"block_ids-00002-of-00003\.npy: file not found"):
    snap.read_snapshot(path)


@pytest.mark.parametrize("field,value,message", [
    ("num_blocks", 22, r"field 'num_blocks' is 22 but the shards cover 23 rows"),
    ("dtype", "int8", r"field 'dtype' must be one of"),
    ("format_version", 99, r"field 'format_version' is 99"),
    ("params_step", 4, r"field 'params_step' is 4 but the directory is 3"),
    ("corpus_fingerprint", 5, r"field 'corpus_fingerprint' must be str"),
    ("shards", "x", r"field 'shards' must be list"),
])
def test_bad_manifest_field_is_named(tmp_path, field, value, message):
  ids, emb = _data()
  path = snap.write_snapshot(tmp_path, 3, ids, emb, FP)
  manifest_path = path / "manifest.json"
  manifest = json.loads(manifest_path.read_text())
  manifest[field] = value
  manifest_path.write_text(json.dumps(manifest))
  with pytest.raises(snap.SnapshotError, match=r"3/manifest\.json: " + message):
    snap.read_snapshot(path)
  assert snap.list_snapshots(tmp_path) == []


def test_nan_and_duplicate_ids_rejected_on_read(tmp_path):
  ids, emb = _data()
  path = snap.write_snapshot(tmp_path, 1, ids, emb, FP)
  bad = emb.copy()
  bad[4, 2] = np.nan
  np.save(path / "embeddings-00000-of-00001.npy", bad)
  manifest = json.loads((path / "manifest.json").read_text())
  manifest["shards"][0]["embeddings_sha256"] = snap._sha256(path / "embeddings-00000-of-00001.npy")
  (path / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(snap.SnapshotError, match=r"embeddings-00000-of-00001\.npy: field 'embeddings' "
                                               r"holds a non-finite value \(first at row 4\)"):
    snap.read_snapshot(path)


def test_write_shard_validation(tmp_path):
  ids, emb = _data()
  writer = snap.SnapshotWriter(tmp_path, 1, 2, FP, 8)
  with pytest.raises(snap.SnapshotError, match=r"field 'shard_index' must be in \[0, 2\)"):
    writer.write_shard(2, ids, emb)
  with pytest.raises(snap.SnapshotError, match=r"embeddings-00000-of-00002\.npy: field 'embeddings' "
                                               r"must have shape \[rows, 8\]"):
    writer.write_shard(0, ids, emb[:, :4])
  with pytest.raises(snap.SnapshotError, match=r"has 23 rows but 'block_ids' has 22"):
    writer.write_shard(0, ids[:-1], emb)
  nan = emb.copy()
  nan[0, 0] = np.inf
  with pytest.raises(snap.SnapshotError, match=r"non-finite value \(first at row 0\)"):
    writer.write_shard(0, ids, nan)
  dup = ids.copy()
  dup[3] = dup[7]
  with pytest.raises(snap.SnapshotError, match=r"block_ids-00000-of-00002\.npy: field 'block_ids' "
                                               f"repeats block id {dup[3]}"):
    writer.write_shard(0, dup, emb)
  with pytest.raises(snap.SnapshotError, match=r"shards missing \(first: shard-00000-of-00002\.json\)"):
    writer.commit()
  # Block ids must also be unique across shards.
  writer.write_shard(0, ids[:10], emb[:10])
  writer.write_shard(1, ids[5:15], emb[5:15])
  with pytest.raises(snap.SnapshotError, match=r"repeats block id"):
    writer.commit()
  with pytest.raises(snap.SnapshotError, match=r"field 'dtype' must be one of"):
    snap.SnapshotWriter(tmp_path, 2, 1, FP, 8, dtype="int32")
  with pytest.raises(snap.SnapshotError, match=r"field 'metadata' is not JSON-serialisable"):
    snap.SnapshotWriter(tmp_path, 2, 1, FP, 8, metadata={"f": object()})


def test_resume_half_written_temp_dir(tmp_path):
  ids, emb = _data(n=40)
  parts = np.array_split(np.arange(40), 4)
  first = snap.SnapshotWriter(tmp_path, 9, 4, FP, 8, metadata={"run": 1})
  first.write_shard(0, ids[parts[0]], emb[parts[0]])
  first.write_shard(2, ids[parts[2]], emb[parts[2]])
  # The job dies while writing shard 1 (data renamed, record not yet written) and shard 3 (.partial).
  np.save(first.tmp_dir / "embeddings-00001-of-00004.npy", emb[parts[1]])
  (first.tmp_dir / "embeddings-00003-of-00004.npy.abc.partial").write_bytes(b"\x93NUMPY garbage")
  # ... and shard 2 was silently damaged on disk afterwards.
  assert snap.SnapshotWriter(tmp_path, 9, 4, FP, 8).completed_shards() == [0, 2]
  damaged = first.tmp_dir / "block_ids-00002-of-00004.npy"
  damaged.write_bytes(damaged.read_bytes()[:-1] + b"\x01")

  restarted = snap.SnapshotWriter(tmp_path, 9, 4, FP, 8, metadata={"run": 2})
  todo = sorted(set(range(4)) - set(restarted.completed_shards()))
  assert todo == [1, 2, 3]
  assert restarted.completed_shards(verify=False) == [0, 2]  # Without hashing, damage goes unseen.
  for shard in todo:
    restarted.write_shard(shard, ids[parts[shard]], emb[parts[shard]])
  path = restarted.commit()
  s = snap.read_snapshot(path)
  np.testing.assert_array_equal(s.embeddings, emb)
  np.testing.assert_array_equal(s.block_ids, ids)
  assert s.metadata == {"run": 2}
  assert not list(path.glob("*.partial"))
  with pytest.raises(snap.SnapshotError, match=r"already committed"):
    restarted.write_shard(0, ids[parts[0]], emb[parts[0]])


def test_writer_with_different_settings_is_refused(tmp_path):
  snap.SnapshotWriter(tmp_path, 9, 4, FP, 8)
  with pytest.raises(snap.SnapshotError, match=r"writer\.json: field 'corpus_fingerprint' is "
                                               r"'corpus-fp-0123' but this writer has 'other'"):
    snap.SnapshotWriter(tmp_path, 9, 4, "other", 8)
  with pytest.raises(snap.SnapshotError, match=r"field 'num_shards' is 4 but this writer has 2"):
    snap.SnapshotWriter(tmp_path, 9, 2, FP, 8)


def test_concurrent_threads_write_disjoint_shards(tmp_path):
  ids, emb = _data(n=64)
  parts = np.array_split(np.arange(64), 8)
  barrier = threading.Barrier(4)
  errors = []

  def worker(shards):
    try:
      barrier.wait()  # All writers race to create writer.json.
      writer = snap.SnapshotWriter(tmp_path, 12, 8, FP, 8)
      for shard in shards:
        writer.write_shard(shard, ids[parts[shard]], emb[parts[shard]])
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=worker, args=([i, i + 4],)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  path = snap.SnapshotWriter(tmp_path, 12, 8, FP, 8).commit()
  s = snap.read_snapshot(path)
  np.testing.assert_array_equal(s.embeddings, emb)
  np.testing.assert_array_equal(s.block_ids, ids)


_CHILD = """
import sys, numpy as np
from realm_jax.retrieval import snapshot as snap
root, shards = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
rng = np.random.default_rng(0)
emb = rng.normal(size=(30, 8)).astype(np.float32)
parts = np.array_split(np.arange(30), 4)
writer = snap.SnapshotWriter(root, 77, 4, "fp", 8)
for shard in shards:
  writer.write_shard(shard, parts[shard] + 1000, emb[parts[shard]])
"""


def test_two_processes_write_disjoint_shards_one_commits(tmp_path):
  procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), shards])
           for shards in ("0,2", "1,3")]
  assert [p.wait(timeout=60) for p in procs] == [0, 0]
  writer = snap.SnapshotWriter(tmp_path, 77, 4, "fp", 8)
  other = snap.SnapshotWriter(tmp_path, 77, 4, "fp", 8)
  assert writer.completed_shards() == [0, 1, 2, 3]
  s = snap.read_snapshot(writer.commit())
  expected = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
  np.testing.assert_array_equal(s.embeddings, expected)
  np.testing.assert_array_equal(s.block_ids, np.arange(30) + 1000)
  # Exactly one process commits: a second committer is refused.
  with pytest.raises(snap.SnapshotError, match=r"temporary directory not found"):
    other.commit()


def test_existing_step_raises_unless_overwrite(tmp_path):
  ids, emb = _data()
  path = snap.write_snapshot(tmp_path, 5, ids, emb, FP)
  with pytest.raises(snap.SnapshotError, match=r"5: snapshot for params_step 5 already exists"):
    snap.write_snapshot(tmp_path, 5, ids, emb * 2, FP)
  snap.write_snapshot(tmp_path, 5, ids, emb * 2, FP, overwrite=True)
  np.testing.assert_array_equal(snap.read_snapshot(path).embeddings, emb * 2)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["5"]


def test_prune_keeps_newest(tmp_path):
  ids, emb = _data(n=4, dim=2)
  for step in (100, 200, 300, 400, 500):
    snap.write_snapshot(tmp_path, step, ids, emb, FP)
  (tmp_path / "600").mkdir()  # Not a snapshot (no manifest): never touched.
  fresh = snap.SnapshotWriter(tmp_path, 700, 1, FP, 2).tmp_dir
  stale = snap.SnapshotWriter(tmp_path, 50, 1, FP, 2).tmp_dir
  long_ago = time.time() - 7200
  for p in [stale, *stale.iterdir()]:
    os.utime(p, (long_ago, long_ago))
  (tmp_path / ".deleting-1-abc").mkdir()

  removed = snap.prune_snapshots(tmp_path, keep=2, protect=[100])
  assert sorted(p.name for p in removed) == [".deleting-1-abc", "200", "300"]
  assert [s for s, _ in snap.list_snapshots(tmp_path)] == [100, 400, 500]
  assert fresh.exists() and stale.exists()  # No age given: temporary directories stay.

  removed = snap.prune_snapshots(tmp_path, keep=1, stale_tmp_age_s=3600)
  assert sorted(p.name for p in removed) == [".tmp-50", "100", "400"]
  assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-700", "500", "600"]
  np.testing.assert_array_equal(snap.read_snapshot(tmp_path / "500").embeddings, emb)
  with pytest.raises(ValueError, match="keep must be >= 1"):
    snap.prune_snapshots(tmp_path, keep=0)


def test_snapshot_dataclass_checks_shapes():
  with pytest.raises(snap.SnapshotError, match=r"field 'block_ids' must be \[3\]"):
    snap.Snapshot(pathlib.Path("x"), 0, FP, np.arange(2), np.zeros((3, 4), np.float32))
  s = snap.Snapshot(pathlib.Path("x"), 0, FP, np.arange(3), np.zeros((3, 4), np.float32))
  assert s.shard_row_ranges == ((0, 3),) and s.num_blocks == 3 and s.dim == 4
