"""A pure Flax (linen) BERT encoder: the backbone of every REALM tower.

REALM (Guu et al., 2020, §3.4) uses BERT-base for the query embedder, the document embedder and the
knowledge-augmented encoder. This module is the plain transformer encoder of Devlin et al. (2019) with
post-layer-norm blocks, laid out so that Hugging Face `BertModel` checkpoints map onto it one tensor for
one tensor (see `checkpoint_import.py`).

Parameter tree (names are stable; checkpoints and sharding rules depend on them):

    embeddings/word_embeddings/embedding          [vocab_size, hidden]
    embeddings/position_embeddings/embedding      [max_position_embeddings, hidden]
    embeddings/token_type_embeddings/embedding    [type_vocab_size, hidden]
    embeddings/layer_norm/{scale,bias}            [hidden]
    layer_{i}/attention/{query,key,value}/kernel  [hidden, num_heads, head_dim]
    layer_{i}/attention/{query,key,value}/bias    [num_heads, head_dim]
    layer_{i}/attention/out/kernel                [num_heads, head_dim, hidden]
    layer_{i}/attention/out/bias                  [hidden]
    layer_{i}/attention_layer_norm/{scale,bias}   [hidden]
    layer_{i}/intermediate/{kernel,bias}          [hidden, intermediate], [intermediate]
    layer_{i}/output/{kernel,bias}                [intermediate, hidden], [hidden]
    layer_{i}/output_layer_norm/{scale,bias}      [hidden]
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

HIDDEN_ACTS = ("gelu", "gelu_new")
# Hugging Face activation names -> the two GELUs BertEncoder computes.
_HF_HIDDEN_ACTS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_new",
                   "gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new"}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyper-parameters of a BERT encoder (the fields of a Hugging Face `config.json`).

  Attributes:
    vocab_size: WordPiece vocabulary size (30,522 for uncased BERT and MiniLM).
    hidden_size: width of every token representation.
    num_layers: number of transformer blocks.
    num_heads: attention heads per block; must divide `hidden_size`.
    intermediate_size: width of the feed-forward layer.
    max_position_embeddings: longest sequence the position table covers (tokens).
    type_vocab_size: number of segment ids (2: query / document).
    hidden_dropout: dropout rate on embeddings and block outputs (training only).
    attention_dropout: dropout rate on attention probabilities (training only).
    layer_norm_eps: LayerNorm epsilon (1e-12 in BERT).
    hidden_act: the feed-forward activation: `"gelu"` (exact, erf-based; Hugging Face BERT) or
      `"gelu_new"` (the tanh approximation of the original TF BERT, used by REALM's released
      checkpoints, `RealmConfig`'s default).
    dtype: compute dtype name ("float32" or "bfloat16"); parameters stay float32.
    remat: rematerialise each block in the backward pass (saves activation memory on TPU).

  Raises:
    ValueError: in `__post_init__` if the sizes are inconsistent.
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"BertConfig: hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
    for name in ("vocab_size", "hidden_size", "num_layers", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size"):
      if getattr(self, name) <= 0:
        raise ValueError(f"BertConfig: {name} must be positive, got {getattr(self, name)}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"BertConfig: unsupported dtype {self.dtype!r}")
    if self.hidden_act not in HIDDEN_ACTS:
      raise ValueError(f"BertConfig: hidden_act={self.hidden_act!r} is not one of {HIDDEN_ACTS}")

  @property
  def approximate_gelu(self) -> bool:
    """Whether the GELU is the tanh approximation (`"gelu_new"`) rather than the exact erf form."""
    return self.hidden_act == "gelu_new"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  @classmethod
  def from_hf_config(cls, hf: dict[str, Any], **overrides) -> "BertConfig":
    """Builds a config from a Hugging Face BERT `config.json` dictionary.

    Raises:
      ValueError: if the checkpoint is not a post-LN BERT with GELU activations.
    """
    act = hf.get("hidden_act", "gelu")
    if act not in _HF_HIDDEN_ACTS:
      raise ValueError(f"config.json: hidden_act={act!r} is not supported (expected one of "
                       f"{sorted(_HF_HIDDEN_ACTS)})")
    kwargs = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        hidden_act=_HF_HIDDEN_ACTS[act],
    )
    kwargs.update(overrides)
    return cls(**kwargs)


_init = nn.initializers.truncated_normal(stddev=0.02)

# /proc/cpuinfo flags of CPUs whose bfloat16 matmuls XLA:CPU runs faster than float32 ones.
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=None)
def _cpu_has_fast_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
  try:
    with open(cpuinfo, encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith("flags"):
          return any(flag in line.split() for flag in _CPU_BF16_FLAGS)
  except OSError:  # No /proc/cpuinfo (not Linux) or unreadable: assume no fast bf16.
    return False
  return False


def resolve_dtype(name: str, backend: str | None = None) -> str:
  """The compute dtype that `name` stands for: itself, or for `"auto"` the fast one here.

  `"auto"` is `"bfloat16"` on TPU and GPU (mixed precision: float32 params, bfloat16 activations,
  float32 accumulation, as on the MXU), and on a CPU whose flags (Linux `/proc/cpuinfo`) include
  AMX-BF16 or AVX512-BF16 — there XLA:CPU's bfloat16 matmuls with float32 accumulation run several
  times faster than float32 ones (`benchmarks/embed_throughput.py --dtype bfloat16` vs float32);
  elsewhere `"float32"`, because a CPU without them emulates bfloat16 and gets slower.

  Args:
    name: "float32", "bfloat16", "float16" or "auto".
    backend: the JAX backend ("cpu", "gpu", "tpu"); default `jax.default_backend()`.

  Returns:
    A concrete dtype name.

  Raises:
    ValueError: for an unknown name.
  """
  if name != "auto":
    if name not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"unsupported dtype {name!r} (float32, bfloat16, float16 or auto)")
    return name
  backend = backend or jax.default_backend()
  if backend == "cpu":
    return "bfloat16" if _cpu_has_fast_bfloat16() else "float32"
  return "bfloat16"


def _dot_general_f32_accumulation(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                                  preferred_element_type=None) -> Array:
  """`lax.dot_general` that accumulates in float32 and returns the inputs' (reduced) dtype.

  Flax's default for a bfloat16 `Dense` is a bfloat16 x bfloat16 -> bfloat16 dot. Asking for a
  float32 result is what the TPU MXU does anyway, is more accurate, and on XLA:CPU it is the form
  that reaches the AMX / AVX512-BF16 matmul kernels: on this project's Xeon (amx_bf16), a
  [4096, 384] x [384, 1536] dot ran at ~27 GFLOP/s in float32, ~23-87 GFLOP/s as bf16 -> bf16 and
  ~120-460 GFLOP/s as bf16 -> float32 on one core (a shared host; `benchmarks/embed_throughput.py`
  measures the whole encoder).

  The Dense contractions (the trailing axes of `lhs` with the leading axes of `rhs`, no batch
  axes) get a custom VJP whose two backward matmuls also take bfloat16 operands with float32
  accumulation; JAX's own transpose would multiply the float32 cotangent by the bfloat16 operand,
  a float32 matmul. Other contractions use JAX's VJP.
  """
  del preferred_element_type
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  n = len(lhs_contract)
  if (not lhs_batch and not rhs_batch and tuple(lhs_contract) == tuple(range(lhs.ndim - n, lhs.ndim))
      and tuple(rhs_contract) == tuple(range(n)) and lhs.dtype == rhs.dtype):
    return _dense_contraction(lhs, rhs, n, precision)
  out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                            preferred_element_type=jnp.float32)
  return out.astype(jnp.result_type(lhs, rhs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_contraction(lhs: Array, rhs: Array, num_contract: int, precision) -> Array:
  """`lhs[..., K...] · rhs[K..., N...]` over the `num_contract` trailing/leading axes, float32
  accumulation, result in the inputs' dtype."""
  return _dense_contraction_fwd(lhs, rhs, num_contract, precision)[0]


