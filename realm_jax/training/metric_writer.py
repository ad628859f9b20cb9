"""Run logging shared by the train loops: TensorBoard scalars and the run's `summary.json`.

Only process 0 writes (big_vision / clu: `just_logging=jax.process_index() > 0`). Metric keys are
namespaced (`train/mlm_loss`, `retrieval/utility`); TensorBoard tags cannot hold `@`, so it is
written as `_at_` (`gold_recall@5` → `gold_recall_at_5`).

Both go through `realm_jax.fileio`, so the work directory may be a URL (`gs://…`). TensorBoard event
files then go to a local temporary directory and are uploaded to `WORKDIR/tensorboard` every
`sync_every_steps` steps and at `close()`, instead of rewriting the remote object at every flush.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax

from realm_jax import fileio


class MetricWriter:
  """TensorBoard scalars under `WORKDIR/tensorboard` (a no-op on processes other than 0).

  Args:
    workdir: the run directory (local path or URL).
    enabled: write at all (default: only on process 0).
    sync_every_steps: for a URL work directory, upload the local event files when the step has
      advanced this many steps since the last upload (and always at `close`).
  """

  def __init__(self, workdir: str, enabled: bool | None = None, sync_every_steps: int = 100):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._writer = None
    self._remote = None  # WORKDIR/tensorboard when the work directory is a URL.
    self._local_dir = None
    self._uploaded: dict[str, tuple[int, int]] = {}  # relative path → (size, mtime_ns) uploaded.
    self._last_sync_step: int | None = None
    self.sync_every_steps = sync_every_steps
    if self.enabled:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      directory = fileio.join(workdir, "tensorboard")
      if fileio.is_url(directory):
        self._remote = directory
        self._local_dir = tempfile.mkdtemp(prefix="realm_jax_tensorboard_")
        directory = self._local_dir
      else:
        fileio.makedirs(directory)
      self._writer = tensorboardX.SummaryWriter(os.fspath(directory))

  @property
  def remote_dir(self) -> fileio.Path | None:
    """`WORKDIR/tensorboard` when events are staged locally and uploaded, else None."""
    return self._remote

  def write(self, step: int, metrics: Mapping[str, float], prefix: str | None = None) -> None:
    """Writes float scalars at `step`; keys get `prefix/` when given.

    With a URL work directory the event files are uploaded when `step` is `sync_every_steps` past
    the last upload (the first write uploads too).

    Raises:
      OSError: from the file systems, when uploading.
    """
    if self._writer is None:
      return
    for key, value in metrics.items():
      tag = (f"{prefix}/{key}" if prefix else key).replace("@", "_at_")
      self._writer.add_scalar(tag, float(value), step)
    self._writer.flush()
    if self._remote is not None and (self._last_sync_step is None
                                     or step - self._last_sync_step >= self.sync_every_steps):
      self.sync()
      self._last_sync_step = step

  def sync(self) -> int:
    """Uploads the local event files that changed since the last upload (URL work directories).

    Returns:
      The number of files uploaded (0 for a local work directory).

    Raises:
      OSError: from the file systems.
    """
    if self._remote is None or self._local_dir is None:
      return 0
    uploaded = 0
    for root, _, names in os.walk(self._local_dir):
      for name in sorted(names):
        local = os.path.join(root, name)
        rel = os.path.relpath(local, self._local_dir)
        stat = os.stat(local)
        key = (stat.st_size, stat.st_mtime_ns)
        if self._uploaded.get(rel) == key:
          continue
        fileio.upload_file(local, fileio.join(self._remote, *rel.split(os.sep)))
        self._uploaded[rel] = key
        uploaded += 1
    return uploaded

  def close(self) -> None:
    """Flushes and closes the event file; with a URL work directory uploads it and removes the
    local copy.

    Raises:
      OSError: from the file systems, when uploading.
    """
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if self._local_dir is not None:
      try:
        self.sync()
      finally:
        shutil.rmtree(self._local_dir, ignore_errors=True)  # Our local staging dir (tempfile).
        self._local_dir = None
        logging.info("TensorBoard events uploaded to %s", self._remote)


def write_summary_json(workdir: str, summary: Mapping[str, Any]) -> str | None:
  """Atomically writes `WORKDIR/summary.json` on process 0 (local or URL, through `fileio`).

  Values that JSON cannot hold (numpy scalars) are converted with `.item()` or `str`.

  Args:
    workdir: the run directory (local path or URL); created if missing.
    summary: the JSON-able summary.

  Returns:
    The file's path (local path or URL) on process 0, None elsewhere.

  Raises:
    OSError: from the file system.
  """
  if jax.process_index() != 0:
    return None

  def default(value):
    if hasattr(value, "item"):
      return value.item()
    return str(value)

  path = fileio.join(workdir, "summary.json")
  fileio.makedirs(workdir)
  fileio.write_atomic(path, json.dumps(summary, indent=2, default=default))
  return os.fspath(path)
