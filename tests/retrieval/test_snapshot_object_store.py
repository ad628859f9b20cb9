"""Snapshots on object stores (fsspec's in-memory file system, `memory://`): the manifest-last commit.

On an object store (`gs://` on Cloud TPU) there is no atomic rename, so `retrieval/snapshot.py` writes the
shards straight into `<root>/<params_step>/` and commits by writing `manifest.json` last. These tests run
the real code against `memory://` URLs (no mocks of the code under test), plus `realm_jax.fileio` on
local paths (the atomic temp + rename). `test_snapshot_gcs_emulator.py` runs the commit over `gs://`
(gcsfs) against a Cloud Storage emulator, with a second writer process.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import time

import fsspec
import numpy as np
import pytest

import object_store_checks

from realm_jax import fileio
from realm_jax.retrieval import snapshot as snap
from realm_jax.retrieval import watcher as watcher_lib
from realm_jax.retrieval import embedding

FP = "corpus-fp-object-store"


@pytest.fixture
def mem():
  """The in-memory file system, empty before and after the test."""
  fs = fsspec.filesystem("memory")

  def clear():
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")

  clear()
  yield fs
  clear()


@pytest.fixture
def root(mem):
  del mem
  return "memory://bucket/work/snapshots"


def _data(n=23, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.permutation(10 * n)[:n].astype(np.int64)
  return ids, rng.normal(size=(n, dim)).astype(np.float32)


def _bounds(n, num_shards):
  sizes = [n // num_shards + (i < n % num_shards) for i in range(num_shards)]
  return np.cumsum([0] + sizes)


def _fs_path(url):
  return fileio._fs(url)[1]  # pylint: disable=protected-access


def test_round_trip_commit_is_the_manifest_and_checksums_match(root, mem):
  ids, emb = _data()
  path = snap.write_snapshot(root, 500, ids, emb, FP, num_shards=3, metadata={"embedder": "tiny"})
  assert path == f"{root}/500" and isinstance(path, str)
  # No temporary directory, no rename: the shards were written in place, the manifest last.
  assert fileio.listdir(root) == ["500"]
  names = fileio.listdir(path)
  assert "manifest.json" in names and "writer.json" in names and not any(".partial" in n for n in names)
  manifest = json.loads(fileio.read_text(f"{path}/manifest.json"))
  assert manifest["num_blocks"] == 23 and manifest["num_shards"] == 3
  for shard in manifest["shards"]:
    for file, field in (("embeddings_file", "embeddings_sha256"), ("block_ids_file", "block_ids_sha256")):
      data = mem.cat_file(_fs_path(f"{path}/{shard[file]}"))
      assert hashlib.sha256(data).hexdigest() == shard[field]
  records = [json.loads(fileio.read_text(f"{path}/{snap.shard_record_file_name(i, 3)}")) for i in range(3)]
  assert [r["embeddings_sha256"] for r in records] == [s["embeddings_sha256"]
                                                       for s in manifest["shards"]]
  # The manifest is the newest object of the snapshot: everything else was written before it.
  manifest_time = mem.modified(_fs_path(f"{path}/manifest.json"))
  assert all(mem.modified(_fs_path(f"{path}/{n}")) <= manifest_time for n in names)
  for mmap in (False, True):  # mmap does not apply to object stores: read fully.
    s = snap.read_snapshot(path, validate=True, mmap=mmap)
    np.testing.assert_array_equal(s.block_ids, ids)
    np.testing.assert_array_equal(s.embeddings, emb)
    assert not isinstance(s.embeddings, np.memmap)
    assert (s.params_step, s.corpus_fingerprint, s.num_blocks, s.dim) == (500, FP, 23, 8)
    assert s.metadata == {"embedder": "tiny"} and s.path == path
    assert s.shard_row_ranges == ((0, 8), (8, 16), (16, 23))
  part = snap.read_snapshot(path, shard_indices=[1])
  np.testing.assert_array_equal(part.embeddings, emb[8:16])
  assert snap.list_snapshots(root) == [(500, path)]
  assert snap.latest_snapshot(root + "/") == path
  assert snap.staging_dirs(root) == []


def test_uncommitted_snapshot_is_invisible_and_the_newest_committed_one_is_returned(root):
  ids, emb = _data(n=12)
  committed = snap.write_snapshot(root, 100, ids, emb, FP, num_shards=2)
  # A writer of step 200 abandoned mid-way (2 of 3 shards written, no manifest) …
  abandoned = snap.SnapshotWriter(root, 200, 3, FP, 8)
  assert abandoned.tmp_dir == abandoned.final_dir == f"{root}/200"
  b = _bounds(12, 3)
  for shard in (0, 1):
    abandoned.write_shard(shard, ids[b[shard]:b[shard + 1]], emb[b[shard]:b[shard + 1]])
  # … and one of step 300 that wrote every shard but never committed.
  unfinished = snap.SnapshotWriter(root, 300, 1, FP, 8)
  unfinished.write_shard(0, ids, emb)
  assert fileio.isdir(f"{root}/200") and fileio.isdir(f"{root}/300")
  assert snap.list_snapshots(root) == [(100, committed)]
  assert snap.latest_snapshot(root) == committed
  assert not snap.is_committed(f"{root}/200") and snap.is_committed(committed)
  assert snap.staging_dirs(root) == [(200, f"{root}/200"), (300, f"{root}/300")]
  with pytest.raises(snap.SnapshotError, match=r"300/manifest.json: file not found"):
    snap.read_snapshot(f"{root}/300")
  # Committing makes it visible at once.
  unfinished.commit()
  assert [step for step, _ in snap.list_snapshots(root)] == [100, 300]
  assert snap.latest_snapshot(root) == f"{root}/300"


def test_resume_after_an_abandoned_writer_reuses_the_written_shards(root, mem):
  ids, emb = _data(n=30)
  b = _bounds(30, 3)
  first = snap.SnapshotWriter(root, 7, 3, FP, 8)
  for shard in (0, 1):
    first.write_shard(shard, ids[b[shard]:b[shard + 1]], emb[b[shard]:b[shard + 1]])
  del first  # Killed before writing shard 2 and committing.
  written = {n: (id(mem.store[_fs_path(f"{root}/7/{n}")]), mem.modified(_fs_path(f"{root}/7/{n}")))
             for n in fileio.listdir(f"{root}/7")}
  assert len(written) == 7  # writer.json + 2 x (embeddings, block ids, record).
  time.sleep(0.01)

  second = snap.SnapshotWriter(root, 7, 3, FP, 8)
  assert second.completed_shards() == [0, 1]
  for shard in sorted(set(range(3)) - set(second.completed_shards())):
    second.write_shard(shard, ids[b[shard]:b[shard + 1]], emb[b[shard]:b[shard + 1]])
  path = second.commit()
  for name, (obj, modified) in written.items():  # Not rewritten: the very same objects.
    assert id(mem.store[_fs_path(f"{root}/7/{name}")]) == obj, name
    assert mem.modified(_fs_path(f"{root}/7/{name}")) == modified, name
  s = snap.read_snapshot(path)
  np.testing.assert_array_equal(s.block_ids, ids)
  np.testing.assert_array_equal(s.embeddings, emb)


def test_resume_rewrites_a_damaged_shard_and_refuses_other_settings(root):
  ids, emb = _data(n=10)
  b = _bounds(10, 2)
  first = snap.SnapshotWriter(root, 9, 2, FP, 8)
  for shard in (0, 1):
    first.write_shard(shard, ids[b[shard]:b[shard + 1]], emb[b[shard]:b[shard + 1]])
  damaged = f"{root}/9/{snap.embeddings_file_name(1, 2)}"
  data = bytearray(fileio.read_bytes(damaged))
  data[-1] ^= 0xFF
  fileio.write_atomic(damaged, bytes(data))
  second = snap.SnapshotWriter(root, 9, 2, FP, 8)
  assert second.completed_shards() == [0]
  with pytest.raises(snap.SnapshotError, match="checksum does not match"):
    second.commit()
  with pytest.raises(snap.SnapshotError, match=r"writer.json: field 'num_shards' is 2"):
    snap.SnapshotWriter(root, 9, 4, FP, 8)
  second.write_shard(1, ids[b[1]:], emb[b[1]:])
  np.testing.assert_array_equal(snap.read_snapshot(second.commit()).embeddings, emb)


def test_corrupted_shard_is_rejected_with_the_checksum_error(root):
  ids, emb = _data(n=16)
  path = snap.write_snapshot(root, 3, ids, emb, FP, num_shards=2)
  target = f"{path}/{snap.embeddings_file_name(0, 2)}"
  data = bytearray(fileio.read_bytes(target))
  data[-5] ^= 0x01  # Same size, one bit of one float changed.
  fileio.write_atomic(target, bytes(data))
  with pytest.raises(snap.SnapshotError,
                     match=r"embeddings-00000-of-00002.npy: checksum does not match field "
                           r"'shards\[0\].embeddings_sha256'"):
    snap.read_snapshot(path, validate=True)
  assert snap.read_snapshot(path, validate=False).num_blocks == 16  # Only validation notices.
  fileio.remove(f"{path}/{snap.block_ids_file_name(1, 2)}")
  with pytest.raises(snap.SnapshotError, match=r"block_ids-00001-of-00002.npy: file not found"):
    snap.read_snapshot(path, shard_indices=[1])


def test_prune_keeps_the_newest_and_deletes_the_manifest_first(root, mem, monkeypatch):
  ids, emb = _data(n=6)
  for step in (10, 20, 30, 40, 50):
    snap.write_snapshot(root, step, ids, emb, FP, num_shards=2)
  stale = snap.SnapshotWriter(root, 5, 1, FP, 8)  # Abandoned staging directory (no manifest).
  stale.write_shard(0, ids, emb)
  seen_during_delete = []
  real_rmtree = fileio.rmtree

  def observing_rmtree(path, ignore_errors=True):
    # When the files go, the manifest must already be gone and the snapshot unlisted.
    seen_during_delete.append((path, fileio.exists(f"{path}/manifest.json"),
                               [s for s, _ in snap.list_snapshots(root)]))
    real_rmtree(path, ignore_errors)

  monkeypatch.setattr(fileio, "rmtree", observing_rmtree)
  removed = snap.prune_snapshots(root, keep=2, protect=(20,), stale_tmp_age_s=3600)
  assert removed == [f"{root}/10", f"{root}/30"]
  assert [(p, has_manifest) for p, has_manifest, _ in seen_during_delete] == [
      (f"{root}/10", False), (f"{root}/30", False)]
  assert 10 not in seen_during_delete[0][2] and 30 not in seen_during_delete[1][2]
  assert [s for s, _ in snap.list_snapshots(root)] == [20, 40, 50]
  assert fileio.listdir(root) == ["20", "40", "5", "50"]  # The young staging directory stays.
  assert not mem.find(_fs_path(f"{root}/10")) and not mem.find(_fs_path(f"{root}/30"))
  assert snap.prune_snapshots(root, keep=2, stale_tmp_age_s=0.0) == [f"{root}/20", f"{root}/5"]
  assert fileio.listdir(root) == ["40", "50"]


def test_overwrite_withdraws_the_old_snapshot_first(root):
  ids, emb = _data(n=10, seed=1)
  old = snap.write_snapshot(root, 300, ids, emb, FP, num_shards=2)
  with pytest.raises(snap.SnapshotError, match="already exists"):
    snap.SnapshotWriter(root, 300, 3, FP, 8)
  writer = snap.SnapshotWriter(root, 300, 3, FP, 8, overwrite=True)
  # The old snapshot is gone for readers at once, and none of its files is reused.
  assert snap.list_snapshots(root) == [] and writer.completed_shards() == []
  assert sorted(fileio.listdir(old)) == ["writer.json"]
  # A second process of the same job, constructed now, keeps what the first one writes.
  b = _bounds(10, 3)
  writer.write_shard(0, ids[:b[1]] + 1000, emb[:b[1]] * 2)
  other = snap.SnapshotWriter(root, 300, 3, FP, 8, overwrite=True)
  assert other.completed_shards() == [0]
  for shard in (1, 2):
    other.write_shard(shard, ids[b[shard]:b[shard + 1]] + 1000, emb[b[shard]:b[shard + 1]] * 2)
  path = other.commit()
  s = snap.read_snapshot(path)
  np.testing.assert_array_equal(s.block_ids, ids + 1000)
  np.testing.assert_array_equal(s.embeddings, emb * 2)
  assert not any("-of-00002" in n for n in fileio.listdir(path))  # Old shard files deleted.
  # write_snapshot(overwrite=True) replaces a committed snapshot in one call.
  snap.write_snapshot(root, 300, ids, emb, FP, num_shards=1, overwrite=True)
  np.testing.assert_array_equal(snap.read_snapshot(f"{root}/300").embeddings, emb)
  assert [s for s, _ in snap.list_snapshots(root)] == [300]


def test_a_second_writer_stops_once_the_snapshot_is_committed(root):
  ids, emb = _data(n=8)
  winner = snap.SnapshotWriter(root, 1, 2, FP, 8)
  loser = snap.SnapshotWriter(root, 1, 2, FP, 8)
  winner.write_shard(0, ids[:4], emb[:4])
  winner.write_shard(1, ids[4:], emb[4:])
  path = winner.commit()
  with pytest.raises(snap.SnapshotError, match="committed by another writer"):
    loser.write_shard(0, ids[:4], emb[:4])
  with pytest.raises(snap.SnapshotError, match="already exists"):
    loser.commit()
  loser.discard()  # Never deletes a committed snapshot.
  np.testing.assert_array_equal(snap.read_snapshot(path).embeddings, emb)
  with pytest.raises(snap.SnapshotError, match="already committed by this writer"):
    winner.commit()


def test_index_watcher_picks_up_a_snapshot_committed_on_memory(root):
  ids, emb = _data(n=12)
  snap.write_snapshot(root, 0, ids, emb, FP, num_shards=2)
  with watcher_lib.IndexWatcher(root, FP, lambda s: ("searcher", s.num_blocks), poll_interval_s=0.05,
                                max_index_staleness_steps=None, wait_timeout_s=30) as w:
    index = w.before_step(0)
    assert index.params_step == 0 and index.searcher == ("searcher", 12)
    staged = snap.SnapshotWriter(root, 40, 1, FP, 8)
    staged.write_shard(0, ids, emb * 3)  # Written, not committed: must not be picked up.
    w.poll_now()
    time.sleep(0.3)
    assert w.pending is None and w.rejected == {}
    staged.commit()
    deadline = time.monotonic() + 30
    while w.pending is None:
      assert time.monotonic() < deadline, "snapshot 40 was not loaded"
      time.sleep(0.02)
    index = w.before_step(41)
    assert index.params_step == 40 and index.path == f"{root}/40"
    np.testing.assert_array_equal(index.snapshot.embeddings, emb * 3)
    assert w.swap_count == 2 and w.rejected == {}


class _TinyCorpus:
  """What `embedding.embed_snapshot` reads of a corpus: ids, fingerprint, tokenised blocks."""

  fingerprint = "fp-tiny-object-store"

  def __init__(self, n):
    self.block_ids = np.arange(100, 100 + n, dtype=np.int64)

  def __len__(self):
    return len(self.block_ids)

  def retrieval_inputs(self, rows):
    ids = np.tile(np.asarray(rows)[:, None] + 1, (1, 4)).astype(np.int32)
    return {"input_ids": ids, "input_mask": np.ones_like(ids), "segment_ids": np.zeros_like(ids)}


def test_index_builder_resumes_the_shards_of_a_killed_run_on_memory(root):
  corpus = _TinyCorpus(20)
  bert_cfg = type("BertCfg", (), {"compute_dtype": np.dtype(np.float32)})()
  cfg = type("Cfg", (), {"embedding_dim": 4, "pooling": "cls", "bert": bert_cfg})()
  calls = []

  def embed_fn(params, batch):  # [batch, 4] int32 -> [batch, 4] float32; a stand-in document tower.
    del params
    calls.append(1)
    if crash_after is not None and len(calls) > crash_after:
      raise KeyboardInterrupt("killed")
    return batch["input_ids"].astype(np.float32) * 0.5

  crash_after = 2  # Killed while embedding the third of five shards.
  with pytest.raises(KeyboardInterrupt):
    embedding.embed_snapshot(root, corpus, cfg, None, params_step=5, blocks_per_shard=4,
                                 embed_fn=embed_fn)
  assert snap.list_snapshots(root) == [] and snap.staging_dirs(root) == [(5, f"{root}/5")]
  crash_after, calls[:] = None, []
  result = embedding.embed_snapshot(root, corpus, cfg, None, params_step=5, blocks_per_shard=4,
                                        embed_fn=embed_fn)
  assert result.skipped_shards == (0, 1) and result.written_shards == (2, 3, 4) and len(calls) == 3
  assert result.path == f"{root}/5" and snap.list_snapshots(root) == [(5, result.path)]
  s = snap.read_snapshot(result.path)
  np.testing.assert_array_equal(s.block_ids, corpus.block_ids)
  np.testing.assert_array_equal(s.embeddings, np.tile(np.arange(1, 21)[:, None] * 0.5, (1, 4)))
  assert s.metadata["embedding_dim"] == 4


def test_index_builder_done_marker_and_journal_on_memory(mem):
  del mem
  object_store_checks.check_done_marker_and_journal("memory://bucket/run")


# ----------------------------------------------------------------------------------------------------
# fileio itself
# ----------------------------------------------------------------------------------------------------


def test_fileio_local_writes_are_atomic_replacements(tmp_path):
  target = tmp_path / "status.json"
  fileio.write_atomic(str(target), "old\n")
  inode = os.stat(target).st_ino
  with open(target, encoding="utf-8") as reader:  # A reader holding the old file …
    fileio.write_atomic(target, "new\n")
    assert reader.read() == "old\n"  # … keeps the old content: the file was replaced, not rewritten.
  assert target.read_text() == "new\n" and os.stat(target).st_ino != inode
  fileio.save_npy(tmp_path / "a.npy", np.arange(6, dtype=np.int64).reshape(2, 3))
  loaded = fileio.load_npy(tmp_path / "a.npy", mmap=True)
  assert isinstance(loaded, np.memmap) and loaded.tolist() == [[0, 1, 2], [3, 4, 5]]
  assert fileio.write_if_absent(tmp_path / "w.json", "1") is True
  assert fileio.write_if_absent(tmp_path / "w.json", "2") is False
  assert (tmp_path / "w.json").read_text() == "1"
  assert not list(tmp_path.glob("*.partial"))
  assert fileio.supports_atomic_rename(tmp_path) and fileio.supports_atomic_rename(f"file://{tmp_path}")
  assert fileio.as_path(f"file://{tmp_path}") == tmp_path
  assert isinstance(fileio.join(tmp_path, "x"), pathlib.Path)
  assert fileio.glob(tmp_path, "*.npy") == [tmp_path / "a.npy"]


def test_fileio_urls(mem):
  del mem
  assert not fileio.supports_atomic_rename("gs://bucket/x")
  assert fileio.as_path("gs://bucket/work/") == "gs://bucket/work"
  assert fileio.join("gs://bucket/work", "snapshots", "5") == "gs://bucket/work/snapshots/5"
  assert fileio.dirname("gs://bucket/work/snapshots") == "gs://bucket/work"
  assert fileio.basename("gs://bucket/work/snapshots/500") == "500"
  with pytest.raises(ValueError, match="lost a '/'"):
    fileio.as_path(pathlib.Path("gs://bucket/work"))
  with pytest.raises(ValueError, match="no atomic rename"):
    fileio.rename("memory://a/b", "memory://a/c")
  url = "memory://bucket/f.json"
  assert fileio.write_if_absent(url, "1") is True and fileio.write_if_absent(url, "2") is False
  assert fileio.read_text(url) == "1" and fileio.isfile(url) and fileio.exists("memory://bucket")
  fileio.append_text("memory://bucket/log", "a\n")
  fileio.append_text("memory://bucket/log", "b\n")
  assert fileio.read_text("memory://bucket/log") == "a\nb\n"
  assert fileio.newest_mtime("memory://bucket") >= fileio.mtime(url)
  assert fileio.newest_mtime("memory://bucket/missing") is None
  with pytest.raises(FileNotFoundError):
    fileio.listdir("memory://bucket/missing")
  fileio.rmtree("memory://bucket")
  assert not fileio.exists(url)


def test_fileio_names_the_extra_when_gcsfs_is_missing(monkeypatch):
  import fsspec.registry  # pylint: disable=g-import-not-at-top,unused-import
  registry = sys.modules["fsspec.registry"]  # `fsspec.registry` is also the name of a mapping.
  # As on a machine without the `gcs` extra: importing gcsfs fails, and fsspec has not loaded it yet.
  monkeypatch.setitem(sys.modules, "gcsfs", None)
  for protocol in ("gs", "gcs"):
    monkeypatch.delitem(registry._registry, protocol, raising=False)  # pylint: disable=protected-access
  with pytest.raises(ImportError, match=r"pip install 'realm-jax\[gcs\]'"):
    fileio.exists("gs://some-bucket/work")