def _as_matrices(lhs: Array, rhs: Array, num_contract: int) -> tuple[Array, Array]:
  k = int(np.prod(rhs.shape[:num_contract]))
  return lhs.reshape(-1, k), rhs.reshape(k, -1)


def _dense_contraction_fwd(lhs, rhs, num_contract, precision):
  a, b = _as_matrices(lhs, rhs, num_contract)
  out = jnp.matmul(a, b, precision=precision, preferred_element_type=jnp.float32)
  shape = lhs.shape[:lhs.ndim - num_contract] + rhs.shape[num_contract:]
  return out.astype(lhs.dtype).reshape(shape), (lhs, rhs)


def _dense_contraction_bwd(num_contract, precision, residuals, g):
  lhs, rhs = residuals
  a, b = _as_matrices(lhs, rhs, num_contract)
  g = g.reshape(a.shape[0], b.shape[1]).astype(lhs.dtype)
  d_lhs = jnp.matmul(g, b.T, precision=precision, preferred_element_type=jnp.float32)
  d_rhs = jnp.matmul(a.T, g, precision=precision, preferred_element_type=jnp.float32)
  return d_lhs.astype(lhs.dtype).reshape(lhs.shape), d_rhs.astype(rhs.dtype).reshape(rhs.shape)


_dense_contraction.defvjp(_dense_contraction_fwd, _dense_contraction_bwd)


