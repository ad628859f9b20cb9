"""Tests for realm_jax.models.realm_checkpoints: parity with transformers 4.40.2's REALM classes
(fixtures made by tests/fixtures/hf_realm/make_fixtures.py from small random configs), the mapping
of Hugging Face's span enumeration onto `span_candidates`, mismatch errors, the converted-params
round trip and the block_emb → snapshot round trip."""

from __future__ import annotations

import json
import pathlib
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from realm_jax.models import encoder as encoder_lib
from realm_jax.models import realm
from realm_jax import convert
from realm_jax.models import realm_checkpoints as rc
from realm_jax.models import retriever as retriever_lib
from realm_jax.retrieval import snapshot as snapshot_lib
from realm_jax.training import losses

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf_realm"
TOL = 1e-4

# The released checkpoints (and these fixtures) use the tanh GELU and BERT's pooled output
# (BertConfig.hidden_act, Retriever pooling "pooler_projection"). The parity tests used to be skipped
# when that support was missing, which would have hidden a regression; they now always run
# (issue #14 §7) and tests/test_test_dependencies.py names the missing support directly.


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
  with np.load(FIXTURES / "reference.npz") as f:
    return dict(f)


def _load(name: str, **kwargs) -> rc.RealmCheckpoint:
  return rc.load_realm_checkpoint(FIXTURES / name, **kwargs)


def _copy_fixture(name: str, tmp_path: pathlib.Path) -> pathlib.Path:
  out = tmp_path / name
  shutil.copytree(FIXTURES / name, out)
  (out / "pytorch_model.bin").unlink(missing_ok=True)
  return out


def _rewrite(ckpt_dir: pathlib.Path, tensors: dict[str, np.ndarray] | None = None,
             **config_overrides) -> pathlib.Path:
  if tensors is not None:
    save_file(tensors, str(ckpt_dir / "model.safetensors"), metadata={"format": "pt"})
  if config_overrides:
    hf = json.loads((ckpt_dir / "config.json").read_text())
    hf.update(config_overrides)
    (ckpt_dir / "config.json").write_text(json.dumps(hf))
  return ckpt_dir


def _assert_tree_matches_init(params, init_fn, config) -> None:
  abstract = jax.eval_shape(lambda: init_fn(config, jax.random.key(0)))
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda x: x.shape, abstract)
  assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in jax.tree.leaves(params))


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _embed(cfg: retriever_lib.RetrieverConfig, params, ref) -> tuple[np.ndarray, np.ndarray]:
  """The scorer inputs through `Retriever`: `([2, dim] queries, [2, 3, dim] candidates)`."""

  @jax.jit
  def embed(p, q_ids, q_mask, c_ids, c_mask, c_segs):
    model, variables = retriever_lib.Retriever(cfg), {"params": p}
    return (model.apply(variables, input_ids=q_ids, input_mask=q_mask,
                        method=retriever_lib.Retriever.embed_queries),
            model.apply(variables, input_ids=c_ids, input_mask=c_mask, segment_ids=c_segs,
                        method=retriever_lib.Retriever.embed_documents))

  return embed(params, ref["scorer_query_ids"], ref["scorer_query_mask"], ref["scorer_cand_ids"],
               ref["scorer_cand_mask"], ref["scorer_cand_segs"])


def _embed_queries(cfg: retriever_lib.RetrieverConfig, params, ids, mask) -> np.ndarray:
  fn = jax.jit(lambda p, i, m: retriever_lib.Retriever(cfg).apply(
      {"params": p}, input_ids=i, input_mask=m, method=retriever_lib.Retriever.embed_queries))
  return np.asarray(fn(params, ids, mask))


def _read_spans(cfg: encoder_lib.ReaderConfig, params, ref) -> np.ndarray:
  """`SpanReader` on the 3 reader blocks: `[3, num_spans]` logits in `span_candidates` order."""
  body = ref["reader_block_mask"].astype(np.int32)
  fn = jax.jit(encoder_lib.SpanReader(cfg).apply)
  return np.asarray(fn({"params": params}, input_ids=ref["reader_ids"][None],
                       input_mask=ref["reader_mask"][None], segment_ids=ref["reader_segs"][None],
                       body_mask=body[None])[0])


# ------------------------------------------------------------------------------------- parity


