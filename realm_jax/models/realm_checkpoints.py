"""The released REALM checkpoints (Hugging Face `models/realm`) → realm_jax parameters and index.

Google released REALM (Guu et al., 2020) as TF1 checkpoints; the Hugging Face port (transformers
`models/realm`, last shipped in transformers 4.40.2) converted them to PyTorch:

| hub name (google/…)               | class                      | realm_jax parts                 |
|-----------------------------------|----------------------------|---------------------------------|
| realm-cc-news-pretrained-embedder | `RealmEmbedder`            | `retriever`                     |
| realm-cc-news-pretrained-scorer   | `RealmScorer`              | `retriever`                     |
| realm-cc-news-pretrained-encoder  | `RealmKnowledgeAugEncoder` | `encoder`                       |
| realm-cc-news-pretrained-openqa,  | `RealmForOpenQA`           | `retriever`, `reader`,          |
| realm-orqa-{nq,wq}-openqa         |                            | `block_emb` → snapshot          |
| (a `RealmReader` state dict)      | `RealmReader`              | `reader`                        |

This module maps their state dicts onto the parameter trees of `realm.init_params` (one entry per
part), reusing `checkpoint_import`'s tensor-by-tensor BERT mapping for every `realm.*` encoder:

* Embedder (REALM §3.1, Embed_input / Embed_doc): `realm.*` → `bert/`; `realm.pooler.dense` →
  `pooler/` (tanh); `cls.dense` → `projection/`; `cls.LayerNorm` → `projection_layer_norm/`. The
  released embedders project BERT's *pooled* output tanh(W [CLS] + b), as the official code does, so
  the retriever config uses pooling `"pooler_projection"` (`RetrieverConfig`). `cls.predictions.*`
  (an MLM head `RealmScorerProjection` carries but never calls) is dropped.
* `RealmScorer` has one `embedder` for queries and candidates (`query_embedder` is the same module,
  so state dicts repeat it as identical `query_embedder.*` copies) → `share_embedders=True`. If
  the `query_embedder.*` tensors differ from `embedder.*`, they become `query_embedder/` and
  `embedder.*` becomes `document_embedder/` (`share_embedders=False`).
* Knowledge-augmented encoder (§3.2, Eq. 2): `realm.*` → `bert/`, `cls.predictions.*` →
  `mlm_head/{transform, transform_layer_norm, output_bias}`; the decoder is tied to the word
  embeddings (as transformers ties it); `realm.pooler.*` is unused and dropped.
* Reader (§3.2, Eq. 3; ORQA §4.2): `realm.*` → `bert/`; `qa_outputs.dense_intermediate` [2·s, h] →
  `span_endpoints/` (its first s outputs are the start projection, the last s the end projection,
  `chunk(2, dim=-1)` in `RealmReaderProjection` and `jnp.split(…, 2)` in `SpanReader`);
  `qa_outputs.layer_normalization` → `span_layer_norm/` (ε = `reader_layer_norm_eps` = 1e-3);
  `qa_outputs.dense_output` → `span_logits/`. `RealmReaderProjection` scores span (i, j) as
  dense_output(LayerNorm(ReLU(start[i] + end[j]))), exactly `SpanReader`'s formula; it enumerates
  spans width-major where `span_candidates` is end-major (same set, another order).
  `cls.predictions.*` and `realm.pooler.*` are unused by the reader and dropped.
* `RealmForOpenQA`: `embedder.*` (the fine-tuned query tower) and `reader.*` as above, plus the
  `block_emb` buffer `[num_block_records, projection_size]` (the frozen document index of the
  Wikipedia blocks, embedded by the pre-trained document tower, which the checkpoint does not hold):
  `write_block_emb_snapshot` turns it into an embedding snapshot (`retrieval/snapshot.py`), rows
  `0 … num_blocks−1` = the rows of the matching `block_records` file. Its retriever params hold the
  query tower only; the documents must come from that snapshot.

Reading needs no PyTorch: checkpoints are read from safetensors. The hub's files are
`pytorch_model.bin`; convert them once where PyTorch is installed, with `pytorch_bin_to_safetensors`
(aliases such as `query_embedder.*` / `cls.predictions.decoder.bias` are written once and listed in
the file's metadata; note that transformers 4.40.2's own `save_pretrained` refuses to write these
models as safetensors), or, in an environment with only torch and safetensors:

    python -c "import torch, safetensors.torch as st; \
      sd = torch.load('pytorch_model.bin', map_location='cpu', weights_only=True); \
      st.save_file({k: v.contiguous().clone() for k, v in sd.items()}, 'model.safetensors')"

then copy `config.json` beside it. Both layouts load, and so does a model written with
`safetensors.torch.save_model` (each shared tensor stored once, `{dropped: kept}` in the file's
metadata; a tied `RealmKnowledgeAugEncoder` keeps only `cls.predictions.decoder.weight`).

Two properties of the released checkpoints need realm_jax support. Their activation is
`RealmConfig`'s default `hidden_act="gelu_new"` (the tanh-approximate GELU of the original TF BERT
they were converted from; against the exact GELU it moves the relevance scores of a small random
REALM by 2.7e-3), which `BertConfig.hidden_act` must express; and the pooled-output projection
needs `RetrieverConfig(pooling="pooler_projection")`. The loader reads the activation from
`config.json` and refuses a checkpoint whose activation or pooling the installed realm_jax cannot
compute.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from realm_jax.models import checkpoint_import as ci
from realm_jax.models import encoder as encoder_lib
from realm_jax.models import realm
from realm_jax.models import retriever as retriever_lib
from realm_jax.models.bert import BertConfig

PathLike = str | os.PathLike
Params = dict[str, Any]

ARCHITECTURES = ("RealmEmbedder", "RealmScorer", "RealmKnowledgeAugEncoder", "RealmReader",
                 "RealmForOpenQA")
EMBEDDER_POOLING = "pooler_projection"
CONVERTED_PARAMS_NAME = "realm_params.safetensors"
CONVERTED_CONFIG_NAME = "realm_config.json"
CONVERTED_FORMAT_VERSION = 1
ALIASES_METADATA_KEY = "realm_jax_aliases"

# `SpanReader`'s LayerNorm epsilon (fixed in `encoder.SpanReader`, as in the official ORQA reader).
SPAN_LAYER_NORM_EPS = 1e-3
# Hugging Face activation name -> the GELU it computes ("gelu": exact erf form; "gelu_new": tanh).
_GELUS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_new",
          "gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new"}
# `RealmConfig`'s defaults (transformers 4.40.2), used for fields a config.json leaves out.
_REALM_DEFAULTS = {
    "vocab_size": 30522, "hidden_size": 768, "retriever_proj_size": 128, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_candidates": 8, "intermediate_size": 3072,
    "hidden_act": "gelu_new", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
    "span_hidden_size": 256, "max_span_width": 10, "reader_layer_norm_eps": 1e-3,
    "reader_beam_size": 5, "reader_seq_len": 320, "num_block_records": 13353718,
    "searcher_beam_size": 5000, "tie_word_embeddings": True,
}
_CONFIG_NAME = "config.json"
_WEIGHTS_NAME = "model.safetensors"
_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_BIN_NAME = "pytorch_model.bin"
_BIN_INDEX_NAME = "pytorch_model.bin.index.json"
_WORD_EMBEDDINGS = "realm.embeddings.word_embeddings.weight"
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json")
# Non-persistent buffers that older transformers versions still wrote into state dicts.
_BUFFER_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
_MAX_LISTED = ci._MAX_LISTED


class CheckpointMismatchError(ci.CheckpointMismatchError):
  """A REALM checkpoint does not fit its `config.json` or the realm_jax modules.

  A `checkpoint_import.CheckpointMismatchError` (so a `ValueError`) with the same attributes.

  Attributes:
    source: the file or directory that was read.
    problems: one human-readable line per offending parameter.
  """

  def __init__(self, source: str, problems: list[str]):
    super().__init__(source, problems)
    listed = self.problems[:_MAX_LISTED]
    more = len(self.problems) - len(listed)
    lines = "\n  ".join(listed + ([f"... and {more} more"] if more > 0 else []))
    self.args = (f"REALM checkpoint {source} does not match its config or realm_jax's "
                 f"modules:\n  {lines}",)


# ----------------------------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RealmHParams:
  """The fields of a Hugging Face `RealmConfig` (`config.json`) that realm_jax uses.

  Attributes:
    bert: the shape of every BERT in the checkpoint (they all share one `RealmConfig`).
    hidden_act: the checkpoint's activation name (`"gelu_new"` in the released checkpoints).
    projection_size: `retriever_proj_size`, the embedding width (128).
    span_hidden_size: width of each half of the reader's span MLP (256).
    max_span_width: longest answer span in wordpieces (10).
    reader_layer_norm_eps: epsilon of the span MLP's LayerNorm (1e-3).
    num_block_records: rows of `block_emb` (13,353,718 Wikipedia blocks).
    num_candidates: retrieved documents per query in pre-training (8).
    reader_beam_size: blocks read per question (5).
    reader_seq_len: reader input length (288 + 32).
    searcher_beam_size: blocks retrieved per question in fine-tuning (5000).
    tie_word_embeddings: whether the MLM decoder is the word-embedding matrix (transformers ties
      it).
    architectures: the `architectures` entry of `config.json` (may be empty).
    raw: the whole `config.json` dictionary.
  """

  bert: BertConfig
  hidden_act: str
  projection_size: int
  span_hidden_size: int
  max_span_width: int
  reader_layer_norm_eps: float
  num_block_records: int
  num_candidates: int
  reader_beam_size: int
  reader_seq_len: int
  searcher_beam_size: int
  tie_word_embeddings: bool
  architectures: tuple[str, ...] = ()
  raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)


def _bert_config(hf: Mapping[str, Any], where: str, dtype: str | None) -> BertConfig:
  """The `BertConfig` of a RealmConfig dict; refuses an activation BertEncoder does not compute."""
  act = hf["hidden_act"]
  if act not in _GELUS:
    raise ValueError(f"{where}: hidden_act={act!r} is not supported (expected one of "
                     f"{sorted(_GELUS)})")
  try:
    config = BertConfig.from_hf_config(dict(hf))
    if dtype is not None:
      config = dataclasses.replace(config, dtype=dtype)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{where}: {e}") from e
  # A BertConfig without a `hidden_act` field computes the exact (erf) GELU.
  computed = getattr(config, "hidden_act", "gelu")
  if _GELUS.get(computed, computed) != _GELUS[act]:
    kind = "tanh-approximate" if _GELUS[act] == "gelu_new" else "exact"
    raise ValueError(
        f"{where}: hidden_act={act!r} is the {kind} GELU, but realm_jax.models.bert.BertConfig "
        f"computes hidden_act={computed!r}; this realm_jax cannot reproduce the checkpoint "
        f"(BertConfig needs hidden_act={_GELUS[act]!r})")
  return config


def realm_config_from_json(config_file: PathLike, dtype: str | None = None) -> RealmHParams:
  """Reads a Hugging Face `RealmConfig` `config.json`.

  Fields the file leaves out take `RealmConfig`'s defaults (as transformers does).

  Args:
    config_file: path to the checkpoint's `config.json`.
    dtype: compute dtype of the returned `BertConfig` ("float32", "bfloat16", "float16"); None
      keeps float32.

  Returns:
    The `RealmHParams`.

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: naming the file and field for invalid JSON, `model_type` other than "realm",
      relative position embeddings, an activation other than a GELU or one this realm_jax's
      `BertConfig` cannot compute, or inconsistent sizes.
  """
  config_file = pathlib.Path(config_file)
  if not config_file.is_file():
    raise FileNotFoundError(f"realm_config_from_json: {config_file} does not exist")
  try:
    raw = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_file}: invalid JSON ({e})") from e
  if not isinstance(raw, dict):
    raise ValueError(f"{config_file}: expected a JSON object")
  model_type = raw.get("model_type", "realm")
  if model_type != "realm":
    raise ValueError(f"{config_file}: model_type={model_type!r} is not 'realm' (for BERT "
                     "checkpoints use checkpoint_import.load_bert_checkpoint)")
  pos = raw.get("position_embedding_type", "absolute")
  if pos != "absolute":
    raise ValueError(f"{config_file}: position_embedding_type={pos!r} is not supported "
                     "(BertEncoder uses absolute position embeddings)")
  hf = {**_REALM_DEFAULTS, **raw}
  for field in ("retriever_proj_size", "span_hidden_size", "max_span_width", "num_block_records",
                "num_candidates", "reader_beam_size", "reader_seq_len", "searcher_beam_size"):
    if not isinstance(hf[field], int) or isinstance(hf[field], bool) or hf[field] <= 0:
      raise ValueError(f"{config_file}: field {field!r} must be a positive integer, got "
                       f"{hf[field]!r}")
  architectures = raw.get("architectures") or ()
  if not isinstance(architectures, (list, tuple)):
    raise ValueError(f"{config_file}: field 'architectures' must be a list, got {architectures!r}")
  return RealmHParams(
      bert=_bert_config(hf, str(config_file), dtype),
      hidden_act=hf["hidden_act"],
      projection_size=hf["retriever_proj_size"],
      span_hidden_size=hf["span_hidden_size"],
      max_span_width=hf["max_span_width"],
      reader_layer_norm_eps=float(hf["reader_layer_norm_eps"]),
      num_block_records=hf["num_block_records"],
      num_candidates=hf["num_candidates"],
      reader_beam_size=hf["reader_beam_size"],
      reader_seq_len=hf["reader_seq_len"],
      searcher_beam_size=hf["searcher_beam_size"],
      tie_word_embeddings=bool(hf["tie_word_embeddings"]),
      architectures=tuple(architectures),
      raw=raw)


# ----------------------------------------------------------------------------------------------
# The converted checkpoint.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RealmCheckpoint:
  """A REALM checkpoint converted to realm_jax parameter trees (all leaves numpy float32).

  Attributes:
    architecture: one of `ARCHITECTURES`.
    hparams: the checkpoint's configuration.
    params: `{part: tree}` for the parts the checkpoint holds, each exactly the tree of
      `realm.init_params(...)[part]`: `"retriever"` (`Retriever`, pooling `"pooler_projection"`),
      `"encoder"` (`KnowledgeAugmentedEncoder`), `"reader"` (`SpanReader`).
    share_embedders: whether the retriever has one tower for queries and documents.
    block_emb: `[num_block_records, projection_size]` float32 document embeddings of a
      `RealmForOpenQA` checkpoint, else None.
    source: the safetensors file(s) read.
    ignored_keys: checkpoint keys read but deliberately dropped (unused heads, tied or aliased
      copies, buffers), or unexpected keys dropped with `strict=False`.
  """

  architecture: str
  hparams: RealmHParams
  params: dict[str, Params]
  share_embedders: bool
  block_emb: np.ndarray | None
  source: str
  ignored_keys: tuple[str, ...] = ()

  @property
  def parts(self) -> tuple[str, ...]:
    """The parts present, in `("retriever", "encoder", "reader")` order."""
    return tuple(p for p in ("retriever", "encoder", "reader") if p in self.params)

  def retriever_config(self) -> retriever_lib.RetrieverConfig:
    """The `RetrieverConfig` the converted retriever params belong to.

    Raises:
      ValueError: if the checkpoint has no retriever.
    """
    _require_part(self, "retriever")
    return retriever_lib.RetrieverConfig(
        bert=self.hparams.bert, pooling=EMBEDDER_POOLING,
        projection_size=self.hparams.projection_size, share_embedders=self.share_embedders,
        score_scale=1.0)

  def reader_config(self) -> encoder_lib.ReaderConfig:
    """The `ReaderConfig` of the converted span reader.

    Raises:
      ValueError: if the checkpoint has no reader.
    """
    _require_part(self, "reader")
    return encoder_lib.ReaderConfig(bert=self.hparams.bert,
                                    span_hidden_size=self.hparams.span_hidden_size,
                                    max_span_width=self.hparams.max_span_width)

  def encoder_config(self) -> BertConfig:
    """The `BertConfig` of the converted `KnowledgeAugmentedEncoder`.

    Raises:
      ValueError: if the checkpoint has no knowledge-augmented encoder.
    """
    _require_part(self, "encoder")
    return self.hparams.bert


def _require_part(ckpt: RealmCheckpoint, part: str) -> None:
  if part not in ckpt.params:
    raise ValueError(f"{ckpt.source}: a {ckpt.architecture} checkpoint has no {part!r} part "
                     f"(it has {list(ckpt.parts)})")


# ----------------------------------------------------------------------------------------------
# Tensor mapping.
# ----------------------------------------------------------------------------------------------


def _nest(specs: Sequence[ci._Spec], hf_prefix: str,
          flax_prefix: tuple[str, ...]) -> list[ci._Spec]:
  """`specs` with `hf_prefix` prepended to every HF name and `flax_prefix` to every Flax path."""
  return [dataclasses.replace(s, hf_name=hf_prefix + s.hf_name, flax_path=flax_prefix + s.flax_path)
          for s in specs]


def _bert_specs(hp: RealmHParams, prefix: str) -> list[ci._Spec]:
  """`{prefix}realm.embeddings.*`, `{prefix}realm.encoder.*` → `bert/…`."""
  return _nest(ci._encoder_specs(hp.bert), f"{prefix}realm.", ("bert",))


def _embedder_specs(hp: RealmHParams, prefix: str) -> list[ci._Spec]:
  """`RealmEmbedder`: BERT, pooler (tanh), projection and its LayerNorm (REALM §3.1)."""
  h, p = hp.bert.hidden_size, hp.projection_size
  return (_bert_specs(hp, prefix)
          + ci._linear(f"{prefix}realm.pooler.dense", ("pooler",), h, h)
          + ci._linear(f"{prefix}cls.dense", ("projection",), h, p)
          + ci._layer_norm(f"{prefix}cls.LayerNorm", ("projection_layer_norm",), p))


def _encoder_part_specs(hp: RealmHParams) -> list[ci._Spec]:
  """`RealmKnowledgeAugEncoder`: BERT and the MLM head (decoder tied; REALM §3.2, Eq. 2)."""
  return _bert_specs(hp, "") + _nest(ci._mlm_specs(hp.bert), "", ("mlm_head",))


def _reader_specs(hp: RealmHParams, prefix: str) -> list[ci._Spec]:
  """`RealmReader`: BERT and `qa_outputs` → `span_endpoints`, `span_layer_norm`, `span_logits`."""
  h, s = hp.bert.hidden_size, hp.span_hidden_size
  qa = f"{prefix}qa_outputs"
  return (_bert_specs(hp, prefix)
          + ci._linear(f"{qa}.dense_intermediate", ("span_endpoints",), h, 2 * s)
          + ci._layer_norm(f"{qa}.layer_normalization", ("span_layer_norm",), s)
          + ci._linear(f"{qa}.dense_output", ("span_logits",), s, 1))


class _TensorPool:
  """The checkpoint's tensors, consumed spec by spec; collects the problems it finds."""

  def __init__(self, raw: Mapping[str, np.ndarray], source: str):
    self.source = source
    self.tensors: dict[str, np.ndarray] = {}
    self.original: dict[str, str] = {}
    self.ignored: list[str] = []
    self.problems: list[str] = []
    for key, value in raw.items():
      if key.endswith(_BUFFER_SUFFIXES):
        self.ignored.append(key)
        continue
      name = ci._normalise_key(key)
      if name in self.tensors:
        raise CheckpointMismatchError(
            source, [f"{self.original[name]!r} and {key!r} both map to {name!r}"])
      self.tensors[name], self.original[name] = value, key

  def has_prefix(self, prefix: str) -> bool:
    return any(name.startswith(prefix) for name in self.tensors)

  def pop(self, name: str) -> np.ndarray | None:
    """Removes and returns one tensor (None when absent); the caller accounts for it."""
    return self.tensors.pop(name, None)

  def drop_prefix(self, prefix: str) -> None:
    """Marks every remaining tensor under `prefix` as deliberately ignored."""
    for name in [n for n in self.tensors if n.startswith(prefix)]:
      self.tensors.pop(name)
      self.ignored.append(self.original[name])

  def convert(self, specs: Sequence[ci._Spec]) -> Params:
    """Pops the tensors of `specs` into a Flax tree, recording missing / mis-shaped ones."""
    tree: Params = {}
    for spec in specs:
      value = self.tensors.pop(spec.hf_name, None)
      if value is None:
        self.problems.append(f"missing parameter {spec.hf_name!r} (expected shape "
                             f"{spec.hf_shape})")
        continue
      if tuple(value.shape) != spec.hf_shape:
        self.problems.append(f"parameter {self.original[spec.hf_name]!r}: expected shape "
                             f"{spec.hf_shape}, found {tuple(value.shape)}")
        continue
      ci._set(tree, spec.flax_path, ci._to_flax(spec, value.astype(np.float32)))
    return tree