def dense_dot_general(dtype: Any):
  """The `dot_general` for a `Dense` of compute dtype `dtype`: None (Flax's default) for float32,
  else `_dot_general_f32_accumulation`."""
  return None if jnp.dtype(dtype) == jnp.float32 else _dot_general_f32_accumulation


# The transformer layers' Dense parameters (the layout in the module docstring): the modules that run
# in the compute dtype and cast their kernel and bias to it on every call.
_COMPUTE_DTYPE_DENSE = re.compile(
    r"(^|/)layer_\d+/(attention/(query|key|value|out)|intermediate|output)/(kernel|bias)$")


def cast_dense_params(params: Any, dtype: Any) -> Any:
  """`params` with every transformer layer's Dense kernel and bias already in the compute `dtype`.

  For a forward pass that runs many times on the same parameters (embedding a corpus for an index
  snapshot, §3.4; embedding evaluation questions). A bfloat16 `Dense` casts its float32 kernel and bias
  to bfloat16 inside every call; casting them once beforehand gives bit-identical outputs, reads
  half the bytes per call, and on XLA:CPU removes unfused conversion loops that took 26 ms of a
  164 ms bfloat16 document-tower batch of [8, 160] on one core (`benchmarks/encoder_profile.py`).
  Training keeps float32 master parameters and does not use this.

  Args:
    params: a parameter tree holding BERT encoders (any nesting: `retriever/query_embedder/bert/…`,
      `encoder/…`), leaves float32 arrays; the paths of the module docstring identify the leaves.
    dtype: the model's compute dtype (`BertConfig.compute_dtype`).

  Returns:
    The same tree; the `layer_{i}/attention/{query,key,value,out}` and
    `layer_{i}/{intermediate,output}` kernels and biases are in `dtype`, everything else (embeddings,
    LayerNorm scales and biases, the retriever's projection, reader heads) unchanged. `params` itself
    when `dtype` is float32.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return params

  def cast(path, leaf):
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return leaf.astype(dtype) if _COMPUTE_DTYPE_DENSE.search(name) else leaf

  return jax.tree_util.tree_map_with_path(cast, params)


class BertLayer(nn.Module):
  """One post-LN transformer block: self-attention, residual, LN, GELU MLP, residual, LN."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, attention_bias: Array, deterministic: bool) -> Array:
    """Applies the block.

    Args:
      x: `[batch, seq_len, hidden]` activations.
      attention_bias: `[batch, 1, 1, seq_len]` float additive mask (0 or a large negative number).
      deterministic: disables dropout when True.

    Returns:
      `[batch, seq_len, hidden]` activations in the compute dtype.
    """
    cfg = self.config
    dt = cfg.compute_dtype
    h = _Attention(cfg, name="attention")(x, attention_bias, deterministic)
    h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dt, name="attention_layer_norm")(x + h)
    dot = dense_dot_general(dt)
    h = nn.Dense(cfg.intermediate_size, dtype=dt, kernel_init=_init, dot_general=dot,
                 name="intermediate")(x)
    # GELU in float32, rounded once to the compute dtype (in bf16 XLA:CPU would round after every
    # elementwise op of erf/tanh and fuse them, repeated, into the next matmul's operand).
    h = nn.gelu(h.astype(jnp.float32), approximate=cfg.approximate_gelu).astype(dt)
    h = nn.Dense(cfg.hidden_size, dtype=dt, kernel_init=_init, dot_general=dot, name="output")(h)
    h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dt, name="output_layer_norm")(x + h)


