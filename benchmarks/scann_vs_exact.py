"""ScaNN vs the exact sharded searcher: build time, queries per second, recall@k (REALM §3.4, "MIPS").

Data: `N` rows of 128-d float32 from a Gaussian mixture (`--data clustered`, default: sqrt(N) unit-norm
centres, rows = centre + isotropic noise of expected norm `--noise`, not normalised — like document
embeddings of topical clusters) or i.i.d. standard Gaussian rows (`--data gaussian`, the hardest case
for partitioning). Queries: half are fresh draws from the same distribution ("random"), half are a
random row plus noise of 10% of its norm ("near-dup", e.g. a question paraphrasing a passage).

Recall@k of ScaNN is measured against exact search (numpy float32 matmul + argpartition, the peer of
issue #12 target 6) on the same queries. ScaNN settings are swept (`SWEEP`: leaves searched, AH
candidates reordered) from the default until recall@k reaches `--target_recall` (0.95), so the table
says what a recall of 0.95 costs and how much faster than exact search that still is. The exact searcher
runs on this machine's CPU as 1 XLA device and as 8 simulated devices (`--xla_force_host_platform_
device_count=8`, set here before JAX is imported; the 8 "devices" share the same CPU cores, so this
measures the sharding overhead, not a speed-up).

Run:
  .venv/bin/python benchmarks/scann_vs_exact.py                 # N = 20k and 1M, ~3-4 min on 2 cores
  .venv/bin/python benchmarks/scann_vs_exact.py --quick         # N = 5k and 20k, ~20 s
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from realm_jax.retrieval import searchers  # noqa: E402
from realm_jax import sharding  # noqa: E402


def make_data(n: int, dim: int, kind: str, noise: float,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Returns (`[n, dim]` float32 rows, `[num_centres, dim]` float32 unit centres, `[n]` int labels).

  For `kind="gaussian"` there are no centres (`[0, dim]`) and all labels are 0.
  """
  if kind == "gaussian":
    return rng.standard_normal((n, dim), np.float32), np.zeros((0, dim), np.float32), np.zeros(n, int)
  num_centres = max(1, int(round(np.sqrt(n))))
  centres = rng.standard_normal((num_centres, dim), np.float32)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  labels = rng.integers(num_centres, size=n)
  rows = np.empty((n, dim), np.float32)
  for start in range(0, n, 1 << 20):  # In chunks (same random stream): no [n, dim] temporaries.
    stop = min(n, start + (1 << 20))
    noise_rows = rng.standard_normal((stop - start, dim), np.float32)
    rows[start:stop] = centres[labels[start:stop]] + noise_rows * (noise / np.sqrt(dim))
  return rows, centres, labels