def detect_architecture(keys: Sequence[str]) -> str | None:
  """Which REALM class wrote a state dict, from its key names (None when none fits).

  Args:
    keys: the state-dict keys.

  Returns:
    One of `ARCHITECTURES`, or None.
  """
  keys = set(keys)

  def has(prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)

  if "block_emb" in keys or (has("embedder.") and has("reader.")):
    return "RealmForOpenQA"
  if has("embedder."):
    return "RealmScorer"
  if has("qa_outputs."):
    return "RealmReader"
  if "cls.dense.weight" in keys or "cls.LayerNorm.weight" in keys:
    return "RealmEmbedder"
  if has("realm.") and has("cls.predictions."):
    return "RealmKnowledgeAugEncoder"
  return None


def _trees_equal(a: Params, b: Params) -> bool:
  fa, fb = ci._flatten(a), ci._flatten(b)
  return fa.keys() == fb.keys() and all(
      fa[k].shape == fb[k].shape and np.array_equal(fa[k], fb[k]) for k in fa)


def _convert_retriever(pool: _TensorPool, hp: RealmHParams, architecture: str
                       ) -> tuple[Params, bool]:
  """Retriever params from `[embedder.]realm.*`, `[embedder.]cls.{dense,LayerNorm}`."""
  prefix = "" if architecture == "RealmEmbedder" else "embedder."
  tower = pool.convert(_embedder_specs(hp, prefix))
  pool.drop_prefix(f"{prefix}cls.predictions.")
  if architecture != "RealmScorer" or not pool.has_prefix("query_embedder."):
    return {"query_embedder": tower}, True
  # The scorer's `query_embedder` is `embedder` unless it was built with another one.
  query = pool.convert(_embedder_specs(hp, "query_embedder."))
  pool.drop_prefix("query_embedder.cls.predictions.")
  if _trees_equal(query, tower):
    pool.ignored.extend(pool.original[s.hf_name] for s in _embedder_specs(hp, "query_embedder."))
    return {"query_embedder": tower}, True
  logging.info("%s: query_embedder.* differs from embedder.*: separate query and document towers",
               pool.source)
  return {"query_embedder": query, "document_embedder": tower}, False