class _Attention(nn.Module):
  """Multi-head scaled dot-product self-attention (parameters live in the given sub-modules).

  Without attention dropout (inference, or a zero rate) the attention is `fused_attention`; with it,
  `einsum_attention`, which materialises the probabilities that dropout acts on.
  """

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, attention_bias: Array, deterministic: bool) -> Array:
    """Applies self-attention.

    Args:
      x: `[batch, seq_len, hidden]` activations.
      attention_bias: `[batch, 1, 1, seq_len]` float32 additive mask.
      deterministic: disables attention dropout when True.

    Returns:
      `[batch, seq_len, hidden]` in the compute dtype.
    """
    cfg = self.config
    dense = lambda name, **kw: nn.DenseGeneral(  # noqa: E731
        name=name, dtype=cfg.compute_dtype, kernel_init=_init,
        dot_general=dense_dot_general(cfg.compute_dtype), **kw)
    heads = (cfg.num_heads, cfg.head_dim)
    q, k, v = (dense(n, features=heads)(x) for n in ("query", "key", "value"))
    if deterministic or cfg.attention_dropout == 0.0:
      context = fused_attention(q, k, v, attention_bias)
    else:
      dropout = nn.Dropout(cfg.attention_dropout)
      context = einsum_attention(q, k, v, attention_bias,
                                 dropout=lambda p: dropout(p, deterministic=False))
    return dense("out", features=cfg.hidden_size, axis=(-2, -1))(context)


def einsum_attention(query: Array, key: Array, value: Array, bias: Array,
                     dropout: Callable[[Array], Array] | None = None) -> Array:
  """Reference scaled dot-product attention that materialises the probabilities.

  Args:
    query, key, value: `[batch, seq_len, heads, head_dim]` in the compute dtype.
    bias: float32 additive mask broadcastable to `[batch, heads, seq_len, seq_len]` (0 where a key
      is attended to, a large negative number such as `finfo(float32).min` where it is masked).
    dropout: applied to the probabilities (training); None for none.

  Returns:
    `[batch, seq_len, heads, head_dim]` in the dtype of `value`; the softmax is float32.
  """
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", query * scale, key).astype(jnp.float32) + bias
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  if dropout is not None:
    probs = dropout(probs)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, value)


# Attention logits per chunk on XLA:CPU: `[chunk, heads, seq_len, seq_len]` float32 kept about this
# size stays in cache between the two matmuls and the softmax (measured on a 2-core Xeon: 288-token
# MiniLM attention 2.3x faster in chunks of 4 sequences than over a batch of 64).
CPU_ATTENTION_CHUNK_BYTES = 24 * 2**20


