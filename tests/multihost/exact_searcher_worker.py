"""One process of the multi-host exact-searcher test (started by test_exact_searcher_multihost.py).

    python tests/multihost/exact_searcher_worker.py SNAPSHOT QUERIES.npy PROCESS_ID NUM_PROCESSES PORT
        LOCAL_DEVICES K

The pod code path (REALM §3.4, exact MIPS on device): every process opens the same snapshot lazily and
calls `searchers.open_exact_searcher`, which validates and reads only the rows of this process's
devices into one global `jax.Array` over the mesh; all processes then search the same queries. Each
process prints one JSON line: its row range, the rows it read, the top-k ids and scores, and the
per-host retrieval results of `pretrain.search_local_rows` for its own rows of a global query batch.
"""

import json
import os
import sys

SNAPSHOT, QUERIES, PID, NPROC, PORT, LOCAL, K = (sys.argv[1], sys.argv[2], int(sys.argv[3]),
                                                 int(sys.argv[4]), sys.argv[5], int(sys.argv[6]),
                                                 int(sys.argv[7]))
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL}"
os.environ["JAX_PLATFORMS"] = "cpu"
if NPROC > 1:
  os.environ.update(REALM_COORDINATOR=f"localhost:{PORT}", REALM_NUM_PROCESSES=str(NPROC),
                    REALM_PROCESS_ID=str(PID))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from realm_jax.retrieval import searchers  # noqa: E402
from realm_jax import sharding  # noqa: E402

sharding.initialize_distributed()
mesh = sharding.make_mesh()
snapshot, searcher = searchers.open_exact_searcher(SNAPSHOT, mesh)
local_shards = searcher.index_embeddings.addressable_shards
queries = np.load(QUERIES)
scores, ids = searcher.search(queries, K)

# Per-host retrieval in the train step's form (pretrain.search_local_rows): a global, data-sharded
# batch of 8 queries, each process feeding and getting back only its own rows, with the exact
# searcher (global array) and with a host searcher (this process's rows only).
from realm_jax.training import pretrain  # noqa: E402

local = 8 // jax.process_count()
mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
q8 = np.concatenate([queries, queries[:3]])[:8]
local_exact = pretrain.search_local_rows(
    searcher, sharding.global_batch_from_local({"q": q8[mine]}, mesh)["q"], mesh, K)


class RowEcho:
  """A host searcher that answers each query row with the number it carries."""

  def search(self, q, k):
    q = np.asarray(q)
    return q[:, :k], q[:, :k].astype(np.int64)


marked = np.repeat(np.arange(8, dtype=np.float32)[:, None], queries.shape[1], axis=1)
local_host = pretrain.search_local_rows(
    RowEcho(), sharding.global_batch_from_local({"q": marked[mine]}, mesh)["q"], mesh, K)
print(json.dumps({
    "local_exact_ids": np.asarray(local_exact).tolist(),
    "local_host_rows": np.asarray(local_host)[:, 0].tolist(),
    "process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
    "local_devices": len(local_shards),
    "row_range": list(searchers.process_row_range(mesh, searcher.num_rows)),
    "rows_read": snapshot.embeddings.rows_read, "num_rows": searcher.num_rows,
    "ids": ids.tolist(), "scores": scores.tolist()}), flush=True)