def test_scorer_matches_transformers(ref):
  ckpt = _load("scorer")
  assert ckpt.architecture == "RealmScorer" and ckpt.parts == ("retriever",)
  assert ckpt.share_embedders and ckpt.block_emb is None
  assert ckpt.hparams.hidden_act == "gelu_new" and ckpt.hparams.bert.hidden_act == "gelu_new"
  # The identical query_embedder.* copies and the unused MLM heads are dropped, not converted.
  assert "query_embedder.realm.encoder.layer.1.output.dense.weight" in ckpt.ignored_keys
  assert "embedder.cls.predictions.transform.dense.weight" in ckpt.ignored_keys
  cfg = ckpt.retriever_config()
  assert cfg.pooling == "pooler_projection" and cfg.embedding_dim == 16 and cfg.share_embedders
  _assert_tree_matches_init(ckpt.params["retriever"], realm.init_retriever, cfg)

  query, docs = _embed(cfg, ckpt.params["retriever"], ref)
  scores = retriever_lib.relevance_scores(query, docs, cfg.score_scale)
  assert query.shape == (2, 16) and docs.shape == (2, 3, 16) and scores.shape == (2, 3)
  assert _max_diff(query, ref["scorer_query_emb"]) <= TOL
  assert _max_diff(docs, ref["scorer_cand_emb"]) <= TOL
  assert _max_diff(scores, ref["scorer_relevance"]) <= TOL
  # The activation matters at this tolerance: the exact GELU moves the scores by far more.
  assert float(ref["gelu_exact_vs_new_max_diff"]) > 10 * TOL


def test_scorer_with_separate_query_tower(ref, tmp_path):
  tensors = load_file(str(FIXTURES / "scorer" / "model.safetensors"))
  for key in [k for k in tensors if k.startswith("query_embedder.")]:
    tensors[key] = tensors[key] + np.float32(0.01)
  ckpt = rc.load_realm_checkpoint(_rewrite(_copy_fixture("scorer", tmp_path), tensors))
  assert not ckpt.share_embedders
  assert set(ckpt.params["retriever"]) == {"query_embedder", "document_embedder"}
  cfg = ckpt.retriever_config()
  _assert_tree_matches_init(ckpt.params["retriever"], realm.init_retriever, cfg)
  # The document tower is `embedder.*`, unchanged: it still reproduces the candidate embeddings;
  # the query tower moved.
  query, docs = _embed(cfg, ckpt.params["retriever"], ref)
  assert _max_diff(docs, ref["scorer_cand_emb"]) <= TOL
  assert _max_diff(query, ref["scorer_query_emb"]) > 10 * TOL
  np.testing.assert_allclose(
      ckpt.params["retriever"]["query_embedder"]["projection"]["bias"],
      ckpt.params["retriever"]["document_embedder"]["projection"]["bias"] + np.float32(0.01),
      rtol=0, atol=1e-6)


def test_knowledge_augmented_encoder_matches_transformers(ref):
  ckpt = _load("encoder")
  assert ckpt.architecture == "RealmKnowledgeAugEncoder" and ckpt.parts == ("encoder",)
  assert ckpt.ignored_keys == ("realm.pooler.dense.bias", "realm.pooler.dense.weight")
  cfg = ckpt.encoder_config()
  _assert_tree_matches_init(ckpt.params["encoder"], realm.init_encoder, cfg)
  logits = jax.jit(encoder_lib.KnowledgeAugmentedEncoder(cfg).apply)(
      {"params": ckpt.params["encoder"]}, input_ids=ref["enc_ids"], input_mask=ref["enc_mask"],
      segment_ids=ref["enc_segs"], mlm_positions=ref["enc_mlm_positions"])
  assert logits.shape == ref["enc_mlm_logits"].shape == (2, 3, 2, 99)
  assert _max_diff(logits, ref["enc_mlm_logits"]) <= TOL
  # The marginal over candidates (REALM §2.3): realm_jax's loss function on our logits.
  out = losses.mlm_marginal_log_likelihood(jnp.asarray(ref["enc_relevance"]), logits,
                                           jnp.asarray(ref["enc_mlm_targets"]))
  assert _max_diff(out["token_log_likelihood"], ref["enc_marginal_log_probs"]) <= TOL
  assert abs(-float(out["token_log_likelihood"].mean()) - float(ref["enc_loss"])) <= TOL


