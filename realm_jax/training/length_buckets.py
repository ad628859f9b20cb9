"""Length buckets for the train steps: a batch's token inputs cut to the bucket of its longest row.

The featurisers pad every row to its configured maximum (`OpenQAConfig.reader_length`,
`PretrainConfig.joint_length`, `IctConfig.block_length`, ...). Most batches need less: on the
default job's SQuAD batches half of the reader's tokens are padding. Here a batch is cut, after
featurisation and before the step, to the smallest multiple of a bucket size that holds its longest
row, so the jitted step compiles once per bucket length (a small fixed set: `full / bucket` at most
per input) and does not compute the padding past it.

Inputs come in *groups*, one per prefix: the arrays `prefix + field` for `field` in
`TOKEN_FIELDS` share one length, read from `prefix + "input_mask"` (`"reader_"`: the reader's
`[batch, num_read, reader_length]` inputs; `"query_"`, `"candidate_"`, `"joint_"` in pre-training;
`"query_"`, `"block_"` in ICT). BERT attends only to unmasked tokens, so the cut changes no
output of a real token (losses and gradients up to float rounding); dropout masks are drawn for the
new shape, another sample of the same distribution.

On several processes every process must cut to the same length (`jax.make_array_from_process_local_data`
needs one local shape): `cut_to_buckets(..., across_processes=True)` agrees on the largest with one
small collective (`sharding.max_over_processes`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from realm_jax import sharding
from realm_jax.retrieval import embedding

TOKEN_FIELDS = ("input_ids", "input_mask", "segment_ids", "body_mask")


def group_length(batch: Mapping[str, np.ndarray], prefix: str, bucket: int) -> int:
  """The padded length a group needs: the smallest multiple of `bucket` that holds its longest row.

  Args:
    batch: holds `prefix + "input_mask"` `[..., full_length]` int (1 on real tokens).
    prefix: the group, e.g. `"reader_"`.
    bucket: the bucket size in tokens; 0 keeps `full_length`.

  Returns:
    The length, at most `full_length` (`embedding.bucket_length`).

  Raises:
    KeyError: if the batch has no `prefix + "input_mask"`.
  """
  mask = np.asarray(batch[prefix + "input_mask"])
  full = mask.shape[-1]
  if not bucket:
    return full
  return embedding.bucket_length(int(mask.sum(axis=-1).max(initial=1)), full, bucket)


def cut(batch: Mapping[str, np.ndarray], lengths: Mapping[str, int]) -> dict[str, np.ndarray]:
  """The batch with each group's `TOKEN_FIELDS` cut to its length on the last axis.

  Args:
    batch: the featurised batch; entries outside the groups pass through.
    lengths: `{prefix: length}`.

  Returns:
    A new dict (the arrays of an uncut group are the input's own).

  Raises:
    ValueError: naming the group, if a length is outside `(0, full_length]` or the cut would drop
      a real token (a 1 of `prefix + "input_mask"` past it).
  """
  out = dict(batch)
  for prefix, length in lengths.items():
    mask = np.asarray(batch[prefix + "input_mask"])
    full = mask.shape[-1]
    if not 0 < length <= full:
      raise ValueError(f"{prefix}*: length {length} outside (0, {full}]")
    if length == full:
      continue
    if np.any(mask[..., length:]):
      raise ValueError(f"{prefix}*: a row is longer than {length} tokens")
    for field in TOKEN_FIELDS:
      if prefix + field in batch:
        out[prefix + field] = np.ascontiguousarray(np.asarray(batch[prefix + field])[..., :length])
  return out


def cut_to_buckets(batch: Mapping[str, np.ndarray], prefixes: Sequence[str], bucket: int,
                   across_processes: bool = False
                   ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Cuts each group of `batch` to the bucket length of its longest row (`group_length`, `cut`).

  Args:
    batch: the featurised batch (this process's rows).
    prefixes: the groups to cut.
    bucket: bucket size in tokens (0: no cut).
    across_processes: every process passes its own rows and all cut each group to the largest
      of their lengths (one collective, `sharding.max_over_processes`; call it in the same order
      on every process). False where every process builds the same batch, or on one process.

  Returns:
    `(cut_batch, {prefix: length})`.
  """
  lengths = [group_length(batch, prefix, bucket) for prefix in prefixes]
  if across_processes:
    lengths = sharding.max_over_processes(lengths)
  lengths = dict(zip(prefixes, (int(n) for n in lengths)))
  return cut(batch, lengths), lengths
