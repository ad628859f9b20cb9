"""REALM pre-training: candidates, the marginal likelihood vs a naive loop, gradients through the k
candidates only, 1-vs-8-device agreement, index sources, and the loop end to end (8 CPU devices)."""

from __future__ import annotations

import functools
import json
import importlib.util
import os

import jax
import numpy as np
import pytest

import realm_fixtures as fx
from realm_jax.data import salient_spans
from realm_jax.models import encoder as encoder_lib
from realm_jax.models import realm
from realm_jax.models import retriever as retriever_lib
from realm_jax.retrieval import snapshot as snapshot_lib
from realm_jax.data import corpus_config
from realm_jax.training import index_source
from realm_jax.training import loop
from realm_jax.training import optim
from realm_jax.training import pretrain
from realm_jax.training import train_state
from realm_jax import sharding
from realm_jax.retrieval import embedding
from realm_jax.retrieval import trainer_done

TASK = pretrain.PretrainConfig(num_candidates=4, query_length=16, candidate_length=32, max_masks=3)
MODEL = fx.tiny_model()
HAS_SPACY = any(importlib.util.find_spec(m) is not None for m in salient_spans.DEFAULT_MODELS)


@pytest.fixture(scope="module")
def setup():
  tok = fx.tokenizer()
  corp = fx.corpus(tok)
  examples = fx.masked_examples(corp, tok, TASK.query_length, TASK.max_masks, n=8)
  featurizer = pretrain.PretrainFeaturizer(tok, corp, TASK)
  n = len(corp)
  # Each query "retrieves" its own block first (a trivial retrieval), then the following blocks.
  src = examples.arrays["source_block_id"]
  retrieved = np.stack([np.roll(corp.block_ids, -int(s))[:5] for s in src])
  candidates = featurizer.select_candidates(retrieved, src)
  batch = featurizer.featurize(examples.batch(np.arange(8)), candidates)
  assert n >= 6
  return tok, corp, examples, featurizer, candidates, batch


def test_null_first_and_no_trivial_retrieval(setup):
  tok, corp, examples, featurizer, candidates, batch = setup
  src = examples.arrays["source_block_id"]
  assert candidates.shape == (8, TASK.num_candidates)
  assert (candidates[:, 0] == pretrain.NULL_BLOCK_ID).all()
  for row, s in zip(candidates, src):
    assert s not in row  # the query's own block was retrieved first and dropped
    assert len(set(row[1:].tolist())) == TASK.num_candidates - 1 and (row[1:] >= 0).all()
  # A copy of the source block's text (another id, same title and text) is a trivial retrieval too.
  featurizer._text_keys[2] = featurizer._text_key(0)
  row = featurizer.select_candidates(np.array([[2, 3, 4, 5, 6]]), np.array([0]))[0]
  assert row.tolist() == [pretrain.NULL_BLOCK_ID, 3, 4, 5]
  del featurizer._text_keys[2]
  # Too few usable retrievals: padded and marked invalid.
  short = featurizer.select_candidates(np.array([[0, 1, -1, -1, -1]]), np.array([0]))
  assert short.tolist() == [[pretrain.NULL_BLOCK_ID, 1, pretrain.PAD_BLOCK_ID,
                             pretrain.PAD_BLOCK_ID]]
  b = featurizer.featurize(examples.batch([0]), short)
  assert b["candidate_valid"].tolist() == [[True, True, False, False]]


