"""The MIPS index at paper scale: snapshot write / validate / load and searcher build / query, with RSS.

REALM (Guu et al., 2020, §3.4) searches 13.35M Wikipedia blocks of 128-d float32 embeddings (6.8 GB).
This script runs the real code on random embeddings of that size (or `--num_blocks`), stage by stage,
and reports the wall time and the peak resident set (RSS) of each stage:

  write      `SnapshotWriter`: shard by shard (one shard of random rows in memory at a time), commit
             (every file re-hashed, manifest last, rename)
  scann      (`--scann`) `searchers.add_scann_searcher`: the index builder's path — ScaNN built over
             the staged shards (trained on `--scann_training_sample` rows), serialized to a local
             temporary directory and uploaded into the snapshot before the commit
  validate   `read_snapshot(lazy=True, validate=True)`: manifest, block ids, every embeddings file
             streamed once (SHA-256 + finiteness); rows stay in the files (`ShardedRows`)
  exact      `ExactSearcher` on 8 simulated CPU devices: the row-sharded device array is built device
             shard by device shard (`jax.make_array_from_callback`, rows read straight into each buffer)
  query      `ExactSearcher.search`, `--queries` queries, k=10 (first call compiles; then timed)
  scann_load (`--scann`) `searcher_from_snapshot`: the serialized searcher, verified and loaded
  scann_query  recall@10 against the exact top-10, and queries/s

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python benchmarks/searcher_scale.py \
        --num_blocks 1000000 --scann --json /tmp/searcher_scale_1m.json

Peak RSS per stage is sampled (psutil, every 20 ms) from the stage's start; `ru_maxrss` is the
process's peak so far. The exact searcher is freed before the ScaNN searcher is loaded (only the
exact top-10 of the queries is kept), as a trainer would hold one index or the other.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from realm_jax.retrieval import searchers  # noqa: E402
from realm_jax.retrieval import snapshot as snap  # noqa: E402
from realm_jax import sharding  # noqa: E402

GIB = 1 << 30


class RssSampler:
  """Samples this process's RSS every `interval_s` seconds in a thread; `peak` since the last reset."""

  def __init__(self, interval_s: float = 0.02):
    self._proc = psutil.Process()
    self._interval = interval_s
    self._peak = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, daemon=True)
    self._thread.start()

  def _loop(self) -> None:
    while not self._stop.is_set():
      self._peak = max(self._peak, self._proc.memory_info().rss)
      time.sleep(self._interval)

  def reset(self) -> None:
    """Starts a new stage: the peak restarts from the current RSS."""
    self._peak = self._proc.memory_info().rss

  @property
  def peak(self) -> int:
    """Peak RSS in bytes since `reset`."""
    return max(self._peak, self._proc.memory_info().rss)

  def close(self) -> None:
    """Stops the sampling thread."""
    self._stop.set()


