"""Device mesh, named shardings and multi-host start-up.

Every jitted step in realm_jax runs over one `jax.sharding.Mesh` with the logical axes below. Batches are
split over `data` (data parallelism over all cores of all hosts); parameters are replicated by default.
Document embeddings of the MIPS index are split over every device (`INDEX_AXES`), so that each device
scores its own shard and only the per-shard top-k travel (see `retrieval/searchers.py`).
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"
# The document index is split over every device of the mesh.
INDEX_AXES = (DATA_AXIS, MODEL_AXIS)

_distributed_initialized = False


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Calls `jax.distributed.initialize` once, when there is more than one host.

  On Cloud TPU pods JAX discovers the coordinator itself (no arguments). For local multi-process
  simulation on CPU, pass the three arguments (or set `REALM_COORDINATOR`, `REALM_NUM_PROCESSES`,
  `REALM_PROCESS_ID`). A single-host run with none of these set does nothing.

  Raises:
    RuntimeError: from JAX if the coordinator cannot be reached.
  """
  global _distributed_initialized
  if _distributed_initialized:
    return
  coordinator_address = coordinator_address or os.environ.get("REALM_COORDINATOR")
  if num_processes is None and "REALM_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["REALM_NUM_PROCESSES"])
  if process_id is None and "REALM_PROCESS_ID" in os.environ:
    process_id = int(os.environ["REALM_PROCESS_ID"])
  on_tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]
  if coordinator_address and num_processes and num_processes > 1:
    # Cross-process collectives of the CPU backend (local multi-host simulation); no effect on TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif on_tpu_pod:
    jax.distributed.initialize()
  else:
    return
  _distributed_initialized = True
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def make_mesh(mesh_shape: Sequence[int] = (-1, 1),
              axis_names: Sequence[str] = (DATA_AXIS, MODEL_AXIS),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the device mesh; one `-1` entry takes all remaining devices.

  Args:
    mesh_shape: size of each axis, e.g. `(-1, 1)` for pure data parallelism over all devices.
    axis_names: the logical names of the axes (default `("data", "model")`).
    devices: devices to use (default: all of `jax.devices()`, in one global order on every host).

  Returns:
    A `Mesh` whose device order is the same on every host.

  Raises:
    ValueError: if the shape does not multiply to the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(mesh_shape)
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh_shape {tuple(shape)} and axis_names {tuple(axis_names)} differ in length")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh_shape {tuple(shape)} has more than one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"cannot fill mesh_shape {tuple(shape)} with {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh_shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(shape), tuple(axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that places a full copy on every device (parameters, optimizer state)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over `data`, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def index_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding for `[num_blocks, dim]` document embeddings: rows split over every device."""
  return NamedSharding(mesh, P(INDEX_AXES))


def global_batch_from_local(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles a global, data-sharded batch from this process's slice.

  Each process passes its own `[local_batch, ...]` rows; the result is a global `jax.Array` of
  `[local_batch * process_count, ...]` rows split over the `data` axis
  (`jax.make_array_from_process_local_data`). On one host this is a plain sharded `device_put`.
  """
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def max_over_processes(values: Sequence[int]) -> tuple[int, ...]:
  """The elementwise largest of every process's `values` (each passes its own; all get the same).

  What makes a per-batch shape choice safe on several hosts: a padded length picked from this
  process's rows alone could differ between processes, and the global array of
  `global_batch_from_local` needs the same local shape everywhere. One process: `values` itself,
  no communication. Several: one small all-gather across processes
  (`jax.experimental.multihost_utils.process_allgather`, a collective on the devices, queued
  behind the step in flight), which every process must call in the same order.

  Args:
    values: `[n]` integers (the same n on every process).

  Returns:
    `n` Python ints, the maximum of each over the processes.
  """
  values = np.asarray(values, np.int32).reshape(-1)
  if jax.process_count() == 1:
    return tuple(int(v) for v in values)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = np.asarray(multihost_utils.process_allgather(values))  # [processes, n]
  return tuple(int(v) for v in gathered.reshape(-1, len(values)).max(axis=0))


def setup_training_mesh(mesh_shape: Sequence[int], global_batch_size: int) -> Mesh:
  """Start-up shared by the train loops: `jax.distributed` (when multi-host), the mesh, batch check.

  Args:
    mesh_shape: as in `make_mesh`.
    global_batch_size: examples per step over all processes.

  Returns:
    The mesh.

  Raises:
    ValueError: if the global batch does not split evenly over the `data` axis.
  """
  initialize_distributed()
  mesh = make_mesh(mesh_shape)
  data_size = mesh.shape[DATA_AXIS]
  if global_batch_size % data_size:
    raise ValueError(f"batch_size={global_batch_size} must be a multiple of the mesh data axis "
                     f"({data_size} devices)")
  return mesh
