"""Write failures (issue #14 §2): a full disk or a permission error while writing a checkpoint, an
embedding snapshot, `summary.json` or the predictions leaves the previous good state in place and
names what failed.

Faults, injected while the second of two writes runs (the first one is the "previous good state"):
  * `file_size_limit`: RLIMIT_FSIZE below the size of the new file, so the kernel fails `write(2)`
    part way with EFBIG (SIGXFSZ ignored). A real mid-write failure, also for root and for C++
    writers (tensorstore under orbax), standing in for a full disk.
  * `enospc`: files that `realm_jax.fileio` opens for writing raise ENOSPC after 1 KiB (Python
    writers only): the errno of a full disk.
  * `read_only`: the target directory is read-only. `chmod 555` when not root; root ignores file
    modes, so there `os.mkdir/rename/replace/link` and `fileio.open` raise EACCES for paths inside it.
Each test then checks: the error names the file (or checkpoint directory) being written; the previous
version is intact and loads; nothing half-written is under the final name, no `*.partial` is left;
and the same write succeeds once the fault is gone. `COUNTS` (printed at the end) counts the faults.
On an object store (`memory://`, fsspec) a failing object write is checked the same way.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import os
import resource
import signal
import threading
import uuid

import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax import evaluation
from realm_jax import fileio
from realm_jax.retrieval import snapshot as snap
from realm_jax.training import checkpointing
from realm_jax.training import metric_writer

FP = "corpus-fp-write-failures"
FAULTS = ("file_size_limit", "enospc", "read_only")
IS_ROOT = os.geteuid() == 0


# ----------------------------------------------------------------------------------------------------
# Fault injection
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_size_limit(nbytes: int):
  """Writes past byte `nbytes` of any file fail with EFBIG (process-wide, only inside the block)."""
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old_handler)


class _FullDiskFile:
  """A file object whose writes fail with ENOSPC once `budget` bytes were written."""

  def __init__(self, f, budget: int):
    self._f, self._left = f, budget

  def write(self, data):
    n = len(memoryview(data).cast("B"))
    if n > self._left:
      self._f.write(memoryview(data).cast("B")[:self._left])
      self._left = 0
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    self._left -= n
    return self._f.write(data)

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()


@contextlib.contextmanager
def _enospc(monkeypatch, budget: int = 1024):
  real_open = builtins.open

  def full_disk_open(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    return _FullDiskFile(f, budget) if any(c in mode for c in "wax+") else f

  with monkeypatch.context() as m:
    m.setattr(fileio, "open", full_disk_open, raising=False)
    yield


@contextlib.contextmanager
def _read_only(monkeypatch, directory):
  """`directory` is read-only inside the block (see the module docstring for root)."""
  directory = os.path.abspath(os.fspath(directory))
  if not IS_ROOT:
    os.chmod(directory, 0o555)
    try:
      yield
    finally:
      os.chmod(directory, 0o755)
    return

  def inside(path) -> bool:
    return (isinstance(path, (str, bytes, os.PathLike)) and
            os.path.abspath(os.fsdecode(path)).startswith(directory + os.sep))

  def deny(fn):
    def wrapped(*args, **kwargs):
      for arg in args[:2]:
        if inside(arg):
          raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(arg))
      return fn(*args, **kwargs)
    return wrapped

  real_open = builtins.open

  def open_read_only(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and inside(file):
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(file))
    return real_open(file, mode, *args, **kwargs)

  with monkeypatch.context() as m:
    for name in ("mkdir", "rename", "replace", "link"):
      m.setattr(os, name, deny(getattr(os, name)))
    m.setattr(fileio, "open", open_read_only, raising=False)
    yield


def _fault(kind: str, monkeypatch, directory, size_limit: int):
  if kind == "file_size_limit":
    return _file_size_limit(size_limit)
  if kind == "enospc":
    return _enospc(monkeypatch)
  return _read_only(monkeypatch, directory)


COUNTS = {"injected": 0, "survived": 0}


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
  yield
  print(f"\nwrite faults injected: {COUNTS['injected']}, survived (clear error, previous state "
        f"intact, retry works): {COUNTS['survived']}, data lost: 0 unless a test failed")


@pytest.fixture
def survived():
  """Call at the end of a test: every fault the test injected was survived."""
  start = COUNTS["injected"]

  def done():
    COUNTS["survived"] += COUNTS["injected"] - start
  return done


def _expect_failure(kind, monkeypatch, directory, size_limit, write, match_path, error=OSError):
  """Runs `write()` under fault `kind`; returns the error, which must be `error` naming `match_path`."""
  COUNTS["injected"] += 1
  with _fault(kind, monkeypatch, directory, size_limit):
    with pytest.raises(error) as info:
      write()
  message = str(info.value)
  assert str(match_path) in message, message
  if kind == "enospc":
    assert info.value.errno == errno.ENOSPC and "No space left on device" in message
  elif kind == "read_only":
    assert isinstance(info.value, PermissionError) or "Permission denied" in message, message
  else:
    assert "File too large" in message, message
  return info.value


def _no_partial_files(root) -> None:
  leftovers = [p for p in _walk(root) if p.endswith(".partial") or ".orbax-checkpoint-tmp" in p]
  assert not leftovers, leftovers


def _walk(root):
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      yield os.path.join(folder, name)


# ----------------------------------------------------------------------------------------------------
# (c) summary.json and (d) the predictions JSONL
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FAULTS)
def test_summary_json_write_failure_keeps_the_previous_summary(tmp_path, monkeypatch, kind,
                                                               survived):
  workdir = tmp_path / "run"
  first = {"step": 1, "train": {"loss": 2.5}}
  path = metric_writer.write_summary_json(str(workdir), first)
  before = fileio.read_text(path)
  # The new summary is larger than the size limit (a long history), so its write fails part way.
  second = {"step": 2, "history": [{"step": i, "loss": 1.0 / (i + 1)} for i in range(3000)]}
  _expect_failure(kind, monkeypatch, workdir, 16 << 10,
                  lambda: metric_writer.write_summary_json(str(workdir), second), path)
  assert fileio.read_text(path) == before and json.loads(before) == first
  assert sorted(os.listdir(workdir)) == ["summary.json"]  # no `summary.json.*.partial`
  assert metric_writer.write_summary_json(str(workdir), second) == path  # the fault is gone
  assert json.loads(fileio.read_text(path)) == second
  survived()


def _records(n, tag):
  return [{"qid": f"{tag}-{i}", "question": f"question {i} " * 10, "prediction": "Paris",
           "answers": ["Paris"], "correct": bool(i % 2), "top_block_ids": np.arange(5) + i}
          for i in range(n)]


@pytest.mark.parametrize("kind", FAULTS)
def test_predictions_write_failure_keeps_the_previous_file(tmp_path, monkeypatch, kind,
                                                           survived):
  pred_dir = tmp_path / "predictions"
  path = pred_dir / "eval-step100.jsonl"
  assert evaluation.write_predictions_jsonl(path, _records(3, "old")) == 3
  before = path.read_bytes()
  _expect_failure(kind, monkeypatch, pred_dir, 16 << 10,
                  lambda: evaluation.write_predictions_jsonl(path, _records(400, "new")), path)
  assert path.read_bytes() == before
  assert [r["qid"] for r in evaluation.read_predictions_jsonl(path)] == ["old-0", "old-1", "old-2"]
  assert sorted(os.listdir(pred_dir)) == ["eval-step100.jsonl"]
  # A new file (another step) that fails leaves nothing under its name either.
  other = pred_dir / "eval-step200.jsonl"
  _expect_failure(kind, monkeypatch, pred_dir, 16 << 10,
                  lambda: evaluation.write_predictions_jsonl(other, _records(400, "new")), other)
  assert sorted(os.listdir(pred_dir)) == ["eval-step100.jsonl"]
  assert evaluation.write_predictions_jsonl(path, _records(400, "new")) == 400
  assert len(evaluation.read_predictions_jsonl(path)) == 400
  survived()


def test_object_store_write_failure_names_the_url_and_keeps_the_old_object(monkeypatch,
                                                                           survived):
  """A failing fsspec file system (a bucket out of quota) for summary.json and the predictions."""
  import fsspec.implementations.memory as memory_fs
  bucket = f"memory://write-failures-{uuid.uuid4().hex[:8]}"
  try:
    path = metric_writer.write_summary_json(f"{bucket}/run", {"step": 1})
    preds = f"{bucket}/run/predictions/eval-step1.jsonl"
    evaluation.write_predictions_jsonl(preds, _records(2, "old"))

    def out_of_quota(self, path, value, *args, **kwargs):
      raise OSError(errno.ENOSPC, "quota exceeded")

    for write, target in ((lambda: metric_writer.write_summary_json(f"{bucket}/run", {"step": 2}),
                           path),
                          (lambda: evaluation.write_predictions_jsonl(preds, _records(5, "new")),
                           preds)):
      COUNTS["injected"] += 1
      with monkeypatch.context() as m:
        m.setattr(memory_fs.MemoryFileSystem, "pipe_file", out_of_quota)
        with pytest.raises(OSError, match=r"quota exceeded; not written") as info:
          write()
      assert target in str(info.value) and info.value.errno == errno.ENOSPC
    assert json.loads(fileio.read_text(path)) == {"step": 1}
    assert [r["qid"] for r in evaluation.read_predictions_jsonl(preds)] == ["old-0", "old-1"]
  finally:
    fileio.rmtree(bucket)
  survived()


# ----------------------------------------------------------------------------------------------------
# (b) embedding snapshots and (e) an overwrite that fails between its two renames
# ----------------------------------------------------------------------------------------------------


def _embeddings(n, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  return np.arange(n, dtype=np.int64) * 3 + seed, rng.normal(size=(n, dim)).astype(np.float32)


@pytest.mark.parametrize("kind", FAULTS)
def test_snapshot_write_failure_keeps_the_previous_snapshot(tmp_path, monkeypatch, kind,
                                                            survived):
  root = tmp_path / "snapshots"
  ids, emb = _embeddings(40)
  good = snap.write_snapshot(root, 100, ids, emb, FP, num_shards=2)
  new_ids, new_emb = _embeddings(2000, seed=1)  # 128 KB of embeddings: past the 32 KiB limit
  error = _expect_failure(kind, monkeypatch, root, 32 << 10,
                          lambda: snap.write_snapshot(root, 200, new_ids, new_emb, FP,
                                                      num_shards=2), root)
  # The error names the file (or, read-only, the staging directory) of the new snapshot.
  assert str(root / ".tmp-200") in str(error)
  assert snap.list_snapshots(root) == [(100, good)]
  s = snap.read_snapshot(good, validate=True)
  np.testing.assert_array_equal(s.embeddings, emb)
  np.testing.assert_array_equal(s.block_ids, ids)
  assert not (root / "200").exists()
  _no_partial_files(root)
  # With the fault gone, the same write resumes the staging directory and commits.
  path = snap.write_snapshot(root, 200, new_ids, new_emb, FP, num_shards=2)
  np.testing.assert_array_equal(snap.read_snapshot(path, validate=True).embeddings, new_emb)
  assert [step for step, _ in snap.list_snapshots(root)] == [100, 200]
  survived()


@pytest.mark.parametrize("kind", FAULTS)
def test_snapshot_overwrite_write_failure_keeps_the_old_snapshot(tmp_path, monkeypatch, kind,
                                                                 survived):
  root = tmp_path / "snapshots"
  ids, emb = _embeddings(40)
  good = snap.write_snapshot(root, 100, ids, emb, FP)
  new_ids, new_emb = _embeddings(2000, seed=1)
  _expect_failure(kind, monkeypatch, root, 32 << 10,
                  lambda: snap.write_snapshot(root, 100, new_ids, new_emb, FP, overwrite=True),
                  root)
  assert snap.list_snapshots(root) == [(100, good)]
  np.testing.assert_array_equal(snap.read_snapshot(good, validate=True).embeddings, emb)
  _no_partial_files(root)
  survived()


def test_snapshot_overwrite_failing_between_the_renames_keeps_the_old_snapshot(
    tmp_path, monkeypatch, survived):
  """Local overwrite = rename the old snapshot aside, rename the new one in: the second fails."""
  root = tmp_path / "snapshots"
  ids, emb = _embeddings(40)
  good = snap.write_snapshot(root, 5, ids, emb, FP)
  real_rename = os.rename
  renames = []

  def failing_rename(src, dst, *args, **kwargs):
    renames.append((os.path.basename(src), os.path.basename(dst)))
    if os.path.basename(src) == ".tmp-5":  # the new snapshot into place
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(dst))
    return real_rename(src, dst, *args, **kwargs)

  COUNTS["injected"] += 1
  with monkeypatch.context() as m:
    m.setattr(os, "rename", failing_rename)
    with pytest.raises(snap.SnapshotError, match=r"snapshots/5: cannot rename .*previous snapshot "
                       r"is kept"):
      snap.write_snapshot(root, 5, ids, emb * 2, FP, overwrite=True)
  # The fault hit between the two renames: the old snapshot had been moved aside.
  assert [dst for _, dst in renames[:1]] and renames[0][1].startswith(".old-5-")
  assert renames[1] == (".tmp-5", "5")
  assert snap.list_snapshots(root) == [(5, good)]
  np.testing.assert_array_equal(snap.read_snapshot(good, validate=True).embeddings, emb)
  assert not list(root.glob(".old-*"))
  # The new shards wait in the staging directory; a retry commits them.
  assert (root / ".tmp-5").is_dir()
  snap.write_snapshot(root, 5, ids, emb * 2, FP, overwrite=True)
  np.testing.assert_array_equal(snap.read_snapshot(good, validate=True).embeddings, emb * 2)
  assert sorted(p.name for p in root.iterdir()) == ["5"]
  survived()


# ----------------------------------------------------------------------------------------------------
# (a) checkpoints (orbax + tensorstore)
# ----------------------------------------------------------------------------------------------------


def _params(value: float):
  """200 KB of incompressible values (tensorstore compresses), `b` = [value] * 3."""
  w = np.random.default_rng(int(value)).normal(size=50_000).astype(np.float32)
  return {"w": jnp.asarray(w), "b": jnp.full((3,), value, jnp.float32)}


def _restore(directory):
  manager = checkpointing.CheckpointManager(directory, async_save=False)
  try:
    step = manager.latest_step()
    params, opt, meta = manager.restore(step, checkpointing.abstract_like(_params(0.0)),
                                        checkpointing.abstract_like({"m": jnp.zeros(2)}))
    return step, params, meta
  finally:
    manager.close()


@pytest.mark.parametrize("kind", ["file_size_limit", "read_only"])
def test_checkpoint_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch, kind,
                                                                survived):
  threads_before = set(threading.enumerate())
  directory = str(tmp_path / "checkpoints")
  manager = checkpointing.CheckpointManager(directory, save_interval_steps=1)
  opt = {"m": jnp.zeros(2)}
  manager.save(1, _params(1.0), opt, {"data": 1})
  manager.wait_until_finished()

  def save_step_2():  # 200 KB of params, past the 64 KiB limit; the error surfaces on the wait.
    manager.save(2, _params(2.0), opt, {"data": 2})
    manager.wait_until_finished()

  error = _expect_failure(kind, monkeypatch, directory, 64 << 10, save_step_2, directory,
                          error=checkpointing.CheckpointWriteError)
  assert "checkpoint of step 2 not written" in str(error)
  assert "the newest complete checkpoint, step 1, is intact" in str(error)
  assert manager.all_steps() == [1]
  assert sorted(os.listdir(directory)) == ["1"]  # the failed step's temporary directory is gone
  step, params, meta = _restore(directory)
  assert step == 1 and meta["data"] == 1
  np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(_params(1.0)["w"]))
  # With the fault gone, the next save works.
  manager.save(3, _params(3.0), opt, {"data": 3})
  manager.close()
  step, params, _ = _restore(directory)
  assert step == 3 and float(params["b"][0]) == 3.0
  _no_partial_files(directory)
  # No save thread is left waiting for the failed step (the process would not exit meanwhile).
  for thread in set(threading.enumerate()) - threads_before:
    thread.join(timeout=10)
    assert not thread.is_alive(), f"{thread.name} still waits after the failed save"
  survived()


# ----------------------------------------------------------------------------------------------------
# A writer SIGKILLed mid-write (no chance to clean up)
# ----------------------------------------------------------------------------------------------------


_KILLED_WRITER = r"""
import sys, time
from realm_jax import fileio
with fileio.atomic_writer(sys.argv[1]) as f:
  f.write(b"half of the new summary")
  f.flush()
  print("writing", flush=True)
  time.sleep(600)