def _convert_encoder(pool: _TensorPool, hp: RealmHParams) -> Params:
  """Knowledge-augmented encoder params; checks the tied decoder like transformers ties it."""
  if "cls.predictions.bias" not in pool.tensors and "cls.predictions.decoder.bias" in pool.tensors:
    pool.tensors["cls.predictions.bias"] = pool.tensors.pop("cls.predictions.decoder.bias")
    pool.original["cls.predictions.bias"] = pool.original["cls.predictions.decoder.bias"]
  decoder = pool.pop("cls.predictions.decoder.weight")
  decoder_bias = pool.pop("cls.predictions.decoder.bias")
  decoder_as_word = (_WORD_EMBEDDINGS not in pool.tensors and decoder is not None
                     and hp.tie_word_embeddings)
  if decoder_as_word:
    # A tied model saved without alias metadata: the decoder *is* the word-embedding matrix.
    logging.info("%s: no %r; using the tied 'cls.predictions.decoder.weight' "
                 "(tie_word_embeddings=true)", pool.source, _WORD_EMBEDDINGS)
    pool.tensors[_WORD_EMBEDDINGS] = decoder
    pool.original[_WORD_EMBEDDINGS] = pool.original["cls.predictions.decoder.weight"]
  elif _WORD_EMBEDDINGS not in pool.tensors and decoder is not None:
    pool.problems.append(f"'cls.predictions.decoder.weight' cannot stand in for the missing "
                         f"{_WORD_EMBEDDINGS!r}: config.json has tie_word_embeddings=false")
  tree = pool.convert(_encoder_part_specs(hp))
  pool.drop_prefix("realm.pooler.")
  word = ci._get(tree, ("bert", "embeddings", "word_embeddings", "embedding"))
  if decoder is not None and not decoder_as_word:
    pool.ignored.append(pool.original["cls.predictions.decoder.weight"])
    if word is not None and decoder.shape != word.shape:
      pool.problems.append(f"parameter 'cls.predictions.decoder.weight': expected shape "
                           f"{word.shape}, found {tuple(decoder.shape)}")
    elif word is not None:
      diff = float(np.max(np.abs(decoder.astype(np.float32) - word)))
      if diff > 0 and not hp.tie_word_embeddings:
        pool.problems.append(
            "parameter 'cls.predictions.decoder.weight' differs from the word embeddings (max abs "
            f"difference {diff:.3g}) and config.json has tie_word_embeddings=false; "
            "KnowledgeAugmentedEncoder always ties its decoder")
      elif diff > 0:
        logging.warning("%s: cls.predictions.decoder.weight differs from the word embeddings (max "
                        "abs difference %.3g); transformers ties them, and so does realm_jax",
                        pool.source, diff)
  if decoder_bias is not None:
    pool.ignored.append(pool.original["cls.predictions.decoder.bias"])
    bias = ci._get(tree, ("mlm_head", "output_bias"))
    if bias is not None and (decoder_bias.shape != bias.shape
                             or not np.array_equal(decoder_bias.astype(np.float32), bias)):
      pool.problems.append("parameter 'cls.predictions.decoder.bias' differs from "
                           "'cls.predictions.bias' (transformers aliases the two)")
  return tree