def test_reader_matches_transformers(ref):
  ckpt = _load("reader")
  assert ckpt.architecture == "RealmReader" and ckpt.parts == ("reader",)
  assert "cls.predictions.decoder.weight" in ckpt.ignored_keys
  assert "realm.pooler.dense.weight" in ckpt.ignored_keys
  cfg = ckpt.reader_config()
  assert (cfg.span_hidden_size, cfg.max_span_width) == (8, 3)
  _assert_tree_matches_init(ckpt.params["reader"], realm.init_reader, cfg)

  body = ref["reader_block_mask"].astype(np.int32)
  seq_len = body.shape[-1]
  ours = _read_spans(cfg, ckpt.params["reader"], ref)  # [3 blocks, num_spans]
  hf_starts, hf_ends = ref["reader_span_starts"], ref["reader_span_ends"]
  perm = encoder_lib.span_index(seq_len, cfg.max_span_width, hf_starts, hf_ends)
  ours_in_hf_order = np.asarray(ours)[:, perm]  # [3, 57]
  valid = body[:, hf_starts].astype(bool) & body[:, hf_ends].astype(bool)
  assert valid.sum() > 20 and (~valid).sum() > 20
  hf = ref["reader_span_logits"]
  assert _max_diff(ours_in_hf_order[valid], hf[valid]) <= TOL
  assert np.all(ours_in_hf_order[~valid] == -1e9) and np.all(hf[~valid] < -1e30)

  # The prediction: argmax over blocks × spans of span logit + retriever logit (REALM §3.4).
  relevance = ref["reader_relevance"]
  joint = ours_in_hf_order + relevance[:, None]
  block, span = np.unravel_index(np.argmax(joint), joint.shape)
  assert block == int(ref["reader_block_idx"])
  assert (hf_starts[span], hf_ends[span]) == (int(ref["reader_start_pos"][0]),
                                              int(ref["reader_end_pos"][0]))

  # The losses (ORQA/REALM fine-tuning) with realm_jax's loss functions.
  is_answer = encoder_lib.gold_span_mask(seq_len, cfg.max_span_width, ref["reader_gold_starts"],
                                         ref["reader_gold_ends"])  # [3, num_spans]
  span_valid = np.asarray(encoder_lib.span_mask(jnp.asarray(body), cfg.max_span_width))
  reader_loss, _ = losses.reader_loss(jnp.asarray(ours)[None], jnp.asarray(relevance)[None],
                                      jnp.asarray(is_answer)[None], jnp.asarray(span_valid)[None])
  retriever_loss, _ = losses.retriever_loss(jnp.asarray(relevance)[None],
                                            jnp.asarray(ref["reader_has_answers"])[None])
  assert abs(float(reader_loss[0]) - float(ref["reader_reader_loss"])) <= TOL
  assert abs(float(retriever_loss[0]) - float(ref["reader_retriever_loss"])) <= TOL
  assert abs(float(reader_loss[0] + retriever_loss[0]) - float(ref["reader_loss"])) <= TOL


def test_openqa_matches_transformers(ref):
  ckpt = _load("openqa")
  assert ckpt.architecture == "RealmForOpenQA" and ckpt.parts == ("retriever", "reader")
  assert ckpt.share_embedders and ckpt.block_emb.shape == (7, 16)
  assert ckpt.block_emb.dtype == np.float32
  query = _embed_queries(ckpt.retriever_config(), ckpt.params["retriever"],
                         ref["openqa_query_ids"], ref["openqa_query_mask"])
  assert _max_diff(query, ref["openqa_query_emb"]) <= TOL
  scores = np.asarray(query) @ ckpt.block_emb.T
  assert _max_diff(scores, ref["openqa_block_scores"]) <= TOL
  np.testing.assert_array_equal(np.argsort(-scores[0])[:3],
                                np.argsort(-ref["openqa_block_scores"][0])[:3])

  body = ref["reader_block_mask"].astype(np.int32)
  ours = _read_spans(ckpt.reader_config(), ckpt.params["reader"], ref)
  perm = encoder_lib.span_index(body.shape[-1], 3, ref["reader_span_starts"], ref["reader_span_ends"])
  valid = body[:, ref["reader_span_starts"]].astype(bool) & body[:, ref["reader_span_ends"]].astype(
      bool)
  assert _max_diff(np.asarray(ours)[:, perm][valid], ref["openqa_reader_span_logits"][valid]) <= TOL


