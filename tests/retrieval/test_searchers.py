"""Tests for realm_jax/retrieval/searchers.py on 8 simulated CPU devices (see tests/conftest.py).

The reference everywhere is numpy brute force: `queries @ embeddings.T`, sorted.
"""

from __future__ import annotations

import pathlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax.retrieval import searchers
from realm_jax.retrieval import snapshot as snap
from realm_jax import sharding


def _index(n, dim, seed=0):
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(n, dim)).astype(np.float32)
  ids = rng.permutation(5 * n)[:n].astype(np.int64) + 1000
  return emb, ids


def _clustered(n, dim, num_clusters, seed):
  """Gaussian mixture: unit-norm centres + noise of norm ~0.5 (embeddings of similar documents)."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_clusters, dim))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  points = centres[rng.integers(num_clusters, size=n)] + rng.normal(size=(n, dim)) * 0.5 / np.sqrt(dim)
  return points.astype(np.float32)


def _assert_top_k(scores, ids, queries, emb, all_ids, k):
  """Checks results against numpy brute force, allowing only swaps between (near-)tied scores."""
  full = queries.astype(np.float64) @ emb.T.astype(np.float64)
  assert scores.shape == ids.shape == (queries.shape[0], k)
  assert scores.dtype == np.float32 and ids.dtype == np.int64
  expected = -np.sort(-full, axis=1)[:, :k]
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
  row_of = {int(b): r for r, b in enumerate(all_ids)}
  rows = np.vectorize(row_of.__getitem__)(ids)
  np.testing.assert_allclose(scores, np.take_along_axis(full, rows, axis=1), rtol=1e-5, atol=1e-5)
  assert all(len(set(r)) == k for r in ids.tolist())
  assert np.all(np.diff(scores, axis=1) <= 0)


def _recall(ids, exact_ids):
  return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids.tolist(), exact_ids.tolist())])


@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2)])
def test_exact_searcher_matches_numpy_uneven_rows(mesh_shape):
  emb, ids = _index(1003, 16)  # 1003 rows on 8 devices: 126 per shard, 5 padded rows.
  searcher = searchers.ExactSearcher(emb, ids, mesh=sharding.make_mesh(mesh_shape))
  assert searcher.num_rows == 1008 and searcher.index_valid_mask is not None
  assert searcher.index_embeddings.sharding.spec == sharding.index_sharding(searcher.mesh).spec
  queries = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
  for k in (1, 10, 200, 1003):  # 200 > 126 rows per shard; 1003 = every row, none padded.
    scores, got = searcher.search(queries, k)
    _assert_top_k(scores, got, queries, emb, ids, k)
  assert set(searcher.search(queries, 1003)[1][0].tolist()) == set(ids.tolist())


def test_padded_rows_never_returned_even_when_they_would_win():
  # Queries anti-aligned with every row: all real scores are negative, padded zero rows would score 0.
  emb = np.abs(np.random.default_rng(2).normal(size=(9, 4))).astype(np.float32) + 0.1
  ids = np.arange(9) * 3
  searcher = searchers.ExactSearcher(emb, ids, mesh=sharding.make_mesh())
  assert searcher.num_rows == 16
  queries = -np.ones((2, 4), np.float32)
  scores, got = searcher.search(queries, 9)
  assert np.all(scores < 0)
  _assert_top_k(scores, got, queries, emb, ids, 9)


def test_approx_max_k_path_is_exact_on_cpu():
  emb, ids = _index(301, 8, seed=3)
  queries = np.random.default_rng(4).normal(size=(3, 8)).astype(np.float32)
  exact = searchers.ExactSearcher(emb, ids)
  approx = searchers.ExactSearcher(emb, ids, approximate=True, recall_target=0.9)
  for k in (7, 64):
    scores, got = approx.search(queries, k)
    _assert_top_k(scores, got, queries, emb, ids, k)
    np.testing.assert_array_equal(got, exact.search(queries, k)[1])


def test_sharded_top_k_inside_outer_jit_with_batch_sharded_queries():
  mesh = sharding.make_mesh((4, 2))
  emb, _ = _index(64, 8, seed=5)
  rng = np.random.default_rng(6)
  tokens = rng.normal(size=(8, 12)).astype(np.float32)
  projection = rng.normal(size=(12, 8)).astype(np.float32)
  index = jax.device_put(emb, sharding.index_sharding(mesh))
  mask_np = np.ones(64, bool)
  mask_np[[3, 17, 40]] = False  # Removed documents.
  mask = jax.device_put(mask_np, jax.sharding.NamedSharding(mesh, jax.P(sharding.INDEX_AXES)))
  batch = jax.device_put(tokens, sharding.batch_sharding(mesh))

  @jax.jit
  def step(batch, index, mask):
    queries = batch @ projection  # [8, 8], sharded over `data` like a train-step batch.
    scores, rows = searchers.sharded_top_k(queries, index, 20, mesh, mask)
    # Use the rows on device: re-score the retrieved documents (as the REALM step re-embeds them).
    retrieved = index[rows]  # [8, 20, 8]
    return scores, rows, jnp.einsum("bd,bkd->bk", queries, retrieved)

  scores, rows, rescored = step(batch, index, mask)
  queries = tokens @ projection
  full = queries @ emb.T
  full[:, ~mask_np] = -np.inf
  np.testing.assert_allclose(np.asarray(scores), -np.sort(-full, axis=1)[:, :20], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(rescored), np.asarray(scores), rtol=1e-5, atol=1e-5)
  assert not np.isin(np.asarray(rows), [3, 17, 40]).any()
  assert rows.dtype == jnp.int32
  with pytest.raises(ValueError, match="not a multiple of the 8 index shards"):
    searchers.sharded_top_k(queries, emb[:63], 5, mesh)


def test_exact_searcher_accepts_device_queries():
  emb, ids = _index(50, 8, seed=7)
  searcher = searchers.ExactSearcher(emb, ids)
  queries = np.random.default_rng(8).normal(size=(8, 8)).astype(np.float32)
  on_device = jax.device_put(queries, sharding.batch_sharding(searcher.mesh))
  np.testing.assert_array_equal(searcher.search(on_device, 5)[1], searcher.search(queries, 5)[1])


def test_scann_recall_on_clustered_vectors():
  emb = _clustered(5000, 32, num_clusters=50, seed=9)
  ids = np.arange(5000, dtype=np.int64) * 2
  searcher = searchers.ScannSearcher(emb, ids, brute_force_below=0)
  assert searcher.mode == "tree_ah"
  assert (searcher.num_leaves, searcher.num_leaves_to_search) == (50, 5)  # 100k sample cap: sqrt.
  queries = _clustered(200, 32, num_clusters=50, seed=9)  # Same centres (same seed), fresh noise.
  queries = queries + np.random.default_rng(10).normal(size=queries.shape).astype(np.float32) * 0.01
  scores, got = searcher.search(queries, 10)
  exact_scores, exact_ids = searchers.ExactSearcher(emb, ids).search(queries, 10)
  assert _recall(got, exact_ids) >= 0.9
  # Scores are exact inner products of the returned blocks (after ScaNN's reordering), sorted.
  np.testing.assert_allclose(scores, np.einsum("bd,bkd->bk", queries, emb[got // 2]), rtol=1e-4,
                             atol=1e-4)
  assert np.all(np.diff(scores, axis=1) <= 0) and np.all(scores[:, 0] <= exact_scores[:, 0] + 1e-5)


def test_scann_search_settings_change_recall_without_a_rebuild():
  """Searching one leaf of 50 misses most neighbours; every leaf with enough reordering is exact.
  The same built index serves both (no rebuild), and `config` records the settings in use."""
  emb = _clustered(5000, 32, num_clusters=50, seed=21)
  ids = np.arange(5000, dtype=np.int64)
  searcher = searchers.ScannSearcher(emb, ids, brute_force_below=0, num_leaves_to_search=1,
                                     reorder_k=10)
  queries = np.random.default_rng(22).normal(size=(100, 32)).astype(np.float32)
  exact_ids = searchers.ExactSearcher(emb, ids).search(queries, 10)[1]
  narrow = _recall(searcher.search(queries, 10)[1], exact_ids)
  index = searcher._searcher  # pylint: disable=protected-access
  searcher.set_search_settings(num_leaves_to_search=50, reorder_k=5000)
  assert searcher._searcher is index  # pylint: disable=protected-access
  scores, got = searcher.search(queries, 10)
  _assert_top_k(scores, got, queries, emb, ids, 10)
  assert narrow < 0.8, narrow  # Random queries: their neighbours lie in many leaves (0.51 seen).
  assert (searcher.config["num_leaves_to_search"], searcher.config["reorder_k"]) == (50, 5000)
  with pytest.raises(ValueError, match="num_leaves_to_search=51"):
    searcher.set_search_settings(num_leaves_to_search=51)
  with pytest.raises(ValueError, match="reorder_k must be >= 1"):
    searcher.set_search_settings(reorder_k=0)
  with pytest.raises(ValueError, match="brute-force index has no leaves"):
    searchers.ScannSearcher(emb[:100], ids[:100]).set_search_settings(num_leaves_to_search=1)


def test_scann_k_larger_than_searched_leaves_falls_back_to_exact():
  emb, ids = _index(3000, 16, seed=11)
  searcher = searchers.ScannSearcher(emb, ids, brute_force_below=0, num_leaves=30,
                                     num_leaves_to_search=1, training_sample_size=3000)
  queries = np.random.default_rng(12).normal(size=(4, 16)).astype(np.float32)
  scores, got = searcher.search(queries, 2500)  # One leaf holds ~100 rows: ScaNN pads with NaN.
  _assert_top_k(scores, got, queries, emb, ids, 2500)


def test_scann_brute_force_for_tiny_corpus_is_exact():
  emb, ids = _index(300, 8, seed=13)
  searcher = searchers.ScannSearcher(emb, ids)
  assert searcher.mode == "brute_force"
  queries = np.random.default_rng(14).normal(size=(6, 8)).astype(np.float32)
  scores, got = searcher.search(jnp.asarray(queries), 300)
  _assert_top_k(scores, got, queries, emb, ids, 300)


def test_scann_concurrent_searches_agree():
  emb = _clustered(4000, 16, num_clusters=20, seed=15)
  searcher = searchers.ScannSearcher(emb, np.arange(4000), brute_force_below=0)
  queries = [np.random.default_rng(s).normal(size=(64, 16)).astype(np.float32) for s in range(4)]
  expected = [searcher.search(q, 10) for q in queries]
  results = [None] * 4

  def run(i):
    results[i] = searcher.search(queries[i], 10)

  threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for (s, i), (es, ei) in zip(results, expected):
    np.testing.assert_array_equal(i, ei)
    np.testing.assert_array_equal(s, es)


def test_merge_top_k_matches_full_sort():
  rng = np.random.default_rng(16)
  parts = []
  for size in (7, 3, 12):
    scores = -np.sort(-rng.normal(size=(4, size)).astype(np.float32), axis=1)
    parts.append((scores, rng.integers(0, 10**6, size=(4, size))))
  parts[1][0][2, 2] = np.nan  # ScaNN padding ranks last.
  scores, ids = searchers.merge_top_k(parts, 15)
  all_scores = np.concatenate([p[0] for p in parts], axis=1)
  all_scores = np.where(np.isnan(all_scores), -np.inf, all_scores)
  all_ids = np.concatenate([p[1] for p in parts], axis=1)
  order = np.argsort(-all_scores, axis=1)[:, :15]
  np.testing.assert_array_equal(scores, np.take_along_axis(all_scores, order, axis=1))
  np.testing.assert_array_equal(ids, np.take_along_axis(all_ids, order, axis=1))
  with pytest.raises(ValueError, match=r"k=23 must be in \[1, num_blocks=22\]"):
    searchers.merge_top_k(parts, 23)
  with pytest.raises(ValueError, match="result 1 has scores"):
    searchers.merge_top_k([parts[0], (parts[1][0][:2], parts[1][1][:2])], 3)
  with pytest.raises(ValueError, match="no results"):
    searchers.merge_top_k([], 3)


def test_sharded_scann_matches_single_exact_searcher():
  emb, ids = _index(900, 8, seed=17)
  shards = [(emb[:400], ids[:400]), (emb[400:401], ids[400:401]), (emb[401:], ids[401:])]
  sharded = searchers.ShardedScannSearcher(shards)  # Tiny shards: brute force, so exact.
  queries = np.random.default_rng(18).normal(size=(5, 8)).astype(np.float32)
  for k in (3, 450):
    scores, got = sharded.search(queries, k)
    _assert_top_k(scores, got, queries, emb, ids, k)
    np.testing.assert_array_equal(got, searchers.ExactSearcher(emb, ids).search(queries, k)[1])
  with pytest.raises(ValueError, match="repeats block id"):
    searchers.ShardedScannSearcher([(emb[:10], ids[:10]), (emb[10:20], ids[5:15])])


@pytest.mark.parametrize("kind", ["exact", "scann", "sharded_scann"])
def test_searcher_from_snapshot(tmp_path, kind):
  emb, ids = _index(120, 8, seed=19)
  path = snap.write_snapshot(tmp_path, 1, ids, emb, "fp", num_shards=3)
  searcher = searchers.searcher_from_snapshot(snap.read_snapshot(path, mmap=True), kind)
  queries = np.random.default_rng(20).normal(size=(3, 8)).astype(np.float32)
  scores, got = searcher.search(queries, 10)
  _assert_top_k(scores, got, queries, emb, ids, 10)


def test_bad_arguments_raise():
  emb, ids = _index(20, 8, seed=21)
  exact = searchers.ExactSearcher(emb, ids)
  scann = searchers.ScannSearcher(emb, ids)
  q = np.zeros((2, 8), np.float32)
  for s in (exact, scann):
    with pytest.raises(ValueError, match=r"k=21 must be in \[1, num_blocks=20\]"):
      s.search(q, 21)
    with pytest.raises(ValueError, match=r"k=0 must be in"):
      s.search(q, 0)
    with pytest.raises(ValueError, match=r"query_embeddings must have shape \[batch, 8\], got \(2, 7\)"):
      s.search(q[:, :7], 5)
    with pytest.raises(ValueError, match=r"got \(8,\)"):
      s.search(q[0], 5)
    with pytest.raises(ValueError, match="NaN or inf"):
      s.search(np.full((1, 8), np.nan, np.float32), 5)
  dup = ids.copy()
  dup[0] = dup[1]
  bad = emb.copy()
  bad[3, 3] = np.inf
  for cls in (searchers.ExactSearcher, searchers.ScannSearcher):
    with pytest.raises(ValueError, match="repeats block id"):
      cls(emb, dup)
    with pytest.raises(ValueError, match="non-finite value"):
      cls(bad, ids)
    with pytest.raises(ValueError, match=r"block_ids must be \[20\]"):
      cls(emb, ids[:5])
  with pytest.raises(ValueError, match="kind must be"):
    searchers.searcher_from_snapshot(snap.Snapshot(pathlib.Path("x"), 0, "fp", ids, emb), "faiss")
  with pytest.raises(ValueError, match="mesh is only used"):
    searchers.searcher_from_snapshot(snap.Snapshot(pathlib.Path("x"), 0, "fp", ids, emb), "scann",
                                     mesh=exact.mesh)