def _convert_reader(pool: _TensorPool, hp: RealmHParams, prefix: str) -> Params:
  """Span-reader params from `[reader.]realm.*` and `[reader.]qa_outputs.*` (ORQA §4.2)."""
  if not np.isclose(hp.reader_layer_norm_eps, SPAN_LAYER_NORM_EPS, rtol=1e-6, atol=0):
    pool.problems.append(f"config.json: reader_layer_norm_eps={hp.reader_layer_norm_eps} but "
                         f"SpanReader's LayerNorm uses {SPAN_LAYER_NORM_EPS}")
  tree = pool.convert(_reader_specs(hp, prefix))
  pool.drop_prefix(f"{prefix}cls.predictions.")
  pool.drop_prefix(f"{prefix}realm.pooler.")
  return tree


# ----------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------


def _resolve_files(path: pathlib.Path) -> tuple[list[pathlib.Path], pathlib.Path]:
  """Returns (safetensors files, config.json) of a checkpoint directory or file."""
  if not path.exists():
    raise FileNotFoundError(f"load_realm_checkpoint: path={str(path)!r} does not exist")
  if path.is_file():
    if path.suffix != ".safetensors":
      raise ValueError(f"load_realm_checkpoint: path={str(path)!r} is not a .safetensors file; "
                       "convert PyTorch checkpoints first with pytorch_bin_to_safetensors (needs "
                       "torch) or convert_released_checkpoint")
    files, directory = [path], path.parent
  else:
    directory = path
    weights, index = path / _WEIGHTS_NAME, path / _WEIGHTS_INDEX_NAME
    if weights.is_file():
      files = [weights]
    elif index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index (field 'weight_map': {e})") from e
      files = [path / name for name in sorted(set(weight_map.values()))]
    elif (path / _BIN_NAME).is_file() or (path / _BIN_INDEX_NAME).is_file():
      raise FileNotFoundError(
          f"load_realm_checkpoint: directory path={str(path)!r} holds a PyTorch checkpoint "
          f"({_BIN_NAME}) but no {_WEIGHTS_NAME}; convert it where PyTorch is installed with "
          "realm_checkpoints.pytorch_bin_to_safetensors(path, out_dir) (or "
          "convert_released_checkpoint, which does it for you)")
    else:
      found = sorted(p.name for p in path.iterdir())
      raise FileNotFoundError(f"load_realm_checkpoint: directory path={str(path)!r} has no "
                              f"{_WEIGHTS_NAME} (found: {found})")
  config_file = directory / _CONFIG_NAME
  if not config_file.is_file():
    raise FileNotFoundError(f"load_realm_checkpoint: {config_file} not found (the RealmConfig "
                            "of the checkpoint is needed)")
  return files, config_file