def test_span_orders_cover_the_same_spans(ref):
  perm = encoder_lib.span_index(20, 3, ref["reader_span_starts"], ref["reader_span_ends"])
  assert sorted(perm) == list(range(57))
  # transformers is width-major: the first 20 spans are the single tokens.
  np.testing.assert_array_equal(ref["reader_span_starts"][:20], ref["reader_span_ends"][:20])


# ---------------------------------------------------------------------------- mismatch errors


def test_missing_and_misshaped_parameters_are_named(tmp_path):
  tensors = load_file(str(FIXTURES / "openqa" / "model.safetensors"))
  del tensors["reader.qa_outputs.dense_output.weight"]
  tensors["embedder.cls.dense.bias"] = np.zeros((15,), np.float32)
  with pytest.raises(rc.CheckpointMismatchError) as err:
    rc.load_realm_checkpoint(_rewrite(_copy_fixture("openqa", tmp_path), tensors))
  msg = str(err.value)
  assert "model.safetensors" in msg
  assert "missing parameter 'reader.qa_outputs.dense_output.weight' (expected shape (1, 8))" in msg
  assert "parameter 'embedder.cls.dense.bias': expected shape (16,), found (15,)" in msg


def test_config_that_disagrees_with_the_weights(tmp_path):
  ckpt_dir = _rewrite(_copy_fixture("reader", tmp_path), span_hidden_size=6)
  with pytest.raises(rc.CheckpointMismatchError,
                     match=r"parameter 'qa_outputs\.dense_intermediate\.weight': expected shape "
                     r"\(12, 32\), found \(16, 32\)"):
    rc.load_realm_checkpoint(ckpt_dir)


def test_unexpected_keys_strict_and_lenient(tmp_path):
  tensors = load_file(str(FIXTURES / "reader" / "model.safetensors"))
  tensors["classifier.weight"] = np.zeros((2, 32), np.float32)
  ckpt_dir = _rewrite(_copy_fixture("reader", tmp_path), tensors)
  with pytest.raises(rc.CheckpointMismatchError,
                     match=r"unexpected parameters for a RealmReader \(1\): "
                     r"\['classifier\.weight'\]"):
    rc.load_realm_checkpoint(ckpt_dir)
  ckpt = rc.load_realm_checkpoint(ckpt_dir, strict=False)
  assert "classifier.weight" in ckpt.ignored_keys
  reference = _load("reader")
  jax.tree.map(np.testing.assert_array_equal, ckpt.params, reference.params)


def test_block_emb_shape_and_architecture_checks(tmp_path):
  ckpt_dir = _rewrite(_copy_fixture("openqa", tmp_path), num_block_records=8)
  with pytest.raises(rc.CheckpointMismatchError,
                     match=r"buffer 'block_emb': expected shape \(8, 16\)"):
    rc.load_realm_checkpoint(ckpt_dir)
  _rewrite(ckpt_dir, num_block_records=7, architectures=["RealmReader"])
  with pytest.raises(ValueError, match=r"config\.json: field 'architectures' is \['RealmReader'\] "
                     r"but the tensors .* are a RealmForOpenQA state dict"):
    rc.load_realm_checkpoint(ckpt_dir)
  # Forcing an architecture maps the keys that class expects; here the openqa prefixes are extra.
  with pytest.raises(rc.CheckpointMismatchError) as err:
    rc.load_realm_checkpoint(ckpt_dir, architecture="RealmReader")
  assert "missing parameter 'qa_outputs.dense_output.weight' (expected shape (1, 8))" in (
      err.value.problems)
  num_keys = len(load_file(str(ckpt_dir / "model.safetensors")))  # none has a reader's name
  assert f"unexpected parameters for a RealmReader ({num_keys}): ['block_emb'" in (
      err.value.problems[-1])
  with pytest.raises(ValueError, match=r"architecture='BertModel' is not one of"):
    rc.load_realm_checkpoint(ckpt_dir, architecture="BertModel")