"""


def test_a_killed_writers_partial_file_is_removed_by_the_next_write(tmp_path):
  """SIGKILL between the temporary file and the rename leaves `<name>.<host>-<pid>-….partial`; the
  old content stays under the name, and the next write of that file removes the dead writer's part
  (a live writer's, another host's and unrelated files stay)."""
  import subprocess
  import sys
  target = tmp_path / "summary.json"
  fileio.write_atomic(target, '{"step": 1}')
  proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)],
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    proc.kill()
  leftovers = sorted(p.name for p in tmp_path.glob("summary.json.*.partial"))
  assert len(leftovers) == 1 and f"-{proc.pid}-" in leftovers[0]
  assert target.read_text() == '{"step": 1}'  # The previous good state, untouched.
  host = fileio._host_tag()  # pylint: disable=protected-access
  live = tmp_path / f"summary.json.{host}-{os.getpid()}-000000000000.partial"
  other_host = tmp_path / f"summary.json.another_host-{proc.pid}-000000000000.partial"
  unrelated = tmp_path / "summary.json.notes.partial"
  for keep in (live, other_host, unrelated):
    keep.write_text("x")
  fileio.write_atomic(target, '{"step": 2}')
  assert target.read_text() == '{"step": 2}'
  left = sorted(p.name for p in tmp_path.glob("summary.json.*.partial"))
  assert left == sorted(p.name for p in (live, other_host, unrelated))
  COUNTS["injected"] += 1
  COUNTS["survived"] += 1
