"""Maximum inner product search (MIPS) over document embeddings: exact on device, ScaNN on host.

REALM (Guu et al., 2020, §3.4 and Appendix) retrieves the top-k documents by `Embed_input(x)ᵀ
Embed_doc(z)` with MIPS over the whole knowledge corpus: ScaNN on CPU hosts (ORQA's configuration was
`tree(num_leaves=1000, num_leaves_to_search=100, training_sample_size=100000).score_ah(2)`), while on TPU
the native route is an exact (or `approx_max_k`, TPU-KNN arXiv 2206.14286) top-k by a matmul against an
index sharded over every device, followed by a merge of the per-shard top-k.

Every searcher has the same interface, so tests and benchmarks compare them directly:

    scores, block_ids = searcher.search(query_embeddings, k)
    # query_embeddings: [batch, dim] float32 (numpy or jax)
    # scores:           [batch, k] float32 numpy, inner products, sorted descending along k
    # block_ids:        [batch, k] int64 numpy, the ids of the retrieved blocks

Searchers are immutable after construction and `search` is thread-safe, so the trainer can build the next
searcher in a background thread and swap it in (see `retrieval/watcher.py`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pathlib
import shutil
import tempfile
import threading
import time
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from realm_jax.retrieval import snapshot as snapshot_lib
from realm_jax import fileio
from realm_jax import sharding

Array = jax.Array
ArrayLike = np.ndarray | jax.Array


class Searcher(Protocol):
  """What the trainer, evaluation and benchmarks need from a MIPS searcher."""

  num_blocks: int
  dim: int

  def search(self, query_embeddings: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`[batch, dim]` float32 queries -> (`[batch, k]` float32 scores, `[batch, k]` int64 block ids)."""
    ...


# ----------------------------------------------------------------------------------------------------
# Argument checks shared by the searchers
# ----------------------------------------------------------------------------------------------------


def _check_k(k: Any, num_blocks: int, who: str) -> int:
  """Returns `k` as an int, or raises ValueError unless 1 <= k <= num_blocks."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise ValueError(f"{who}: k must be an int, got {k!r}")
  if not 1 <= k <= num_blocks:
    raise ValueError(f"{who}: k={k} must be in [1, num_blocks={num_blocks}]")
  return int(k)


def _check_queries(query_embeddings: ArrayLike, dim: int, who: str) -> ArrayLike:
  """Checks a `[batch, dim]` query array; numpy input is returned as contiguous float32 numpy.

  Raises:
    ValueError: on a wrong rank or width, an empty batch, a non-float dtype, or NaN/inf (numpy input).
  """
  if not isinstance(query_embeddings, jax.Array):
    query_embeddings = np.asarray(query_embeddings)
  shape = tuple(query_embeddings.shape)
  if len(shape) != 2 or shape[1] != dim:
    raise ValueError(f"{who}: query_embeddings must have shape [batch, {dim}], got {shape}")
  if shape[0] == 0:
    raise ValueError(f"{who}: query_embeddings has an empty batch")
  if not jnp.issubdtype(query_embeddings.dtype, jnp.floating):
    raise ValueError(f"{who}: query_embeddings must be floating point, got {query_embeddings.dtype}")
  if isinstance(query_embeddings, np.ndarray):
    query_embeddings = np.ascontiguousarray(query_embeddings, dtype=np.float32)
    if not np.isfinite(query_embeddings).all():
      raise ValueError(f"{who}: query_embeddings holds NaN or inf")
  return query_embeddings


def _check_index(embeddings: np.ndarray, block_ids: np.ndarray,
                 who: str, finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Checks `[num_blocks, dim]` embeddings and `[num_blocks]` unique integer block ids.

  With `finite=False` the rows are not read (the caller checks the rows it reads).

  Returns:
    `(embeddings, block_ids)`; embeddings unchanged (memmaps stay memmaps), block ids as int64.

  Raises:
    ValueError: on wrong shapes or dtypes, an empty index, NaN/inf or repeated block ids.
  """
  if embeddings.ndim != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
    raise ValueError(f"{who}: embeddings must be a non-empty [num_blocks, dim] array, got shape "
                     f"{embeddings.shape}")
  if not np.issubdtype(embeddings.dtype, np.floating):
    raise ValueError(f"{who}: embeddings must be floating point, got {embeddings.dtype}")
  block_ids = np.asarray(block_ids)
  if block_ids.shape != (embeddings.shape[0],) or not np.issubdtype(block_ids.dtype, np.integer):
    raise ValueError(f"{who}: block_ids must be [{embeddings.shape[0]}] integers, got shape "
                     f"{block_ids.shape} dtype {block_ids.dtype}")
  block_ids = block_ids.astype(np.int64, copy=False)
  try:
    if finite:
      snapshot_lib.check_finite(embeddings, who, "embeddings")
    snapshot_lib.check_unique_block_ids(block_ids, who)
  except snapshot_lib.SnapshotError as e:
    raise ValueError(str(e)) from None
  return embeddings, block_ids