def test_featurized_inputs(setup):
  tok, corp, examples, featurizer, candidates, batch = setup
  c, L = TASK.candidate_length, TASK.joint_length
  assert batch["candidate_input_ids"].shape == (8, 4, c)
  assert batch["joint_input_ids"].shape == (8, 4, L)
  # ∅: `[CLS] [SEP] [SEP]` for the document tower, `[CLS] x [SEP] [SEP]` for the encoder.
  null = batch["candidate_input_ids"][:, 0]
  assert (null[:, :3] == [tok.cls_id, tok.sep_id, tok.sep_id]).all() and (null[:, 3:] == 0).all()
  assert (batch["candidate_input_mask"][:, 0].sum(-1) == 3).all()
  for i in range(8):
    q = batch["query_input_ids"][i]
    qlen = int(batch["query_input_mask"][i].sum())
    joint0 = batch["joint_input_ids"][i, 0]
    np.testing.assert_array_equal(joint0[:qlen], q[:qlen])
    assert joint0[qlen] == tok.sep_id and batch["joint_input_mask"][i, 0].sum() == qlen + 1
    # Every candidate's joint input has x at the query's positions, so the masks line up.
    for j in range(4):
      np.testing.assert_array_equal(batch["joint_input_ids"][i, j, :qlen], q[:qlen])
      pos = batch["mlm_positions"][i][batch["mlm_weights"][i] > 0]
      assert (batch["joint_input_ids"][i, j, pos] == tok.mask_id).all()
    # A real candidate: document tower `[CLS] title [SEP] body [SEP]`, encoder body without title.
    pos1 = int(corp.positions([candidates[i, 1]])[0])
    body = corp.body_ids(pos1)
    doc = corp.retrieval_inputs([pos1], max_length=c)["input_ids"][0]
    np.testing.assert_array_equal(batch["candidate_input_ids"][i, 1], doc)
    n_body = min(len(body), c - 2)
    np.testing.assert_array_equal(batch["joint_input_ids"][i, 1, qlen:qlen + n_body], body[:n_body])
    assert (batch["joint_segment_ids"][i, 1, qlen:qlen + n_body + 1] == 1).all()


def _logsumexp(x, axis=-1):
  top = x.max(axis=axis, keepdims=True)
  return (np.log(np.exp(x - top).sum(axis=axis, keepdims=True)) + top).squeeze(axis)


def _log_softmax(x):
  return x - np.expand_dims(_logsumexp(x, -1), -1)


def _naive_token_log_likelihood(params, batch, model):
  """Per-candidate encoder and embedder runs, marginalised in float64 numpy."""
  retriever_cfg, encoder_cfg = model.retriever_config(), model.bert_config()
  ret = retriever_lib.Retriever(retriever_cfg)
  enc = encoder_lib.KnowledgeAugmentedEncoder(encoder_cfg)
  embed_q = jax.jit(functools.partial(ret.apply, method=retriever_lib.Retriever.embed_queries))
  embed_d = jax.jit(functools.partial(ret.apply, method=retriever_lib.Retriever.embed_documents))
  encode = jax.jit(enc.apply)
  n, k = batch["candidate_valid"].shape
  token_ll, null_ll = [], []
  for i in range(n):
    q = embed_q({"params": params["retriever"]}, input_ids=batch["query_input_ids"][i:i + 1],
                input_mask=batch["query_input_mask"][i:i + 1],
                segment_ids=batch["query_segment_ids"][i:i + 1])
    scores, token_lp = [], []
    for j in range(k):
      d = embed_d({"params": params["retriever"]},
                  input_ids=batch["candidate_input_ids"][i:i + 1, j],
                  input_mask=batch["candidate_input_mask"][i:i + 1, j],
                  segment_ids=batch["candidate_segment_ids"][i:i + 1, j])
      scores.append(float(np.dot(np.asarray(q[0], np.float64), np.asarray(d[0], np.float64)))
                    * retriever_cfg.score_scale)
      logits = encode({"params": params["encoder"]},
                      input_ids=batch["joint_input_ids"][i:i + 1, j:j + 1],
                      input_mask=batch["joint_input_mask"][i:i + 1, j:j + 1],
                      segment_ids=batch["joint_segment_ids"][i:i + 1, j:j + 1],
                      mlm_positions=batch["mlm_positions"][i:i + 1])[0, 0]
      logp = _log_softmax(np.asarray(logits, np.float64))
      token_lp.append(logp[np.arange(logits.shape[0]), batch["mlm_targets"][i]])
    log_p_z = _log_softmax(np.asarray(scores))
    joint = log_p_z[:, None] + np.stack(token_lp)  # [k, m]
    token_ll.append(_logsumexp(joint, axis=0))
    null_ll.append(token_lp[0])
  return np.stack(token_ll), np.stack(null_ll)