def test_untied_decoder(tmp_path):
  tensors = load_file(str(FIXTURES / "encoder" / "model.safetensors"))
  word = tensors["realm.embeddings.word_embeddings.weight"]
  tensors["cls.predictions.decoder.weight"] = word  # tied copy: accepted silently
  tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"]
  ckpt_dir = _rewrite(_copy_fixture("encoder", tmp_path), tensors)
  ckpt = rc.load_realm_checkpoint(ckpt_dir)
  assert "cls.predictions.decoder.weight" in ckpt.ignored_keys
  tensors["cls.predictions.decoder.weight"] = word + np.float32(0.5)
  _rewrite(ckpt_dir, tensors, tie_word_embeddings=False)
  with pytest.raises(rc.CheckpointMismatchError,
                     match=r"'cls\.predictions\.decoder\.weight' differs from the word embeddings "
                     r"\(max abs difference 0\.5\) and config\.json has tie_word_embeddings=false"):
    rc.load_realm_checkpoint(ckpt_dir)
  tensors["cls.predictions.decoder.weight"] = word
  tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"] + np.float32(1)
  _rewrite(ckpt_dir, tensors)
  with pytest.raises(rc.CheckpointMismatchError,
                     match=r"'cls\.predictions\.decoder\.bias' differs"):
    rc.load_realm_checkpoint(ckpt_dir)


def _save_model_layout(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                                  dict[str, str]]:
  """What `safetensors.torch.save_model` writes for a tied `RealmKnowledgeAugEncoder`.

  save_model keeps the alphabetically first name of each group of shared tensors and records
  `metadata[dropped] = kept`: the decoder matrix stays as `cls.predictions.decoder.weight`, the
  word embeddings are dropped; `cls.predictions.bias` stays, its alias `...decoder.bias` is dropped.
  """
  out = dict(tensors)
  out["cls.predictions.decoder.weight"] = out.pop("realm.embeddings.word_embeddings.weight")
  metadata = {"realm.embeddings.word_embeddings.weight": "cls.predictions.decoder.weight",
              "cls.predictions.decoder.bias": "cls.predictions.bias"}
  return out, metadata


def test_tied_encoder_saved_by_safetensors_save_model(tmp_path):
  """Regression (issue #14): the word embeddings live under the tied decoder name."""
  reference = _load("encoder")
  tensors, metadata = _save_model_layout(load_file(str(FIXTURES / "encoder" / "model.safetensors")))
  assert "realm.embeddings.word_embeddings.weight" not in tensors
  ckpt_dir = _copy_fixture("encoder", tmp_path)
  save_file(tensors, str(ckpt_dir / "model.safetensors"), metadata=metadata)
  ckpt = rc.load_realm_checkpoint(ckpt_dir)
  jax.tree.map(np.testing.assert_array_equal, ckpt.params, reference.params)
  assert "cls.predictions.decoder.weight" in ckpt.ignored_keys
  # Without the metadata, tie_word_embeddings=true lets the decoder stand in for the embeddings.
  save_file(tensors, str(ckpt_dir / "model.safetensors"), metadata={"format": "pt"})
  ckpt = rc.load_realm_checkpoint(ckpt_dir)
  jax.tree.map(np.testing.assert_array_equal, ckpt.params, reference.params)
  # Untied, nothing can: the error names the missing matrix and why the decoder is not used.
  _rewrite(ckpt_dir, tie_word_embeddings=False)
  with pytest.raises(rc.CheckpointMismatchError) as err:
    rc.load_realm_checkpoint(ckpt_dir)
  assert err.value.problems == [
      "'cls.predictions.decoder.weight' cannot stand in for the missing "
      "'realm.embeddings.word_embeddings.weight': config.json has tie_word_embeddings=false",
      "missing parameter 'realm.embeddings.word_embeddings.weight' (expected shape (99, 32))"]