def fused_attention(query: Array, key: Array, value: Array, bias: Array,
                    implementation: str | None = None) -> Array:
  """Scaled dot-product attention without dropout; equals `einsum_attention(..., dropout=None)`.

  Args:
    query, key, value: `[batch, seq_len, heads, head_dim]` in the compute dtype.
    bias: 4-D float32 additive mask, `[batch or 1, heads or 1, seq_len or 1, seq_len]`.
    implementation: `"xla"`: `jax.nn.dot_product_attention` (its XLA path); `"cpu"`: the same
      attention in batch chunks whose logits fit in cache (`CPU_ATTENTION_CHUNK_BYTES`), with the
      softmax normalisation applied after the second matmul (on `head_dim` rather than `seq_len`
      columns), computed in float32 whatever the input dtype; None (default): `"cpu"` on the CPU
      backend, else `"xla"`.

  Returns:
    `[batch, seq_len, heads, head_dim]` in the dtype of `value`. Logits, softmax and the
    normalisation are float32 (bfloat16 inputs too); with `"xla"`, bfloat16 probabilities meet
    `value`; with `"cpu"`, both matmuls are float32. (XLA:CPU's batched matmuls of a head's
    `[seq_len, 32] x [32, seq_len]` ran slower with bfloat16 operands than float32 ones on an AMX
    Xeon, one core, batch 32: 62 vs 40 ms a layer at 192 tokens, 172 vs 90 ms at 288;
    `benchmarks/encoder_profile.py` shows the share.)

  Raises:
    ValueError: for an unknown `implementation`.
  """
  if implementation is None:
    implementation = "cpu" if jax.default_backend() == "cpu" else "xla"
  if implementation == "xla":
    return jax.nn.dot_product_attention(query, key, value, bias=bias.astype(jnp.float32))
  if implementation != "cpu":
    raise ValueError(f"fused_attention: unknown implementation {implementation!r}")
  out_dtype = value.dtype
  query, key, value = (x.astype(jnp.float32) for x in (query, key, value))
  batch, seq_len, heads, _ = query.shape
  bias = jnp.broadcast_to(bias, (batch,) + bias.shape[1:]).astype(jnp.float32)
  chunk = batch
  while chunk > 1 and (chunk * heads * seq_len * key.shape[1] * 4 > CPU_ATTENTION_CHUNK_BYTES
                       or batch % chunk):
    chunk //= 2
  if chunk == batch:
    return _deferred_softmax_attention(query, key, value, bias).astype(out_dtype)
  split = lambda x: x.reshape((batch // chunk, chunk) + x.shape[1:])  # noqa: E731
  out = jax.lax.map(lambda a: _deferred_softmax_attention(*a),
                    (split(query), split(key), split(value), split(bias)))
  return out.reshape(query.shape[:-1] + value.shape[-1:]).astype(out_dtype)


def _deferred_softmax_attention(query: Array, key: Array, value: Array, bias: Array) -> Array:
  """softmax(q k^T / sqrt(d) + bias) v as (exp(logits - max) v) / sum(exp(logits - max))."""
  scale = query.shape[-1] ** -0.5
  q = jnp.transpose(query * jnp.asarray(scale, query.dtype), (0, 2, 1, 3))  # [b, h, q, d]
  k = jnp.transpose(key, (0, 2, 3, 1))  # [b, h, d, k]
  v = jnp.transpose(value, (0, 2, 1, 3))  # [b, h, k, d]
  logits = jnp.matmul(q, k, preferred_element_type=jnp.float32) + bias
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
  context = jnp.matmul(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  context = context / weights.sum(axis=-1, keepdims=True)
  return jnp.transpose(context, (0, 2, 1, 3)).astype(value.dtype)


class BertEmbeddings(nn.Module):
  """Word + position + segment embeddings, LayerNorm and dropout."""

  config: BertConfig

  def setup(self):
    cfg = self.config
    self.word_embeddings = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=_init)
    self.position_embeddings = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                        embedding_init=_init)
    self.token_type_embeddings = nn.Embed(cfg.type_vocab_size, cfg.hidden_size,
                                          embedding_init=_init)
    self.layer_norm = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype)
    self.dropout = nn.Dropout(cfg.hidden_dropout)

  def __call__(self, input_ids: Array, segment_ids: Array, deterministic: bool) -> Array:
    seq_len = input_ids.shape[-1]
    if seq_len > self.config.max_position_embeddings:
      raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings="
                       f"{self.config.max_position_embeddings}")
    positions = jnp.arange(seq_len)[None, :]
    x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
         + self.token_type_embeddings(segment_ids))
    x = self.layer_norm(x).astype(self.config.compute_dtype)
    return self.dropout(x, deterministic=deterministic)

  def attend(self, x: Array) -> Array:
    """Logits against the word-embedding table: `[..., hidden]` -> `[..., vocab_size]`."""
    return self.word_embeddings.attend(x)


class BertEncoder(nn.Module):
  """BERT encoder (Devlin et al., 2019): token ids -> contextual token representations.

  Call signature (keyword-only, the one argument order of the project):
  `apply(params, input_ids=…, input_mask=…, segment_ids=…, deterministic=True)`.

  Args:
    input_ids: `[batch, seq_len]` int32 WordPiece ids.
    input_mask: `[batch, seq_len]` int32/bool, 1 for real tokens and 0 for padding.
    segment_ids: `[batch, seq_len]` int32 segment ids (0 for the first segment, 1 for the second).
    deterministic: disables dropout when True; dropout needs the `dropout` rng otherwise.

  Returns:
    `[batch, seq_len, hidden]` token representations in the config's compute dtype.

  Raises:
    ValueError: if `seq_len > max_position_embeddings`.
  """

  config: BertConfig

  def setup(self):
    cfg = self.config
    self.embeddings = BertEmbeddings(cfg)
    layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if cfg.remat else BertLayer
    self.layers = [layer_cls(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]

  def __call__(self, *, input_ids: Array, input_mask: Array, segment_ids: Array,
               deterministic: bool = True) -> Array:
    x = self.embeddings(input_ids, segment_ids, deterministic)
    mask = input_mask.astype(bool)[:, None, None, :]
    attention_bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    for layer in self.layers:
      x = layer(x, attention_bias, deterministic)
    return x

  def attend(self, x: Array) -> Array:
    """Tied output projection: `[..., hidden]` -> `[..., vocab_size]` logits (masked-LM decoder)."""
    return self.embeddings.attend(x)
