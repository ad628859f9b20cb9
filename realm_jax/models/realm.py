"""Assembles the REALM model pieces from one `ModelConfig`: retriever, reader and their parameters.

The parameter tree of a whole run is a dict with one entry per module:
  `retriever` — `Retriever` params (query / document embedders, REALM §3.1);
  `reader`    — `SpanReader` params (Open-QA fine-tuning, §3.2 Eq. 3);
  `encoder`   — `KnowledgeAugmentedEncoder` params (pre-training, §3.2 Eq. 2).
Every BERT inside starts from the same pretrained checkpoint when one is given (REALM initialises all
of them from BERT, or from the ICT warm start for the retriever); heads are freshly initialised.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.models import bert
from realm_jax.models import checkpoint_import
from realm_jax.models import encoder as encoder_lib
from realm_jax.models import retriever as retriever_lib


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Which BERT, which pooling, which heads.

  Attributes:
    init_checkpoint: `"minilm"` (the installed all-MiniLM-L6-v2 package), a Hugging Face BERT
      directory (config.json + model.safetensors), or None for random initialisation from `bert`.
    bert: the encoder shape when `init_checkpoint` is None; with a checkpoint its `config.json`
      decides, and `bert` (if given) must agree on the shapes.
    pooling, projection_size, share_embedders, score_scale: see `RetrieverConfig`.
    span_hidden_size, max_span_width: see `ReaderConfig`.
    dtype: compute dtype of every BERT: "float32", "bfloat16", or "auto" (`bert.resolve_dtype`:
      bfloat16 on TPU/GPU and on CPUs with AMX/AVX512-BF16, else float32), resolved when the BERT
      config is built. Parameters and checkpoints stay float32 either way.

  Raises:
    ValueError: if neither a checkpoint nor a BERT shape is given.
  """

  init_checkpoint: str | None = "minilm"
  bert: bert.BertConfig | None = None
  pooling: str = "mean"
  projection_size: int = 128
  share_embedders: bool = True
  score_scale: float = 1.0
  span_hidden_size: int = 256
  max_span_width: int = 10
  dtype: str = "float32"

  def __post_init__(self):
    if self.init_checkpoint is None and self.bert is None:
      raise ValueError("ModelConfig: give init_checkpoint or a bert config")
    if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
      raise ValueError(f"ModelConfig: dtype={self.dtype!r} is not one of float32, bfloat16, "
                       "float16, auto")

  def checkpoint_dir(self) -> str | None:
    if self.init_checkpoint is None:
      return None
    if self.init_checkpoint == "minilm":
      return str(checkpoint_import.minilm_checkpoint_dir())
    return self.init_checkpoint

  def bert_config(self) -> bert.BertConfig:
    """The BERT shape: from the checkpoint's config.json, else `self.bert`."""
    ckpt = self.checkpoint_dir()
    if ckpt is None:
      return dataclasses.replace(self.bert, dtype=bert.resolve_dtype(self.dtype))
    cfg = checkpoint_import.config_from_json(os.path.join(ckpt, "config.json"))
    cfg = dataclasses.replace(cfg, dtype=bert.resolve_dtype(self.dtype))
    if self.bert is not None:
      for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
        if getattr(self.bert, name) != getattr(cfg, name):
          raise ValueError(f"ModelConfig.bert.{name}={getattr(self.bert, name)} disagrees with "
                           f"{ckpt}/config.json ({getattr(cfg, name)})")
      cfg = dataclasses.replace(cfg, remat=self.bert.remat, hidden_dropout=self.bert.hidden_dropout,
                                attention_dropout=self.bert.attention_dropout)
    return cfg

  def retriever_config(self) -> retriever_lib.RetrieverConfig:
    return retriever_lib.RetrieverConfig(
        bert=self.bert_config(), pooling=self.pooling, projection_size=self.projection_size,
        share_embedders=self.share_embedders, score_scale=self.score_scale)

  def reader_config(self) -> encoder_lib.ReaderConfig:
    return encoder_lib.ReaderConfig(bert=self.bert_config(), span_hidden_size=self.span_hidden_size,
                                    max_span_width=self.max_span_width)


def _dummy(shape):
  return jnp.ones(shape, jnp.int32)


