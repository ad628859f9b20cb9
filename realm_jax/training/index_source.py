"""Where the pre-training loop gets its MIPS index from, step by step (REALM §3.4, async refresh).

REALM retrieves the candidates of every pre-training example with MIPS over document embeddings
that were computed with an OLDER document embedder; the trainer swaps in a fresher index from time
to time (about every 500 steps in the paper). The train loop talks to its index through one method:

    index = index_source.before_step(step)      # called once per step, before retrieval
    index.searcher.search(query_embeddings, k)  # [batch, dim] -> ([batch, k] scores, ids)
    index.snapshot.params_step                  # the train step whose params embedded the corpus

so the refresh policy is pluggable:
  * `StaticIndexSource`        — one snapshot for the whole run (no refresh);
  * `InlineRefreshIndexSource` — the trainer itself re-embeds the corpus every `refresh_every_steps`
    steps (synchronous: training pauses while it embeds; simple, and exact about staleness);
  * `realm_jax.retrieval.watcher.IndexWatcher` (written separately) — polls `WORKDIR/snapshots`
    for snapshots committed by the separate index-builder job, builds their searcher off-thread and
    swaps it in, blocking when the index falls more than `max_index_staleness_steps` behind (the
    paper's asynchronous refresh; Megatron's 500-step bound).
All three return an object with `.searcher` and `.snapshot` (`Index` below) and have
`metrics(step)` (`index/…` scalars for the logs) and `close()`.

`ensure_first_snapshot` builds the very first index when the work directory has none yet (a gap
users of the official code hit: its refresher fails before the first export).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Protocol

import jax

from realm_jax import fileio
from realm_jax.models import retriever as retriever_lib
from realm_jax.retrieval import searchers as searchers_lib
from realm_jax.retrieval import snapshot as snapshot_lib
from realm_jax.retrieval import embedding

SEARCHER_KINDS = ("scann", "exact")

MakeSearcher = Callable[[snapshot_lib.Snapshot], searchers_lib.Searcher]


class Index(Protocol):
  """What the train loop reads from an index source each step."""

  searcher: searchers_lib.Searcher
  snapshot: snapshot_lib.Snapshot


class IndexSource(Protocol):
  """A policy that hands the train loop its current index (see the module docstring)."""

  def before_step(self, step: int) -> Index:
    """The index to retrieve with at train step `step` (may refresh, swap or block first)."""
    ...

  def metrics(self, step: int) -> dict[str, float]:
    """Scalars for the trainer's logs, namespaced `index/…` (`index/staleness_steps`, …)."""
    ...

  def close(self) -> None:
    """Releases threads / files; the source is unusable afterwards."""
    ...


@dataclasses.dataclass(frozen=True)
class LoadedIndex:
  """One snapshot and the searcher built over it (immutable; swapped as a whole).

  Attributes:
    snapshot: the embeddings, block ids and `params_step` (`retrieval.snapshot.Snapshot`).
    searcher: MIPS over `snapshot` (`search(q [batch, dim], k) -> (scores, block_ids)`).
  """

  snapshot: snapshot_lib.Snapshot
  searcher: searchers_lib.Searcher


def make_searcher_factory(kind: str, mesh: jax.sharding.Mesh | None = None,
                          **searcher_kwargs: Any) -> MakeSearcher:
  """A function snapshot -> searcher for `kind` ('scann' on the host, 'exact' sharded on `mesh`).

  For 'scann' the searcher serialized in the snapshot by the index builder is loaded when it was
  made with the same settings (`searchers.searcher_from_snapshot`); else it is built.

  Raises:
    ValueError: on an unknown kind.
  """
  if kind not in SEARCHER_KINDS:
    raise ValueError(f"searcher must be one of {SEARCHER_KINDS}, got {kind!r}")
  if searchers_lib.resolve_kind(kind) != kind:  # No ScaNN: exact on `mesh`, ScaNN settings unused.
    kind, searcher_kwargs = "exact", {}

  def make(snapshot: snapshot_lib.Snapshot) -> searchers_lib.Searcher:
    return searchers_lib.searcher_from_snapshot(
        snapshot, kind=kind, mesh=mesh if kind == "exact" else None, **searcher_kwargs)

  return make