def test_marginal_likelihood_matches_naive_loop(setup, steps8):
  *_, batch = setup
  params = realm.init_params(MODEL, jax.random.key(0), parts=("retriever", "encoder"))
  token_ll, null_ll = _naive_token_log_likelihood(params, batch, MODEL)
  w = batch["mlm_weights"]
  naive_loss = -(token_ll * w).sum() / w.sum()
  naive_utility = ((token_ll - null_ll) * w).sum() / w.sum()
  loss, aux = jax.jit(functools.partial(
      pretrain.pretraining_loss, retriever_cfg=MODEL.retriever_config(),
      encoder_cfg=MODEL.bert_config(), deterministic=True))(params, batch, None)
  np.testing.assert_allclose(np.asarray(aux["token_log_likelihood"]), token_ll, rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(float(loss), naive_loss, rtol=1e-5)
  # The jitted train step on 8 devices reports the same (pre-update) loss and utility.
  mesh, tx, train_fn = steps8
  assert mesh.shape["data"] == 8
  state = train_state.create_train_state(params, tx, mesh)
  _, metrics = train_fn(state, sharding.global_batch_from_local(batch, mesh), jax.random.key(1))
  metrics = jax.device_get(metrics)
  np.testing.assert_allclose(metrics["train/mlm_loss"], naive_loss, rtol=1e-4)
  np.testing.assert_allclose(metrics["retrieval/utility"], naive_utility, rtol=1e-3, atol=1e-5)
  assert 0.0 < metrics["retrieval/p_null"] < 1.0
  assert 0.0 < metrics["retrieval/entropy"] <= np.log(TASK.num_candidates) + 1e-5


def test_document_tower_gradients_only_through_candidates(setup):
  tok, corp, examples, featurizer, candidates, batch = setup
  model = fx.tiny_model(share_embedders=False)
  params = realm.init_params(model, jax.random.key(0), parts=("retriever", "encoder"))

  @jax.jit
  def grads_of(b):
    fn = lambda p: pretrain.pretraining_loss(  # noqa: E731
        p, b, None, retriever_cfg=model.retriever_config(), encoder_cfg=model.bert_config(),
        deterministic=True)[0]
    return jax.grad(fn)(params)["retriever"]

  # Two queries whose candidates cover only some of the corpus blocks.
  batch = {k: v[:2] for k, v in batch.items()}
  assert len(set(candidates[:2, 1:].ravel())) < len(corp)
  g = grads_of(batch)
  doc_words = np.asarray(g["document_embedder"]["bert"]["embeddings"]["word_embeddings"]
                         ["embedding"])
  query_words = np.asarray(g["query_embedder"]["bert"]["embeddings"]["word_embeddings"]
                           ["embedding"])
  touched = np.flatnonzero(np.abs(doc_words).sum(-1) > 0)
  in_candidates = set(np.unique(batch["candidate_input_ids"][batch["candidate_input_mask"] > 0]))
  in_queries = set(np.unique(batch["query_input_ids"][batch["query_input_mask"] > 0]))
  # The document tower only sees the candidates' tokens: no gradient for any other vocabulary row,
  # in particular none for the tokens of corpus blocks that are not candidates.
  assert set(touched.tolist()) <= in_candidates
  assert set(touched.tolist()) == in_candidates  # and every candidate token gets one
  outside = set(np.unique(np.concatenate([corp.body_ids(p) for p in range(len(corp))]))) \
      - in_candidates
  assert outside and not np.abs(doc_words[sorted(outside)]).sum()
  # The query tower only sees the queries.
  assert set(np.flatnonzero(np.abs(query_words).sum(-1) > 0).tolist()) <= in_queries
  # Changing one candidate's tokens changes the document tower's gradient.
  changed = dict(batch, candidate_input_ids=batch["candidate_input_ids"].copy())
  changed["candidate_input_ids"][0, 1, 3] = tok.convert_tokens_to_ids(["volcano"])[0]
  g2 = grads_of(changed)
  a = np.asarray(g["document_embedder"]["projection"]["kernel"])
  b = np.asarray(g2["document_embedder"]["projection"]["kernel"])
  assert np.abs(a).sum() > 0 and not np.allclose(a, b)


def _steps(mesh):
  tx = optim.bert_adamw(optim.OptimizerConfig(learning_rate=3e-3, num_train_steps=100,
                                              warmup_steps=0))
  return mesh, tx, loop.jit_train_step(pretrain.step_parts(MODEL, TASK, 8, tx).train_step, mesh)


@pytest.fixture(scope="module")
def steps8():
  """The train step jitted once over the 8-device mesh (compiling takes most of a test's time)."""
  return _steps(sharding.make_mesh())


def _run_steps(batch, steps, num_steps):
  mesh, tx, train_fn = steps
  params = realm.init_params(MODEL, jax.random.key(0), parts=("retriever", "encoder"))
  state = train_state.create_train_state(params, tx, mesh)
  out = []
  for _ in range(num_steps):
    state, metrics = train_fn(state, sharding.global_batch_from_local(batch, mesh),
                              jax.random.key(1))
    out.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  return out


def test_same_loss_on_1_and_8_devices_and_learning(setup, steps8):
  *_, batch = setup
  m8 = _run_steps(batch, steps8, 6)
  m1 = _run_steps(batch, _steps(sharding.make_mesh(devices=jax.devices()[:1])), 2)
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=2e-4)
  assert all(np.isfinite(m["train/loss"]) for m in m8)
  assert m8[-1]["train/loss"] < m8[0]["train/loss"]


