"""One process of a local multi-host run (started by tests/multihost/test_multihost.py).

    python tests/multihost/worker.py STEP PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES

Builds a tiny model and a deterministic global batch (identical on every process), keeps only this
process's rows, assembles the global array with `jax.make_array_from_process_local_data`, runs two
train steps and prints one JSON line `{"losses": [...]}` (process 0 only). With NUM_PROCESSES=1 it is
the single-process reference for the same global batch.
"""

import json
import os
import sys

STEP, PID, NPROC, PORT, LOCAL = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(
    sys.argv[5])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL}"
os.environ["JAX_PLATFORMS"] = "cpu"
if NPROC > 1:
  os.environ.update(REALM_COORDINATOR=f"localhost:{PORT}", REALM_NUM_PROCESSES=str(NPROC),
                    REALM_PROCESS_ID=str(PID))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from realm_jax import sharding  # noqa: E402

sharding.initialize_distributed()
sys.path.insert(0, os.path.dirname(__file__))
import steps  # noqa: E402  (tests/multihost/steps.py: one builder per train step)

GLOBAL_BATCH = 8
mesh = sharding.make_mesh()
state, train_fn, batch = steps.BUILDERS[STEP](GLOBAL_BATCH, mesh)
local = GLOBAL_BATCH // jax.process_count()
rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
local_batch = {k: v[rows] for k, v in batch.items()}
if STEP in steps.PREPARE:
  local_batch = steps.PREPARE[STEP](local_batch)
losses = []
for _ in range(2):
  state, metrics = train_fn(state, sharding.global_batch_from_local(local_batch, mesh),
                            jax.random.key(7))
  metrics = jax.device_get(metrics)
  losses.append(float(metrics[steps.LOSS_KEY[STEP]]))
if jax.process_index() == 0:
  print(json.dumps({"losses": losses, "devices": jax.device_count(),
                    "processes": jax.process_count(),
                    "shapes": {k: list(v.shape) for k, v in local_batch.items()}}), flush=True)
