"""The fused self-attention of `models/bert.py` against the einsum reference it replaced."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax.models import bert

TINY = bert.BertConfig(vocab_size=120, hidden_size=48, num_layers=2, num_heads=4,
                       intermediate_size=96, max_position_embeddings=64)
# Stated tolerances: float32 agrees to rounding; bfloat16 inputs differ only in where the
# bfloat16 roundings of the probabilities fall (both accumulate the logits in float32).
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}


def _bias(mask):
  mask = jnp.asarray(mask, bool)[:, None, None, :]
  return jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def _qkv(dtype, batch=3, seq=24, heads=4, head_dim=16, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((batch, seq, heads, head_dim)) * 2, dtype)
          for _ in range(3)]


def _inputs(batch=3, seq=24, seed=0):
  rng = np.random.default_rng(seed)
  lengths = np.array([seq, seq // 2, 5])[:batch]
  mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, TINY.vocab_size, size=(batch, seq)).astype(np.int32) * mask
  seg = (np.arange(seq)[None, :] >= 3).astype(np.int32) * mask
  return {"input_ids": ids, "input_mask": mask, "segment_ids": seg}


@pytest.mark.parametrize("implementation", ["xla", "cpu", "cpu-chunked"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_attention_matches_einsum_reference_with_padding(monkeypatch, dtype,
                                                                implementation):
  if implementation == "cpu-chunked":  # two chunks of 2 sequences: the lax.map path
    implementation = "cpu"
    monkeypatch.setattr(bert, "CPU_ATTENTION_CHUNK_BYTES", 4 * 24 * 24 * 4 * 2)
  q, k, v = _qkv(dtype, batch=4)
  mask = np.ones((4, 24), np.int32)
  mask[1, 12:] = 0
  mask[2, 5:] = 0
  mask[2, 2] = 0  # a hole, not only right padding
  mask[3, :] = 0  # an empty row, as in the padding rows of a short last batch
  bias = _bias(mask)
  fused = jax.jit(lambda *a: bert.fused_attention(*a, implementation=implementation))(q, k, v, bias)
  reference = jax.jit(bert.einsum_attention)(q, k, v, bias)
  assert fused.shape == q.shape and fused.dtype == jnp.dtype(dtype)
  assert np.isfinite(np.asarray(fused, np.float32)).all()
  np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(reference, np.float32),
                             atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
  # Masked keys do not matter: changing them leaves the output unchanged.
  k2 = k.at[1, 12:].set(100).at[2, 2].set(-50)
  v2 = v.at[1, 12:].set(7)
  again = bert.fused_attention(q, k2, v2, bias, implementation=implementation)
  np.testing.assert_allclose(np.asarray(again, np.float32)[:3], np.asarray(fused, np.float32)[:3],
                             atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("implementation", ["xla", "cpu"])
def test_fused_attention_gradients_match_reference(monkeypatch, implementation):
  monkeypatch.setattr(bert, "CPU_ATTENTION_CHUNK_BYTES", 24 * 24 * 4 * 4)  # 2 chunks
  q, k, v = _qkv("float32", batch=2)
  mask = np.ones((2, 24), np.int32)
  mask[1, 10:] = 0
  bias = _bias(mask)
  weights = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v, bias) * weights)

  fused = jax.grad(loss(lambda *a: bert.fused_attention(*a, implementation=implementation)),
                   argnums=(0, 1, 2))(q, k, v)
  reference = jax.grad(loss(bert.einsum_attention), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(fused, reference):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_unknown_implementation():
  q, k, v = _qkv("float32")
  with pytest.raises(ValueError, match="implementation"):
    bert.fused_attention(q, k, v, _bias(np.ones((3, 24))), implementation="flash")


def test_fully_masked_rows_stay_finite():
  q, k, v = _qkv("float32")
  bias = _bias(np.zeros((3, 24), np.int32))  # the empty rows that pad a short last batch
  out = bert.fused_attention(q, k, v, bias)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(out, bert.einsum_attention(q, k, v, bias), atol=1e-5)


def test_parameter_tree_is_unchanged():
  model = bert.BertEncoder(TINY)
  params = model.init(jax.random.key(0), **_inputs())["params"]
  attention = params["layer_0"]["attention"]
  assert sorted(attention) == ["key", "out", "query", "value"]
  for name in ("query", "key", "value"):
    assert attention[name]["kernel"].shape == (48, 4, 12)
    assert attention[name]["bias"].shape == (4, 12)
  assert attention["out"]["kernel"].shape == (4, 12, 48)
  assert attention["out"]["bias"].shape == (48,)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_encoder_equals_einsum_encoder(monkeypatch, dtype):
  cfg = dataclasses.replace(TINY, dtype=dtype)
  model = bert.BertEncoder(cfg)
  inputs = _inputs()
  params = model.init(jax.random.key(0), **inputs)["params"]
  fused = jax.jit(lambda p: model.apply({"params": p}, **inputs))(params)
  monkeypatch.setattr(bert, "fused_attention",
                      lambda q, k, v, b: bert.einsum_attention(q, k, v, b))
  reference = jax.jit(lambda p: model.apply({"params": p}, **inputs))(params)
  assert fused.dtype == jnp.dtype(dtype)
  real = inputs["input_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(fused, np.float32)[real],
                             np.asarray(reference, np.float32)[real],
                             atol=4 * TOLERANCE[dtype], rtol=4 * TOLERANCE[dtype])


def test_attention_dropout_still_acts_in_training():
  cfg = dataclasses.replace(TINY, hidden_dropout=0.0, attention_dropout=0.5)
  model = bert.BertEncoder(cfg)
  inputs = _inputs()
  params = model.init(jax.random.key(0), **inputs)["params"]
  run = lambda key: model.apply({"params": params}, **inputs, deterministic=False,  # noqa: E731
                                rngs={"dropout": key})
  a, b = run(jax.random.key(1)), run(jax.random.key(2))
  inference = model.apply({"params": params}, **inputs)
  assert not np.allclose(a, b) and not np.allclose(a, inference)
  np.testing.assert_allclose(run(jax.random.key(1)), a)  # same key, same mask
  with pytest.raises(Exception, match="dropout"):
    model.apply({"params": params}, **inputs, deterministic=False)

  def loss(p):
    return jnp.sum(model.apply({"params": p}, **inputs, deterministic=False,
                               rngs={"dropout": jax.random.key(1)}) ** 2)

  grads = jax.grad(loss)(params)
  assert float(jnp.abs(grads["layer_0"]["attention"]["query"]["kernel"]).sum()) > 0
  # Without dropout on attention, training mode takes the fused path and equals inference.
  no_dropout = bert.BertEncoder(dataclasses.replace(cfg, attention_dropout=0.0))
  np.testing.assert_allclose(
      no_dropout.apply({"params": params}, **inputs, deterministic=False,
                       rngs={"dropout": jax.random.key(1)}), inference, atol=1e-6)


def test_bfloat16_dense_layers_accumulate_in_float32():
  """bfloat16 compute: every matmul of the encoder accumulates in float32 (`dense_dot_general`),
  so a layer's error against float32 is that of rounding its inputs and outputs, not of summing
  hundreds of products in bfloat16. Independent reference: the same float32 params in float64."""
  assert bert.dense_dot_general("float32") is None  # float32 keeps Flax's default dot.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 7, 512)).astype(np.float32)
  w = (rng.standard_normal((512, 64)) / np.sqrt(512)).astype(np.float32)
  exact = x.astype(np.float64) @ w.astype(np.float64)
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  dims = (((2,), (0,)), ((), ()))
  ours = bert.dense_dot_general("bfloat16")(xb, wb, dims)
  assert ours.dtype == jnp.bfloat16
  # The reference for "float32 accumulation": the bf16-rounded inputs multiplied in float64.
  rounded = np.asarray(xb, np.float64) @ np.asarray(wb, np.float64)
  err = np.abs(np.asarray(ours, np.float64) - rounded).max() / np.abs(rounded).max()
  assert err < 2 ** -8  # one bfloat16 rounding of the output (8 significant bits)
  assert np.abs(np.asarray(ours, np.float64) - exact).max() / np.abs(exact).max() < 2e-2
  # And the encoder's Dense layers use it: a bf16 layer is within bf16 rounding of float32.
  cfg32 = dataclasses.replace(TINY, hidden_dropout=0.0, attention_dropout=0.0)
  model32, model16 = bert.BertEncoder(cfg32), bert.BertEncoder(dataclasses.replace(
      cfg32, dtype="bfloat16"))
  inputs = _inputs()
  params = model32.init(jax.random.key(0), **inputs)["params"]
  out32 = np.asarray(model32.apply({"params": params}, **inputs), np.float32)
  out16 = np.asarray(model16.apply({"params": params}, **inputs), np.float32)
  real = inputs["input_mask"].astype(bool)
  np.testing.assert_allclose(out16[real], out32[real], atol=6e-2)
  jaxpr = str(jax.make_jaxpr(lambda p: model16.apply({"params": p}, **inputs))(params))
  dots = [line.strip() for line in jaxpr.splitlines() if "= dot_general[" in line]
  # Each matmul's result is float32 (then rounded once); a bf16 x bf16 -> bf16 dot would read
  # "…:bf16[…] = dot_general[".
  assert len(dots) >= 6 * TINY.num_layers and all(":f32[" in d for d in dots), dots


def test_auto_dtype_is_bfloat16_only_where_it_is_fast(tmp_path, monkeypatch):
  """`dtype="auto"`: bfloat16 on TPU/GPU and on CPUs with AMX/AVX512-BF16, float32 elsewhere."""
  from realm_jax.models import realm
  fast, slow = tmp_path / "fast", tmp_path / "slow"
  fast.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n")
  slow.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
  assert bert._cpu_has_fast_bfloat16(str(fast))  # pylint: disable=protected-access
  assert not bert._cpu_has_fast_bfloat16(str(slow))  # pylint: disable=protected-access
  assert not bert._cpu_has_fast_bfloat16(str(tmp_path / "missing"))  # pylint: disable=protected-access
  for has_flag, expected in ((True, "bfloat16"), (False, "float32")):
    monkeypatch.setattr(bert, "_cpu_has_fast_bfloat16", lambda has_flag=has_flag: has_flag)
    assert bert.resolve_dtype("auto", backend="cpu") == expected
    assert bert.resolve_dtype("auto", backend="tpu") == "bfloat16"
    assert bert.resolve_dtype("float32", backend="tpu") == "float32"  # explicit names stay
    model = realm.ModelConfig(init_checkpoint=None, bert=TINY, dtype="auto")
    if jax.default_backend() == "cpu":
      assert model.bert_config().dtype == expected
      assert model.retriever_config().bert.dtype == expected
  with pytest.raises(ValueError, match="dtype"):
    bert.resolve_dtype("fp8")
  with pytest.raises(ValueError, match="dtype='half'"):
    realm.ModelConfig(init_checkpoint=None, bert=TINY, dtype="half")


@pytest.mark.parametrize("kernel_shape", [(64, 32), (64, 4, 8)])
def test_bfloat16_dense_gradients_use_bfloat16_operands(kernel_shape):
  """The backward matmuls of a bf16 Dense (custom VJP) also take bf16 operands with float32
  accumulation, and their gradients match float64 ones to bf16 rounding."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, 5, 64)).astype(np.float32)
  w = (rng.standard_normal(kernel_shape) / 8).astype(np.float32)
  c = rng.standard_normal((3, 5) + kernel_shape[1:]).astype(np.float32)
  dims = (((2,), (0,)), ((), ()))
  dot = bert.dense_dot_general("bfloat16")

  def loss(x, w):
    y = dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), dims)
    return jnp.sum(y.astype(jnp.float32) * c)

  gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
  wb = np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64)
  cb = np.asarray(jnp.asarray(c, jnp.bfloat16), np.float64)  # the cotangent, rounded once
  w2, c2 = wb.reshape(64, -1), cb.reshape(15, -1)
  ref_gx = (c2 @ w2.T).reshape(x.shape)
  ref_gw = (xb.reshape(15, 64).T @ c2).reshape(w.shape)
  for got, ref in ((gx, ref_gx), (gw, ref_gw)):
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, atol=2 ** -7 * np.abs(ref).max())
  jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w))
  dots = [line.strip() for line in jaxpr.splitlines() if "= dot_general[" in line]
  assert len(dots) == 3 and all(":f32[" in d for d in dots), dots
  # Operand dtypes: every dot's inputs are bf16 (no float32 x bfloat16 matmul in the backward).
  eqns = [e for e in jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w).jaxpr.eqns]

  def all_dots(eqns):
    for e in eqns:
      if e.primitive.name == "dot_general":
        yield e
      for p in e.params.values():
        inner = getattr(p, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          yield from all_dots(inner.eqns)
  found = list(all_dots(eqns))
  assert len(found) == 3
  assert all(v.aval.dtype == jnp.bfloat16 for e in found for v in e.invars), [
      [v.aval.dtype for v in e.invars] for e in found]


def _dot_operand_dtypes(fn, *args):
  """{(lhs dtype, rhs dtype, result dtype)} of every dot_general in `fn`'s jaxpr (nested too)."""
  found = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.add(tuple(str(v.aval.dtype) for v in (*eqn.invars, *eqn.outvars)))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize("chunked", [False, True])
def test_cpu_attention_core_is_float32_for_bfloat16_inputs(monkeypatch, chunked):
  """The "cpu" path computes both attention matmuls in float32 (faster than bf16 operands on
  XLA:CPU for head_dim 32) and returns the inputs' dtype; the "xla" path keeps bf16 operands."""
  if chunked:
    monkeypatch.setattr(bert, "CPU_ATTENTION_CHUNK_BYTES", 4 * 24 * 24 * 4 * 2)
  q, k, v = _qkv("bfloat16", batch=4)
  bias = _bias(np.ones((4, 24), np.int32))
  cpu = lambda *a: bert.fused_attention(*a, implementation="cpu")  # noqa: E731
  assert _dot_operand_dtypes(cpu, q, k, v, bias) == {("float32", "float32", "float32")}
  assert cpu(q, k, v, bias).dtype == jnp.bfloat16
  xla = lambda *a: bert.fused_attention(*a, implementation="xla")  # noqa: E731
  assert all(d[0] == "bfloat16" for d in _dot_operand_dtypes(xla, q, k, v, bias))


def test_cast_dense_params_is_exact_and_leaves_float32_modules_alone():
  """Casting the layers' Dense weights once (the index builder's pass) gives bit-identical
  bfloat16 document embeddings; embeddings, LayerNorms and the float32 projection head stay
  float32 (casting the projection would change its output), and float32 configs are untouched."""
  from realm_jax.models import retriever as retriever_lib
  cfg = retriever_lib.RetrieverConfig(bert=dataclasses.replace(TINY, dtype="bfloat16"),
                                      pooling="cls_projection", projection_size=16)
  model = retriever_lib.Retriever(cfg)
  inputs = _inputs()
  params = model.init(jax.random.key(0), method=retriever_lib.Retriever.embed_documents,
                      **inputs)["params"]
  cast = bert.cast_dense_params(params, cfg.bert.compute_dtype)
  dtypes = {"/".join(str(k.key) for k in path): leaf.dtype
            for path, leaf in jax.tree_util.tree_leaves_with_path(cast)}
  bf16 = {p for p, d in dtypes.items() if d == jnp.bfloat16}
  expected = {p for p in dtypes if "/layer_" in p and p.rsplit("/", 2)[-2] in (
      "query", "key", "value", "out", "intermediate", "output")}
  assert bf16 == expected and len(expected) == 2 * 6 * 2  # 2 layers × 6 Dense × (kernel, bias)
  assert all(dtypes[p] == jnp.float32 for p in dtypes if "layer_norm" in p or "projection" in p
             or "embeddings" in p)
  embed = jax.jit(lambda p: model.apply({"params": p}, **inputs,
                                        method=retriever_lib.Retriever.embed_documents))
  np.testing.assert_array_equal(np.asarray(embed(cast)), np.asarray(embed(params)))
  wrong = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)  # every leaf, projection too
  assert not np.array_equal(np.asarray(embed(wrong)), np.asarray(embed(params)))
  assert bert.cast_dense_params(params, jnp.float32) is params