def test_snapshot_rows_are_the_in_step_document_embeddings(embed_each_block, tmp_path, setup):
  """The index the trainer builds (bucketed, batched) holds, for each block, the embedding that the
  train step computes for the same block as a candidate with the same params (REALM §3.4: the
  index only picks the candidates; the step re-embeds them), when the candidate length is the
  block length (288 and 288 in the paper). The corpus has blocks of 21 to 33 wordpieces: two length
  buckets (32, 48)."""
  tok = setup[0]
  corp = fx.corpus(tok, max_block_length=48)  # 16 + 48: the tiny BERT's 64 positions
  lengths = corp.retrieval_inputs(np.arange(len(corp)))["input_mask"].sum(axis=1)
  assert embedding.plan_batches(lengths, 4, corp.max_block_length).shapes == (32, 48)
  task = pretrain.PretrainConfig(num_candidates=4, query_length=16,
                                 candidate_length=corp.max_block_length, max_masks=3)
  params = jax.jit(lambda key: realm.init_params(MODEL, key, parts=("retriever", "encoder")))(
      jax.random.key(5))
  retriever_cfg = MODEL.retriever_config()
  path = index_source.ensure_first_snapshot(tmp_path / "snapshots", corp, retriever_cfg,
                                            params["retriever"], params_step=0, batch_size=4)
  snapshot = snapshot_lib.read_snapshot(path)
  row_of = {int(b): i for i, b in enumerate(snapshot.block_ids)}
  np.testing.assert_allclose(snapshot.embeddings,
                             embed_each_block(MODEL, corp, params["retriever"]),
                             rtol=1e-5, atol=1e-5)

  examples = fx.masked_examples(corp, tok, task.query_length, task.max_masks, n=len(corp))
  featurizer = pretrain.PretrainFeaturizer(tok, corp, task)
  src = examples.arrays["source_block_id"]
  retrieved = np.stack([np.roll(corp.block_ids, -int(s))[:5] for s in src])
  candidates = featurizer.select_candidates(retrieved, src)
  batch = featurizer.featurize(examples.batch(np.arange(len(corp))), candidates)
  out = jax.jit(functools.partial(pretrain.forward, retriever_cfg=retriever_cfg,
                                  encoder_cfg=MODEL.bert_config(), deterministic=True))(params, batch)
  model = retriever_lib.Retriever(retriever_cfg)
  d = model.apply({"params": params["retriever"]}, input_ids=batch["candidate_input_ids"],
                  input_mask=batch["candidate_input_mask"],
                  segment_ids=batch["candidate_segment_ids"],
                  method=retriever_lib.Retriever.embed_documents)
  q = model.apply({"params": params["retriever"]}, input_ids=batch["query_input_ids"],
                  input_mask=batch["query_input_mask"], segment_ids=batch["query_segment_ids"],
                  method=retriever_lib.Retriever.embed_queries)
  checked = set()
  for i, row in enumerate(candidates):
    for j, block_id in enumerate(row):
      if block_id < 0:
        continue  # the null document (and padding) has no snapshot row
      index_row = snapshot.embeddings[row_of[int(block_id)]]
      np.testing.assert_allclose(d[i, j], index_row, rtol=1e-5, atol=1e-5)
      # The step's retriever logit for the candidate is the score against its index row.
      np.testing.assert_allclose(out["retriever_logits"][i, j],
                                 retriever_cfg.score_scale * float(np.dot(q[i], index_row)),
                                 rtol=1e-4, atol=1e-4)
      checked.add(int(block_id))
  assert checked == set(corp.block_ids.tolist())  # every block, of both length buckets