def _file_aliases(files: Sequence[pathlib.Path], tensors: Mapping[str, Any]) -> dict[str, str]:
  """The shared tensors the writers of `files` dropped: `{dropped name: kept name}`.

  Two writers record them in the safetensors metadata: `pytorch_bin_to_safetensors` as JSON under
  `ALIASES_METADATA_KEY`, and `safetensors.torch.save_model` as one plain entry per dropped name
  (`metadata[dropped] = kept`; a tied `RealmKnowledgeAugEncoder` keeps
  `cls.predictions.decoder.weight` and drops `realm.embeddings.word_embeddings.weight`). Only
  entries whose dropped name is absent from `tensors` and whose kept name is present count, so
  other metadata ("format": "pt") is never mistaken for an alias.

  Raises:
    ValueError: naming the file if it is unreadable or its `ALIASES_METADATA_KEY` is not JSON.
  """
  aliases: dict[str, str] = {}
  for file in files:
    try:
      with safe_open(str(file), framework="numpy") as f:
        metadata = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own SafetensorError.
      raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
    entries = dict(metadata)
    if ALIASES_METADATA_KEY in entries:
      try:
        recorded = json.loads(entries.pop(ALIASES_METADATA_KEY))
      except json.JSONDecodeError as e:
        raise ValueError(f"{file}: metadata {ALIASES_METADATA_KEY!r} is not JSON ({e})") from e
      if not isinstance(recorded, dict):
        raise ValueError(f"{file}: metadata {ALIASES_METADATA_KEY!r} must be a JSON object of "
                         f"names, got {type(recorded).__name__}")
      entries.update(recorded)
    for dropped, kept in entries.items():
      if isinstance(kept, str) and dropped not in tensors and kept in tensors:
        aliases[dropped] = kept
  return aliases