def make_queries(rows: np.ndarray, centres: np.ndarray, num_queries: int, kind: str, noise: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Half fresh draws ("random"), half near-duplicates of rows; returns (queries, is_near_dup)."""
  n, dim = rows.shape
  num_random = num_queries // 2
  if kind == "gaussian":
    fresh = rng.standard_normal((num_random, dim), np.float32)
  else:
    fresh = (centres[rng.integers(len(centres), size=num_random)] +
             rng.standard_normal((num_random, dim), np.float32) * (noise / np.sqrt(dim)))
  base = rows[rng.integers(n, size=num_queries - num_random)]
  near = base + rng.standard_normal(base.shape, np.float32) * (
      0.1 * np.linalg.norm(base, axis=1, keepdims=True) / np.sqrt(dim))
  queries = np.concatenate([fresh, near]).astype(np.float32)
  return queries, np.arange(num_queries) >= num_random


def timed_search(searcher, queries: np.ndarray, k: int, batch: int) -> tuple[np.ndarray, float]:
  """Searches in batches of `batch` (after one warm-up batch); returns (ids, queries per second)."""
  searcher.search(queries[:batch], k)  # Compile / warm caches.
  start = time.perf_counter()
  ids = [searcher.search(queries[i:i + batch], k)[1] for i in range(0, len(queries), batch)]
  elapsed = time.perf_counter() - start
  return np.concatenate(ids), len(queries) / elapsed


def recall(ids: np.ndarray, exact_ids: np.ndarray) -> float:
  """Mean over queries of |retrieved ∩ exact| / k."""
  return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids.tolist(),
                                                                     exact_ids.tolist())]))


class NumpyExact:
  """The peer of the exact searcher: numpy float32 matmul + `argpartition` + a sort of the top k."""

  def __init__(self, embeddings: np.ndarray):
    self.embeddings = embeddings

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ self.embeddings.T  # [q, n] float32
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1)
    return np.take_along_axis(top_scores, order, axis=1), np.take_along_axis(top, order, axis=1)


# ScaNN settings tried, cheapest first, until recall@k reaches --target_recall: (fraction of the
# leaves searched, AH candidates reordered exactly). The first is the searcher's default (ORQA's).
SWEEP = ((0.1, 100), (0.1, 300), (0.2, 300), (0.3, 1000), (0.5, 2000))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="20000,1000000", help="comma-separated corpus sizes N")
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--num_queries", type=int, default=1000)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--data", choices=("clustered", "gaussian"), default="clustered")
  parser.add_argument("--noise", type=float, default=0.5,
                      help="norm of the noise around a centre (clustered data)")
  parser.add_argument("--devices", default="1,8", help="device counts for the exact searcher")
  parser.add_argument("--exact_batch", type=int, default=100,
                      help="queries per exact search call (numpy and the sharded searcher)")
  parser.add_argument("--scann_batch", type=int, default=1000, help="queries per ScaNN call")
  parser.add_argument("--target_recall", type=float, default=0.95,
                      help="ScaNN settings are swept (SWEEP) until recall@k reaches this")
  parser.add_argument("--quick", action="store_true", help="N = 5k, 20k and 200 queries")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  sizes = [5000, 20000] if args.quick else [int(s) for s in args.sizes.split(",")]
  num_queries = 200 if args.quick else args.num_queries
  device_counts = [int(d) for d in args.devices.split(",")]
  if max(device_counts) > jax.device_count():
    sys.exit(f"--devices {args.devices}: only {jax.device_count()} devices")
  meshes = {d: sharding.make_mesh(devices=jax.devices()[:d]) for d in device_counts}

  print(f"# ScaNN vs exact MIPS: {args.data} data, dim {args.dim}, {num_queries} queries "
        f"(half random, half near-duplicate), k={args.k}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}")
  header = (["N", "numpy QPS"] + [f"exact QPS ({d} dev)" for d in device_counts] +
            [f"exact {d} dev / numpy" for d in device_counts] +
            ["scann index", "build s", "scann QPS", f"recall@{args.k}", "recall random",
             "recall near-dup", "scann / best exact"])
  rows = []
  for n in sizes:
    rng = np.random.default_rng(args.seed)
    emb, centres, _ = make_data(n, args.dim, args.data, args.noise, rng)
    queries, near_dup = make_queries(emb, centres, num_queries, args.data, args.noise, rng)
    block_ids = np.arange(n, dtype=np.int64)
    # A [batch, N] float32 score matrix (and numpy's negated copy) kept under ~1 GiB each.
    exact_batch = max(1, min(args.exact_batch, 2**28 // n))
    exact_ids, numpy_qps = timed_search(NumpyExact(emb), queries, args.k, exact_batch)
    exact_qps = {}
    for d, mesh in meshes.items():
      exact = searchers.ExactSearcher(emb, block_ids, mesh=mesh)
      ids, exact_qps[d] = timed_search(exact, queries, args.k, exact_batch)
      agree = recall(ids, exact_ids)
      if agree < 0.999:  # Ties aside, both are exact.
        print(f"  warning: exact searcher ({d} dev) agrees with numpy on {agree:.4f} of top-k",
              file=sys.stderr)
      del exact
    best_exact = max(numpy_qps, *exact_qps.values())
    tried = [(None, None)] if n < 10_000 else [
        (max(1, int(np.ceil(frac * searchers.ScannSearcher.resolve_config(n, args.dim)[
            "num_leaves"]))), reorder) for frac, reorder in SWEEP]
    scann = None
    for to_search, reorder in tried:
      if scann is None:  # One build per N; the sweep changes only query-time settings.
        scann = searchers.ScannSearcher(emb, block_ids, num_leaves_to_search=to_search,
                                        reorder_k=reorder)
      else:
        scann.set_search_settings(num_leaves_to_search=to_search, reorder_k=reorder)
      scann_ids, scann_qps = timed_search(scann, queries, args.k, args.scann_batch)
      config = (f"{scann.mode} {scann.num_leaves}/{scann.num_leaves_to_search} r{scann.reorder_k}"
                if scann.mode == "tree_ah" else scann.mode)
      r = recall(scann_ids, exact_ids)
      rows.append([f"{n:,}", f"{numpy_qps:,.0f}"] + [f"{exact_qps[d]:,.0f}" for d in device_counts] +
                  [f"{exact_qps[d] / numpy_qps:.2f}x" for d in device_counts] +
                  [config, f"{scann.build_seconds:.1f}", f"{scann_qps:,.0f}", f"{r:.3f}",
                   f"{recall(scann_ids[~near_dup], exact_ids[~near_dup]):.3f}",
                   f"{recall(scann_ids[near_dup], exact_ids[near_dup]):.3f}",
                   f"{scann_qps / best_exact:.1f}x"])
      print(f"  N = {n:,}: {config}: recall@{args.k} {r:.3f}, {scann_qps:,.0f} q/s", file=sys.stderr,
            flush=True)
      if r >= args.target_recall:
        break
    del emb, scann
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
  print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for r in rows:
    print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
  print("scann index = mode leaves/searched r<reorder candidates> (one build per N: 'build s'; the "
        "sweep changes only query-time settings); QPS = queries per second "
        f"(exact and numpy in batches of min({args.exact_batch}, 2^28 / N), ScaNN in batches of "
        f"{args.scann_batch}); rows of one N: the ScaNN settings tried (SWEEP) until recall@"
        f"{args.k} >= {args.target_recall}; recall is against numpy's exact top-{args.k}; "
        "scann / best exact = ScaNN QPS over the fastest exact search (numpy or sharded).")


if __name__ == "__main__":
  main()
