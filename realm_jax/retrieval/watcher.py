"""Trainer side of the asynchronous index refresh: find a newer snapshot, load it off-thread, swap it in.

REALM §3.4: "the trainer keeps training on the old index and swaps when the new one is ready"; the
index builder (`realm-jax index-builder`, `index_builder.run`) is a separate job that writes
`WORKDIR/snapshots/<step>`. `IndexWatcher` is what the pre-training loop holds instead of a fixed index:

    watcher = IndexWatcher(workdir + "/snapshots", corpus.fingerprint,
                           make_searcher=lambda s: searchers.searcher_from_snapshot(s, "scann"),
                           poll_interval_s=10, max_index_staleness_steps=500)
    for step in range(start, num_steps):
      index = watcher.before_step(step)          # O(1) unless the index is too stale
      scores, block_ids = index.searcher.search(query_embeddings, k)
      ...
      metrics.update(watcher.metrics(step))      # index/staleness_steps, index/swaps, …
    watcher.close()

A background thread polls the snapshots directory, loads the newest committed snapshot of the same
corpus (`read_snapshot(validate=True, lazy=True)`: checksums, shapes, finiteness, streamed; rows stay in
the shard files until a searcher reads them), makes its searcher — `searchers.searcher_from_snapshot`
LOADS the ScaNN searcher the index builder serialized into the snapshot when it matches, and builds one
otherwise — and leaves it as *pending*. `before_step` swaps a pending index in (a reference assignment under a lock) and so never
waits for I/O or a searcher build — except when the live index is more than `max_index_staleness_steps`
behind the step (Megatron's bound on REALM's asynchrony; 500 steps, REFERENCE.md), or when there is no
index at all yet: then it blocks, logging while it waits, until a fresh-enough snapshot is live, or
raises `IndexStalenessError` after `wait_timeout_s`.

A snapshot that fails to load or validate is skipped with a warning and remembered (by path and commit
time), so it is never retried unless it is committed again; the current index stays live.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any, Callable

from realm_jax import fileio
from realm_jax.retrieval import snapshot as snapshot_lib

PathLike = str | os.PathLike
MakeSearcher = Callable[[snapshot_lib.Snapshot], Any]

DEFAULT_MAX_INDEX_STALENESS_STEPS = 500


class IndexStalenessError(TimeoutError):
  """`before_step` waited `wait_timeout_s` for a fresh-enough index and none arrived."""


@dataclasses.dataclass(frozen=True)
class LiveIndex:
  """One loaded snapshot and its searcher: what the train step retrieves from (REALM §3.4).

  Attributes:
    snapshot: the loaded snapshot (`params_step`, `block_ids [num_blocks]` int64, `embeddings
      [num_blocks, dim]`, `corpus_fingerprint`, `path`).
    searcher: the searcher built over it (`search(queries [batch, dim], k) -> (scores, block_ids)`).
    loaded_at: Unix time (s) when the snapshot was loaded and its searcher built (ready to swap in).
    load_s: seconds spent reading and validating the snapshot.
    build_s: seconds spent building the searcher.
    swapped_in_at: Unix time (s) when `before_step` made it live; None while pending.
    swapped_in_step: the step whose `before_step` made it live; None while pending.
  """

  snapshot: snapshot_lib.Snapshot
  searcher: Any
  loaded_at: float
  load_s: float
  build_s: float
  swapped_in_at: float | None = None
  swapped_in_step: int | None = None

  @property
  def params_step(self) -> int:
    """The train step of the document-embedder parameters that produced the index."""
    return self.snapshot.params_step

  @property
  def path(self) -> fileio.Path:
    """The snapshot directory (`pathlib.Path`; a URL string on object stores)."""
    return self.snapshot.path


class IndexWatcher:
  """Keeps the trainer's MIPS index fresh from snapshots written by a separate index builder (§3.4).

  Thread-safe: a daemon thread loads snapshots; `before_step`, `live`, `metrics` may be called from the
  training thread at any time. Use it as a context manager or call `close()`.

  Args:
    snapshots_root: `WORKDIR/snapshots` (a local path, or a URL such as `gs://bucket/work/snapshots`
      that the index builder on another slice writes to; see `retrieval/snapshot.py`).
    corpus_fingerprint: the trainer's corpus fingerprint; snapshots of other corpora are rejected.
    make_searcher: `snapshot -> searcher`, run in the background thread (e.g.
      `lambda s: searchers.searcher_from_snapshot(s, kind="scann")`; ScaNN search is thread-safe).
    poll_interval_s: seconds between looks at `snapshots_root` (the thread also looks at once when
      `before_step` starts to wait).
    max_index_staleness_steps: `before_step(step)` blocks while `step - live.params_step` exceeds this
      (500: Megatron's bound); None never blocks on staleness (only for the first index).
    wait_timeout_s: raise `IndexStalenessError` after blocking this long; None waits forever.
    log_every_s: while blocked, log this often.
    start: start the background thread now (else call `start()`).

  Raises:
    ValueError: on a negative staleness bound or a non-positive interval.
  """

  def __init__(self,
               snapshots_root: PathLike,
               corpus_fingerprint: str,
               make_searcher: MakeSearcher,
               poll_interval_s: float = 10.0,
               max_index_staleness_steps: int | None = DEFAULT_MAX_INDEX_STALENESS_STEPS,
               wait_timeout_s: float | None = None,
               log_every_s: float = 30.0,
               start: bool = True):
    if poll_interval_s <= 0:
      raise ValueError(f"IndexWatcher: poll_interval_s must be > 0, got {poll_interval_s}")
    if max_index_staleness_steps is not None and max_index_staleness_steps < 0:
      raise ValueError(f"IndexWatcher: max_index_staleness_steps must be >= 0 or None, got "
                       f"{max_index_staleness_steps}")
    self.snapshots_root = fileio.as_path(snapshots_root)
    self.corpus_fingerprint = corpus_fingerprint
    self.make_searcher = make_searcher
    self.poll_interval_s = float(poll_interval_s)
    self.max_index_staleness_steps = max_index_staleness_steps
    self.wait_timeout_s = wait_timeout_s
    self.log_every_s = float(log_every_s)
    self._cond = threading.Condition()
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._live: LiveIndex | None = None
    self._pending: LiveIndex | None = None
    self._rejected: dict[tuple[str, Any], str] = {}
    self._swaps = 0
    self._loads = 0
    self._wait_s = 0.0
    self._last_swap_latency_s = 0.0
    self._poll_errors = 0
    self._thread: threading.Thread | None = None
    if start:
      self.start()

  # -- lifecycle -------------------------------------------------------------------------------------

  def start(self) -> None:
    """Starts the background polling thread (idempotent)."""
    if self._thread is not None:
      return
    self._thread = threading.Thread(target=self._loop, name="index-watcher", daemon=True)
    self._thread.start()

  def close(self, timeout_s: float = 30.0) -> None:
    """Stops the thread (waits up to `timeout_s` for a load in progress; the thread is a daemon)."""
    self._stop.set()
    self._wake.set()
    with self._cond:
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join(timeout_s)
      if self._thread.is_alive():
        logging.warning("IndexWatcher: background load still running after %.0f s; left as a daemon",
                        timeout_s)

  def __enter__(self) -> IndexWatcher:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  # -- state -----------------------------------------------------------------------------------------

  @property
  def live(self) -> LiveIndex | None:
    """The index the trainer currently searches (None before the first `before_step` swap)."""
    return self._live

  @property
  def pending(self) -> LiveIndex | None:
    """A loaded index waiting for the next `before_step`, or None."""
    return self._pending

  @property
  def swap_count(self) -> int:
    """How many times `before_step` swapped a new index in (the first index counts)."""
    return self._swaps

  @property
  def num_refreshes(self) -> int:
    """Swaps after the first index (what `pretrain.train` reports as `num_refreshes`)."""
    return max(0, self._swaps - 1)

  @property
  def rejected(self) -> dict[str, str]:
    """Snapshot paths skipped for good (failed validation, other corpus) → the reason."""
    with self._cond:
      return {path: reason for (path, _), reason in self._rejected.items()}

  @property
  def total_wait_s(self) -> float:
    """Seconds `before_step` has spent blocked (first index + staleness bound)."""
    return self._wait_s

  def staleness(self, step: int) -> int | None:
    """`step - live.params_step`: how many steps the index lags the trainer (None: no index yet)."""
    live = self._live
    return None if live is None else int(step) - live.params_step

  def metrics(self, step: int) -> dict[str, float]:
    """Scalars for the trainer's logs, namespaced `index/…` (empty before the first index).

    `index/staleness_steps` (step − params step of the live index), `index/params_step`,
    `index/age_s` (seconds since the live index was loaded), `index/swaps`, `index/wait_s` (total
    seconds `before_step` blocked), `index/swap_latency_ms` (the last swap inside `before_step`),
    `index/rejected_snapshots`.
    """
    live = self._live
    if live is None:
      return {}
    return {
        "index/staleness_steps": float(int(step) - live.params_step),
        "index/params_step": float(live.params_step),
        "index/age_s": float(time.time() - live.loaded_at),
        "index/swaps": float(self._swaps),
        "index/wait_s": float(self._wait_s),
        "index/swap_latency_ms": 1e3 * self._last_swap_latency_s,
        "index/rejected_snapshots": float(len(self._rejected)),
    }

  # -- the training thread ---------------------------------------------------------------------------

  def before_step(self, step: int) -> LiveIndex:
    """The index to use for `step`: swaps a pending index in; blocks only when it must.

    Blocks (a) until the first index is loaded, and (b) while `step - live.params_step >
    max_index_staleness_steps`, until a snapshot at params step ≥ `step - max_index_staleness_steps`
    is live; both log every `log_every_s`.

    Args:
      step: the train step about to run.

    Returns:
      The live `LiveIndex` (`.searcher`, `.snapshot`, `.params_step`).

    Raises:
      IndexStalenessError: if it blocked for `wait_timeout_s` without a fresh-enough index.
      RuntimeError: if the watcher was closed.
    """
    step = int(step)
    bound = self.max_index_staleness_steps
    need = None if bound is None else step - bound
    with self._cond:
      self._swap_locked(step)
      if self._fresh_enough(need):
        return self._live
      return self._wait_locked(step, need)

  def _fresh_enough(self, need: int | None) -> bool:
    return self._live is not None and (need is None or self._live.params_step >= need)

  def _swap_locked(self, step: int) -> None:
    """Makes the pending index live (caller holds the lock): a reference swap, no I/O."""
    if self._pending is None:
      return
    t0 = time.perf_counter()
    previous = self._live
    self._live = dataclasses.replace(self._pending, swapped_in_at=time.time(),
                                     swapped_in_step=step)
    self._pending = None
    self._swaps += 1
    self._last_swap_latency_s = time.perf_counter() - t0
    logging.info("IndexWatcher: step %d now searches snapshot %d (%s; was %s; staleness %d steps)",
                 step, self._live.params_step, self._live.path,
                 "none" if previous is None else previous.params_step,
                 step - self._live.params_step)

  def _wait_locked(self, step: int, need: int | None) -> LiveIndex:
    """Blocks (lock held, released while waiting) until the live index is fresh enough."""
    start = time.monotonic()
    last_log = start
    self._wake.set()  # Look at the directory now rather than at the next poll.
    if self._live is None:
      what = f"the first index under {self.snapshots_root}"
    else:
      what = (f"a snapshot at params step >= {need} (live index: step {self._live.params_step}, "
              f"{step - self._live.params_step} steps behind; bound {self.max_index_staleness_steps})")
    logging.info("IndexWatcher: step %d waits for %s", step, what)
    try:
      while True:
        if self._stop.is_set():
          raise RuntimeError("IndexWatcher: closed while before_step was waiting")
        now = time.monotonic()
        waited = now - start
        if self.wait_timeout_s is not None and waited >= self.wait_timeout_s:
          raise IndexStalenessError(
              f"step {step}: waited {waited:.0f} s for {what}, none arrived; is the index builder "
              f"running (realm-jax index-builder with this work directory)? See "
              f"{fileio.join(fileio.dirname(self.snapshots_root), 'index_builder', 'status.json')}")
        if now - last_log >= self.log_every_s:
          logging.info("IndexWatcher: step %d still waiting (%.0f s) for %s", step, waited, what)
          last_log = now
        timeout = min(self.log_every_s, 1.0 if self.wait_timeout_s is None else
                      max(0.0, self.wait_timeout_s - waited))
        self._cond.wait(timeout=max(timeout, 1e-3))
        self._swap_locked(step)
        if self._fresh_enough(need):
          logging.info("IndexWatcher: step %d resumes after %.1f s with snapshot %d", step,
                       time.monotonic() - start, self._live.params_step)
          return self._live
    finally:
      self._wait_s += time.monotonic() - start

  # -- the background thread -------------------------------------------------------------------------

  def poll_now(self) -> None:
    """Asks the background thread to look at the snapshots directory now."""
    self._wake.set()

  def _loop(self) -> None:
    while not self._stop.is_set():
      try:
        self._poll_once()
      except Exception:  # noqa: BLE001 - a poll must never kill the thread (e.g. a flaky mount).
        self._poll_errors += 1
        logging.exception("IndexWatcher: polling %s failed; trying again in %.1f s",
                          self.snapshots_root, self.poll_interval_s)
      self._wake.wait(self.poll_interval_s)
      self._wake.clear()

  def _newest_known_step(self) -> int:
    with self._cond:
      steps = [x.params_step for x in (self._live, self._pending) if x is not None]
    return max(steps) if steps else -1

  def _reject(self, key: tuple[str, Any], reason: str) -> None:
    with self._cond:
      self._rejected[key] = reason
    live = self._live
    logging.warning("IndexWatcher: skipping snapshot %s for good: %s; keeping the current index (%s)",
                    key[0], reason, "none yet" if live is None else f"step {live.params_step}")

  def _poll_once(self) -> None:
    """Loads the newest acceptable snapshot newer than the live / pending one, if any."""
    newest_known = self._newest_known_step()
    for step, path in reversed(snapshot_lib.list_snapshots(self.snapshots_root)):
      if self._stop.is_set() or step <= newest_known:
        return
      try:
        manifest = snapshot_lib.read_manifest(path)
      except snapshot_lib.SnapshotError:
        continue  # Pruned or replaced since it was listed.
      key = (str(path), manifest.get("created_unix", manifest.get("created")))
      if key in self._rejected:
        continue
      if manifest["corpus_fingerprint"] != self.corpus_fingerprint:
        self._reject(key, f"built for corpus {manifest['corpus_fingerprint'][:12]}, the trainer's is "
                          f"{self.corpus_fingerprint[:12]}")
        continue
      t0 = time.perf_counter()
      try:
        snapshot = snapshot_lib.read_snapshot(path, validate=True, lazy=True)
        t1 = time.perf_counter()
        searcher = self.make_searcher(snapshot)
      except Exception as e:  # noqa: BLE001 - any bad snapshot must leave the trainer running.
        if not fileio.exists(fileio.join(path, snapshot_lib.MANIFEST_NAME)):
          logging.info("IndexWatcher: snapshot %s disappeared while loading (pruned)", path)
          continue
        self._reject(key, f"{type(e).__name__}: {e}")
        continue
      t2 = time.perf_counter()
      index = LiveIndex(snapshot=snapshot, searcher=searcher, loaded_at=time.time(), load_s=t1 - t0,
                        build_s=t2 - t1)
      with self._cond:
        if self._stop.is_set():
          return
        current = max([x.params_step for x in (self._live, self._pending) if x is not None],
                      default=-1)
        if index.params_step > current:
          self._pending = index
          self._loads += 1
          self._cond.notify_all()
      logging.info("IndexWatcher: snapshot %d ready (%d blocks; load+validate %.2f s, searcher "
                   "%.2f s); swapped in at the next step", step, snapshot.num_blocks, t1 - t0, t2 - t1)
      return