def test_index_sources(embed_each_block, tmp_path, setup):
  tok, corp, *_ = setup
  retriever_cfg = MODEL.retriever_config()
  params = realm.init_params(MODEL, jax.random.key(0), parts=("retriever",))["retriever"]
  root = tmp_path / "snapshots"
  path = index_source.ensure_first_snapshot(root, corp, retriever_cfg, params, params_step=0,
                                            batch_size=8)
  assert path == root / "0"
  assert index_source.ensure_first_snapshot(root, corp, retriever_cfg, params, 5) == path
  make = index_source.make_searcher_factory("exact", sharding.make_mesh())
  static = index_source.StaticIndexSource(path, make, corp.fingerprint)
  assert static.before_step(0) is static.before_step(100)
  current = {"params": params}
  inline = index_source.InlineRefreshIndexSource(root, corp, retriever_cfg,
                                                 lambda: current["params"], make,
                                                 refresh_every_steps=2, batch_size=8, keep=2)
  assert inline.before_step(1).snapshot.params_step == 0
  # New params at step 2: the refreshed snapshot holds their embeddings.
  current["params"] = jax.tree_util.tree_map(lambda x: x * 1.5, params)
  index = inline.before_step(2)
  assert index.snapshot.params_step == 2 and inline.num_refreshes == 1
  np.testing.assert_allclose(index.snapshot.embeddings,
                             embed_each_block(MODEL, corp, current["params"]),
                             rtol=1e-5, atol=1e-5)
  assert inline.before_step(3) is index
  assert inline.metrics(3) == {"index/staleness_steps": 1.0, "index/params_step": 2.0,
                               "index/refreshes": 1.0,
                               "index/refresh_s": pytest.approx(inline.refresh_seconds)}
  inline.before_step(4)
  inline.before_step(6)
  assert [s for s, _ in snapshot_lib.list_snapshots(root)] == [4, 6]  # keep=2
  with pytest.raises(snapshot_lib.SnapshotError, match="another corpus"):
    other = fx.corpus(tok, max_block_length=48)
    index_source.ensure_first_snapshot(root, other, retriever_cfg, params, 0)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SPACY, reason="salient spans need a spaCy English model")
