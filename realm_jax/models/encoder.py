"""The knowledge-augmented encoder p(y|z, x) (Guu et al., 2020, §2.3 and §3.2).

The input x and a retrieved block z are joined as `[CLS] x [SEP] z_body [SEP]` (segment ids 0 / 1; the
block's title is dropped) and encoded by BERT. Two heads sit on top:

* `MaskedLmHead` — pre-training (§3.2, Eq. 2): p(y_j | z, x) for each masked position j of x, BERT's
  transform (dense → GELU → LayerNorm) and a decoder tied to the word embeddings plus an output bias.
* `SpanReader` — Open-QA fine-tuning (§3.2, Eq. 3; ORQA §4): a span s = (start, end) of z, at most
  `max_span_width` tokens, scores MLP([h_start; h_end]):
  dense(2·256) → split into start/end halves → start_half[start] + end_half[end] → ReLU →
  LayerNorm(ε=1e-3) → dense(1), as in the official ORQA/REALM reader.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.models import bert

Array = jax.Array
_init = nn.initializers.truncated_normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class ReaderConfig:
  """Configuration of the knowledge-augmented encoder and its span reader.

  Attributes:
    bert: the BERT encoder over `[CLS] x [SEP] z_body [SEP]`.
    span_hidden_size: width of each half of the span MLP (256 in ORQA/REALM).
    max_span_width: longest answer span, in wordpieces (10 in the paper).

  Raises:
    ValueError: on non-positive sizes.
  """

  bert: bert.BertConfig = bert.BertConfig()
  span_hidden_size: int = 256
  max_span_width: int = 10

  def __post_init__(self):
    if self.span_hidden_size <= 0 or self.max_span_width <= 0:
      raise ValueError("ReaderConfig: span_hidden_size and max_span_width must be positive, got "
                       f"{self.span_hidden_size}, {self.max_span_width}")


@functools.lru_cache(maxsize=16)
def span_candidates(seq_len: int, max_span_width: int) -> tuple[np.ndarray, np.ndarray]:
  """All spans (start, end), end − start < max_span_width, end < seq_len, in a fixed order.

  The order is end-major, then width (span (e, e), then (e − 1, e), …): the spans of a shorter
  input are a prefix of the spans of a longer one, `span_candidates(n, w)[0] ==
  span_candidates(m, w)[0][:num_span_candidates(n, w)]` for n ≤ m. A reader batch cut to a
  length bucket (`training.finetune.cut_reads`) therefore keeps its span indices: span i is the
  same (start, end) at every padded length.

  Returns:
    `(starts, ends)`, each `[num_spans]` int32, `num_spans = num_span_candidates(seq_len,
    max_span_width)`; span i covers tokens `starts[i] … ends[i]` inclusive. Spans are later
    restricted to the block body by a mask.
  """
  starts, ends = [], []
  for e in range(seq_len):
    for w in range(min(max_span_width, e + 1)):
      starts.append(e - w)
      ends.append(e)
  return np.asarray(starts, np.int32), np.asarray(ends, np.int32)


def num_span_candidates(seq_len, max_span_width: int):
  """How many spans `span_candidates(seq_len, max_span_width)` lists: Σ_{e < seq_len}
  min(e + 1, max_span_width), i.e. the spans that end before `seq_len`.

  Args:
    seq_len: an int, or an int array `[...]` (elementwise).
    max_span_width: as in `span_candidates`.

  Returns:
    A Python int for an int `seq_len`; an int64 array of its shape otherwise.
  """
  seq_len = np.asarray(seq_len, np.int64)
  full = np.minimum(seq_len, max_span_width)
  count = full * (full + 1) // 2 + (seq_len - full) * max_span_width
  return int(count) if count.ndim == 0 else count


def span_index(seq_len: int, max_span_width: int, starts: np.ndarray,
               ends: np.ndarray) -> np.ndarray:
  """Positions in `span_candidates(seq_len, max_span_width)` of the given (start, end) spans.

  Maps another enumeration onto ours, e.g. Hugging Face's `RealmReaderProjection`, which lists
  spans width-major (every width-1 span, then width 2, …) where `span_candidates` is end-major:
  `our_logits[..., span_index(…, hf_starts, hf_ends)]` is in Hugging Face's order.

  Args:
    seq_len, max_span_width: as in `span_candidates`.
    starts, ends: `[n]` int inclusive token positions of the spans.

  Returns:
    `[n]` int64 indices into the `span_candidates` order.

  Raises:
    ValueError: for a span `span_candidates` does not enumerate (too wide, or past `seq_len`),
      or `starts` and `ends` of different shapes.
  """
  starts, ends = np.asarray(starts), np.asarray(ends)
  if starts.shape != ends.shape:
    raise ValueError(f"span_index: starts {starts.shape} and ends {ends.shape} differ in shape")
  bad = (starts < 0) | (ends < starts) | (ends >= seq_len) | (ends - starts >= max_span_width)
  if np.any(bad):
    k = int(np.flatnonzero(bad)[0])
    raise ValueError(f"span_index: span ({int(starts[k])}, {int(ends[k])}) is not among the spans "
                     f"of width < {max_span_width} in {seq_len} tokens")
  # End-major, then width: span (s, e) sits after every span ending before e, at offset e − s.
  return (num_span_candidates(ends, max_span_width) + (ends - starts)).astype(np.int64)


def gold_span_mask(seq_len: int, max_span_width: int, gold_starts: np.ndarray,
                   gold_ends: np.ndarray) -> np.ndarray:
  """Which candidate spans are a gold answer span (ORQA §4.2 / REALM §3.2 reader targets).

  Args:
    seq_len, max_span_width: as in `span_candidates`.
    gold_starts, gold_ends: `[..., num_gold]` int inclusive token positions of the gold spans;
      entries < 0 are padding and match nothing.

  Returns:
    `[..., num_spans]` bool: span i equals one of the gold spans (exact start and end).
  """
  starts, ends = span_candidates(seq_len, max_span_width)
  gold_starts, gold_ends = np.asarray(gold_starts), np.asarray(gold_ends)
  hit = ((starts == gold_starts[..., :, None]) & (ends == gold_ends[..., :, None])
         & (gold_starts[..., :, None] >= 0))
  return hit.any(axis=-2)


def span_mask(body_mask: Array, max_span_width: int) -> Array:
  """Which candidate spans lie inside the block body.

  Args:
    body_mask: `[..., seq_len]` bool/int, 1 on the wordpieces of z's body (not on [CLS], x, [SEP]
      or padding).
    max_span_width: as in `span_candidates`.

  Returns:
    `[..., num_spans]` bool: both endpoints in the body (the body is one contiguous run, so every
    token between them is too).
  """
  starts, ends = span_candidates(body_mask.shape[-1], max_span_width)
  body = body_mask.astype(bool)
  return jnp.take(body, starts, axis=-1) & jnp.take(body, ends, axis=-1)


class SpanReader(nn.Module):
  """Knowledge-augmented encoder with the Open-QA span head (REALM §3.2, Eq. 3; ORQA §4.2).

  Call (keyword-only): `apply(params, input_ids=…, input_mask=…, segment_ids=…, body_mask=…,
  deterministic=True)` with every input `[batch, num_blocks, seq_len]` int32 (`body_mask` marks z's
  body tokens).

  Returns:
    `[batch, num_blocks, num_spans]` float32 span logits, `-inf`-free: spans outside the body get a
    large negative value (−1e9) so that `logsumexp` ignores them. Span i is
    `span_candidates(seq_len, max_span_width)[..][i]`.
  """

  config: ReaderConfig

  @nn.compact
  def __call__(self, *, input_ids: Array, input_mask: Array, segment_ids: Array,
               body_mask: Array, deterministic: bool = True) -> Array:
    cfg = self.config
    lead, seq_len = input_ids.shape[:-1], input_ids.shape[-1]
    flat = lambda x: x.reshape((-1, seq_len))  # noqa: E731
    hidden = bert.BertEncoder(cfg.bert, name="bert")(
        input_ids=flat(input_ids), input_mask=flat(input_mask), segment_ids=flat(segment_ids),
        deterministic=deterministic)
    hidden = hidden.astype(jnp.float32)
    endpoints = nn.Dense(2 * cfg.span_hidden_size, kernel_init=_init, name="span_endpoints")(hidden)
    start_half, end_half = jnp.split(endpoints, 2, axis=-1)  # [B, L, H] each
    starts, ends = span_candidates(seq_len, cfg.max_span_width)
    span_hidden = jnp.take(start_half, starts, axis=1) + jnp.take(end_half, ends, axis=1)
    span_hidden = nn.relu(span_hidden)
    span_hidden = nn.LayerNorm(epsilon=1e-3, name="span_layer_norm")(span_hidden)
    logits = nn.Dense(1, kernel_init=_init, name="span_logits")(span_hidden)[..., 0]
    logits = logits.reshape(lead + logits.shape[-1:])
    valid = span_mask(body_mask, cfg.max_span_width)
    return jnp.where(valid, logits, -1e9)


class MaskedLmHead(nn.Module):
  """BERT's masked-LM head: dense → GELU (`config.hidden_act`) → LayerNorm → tied decoder + bias
  (REALM §3.2, Eq. 2).

  Parameters: `transform/{kernel,bias}`, `transform_layer_norm/{scale,bias}`, `output_bias [vocab]`
  (the layout `checkpoint_import` produces from `cls.predictions.*`).
  """

  config: bert.BertConfig

  @nn.compact
  def __call__(self, hidden: Array, decoder: callable) -> Array:
    """Maps `[..., hidden]` representations to `[..., vocab_size]` float32 logits.

    Args:
      hidden: `[..., hidden_size]` token representations at the masked positions.
      decoder: the tied output projection (`BertEncoder.attend`).
    """
    cfg = self.config
    h = nn.Dense(cfg.hidden_size, kernel_init=_init, name="transform")(hidden)
    h = nn.gelu(h, approximate=cfg.approximate_gelu)
    h = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="transform_layer_norm")(h)
    bias = self.param("output_bias", nn.initializers.zeros, (cfg.vocab_size,))
    return decoder(h).astype(jnp.float32) + bias


class KnowledgeAugmentedEncoder(nn.Module):
  """BERT over `[CLS] x [SEP] z_body [SEP]` with the masked-LM head (REALM §3.2, pre-training).

  Call (keyword-only): `apply(params, input_ids=…, input_mask=…, segment_ids=…, mlm_positions=…,
  deterministic=True)`.

  Args:
    input_ids, input_mask, segment_ids: `[batch, num_candidates, seq_len]` int32 joined inputs.
    mlm_positions: `[batch, max_masks]` int32 positions of x's masked tokens; x comes first in every
      join, so the positions are the same for all candidates.

  Returns:
    `[batch, num_candidates, max_masks, vocab_size]` float32 logits of p(y_j | z, x).
  """

  config: bert.BertConfig

  def setup(self):
    self.bert = bert.BertEncoder(self.config)
    self.mlm_head = MaskedLmHead(self.config)

  def __call__(self, *, input_ids: Array, input_mask: Array, segment_ids: Array,
               mlm_positions: Array, deterministic: bool = True) -> Array:
    batch, num_candidates, seq_len = input_ids.shape
    flat = lambda x: x.reshape((-1, seq_len))  # noqa: E731
    hidden = self.bert(input_ids=flat(input_ids), input_mask=flat(input_mask),
                       segment_ids=flat(segment_ids), deterministic=deterministic)
    hidden = hidden.reshape((batch, num_candidates, seq_len, -1))
    gathered = jnp.take_along_axis(hidden, mlm_positions[:, None, :, None], axis=2)
    return self.mlm_head(gathered, self.bert.attend)