def load_realm_checkpoint(path: PathLike,
                          *,
                          architecture: str | None = None,
                          dtype: str | None = None,
                          strict: bool = True) -> RealmCheckpoint:
  """Converts a Hugging Face REALM checkpoint (safetensors) into realm_jax parameters.

  Pure numpy: no PyTorch needed. See the module docstring for the tensor mapping. Shared tensors
  that the writer stored once (`pytorch_bin_to_safetensors`, or `safetensors.torch.save_model`,
  which keeps a tied encoder's matrix as `cls.predictions.decoder.weight` only) are restored from
  the file's alias metadata; without metadata, a missing word-embedding matrix of a
  `RealmKnowledgeAugEncoder` is taken from the decoder when `tie_word_embeddings` holds.

  Args:
    path: a directory with `config.json` and `model.safetensors` (or a sharded
      `model.safetensors.index.json`), or a `.safetensors` file with `config.json` beside it.
    architecture: force one of `ARCHITECTURES`; by default it is detected from the key names and
      checked against `config.json`'s `architectures`.
    dtype: compute dtype of the returned BERT configs ("float32", "bfloat16", "float16"); the
      parameters are float32 numpy arrays whatever the storage dtype.
    strict: if True, tensors the mapping does not know raise `CheckpointMismatchError`; if False
      they are dropped with a warning.

  Returns:
    A `RealmCheckpoint` whose `params[part]` trees equal `realm.init_params`'s in structure and
    shapes.

  Raises:
    FileNotFoundError: if the path, its weights or its `config.json` do not exist, or the directory
      holds only a PyTorch `.bin` checkpoint (the message says how to convert it).
    ValueError: for an unreadable file, an unsupported `config.json` (naming the field), an unknown
      `architecture`, or a state dict of another class than `config.json` names.
    CheckpointMismatchError: naming every parameter that is missing, mis-shaped, unexpected
      (`strict=True`) or inconsistent (an untied decoder, a `block_emb` of the wrong shape).
  """
  path = pathlib.Path(path)
  files, config_file = _resolve_files(path)
  hp = realm_config_from_json(config_file, dtype=dtype)
  source = str(files[0]) if len(files) == 1 else f"{path} ({len(files)} shards)"
  raw = ci._read_safetensors(files)
  for dropped, kept in _file_aliases(files, raw).items():
    raw[dropped] = raw[kept]
  detected = detect_architecture(list(raw))
  if architecture is not None:
    if architecture not in ARCHITECTURES:
      raise ValueError(f"load_realm_checkpoint: architecture={architecture!r} is not one of "
                       f"{ARCHITECTURES}")
  else:
    if detected is None:
      raise CheckpointMismatchError(source, [
          "no REALM model found: expected keys such as 'realm.embeddings.word_embeddings.weight' "
          "with 'cls.dense.weight' (RealmEmbedder), 'cls.predictions.*' "
          "(RealmKnowledgeAugEncoder), 'qa_outputs.*' (RealmReader), 'embedder.*' (RealmScorer) "
          f"or 'block_emb' (RealmForOpenQA); found {sorted(raw)[:8]}"])
    named = [a for a in hp.architectures if a in ARCHITECTURES]
    if named and detected not in named:
      raise ValueError(f"{config_file}: field 'architectures' is {list(hp.architectures)} but the "
                       f"tensors in {source} are a {detected} state dict")
    architecture = detected

  pool = _TensorPool(raw, source)
  params: dict[str, Params] = {}
  share_embedders = True
  block_emb = None
  if architecture in ("RealmEmbedder", "RealmScorer", "RealmForOpenQA"):
    if EMBEDDER_POOLING not in retriever_lib.POOLINGS:
      raise ValueError(f"{source}: the REALM embedder projects BERT's pooled output; this "
                       f"realm_jax's Retriever has no pooling {EMBEDDER_POOLING!r} (it has "
                       f"{retriever_lib.POOLINGS})")
    params["retriever"], share_embedders = _convert_retriever(pool, hp, architecture)
  if architecture == "RealmKnowledgeAugEncoder":
    params["encoder"] = _convert_encoder(pool, hp)
  if architecture in ("RealmReader", "RealmForOpenQA"):
    params["reader"] = _convert_reader(pool, hp,
                                       "reader." if architecture == "RealmForOpenQA" else "")
  if architecture == "RealmForOpenQA":
    block_emb = pool.pop("block_emb")
    expected = (hp.num_block_records, hp.projection_size)
    if block_emb is None:
      pool.problems.append(f"missing buffer 'block_emb' (expected shape {expected})")
    elif tuple(block_emb.shape) != expected:
      pool.problems.append(f"buffer 'block_emb': expected shape {expected} "
                           f"(num_block_records, retriever_proj_size), found "
                           f"{tuple(block_emb.shape)}")
      block_emb = None
    else:
      block_emb = np.ascontiguousarray(block_emb, dtype=np.float32)

  unexpected = sorted(pool.original[name] for name in pool.tensors)
  if unexpected:
    listed = unexpected[:_MAX_LISTED]
    if strict:
      pool.problems.append(f"unexpected parameters for a {architecture} ({len(unexpected)}): "
                           f"{listed}{' ...' if len(unexpected) > _MAX_LISTED else ''} "
                           "(pass strict=False to drop them)")
    else:
      logging.warning("%s: dropping %d parameters a %s does not use: %s", source, len(unexpected),
                      architecture, listed)
      pool.ignored.extend(unexpected)
  if pool.problems:
    raise CheckpointMismatchError(source, pool.problems)
  logging.info("Loaded %s checkpoint %s: parts %s, %d layers, hidden %d, share_embedders=%s",
               architecture, source, sorted(params), hp.bert.num_layers, hp.bert.hidden_size,
               share_embedders)
  return RealmCheckpoint(architecture=architecture, hparams=hp, params=params,
                         share_embedders=share_embedders, block_emb=block_emb, source=source,
                         ignored_keys=tuple(sorted(pool.ignored)))