def test_train_loop_inline_refresh_and_resume(tmp_path):
  source = fx.write_jsonl(tmp_path / "docs.jsonl")
  data = pretrain.PretrainDataConfig(corpus=corpus_config.CorpusConfig(
      sources=(source,), max_block_length=64, tokenizer_path=fx.vocab_path(),
      data_dir=str(tmp_path / "tfds")))
  workdir = str(tmp_path / "run")
  kwargs = dict(model=MODEL, data=data, task=TASK, batch_size=8, searcher="scann",
                index_refresh="inline", refresh_every_steps=2, index_batch_size=8,
                num_eval_examples=4, eval_batch_size=8)
  loop_config = functools.partial(loop.LoopConfig, log_every_steps=1, checkpoint_every_steps=2)
  first = pretrain.train(workdir, loop=loop_config(num_train_steps=3), **kwargs)
  assert first["masking"] == "salient" and first["num_examples"] > 8
  assert [h["step"] for h in first["history"]] == [1, 2, 3]
  assert first["num_refreshes"] == 1 and first["final_snapshot_params_step"] == 2
  assert first["max_index_staleness_steps_seen"] == 1
  assert [h["retrieval/index_staleness_steps"] for h in first["history"]] == [0, 1, 0]
  for key in ("train/mlm_accuracy", "retrieval/utility", "retrieval/entropy", "retrieval/p_null"):
    assert np.isfinite(first["train"][key]) and np.isfinite(first["eval_final"][key])
  assert os.path.isfile(os.path.join(workdir, "summary.json"))
  # Resume: continues from the step-3 checkpoint.
  second = pretrain.train(workdir, loop=loop_config(num_train_steps=4), **kwargs)
  assert second["start_step"] == 3 and [h["step"] for h in second["history"]] == [4]
  assert "eval_initial" not in second


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SPACY, reason="salient spans need a spaCy English model")
def test_train_loop_async_refresh_uses_the_watcher(tmp_path):
  watcher = pytest.importorskip("realm_jax.retrieval.watcher")
  del watcher
  source = fx.write_jsonl(tmp_path / "docs.jsonl")
  data = pretrain.PretrainDataConfig(corpus=corpus_config.CorpusConfig(
      sources=(source,), max_block_length=64, data_dir=str(tmp_path / "tfds")))
  workdir = tmp_path / "run"
  # The index-builder job's first index (here built in the test instead of by the job).
  tok, corp = corpus_config.load_corpus(data, MODEL.checkpoint_dir(), str(workdir))
  params = realm.init_params(MODEL, jax.random.key(0), parts=("retriever",))["retriever"]
  index_source.ensure_first_snapshot(workdir / "snapshots", corp, MODEL.retriever_config(), params,
                                     params_step=0, batch_size=8)
  summary = pretrain.train(str(workdir), model=MODEL, data=data, task=TASK, batch_size=8,
                           loop=loop.LoopConfig(num_train_steps=2, log_every_steps=1,
                                                checkpoint_every_steps=1),
                           index_refresh="async", poll_interval_s=0.2,
                           max_index_staleness_steps=10, searcher="exact")
  assert [h["retrieval/index_staleness_steps"] for h in summary["history"]] == [0, 1]
  assert summary["history"][-1]["index/staleness_steps"] == 1
  assert summary["final_snapshot_params_step"] == 0
  assert trainer_done.trainer_final_step(str(workdir)) == 2  # the builder job may exit now


def _params_from_run(init_from, seed=0):
  parts = pretrain.step_parts(MODEL, TASK, 8)
  abstract = train_state.abstract_train_state(parts.init_params, parts.tx,
                                              sharding.make_mesh()).params
  return pretrain.params_from_run(init_from, abstract, MODEL, seed)


def _ict_run(tmp_path):
  """A 2-step ICT run (the warm start, §3.4) over the fixture corpus; returns (data, its workdir)."""
  from realm_jax.training import ict
  source = fx.write_jsonl(tmp_path / "docs.jsonl")
  data = pretrain.PretrainDataConfig(corpus=corpus_config.CorpusConfig(
      sources=(source,), max_block_length=64, tokenizer_path=fx.vocab_path(),
      data_dir=str(tmp_path / "tfds")))
  ict_dir = str(tmp_path / "ict")
  ict.train(ict_dir, model=MODEL, data=data.corpus,
            task=ict.IctConfig(query_length=16, block_length=32), batch_size=8,
            loop=loop.LoopConfig(num_train_steps=2, log_every_steps=1, checkpoint_every_steps=2))
  return data, ict_dir


