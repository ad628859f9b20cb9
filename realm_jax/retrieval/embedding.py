"""Embedding the knowledge corpus with the document tower: the pass behind every embedding snapshot.

REALM §3.4: the MIPS index holds Embed_doc(z) for every block z of the corpus Z. The trainer embeds a
first index itself, and the index-builder job (`realm_jax/index_builder.py`) re-embeds the corpus from
each new checkpoint (asynchronous refresh); both call this module, so both produce the same rows.

The pass is a `jax.jit`-ed forward of the document tower over the mesh, batch split over `data`.
Blocks are sorted by length and padded to a small set of bucket lengths, so that a corpus of short
paragraphs does not pay for 288 tokens each; every process embeds its own contiguous range of blocks
(multi-host index building) and writes its own snapshot shards (`embed_snapshot`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
import tqdm

from realm_jax import fileio
from realm_jax import sharding
from realm_jax.models import bert
from realm_jax.models import retriever as retriever_lib
from realm_jax.retrieval import snapshot as snapshot_lib

EmbedFn = Callable[[Any, dict[str, jax.Array]], jax.Array]


def make_document_embed_fn(config: retriever_lib.RetrieverConfig, mesh: jax.sharding.Mesh
                           ) -> EmbedFn:
  """A jitted `(retriever_params, inputs) -> [batch, dim] float32` document-tower forward.

  `inputs` holds `input_ids`, `input_mask`, `segment_ids`, each `[batch, seq_len]` int32 with
  `batch` a multiple of the mesh's `data` size. Params are replicated, the batch split over `data`.
  """
  model = retriever_lib.Retriever(config)

  def embed(params, inputs):
    return model.apply({"params": params}, input_ids=inputs["input_ids"],
                       input_mask=inputs["input_mask"], segment_ids=inputs["segment_ids"],
                       method=retriever_lib.Retriever.embed_documents)

  return jax.jit(embed, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh))


def make_query_embed_fn(config: retriever_lib.RetrieverConfig, mesh: jax.sharding.Mesh) -> EmbedFn:
  """A jitted `(retriever_params, inputs) -> [batch, dim] float32` query-tower forward (see above)."""
  model = retriever_lib.Retriever(config)

  def embed(params, inputs):
    return model.apply({"params": params}, input_ids=inputs["input_ids"],
                       input_mask=inputs["input_mask"],
                       method=retriever_lib.Retriever.embed_queries)

  return jax.jit(embed, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh))


# Padded lengths are multiples of 16 tokens. On the 20,780 SQuAD blocks (batches of 8) this computes
# 4.7 % padding instead of 9.3 % with multiples of 32, for 18 bucket shapes instead of 9: each costs
# one compilation (~0.9 s for MiniLM on one CPU core), paid once per process or cached on disk.
DEFAULT_BUCKET = 16


def bucket_length(n_tokens: int, max_length: int, bucket: int = DEFAULT_BUCKET) -> int:
  """Smallest multiple of `bucket` ≥ n_tokens, capped at max_length (few shapes → few compiles)."""
  if bucket <= 0:
    raise ValueError(f"bucket must be positive, got {bucket}")
  return min(max_length, max(bucket, -(-n_tokens // bucket) * bucket))


def bucket_lengths(max_length: int, bucket: int = DEFAULT_BUCKET) -> tuple[int, ...]:
  """The fixed set of padded lengths `bucket_length` picks from: multiples of `bucket`, then
  `max_length` (e.g. 16, 32, …, 272, 288 for 288-token blocks). Its size bounds the compilations."""
  return tuple(sorted({bucket_length(n, max_length, bucket) for n in range(1, max_length + 1)}))


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """How `run_batched` cuts `num` rows into padded, length-bucketed batches.

  Attributes:
    batches: `(rows, length)` per batch, in execution order: `rows` the int64 row positions (at most
      `batch_size` of them; a short last batch is padded with empty rows), `length` the padded
      sequence length of the batch.
    batch_size: rows of every executed batch (including padding rows).
    real_tokens: tokens with mask 1 over all rows.
  """

  batches: tuple[tuple[np.ndarray, int], ...]
  batch_size: int
  real_tokens: int

  @property
  def computed_tokens(self) -> int:
    """Token positions the encoder computes: `batch_size * length` summed over the batches."""
    return sum(self.batch_size * length for _, length in self.batches)

  @property
  def padded_share(self) -> float:
    """The share of computed token positions that are padding (0 when nothing is computed)."""
    computed = self.computed_tokens
    return 1.0 - self.real_tokens / computed if computed else 0.0

  @property
  def shapes(self) -> tuple[int, ...]:
    """The distinct padded lengths, ascending: one compilation each (per batch size)."""
    return tuple(sorted({length for _, length in self.batches}))


def plan_batches(lengths: np.ndarray, batch_size: int, max_length: int,
                 bucket: int | None = DEFAULT_BUCKET, sort: bool = True) -> BatchPlan:
  """Groups rows into batches of `batch_size`, padded to a length from a small fixed set.

  Args:
    lengths: `[num]` real tokens per row.
    batch_size: rows per batch.
    max_length: the longest length (the width of the input arrays).
    bucket: pad each batch to `bucket_length(longest row, max_length, bucket)`; None pads every
      batch to `max_length` (one shape).
    sort: take rows longest first (stable), so that each batch holds rows of similar length; False
      keeps the input order.

  Returns:
    A `BatchPlan`.

  Raises:
    ValueError: if `batch_size` is not positive.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  lengths = np.asarray(lengths).reshape(-1)
  order = np.argsort(-lengths, kind="stable") if sort else np.arange(len(lengths))
  batches = []
  for begin in range(0, len(order), batch_size):
    rows = order[begin:begin + batch_size]
    longest = int(lengths[rows].max())
    length = max_length if bucket is None else bucket_length(longest, max_length, bucket)
    batches.append((rows, length))
  return BatchPlan(batches=tuple(batches), batch_size=batch_size, real_tokens=int(lengths.sum()))