# ----------------------------------------------------------------------------------------------
# PyTorch .bin -> safetensors (needs torch).
# ----------------------------------------------------------------------------------------------


def pytorch_bin_to_safetensors(src: PathLike, dst_dir: PathLike) -> pathlib.Path:
  """Rewrites a PyTorch REALM checkpoint (`pytorch_model.bin`, as on the hub) as safetensors.

  Needs PyTorch (imported here only). Tensors that are views of one another with the same shape
  (transformers' shared `query_embedder` / `embedder`, `cls.predictions.decoder.bias` /
  `cls.predictions.bias`, tied decoders) are written once; the dropped names and the name kept for
  each are recorded as JSON under the file metadata key `ALIASES_METADATA_KEY`. `config.json` and
  the tokenizer files beside the checkpoint are copied.

  Args:
    src: a directory with `pytorch_model.bin` (or a sharded `pytorch_model.bin.index.json`), or a
      `.bin` file with `config.json` beside it.
    dst_dir: output directory (created); receives `model.safetensors` and `config.json`.

  Returns:
    The path of the written `model.safetensors`.

  Raises:
    ModuleNotFoundError: if torch is not installed.
    FileNotFoundError: if the checkpoint or its `config.json` is missing.
    ValueError: if an entry of the state dict is not a tensor.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import safetensors.torch  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        "pytorch_bin_to_safetensors needs PyTorch (`pip install torch`, the CPU build is enough); "
        "or run the torch-only one-liner in realm_jax/models/realm_checkpoints.py's docstring",
        name="torch") from e
  src, dst_dir = pathlib.Path(src), pathlib.Path(dst_dir)
  if src.is_dir():
    directory = src
    if (src / _BIN_NAME).is_file():
      files = [src / _BIN_NAME]
    elif (src / _BIN_INDEX_NAME).is_file():
      weight_map = json.loads((src / _BIN_INDEX_NAME).read_text())["weight_map"]
      files = [src / name for name in sorted(set(weight_map.values()))]
    else:
      raise FileNotFoundError(f"pytorch_bin_to_safetensors: {src} has no {_BIN_NAME} or "
                              f"{_BIN_INDEX_NAME}")
  elif src.is_file():
    directory, files = src.parent, [src]
  else:
    raise FileNotFoundError(f"pytorch_bin_to_safetensors: {src} does not exist")
  if not (directory / _CONFIG_NAME).is_file():
    raise FileNotFoundError(f"pytorch_bin_to_safetensors: {directory / _CONFIG_NAME} not found")

  state: dict[str, Any] = {}
  for file in files:
    state.update(torch.load(str(file), map_location="cpu", weights_only=True))
  kept: dict[str, Any] = {}
  aliases: dict[str, str] = {}
  seen: dict[tuple, str] = {}
  for key, tensor in state.items():
    if not isinstance(tensor, torch.Tensor):
      raise ValueError(f"pytorch_bin_to_safetensors: entry {key!r} of {files} is a "
                       f"{type(tensor).__name__}, not a tensor")
    ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
             tuple(tensor.stride()), tensor.dtype)
    if tensor.numel() and ident in seen:
      aliases[key] = seen[ident]
      continue
    seen[ident] = key
    kept[key] = tensor
  storage_users: dict[int, int] = {}
  for tensor in kept.values():
    ptr = tensor.untyped_storage().data_ptr()
    storage_users[ptr] = storage_users.get(ptr, 0) + 1
  tensors = {}
  for key, tensor in kept.items():
    shared = storage_users[tensor.untyped_storage().data_ptr()] > 1
    tensor = tensor.detach()
    tensors[key] = tensor.contiguous().clone() if shared else tensor.contiguous()
  dst_dir.mkdir(parents=True, exist_ok=True)
  out = dst_dir / _WEIGHTS_NAME
  ci._atomic_write(out, lambda tmp: safetensors.torch.save_file(
      tensors, str(tmp), metadata={"format": "pt",
                                   ALIASES_METADATA_KEY: json.dumps(aliases, sort_keys=True)}))
  for name in (_CONFIG_NAME,) + _TOKENIZER_FILES:
    if (directory / name).is_file() and directory.resolve() != dst_dir.resolve():
      shutil.copyfile(directory / name, dst_dir / name)
  logging.info("Wrote %s: %d tensors, %d aliases written once", out, len(tensors), len(aliases))
  return out


def read_aliases(path: PathLike) -> dict[str, str]:
  """The aliases `pytorch_bin_to_safetensors` recorded in a safetensors file (`{dropped: kept}`).

  Raises:
    ValueError: if the file is not readable safetensors or the metadata is not JSON.
  """
  try:
    with safe_open(str(path), framework="numpy") as f:
      metadata = f.metadata() or {}
  except Exception as e:  # safetensors raises its own SafetensorError.
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
  try:
    return dict(json.loads(metadata.get(ALIASES_METADATA_KEY, "{}")))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: metadata {ALIASES_METADATA_KEY!r} is not JSON ({e})") from e


# ----------------------------------------------------------------------------------------------
# Converted params on disk.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ConvertedParams:
  """realm_jax parameters written by `save_converted` and read back by `load_converted`.

  Attributes:
    params: `{part: tree}` float32 numpy trees (`realm.init_params` layout).
    retriever_config: the retriever's config, or None without a retriever.
    reader_config: the span reader's config, or None without a reader.
    encoder_config: the knowledge-augmented encoder's BERT config, or None without one.
    manifest: the JSON written beside the params (architecture, source, Hugging Face config, ...).
  """

  params: dict[str, Params]
  retriever_config: retriever_lib.RetrieverConfig | None
  reader_config: encoder_lib.ReaderConfig | None
  encoder_config: BertConfig | None
  manifest: dict[str, Any]


def save_converted(ckpt: RealmCheckpoint, directory: PathLike) -> pathlib.Path:
  """Writes the converted params (`realm_params.safetensors`) and configs (`realm_config.json`).

  Keys of the safetensors file are the `/`-joined parameter paths, e.g.
  `retriever/query_embedder/bert/layer_0/attention/query/kernel`. Each file is written to a
  temporary name and renamed, the params first.

  Args:
    ckpt: the converted checkpoint.
    directory: output directory (created).

  Returns:
    The path of `realm_config.json`.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  flat = {"/".join((part,) + path): np.ascontiguousarray(value, dtype=np.float32)
          for part, tree in ckpt.params.items() for path, value in ci._flatten(tree).items()}
  ci._atomic_write(directory / CONVERTED_PARAMS_NAME, lambda tmp: save_file(
      flat, str(tmp), metadata={"format": "realm_jax", "architecture": ckpt.architecture}))
  manifest = {
      "format_version": CONVERTED_FORMAT_VERSION,
      "architecture": ckpt.architecture,
      "source": ckpt.source,
      "parts": list(ckpt.parts),
      "bert": dataclasses.asdict(ckpt.hparams.bert),
      "pooling": EMBEDDER_POOLING,
      "projection_size": ckpt.hparams.projection_size,
      "share_embedders": ckpt.share_embedders,
      "span_hidden_size": ckpt.hparams.span_hidden_size,
      "max_span_width": ckpt.hparams.max_span_width,
      "block_emb_shape": None if ckpt.block_emb is None else list(ckpt.block_emb.shape),
      "ignored_keys": list(ckpt.ignored_keys),
      "hf_config": dict(ckpt.hparams.raw),
  }
  target = directory / CONVERTED_CONFIG_NAME
  ci._atomic_write(target, lambda tmp: tmp.write_text(
      json.dumps(manifest, indent=2, sort_keys=True) + "\n"))
  return target