def _ru_maxrss() -> int:
  """The process's peak RSS so far in bytes (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Stages:
  """Times stages and records their peak RSS (`[(name, seconds, peak_rss, rss_after, note)]`)."""

  def __init__(self):
    self.sampler = RssSampler()
    self.rows: list[dict] = []

  def run(self, name: str, fn, note: str = ""):
    """Runs `fn()` as stage `name`; returns its result."""
    gc.collect()
    self.sampler.reset()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    row = {"stage": name, "seconds": seconds, "peak_rss_gib": self.sampler.peak / GIB,
           "rss_after_gib": psutil.Process().memory_info().rss / GIB,
           "ru_maxrss_gib": _ru_maxrss() / GIB, "note": note}
    self.rows.append(row)
    logging.warning("stage %-12s %8.1f s  peak RSS %.2f GiB  (after %.2f GiB)  %s", name, seconds,
                    row["peak_rss_gib"], row["rss_after_gib"], note)
    return result


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
  """Mean |found ∩ exact| / k over queries (`[q, k]` id arrays)."""
  return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def main(argv=None) -> dict:
  """Runs the stages and prints the Markdown table; returns the JSON record."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_blocks", type=int, default=13_350_000)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--rows_per_shard", type=int, default=1 << 18,
                      help="snapshot shard size (the index builder's blocks_per_shard)")
  parser.add_argument("--queries", type=int, default=256)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--scann", action="store_true", help="also build/serialize/load ScaNN")
  parser.add_argument("--scann_training_sample", type=int, default=100_000)
  parser.add_argument("--workdir", default="", help="where the snapshot goes (default: a temp dir)")
  parser.add_argument("--keep", action="store_true", help="keep the snapshot afterwards")
  parser.add_argument("--json", default="", help="write the record here")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")

  n, dim = args.num_blocks, args.dim
  workdir = args.workdir or tempfile.mkdtemp(prefix="searcher-scale-")
  root = os.path.join(workdir, "snapshots")
  stages = Stages()
  num_shards = -(-n // args.rows_per_shard)
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(args.queries, dim)).astype(np.float32)
  scann_kwargs = {"training_sample_size": args.scann_training_sample}
  record = {"num_blocks": n, "dim": dim, "bytes": n * dim * 4, "num_shards": num_shards,
            "devices": jax.device_count(), "cpus": os.cpu_count(),
            "total_memory_gib": psutil.virtual_memory().total / GIB, "queries": args.queries,
            "k": args.k}

  writer = snap.SnapshotWriter(root, 1, num_shards, "random-embeddings", dim)

  def write_shards():
    for shard in range(num_shards):
      lo, hi = shard * args.rows_per_shard, min(n, (shard + 1) * args.rows_per_shard)
      shard_rng = np.random.default_rng(1000 + shard)
      writer.write_shard(shard, np.arange(lo, hi, dtype=np.int64),
                         shard_rng.standard_normal((hi - lo, dim), dtype=np.float32))

  stages.run("write", write_shards, f"{num_shards} shards of <= {args.rows_per_shard} rows")
  built = None
  if args.scann:
    built = stages.run("scann_build", lambda: searchers.add_scann_searcher(writer, **scann_kwargs),
                       f"train sample {args.scann_training_sample}; build + serialize + upload")
    record["scann_config"] = built.config
    record["scann_build_s"] = built.build_seconds
    built_ids = built.search(queries, args.k)[1]
    del built
    gc.collect()
  path = stages.run("commit", writer.commit, "every shard re-hashed, manifest, rename")
  record["snapshot_bytes_on_disk"] = sum(
      os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))

  snapshot = stages.run("validate", lambda: snap.read_snapshot(path, validate=True, lazy=True),
                        "lazy: sha256 + finiteness streamed, rows stay in files")
  mesh = sharding.make_mesh()
  exact = stages.run("exact_build",
                     lambda: searchers.ExactSearcher(snapshot.embeddings, snapshot.block_ids, mesh),
                     f"{jax.device_count()} devices, make_array_from_callback")
  stages.run("exact_compile", lambda: exact.search(queries, args.k), "first search (jit compile)")
  scores, exact_ids = stages.run("exact_query", lambda: exact.search(queries, args.k),
                                 f"{args.queries} queries, k={args.k}")
  record["exact_qps"] = args.queries / stages.rows[-1]["seconds"]
  del exact, scores
  gc.collect()

  if args.scann:
    loaded = stages.run("scann_load",
                        lambda: searchers.searcher_from_snapshot(snapshot, "scann", **scann_kwargs),
                        "checksums verified, load_searcher")
    assert loaded.loaded, "the serialized searcher was not used"
    loaded.search(queries[:8], args.k)
    found = stages.run("scann_query", lambda: loaded.search(queries, args.k)[1],
                       f"{args.queries} queries, k={args.k}")
    record["scann_qps"] = args.queries / stages.rows[-1]["seconds"]
    record["scann_recall_at_k"] = _recall(found, exact_ids)
    record["scann_loaded_equals_built"] = float(np.mean(found == built_ids))
    del loaded
  stages.sampler.close()
  record["stages"] = stages.rows
  record["peak_rss_gib"] = _ru_maxrss() / GIB
  if not args.keep and not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)

  print(f"\n{n:,} x {dim} float32 ({n * dim * 4 / GIB:.2f} GiB), {num_shards} shards, "
        f"{jax.device_count()} CPU devices, {os.cpu_count()} cores\n")
  print("| stage | wall (s) | peak RSS in stage (GiB) | RSS after (GiB) | notes |")
  print("|---|---|---|---|---|")
  for row in stages.rows:
    print(f"| {row['stage']} | {row['seconds']:.1f} | {row['peak_rss_gib']:.2f} | "
          f"{row['rss_after_gib']:.2f} | {row['note']} |")
  print(f"\nprocess peak RSS (ru_maxrss): {record['peak_rss_gib']:.2f} GiB; exact search "
        f"{record['exact_qps']:.1f} queries/s")
  if args.scann:
    print(f"ScaNN: recall@{args.k} vs exact {record['scann_recall_at_k']:.3f}, "
          f"{record['scann_qps']:.0f} queries/s, loaded == built on "
          f"{100 * record['scann_loaded_equals_built']:.1f}% of results; config "
          f"{json.dumps(record['scann_config'])}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(record, f, indent=2)
  return record


if __name__ == "__main__":
  main(sys.argv[1:])
