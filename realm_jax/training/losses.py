"""The marginal likelihoods REALM optimises (Guu et al., 2020, §2.2–§3.4; ORQA, Lee et al., 2019, §4).

All functions are pure `jnp` code, shape-polymorphic in the batch, usable inside a jitted step.
Invalid (padding) entries are given a logit of −1e9 by the caller or through the masks here, never
−inf, so that gradients stay finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
_NEG = -1e9


def marginal_log_likelihood(logits: Array, correct: Array, valid: Array | None = None) -> Array:
  """log Σ_{correct} p − with p = softmax(logits) over the valid entries of the last axis.

  Computes `logsumexp(logits[correct]) − logsumexp(logits[valid])` per row: the log of the
  probability mass on the correct entries (ORQA Eq. 6, REALM §3.4 fine-tuning).

  Args:
    logits: `[..., n]` float32 unnormalised scores.
    correct: `[..., n]` bool, the entries that count as correct.
    valid: `[..., n]` bool entries that take part in the normaliser (default: all).

  Returns:
    `(log_likelihood [...] float32, any_correct [...] bool)`; rows with no correct entry get 0.
  """
  logits = logits.astype(jnp.float32)
  if valid is None:
    valid = jnp.ones_like(correct, dtype=bool)
  correct = correct.astype(bool) & valid.astype(bool)
  log_norm = jax.nn.logsumexp(jnp.where(valid, logits, _NEG), axis=-1)
  log_correct = jax.nn.logsumexp(jnp.where(correct, logits, _NEG), axis=-1)
  any_correct = correct.any(axis=-1)
  return jnp.where(any_correct, log_correct - log_norm, 0.0), any_correct


def retriever_loss(retriever_logits: Array, block_has_answer: Array,
                   valid: Array | None = None) -> tuple[Array, Array]:
  """ORQA/REALM retriever loss: −log Σ_{z ∈ retrieved, z has an answer} p(z|x).

  Args:
    retriever_logits: `[batch, num_retrieved]` float32 relevance scores f(x, z) of the top-k blocks.
    block_has_answer: `[batch, num_retrieved]` bool, whether block z contains an answer string.
    valid: `[batch, num_retrieved]` bool, False for padding.

  Returns:
    `(loss [batch] float32, has_correct [batch] bool)`; the loss is 0 where no block is correct
    (REFERENCE "A term is zeroed when nothing is correct").
  """
  ll, any_correct = marginal_log_likelihood(retriever_logits, block_has_answer, valid)
  return -ll, any_correct


def reader_loss(span_logits: Array, retriever_logits: Array, span_is_answer: Array,
                span_valid: Array) -> tuple[Array, Array]:
  """ORQA/REALM reader loss over top blocks × spans: −log Σ_{correct (z, s)} p(z, s | x).

  The joint logit of span s in block z is `span_logit(z, s) + retriever_logit(z)` (REALM §3.4,
  ORQA §4.2: the reader's distribution adds the retrieval score of the block).

  Args:
    span_logits: `[batch, num_read, num_spans]` float32 from `SpanReader`.
    retriever_logits: `[batch, num_read]` float32 f(x, z) of the blocks that were read.
    span_is_answer: `[batch, num_read, num_spans]` bool, the span's text matches an answer.
    span_valid: `[batch, num_read, num_spans]` bool, the span lies in the block body.

  Returns:
    `(loss [batch] float32, has_correct [batch] bool)`; 0 where no span is correct.
  """
  joint = span_logits + retriever_logits[..., None]
  batch = joint.shape[0]
  ll, any_correct = marginal_log_likelihood(
      joint.reshape(batch, -1), span_is_answer.reshape(batch, -1), span_valid.reshape(batch, -1))
  return -ll, any_correct


def mlm_marginal_log_likelihood(retriever_logits: Array, mlm_logits: Array, mlm_targets: Array,
                                candidate_valid: Array | None = None) -> dict[str, Array]:
  """REALM pre-training likelihood, marginalised over candidates per masked token (§2.3, §3.4).

      log p(y_j | x) = logsumexp_k [ log p(z_k | x) + log p(y_j | z_k, x) ]

  Args:
    retriever_logits: `[batch, num_candidates]` float32 f(x, z_k); candidate 0 is the null document.
    mlm_logits: `[batch, num_candidates, max_masks, vocab]` float32 masked-LM logits per candidate.
    mlm_targets: `[batch, max_masks]` int32 original token ids at the masked positions.
    candidate_valid: `[batch, num_candidates]` bool; False drops a candidate from p(z|x) (e.g. a
      trivial retrieval of the query's own block).

  Returns:
    A dict of float32 arrays:
      `token_log_likelihood [batch, max_masks]`: log p(y_j | x), marginalised;
      `null_log_likelihood [batch, max_masks]`: log p(y_j | ∅, x), candidate 0 alone — the baseline
        of `retrieval_utility` (REFERENCE "Metric retrieval_utility");
      `log_p_z [batch, num_candidates]`: log p(z | x);
      `token_log_probs [batch, num_candidates, max_masks]`: log p(y_j | z_k, x).
  """
  if candidate_valid is None:
    candidate_valid = jnp.ones(retriever_logits.shape, bool)
  log_p_z = jax.nn.log_softmax(jnp.where(candidate_valid, retriever_logits, _NEG), axis=-1)
  log_probs = jax.nn.log_softmax(mlm_logits.astype(jnp.float32), axis=-1)
  token_log_probs = jnp.take_along_axis(
      log_probs, mlm_targets[:, None, :, None], axis=-1)[..., 0]  # [b, k, m]
  token_ll = jax.nn.logsumexp(log_p_z[..., None] + token_log_probs, axis=1)
  return {
      "token_log_likelihood": token_ll,
      "null_log_likelihood": token_log_probs[:, 0, :],
      "log_p_z": log_p_z,
      "token_log_probs": token_log_probs,
  }


def weighted_mean(values: Array, weights: Array) -> Array:
  """Σ values·weights / max(Σ weights, 1): the mean over real (non-padding) entries."""
  weights = weights.astype(jnp.float32)
  return (values * weights).sum() / jnp.maximum(weights.sum(), 1.0)