def _numpy_top_k(queries: np.ndarray, embeddings: np.ndarray, k: int,
                 chunk_rows: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
  """Exact host top-k by inner product, streaming over row chunks of `embeddings`.

  Args:
    queries: `[batch, dim]` float32.
    embeddings: `[num_blocks, dim]` float (may be a memmap).
    k: 1 <= k <= num_blocks.
    chunk_rows: rows scored at a time (bounds memory at `batch * (chunk_rows + k)` floats).

  Returns:
    (`[batch, k]` float32 scores descending, `[batch, k]` int64 rows).
  """
  best_scores = np.full((queries.shape[0], 0), -np.inf, np.float32)
  best_rows = np.zeros((queries.shape[0], 0), np.int64)
  for start in range(0, embeddings.shape[0], chunk_rows):
    chunk = np.asarray(embeddings[start:start + chunk_rows], dtype=np.float32)
    scores = np.concatenate([best_scores, queries @ chunk.T], axis=1)
    rows = np.concatenate([best_rows, np.broadcast_to(
        np.arange(start, start + chunk.shape[0]), (queries.shape[0], chunk.shape[0]))], axis=1)
    keep = min(k, scores.shape[1])
    part = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
    best_scores = np.take_along_axis(scores, part, axis=1)
    best_rows = np.take_along_axis(rows, part, axis=1)
  order = np.lexsort((best_rows, -best_scores), axis=1)
  return (np.take_along_axis(best_scores, order, axis=1),
          np.take_along_axis(best_rows, order, axis=1))


# ----------------------------------------------------------------------------------------------------
# Exact (or TPU-KNN approximate) top-k on the device mesh
# ----------------------------------------------------------------------------------------------------


def sharded_top_k(query_embeddings: Array,
                  index_embeddings: Array,
                  k: int,
                  mesh: Mesh,
                  index_valid_mask: Array | None = None,
                  *,
                  approximate: bool = False,
                  recall_target: float = 0.95,
                  index_axes: tuple[str, ...] = sharding.INDEX_AXES,
                  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST) -> tuple[Array, Array]:
  """Top-k inner products against a row-sharded index: per-shard top-k, all-gather, merge (REALM §3.4).

  Pure and traceable: call it inside another jitted function (the REALM train step) or through
  `ExactSearcher`. Each device scores its `[rows_per_shard, dim]` slice of the index against the full
  query batch (`[batch, rows_per_shard]` float32 scores per device; on TPU XLA fuses the matmul into
  `approx_max_k`), keeps its top `min(k, rows_per_shard)`, and the candidates of all shards
  (`num_shards * min(k, rows_per_shard)` per query) are all-gathered and merged with an exact top-k, so
  any `k <= num_rows` is handled, including `k > rows_per_shard`.

  Queries may arrive with any sharding (replicated, or batch-sharded over `data` as in the train step):
  they are replicated (all-gathered, `[batch, dim]` is small) before scoring. Results are replicated on
  every device of the mesh; under `jit`, an `out_shardings` or a sharding constraint re-splits them.

  Args:
    query_embeddings: `[batch, dim]` float queries (computed in float32).
    index_embeddings: `[num_rows, dim]` float index, rows sharded over `index_axes`
      (`sharding.index_sharding(mesh)`); `num_rows` must be a multiple of the number of shards.
    k: number of results per query, `1 <= k <= num_rows` (static).
    mesh: the device mesh; must have every axis in `index_axes`.
    index_valid_mask: optional `[num_rows]` bool, sharded like the rows; False rows (padding, removed
      documents) score -inf and are never returned ahead of a valid row.
    approximate: per-shard `jax.lax.approx_max_k` (TPU-KNN) instead of `jax.lax.top_k`; exact on CPU.
    recall_target: expected recall of `approx_max_k`, accounted over all `num_rows` rows.
    index_axes: mesh axes the index rows are split over (row-major order, `data` outermost).
    precision: matmul precision; HIGHEST keeps float32 scores on TPU (the default there is bf16 passes).

  Returns:
    (`[batch, k]` float32 scores sorted descending, `[batch, k]` int32 global row numbers into
    `index_embeddings`). With fewer than `k` valid rows, the tail holds -inf scores and arbitrary rows.

  Raises:
    ValueError: (at trace time) on mismatched shapes, a bad `k`, or a mesh without `index_axes`.
  """
  if query_embeddings.ndim != 2 or index_embeddings.ndim != 2:
    raise ValueError(f"sharded_top_k: expected [batch, dim] queries and [num_rows, dim] index, got "
                     f"{query_embeddings.shape} and {index_embeddings.shape}")
  if query_embeddings.shape[1] != index_embeddings.shape[1]:
    raise ValueError(f"sharded_top_k: query dim {query_embeddings.shape[1]} != index dim "
                     f"{index_embeddings.shape[1]}")
  missing = [a for a in index_axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"sharded_top_k: mesh axes {mesh.axis_names} lack index axes {missing}")
  num_rows = index_embeddings.shape[0]
  num_shards = math.prod(mesh.shape[a] for a in index_axes)
  if num_rows % num_shards:
    raise ValueError(f"sharded_top_k: num_rows={num_rows} is not a multiple of the {num_shards} "
                     "index shards; pad the index (ExactSearcher does)")
  k = _check_k(k, num_rows, "sharded_top_k")
  if index_valid_mask is not None and index_valid_mask.shape != (num_rows,):
    raise ValueError(f"sharded_top_k: index_valid_mask must be [{num_rows}], got "
                     f"{index_valid_mask.shape}")
  rows_per_shard = num_rows // num_shards
  local_k = min(k, rows_per_shard)

  def per_shard(queries, shard, mask):
    scores = jnp.dot(queries.astype(jnp.float32), shard.astype(jnp.float32).T,
                     precision=precision, preferred_element_type=jnp.float32)
    if mask is not None:
      scores = jnp.where(mask[None, :], scores, -jnp.inf)
    if approximate:
      values, local_rows = jax.lax.approx_max_k(scores, local_k, recall_target=recall_target,
                                                reduction_input_size_override=num_rows)
    else:
      values, local_rows = jax.lax.top_k(scores, local_k)
    shard_index = jax.lax.axis_index(index_axes)
    rows = local_rows.astype(jnp.int32) + shard_index * rows_per_shard
    all_values = jax.lax.all_gather(values, index_axes, axis=1, tiled=True)
    all_rows = jax.lax.all_gather(rows, index_axes, axis=1, tiled=True)
    top_values, position = jax.lax.top_k(all_values, k)
    return top_values, jnp.take_along_axis(all_rows, position, axis=1)

  # check_vma=False: the merged top-k is identical on every device (computed from all-gathered
  # candidates), which the varying-axes checker cannot infer through `all_gather`.
  if index_valid_mask is None:
    fn = jax.shard_map(lambda q, s: per_shard(q, s, None), mesh=mesh,
                       in_specs=(P(), P(index_axes)), out_specs=(P(), P()),
                       check_vma=False)
    return fn(query_embeddings, index_embeddings)
  fn = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P(index_axes), P(index_axes)),
                     out_specs=(P(), P()), check_vma=False)
  return fn(query_embeddings, index_embeddings, index_valid_mask.astype(bool))


_jitted_sharded_top_k = jax.jit(
    sharded_top_k,
    static_argnames=("k", "mesh", "approximate", "recall_target", "index_axes", "precision"))