def init_retriever(config: retriever_lib.RetrieverConfig, rng: jax.Array) -> Any:
  """Random retriever params (shapes independent of the sequence length)."""
  model = retriever_lib.Retriever(config)
  return model.init(rng, query_input_ids=_dummy((1, 8)), query_input_mask=_dummy((1, 8)),
                    document_input_ids=_dummy((1, 1, 8)), document_input_mask=_dummy((1, 1, 8)),
                    document_segment_ids=_dummy((1, 1, 8)))["params"]


def init_reader(config: encoder_lib.ReaderConfig, rng: jax.Array) -> Any:
  """Random span-reader params."""
  x = _dummy((1, 1, 8))
  return encoder_lib.SpanReader(config).init(rng, input_ids=x, input_mask=x, segment_ids=x,
                                             body_mask=x)["params"]


def init_encoder(config: bert.BertConfig, rng: jax.Array) -> Any:
  """Random knowledge-augmented-encoder (masked-LM) params."""
  x = _dummy((1, 1, 8))
  return encoder_lib.KnowledgeAugmentedEncoder(config).init(
      rng, input_ids=x, input_mask=x, segment_ids=x,
      mlm_positions=jnp.zeros((1, 1), jnp.int32))["params"]


def _graft(tree: dict, path: tuple[str, ...], value: Any) -> dict:
  """Returns a copy of nested dict `tree` with `tree[path] = value`, checking shapes match."""
  tree = dict(tree)
  if len(path) == 1:
    old_shapes = jax.tree_util.tree_map(np.shape, tree[path[0]])
    new_shapes = jax.tree_util.tree_map(np.shape, value)
    if old_shapes != new_shapes:
      raise ValueError(f"pretrained params for {'/'.join(path)} do not match the model's shapes")
    tree[path[0]] = jax.tree_util.tree_map(jnp.asarray, value)
    return tree
  tree[path[0]] = _graft(tree[path[0]], path[1:], value)
  return tree


def init_params(config: ModelConfig, rng: jax.Array, parts: tuple[str, ...] = ("retriever", "reader"),
                pretrained: bool = True) -> dict[str, Any]:
  """Initial parameters of the requested parts, BERTs loaded from the checkpoint when given.

  Args:
    config: the model configuration.
    rng: PRNG key for the heads (and for everything when there is no checkpoint).
    parts: any of `"retriever"`, `"reader"`, `"encoder"`.
    pretrained: load the BERTs from the checkpoint; False gives the random initialisation only
      (traceable: what `jax.eval_shape` needs for the shapes of a train state).

  Returns:
    `{part: params}` with float32 arrays.

  Raises:
    ValueError: on an unknown part, or when the checkpoint does not fit the model.
  """
  unknown = set(parts) - {"retriever", "reader", "encoder"}
  if unknown:
    raise ValueError(f"unknown model parts {sorted(unknown)}")
  rngs = dict(zip(("retriever", "reader", "encoder"), jax.random.split(rng, 3)))
  params: dict[str, Any] = {}
  if "retriever" in parts:
    params["retriever"] = init_retriever(config.retriever_config(), rngs["retriever"])
  if "reader" in parts:
    params["reader"] = init_reader(config.reader_config(), rngs["reader"])
  if "encoder" in parts:
    params["encoder"] = init_encoder(config.bert_config(), rngs["encoder"])
  ckpt_dir = config.checkpoint_dir() if pretrained else None
  if ckpt_dir is None:
    return params
  ckpt = checkpoint_import.load_bert_checkpoint(ckpt_dir, config.bert_config())
  logging.info("initialising %s from %s", ", ".join(parts), ckpt_dir)
  if "retriever" in params:
    params["retriever"] = _graft(params["retriever"], ("query_embedder", "bert"), ckpt.params)
    if not config.share_embedders:
      params["retriever"] = _graft(params["retriever"], ("document_embedder", "bert"), ckpt.params)
  if "reader" in params:
    params["reader"] = _graft(params["reader"], ("bert",), ckpt.params)
  if "encoder" in params:
    params["encoder"] = _graft(params["encoder"], ("bert",), ckpt.params)
    if ckpt.mlm_head is not None:
      params["encoder"] = _graft(params["encoder"], ("mlm_head",), ckpt.mlm_head)
    else:
      logging.info("%s has no masked-LM head: decoder tied to the word embeddings, transform "
                   "freshly initialised", ckpt_dir)
  return params