def take_batch(inputs: dict[str, np.ndarray], rows: np.ndarray, length: int,
               batch_size: int) -> dict[str, np.ndarray]:
  """Rows `rows` of `inputs`, cut to `length` columns and padded with empty rows to `batch_size`."""
  pad = batch_size - len(rows)
  return {k: np.pad(inputs[k][rows, :length], ((0, pad), (0, 0)))
          for k in ("input_ids", "input_mask", "segment_ids")}


def run_batched(embed_fn: EmbedFn, params: Any, inputs: dict[str, np.ndarray], batch_size: int,
                mesh: jax.sharding.Mesh, bucket: int = DEFAULT_BUCKET, desc: str | None = None,
                progress: bool = True) -> np.ndarray:
  """Embeds `[num, seq_len]` inputs in padded, length-bucketed batches: `[num, dim]` float32.

  Rows are processed longest-first in groups of `batch_size` (rounded up to a multiple of the mesh's
  `data` size); each group is padded to the smallest of `bucket_lengths(seq_len, bucket)` that holds
  its longest row, so padding is mostly not computed and at most `len(bucket_lengths(...))` shapes
  are compiled (`plan_batches`). The output is in the input order.

  Raises:
    ValueError: if `inputs` is empty or its arrays disagree in shape.
  """
  ids, mask, seg = inputs["input_ids"], inputs["input_mask"], inputs["segment_ids"]
  if ids.shape != mask.shape or ids.shape != seg.shape or ids.ndim != 2:
    raise ValueError(f"inputs must be three [num, seq_len] arrays, got {ids.shape}, {mask.shape}, "
                     f"{seg.shape}")
  num, max_length = ids.shape
  data_size = mesh.shape[sharding.DATA_AXIS]
  batch_size = -(-batch_size // data_size) * data_size
  plan = plan_batches(mask.sum(axis=1), batch_size, max_length, bucket)
  out: np.ndarray | None = None
  bar = tqdm.tqdm(total=num, desc=desc, unit="block", disable=not progress or desc is None)
  for rows, length in plan.batches:
    batch = take_batch(inputs, rows, length, batch_size)
    emb = np.asarray(jax.device_get(embed_fn(params, batch)))[:len(rows)]
    if out is None:
      out = np.zeros((num, emb.shape[-1]), np.float32)
    out[rows] = emb
    bar.update(len(rows))
  bar.close()
  if out is None:
    raise ValueError("nothing to embed: the input is empty")
  return out


def process_range(num_blocks: int, process_index: int | None = None,
                  process_count: int | None = None) -> tuple[int, int]:
  """The contiguous `[begin, end)` range of blocks this process embeds (disjoint across processes)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  per = -(-num_blocks // process_count)
  return min(process_index * per, num_blocks), min((process_index + 1) * per, num_blocks)


def shard_ranges(begin: int, end: int, num_shards: int) -> Sequence[tuple[int, int]]:
  """Splits `[begin, end)` into `num_shards` near-equal contiguous ranges."""
  edges = np.linspace(begin, end, num_shards + 1).round().astype(int)
  return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


@dataclasses.dataclass(frozen=True)
class BuildResult:
  """What one `embed_snapshot` call did (REALM §3.4 index refresh).

  Attributes:
    path: the committed snapshot directory on process 0 (a URL string on object stores); None on other
      processes.
    params_step: the train step of the embedder parameters (the snapshot's name).
    num_blocks: blocks in the corpus (rows of the snapshot).
    num_shards: shards of the snapshot (all processes together).
    written_shards: shards this process embedded and wrote.
    skipped_shards: shards of this process found already written by an interrupted run (resume).
    embed_s: wall seconds this process spent embedding and writing its shards.
    commit_s: wall seconds of the commit (checksums, manifest, rename) on process 0; 0 elsewhere.
    searcher_s: wall seconds building, serializing and uploading the ScaNN searcher (process 0).
  """

  path: fileio.Path | None
  params_step: int
  num_blocks: int
  num_shards: int
  written_shards: tuple[int, ...]
  skipped_shards: tuple[int, ...]
  embed_s: float
  commit_s: float
  searcher_s: float = 0.0


def embed_snapshot(root: str | pathlib.Path, corpus, retriever_cfg: retriever_lib.RetrieverConfig,
                   retriever_params: Any, params_step: int, mesh: jax.sharding.Mesh | None = None,
                   batch_size: int = 64, blocks_per_shard: int = 4096,
                   metadata: dict[str, Any] | None = None, process_index: int | None = None,
                   process_count: int | None = None, overwrite: bool = False,
                   shard_pause_s: float = 0.0, embed_fn: EmbedFn | None = None,
                   searcher: dict[str, Any] | None = None) -> BuildResult:
  """Embeds every block with Embed_doc and commits the snapshot `<root>/<params_step>` (REALM §3.4).

  Each process embeds a disjoint contiguous range of blocks on its own local devices and writes its own
  shards into the shared staging directory (`snapshot.staging_dir`: `<root>/.tmp-<params_step>` locally,
  `<root>/<params_step>` on object stores); shards already written by an earlier, interrupted run are
  skipped (resume). Process 0 commits once every shard is present.

  Args:
    root: the snapshots directory (`WORKDIR/snapshots`; local path or URL).
    corpus: a `data.corpus_store.Corpus` (`block_ids`, `fingerprint`, `retrieval_inputs(indices)`).
    retriever_cfg / retriever_params: the document embedder (params replicated on `mesh`, or host).
    params_step: the train step of `retriever_params` (the snapshot's name).
    mesh: devices to embed on (default: this process's local devices, data-parallel).
    batch_size: blocks per forward pass.
    blocks_per_shard: shard granularity (also the unit of resume).
    metadata: extra manifest fields (JSON).
    process_index / process_count: default `jax.process_index()` / `jax.process_count()`.
    overwrite: replace an already committed snapshot of this step.
    shard_pause_s: seconds to sleep after each written shard, yielding the CPU to a trainer that shares
      the host (the CPU demo); 0 on accelerators.
    embed_fn: `make_document_embed_fn(retriever_cfg, mesh)`, made once by a caller that builds many
      snapshots (its compiled bucket shapes are then reused); default: made here.
    searcher: `ScannSearcher` settings: process 0 builds ScaNN over all shards and writes it into the
      snapshot before the commit (`searchers.add_scann_searcher`), so trainers load it instead of
      building it; None (default): embeddings only.

  Returns:
    A `BuildResult` (its `path` is None on processes other than 0).

  Raises:
    snapshot.SnapshotError: if an existing temporary directory belongs to another corpus or config,
      or the step is already committed (and not `overwrite`).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  mesh = mesh or sharding.make_mesh(devices=jax.local_devices())
  start = time.perf_counter()
  num_blocks = len(corpus)
  per_process = max(1, math.ceil(num_blocks / process_count / blocks_per_shard))
  num_shards = per_process * process_count
  writer = snapshot_lib.SnapshotWriter(
      root, params_step, num_shards, corpus.fingerprint, retriever_cfg.embedding_dim,
      metadata=dict(metadata or {}, pooling=retriever_cfg.pooling,
                    embedding_dim=retriever_cfg.embedding_dim), overwrite=overwrite)
  begin, end = process_range(num_blocks, process_index, process_count)
  done = set(writer.completed_shards())
  embed_fn = embed_fn or make_document_embed_fn(retriever_cfg, mesh)
  # Every batch of the pass uses the same parameters: cast the layers' Dense weights to the compute
  # dtype once, not inside each call (bit-identical embeddings).
  retriever_params = bert.cast_dense_params(retriever_params, retriever_cfg.bert.compute_dtype)
  my_shards = range(process_index * per_process, (process_index + 1) * per_process)
  written, skipped = [], []
  for shard, (lo, hi) in zip(my_shards, shard_ranges(begin, end, per_process)):
    if shard in done:
      logging.info("snapshot %s: shard %d already written, skipped", writer.tmp_dir, shard)
      skipped.append(shard)
      continue
    rows = np.arange(lo, hi)
    inputs = corpus.retrieval_inputs(rows)
    emb = (run_batched(embed_fn, retriever_params, inputs, batch_size, mesh,
                       desc=f"embedding shard {shard + 1}/{num_shards}") if len(rows)
           else np.zeros((0, retriever_cfg.embedding_dim), np.float32))
    writer.write_shard(shard, corpus.block_ids[rows], emb)
    written.append(shard)
    if shard_pause_s > 0:
      time.sleep(shard_pause_s)
  if process_count > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"snapshot-{params_step}-written")
  embed_s = time.perf_counter() - start
  path, commit_s, searcher_s = None, 0.0, 0.0
  if process_index == 0:
    if searcher is not None:
      from realm_jax.retrieval import searchers as searchers_lib
      t0 = time.perf_counter()
      searchers_lib.add_scann_searcher(writer, **searcher)
      searcher_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    path = writer.commit()
    commit_s = time.perf_counter() - t0
    logging.info("committed snapshot %s (%d blocks, dim %d; %d shard(s) written, %d resumed)", path,
                 num_blocks, retriever_cfg.embedding_dim, len(written), len(skipped))
  return BuildResult(path=path, params_step=int(params_step), num_blocks=num_blocks,
                     num_shards=num_shards, written_shards=tuple(written),
                     skipped_shards=tuple(skipped), embed_s=embed_s, commit_s=commit_s,
                     searcher_s=searcher_s)


def build_snapshot(root: str | pathlib.Path, corpus, retriever_cfg: retriever_lib.RetrieverConfig,
                   retriever_params: Any, params_step: int, mesh: jax.sharding.Mesh | None = None,
                   batch_size: int = 64, blocks_per_shard: int = 4096,
                   metadata: dict[str, Any] | None = None, process_index: int | None = None,
                   process_count: int | None = None, overwrite: bool = False
                   ) -> fileio.Path | None:
  """Embeds every block with Embed_doc and commits `<root>/<params_step>` (REALM §3.4).

  `embed_snapshot` without the statistics; see it for the arguments.

  Returns:
    The committed path on process 0; None on other processes.

  Raises:
    snapshot.SnapshotError: if an existing temporary directory belongs to another corpus or config.
  """
  return embed_snapshot(root, corpus, retriever_cfg, retriever_params, params_step, mesh=mesh,
                        batch_size=batch_size, blocks_per_shard=blocks_per_shard, metadata=metadata,
                        process_index=process_index, process_count=process_count,
                        overwrite=overwrite).path