class ExactSearcher:
  """Exact MIPS by a sharded matmul on the device mesh (the TPU route of REFERENCE "MIPS").

  The index is padded to a multiple of the number of devices and split by rows over every device
  (`sharding.index_sharding(mesh)`); padded rows are masked to -inf and never returned. `search` runs the
  jitted `sharded_top_k` (compiled once per `(batch, k)`).

  For use inside a jitted train step, take `index_embeddings`, `index_valid_mask` and `mesh` from this
  object and call `sharded_top_k` directly; a returned row `r < num_blocks` is the block `block_ids[r]`
  (row order of the snapshot).

  Memory (paper scale, 13.35M x 128 float32 = 6.8 GB): the device array is assembled shard by shard
  with `jax.make_array_from_callback`; each callback reads only its device's rows (straight into a
  `[rows_per_device, dim]` buffer when `embeddings` is a `snapshot.ShardedRows` from
  `read_snapshot(lazy=True)`), so the host holds one copy of the index (the device buffers; on CPU
  they are host memory) plus one device shard in flight. Finiteness is checked on the rows as they are
  read.

  Multi-host (a pod): every host runs the same code with the same GLOBAL view of the snapshot — a lazy
  `ShardedRows` over all shard files and all `[num_blocks]` block ids — and `make_array_from_callback`
  calls back only for the host's addressable devices, so each host reads, checks and holds only the
  rows of its own devices (`process_row_range`), and the result is one global `jax.Array` over the
  mesh. `open_exact_searcher` does this from a snapshot path (validating only the host's rows). All
  hosts must call `search` with the same queries (a collective); every host gets the full result.
  """

  def __init__(self,
               embeddings: np.ndarray,
               block_ids: np.ndarray,
               mesh: Mesh | None = None,
               *,
               approximate: bool = False,
               recall_target: float = 0.95):
    """Places the index on the mesh.

    Args:
      embeddings: `[num_blocks, dim]` float embeddings (stored on device as float32): a numpy array,
        a memmap, or a lazy `snapshot.ShardedRows` (rows read straight into the device buffers).
      block_ids: `[num_blocks]` unique integer block ids.
      mesh: device mesh with axes `data` and `model`; default `sharding.make_mesh()` over all devices.
      approximate: use `approx_max_k` per shard (TPU-KNN); exact on CPU.
      recall_target: recall target of `approx_max_k`.

    Raises:
      ValueError: on bad shapes, NaN/inf embeddings (in the rows this process holds) or repeated
        block ids.
      SnapshotError: if a lazy shard file vanished or is truncated.
    """
    embeddings, self.block_ids = _check_index(embeddings, block_ids, "ExactSearcher", finite=False)
    self.num_blocks, self.dim = int(embeddings.shape[0]), int(embeddings.shape[1])
    self.mesh = sharding.make_mesh() if mesh is None else mesh
    self.approximate = approximate
    self.recall_target = recall_target
    num_shards = math.prod(self.mesh.shape[a] for a in sharding.INDEX_AXES)
    self.num_rows = -(-self.num_blocks // num_shards) * num_shards
    start_time = time.perf_counter()

    def rows_of(index: tuple[slice, ...]) -> tuple[int, int]:
      rows = index[0]
      return (rows.start or 0), (self.num_rows if rows.stop is None else rows.stop)

    def embeddings_callback(index):
      start, stop = rows_of(index)
      out = np.zeros((stop - start, self.dim), np.float32)
      valid_stop = min(stop, self.num_blocks)
      if valid_stop > start:
        if isinstance(embeddings, snapshot_lib.ShardedRows):
          embeddings.read_rows(start, valid_stop, out[:valid_stop - start])
        else:
          out[:valid_stop - start] = embeddings[start:valid_stop]
        if not np.isfinite(out).all():
          bad = start + int(np.argwhere(~np.isfinite(out))[0][0])
          raise ValueError(f"ExactSearcher: embeddings hold a non-finite value (first at row {bad})")
      return out

    def mask_callback(index):
      start, stop = rows_of(index)
      return np.arange(start, stop) < self.num_blocks

    self.index_embeddings = jax.make_array_from_callback(
        (self.num_rows, self.dim), sharding.index_sharding(self.mesh), embeddings_callback)
    self.index_valid_mask = None
    if self.num_rows != self.num_blocks:
      self.index_valid_mask = jax.make_array_from_callback(
          (self.num_rows,), NamedSharding(self.mesh, P(sharding.INDEX_AXES)), mask_callback)
    self.build_seconds = time.perf_counter() - start_time
    logging.info("ExactSearcher: %d x %d index (padded to %d rows) over %d devices in %.2f s",
                 self.num_blocks, self.dim, self.num_rows, num_shards, self.build_seconds)

  # Scores of one call, `[batch, num_rows]` float32 over all devices, are kept under this many bytes by
  # searching numpy queries in chunks (at 13.35M rows a 256-query batch would score 13.7 GB at once;
  # on CPU the simulated devices share the host's memory).
  max_score_bytes = 1 << 30

  def search_rows(self, query_embeddings: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Like `search`, but returns `[batch, k]` int64 row numbers (snapshot row order) for the ids."""
    k = _check_k(k, self.num_blocks, "ExactSearcher.search")
    queries = _check_queries(query_embeddings, self.dim, "ExactSearcher.search")
    chunk = max(1, self.max_score_bytes // (4 * self.num_rows))
    if isinstance(queries, np.ndarray) and queries.shape[0] > chunk:
      # Equal-sized chunks (the last one padded) so that one compiled shape serves them all.
      batch = queries.shape[0]
      padded = np.zeros((-(-batch // chunk) * chunk, self.dim), np.float32)
      padded[:batch] = queries
      parts = [self.search_rows(padded[i:i + chunk], k) for i in range(0, batch, chunk)]
      return (np.concatenate([p[0] for p in parts])[:batch],
              np.concatenate([p[1] for p in parts])[:batch])
    if isinstance(queries, np.ndarray):
      host_queries = queries
      queries = jax.make_array_from_callback(host_queries.shape, sharding.replicated(self.mesh),
                                             lambda index: host_queries[index])
    scores, rows = _jitted_sharded_top_k(queries, self.index_embeddings, k=k, mesh=self.mesh,
                                         index_valid_mask=self.index_valid_mask,
                                         approximate=self.approximate,
                                         recall_target=self.recall_target)
    return np.asarray(scores, np.float32), np.asarray(rows, np.int64)

  def search(self, query_embeddings: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k blocks by inner product.

    Args:
      query_embeddings: `[batch, dim]` float queries, numpy or a `jax.Array` of any sharding.
      k: results per query, `1 <= k <= num_blocks`.

    Returns:
      (`[batch, k]` float32 scores descending, `[batch, k]` int64 block ids).

    Raises:
      ValueError: on a bad `k` or query shape, or NaN/inf in numpy queries.
    """
    scores, rows = self.search_rows(query_embeddings, k)
    return scores, self.block_ids[rows]


# ----------------------------------------------------------------------------------------------------
# ScaNN on the host
# ----------------------------------------------------------------------------------------------------


def _check_search_settings(num_leaves: int | None, num_leaves_to_search: int | None,
                           reorder_k: int) -> None:
  """Raises ValueError unless `reorder_k >= 1` and (when both are given) `1 <= num_leaves_to_search
  <= num_leaves`: the ScaNN settings a query uses, at build time and in `set_search_settings`."""
  if reorder_k < 1:
    raise ValueError(f"ScannSearcher: reorder_k must be >= 1, got {reorder_k}")
  if num_leaves is not None and num_leaves_to_search is not None and not (
      1 <= num_leaves_to_search <= num_leaves):
    raise ValueError(f"ScannSearcher: num_leaves_to_search={num_leaves_to_search} must be in [1, "
                     f"num_leaves={num_leaves}]")


class ScannSearcher:
  """ScaNN MIPS: k-means tree + anisotropic asymmetric hashing + exact float32 reordering (REALM §3.4).

  With the defaults, a corpus of `n` rows gets `num_leaves = min(round(sqrt(n)), training_sample_size //
  100)` leaves, searches 10% of them, and reorders the best `max(reorder_k, k)` AH candidates by exact
  inner products. For the 13.35M-block Wikipedia corpus this is ORQA's `tree(1000, 100, 100000)
  .score_ah(2)` (plus the reordering). Corpora smaller than `brute_force_below` rows use ScaNN's exact
  brute force instead. A query for which the tree yields fewer than `k` candidates is answered exactly on
  the host, so every search returns `k` valid results.

  Scores are exact float32 inner products (after reordering), sorted descending. Searches are serialised
  by a lock (one ScaNN call at a time, each multi-threaded for large batches).

  Serialization: the index builder writes the built searcher into the embedding snapshot
  (`add_scann_searcher`), and the trainer / `predict` load it (`ScannSearcher.load`, through
  `searcher_from_snapshot`) instead of training it again at every index swap. `config` (see
  `resolve_config`) is what determines the index; a serialized searcher is used only when its config is
  the one the reader asks for.
  """

  def __init__(self,
               embeddings: np.ndarray,
               block_ids: np.ndarray,
               num_leaves: int | None = None,
               num_leaves_to_search: int | None = None,
               training_sample_size: int = 100_000,
               dims_per_block: int = 2,
               reorder_k: int | None = None,
               brute_force_below: int = 10_000,
               anisotropic_quantization_threshold: float = 0.2,
               num_threads: int | None = None):
    """Builds the ScaNN index (logs the build time; `build_seconds` keeps it).

    Args:
      embeddings: `[num_blocks, dim]` float embeddings (a numpy array, memmap or
        `snapshot.ShardedRows`; copied once to float32 for the build; a `ShardedRows` is kept lazy
        afterwards for the exact fall-back).
      block_ids: `[num_blocks]` unique integer block ids.
      num_leaves: k-means partitions; default `min(round(sqrt(n)), training_sample_size // 100)`.
      num_leaves_to_search: partitions searched per query; default `ceil(num_leaves / 10)`.
      training_sample_size: rows sampled to train the tree and the AH codebooks (capped at `n`).
      dims_per_block: dimensions per AH sub-space (2 in ORQA; 16 centres per sub-space, LUT16).
      reorder_k: AH candidates rescored exactly per query; default 100, always at least `k`.
      brute_force_below: corpora with fewer rows use exact brute force.
      anisotropic_quantization_threshold: ScaNN's anisotropic threshold η (0.2, ScaNN's advice;
        NaN disables).
      num_threads: threads for training and batched search; default `os.cpu_count()`.

    Raises:
      ValueError: on bad shapes, NaN/inf, repeated block ids or inconsistent tree settings.
    """
    import scann  # Imported lazily: heavy, and only the host searcher needs it.

    lazy = None if isinstance(embeddings, np.ndarray) else embeddings
    data, self.block_ids = _check_index(embeddings if lazy is None else np.asarray(lazy), block_ids,
                                        "ScannSearcher")
    self.config = self.resolve_config(
        data.shape[0], data.shape[1], num_leaves=num_leaves,
        num_leaves_to_search=num_leaves_to_search, training_sample_size=training_sample_size,
        dims_per_block=dims_per_block, reorder_k=reorder_k, brute_force_below=brute_force_below,
        anisotropic_quantization_threshold=anisotropic_quantization_threshold)
    self._set_config(self.config, num_threads)
    data = np.ascontiguousarray(data, dtype=np.float32)
    self._embeddings = data if lazy is None else lazy
    self._lock = threading.Lock()
    start_time = time.perf_counter()
    builder = scann.scann_ops_pybind.builder(data, self.config["num_neighbors"], "dot_product")
    builder.set_n_training_threads(self.num_threads)
    if self.mode == "brute_force":
      builder = builder.score_brute_force()
    else:
      threshold = self.config["anisotropic_quantization_threshold"]
      builder = builder.tree(num_leaves=self.num_leaves,
                             num_leaves_to_search=self.num_leaves_to_search,
                             training_sample_size=self.training_sample_size)
      builder = builder.score_ah(
          self.config["dims_per_block"],
          anisotropic_quantization_threshold=float("nan") if threshold is None else threshold,
          training_sample_size=self.training_sample_size)
      builder = builder.reorder(self.reorder_k)
    self._searcher = builder.build()
    del data, builder  # ScaNN holds its own copy; a lazy `embeddings` stays on disk.
    self._searcher.set_num_threads(self.num_threads)
    self.build_seconds = time.perf_counter() - start_time
    self.loaded = False
    logging.info("ScannSearcher: built %s index over %d x %d in %.2f s (leaves %d, search %d, "
                 "reorder %d)", self.mode, self.num_blocks, self.dim, self.build_seconds,
                 self.num_leaves, self.num_leaves_to_search, self.reorder_k)

  @staticmethod
  def resolve_config(num_blocks: int,
                     dim: int,
                     num_leaves: int | None = None,
                     num_leaves_to_search: int | None = None,
                     training_sample_size: int = 100_000,
                     dims_per_block: int = 2,
                     reorder_k: int | None = None,
                     brute_force_below: int = 10_000,
                     anisotropic_quantization_threshold: float = 0.2,
                     num_threads: int | None = None) -> dict[str, Any]:
    """The settings that determine a ScaNN index over `[num_blocks, dim]` (defaults resolved).

    Takes the constructor's keyword arguments (`num_threads` is accepted and ignored: it changes the
    speed, not the index). Two searchers with equal configs are interchangeable, which is how a reader
    decides whether the searcher serialized in a snapshot is the one it wants (REALM §3.4).

    Returns:
      A JSON-safe dict: `kind`, `distance`, `num_neighbors`, `mode` ("brute_force" or "tree_ah"),
      `num_blocks`, `dim`, and for "tree_ah" `num_leaves`, `num_leaves_to_search`,
      `training_sample_size`, `dims_per_block`, `anisotropic_quantization_threshold` (None for NaN)
      and `reorder_k`.

    Raises:
      ValueError: on inconsistent tree settings.
    """
    del num_threads
    n, dim = int(num_blocks), int(dim)
    reorder = 100 if reorder_k is None else int(reorder_k)
    _check_search_settings(None, None, reorder)
    config: dict[str, Any] = {"kind": "scann", "distance": "dot_product", "num_neighbors": 10,
                              "num_blocks": n, "dim": dim, "reorder_k": reorder}
    if n < brute_force_below:
      config.update(mode="brute_force", num_leaves=0, num_leaves_to_search=0, training_sample_size=0)
      return config
    sample = min(int(training_sample_size), n)
    leaves = (int(num_leaves) if num_leaves is not None else
              max(1, min(round(math.sqrt(n)), sample // 100)))
    search = (int(num_leaves_to_search) if num_leaves_to_search is not None
              else max(1, math.ceil(leaves / 10)))
    if not 1 <= leaves <= sample:
      raise ValueError(f"ScannSearcher: num_leaves={leaves} must be in [1, "
                       f"training_sample_size={sample}]")
    _check_search_settings(leaves, search, reorder)
    if dims_per_block < 1:
      raise ValueError(f"ScannSearcher: dims_per_block must be >= 1, got {dims_per_block}")
    threshold = float(anisotropic_quantization_threshold)
    config.update(mode="tree_ah", num_leaves=leaves, num_leaves_to_search=search,
                  training_sample_size=sample, dims_per_block=int(dims_per_block),
                  anisotropic_quantization_threshold=None if math.isnan(threshold) else threshold)
    return config

  def _set_config(self, config: dict[str, Any], num_threads: int | None) -> None:
    """Sets the attributes (`mode`, `num_leaves`, …) that `search_rows` and the logs read."""
    self.num_blocks, self.dim = int(config["num_blocks"]), int(config["dim"])
    self.mode = config["mode"]
    self.num_leaves = int(config["num_leaves"])
    self.num_leaves_to_search = int(config["num_leaves_to_search"])
    self.training_sample_size = int(config["training_sample_size"])
    self.reorder_k = int(config["reorder_k"])
    self.num_threads = num_threads or os.cpu_count() or 1

  def set_search_settings(self, num_leaves_to_search: int | None = None,
                          reorder_k: int | None = None) -> None:
    """Changes how many leaves a query searches and how many AH candidates are reordered exactly,
    without rebuilding the index (ScaNN applies both per query). This is how recall is traded for
    speed on a built or loaded index (`benchmarks/scann_vs_exact.py` sweeps them); `config` follows,
    so a snapshot written afterwards records the settings in use.

    Args:
      num_leaves_to_search: partitions searched per query, `1 <= . <= num_leaves`; None keeps it.
      reorder_k: AH candidates rescored exactly per query, `>= 1` (at least `k` is always used);
        None keeps it.

    Raises:
      ValueError: for values outside those ranges, or leaves to search on a brute-force index.
    """
    if num_leaves_to_search is not None and self.mode != "tree_ah":
      raise ValueError("ScannSearcher.set_search_settings: a brute-force index has no leaves")
    search = self.num_leaves_to_search if num_leaves_to_search is None else int(num_leaves_to_search)
    reorder = self.reorder_k if reorder_k is None else int(reorder_k)
    _check_search_settings(self.num_leaves if self.mode == "tree_ah" else None, search, reorder)
    with self._lock:  # A concurrent search sees the old settings or the new ones, not a mix.
      self.num_leaves_to_search, self.reorder_k = search, reorder
      self.config = dict(self.config, reorder_k=reorder, num_leaves_to_search=search)

  def serialize(self, directory: str | os.PathLike) -> None:
    """Writes the ScaNN index into the local, empty `directory` (ScaNN's `searcher.serialize`, with
    paths relative to the directory, so that it can be moved, uploaded and loaded elsewhere)."""
    with self._lock:
      self._searcher.serialize(str(directory), relative_path=True)

  @classmethod
  def load(cls, directory: str | os.PathLike, embeddings: np.ndarray, block_ids: np.ndarray,
           config: dict[str, Any], num_threads: int | None = None) -> "ScannSearcher":
    """Loads an index written by `serialize` (`scann.scann_ops_pybind.load_searcher`).

    Args:
      directory: local directory with the serialized files (verified by the caller).
      embeddings: `[num_blocks, dim]` float rows the index was built from (kept, lazily if a
        `ShardedRows`, for the exact fall-back of short queries; not re-indexed).
      block_ids: `[num_blocks]` int block ids, row order of `embeddings`.
      config: the index's `resolve_config` dict (from the snapshot manifest).
      num_threads: search threads; default `os.cpu_count()`.

    Returns:
      The searcher (`build_seconds` is the load time; `loaded` is True).

    Raises:
      ValueError: if the shapes disagree with `config` or the loaded index holds another number of
        rows.
      RuntimeError / OSError: from ScaNN if the files cannot be loaded.
    """
    import scann

    self = cls.__new__(cls)
    start_time = time.perf_counter()
    block_ids = np.asarray(block_ids).astype(np.int64, copy=False)
    if tuple(embeddings.shape) != (config["num_blocks"], config["dim"]) or block_ids.shape != (
        config["num_blocks"],):
      raise ValueError(f"ScannSearcher.load: embeddings {tuple(embeddings.shape)} / block ids "
                       f"{block_ids.shape} differ from the config's [{config['num_blocks']}, "
                       f"{config['dim']}]")
    self._set_config(config, num_threads)
    self.config = dict(config)
    self.block_ids = block_ids
    self._embeddings = embeddings
    self._lock = threading.Lock()
    self._searcher = scann.scann_ops_pybind.load_searcher(str(directory),
                                                          assets_backcompat_shim=False)
    size = int(self._searcher.size())
    if size != self.num_blocks:
      raise ValueError(f"ScannSearcher.load: the index in {directory} holds {size} rows, the "
                       f"config says {self.num_blocks}")
    self._searcher.set_num_threads(self.num_threads)
    self.build_seconds = time.perf_counter() - start_time
    self.loaded = True
    logging.info("ScannSearcher: loaded %s index over %d x %d in %.2f s", self.mode,
                 self.num_blocks, self.dim, self.build_seconds)
    return self

  def search_rows(self, query_embeddings: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Like `search`, but returns `[batch, k]` int64 row numbers instead of block ids."""
    k = _check_k(k, self.num_blocks, "ScannSearcher.search")
    queries = np.asarray(_check_queries(np.asarray(query_embeddings), self.dim,
                                        "ScannSearcher.search"))
    with self._lock:
      pre_reorder = max(self.reorder_k, k)
      leaves = self.num_leaves_to_search if self.mode == "tree_ah" else None
      if queries.shape[0] >= 2 * self.num_threads and self.num_threads > 1:
        rows, scores = self._searcher.search_batched_parallel(
            queries, final_num_neighbors=k, pre_reorder_num_neighbors=pre_reorder,
            leaves_to_search=leaves, batch_size=max(16, -(-queries.shape[0] // self.num_threads)))
      else:
        rows, scores = self._searcher.search_batched(queries, final_num_neighbors=k,
                                                     pre_reorder_num_neighbors=pre_reorder,
                                                     leaves_to_search=leaves)
    rows = np.asarray(rows).astype(np.int64)
    scores = np.asarray(scores, np.float32)
    # ScaNN pads with NaN when the searched leaves hold fewer than k rows: answer those exactly.
    short = ~np.isfinite(scores).all(axis=1) | (rows >= self.num_blocks).any(axis=1)
    if short.any():
      try:
        scores[short], rows[short] = _numpy_top_k(queries[short], self._embeddings, k)
      except snapshot_lib.SnapshotError as e:  # Lazy rows whose snapshot was pruned meanwhile.
        logging.warning("ScannSearcher: exact fall-back unavailable (%s); searching every leaf", e)
        with self._lock:
          r, d = self._searcher.search_batched(
              queries[short], final_num_neighbors=k, pre_reorder_num_neighbors=pre_reorder,
              leaves_to_search=max(self.num_leaves, 1) if self.mode == "tree_ah" else None)
        rows[short], scores[short] = np.asarray(r).astype(np.int64), np.asarray(d, np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)

  def search(self, query_embeddings: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k blocks by inner product.

    Args:
      query_embeddings: `[batch, dim]` float queries (numpy or jax; copied to the host).
      k: results per query, `1 <= k <= num_blocks`.

    Returns:
      (`[batch, k]` float32 exact inner products descending, `[batch, k]` int64 block ids).

    Raises:
      ValueError: on a bad `k` or query shape, or NaN/inf queries.
    """
    scores, rows = self.search_rows(query_embeddings, k)
    return scores, self.block_ids[rows]


def merge_top_k(results: Sequence[tuple[np.ndarray, np.ndarray]],
                k: int) -> tuple[np.ndarray, np.ndarray]:
  """Merges per-shard top-k lists into the global top-k (host side; ties keep shard order).

  Args:
    results: one `(scores [batch, k_i] float, block_ids [batch, k_i] int)` pair per shard; NaN scores
      (ScaNN padding) rank last.
    k: results per query, `1 <= k <= sum(k_i)`.

  Returns:
    (`[batch, k]` float32 scores descending, `[batch, k]` int64 block ids).

  Raises:
    ValueError: if `results` is empty, shapes disagree, or `k` exceeds the candidates.
  """
  if not results:
    raise ValueError("merge_top_k: no results to merge")
  scores = [np.asarray(s, np.float32) for s, _ in results]
  ids = [np.asarray(i) for _, i in results]
  batch = scores[0].shape[0] if scores[0].ndim == 2 else -1
  for n, (s, i) in enumerate(zip(scores, ids)):
    if s.ndim != 2 or s.shape != i.shape or s.shape[0] != batch:
      raise ValueError(f"merge_top_k: result {n} has scores {s.shape} and block_ids {i.shape}; "
                       f"expected matching [batch={batch}, k_i]")
  all_scores = np.concatenate(scores, axis=1)
  all_ids = np.concatenate(ids, axis=1).astype(np.int64)
  k = _check_k(k, all_scores.shape[1], "merge_top_k")
  all_scores = np.where(np.isnan(all_scores), -np.inf, all_scores)
  order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_ids, order, axis=1)


class ShardedScannSearcher:
  """One `ScannSearcher` per shard of the corpus, searched in turn and merged with `merge_top_k`.

  The host-side layout for a corpus split over index-builder shards (and, later, over hosts). Each shard
  gets the default ScaNN settings for its own size; `k` is asked of every shard (capped at its size).
  """

  def __init__(self, shards: Sequence[tuple[np.ndarray, np.ndarray]], **scann_kwargs: Any):
    """Builds one ScaNN index per shard.

    Args:
      shards: `(embeddings [rows_i, dim] float, block_ids [rows_i] int)` per shard; block ids unique
        across all shards; empty shards are skipped.
      **scann_kwargs: passed to every `ScannSearcher`.

    Raises:
      ValueError: if there is no non-empty shard, dims differ, or block ids repeat across shards.
    """
    shards = [(np.asarray(e), np.asarray(i)) for e, i in shards if len(e)]
    if not shards:
      raise ValueError("ShardedScannSearcher: no non-empty shard")
    dims = {e.shape[1] if e.ndim == 2 else None for e, _ in shards}
    if len(dims) != 1 or None in dims:
      raise ValueError(f"ShardedScannSearcher: shards must be [rows, dim] with one dim, got "
                       f"{[e.shape for e, _ in shards]}")
    try:
      snapshot_lib.check_unique_block_ids(
          np.concatenate([i.reshape(-1) for _, i in shards]).astype(np.int64), "ShardedScannSearcher")
    except snapshot_lib.SnapshotError as e:
      raise ValueError(str(e)) from None
    self.searchers = [ScannSearcher(e, i, **scann_kwargs) for e, i in shards]
    self.num_blocks = sum(s.num_blocks for s in self.searchers)
    self.dim = dims.pop()
    self.build_seconds = sum(s.build_seconds for s in self.searchers)

  def search(self, query_embeddings: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over all shards: `[batch, dim]` queries -> (`[batch, k]` float32, `[batch, k]` int64).

    Raises:
      ValueError: on a bad `k` or query shape.
    """
    k = _check_k(k, self.num_blocks, "ShardedScannSearcher.search")
    queries = _check_queries(np.asarray(query_embeddings), self.dim, "ShardedScannSearcher.search")
    return merge_top_k([s.search(queries, min(k, s.num_blocks)) for s in self.searchers], k)


# Searcher kinds that need ScaNN (the `[scann]` extra); without it they fall back to "exact".
SCANN_KINDS = ("scann", "sharded_scann")
_scann_fallback_logged = False  # `resolve_kind` logs the fall-back once per process.


def scann_available() -> bool:
  """Whether ScaNN imports (`pip install 'realm-jax[scann]'`; wheels for Linux x86-64 only)."""
  try:
    import scann  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except ImportError:
    return False
  return True


def resolve_kind(kind: str) -> str:
  """The searcher kind to build for `kind`: "exact" in place of a ScaNN kind without ScaNN.

  The fall-back is logged once per process, with the extra that installs ScaNN.

  Args:
    kind: a searcher kind ("scann", "sharded_scann", "exact", ...).

  Returns:
    `kind`, or "exact" when `kind` needs ScaNN and ScaNN is not installed.
  """
  global _scann_fallback_logged
  if kind not in SCANN_KINDS or scann_available():
    return kind
  if not _scann_fallback_logged:
    _scann_fallback_logged = True
    logging.warning("ScaNN is not installed (pip install 'realm-jax[scann]', Linux x86-64): the %r "
                    "searcher falls back to the exact one", kind)
  return "exact"


def searcher_from_snapshot(snapshot: snapshot_lib.Snapshot,
                           kind: str = "scann",
                           mesh: Mesh | None = None,
                           *,
                           use_serialized: bool = True,
                           **kwargs: Any) -> Searcher:
  """Builds — or, for ScaNN, loads from the snapshot — a searcher over a loaded snapshot (REALM §3.4).

  For `kind="scann"` the searcher the index builder serialized into the snapshot (`add_scann_searcher`)
  is loaded when it matches: same `ScannSearcher.resolve_config(num_blocks, dim, **kwargs)`, same
  number of rows, every file's SHA-256 as in the manifest. Otherwise the searcher is built from the
  embeddings: silently (an info log) when the snapshot has none, with exactly ONE warning when the
  serialized one does not fit (other config or row count, a missing or corrupt file, a malformed
  manifest entry, or a ScaNN load error) — never a crash and never a searcher over other rows.
  Without ScaNN installed the ScaNN kinds give the exact searcher (`resolve_kind`; `kwargs`, ScaNN's
  settings, are then unused).

  Args:
    snapshot: the embeddings and block ids (`snapshot.read_snapshot`, ideally `lazy=True`).
    kind: "scann" (`ScannSearcher`), "sharded_scann" (one ScaNN index per snapshot shard) or "exact"
      (`ExactSearcher` on `mesh`).
    mesh: device mesh for "exact" (default: all devices); must be None for the ScaNN kinds.
    use_serialized: for "scann", load the snapshot's serialized searcher when it matches.
    **kwargs: passed to the searcher's constructor.

  Returns:
    The searcher.

  Raises:
    ValueError: on an unknown `kind`, or a mesh given to a host searcher.
  """
  if kind == "exact":
    return ExactSearcher(snapshot.embeddings, snapshot.block_ids, mesh=mesh, **kwargs)
  if kind not in ("scann", "sharded_scann"):
    raise ValueError(f"searcher_from_snapshot: kind must be 'scann', 'sharded_scann' or 'exact', "
                     f"got {kind!r}")
  if mesh is not None:
    raise ValueError(f"searcher_from_snapshot: mesh is only used by kind='exact', not {kind!r}")
  if resolve_kind(kind) == "exact":
    return ExactSearcher(snapshot.embeddings, snapshot.block_ids)
  if kind == "scann":
    if use_serialized:
      loaded = load_scann_searcher(snapshot, **kwargs)
      if loaded is not None:
        return loaded
    return ScannSearcher(snapshot.embeddings, snapshot.block_ids, **kwargs)
  return ShardedScannSearcher([(snapshot.embeddings[a:b], snapshot.block_ids[a:b])
                               for a, b in snapshot.shard_row_ranges], **kwargs)


def load_scann_searcher(snapshot: snapshot_lib.Snapshot, **kwargs: Any) -> ScannSearcher | None:
  """The ScaNN searcher serialized in `snapshot`, if it is the one `kwargs` ask for; else None.

  Local snapshots are loaded in place (files verified, then linked into a temporary directory);
  object-store snapshots (`gs://`, `memory://`) are streamed into a local temporary directory, verified
  and loaded from there (ScaNN reads local files only). The temporary directory is removed afterwards.

  Args:
    snapshot: a snapshot from `read_snapshot` (its `manifest` names the searcher files); all shards.
    **kwargs: the `ScannSearcher` settings the caller wants (`resolve_config`).

  Returns:
    The loaded searcher, or None: with an info log when the snapshot has no serialized searcher (or
    was loaded in part), with ONE warning when it has one that does not fit (the caller rebuilds).

  Raises:
    ValueError: if `kwargs` are not valid `ScannSearcher` settings.
  """
  manifest = snapshot.manifest
  path = snapshot.path
  if manifest is None or snapshot_lib.SEARCHER_FIELD not in manifest:
    logging.info("no serialized searcher in snapshot %s: building ScaNN", path)
    return None
  if snapshot.num_shards != len(snapshot.shard_indices):
    logging.info("snapshot %s loaded in part (shards %s): building ScaNN over those rows", path,
                 list(snapshot.shard_indices))
    return None
  wanted = ScannSearcher.resolve_config(snapshot.num_blocks, snapshot.dim, **kwargs)
  try:
    entry = snapshot_lib.searcher_entry(manifest, path)
    if entry["kind"] != "scann":
      raise snapshot_lib.SnapshotError(f"it is a {entry['kind']!r} searcher")
    if entry["num_rows"] != snapshot.num_blocks or entry["dim"] != snapshot.dim:
      raise snapshot_lib.SnapshotError(
          f"it indexes {entry['num_rows']} x {entry['dim']} rows, the snapshot has "
          f"{snapshot.num_blocks} x {snapshot.dim}")
    if entry["config"] != wanted:
      diff = {k: (entry["config"].get(k), wanted.get(k))
              for k in sorted(set(entry["config"]) | set(wanted))
              if entry["config"].get(k) != wanted.get(k)}
      raise snapshot_lib.SnapshotError(f"it was built for another configuration "
                                       f"(field: (serialized, wanted)) {diff}")
    with scann_tempdir() as local_dir:
      snapshot_lib.fetch_searcher_files(path, entry, local_dir)
      return ScannSearcher.load(local_dir, snapshot.embeddings, snapshot.block_ids, entry["config"],
                                num_threads=kwargs.get("num_threads"))
  except Exception as e:  # noqa: BLE001 - any unusable searcher file means: rebuild, never crash.
    logging.warning("serialized searcher of snapshot %s not used, rebuilding ScaNN: %s", path, e)
    return None


_SCANN_TMP_PREFIX = "realm-scann-"


@contextlib.contextmanager
def scann_tempdir(base: str | None = None):
  """A local temporary directory for ScaNN's serialized files, removed on exit.

  Its name carries the process id (`realm-scann-<pid>-…`). A process killed inside the block (SIGKILL
  leaves no chance to clean up) leaves its directory behind; the next call on the machine removes
  the directories of processes that no longer run, so preemptions do not fill the local disk.

  Args:
    base: the parent directory (default: the system temporary directory).

  Yields:
    The directory's path (str).
  """
  base = base or tempfile.gettempdir()
  for stale in pathlib.Path(base).glob(f"{_SCANN_TMP_PREFIX}*-*"):
    pid = stale.name[len(_SCANN_TMP_PREFIX):].split("-")[0]
    if pid.isdigit() and int(pid) != os.getpid() and not fileio.process_alive(int(pid)):
      shutil.rmtree(stale, ignore_errors=True)  # A local temporary directory (`base`).
  with tempfile.TemporaryDirectory(prefix=f"{_SCANN_TMP_PREFIX}{os.getpid()}-", dir=base) as d:
    yield d


def add_scann_searcher(writer: snapshot_lib.SnapshotWriter,
                       **kwargs: Any) -> ScannSearcher | None:
  """Builds ScaNN over every staged shard of `writer` and uploads it into the snapshot (REALM §3.4).

  The index builder calls it on the committing process after all shards are written and before
  `writer.commit()`, so the snapshot and its searcher become visible together (same commit rules:
  manifest last, every file checksummed). ScaNN serializes to a local temporary directory, whose files
  are then streamed into the snapshot (`SnapshotWriter.add_searcher`); readers load it with
  `searcher_from_snapshot` instead of training ScaNN again.

  Args:
    writer: the snapshot writer whose shards are all written.
    **kwargs: `ScannSearcher` settings (the trainer's must be the same for it to be used).

  Returns:
    The built searcher; None without ScaNN installed (nothing is added: readers fall back to the
    exact searcher, `resolve_kind`).

  Raises:
    SnapshotError: if a shard is missing or corrupt.
    ValueError: on invalid settings or NaN/inf embeddings.
  """
  if resolve_kind("scann") != "scann":
    return None
  import scann  # pylint: disable=g-import-not-at-top

  block_ids, embeddings = writer.staged_arrays()
  searcher = ScannSearcher(embeddings, block_ids, **kwargs)
  with scann_tempdir() as local_dir:
    t0 = time.perf_counter()
    searcher.serialize(local_dir)
    serialize_s = time.perf_counter() - t0
    writer.add_searcher(local_dir, "scann", searcher.config, searcher.num_blocks,
                        info={"scann_version": getattr(scann, "__version__", "unknown"),
                              "build_s": searcher.build_seconds, "serialize_s": serialize_s})
  return searcher


def process_row_range(mesh: Mesh, num_rows: int) -> tuple[int, int]:
  """The rows `[start, stop)` of a `[num_rows, dim]` index that THIS process's devices hold.

  For the row sharding of `sharding.index_sharding(mesh)` (rows split over every device, `data` axis
  outermost). With the devices of each process contiguous in the mesh (what `sharding.make_mesh`
  builds) the range is exactly the process's share; otherwise it covers it. `num_rows` is the padded
  row count (a multiple of the device count; `ExactSearcher.num_rows`).

  Raises:
    ValueError: if the mesh has no device of this process.
  """
  index_map = sharding.index_sharding(mesh).addressable_devices_indices_map((int(num_rows), 1))
  if not index_map:
    raise ValueError("process_row_range: no device of this process in the mesh")
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [num_rows if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  return min(starts), max(stops)


def open_exact_searcher(path: snapshot_lib.PathLike, mesh: Mesh | None = None,
                        validate: bool = True, **kwargs: Any) -> tuple[snapshot_lib.Snapshot,
                                                                       ExactSearcher]:
  """Opens a snapshot lazily and places it on the mesh, each host reading only its own rows (§3.4).

  The pod code path (also one host): `read_snapshot(lazy=True)` gives every host the global view (all
  `[num_blocks]` block ids, `ShardedRows` over all shard files, nothing read); validation streams only
  the shard files overlapping `process_row_range(mesh, …)`; `ExactSearcher` then reads only those rows
  into this host's device buffers, forming one global `jax.Array` over the mesh.

  Args:
    path: a committed snapshot (local or URL).
    mesh: the device mesh (default: all devices of all processes).
    validate: check checksums, finiteness and block-id uniqueness of this host's share.
    **kwargs: passed to `ExactSearcher`.

  Returns:
    (the lazy `Snapshot`, the `ExactSearcher`).

  Raises:
    SnapshotError: if the snapshot (this host's share) is missing, malformed or corrupt.
  """
  mesh = sharding.make_mesh() if mesh is None else mesh
  manifest = snapshot_lib.read_manifest(path)
  num_shards = math.prod(mesh.shape[a] for a in sharding.INDEX_AXES)
  num_rows = -(-manifest["num_blocks"] // num_shards) * num_shards
  rows = process_row_range(mesh, num_rows)
  snap = snapshot_lib.read_snapshot(path, validate=validate, lazy=True, validate_rows=rows)
  return snap, ExactSearcher(snap.embeddings, snap.block_ids, mesh=mesh, **kwargs)
