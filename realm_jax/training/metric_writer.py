"""Run logging shared by the train loops: TensorBoard scalars and the run's `summary.json`.

Only process 0 writes (big_vision / clu: `just_logging=jax.process_index() > 0`). Metric keys are
namespaced (`train/mlm_loss`, `retrieval/utility`); TensorBoard tags cannot hold `@`, so it is
written as `_at_` (`gold_recall@5` → `gold_recall_at_5`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax


class MetricWriter:
  """TensorBoard scalars under `WORKDIR/tensorboard` (a no-op on processes other than 0).

  Args:
    workdir: the run directory.
    enabled: write at all (default: only on process 0).
  """

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._writer = None
    if self.enabled:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float], prefix: str | None = None) -> None:
    """Writes float scalars at `step`; keys get `prefix/` when given."""
    if self._writer is None:
      return
    for key, value in metrics.items():
      tag = (f"{prefix}/{key}" if prefix else key).replace("@", "_at_")
      self._writer.add_scalar(tag, float(value), step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def write_summary_json(workdir: str, summary: Mapping[str, Any]) -> str | None:
  """Atomically writes `WORKDIR/summary.json` on process 0; returns its path (None elsewhere).

  Values that JSON cannot hold (numpy scalars) are converted with `float`/`int`/`str`.
  """
  if jax.process_index() != 0:
    return None

  def default(value):
    if hasattr(value, "item"):
      return value.item()
    return str(value)

  path = os.path.join(workdir, "summary.json")
  with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=2, default=default)
  os.replace(path + ".tmp", path)
  return path
