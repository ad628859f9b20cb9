"""Run logging shared by the train loops: TensorBoard scalars, optionally Weights & Biases, and
the run's `summary.json`.

Only process 0 writes (big_vision / clu: `just_logging=jax.process_index() > 0`). Metric keys are
namespaced (`train/mlm_loss`, `retrieval/utility`); TensorBoard tags cannot hold `@`, so it is
written as `_at_` (`gold_recall@5` → `gold_recall_at_5`).

Both go through `realm_jax.fileio`, so the work directory may be a URL (`gs://…`). TensorBoard event
files then go to a local temporary directory and are uploaded to `WORKDIR/tensorboard` every
`sync_every_steps` steps and at `close()`, instead of rewriting the remote object at every flush.

Weights & Biases (off by default): set `REALM_JAX_WANDB_PROJECT=<project>` in the environment
(or pass `wandb_project=`) and install the extra, `pip install 'realm-jax[wandb]'`. Every scalar
written to TensorBoard then also goes to `wandb.log` under the same tag and step, on process 0 only;
`close()` finishes the run. The rest is wandb's own configuration: `wandb login` or `WANDB_API_KEY`,
`WANDB_MODE=offline`, `WANDB_ENTITY`, `WANDB_NAME` (default: the work directory's name), `WANDB_DIR`
(default: a local work directory, so the files land in `WORKDIR/wandb/`; wandb's default for a URL
one), and `WANDB_RUN_ID` with `WANDB_RESUME=allow` to continue a W&B run after a restart. Plain
`WANDB_PROJECT` does not switch it on: it is often set for other tools.
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

WANDB_PROJECT_ENV = "REALM_JAX_WANDB_PROJECT"
"""Environment variable: the Weights & Biases project to log to; unset or empty: W&B is off."""


class MetricWriter:
  """TensorBoard scalars under `WORKDIR/tensorboard`, and optionally a Weights & Biases run (a no-op
  on processes other than 0).

  Args:
    workdir: the run directory (local path or URL).
    enabled: write at all (default: only on process 0).
    sync_every_steps: for a URL work directory, upload the local event files when the step has
      advanced this many steps since the last upload (and always at `close`).
    wandb_project: the Weights & Biases project to log to as well; None (default): the value of
      `$REALM_JAX_WANDB_PROJECT`; None or "" there too: no W&B run.

  Raises:
    ImportError: if W&B is switched on but `wandb` is not installed (names the `wandb` extra).
    wandb.errors.Error: from `wandb.init`, e.g. online mode without an API key.
  """

  def __init__(self, workdir: str, enabled: bool | None = None, sync_every_steps: int = 100,
               wandb_project: str | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._writer = None
    self._wandb_run = None  # The `wandb.Run` when W&B is on (process 0 only).
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
      if wandb_project is None:
        wandb_project = os.environ.get(WANDB_PROJECT_ENV, "")
      if wandb_project:
        self._wandb_run = _start_wandb_run(wandb_project, workdir)

  @property
  def wandb_run(self) -> Any:
    """The `wandb.Run` scalars also go to, or None (W&B off, not process 0, or closed)."""
    return self._wandb_run

  @property
  def remote_dir(self) -> fileio.Path | None:
    """`WORKDIR/tensorboard` when events are staged locally and uploaded, else None."""
    return self._remote

  def write(self, step: int, metrics: Mapping[str, float], prefix: str | None = None) -> None:
    """Writes float scalars at `step`; keys get `prefix/` when given.

    With W&B on, the same tags and values go to one `wandb.log(..., step=step)` call; writes at the
    same step (the train window and an evaluation) end up in one W&B history row. W&B drops a step
    lower than one it has already logged (a warning from wandb), e.g. after resuming its run.

    With a URL work directory the event files are uploaded when `step` is `sync_every_steps` past
    the last upload (the first write uploads too).

    Raises:
      OSError: from the file systems, when uploading.
    """
    if self._writer is None:
      return
    scalars = {(f"{prefix}/{key}" if prefix else key).replace("@", "_at_"): float(value)
               for key, value in metrics.items()}
    for tag, value in scalars.items():
      self._writer.add_scalar(tag, value, step)
    self._writer.flush()
    if self._wandb_run is not None:
      self._wandb_run.log(scalars, step=int(step))
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
    local copy. Finishes the W&B run (also when the TensorBoard part raises). A second call does
    nothing.

    Raises:
      OSError: from the file systems, when uploading.
    """
    try:
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
    finally:
      if self._wandb_run is not None:
        run, self._wandb_run = self._wandb_run, None
        run.finish()


def _start_wandb_run(project: str, workdir: str) -> Any:
  """`wandb.init` for one run of `workdir` in `project` (module docstring: what the env sets).

  The run's config holds the work directory and the gin configuration in force (`gin_config`, the
  text that `config.gin` gets). `reinit="create_new"`: every writer owns its run, also when one
  process trains several jobs one after the other.

  Raises:
    ImportError: if `wandb` is not installed (names the extra).
  """
  try:
    import wandb  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"Weights & Biases logging is on (project {project!r}, from ${WANDB_PROJECT_ENV} or "
        f"wandb_project=) but wandb is not installed: pip install 'realm-jax[wandb]' "
        f"(or unset {WANDB_PROJECT_ENV})") from e
  if not hasattr(wandb, "init"):  # e.g. a `wandb/` run folder in the cwd imported as a namespace.
    raise ImportError(f"`import wandb` found {getattr(wandb, '__path__', wandb)!r}, not the wandb "
                      "package: pip install 'realm-jax[wandb]'")
  import gin  # pylint: disable=g-import-not-at-top
  config: dict[str, Any] = {"workdir": os.fspath(workdir)}
  gin_config = gin.config_str()
  if gin_config:
    config["gin_config"] = gin_config
  kwargs: dict[str, Any] = {"project": project, "config": config, "reinit": "create_new"}
  if not os.environ.get("WANDB_NAME"):
    kwargs["name"] = fileio.basename(workdir)
  if not os.environ.get("WANDB_DIR") and not fileio.is_url(workdir):
    fileio.makedirs(workdir)
    kwargs["dir"] = os.fspath(workdir)
  run = wandb.init(**kwargs)
  logging.info("Weights & Biases run %s in project %s", getattr(run, "id", "?"), project)
  return run


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