def test_ict_to_realm_hand_over(tmp_path):
  """The ICT → REALM hand-over (CI-sized): REALM's initial params are the ICT run's retriever,
  bit for bit, and the pretrained encoder with its seeded fresh heads (REALM §3.4)."""
  from realm_jax.training import checkpointing
  _, ict_dir = _ict_run(tmp_path)
  assert checkpointing.saved_param_parts(ict_dir) == (["retriever"], 2)
  params = _params_from_run(ict_dir, seed=3)
  assert set(params) == {"retriever", "encoder"}
  fresh = realm.init_params(MODEL, jax.random.key(0), parts=("retriever",))["retriever"]
  ict_params, step = checkpointing.restore_partial_params(
      os.path.join(ict_dir, "checkpoints"),
      {"retriever": checkpointing.abstract_like(
          jax.device_put(fresh, sharding.replicated(sharding.make_mesh())))})
  assert step == 2
  for a, b in zip(jax.tree_util.tree_leaves(params["retriever"]),
                  jax.tree_util.tree_leaves(ict_params["retriever"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Two ICT updates moved the retriever: the hand-over is not a fresh initialisation.
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
      jax.tree_util.tree_leaves(params["retriever"]), jax.tree_util.tree_leaves(fresh)))
  assert moved > 0.0
  encoder = realm.init_params(MODEL, jax.random.key(3), parts=("encoder",))["encoder"]
  for a, b in zip(jax.tree_util.tree_leaves(params["encoder"]),
                  jax.tree_util.tree_leaves(encoder)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(FileNotFoundError):
    _params_from_run(str(tmp_path / "no_such_run"))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SPACY, reason="salient spans need a spaCy English model")
def test_ict_warm_start_is_loaded_by_pretrain(tmp_path):
  """`pretrain.train(init_from=<ICT run>)` end to end; a REALM checkpoint serves as init_from too."""
  from realm_jax.training import checkpointing
  data, ict_dir = _ict_run(tmp_path)
  params = _params_from_run(ict_dir, seed=3)
  run = str(tmp_path / "realm")
  pretrain.train(run, model=MODEL, data=data, task=TASK, batch_size=8,
                 loop=loop.LoopConfig(num_train_steps=1, log_every_steps=1,
                                      checkpoint_every_steps=1), index_batch_size=8,
                 init_from=ict_dir, searcher="exact")
  again = _params_from_run(run)
  assert checkpointing.saved_param_parts(run) == (["encoder", "retriever"], 1)
  assert jax.tree_util.tree_structure(again["retriever"]) == jax.tree_util.tree_structure(
      params["retriever"])


@pytest.mark.skipif(not HAS_SPACY, reason="salient spans need a spaCy English model")
def test_pretraining_text_separate_from_the_knowledge_corpus(tmp_path):
  """REALM (CC-News): masked sentences from one text, candidates from another corpus (§4.2)."""
  knowledge = fx.write_jsonl(tmp_path / "wiki.jsonl")
  news = tmp_path / "news.jsonl"
  news.write_text("\n".join(json.dumps({"title": f"Report {i}", "text": text}) for i, text in enumerate([
      "Reuters reported on Monday that Marseille opened a new harbour terminal in 2017.",
      "The mayor of Toronto, John Tory, announced the budget in Ottawa on Friday.",
  ])) + "\n")
  kw = dict(corpus=corpus_config.CorpusConfig(sources=(knowledge,), max_block_length=64,
                                              tokenizer_path=fx.vocab_path(),
                                              data_dir=str(tmp_path / "tfds")))
  only_wiki = pretrain.PretrainDataConfig(**kw)
  with_news = pretrain.PretrainDataConfig(pretraining_sources=(str(news),), **kw)
  _, wiki_corpus, wiki_examples = pretrain.load_pretraining_data(only_wiki, MODEL, TASK,
                                                                 str(tmp_path))
  tok, corpus, examples = pretrain.load_pretraining_data(with_news, MODEL, TASK, str(tmp_path))
  # The index stays the knowledge corpus; the queries are the news sentences.
  assert corpus.fingerprint == wiki_corpus.fingerprint and len(corpus) == len(wiki_corpus)
  assert np.all(wiki_examples.arrays["source_block_id"] >= 0)
  assert len(examples) >= 2 and np.all(examples.arrays["source_block_id"] == -1)
  queries = " ".join(tok.decode(row[row > 0].tolist()) for row in
                     examples.arrays["query_input_ids"]).lower()
  assert "harbour" in queries or "budget" in queries
  wiki_queries = " ".join(tok.decode(row[row > 0].tolist()) for row in
                          wiki_examples.arrays["query_input_ids"]).lower()
  assert "harbour" not in wiki_queries and "budget" not in wiki_queries
  # No candidate is dropped as a "trivial retrieval" of a news sentence.
  featurizer = pretrain.PretrainFeaturizer(tok, corpus, TASK)
  retrieved = np.tile(corpus.block_ids[:3], (len(examples), 1))
  chosen = featurizer.select_candidates(retrieved, examples.arrays["source_block_id"])
  np.testing.assert_array_equal(chosen[:, 1:], retrieved[:, :3])
