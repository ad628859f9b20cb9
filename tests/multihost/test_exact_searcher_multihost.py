"""The exact sharded searcher over 2 local JAX processes x 4 devices (and 4 x 2) matches numpy brute
force.

How each host holds its shard on a pod (REALM §3.4, exact MIPS on device): every process opens the
same snapshot lazily (`read_snapshot(lazy=True)`: all block ids, no rows) and builds the index with
`jax.make_array_from_callback`, which calls back only for the process's own devices; so each process
validates and reads only its rows (`process_row_range`) and together they form one global `jax.Array`
over the 8-device mesh. The same code runs in one process with 8 devices.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from realm_jax.retrieval import snapshot as snap

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
K = 7


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run(snapshot_path, queries_path, num_processes, local_devices):
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, str(HERE / "exact_searcher_worker.py"),
                             str(snapshot_path), str(queries_path), str(i), str(num_processes),
                             port, str(local_devices), str(K)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(num_processes)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=300)
      outs.append((p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results = []
  for code, out, err in outs:
    assert code == 0, err[-3000:]
    results.append(json.loads([l for l in out.splitlines() if l.startswith("{")][-1]))
  return results


@pytest.mark.multiprocess
def test_exact_searcher_two_processes_match_numpy_and_each_reads_its_own_rows(tmp_path):
  rng = np.random.default_rng(3)
  n, dim = 203, 16  # Padded to 208 rows over 8 devices: 26 per device, 104 per process.
  emb = rng.normal(size=(n, dim)).astype(np.float32)
  ids = (rng.permutation(10 * n)[:n] + 5).astype(np.int64)
  queries = rng.normal(size=(5, dim)).astype(np.float32)
  path = snap.write_snapshot(tmp_path / "snapshots", 4, ids, emb, "fp-multihost", num_shards=6)
  np.save(tmp_path / "queries.npy", queries)
  exact = queries @ emb.T
  order = np.argsort(-exact, axis=1, kind="stable")[:, :K]

  single = _run(path, tmp_path / "queries.npy", 1, 8)
  double = _run(path, tmp_path / "queries.npy", 2, 4)
  assert single[0]["devices"] == 8 and single[0]["rows_read"] == n
  assert [r["process"] for r in double] == [0, 1]
  for r in double:
    assert r["processes"] == 2 and r["devices"] == 8 and r["local_devices"] == 4
  # Each process read (and validated) only the rows of its own 4 devices.
  assert double[0]["row_range"] == [0, 104] and double[1]["row_range"] == [104, 208]
  assert double[0]["rows_read"] == 104 and double[1]["rows_read"] == n - 104
  # 4 processes x 2 devices: 52 rows per process; the last one holds the 3 padding rows.
  quad = _run(path, tmp_path / "queries.npy", 4, 2)
  assert [r["process"] for r in quad] == [0, 1, 2, 3]
  assert all(r["processes"] == 4 and r["devices"] == 8 and r["local_devices"] == 2 for r in quad)
  assert [r["row_range"] for r in quad] == [[0, 52], [52, 104], [104, 156], [156, 208]]
  assert [r["rows_read"] for r in quad] == [52, 52, 52, n - 156]
  # Per-host retrieval (pretrain.search_local_rows): each process gets the top-k of its own rows of
  # a global batch of 8 queries, from the exact searcher and from a host searcher.
  q8 = np.concatenate([queries, queries[:3]])[:8]
  order8 = np.argsort(-(q8 @ emb.T), axis=1, kind="stable")[:, :K]
  for results in (single, double, quad):
    local = 8 // len(results)
    for r in results:
      rows = slice(r["process"] * local, (r["process"] + 1) * local)
      np.testing.assert_array_equal(np.array(r["local_exact_ids"]), ids[order8[rows]])
      assert r["local_host_rows"] == list(range(8))[rows]
  for result in single + double + quad:  # Every process gets the full, global top-k.
    np.testing.assert_array_equal(np.array(result["ids"]), ids[order])
    np.testing.assert_allclose(np.array(result["scores"]), np.take_along_axis(exact, order, axis=1),
                               rtol=1e-5, atol=1e-5)