def test_alias_metadata_that_is_not_an_alias_is_ignored(tmp_path):
  """Metadata entries whose names are not a dropped / kept pair leave the tensors alone."""
  tensors = load_file(str(FIXTURES / "encoder" / "model.safetensors"))
  ckpt_dir = _copy_fixture("encoder", tmp_path)
  save_file(tensors, str(ckpt_dir / "model.safetensors"), metadata={
      "format": "pt", "realm.embeddings.word_embeddings.weight": "cls.predictions.bias",
      "realm.pooler.dense.weight": "no.such.tensor"})
  ckpt = rc.load_realm_checkpoint(ckpt_dir)
  np.testing.assert_array_equal(
      ckpt.params["encoder"]["bert"]["embeddings"]["word_embeddings"]["embedding"],
      tensors["realm.embeddings.word_embeddings.weight"])
  save_file(tensors, str(ckpt_dir / "model.safetensors"),
            metadata={rc.ALIASES_METADATA_KEY: "{not json"})
  with pytest.raises(ValueError, match=r"model\.safetensors: metadata 'realm_jax_aliases' is not "
                     r"JSON"):
    rc.load_realm_checkpoint(ckpt_dir)


@pytest.mark.parametrize("override, pattern", [
    ({"model_type": "bert"}, r"model_type='bert' is not 'realm'"),
    ({"hidden_act": "relu"}, r"hidden_act='relu' is not supported"),
    ({"position_embedding_type": "relative_key"}, r"position_embedding_type='relative_key'"),
    ({"retriever_proj_size": 0}, r"field 'retriever_proj_size' must be a positive integer"),
])
def test_bad_config_fields_are_named(tmp_path, override, pattern):
  ckpt_dir = _rewrite(_copy_fixture("reader", tmp_path), **override)
  with pytest.raises(ValueError, match=r"config\.json: " + pattern):
    rc.load_realm_checkpoint(ckpt_dir)


def test_reader_layer_norm_eps_must_match_span_reader(tmp_path):
  ckpt_dir = _rewrite(_copy_fixture("reader", tmp_path), reader_layer_norm_eps=1e-5)
  with pytest.raises(rc.CheckpointMismatchError,
                     match=r"reader_layer_norm_eps=1e-05 but SpanReader's LayerNorm uses 0\.001"):
    rc.load_realm_checkpoint(ckpt_dir)


def test_exact_gelu_checkpoint_loads_on_any_bert_config(tmp_path):
  """`hidden_act="gelu"` (exact) is what BertEncoder has always computed."""
  ckpt = rc.load_realm_checkpoint(_rewrite(_copy_fixture("encoder", tmp_path), hidden_act="gelu"))
  assert getattr(ckpt.hparams.bert, "hidden_act", "gelu") == "gelu"


