"""Snapshots on `gs://` through gcsfs, against a local Cloud Storage server (fake-gcs-server).

`test_snapshot_object_store.py` runs the manifest-last commit on fsspec's in-memory file system, which
lives inside one process and is not the real backend. Here the same code talks HTTP to a Cloud Storage
server (`gcs_emulator.gcs_server`) through gcsfs, the backend `tpu/` runs use, and a second OS process
writes the bucket while this one reads it (as the trainer and the index builder do on separate TPU
slices):

  * the round trip, with checksums, over the JSON API;
  * a snapshot the writer has not committed stays invisible, also to a reader in another process;
  * a writer process killed with SIGKILL mid-snapshot never exposes a partial snapshot; a later writer
    resumes its shards; an `IndexWatcher` in this process swaps to the commit of the other process
    (listings are not cached between polls);
  * a flipped byte in a shard object is rejected with the checksum error;
  * the builder's done marker and journal.

`fileio.write_if_absent` is checked to be a conditional create on the server (GCS
`ifGenerationMatch=0` through gcsfs's `pipe_file(mode="create")`): a second create finds the object
and leaves it as it was. (An `open(mode="xb")` over an existing object overwrote it against this
server, which is why `write_if_absent` does not use it.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest

import gcs_emulator  # pylint: disable=g-bad-import-order  (before gcsfs is imported)
import object_store_checks  # pylint: disable=g-import-not-at-top
from realm_jax import fileio  # pylint: disable=g-import-not-at-top
from realm_jax.retrieval import snapshot as snap  # pylint: disable=g-import-not-at-top
from realm_jax.retrieval import watcher as watcher_lib  # pylint: disable=g-import-not-at-top

BUCKET = "realm-jax-test"
FP = "corpus-fp-gcs"
DIM = 8


@pytest.fixture(scope="module")
def gcs_env():
  """A Cloud Storage server on localhost (in memory, one bucket); the environment pointing gcsfs at it."""
  with gcs_emulator.gcs_server(BUCKET) as env:
    yield env


@pytest.fixture
def root(gcs_env):
  """A fresh `gs://` snapshots directory per test."""
  del gcs_env
  return f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}/snapshots"


def _data(n, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.permutation(10 * n)[:n].astype(np.int64),
          rng.normal(size=(n, DIM)).astype(np.float32))


def _bounds(n, num_shards):
  sizes = [n // num_shards + (i < n % num_shards) for i in range(num_shards)]
  return np.cumsum([0] + sizes)


def test_write_if_absent_never_overwrites_on_gcs(root, monkeypatch):
  """The second of two creates returns False and the first writer's bytes stay, even when the object
  appears after the caller's existence check (the server's precondition decides, not the check)."""
  path = f"{root}/writer.json"
  assert fileio.write_if_absent(path, "first") is True
  assert fileio.write_if_absent(path, "second") is False
  assert fileio.read_text(path) == "first"
  # Another writer's object (a plain upload), created after this caller's existence check.
  theirs = f"{root}/theirs.json"
  fs, p = fileio._fs(theirs)  # pylint: disable=protected-access
  fs.pipe_file(p, b"theirs")
  monkeypatch.setattr(type(fs), "exists", lambda self, *a, **k: False)  # The check came too early.
  assert fileio.write_if_absent(theirs, "mine") is False
  monkeypatch.undo()
  assert fileio.read_text(theirs) == "theirs"


def test_round_trip_over_gcsfs_verifies_every_checksum(root):
  ids, emb = _data(23)
  path = snap.write_snapshot(root, 500, ids, emb, FP, num_shards=3, metadata={"embedder": "tiny"})
  assert path == f"{root}/500"
  assert fileio.listdir(root) == ["500"]  # Written in place: no temporary directory, no copy.
  names = fileio.listdir(path)
  assert {"manifest.json", "writer.json"} <= set(names) and len(names) == 3 * 3 + 2
  assert snap.list_snapshots(root) == [(500, path)] and snap.latest_snapshot(root) == path
  s = snap.read_snapshot(path)  # Verifies the sha256 of every shard object.
  np.testing.assert_array_equal(s.block_ids, ids)
  np.testing.assert_array_equal(s.embeddings, emb)
  assert s.params_step == 500 and s.metadata["embedder"] == "tiny"


def test_uncommitted_snapshot_is_invisible_until_the_manifest_lands(root):
  ids, emb = _data(12)
  committed = snap.write_snapshot(root, 100, ids, emb, FP, num_shards=2)
  staged = snap.SnapshotWriter(root, 200, 2, FP, DIM)
  b = _bounds(12, 2)
  for shard in (0, 1):
    staged.write_shard(shard, ids[b[shard]:b[shard + 1]], 2 * emb[b[shard]:b[shard + 1]])
  assert snap.list_snapshots(root) == [(100, committed)]
  assert snap.staging_dirs(root) == [(200, f"{root}/200")]
  with pytest.raises(snap.SnapshotError, match=r"200/manifest.json: file not found"):
    snap.read_snapshot(f"{root}/200")
  staged.commit()
  assert snap.latest_snapshot(root) == f"{root}/200"
  np.testing.assert_array_equal(snap.read_snapshot(f"{root}/200").embeddings, 2 * emb)


def test_flipped_byte_in_a_shard_object_is_rejected(root):
  ids, emb = _data(16)
  path = snap.write_snapshot(root, 3, ids, emb, FP, num_shards=2)
  manifest = json.loads(fileio.read_text(f"{path}/manifest.json"))
  victim = f"{path}/{manifest['shards'][1]['embeddings_file']}"
  data = bytearray(fileio.read_bytes(victim))
  data[-5] ^= 0x40
  fileio.write_atomic(victim, bytes(data))
  with pytest.raises(snap.SnapshotError, match="sha256"):
    snap.read_snapshot(path)


_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from realm_jax.retrieval import snapshot as snap
    root, n, num_shards, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    rng = np.random.default_rng(0)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    sizes = [n // num_shards + (i < n % num_shards) for i in range(num_shards)]
    bounds = np.cumsum([0] + sizes)
    writer = snap.SnapshotWriter(root, 60, num_shards, "corpus-fp-gcs", 8)
    for shard in range(num_shards):
      if shard in writer.completed_shards():
        continue
      writer.write_shard(shard, ids[bounds[shard]:bounds[shard + 1]], emb[bounds[shard]:bounds[shard + 1]])
      print(f"shard {shard}", flush=True)
      if shard == 1:  # The parent kills this process here (the pause is only its window).
        time.sleep(pause)
    writer.commit()
    print("committed", flush=True)
""")