def load_index(path: str | os.PathLike, make_searcher: MakeSearcher,
               expected_fingerprint: str | None = None) -> LoadedIndex:
  """Reads (and validates) a committed snapshot and makes its searcher (REALM §3.4).

  The snapshot is opened lazily (`read_snapshot(lazy=True)`: validated by streaming, rows read from
  the shard files when a searcher needs them), and `make_searcher` (`make_searcher_factory`) loads the
  ScaNN searcher serialized in the snapshot when it matches, building one otherwise.

  Raises:
    snapshot.SnapshotError: if the snapshot is malformed or embeds another corpus.
  """
  snapshot = snapshot_lib.read_snapshot(path, lazy=True)
  if expected_fingerprint is not None and snapshot.corpus_fingerprint != expected_fingerprint:
    raise snapshot_lib.SnapshotError(
        f"{path}: field 'corpus_fingerprint' is {snapshot.corpus_fingerprint[:12]}… but the "
        f"corpus being trained on is {expected_fingerprint[:12]}…; use a new work directory")
  return LoadedIndex(snapshot=snapshot, searcher=make_searcher(snapshot))


def ensure_first_snapshot(snapshots_root: str | os.PathLike, corpus,
                          retriever_cfg: retriever_lib.RetrieverConfig, retriever_params: Any,
                          params_step: int, batch_size: int = 64,
                          mesh: jax.sharding.Mesh | None = None) -> fileio.Path:
  """The newest committed snapshot of `corpus` no newer than `params_step`; builds one if none.

  A resumed trainer (`params_step` = its checkpoint's step) never starts on a snapshot embedded by
  params it no longer has (a refresh committed after its last checkpoint, before a preemption):
  it starts where the uninterrupted run was, and re-embeds the newer step when it gets there.

  Args:
    snapshots_root: `WORKDIR/snapshots` (local path or URL, e.g. `gs://bucket/work/snapshots`).
    corpus: the knowledge corpus (`data.corpus_store.Corpus`).
    retriever_cfg / retriever_params: the document embedder used when a snapshot must be built.
    params_step: the train step of `retriever_params` (the new snapshot's name), and the newest
      snapshot step accepted.
    batch_size: blocks per embedding forward pass.
    mesh: devices to embed on (default: this process's devices).

  Returns:
    The snapshot directory (on every process; a URL string on object stores).

  Raises:
    snapshot.SnapshotError: if the newest snapshot was built for another corpus.
  """
  root = fileio.as_path(snapshots_root)
  committed = snapshot_lib.list_snapshots(root)
  usable = [p for step, p in committed if step <= params_step]
  path = usable[-1] if usable else None
  for checked in {path, committed[-1][1] if committed else None} - {None}:
    found = snapshot_lib.read_manifest(checked)["corpus_fingerprint"]
    if found != corpus.fingerprint:
      raise snapshot_lib.SnapshotError(
          f"{checked}: field 'corpus_fingerprint' is {found[:12]}… but the corpus is "
          f"{corpus.fingerprint[:12]}…; the snapshot was built for another corpus (new workdir?)")
  if path is not None:
    return path
  logging.info("no snapshot under %s: embedding %d blocks with the step-%d document embedder",
               root, len(corpus), params_step)
  embedding.build_snapshot(root, corpus, retriever_cfg, retriever_params,
                               params_step=params_step, mesh=mesh, batch_size=batch_size)
  _sync(f"first-snapshot-{params_step}")
  return fileio.join(root, str(params_step))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class StaticIndexSource:
  """One snapshot for the whole run (REALM's stale-index ablation, or a frozen index).

  Args:
    snapshot_path: a committed snapshot directory.
    make_searcher: snapshot -> searcher (`make_searcher_factory`).
    expected_fingerprint: the corpus fingerprint the snapshot must carry (None: not checked).
  """

  def __init__(self, snapshot_path: str | os.PathLike, make_searcher: MakeSearcher,
               expected_fingerprint: str | None = None):
    self.index = load_index(snapshot_path, make_searcher, expected_fingerprint)

  def before_step(self, step: int) -> LoadedIndex:
    """Always the same index."""
    del step
    return self.index

  def metrics(self, step: int) -> dict[str, float]:
    """`index/staleness_steps` and `index/params_step` for the logs (as the async watcher)."""
    return {"index/staleness_steps": float(step - self.index.snapshot.params_step),
            "index/params_step": float(self.index.snapshot.params_step)}

  def close(self) -> None:
    """Nothing to release: no thread, no open file (part of the `IndexSource` interface)."""