def test_missing_files_and_pytorch_only_directories(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    rc.load_realm_checkpoint(tmp_path / "nope")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  shutil.copy(FIXTURES / "scorer" / "pytorch_model.bin", bin_dir)
  shutil.copy(FIXTURES / "scorer" / "config.json", bin_dir)
  with pytest.raises(FileNotFoundError, match=r"holds a PyTorch checkpoint \(pytorch_model\.bin\) "
                     r"but no model\.safetensors; .*pytorch_bin_to_safetensors"):
    rc.load_realm_checkpoint(bin_dir)
  with pytest.raises(ValueError, match=r"is not a \.safetensors file"):
    rc.load_realm_checkpoint(bin_dir / "pytorch_model.bin")
  no_config = tmp_path / "no_config"
  no_config.mkdir()
  shutil.copy(FIXTURES / "reader" / "model.safetensors", no_config)
  with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
    rc.load_realm_checkpoint(no_config)
  bert_like = tmp_path / "bert_like"
  bert_like.mkdir()
  save_file({"bert.embeddings.word_embeddings.weight": np.zeros((99, 32), np.float32)},
            str(bert_like / "model.safetensors"))
  shutil.copy(FIXTURES / "reader" / "config.json", bert_like)
  _rewrite(bert_like, hidden_act="gelu")
  with pytest.raises(rc.CheckpointMismatchError, match=r"no REALM model found: expected keys"):
    rc.load_realm_checkpoint(bert_like)


# --------------------------------------------------------- PyTorch .bin and converted params


def test_pytorch_bin_to_safetensors(tmp_path):
  pytest.importorskip("torch")
  out = rc.pytorch_bin_to_safetensors(FIXTURES / "scorer", tmp_path / "st")
  assert out == tmp_path / "st" / "model.safetensors"
  assert (tmp_path / "st" / "config.json").is_file()
  aliases = rc.read_aliases(out)
  # transformers shares the scorer's towers and aliases the decoder bias: written once.
  assert aliases["query_embedder.realm.encoder.layer.0.attention.self.query.weight"] == (
      "embedder.realm.encoder.layer.0.attention.self.query.weight")
  assert aliases["embedder.cls.predictions.decoder.bias"] == "embedder.cls.predictions.bias"
  written = load_file(str(out))
  assert not any(k.startswith("query_embedder.") for k in written)
  converted, reference = rc.load_realm_checkpoint(tmp_path / "st"), _load("scorer")
  assert converted.share_embedders
  jax.tree.map(np.testing.assert_array_equal, converted.params, reference.params)
  # The entry point converts a directory holding only the .bin on the fly.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("pytorch_model.bin", "config.json"):
    shutil.copy(FIXTURES / "scorer" / name, bin_dir / name)
  result = convert.convert_released_checkpoint(tmp_path / "work", bin_dir)
  assert result.architecture == "RealmScorer" and not (tmp_path / "work" / ".hf-safetensors.tmp"
                                                       ).exists()
  jax.tree.map(np.testing.assert_array_equal, rc.load_converted(tmp_path / "work").params,
               reference.params)


def test_bin_conversion_without_torch_names_the_fix(tmp_path, monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
      raise ModuleNotFoundError("No module named 'torch'", name="torch")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  with pytest.raises(ModuleNotFoundError, match=r"needs PyTorch .*one-liner"):
    convert.convert_released_checkpoint(tmp_path / "work", FIXTURES / "scorer" / "pytorch_model.bin")


@pytest.mark.parametrize("name, parts", [("scorer", ("retriever",)), ("encoder", ("encoder",)),
                                         ("reader", ("reader",)),
                                         ("openqa", ("retriever", "reader"))])
def test_converted_params_round_trip(tmp_path, name, parts):
  ckpt = _load(name)
  rc.save_converted(ckpt, tmp_path)
  back = rc.load_converted(tmp_path)
  assert tuple(back.params) == parts == ckpt.parts
  jax.tree.map(np.testing.assert_array_equal, back.params, ckpt.params)
  assert back.manifest["architecture"] == ckpt.architecture
  if "retriever" in parts:
    assert back.retriever_config == ckpt.retriever_config()
  if "reader" in parts:
    assert back.reader_config == ckpt.reader_config()
  if "encoder" in parts:
    assert back.encoder_config == ckpt.encoder_config()


def test_load_converted_refuses_a_damaged_file(tmp_path):
  rc.save_converted(_load("reader"), tmp_path)
  flat = load_file(str(tmp_path / rc.CONVERTED_PARAMS_NAME))
  del flat["reader/span_logits/kernel"]
  flat["reader/span_layer_norm/scale"] = np.ones((7,), np.float32)
  flat["reader/extra"] = np.ones((1,), np.float32)
  save_file(flat, str(tmp_path / rc.CONVERTED_PARAMS_NAME))
  with pytest.raises(rc.CheckpointMismatchError) as err:
    rc.load_converted(tmp_path)
  msg = str(err.value)
  assert "missing parameter 'reader/span_logits/kernel' (expected shape (8, 1))" in msg
  assert "parameter 'reader/span_layer_norm/scale': expected shape (8,), found (7,)" in msg
  assert "unexpected parameters (1): ['reader/extra']" in msg


# ------------------------------------------------------------------- block_emb → snapshot


def test_convert_openqa_writes_params_and_block_emb_snapshot(ref, tmp_path):
  (tmp_path / "ckpt").mkdir()
  for f in ("config.json", "model.safetensors"):
    shutil.copy(FIXTURES / "openqa" / f, tmp_path / "ckpt" / f)
  (tmp_path / "ckpt" / "vocab.txt").write_text("[PAD]\n[CLS]\n")
  work = tmp_path / "work"
  result = convert.convert_released_checkpoint(work, tmp_path / "ckpt", corpus_fingerprint="fp-blocks",
                                          num_shards=2)
  assert result.architecture == "RealmForOpenQA" and result.parts == ("retriever", "reader")
  assert result.snapshot_dir == work / "snapshots" / "0"
  assert (work / "vocab.txt").read_text() == "[PAD]\n[CLS]\n"
  assert not (work / ".hf-safetensors.tmp").exists()
  ckpt = _load("openqa")
  snap = snapshot_lib.read_snapshot(result.snapshot_dir)
  assert snap.corpus_fingerprint == "fp-blocks" and snap.num_shards == 2
  np.testing.assert_array_equal(snap.block_ids, np.arange(7))
  np.testing.assert_array_equal(snap.embeddings, ckpt.block_emb)
  assert snap.metadata["block_emb_sha256"] == result.block_emb_sha256
  assert snap.metadata["architecture"] == "RealmForOpenQA"
  # Retrieval through the snapshot ranks blocks as transformers' RealmForOpenQA does.
  back = rc.load_converted(work)
  query = _embed_queries(back.retriever_config, back.params["retriever"],
                         ref["openqa_query_ids"], ref["openqa_query_mask"])
  scores = np.asarray(query) @ snap.embeddings.T
  assert _max_diff(scores, ref["openqa_block_scores"]) <= TOL


def test_convert_from_and_into_an_object_store(tmp_path):
  """`realm-jax convert` with the checkpoint and the work directory on an object store (memory://).

  Nothing is written locally except the cache; params, config, vocab and the snapshot are in the
  store, and the converted params read back equal a local conversion's.
  """
  fsspec = pytest.importorskip("fsspec")
  fs = fsspec.filesystem("memory")
  for f in ("config.json", "model.safetensors"):
    fs.pipe(f"/rc-bucket/ckpt/{f}", (FIXTURES / "openqa" / f).read_bytes())
  fs.pipe("/rc-bucket/ckpt/vocab.txt", b"[PAD]\n[CLS]\n")
  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    result = convert.convert_released_checkpoint("memory://rc-bucket/work", "memory://rc-bucket/ckpt",
                                            corpus_fingerprint="fp-blocks")
  finally:
    os.chdir(cwd)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/rc-bucket/work", detail=False))
    snap = snapshot_lib.read_snapshot("memory://rc-bucket/work/snapshots/0")
    vocab = fs.cat("/rc-bucket/work/vocab.txt")
    fs.rm("/rc-bucket", recursive=True)
  assert {"realm_params.safetensors", "realm_config.json", "vocab.txt", "snapshots"} <= set(names)
  assert vocab == b"[PAD]\n[CLS]\n"
  assert str(result.params_file) == "memory://rc-bucket/work/realm_params.safetensors"
  np.testing.assert_array_equal(snap.embeddings, _load("openqa").block_emb)
  assert not list(tmp_path.rglob("gs:*")) and not list(tmp_path.rglob("memory:*"))


def test_convert_without_fingerprint_skips_the_snapshot(tmp_path, caplog):
  result = convert.convert_released_checkpoint(tmp_path, FIXTURES / "openqa")
  assert result.snapshot_dir is None and result.block_emb_sha256 is not None
  assert not (tmp_path / "snapshots").exists()
  assert "block_emb [7, 16] not exported: pass corpus_fingerprint" in caplog.text


def test_write_block_emb_snapshot_ids_and_errors(tmp_path):
  emb = np.arange(12, dtype=np.float32).reshape(4, 3)
  ids = np.array([40, 10, 30, 20])
  path = convert.write_block_emb_snapshot(emb, tmp_path, "fp", params_step=5, block_ids=ids,
                                     metadata={"source": "x"})
  snap = snapshot_lib.read_snapshot(path)
  assert path == tmp_path / "5" and snap.params_step == 5
  np.testing.assert_array_equal(snap.block_ids, ids)
  np.testing.assert_array_equal(snap.embeddings, emb)
  assert snap.metadata == {"embedder": "released block_emb", "source": "x"}
  with pytest.raises(ValueError, match=r"block_ids must be \[4\], got shape \(3,\)"):
    convert.write_block_emb_snapshot(emb, tmp_path, "fp", params_step=6, block_ids=ids[:3])
  with pytest.raises(ValueError, match=r"block_emb must be \[num_blocks, dim\]"):
    convert.write_block_emb_snapshot(emb[0], tmp_path, "fp", params_step=7)
  with pytest.raises(snapshot_lib.SnapshotError):
    convert.write_block_emb_snapshot(emb, tmp_path, "fp", params_step=8, block_ids=[1, 1, 2, 3])