def _start_writer(root, env, n, num_shards, pause):
  return subprocess.Popen([sys.executable, "-c", _WRITER, root, str(n), str(num_shards), str(pause)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, **env))


def test_writer_process_killed_mid_snapshot_then_resumed_and_swapped_in(root, gcs_env):
  ids, emb = _data(12, seed=1)
  snap.write_snapshot(root, 0, ids, emb, FP, num_shards=1)
  n, num_shards = 40, 4
  rng = np.random.default_rng(0)
  want_ids = rng.permutation(10 * n)[:n].astype(np.int64)
  want_emb = rng.normal(size=(n, DIM)).astype(np.float32)
  with watcher_lib.IndexWatcher(root, FP, lambda s: ("searcher", s.num_blocks), poll_interval_s=0.1,
                                max_index_staleness_steps=None, wait_timeout_s=60) as w:
    assert w.before_step(0).params_step == 0
    # Another process writes snapshot 60 and is killed with SIGKILL after its second shard.
    writer = _start_writer(root, gcs_env, n, num_shards, pause=30.0)
    try:
      lines = []
      while len(lines) < 2:
        line = writer.stdout.readline()
        assert line, "writer died early: " + writer.stderr.read()
        lines.append(line.strip())
      assert lines == ["shard 0", "shard 1"]
      writer.kill()
      writer.wait(timeout=30)
    finally:
      if writer.poll() is None:
        writer.kill()
    assert writer.returncode == -9
    # Nothing partial is visible: not to the listing, not to the watcher polling all along.
    w.poll_now()
    time.sleep(0.5)
    assert snap.list_snapshots(root) == [(0, f"{root}/0")] and w.pending is None
    assert w.before_step(1).params_step == 0 and w.rejected == {}
    # Read-only looks (a write here would refresh this process's listings and hide a stale cache).
    assert snap.staging_dirs(root) == [(60, f"{root}/60")]
    names = set(fileio.listdir(f"{root}/60"))
    records = {snap.shard_record_file_name(i, num_shards) for i in range(num_shards)}
    assert names & records == records - {snap.shard_record_file_name(i, num_shards) for i in (2, 3)}
    assert "manifest.json" not in names
    # A new writer process resumes (shards 0 and 1 are not written again) and commits.
    writer = _start_writer(root, gcs_env, n, num_shards, pause=0.0)
    out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    assert out.split("\n")[:3] == ["shard 2", "shard 3", "committed"]
    deadline = time.monotonic() + 60
    while w.pending is None:
      assert time.monotonic() < deadline, "the watcher never loaded snapshot 60"
      time.sleep(0.05)
    index = w.before_step(61)
    assert index.params_step == 60 and index.path == f"{root}/60" and w.swap_count == 2
    np.testing.assert_array_equal(index.snapshot.block_ids, want_ids)
    np.testing.assert_array_equal(index.snapshot.embeddings, want_emb)


def test_index_builder_done_marker_and_journal_on_gcs(gcs_env):
  del gcs_env
  object_store_checks.check_done_marker_and_journal(f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}")
