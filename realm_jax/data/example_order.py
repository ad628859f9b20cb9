"""The deterministic, resumable order in which a trainer visits its training examples.

Fine-tuning (questions), REALM pre-training (masked sentences) and ICT (blocks) all draw their global
batches from one seeded permutation per epoch; the position in it is part of every checkpoint, so a
resumed run sees exactly the examples an uninterrupted one would have seen.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


class ExampleOrder:
  """One seeded permutation of `num_examples` per epoch, cut into global batches.

  State `{"epoch", "position"}` goes into the checkpoint's metadata; in multi-host runs each process
  takes rows `[process_index * local, (process_index + 1) * local)` of every global batch, with
  `local = global_batch_size / process_count`, so the processes' rows add up to the global batch.

  Args:
    num_examples: how many examples there are.
    global_batch_size: examples per step over all processes.
    seed: the permutation seed (epoch e uses `default_rng([seed, e])`).
    process_index / process_count: this process's share of every global batch.

  Raises:
    ValueError: if there is no example, or the global batch does not split over the processes.
  """

  def __init__(self, num_examples: int, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    if num_examples <= 0:
      raise ValueError("no training examples")
    if global_batch_size % process_count:
      raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} "
                       "processes")
    self.num_examples, self.global_batch_size, self.seed = num_examples, global_batch_size, seed
    self.process_index, self.process_count = process_index, process_count
    self.epoch, self.position = 0, 0
    self._order = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

  def state(self) -> dict[str, int]:
    """`{"epoch", "position"}`: where the next batch starts (JSON-ready)."""
    return {"epoch": self.epoch, "position": self.position}

  def restore(self, state: Mapping[str, int]) -> None:
    """Continues from a `state()` (taken from a checkpoint's metadata)."""
    self.epoch, self.position = int(state["epoch"]), int(state["position"])
    self._order = self._permutation(self.epoch)

  def next_local_indices(self) -> np.ndarray:
    """The `[global_batch / process_count]` int64 example indices of this process's next batch.

    A batch that crosses the end of an epoch is completed from the next epoch's permutation.
    """
    picked = []
    while len(picked) < self.global_batch_size:
      if self.position >= self.num_examples:
        self.epoch, self.position = self.epoch + 1, 0
        self._order = self._permutation(self.epoch)
      take = min(self.global_batch_size - len(picked), self.num_examples - self.position)
      picked.extend(self._order[self.position:self.position + take])
      self.position += take
    local = self.global_batch_size // self.process_count
    return np.asarray(picked[self.process_index * local:(self.process_index + 1) * local])
