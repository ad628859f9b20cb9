"""The index builder: embeds every block of the knowledge corpus and writes embedding snapshots.

REALM §3.4 ("asynchronous MIPS refreshes"): a separate job re-embeds the corpus Z with the newest
document embedder Embed_doc and publishes a new MIPS index; the trainer keeps going on the old index and
swaps when the new one is ready (`retrieval/watcher.py`). This module is the job, `run`
(`realm-jax index-builder`): it watches `WORKDIR/checkpoints`, restores only the retriever's parameters
of the newest checkpoint, re-embeds the corpus with `retrieval/embedding.py` (the pass the trainers use
for their first index), commits `WORKDIR/snapshots/<step>` atomically, prunes old snapshots, and loops.

The protocol between the trainer and this job (they share nothing but the work directory):

    WORKDIR/checkpoints/<step>/         written by the trainer (orbax; `params` item read here)
    WORKDIR/snapshots/<step>/           written here (committed by a rename locally, by writing its
                                        manifest last on gs://; see retrieval/snapshot.py)
    WORKDIR/snapshots/.tmp-<step>/      a snapshot being written (locally; on gs:// that is a <step>/
                                        without manifest.json); a restarted job resumes its shards
    WORKDIR/trainer_done.json           written by the trainer when it has saved its final checkpoint
                                        (`retrieval/trainer_done.py`): the job embeds it and exits
    WORKDIR/index_builder/status.json   this job's state (phase, newest snapshot, pid), for launchers
    WORKDIR/index_builder/refreshes.jsonl  one JSON line per committed snapshot, with timings

WORKDIR may be a local directory or a URL (`gs://bucket/…`, through fsspec: `realm_jax.fileio`; gs://
needs `pip install 'realm-jax[gcs]'`), as when the trainer and this job run on separate TPU slices.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Any, Sequence

import jax
import numpy as np

from realm_jax import fileio
from realm_jax import sharding
from realm_jax.data import corpus_config
from realm_jax.models import realm
from realm_jax.models import retriever as retriever_lib
from realm_jax.retrieval import embedding
from realm_jax.retrieval import snapshot as snapshot_lib
from realm_jax.retrieval import trainer_done

# ----------------------------------------------------------------------------------------------------
# Checkpoints: which step, and the retriever's parameters only
# ----------------------------------------------------------------------------------------------------


def checkpoint_steps(directory: str) -> list[int]:
  """Finalised orbax checkpoint steps under `directory` (`WORKDIR/checkpoints`, local or `gs://`).

  Checkpoints still being written (orbax's temporary directories) are not listed.

  Returns:
    The steps, sorted; [] when there is none or no directory.
  """
  import orbax.checkpoint as ocp
  from etils import epath
  try:
    if not epath.Path(directory).is_dir():
      return []
    return sorted(ocp.utils.checkpoint_steps(directory))
  except FileNotFoundError:
    return []


def abstract_retriever_params(retriever_cfg: retriever_lib.RetrieverConfig,
                              mesh: jax.sharding.Mesh) -> Any:
  """`jax.ShapeDtypeStruct`s of the retriever's parameters, replicated on `mesh` (nothing computed)."""
  shapes = jax.eval_shape(lambda key: realm.init_retriever(retriever_cfg, key), jax.random.key(0))
  rep = sharding.replicated(mesh)
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                                shapes)


def _newest_mtime(path: fileio.Path) -> float | None:
  """Latest mtime of `path` and its direct children (seconds since the epoch; on object stores every
  object below it), None if it is gone."""
  return fileio.newest_mtime(path)


# ----------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------


def next_params_step(checkpoints: Sequence[int], committed: Sequence[int]) -> int | None:
  """Which parameters to embed next, or None to wait (the refresh policy, REALM §3.4).

  Always the newest checkpoint (intermediate ones are skipped, as in the official refresher), and the
  initial parameters (step 0) when the trainer has written no checkpoint yet and no index exists: the
  trainer needs a first index before its first step. A half-written `.tmp-<step>` of the chosen step
  is resumed by `embed_snapshot`.

  Args:
    checkpoints: finalised checkpoint steps.
    committed: steps of the committed snapshots of this corpus.

  Returns:
    The params step to embed, or None when the newest snapshot is at least as new as every checkpoint.
  """
  newest_snapshot = max(committed) if committed else None
  target = max(checkpoints) if checkpoints else 0
  if newest_snapshot is not None and target <= newest_snapshot:
    return None
  return target