def _abstract_part(part: str, retriever_cfg, reader_cfg, encoder_cfg) -> Params:
  """Shapes of `realm.init_*` for one part, without computing anything."""
  key = jax.random.key(0)
  if part == "retriever":
    return jax.eval_shape(lambda: realm.init_retriever(retriever_cfg, key))
  if part == "reader":
    return jax.eval_shape(lambda: realm.init_reader(reader_cfg, key))
  return jax.eval_shape(lambda: realm.init_encoder(encoder_cfg, key))


def load_converted(directory: PathLike) -> ConvertedParams:
  """Reads what `save_converted` wrote, checking every parameter against the model's own tree.

  Args:
    directory: the directory holding `realm_params.safetensors` and `realm_config.json`.

  Returns:
    The `ConvertedParams`.

  Raises:
    FileNotFoundError: if either file is missing.
    ValueError: if `realm_config.json` is invalid (naming the field).
    CheckpointMismatchError: naming each parameter that is missing, mis-shaped or unexpected
      compared with `realm.init_params` for the recorded configs.
  """
  directory = pathlib.Path(directory)
  config_file, params_file = directory / CONVERTED_CONFIG_NAME, directory / CONVERTED_PARAMS_NAME
  for file in (config_file, params_file):
    if not file.is_file():
      raise FileNotFoundError(f"load_converted: {file} not found")
  try:
    manifest = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_file}: invalid JSON ({e})") from e
  if manifest.get("format_version") != CONVERTED_FORMAT_VERSION:
    raise ValueError(f"{config_file}: field 'format_version' is "
                     f"{manifest.get('format_version')!r}, expected {CONVERTED_FORMAT_VERSION}")
  try:
    bert_cfg = BertConfig(**manifest["bert"])
    parts = list(manifest["parts"])
    retriever_cfg = reader_cfg = encoder_cfg = None
    if "retriever" in parts:
      retriever_cfg = retriever_lib.RetrieverConfig(
          bert=bert_cfg, pooling=manifest["pooling"], projection_size=manifest["projection_size"],
          share_embedders=manifest["share_embedders"])
    if "reader" in parts:
      reader_cfg = encoder_lib.ReaderConfig(bert=bert_cfg,
                                            span_hidden_size=manifest["span_hidden_size"],
                                            max_span_width=manifest["max_span_width"])
    if "encoder" in parts:
      encoder_cfg = bert_cfg
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{config_file}: invalid or missing field ({type(e).__name__}: {e})") from e
  unknown = set(parts) - {"retriever", "reader", "encoder"}
  if unknown:
    raise ValueError(f"{config_file}: field 'parts' has unknown entries {sorted(unknown)}")

  flat = ci._read_safetensors([params_file])
  params: dict[str, Params] = {}
  problems: list[str] = []
  expected_keys = set()
  for part in parts:
    abstract = _abstract_part(part, retriever_cfg, reader_cfg, encoder_cfg)
    tree: Params = {}
    for path, leaf in ci._flatten(abstract).items():
      key = "/".join((part,) + path)
      expected_keys.add(key)
      if key not in flat:
        problems.append(f"missing parameter {key!r} (expected shape {tuple(leaf.shape)})")
      elif tuple(flat[key].shape) != tuple(leaf.shape):
        problems.append(f"parameter {key!r}: expected shape {tuple(leaf.shape)}, found "
                        f"{tuple(flat[key].shape)}")
      else:
        ci._set(tree, path, flat[key].astype(np.float32))
    params[part] = tree
  unexpected = sorted(set(flat) - expected_keys)
  if unexpected:
    problems.append(f"unexpected parameters ({len(unexpected)}): {unexpected[:_MAX_LISTED]}")
  if problems:
    raise CheckpointMismatchError(str(params_file), problems)
  return ConvertedParams(params=params, retriever_config=retriever_cfg, reader_config=reader_cfg,
                         encoder_config=encoder_cfg, manifest=manifest)
