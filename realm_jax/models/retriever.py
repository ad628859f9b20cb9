"""The REALM neural knowledge retriever p(z|x) (Guu et al., 2020, §2.3 and §3.1).

    p(z|x) = exp f(x, z) / Σ_z' exp f(x, z'),   f(x, z) = Embed_input(x)ᵀ Embed_doc(z)

`Embed` is a BERT tower followed by a pooling head:
  * `"cls_projection"` (the paper): the [CLS] vector → dense(projection_size=128) → LayerNorm;
  * `"pooler_projection"` (the official REALM/ORQA code and the released checkpoints): BERT's pooled
    output tanh(dense([CLS])) → dense(projection_size) → LayerNorm;
  * `"mean"` (sentence-transformers MiniLM, the CPU default): the mask-weighted mean of the token vectors,
    L2-normalised, no projection, so the zero-shot MiniLM embedder is used exactly as it was trained.

Query inputs are `[CLS] x [SEP]`; document inputs are `[CLS] title [SEP] body [SEP]` with segment ids 0/1.
The query and document towers share their weights by default (`share_embedders=True`, as the official
code); with `share_embedders=False` each tower has its own BERT.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from realm_jax.models import bert

Array = jax.Array

POOLINGS = ("cls_projection", "pooler_projection", "mean")
PROJECTION_POOLINGS = ("cls_projection", "pooler_projection")


@dataclasses.dataclass(frozen=True)
class RetrieverConfig:
  """Configuration of the query and document embedders.

  Attributes:
    bert: the BERT encoder of each tower.
    pooling: `"cls_projection"` (REALM: [CLS] → dense → LayerNorm), `"pooler_projection"` (the
      released REALM checkpoints: tanh(dense_hidden([CLS])) → dense → LayerNorm) or `"mean"`
      (MiniLM mean pooling, L2-normalised, no projection).
    projection_size: output dimension of the projection heads (128 in the paper); ignored for
      `"mean"`, whose dimension is `bert.hidden_size`.
    share_embedders: one BERT for both towers (official REALM default) or two.
    score_scale: the relevance score is `score_scale * <q, d>`. 1.0 for REALM's unnormalised
      projections; a temperature such as 20.0 for L2-normalised (cosine) embeddings, whose raw inner
      products lie in [-1, 1] and would give an almost uniform p(z|x).

  Raises:
    ValueError: on an unknown pooling or a non-positive size/scale.
  """

  bert: bert.BertConfig = bert.BertConfig()
  pooling: str = "cls_projection"
  projection_size: int = 128
  share_embedders: bool = True
  score_scale: float = 1.0

  def __post_init__(self):
    if self.pooling not in POOLINGS:
      raise ValueError(f"RetrieverConfig.pooling={self.pooling!r}; expected one of {POOLINGS}")
    if self.projection_size <= 0:
      raise ValueError(f"RetrieverConfig.projection_size must be positive, got {self.projection_size}")
    if self.score_scale <= 0:
      raise ValueError(f"RetrieverConfig.score_scale must be positive, got {self.score_scale}")

  @property
  def embedding_dim(self) -> int:
    """Dimension of the query/document embeddings (the MIPS index width)."""
    return self.projection_size if self.pooling in PROJECTION_POOLINGS else self.bert.hidden_size


class Embedder(nn.Module):
  """One tower: BERT → pooling head → `[batch, embedding_dim]` float32 embedding (REALM §3.1).

  Call (keyword-only): `apply(params, input_ids=…, input_mask=…, segment_ids=…, deterministic=True)`
  with each input `[batch, seq_len]` int32; returns `[batch, embedding_dim]` float32.
  """

  config: RetrieverConfig

  @nn.compact
  def __call__(self, *, input_ids: Array, input_mask: Array, segment_ids: Array,
               deterministic: bool = True) -> Array:
    cfg = self.config
    hidden = bert.BertEncoder(cfg.bert, name="bert")(
        input_ids=input_ids, input_mask=input_mask, segment_ids=segment_ids,
        deterministic=deterministic)
    hidden = hidden.astype(jnp.float32)
    if cfg.pooling == "mean":
      mask = input_mask.astype(jnp.float32)[..., None]
      pooled = (hidden * mask).sum(axis=-2) / jnp.maximum(mask.sum(axis=-2), 1e-9)
      norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
      return pooled / jnp.maximum(norm, 1e-12)
    cls = hidden[..., 0, :]
    if cfg.pooling == "pooler_projection":
      cls = nn.Dense(cfg.bert.hidden_size, kernel_init=nn.initializers.truncated_normal(0.02),
                     name="pooler")(cls)
      cls = jnp.tanh(cls)
    cls = nn.Dense(cfg.projection_size, kernel_init=nn.initializers.truncated_normal(0.02),
                   name="projection")(cls)
    cls = nn.LayerNorm(epsilon=cfg.bert.layer_norm_eps, name="projection_layer_norm")(cls)
    return nn.Dropout(cfg.bert.hidden_dropout)(cls, deterministic=deterministic)


class Retriever(nn.Module):
  """Query embedder Embed_input and document embedder Embed_doc (REALM §3.1, Eq. 1).

  Parameters live under `query_embedder/` and, when `share_embedders=False`, `document_embedder/`.
  Use `method=Retriever.embed_queries` / `method=Retriever.embed_documents` to run one tower; calling
  the module runs both (used for initialisation).
  """

  config: RetrieverConfig

  def setup(self):
    self.query_embedder = Embedder(self.config)
    if self.config.share_embedders:
      self.document_embedder = self.query_embedder
    else:
      self.document_embedder = Embedder(self.config)

  def embed_queries(self, *, input_ids: Array, input_mask: Array, segment_ids: Array | None = None,
                    deterministic: bool = True) -> Array:
    """Embeds `[CLS] x [SEP]` queries.

    Args:
      input_ids: `[..., query_len]` int32; leading dims are flattened and restored.
      input_mask: `[..., query_len]` int32, 1 for real tokens.
      segment_ids: `[..., query_len]` int32 (zeros when None).
      deterministic: disables dropout when True.

    Returns:
      `[..., embedding_dim]` float32 query embeddings.
    """
    return _apply_flat(self.query_embedder, input_ids=input_ids, input_mask=input_mask,
                       segment_ids=segment_ids, deterministic=deterministic)

  def embed_documents(self, *, input_ids: Array, input_mask: Array, segment_ids: Array,
                      deterministic: bool = True) -> Array:
    """Embeds `[CLS] title [SEP] body [SEP]` blocks: `[..., block_len]` int32 → `[..., dim]` float32."""
    return _apply_flat(self.document_embedder, input_ids=input_ids, input_mask=input_mask,
                       segment_ids=segment_ids, deterministic=deterministic)

  def __call__(self, *, query_input_ids: Array, query_input_mask: Array,
               document_input_ids: Array, document_input_mask: Array,
               document_segment_ids: Array, deterministic: bool = True) -> tuple[Array, Array]:
    """Embeds both; returns `([batch, dim], [batch, num_candidates, dim])` float32."""
    return (self.embed_queries(input_ids=query_input_ids, input_mask=query_input_mask,
                               deterministic=deterministic),
            self.embed_documents(input_ids=document_input_ids, input_mask=document_input_mask,
                                 segment_ids=document_segment_ids, deterministic=deterministic))


def _apply_flat(embedder: nn.Module, *, input_ids: Array, input_mask: Array,
                segment_ids: Array | None, deterministic: bool) -> Array:
  lead = input_ids.shape[:-1]
  seq_len = input_ids.shape[-1]
  if segment_ids is None:
    segment_ids = jnp.zeros_like(input_ids)
  flat = lambda x: x.reshape((-1, seq_len))  # noqa: E731
  out = embedder(input_ids=flat(input_ids), input_mask=flat(input_mask),
                 segment_ids=flat(segment_ids), deterministic=deterministic)
  return out.reshape(lead + out.shape[-1:])


def relevance_scores(query_embeddings: Array, document_embeddings: Array,
                     score_scale: float = 1.0) -> Array:
  """Relevance logits f(x, z) = scale · Embed_input(x)ᵀ Embed_doc(z) (REALM Eq. 1, before softmax).

  Args:
    query_embeddings: `[batch, dim]` float32.
    document_embeddings: `[batch, num_candidates, dim]` float32 (each query's own candidates).
    score_scale: multiplies the inner product (see `RetrieverConfig.score_scale`).

  Returns:
    `[batch, num_candidates]` float32 logits; `log_softmax` over the last axis gives log p(z|x).
  """
  return score_scale * jnp.einsum("bd,bkd->bk", query_embeddings.astype(jnp.float32),
                                  document_embeddings.astype(jnp.float32))