def _initial_retriever_params(model: realm.ModelConfig, seed: int, mesh: jax.sharding.Mesh) -> Any:
  """The trainer's initial retriever params (`realm.init_params` with its seed), replicated on `mesh`.

  Without a pretrained checkpoint the whole random initialisation is jitted (seconds instead of an
  op-by-op init); with one, `init_params` grafts the checkpoint's BERT onto the random heads.
  """
  init = lambda key: realm.init_params(model, key, parts=("retriever",))["retriever"]  # noqa: E731
  if model.checkpoint_dir() is None:
    return jax.jit(init, out_shardings=sharding.replicated(mesh))(jax.random.key(seed))
  return jax.device_put(init(jax.random.key(seed)), sharding.replicated(mesh))


def _after_write_conflict(root: fileio.Path, step: int, error: snapshot_lib.SnapshotError,
                          stale_tmp_age_s: float, poll_interval_s: float) -> None:
  """Handles a snapshot that another writer committed or is writing with other settings.

  This happens when a trainer builds its own first index at the same moment, or when the job is
  restarted with another `blocks_per_shard`. A committed snapshot is simply taken as done; a staging
  directory (`.tmp-<step>`; on object stores `<step>` without manifest) with other settings is deleted
  once idle for `stale_tmp_age_s`, else left to its writer.
  """
  if snapshot_lib.is_committed(fileio.join(root, str(step))):
    logging.info("index builder: snapshot %d was committed by another writer meanwhile (%s)", step,
                 error)
    return
  tmp = snapshot_lib.staging_dir(root, step)
  newest = _newest_mtime(tmp)
  if newest is not None and time.time() - newest > stale_tmp_age_s:
    logging.warning("index builder: deleting %s, idle for more than %.0f s and written with other "
                    "settings (%s)", tmp, stale_tmp_age_s, error)
    fileio.rmtree(tmp)
    return
  logging.warning("index builder: cannot write snapshot %d now (%s); another writer seems active. "
                  "Polling again in %.0f s (delete %s to start it over).", step, error,
                  poll_interval_s, tmp)
  time.sleep(poll_interval_s)


class _StopRequested(Exception):
  """SIGTERM arrived: stop between (or inside) refreshes; shards already written stay for a resume."""


_WAIT, _BUILD, _STOP = 0, 1, 2


def _agree(values: Sequence[int]) -> list[int]:
  """Process 0's `values` on every process (the builder's decisions must agree across hosts)."""
  if jax.process_count() == 1:
    return [int(v) for v in values]
  from jax.experimental import multihost_utils
  out = multihost_utils.broadcast_one_to_all(np.asarray(values, np.int64))
  return [int(v) for v in np.asarray(out)]


class _Journal:
  """`WORKDIR/index_builder/{status.json, refreshes.jsonl}`, written by process 0 only."""

  def __init__(self, workdir: str, enabled: bool):
    self.dir = fileio.join(workdir, "index_builder")
    self.enabled = enabled
    self.status: dict[str, Any] = {"pid": os.getpid(), "started": time.time()}
    if enabled:
      fileio.makedirs(self.dir)

  def set(self, **fields: Any) -> None:
    self.status.update(fields, updated=time.time())
    if not self.enabled:
      return
    fileio.write_atomic(fileio.join(self.dir, "status.json"),
                        json.dumps(self.status, indent=2, sort_keys=True) + "\n")

  def record(self, entry: dict[str, Any]) -> None:
    if not self.enabled:
      return
    fileio.append_text(fileio.join(self.dir, "refreshes.jsonl"),
                       json.dumps(entry, sort_keys=True) + "\n")