class InlineRefreshIndexSource:
  """Synchronous refresh: every `refresh_every_steps` steps the trainer re-embeds the corpus itself.

  At step `s` with `s − index.snapshot.params_step ≥ refresh_every_steps`, `before_step` embeds
  every block with the CURRENT document embedder (`params_fn()`), commits snapshot `<root>/<s>`,
  builds its searcher and prunes all but the newest `keep` snapshots. The staleness therefore stays
  below `refresh_every_steps`. Training waits while the corpus is embedded; the asynchronous version
  (`retrieval.watcher.IndexWatcher` + the index-builder job) hides that time (REALM §3.4).

  Args:
    snapshots_root: `WORKDIR/snapshots`.
    corpus: the knowledge corpus (`data.corpus_store.Corpus`).
    retriever_cfg: the retriever configuration (document tower).
    params_fn: returns the current retriever params (a pytree; host numpy or device arrays).
    make_searcher: snapshot -> searcher.
    refresh_every_steps: steps between refreshes (> 0; ~500 in the paper).
    initial_path: the snapshot to start from (default: the newest under `snapshots_root`).
    batch_size: blocks per embedding forward pass.
    mesh: devices to embed on (default: this process's devices).
    keep: snapshots kept on disk (the official refresher keeps 3).

  Raises:
    ValueError: if `refresh_every_steps <= 0`.
    FileNotFoundError: if there is no snapshot to start from.
  """

  def __init__(self, snapshots_root: str | os.PathLike, corpus,
               retriever_cfg: retriever_lib.RetrieverConfig, params_fn: Callable[[], Any],
               make_searcher: MakeSearcher, refresh_every_steps: int,
               initial_path: str | os.PathLike | None = None, batch_size: int = 64,
               mesh: jax.sharding.Mesh | None = None, keep: int = 3):
    if refresh_every_steps <= 0:
      raise ValueError(f"refresh_every_steps must be positive, got {refresh_every_steps}")
    self.root = fileio.as_path(snapshots_root)
    self.corpus = corpus
    self.retriever_cfg = retriever_cfg
    self.params_fn = params_fn
    self.make_searcher = make_searcher
    self.refresh_every_steps = refresh_every_steps
    self.batch_size = batch_size
    self.mesh = mesh
    self.keep = keep
    path = initial_path or snapshot_lib.latest_snapshot(self.root)
    if path is None:
      raise FileNotFoundError(f"{self.root}: no committed snapshot to start from "
                              "(call ensure_first_snapshot first)")
    self.index = load_index(path, make_searcher, corpus.fingerprint)
    self.num_refreshes = 0
    self.refresh_seconds = 0.0

  def before_step(self, step: int) -> LoadedIndex:
    """Re-embeds the corpus first when the index is `refresh_every_steps` or more steps old."""
    if step - self.index.snapshot.params_step >= self.refresh_every_steps:
      self.refresh(step)
    return self.index

  def refresh(self, step: int) -> LoadedIndex:
    """Embeds the corpus with the current params, commits snapshot `step` and swaps it in."""
    start = time.perf_counter()
    embedding.build_snapshot(self.root, self.corpus, self.retriever_cfg, self.params_fn(),
                                 params_step=step, mesh=self.mesh, batch_size=self.batch_size,
                                 overwrite=True)
    _sync(f"inline-refresh-{step}")
    self.index = load_index(fileio.join(self.root, str(step)), self.make_searcher,
                            self.corpus.fingerprint)
    if jax.process_index() == 0:
      snapshot_lib.prune_snapshots(self.root, keep=self.keep, protect=(step,))
    self.num_refreshes += 1
    seconds = time.perf_counter() - start
    self.refresh_seconds += seconds
    logging.info("inline index refresh at step %d: %d blocks in %.1f s", step, len(self.corpus),
                 seconds)
    return self.index

  def metrics(self, step: int) -> dict[str, float]:
    """`index/…` scalars for the logs: staleness, params step, refreshes and their total seconds."""
    return {"index/staleness_steps": float(step - self.index.snapshot.params_step),
            "index/params_step": float(self.index.snapshot.params_step),
            "index/refreshes": float(self.num_refreshes),
            "index/refresh_s": float(self.refresh_seconds)}

  def close(self) -> None:
    """Nothing to release: no thread, no open file (part of the `IndexSource` interface)."""