def read_refreshes(workdir: str) -> list[dict[str, Any]]:
  """The records of `WORKDIR/index_builder/refreshes.jsonl` (one per committed snapshot), oldest first.

  Each record holds `params_step`, `source` (`init`, `init_from` or `checkpoint`), `path`,
  `written_shards`, `skipped_shards`, `num_blocks`, timings in seconds (`restore_s`, `embed_s`,
  `commit_s`, `total_s`) and Unix times (`checkpoint_mtime`, `committed_at`).
  """
  path = fileio.join(workdir, "index_builder", "refreshes.jsonl")
  try:
    text = fileio.read_text(path)
  except (FileNotFoundError, IsADirectoryError):
    return []
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def run(workdir: str,
        model: realm.ModelConfig = realm.ModelConfig(),
        data: Any = corpus_config.CorpusConfig(),
        poll_interval_s: float = 10.0,
        keep_snapshots: int = 3,
        batch_size: int = 64,
        blocks_per_shard: int = 4096,
        max_refreshes: int | None = None,
        exit_when_trainer_done: bool = True,
        num_train_steps: int | None = None,
        init_from: str = "",
        seed: int = 0,
        idle_timeout_s: float | None = None,
        stale_tmp_age_s: float = 3600.0,
        shard_pause_s: float = 0.0,
        mesh_shape: tuple[int, ...] = (-1, 1),
        serialize_searcher: bool = True,
        searcher_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
  """`realm-jax index-builder`: the asynchronous index refresher of REALM pre-training (§3.4).

  Loop: poll `WORKDIR/checkpoints` every `poll_interval_s`; when its newest checkpoint is newer than the
  newest snapshot, restore that checkpoint's retriever parameters (only them), re-embed every block of
  the corpus on this job's devices (each process of a multi-host job embeds and writes its own shards),
  commit `WORKDIR/snapshots/<step>` atomically, and keep the newest `keep_snapshots` snapshots. With no
  checkpoint and no snapshot yet it builds the FIRST index itself, from the initial parameters (the
  pretrained BERT, or `init_from`, as the trainer does; params step 0), so that the trainer can start.
  A `.tmp-<step>` left by a killed run is resumed: its finished shards are not embedded again.

  Stops when (a) `max_refreshes` snapshots were committed by this call, (b) `exit_when_trainer_done`
  and the trainer's final checkpoint (`WORKDIR/trainer_done.json`, or step ≥ `num_train_steps`) has
  been embedded, (c) nothing was built for `idle_timeout_s`, or (d) on SIGTERM / Ctrl-C (nothing
  partial becomes visible; a restart resumes).

  Args:
    workdir: the trainer's work directory: local (snapshots are committed with `os.rename`) or a URL
      such as `gs://bucket/run` (committed by writing the manifest last; needs gcsfs).
    model: the trainer's model config (its retriever embeds; its checkpoint initialises step 0).
    data: the knowledge corpus: a `CorpusConfig`, or the trainer's data config (`as_corpus_config`).
    poll_interval_s: seconds between looks at `WORKDIR/checkpoints`.
    keep_snapshots: newest committed snapshots kept (the official refresher keeps 3); the newest one
      is never deleted.
    batch_size: blocks per forward pass (a multiple of the local device count is best). On a CPU
      core small batches are fastest (8: `experiments/cpu/*.gin`); on TPU/GPU large ones.
    blocks_per_shard: snapshot shard size in blocks, also the unit of resume after a crash.
    max_refreshes: stop after this many commits (the first index counts); None: no limit.
    exit_when_trainer_done: stop once the trainer's final checkpoint is embedded.
    num_train_steps: the trainer's total steps (bind the same gin macro): a checkpoint at or past it is
      final, even without the done marker.
    init_from: the trainer's `init_from` (a work directory or its `checkpoints/`, e.g. the ICT warm
      start): its newest retriever params embed the first index instead of the initialisation.
    seed: the trainer's seed (the randomly initialised projection of the first index must be its own).
    idle_timeout_s: stop when no snapshot was committed for this long; None: wait forever.
    stale_tmp_age_s: delete other `.tmp-*` directories idle for this long (crashed writers).
    shard_pause_s: sleep after each shard to leave CPU time to a trainer on the same host.
    mesh_shape: this job's local mesh, `(data, model)`; -1 fills.
    serialize_searcher: also build the ScaNN searcher and commit it inside each snapshot (trainers
      and `predict` load it instead of building it at every swap, REALM §3.4).
    searcher_kwargs: its `ScannSearcher` settings; they must be the trainer's for it to be loaded
      (default: the defaults of both).

  Returns:
    A summary: `refreshes` (the records of `read_refreshes` written by this call), `stopped_because`,
    `num_blocks`, `corpus_fingerprint`.

  Raises:
    snapshot.SnapshotError: if `WORKDIR/snapshots` holds snapshots of another corpus.
    ValueError: on a bad argument, or a checkpoint without the model's retriever parameters.
  """
  from realm_jax.training import checkpointing

  if keep_snapshots < 1:
    raise ValueError(f"index_builder.run: keep_snapshots must be >= 1, got {keep_snapshots}")
  if poll_interval_s <= 0:
    raise ValueError(f"index_builder.run: poll_interval_s must be > 0, got {poll_interval_s}")
  if max_refreshes is not None and max_refreshes < 1:
    raise ValueError(f"index_builder.run: max_refreshes must be >= 1 or None, got {max_refreshes}")
  sharding.initialize_distributed()
  is_main = jax.process_index() == 0
  journal = _Journal(workdir, enabled=is_main)
  journal.set(phase="loading_corpus")
  previous_handler = None
  if threading.current_thread() is threading.main_thread():
    def on_sigterm(signum, frame):  # noqa: ARG001
      raise _StopRequested(f"signal {signum}")
    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)

  summary: dict[str, Any] = {"refreshes": [], "stopped_because": None}
  try:
    # The trainer's corpus (same resolution, same fingerprint): streamed, memory-mapped, prepared
    # once; a race with the trainer preparing it at the same moment is retried.
    _, corpus = corpus_config.load_corpus(data, model.checkpoint_dir(), workdir,
                                          show_progress=is_main,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count())
    summary.update(num_blocks=len(corpus), corpus_fingerprint=corpus.fingerprint)
    mesh = sharding.make_mesh(mesh_shape, devices=jax.local_devices())
    retriever_cfg = model.retriever_config()
    abstract = abstract_retriever_params(retriever_cfg, mesh)
    embed_fn = embedding.make_document_embed_fn(retriever_cfg, mesh)  # Compiled once per bucket length.
    ckpt_dir = checkpointing.checkpoint_dir(workdir)
    snapshots_root = fileio.join(workdir, "snapshots")
    logging.info("index builder: %d blocks (corpus %s), %d local device(s) x %d process(es); "
                 "watching %s every %.1f s", len(corpus), corpus.fingerprint[:12],
                 jax.local_device_count(), jax.process_count(), ckpt_dir, poll_interval_s)
    journal.set(phase="waiting", corpus_fingerprint=corpus.fingerprint, num_blocks=len(corpus))

    def committed_steps() -> list[int]:
      steps = []
      for step, path in snapshot_lib.list_snapshots(snapshots_root):
        fingerprint = snapshot_lib.read_manifest(path)["corpus_fingerprint"]
        if fingerprint != corpus.fingerprint:
          raise snapshot_lib.SnapshotError(
              f"{path}: snapshot of another corpus ({fingerprint[:12]}, this job's is "
              f"{corpus.fingerprint[:12]}); use a new work directory or the trainer's corpus")
        steps.append(step)
      return steps

    last_commit = time.time()
    first_poll = True
    while True:
      decision = [_WAIT, 0, 0]
      if is_main:
        ckpts = checkpoint_steps(ckpt_dir)
        committed = committed_steps()
        newest = max(committed) if committed else None
        final_step = trainer_done.trainer_final_step(workdir) if exit_when_trainer_done else None
        if exit_when_trainer_done and num_train_steps is not None and any(
            s >= num_train_steps for s in ckpts):
          final_step = max(s for s in ckpts if s >= num_train_steps)
        target = next_params_step(ckpts, committed)
        if max_refreshes is not None and len(summary["refreshes"]) >= max_refreshes:
          decision = [_STOP, 0, 0]
          summary["stopped_because"] = f"max_refreshes={max_refreshes} reached"
        elif (final_step is not None and newest is not None and newest >= final_step
              and target is None):
          decision = [_STOP, 0, 0]
          summary["stopped_because"] = f"the trainer is done (final step {final_step} embedded)"
        elif target is not None:
          decision = [_BUILD, target, len(ckpts)]
        elif idle_timeout_s is not None and time.time() - last_commit > idle_timeout_s:
          decision = [_STOP, 0, 0]
          summary["stopped_because"] = f"no new checkpoint for {idle_timeout_s:.0f} s"
        elif first_poll:
          logging.info("index builder: snapshot %s is current; waiting for a newer checkpoint",
                       newest)
      first_poll = False
      action, step, have_ckpt = _agree(decision)
      if action == _STOP:
        logging.info("index builder: stopping, %s", summary["stopped_because"])
        break
      if action == _WAIT:
        time.sleep(poll_interval_s)
        continue

      t_start = time.perf_counter()
      if have_ckpt:
        source = "checkpoint"
        journal.set(phase="restoring", params_step=step)
        try:
          params = checkpointing.restore_partial_params(ckpt_dir, {"retriever": abstract},
                                                        step)[0]["retriever"]
        except FileNotFoundError as e:
          logging.warning("index builder: %s; polling again", e)
          time.sleep(poll_interval_s)
          continue
      elif init_from:
        source = "init_from"
        params = checkpointing.restore_partial_params(init_from,
                                                      {"retriever": abstract})[0]["retriever"]
      else:
        source = "init"
        params = _initial_retriever_params(model, seed, mesh)
      restore_s = time.perf_counter() - t_start
      checkpoint_mtime = (_newest_mtime(fileio.join(ckpt_dir, str(step)))
                          if source == "checkpoint" else None)
      logging.info("index builder: embedding %d blocks with the %s params of step %d", len(corpus),
                   source, step)
      journal.set(phase="embedding", params_step=step)
      try:
        result = embedding.embed_snapshot(
            snapshots_root, corpus, retriever_cfg, params, step, mesh=mesh, batch_size=batch_size,
            blocks_per_shard=blocks_per_shard, shard_pause_s=shard_pause_s, embed_fn=embed_fn,
            metadata={"source": source, "checkpoint_mtime": checkpoint_mtime,
                      "init_checkpoint": model.init_checkpoint},
            searcher=dict(searcher_kwargs or {}) if serialize_searcher else None)
      except snapshot_lib.SnapshotError as e:
        _after_write_conflict(snapshots_root, step, e, stale_tmp_age_s, poll_interval_s)
        continue
      finally:
        del params
      last_commit = time.time()
      entry = {"params_step": step, "source": source,
               "path": str(result.path) if result.path else None,
               "num_blocks": result.num_blocks, "num_shards": result.num_shards,
               "written_shards": list(result.written_shards),
               "skipped_shards": list(result.skipped_shards), "restore_s": restore_s,
               "embed_s": result.embed_s, "commit_s": result.commit_s,
               "searcher_s": result.searcher_s,
               "total_s": time.perf_counter() - t_start, "checkpoint_mtime": checkpoint_mtime,
               "committed_at": last_commit}
      summary["refreshes"].append(entry)
      if is_main:
        journal.record(entry)
        removed = snapshot_lib.prune_snapshots(snapshots_root, keep=keep_snapshots, protect=(step,),
                                               stale_tmp_age_s=stale_tmp_age_s)
        for tmp_step, tmp in snapshot_lib.staging_dirs(snapshots_root):
          if tmp_step < step:  # Can never be committed any more.
            fileio.rmtree(tmp)
            removed.append(tmp)
        journal.set(phase="waiting", last_snapshot_step=step, refreshes=len(summary["refreshes"]))
        logging.info("index builder: snapshot %d live in %.1f s (restore %.1f s, embed %.1f s, "
                     "commit %.1f s; %d shard(s) resumed); pruned %d", step, entry["total_s"],
                     restore_s, result.embed_s, result.commit_s, len(result.skipped_shards),
                     len(removed))
  except (_StopRequested, KeyboardInterrupt) as e:
    summary["stopped_because"] = f"interrupted ({str(e) or 'Ctrl-C'})"
    logging.warning("index builder: %s; written shards stay in .tmp-<step> and resume on restart",
                    summary["stopped_because"])
  finally:
    journal.set(phase="stopped", stopped_because=summary["stopped_because"])
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
  return summary
