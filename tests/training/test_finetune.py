"""Open-QA fine-tuning: featurisation labels, one jitted step on 8 devices, 1-vs-8-device agreement."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax import tokenization
from realm_jax.data import corpus as corpus_lib
from realm_jax.data import corpus_store
from realm_jax.data import featurize
from realm_jax.data.questions import Question
from realm_jax.models import bert
from realm_jax.models import encoder as encoder_lib
from realm_jax.models import realm
from realm_jax.data import example_order
from realm_jax.training import finetune
from realm_jax.training import length_buckets
from realm_jax.training import loop
from realm_jax.training import optim
from realm_jax.training import train_state
from realm_jax import sharding

DOCS = [
    corpus_lib.Document("paris#0", "Paris", "Paris is the capital of France. The Eiffel Tower was "
                        "built in 1889 for the World's Fair."),
    corpus_lib.Document("rome#0", "Rome", "Rome is the capital of Italy. The Colosseum could hold "
                        "50,000 spectators."),
    corpus_lib.Document("tokyo#0", "Tokyo", "Tokyo is the capital of Japan. It hosted the Summer "
                        "Olympics in 1964 and 2021."),
    corpus_lib.Document("nile#0", "Nile", "The Nile is a river in Africa. It flows into the "
                        "Mediterranean Sea."),
]
QUESTIONS = [
    Question("q0", "When was the Eiffel Tower built?", ["1889"], gold_doc_ids=("paris#0",)),
    Question("q1", "How many spectators could the Colosseum hold?", ["50,000"]),
    Question("q2", "What is the capital of Japan?", ["Tokyo"]),
    Question("q3", "Where does the Nile flow?", ["the Mediterranean Sea"]),
]
TASK = finetune.OpenQAConfig(num_retrieved=4, num_read=2, query_length=16, reader_length=48,
                             reader_query_length=16, reader_length_bucket=8)
MODEL = realm.ModelConfig(
    init_checkpoint=None, pooling="cls_projection", projection_size=8, span_hidden_size=8,
    max_span_width=4,
    bert=bert.BertConfig(vocab_size=30522, hidden_size=16, num_layers=1, num_heads=2,
                         intermediate_size=32, max_position_embeddings=64, hidden_dropout=0.0,
                         attention_dropout=0.0))


@pytest.fixture(scope="module")
def setup():
  tok = tokenization.WordPieceTokenizer.from_vocab_file(
      tokenization.minilm_model_dir() / "vocab.txt")
  blocks = corpus_lib.split_into_blocks(DOCS, tok, 64, show_progress=False)
  corpus = corpus_store.Corpus(blocks, tok, 64)
  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=(len(corpus), MODEL.retriever_config().embedding_dim)).astype(
      np.float32)
  featurizer = finetune.OpenQAFeaturizer(tok, corpus, corpus.block_ids, embeddings, TASK,
                                         MODEL.max_span_width)
  # Question i retrieves its own block first, then the others.
  retrieved = np.array([[i] + [j for j in range(4) if j != i] for i in range(4)], np.int64)
  batch, reads = featurizer.batch(QUESTIONS, retrieved, with_labels=True)
  return tok, corpus, featurizer, batch, reads


def test_span_labels_recover_the_answer_text(setup):
  _, corpus, featurizer, batch, reads = setup
  assert batch["retrieved_has_answer"][:, 0].all()
  for i, q in enumerate(QUESTIONS):
    hits = np.nonzero(batch["span_is_answer"][i, 0])[0]
    assert len(hits) >= 1, q
    block = featurizer.block(reads[i][0]["block_id"])
    texts = {featurize.span_text(block.text, block.body_offsets, reads[i][0]["body_start"],
                                 featurizer.starts[h], featurizer.ends[h]) for h in hits}
    assert any(t.lower().endswith(q.answers[0].lower().replace("the ", "")) for t in texts), texts
    # Spans only ever fall on body tokens.
    body = batch["reader_body_mask"][i, 0]
    for h in hits:
      assert body[featurizer.starts[h]] and body[featurizer.ends[h]]
  # The other blocks hold no answer to question 0.
  assert not batch["retrieved_has_answer"][0, 1:].any()


def _run_steps(batch, mesh, num_steps):
  tx = optim.bert_adamw(optim.OptimizerConfig(learning_rate=1e-3, num_train_steps=100,
                                              warmup_steps=0))
  params = realm.init_params(MODEL, jax.random.key(0))
  state = train_state.create_train_state(params, tx, mesh)
  train_fn = loop.jit_train_step(finetune.step_parts(MODEL, TASK, 8, tx).train_step, mesh)
  eval_fn = finetune.make_eval_step(MODEL, TASK, mesh)
  out = []
  for _ in range(num_steps):
    state, metrics = train_fn(state, sharding.global_batch_from_local(batch, mesh),
                              jax.random.key(1))
    out.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  return out, state, eval_fn


def test_train_step_on_8_devices_learns(setup):
  batch = {k: np.concatenate([v, v]) for k, v in setup[3].items()}  # 8 questions
  mesh = sharding.make_mesh()
  assert mesh.shape["data"] == 8
  metrics, state, eval_fn = _run_steps(batch, mesh, 8)
  assert all(np.isfinite(m["train/loss"]) for m in metrics)
  assert metrics[-1]["train/loss"] < metrics[0]["train/loss"]
  assert metrics[0]["train/answer_in_retrieved"] == 1.0
  out = jax.device_get(eval_fn(state.params, sharding.global_batch_from_local(batch, mesh)))
  assert out["p_z"].shape == (8, TASK.num_retrieved)
  np.testing.assert_allclose(out["p_z"].sum(-1), 1.0, rtol=1e-5)
  assert (out["best_read"] < TASK.num_read).all()


def test_same_loss_on_1_and_8_devices(setup):
  batch = {k: np.concatenate([v, v]) for k, v in setup[3].items()}
  m8, _, _ = _run_steps(batch, sharding.make_mesh(), 2)
  m1, _, _ = _run_steps(batch, sharding.make_mesh(devices=jax.devices()[:1]), 2)
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=2e-4)


def test_example_order_is_resumable():
  it = example_order.ExampleOrder(10, 4, seed=3)
  first = [it.next_local_indices() for _ in range(3)]
  state = it.state()
  rest = [it.next_local_indices() for _ in range(4)]
  it2 = example_order.ExampleOrder(10, 4, seed=3)
  it2.restore(state)
  np.testing.assert_array_equal(np.concatenate(rest),
                                np.concatenate([it2.next_local_indices() for _ in range(4)]))
  # Each epoch is a permutation.
  it3 = example_order.ExampleOrder(8, 4, seed=0)
  assert sorted(np.concatenate([it3.next_local_indices() for _ in range(2)])) == list(range(8))
  # Processes split each global batch into disjoint parts.
  a = example_order.ExampleOrder(8, 4, 0, process_index=0, process_count=2).next_local_indices()
  b = example_order.ExampleOrder(8, 4, 0, process_index=1, process_count=2).next_local_indices()
  assert len(a) == len(b) == 2 and not set(a) & set(b)


def test_initial_params_from_a_pretraining_checkpoint(tmp_path):
  """REALM → Open-QA hand-over: retriever ← retriever, reader BERT ← knowledge-augmented encoder."""
  from realm_jax.training import checkpointing
  mesh = sharding.make_mesh()
  pre = realm.init_params(MODEL, jax.random.key(42), parts=("retriever", "encoder"))
  pre = jax.device_put(pre, sharding.replicated(mesh))
  manager = checkpointing.CheckpointManager(str(tmp_path / "checkpoints"), async_save=False)
  manager.save(7, pre, {"dummy": jnp.zeros(())}, {"data": {}}, force=True)
  manager.close()
  parts = finetune.step_parts(MODEL, TASK, 8)
  abstract = train_state.abstract_train_state(parts.init_params, parts.tx, mesh).params
  params = finetune.params_from_run(str(tmp_path), abstract, MODEL, seed=0)
  fresh = realm.init_params(MODEL, jax.random.key(0), parts=("retriever", "reader"))
  chex_equal = lambda a, b: jax.tree_util.tree_all(  # noqa: E731
      jax.tree_util.tree_map(lambda x, y: bool(np.array_equal(x, y)), a, b))
  assert chex_equal(params["retriever"], pre["retriever"])
  assert chex_equal(params["reader"]["bert"], pre["encoder"]["bert"])
  assert chex_equal(params["reader"]["span_logits"], fresh["reader"]["span_logits"])
  assert not chex_equal(params["reader"]["bert"], fresh["reader"]["bert"])


def test_checkpoint_manager_accepts_a_relative_directory(tmp_path, monkeypatch):
  from realm_jax.training import checkpointing
  monkeypatch.chdir(tmp_path)
  manager = checkpointing.CheckpointManager("rel/checkpoints", async_save=False)
  params = {"w": jnp.arange(3.0)}
  manager.save(1, params, {"m": jnp.zeros(2)}, {"data": {}}, force=True)
  manager.close()
  restored, step = checkpointing.restore_partial_params("rel/checkpoints",
                                                        checkpointing.abstract_like(params))
  assert step == 1 and np.array_equal(restored["w"], np.arange(3.0))
  assert checkpointing.saved_param_parts("rel/checkpoints") == (["w"], 1)


def test_gold_block_takes_the_last_read_slot_when_not_retrieved(setup):
  tok, corpus, featurizer, _, _ = setup
  gold_featurizer = finetune.OpenQAFeaturizer(
      tok, corpus, corpus.block_ids, featurizer.embeddings,
      dataclasses.replace(TASK, gold_block_in_read=True), MODEL.max_span_width)
  paris = int(corpus.block_ids[list(corpus.doc_ids).index("paris#0")])
  assert gold_featurizer.gold_blocks(QUESTIONS[0]) == [paris]
  # q0 retrieved Paris only at rank 4 (of 4), q1 has no gold documents.
  retrieved = np.array([[1, 2, 3, paris], [1, 0, 2, 3]], np.int64)
  moved = gold_featurizer.with_gold_block(QUESTIONS[:2], retrieved)
  np.testing.assert_array_equal(moved, [[1, paris, 3, -1], [1, 0, 2, 3]])
  batch, reads = gold_featurizer.batch(QUESTIONS[:2], retrieved, with_labels=True)
  assert reads[0][1]["block_id"] == paris and batch["retrieved_has_answer"][0, 1]
  assert batch["span_is_answer"][0, 1].any() and not batch["retrieved_valid"][0, 3]
  # Already read: unchanged. Evaluation (no labels) never moves blocks.
  np.testing.assert_array_equal(gold_featurizer.with_gold_block(QUESTIONS[:1], retrieved[:1, ::-1]),
                                retrieved[:1, ::-1])
  _, reads = gold_featurizer.batch(QUESTIONS[:2], retrieved, with_labels=False)
  assert reads[0][1]["block_id"] == 2


# ---------------------------------------------------------------------------------------------------
# train_step against a naive per-question loop; the evaluator on a case whose answers are known.
# ---------------------------------------------------------------------------------------------------


def _naive_loss(params, batch, reads, n_real):
  """ORQA/REALM fine-tuning loss written out one question and one read block at a time (module
  docstring of finetune.py): per question, −log Σ_{valid z ∋ answer} p(z|x) over the retrieved blocks
  plus −log Σ_{correct (z, s)} p(z, s|x) over the body spans of the read blocks, joint logit = span
  logit + retriever logit of z; a term with nothing correct is 0; the mean over the real questions.
  Only the towers run batched (the real rows); which rows, slots and spans count is decided here.
  Returns `(loss, (retriever_losses, reader_losses))`, differentiable in params."""
  from realm_jax.models import encoder as encoder_lib
  from realm_jax.models import retriever as retriever_lib
  rcfg, scfg = MODEL.retriever_config(), MODEL.reader_config()
  starts, ends = encoder_lib.span_candidates(TASK.reader_length, MODEL.max_span_width)
  queries = retriever_lib.Retriever(rcfg).apply(
      {"params": params["retriever"]}, input_ids=batch["query_input_ids"][:n_real],
      input_mask=batch["query_input_mask"][:n_real], method=retriever_lib.Retriever.embed_queries)
  span_logits = encoder_lib.SpanReader(scfg).apply(
      {"params": params["reader"]}, **{name: batch[f"reader_{name}"][:n_real] for name in
                                       ("input_ids", "input_mask", "segment_ids", "body_mask")})
  r_losses, s_losses = [], []
  for i in range(n_real):
    valid = [k for k in range(TASK.num_retrieved) if batch["retrieved_valid"][i, k]]
    logit = {k: rcfg.score_scale * jnp.dot(queries[i], batch["retrieved_embeddings"][i, k])
             for k in valid}
    norm = jax.nn.logsumexp(jnp.stack([logit[k] for k in valid]))
    good = [k for k in valid if batch["retrieved_has_answer"][i, k]]
    r_losses.append(norm - jax.nn.logsumexp(jnp.stack([logit[k] for k in good])) if good
                    else jnp.zeros(()))
    joint, correct = [], []
    for r in range(TASK.num_read):
      if not batch["retrieved_valid"][i, r]:
        continue  # a padding slot: nothing to read
      lo = reads[i][r]["body_start"]
      hi = lo + reads[i][r]["body_len"]  # exclusive
      in_body = np.nonzero((lo <= starts) & (ends < hi))[0]  # both ends on the block's body
      joint.append(span_logits[i, r, in_body] + logit[r])
      correct.append(batch["span_is_answer"][i, r, in_body])
    joint, correct = jnp.concatenate(joint), np.concatenate(correct)
    if correct.any():
      s_losses.append(jax.nn.logsumexp(joint) - jax.nn.logsumexp(joint[np.nonzero(correct)[0]]))
    else:
      s_losses.append(jnp.zeros(()))
  total = sum(r + s for r, s in zip(r_losses, s_losses)) / n_real
  return total, (jnp.stack(r_losses), jnp.stack(s_losses))


def test_train_step_equals_a_naive_per_question_loop(setup):
  """Read slicing (the answer read in slot 0, in slot 1, retrieved but not read, not retrieved with a
  padding slot among the reads), example weights (the mean over real questions, those with nothing
  correct included) and batch padding (pad_batch's rows count for nothing): the step's loss terms and
  gradients equal the naive loop's."""
  import optax
  tok, corpus, featurizer, _, _ = setup
  retrieved = np.array([[0, 1, 2, 3],    # q0: its block read first
                        [0, 1, 2, 3],    # q1: its block read second
                        [0, 1, 3, 2],    # q2: its block retrieved at rank 3, never read
                        [0, -1, 1, 2]],  # q3: its block absent; a padding slot in the reads
                       np.int64)
  batch, reads = featurizer.batch(QUESTIONS, retrieved, with_labels=True)
  assert batch["retrieved_has_answer"].any(axis=1).tolist() == [True, True, True, False]
  assert [batch["span_is_answer"][i].any() for i in range(4)] == [True, True, False, False]
  padded, n = finetune.pad_batch(batch, 8)
  assert n == 4 and len(padded["query_input_ids"]) == 8
  mesh = sharding.make_mesh()
  tx = optax.sgd(1.0)  # the update is −grad: the step's gradients come back exactly
  params = jax.jit(lambda key: realm.init_params(MODEL, key))(jax.random.key(3))
  state = train_state.create_train_state(params, tx, mesh)
  train_fn = loop.jit_train_step(finetune.step_parts(MODEL, TASK, 8, tx).train_step, mesh)
  new_state, metrics = train_fn(state, sharding.global_batch_from_local(padded, mesh),
                                jax.random.key(1))
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  step_grads = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b), params,
                                      jax.device_get(new_state.params))

  host = {k: np.asarray(v) for k, v in batch.items()}
  (loss, (r_losses, s_losses)), grads = jax.jit(jax.value_and_grad(
      lambda p: _naive_loss(p, host, reads, 4), has_aux=True))(params)
  assert float(r_losses[3]) == 0 and float(s_losses[2]) == 0 and float(s_losses[3]) == 0
  assert float(r_losses[2]) > 0 and float(s_losses[0]) > 0 and float(s_losses[1]) > 0
  np.testing.assert_allclose(metrics["train/loss"], float(loss), rtol=1e-5)
  np.testing.assert_allclose(metrics["train/retriever_loss"], float(r_losses.mean()), rtol=1e-5)
  np.testing.assert_allclose(metrics["train/reader_loss"], float(s_losses.mean()), rtol=1e-5)
  assert metrics["train/answer_in_retrieved"] == 0.75
  assert metrics["train/answer_span_in_read"] == 0.5
  # Gradients, read back as old − new params in float32: compared to the largest gradient.
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  scale = max(float(np.abs(g).max()) for _, g in leaves)
  flat_step = dict(jax.tree_util.tree_leaves_with_path(step_grads))
  for path, g in leaves:
    np.testing.assert_allclose(flat_step[path], np.asarray(g), rtol=1e-3, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  assert any(np.abs(flat_step[path]).max() > 0.1 * scale for path, _ in leaves
             if "retriever" in jax.tree_util.keystr(path))  # the query tower is trained too
  np.testing.assert_allclose(metrics["train/grad_norm"], float(optax.global_norm(grads)), rtol=1e-4)


def test_evaluator_span_to_text_to_exact_match_on_known_answers(setup):
  """OpenQAEvaluator end to end with a stand-in query tower, searcher and reader whose choices are
  known: each question's best span is the run of wordpieces of a chosen text, found in the reader
  input by its token ids (not through offsets); the evaluator must map it back to that text, score
  it with the official exact match and report recall@k of the known retrievals. Five questions in
  batches of 2 on a 2-device mesh: three chunks, the last one padded."""
  tok, corpus, featurizer, _, _ = setup
  block_of = {str(d): int(b) for d, b in zip(corpus.doc_ids, corpus.block_ids)}
  paris, rome, tokyo, nile = (block_of[d] for d in ("paris#0", "rome#0", "tokyo#0", "nile#0"))
  questions = list(QUESTIONS) + [Question("q4", "Which city is the capital of France?", ["Paris"])]
  # question → (retrieved block ids, the read slot and text the reader "chooses")
  plan = {"q0": ([paris, rome, tokyo, nile], 0, "1889"),
          "q1": ([tokyo, rome, paris, nile], 1, "50,000"),       # read in slot 1
          "q2": ([tokyo, paris, rome, nile], 0, "Tokyo"),
          "q3": ([nile, tokyo, rome, paris], 0, "Mediterranean Sea"),  # gold "the Mediterranean Sea"
          "q4": ([rome, paris, tokyo, nile], 0, "Rome")}          # wrong: the gold is "Paris"
  query_ids = featurizer.query_batch(questions)["input_ids"]
  qid_of_query = {tuple(row[:8]): q.qid for row, q in zip(query_ids, questions)}

  def query_embed_fn(params, batch):  # the query's first 8 wordpieces identify it
    return np.asarray(batch["input_ids"][:, :8], np.float32)

  class Searcher:
    def search(self, q, k):
      ids = np.array([plan[qid_of_query[tuple(row.astype(int))]][0][:k] for row in q], np.int64)
      return np.zeros(ids.shape, np.float32), ids

  starts, ends = featurizer.starts, featurizer.ends
  lengths = []

  def eval_fn(params, batch):
    n = len(batch["query_input_ids"])
    # The evaluator cuts the reads to their 8-token bucket (reads here are 24–36 tokens long).
    assert batch["reader_input_ids"].shape[-1] in (32, 40, 48), batch["reader_input_ids"].shape
    lengths.append(batch["reader_input_ids"].shape[-1])
    out = {"best_read": np.zeros(n, np.int32), "best_span": np.zeros(n, np.int32),
           "best_score": np.arange(n, dtype=np.float32),
           "p_z": np.full((n, TASK.num_retrieved), 1 / TASK.num_retrieved, np.float32)}
    for i in range(n):
      _, r, text = plan[qid_of_query[tuple(batch["query_input_ids"][i, :8])]]
      ids, body = list(batch["reader_input_ids"][i, r]), batch["reader_body_mask"][i, r]
      want = tok.encode(text)
      at = [p for p in range(len(ids) - len(want) + 1)
            if ids[p:p + len(want)] == want and body[p:p + len(want)].all()]
      assert at, (text, i)
      span = np.nonzero((starts == at[0]) & (ends == at[0] + len(want) - 1))[0]
      out["best_read"][i], out["best_span"][i] = r, span[0]
    return out

  mesh = sharding.make_mesh(devices=jax.devices()[:2])
  evaluator = finetune.OpenQAEvaluator(featurizer, Searcher(), query_embed_fn, eval_fn, mesh,
                                       batch_size=2, recall_ks=(1, 2, 4))
  metrics, predictions = evaluator({"retriever": {}, "reader": {}}, questions)
  assert [p["qid"] for p in predictions] == [q.qid for q in questions]
  assert [p["prediction"] for p in predictions] == ["1889", "50,000", "Tokyo", "Mediterranean Sea",
                                                   "Rome"]
  assert [p["exact_match"] for p in predictions] == [True, True, True, True, False]
  assert [p["evidence_rank"] for p in predictions] == [0, 1, 0, 0, 0]
  assert [[b["block_id"] for b in p["top_blocks"]] for p in predictions] == [
      plan[q.qid][0][:TASK.num_read] for q in questions]
  # Recall@k of the known retrievals: at rank 1, q1 (Tokyo for the Colosseum) and q4 (Rome for
  # Paris) miss; by rank 2 every question has an answer-bearing block.
  assert metrics == {"num_questions": 5.0, "exact_match": 0.8, "answer_recall@1": 0.6,
                     "answer_recall@2": 1.0, "answer_recall@4": 1.0}
  assert max(lengths) < TASK.reader_length  # every chunk was read cut short: the spans still map


def test_reads_cut_to_their_bucket_give_the_full_length_losses_gradients_and_spans(setup):
  """`cut_to_bucket` drops only padding: the train step's losses and gradients and the eval step's
  best read, span and score are those of the same batch at the full reader length, and a span
  index means the same (start, end) at both lengths."""
  import optax
  featurizer, batch = setup[2], setup[3]
  full = {k: np.concatenate([v, v]) for k, v in batch.items()}  # 8 questions
  longest = int(full["reader_input_mask"].sum(-1).max())
  length = length_buckets.group_length(full, "reader_", 8)
  assert length == -(-longest // 8) * 8 and length < TASK.reader_length
  cut = finetune.cut_to_bucket(full, 8, MODEL.max_span_width)
  num_spans = encoder_lib.num_span_candidates(length, MODEL.max_span_width)
  assert cut["reader_input_ids"].shape == (8, TASK.num_read, length)
  assert cut["span_is_answer"].shape == (8, TASK.num_read, num_spans)
  assert cut["span_is_answer"].sum() == full["span_is_answer"].sum() > 0  # no answer span lost
  for field in length_buckets.TOKEN_FIELDS:
    np.testing.assert_array_equal(cut["reader_" + field], full["reader_" + field][..., :length])
  np.testing.assert_array_equal(featurizer.starts[:num_spans],
                                encoder_lib.span_candidates(length, MODEL.max_span_width)[0])
  uncut = finetune.cut_to_bucket(full, 0, MODEL.max_span_width)  # 0: no bucketing
  assert all(uncut[k] is full[k] for k in full)

  mesh = sharding.make_mesh()
  tx = optax.sgd(1.0)  # the update is −grad: the gradients come back exactly
  params = jax.jit(lambda key: realm.init_params(MODEL, key))(jax.random.key(3))
  train_fn = loop.jit_train_step(finetune.step_parts(MODEL, TASK, 8, tx).train_step, mesh)
  results = []
  for b in (full, cut):
    state = train_state.create_train_state(params, tx, mesh)
    new_state, metrics = train_fn(state, sharding.global_batch_from_local(b, mesh),
                                  jax.random.key(1))
    results.append((jax.device_get(metrics), jax.device_get(new_state.params)))
  (m_full, p_full), (m_cut, p_cut) = results
  for key in ("train/loss", "train/retriever_loss", "train/reader_loss", "train/reader_accuracy"):
    np.testing.assert_allclose(m_cut[key], m_full[key], rtol=1e-5, err_msg=key)
  for path, a in jax.tree_util.tree_leaves_with_path(p_full):
    b = dict(jax.tree_util.tree_leaves_with_path(p_cut))[path]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  eval_fn = finetune.make_eval_step(MODEL, TASK, mesh)
  out_full, out_cut = (jax.device_get(eval_fn(p_full, sharding.global_batch_from_local(b, mesh)))
                       for b in (full, cut))
  np.testing.assert_array_equal(out_cut["best_read"], out_full["best_read"])
  np.testing.assert_array_equal(out_cut["best_span"], out_full["best_span"])
  np.testing.assert_allclose(out_cut["best_score"], out_full["best_score"], rtol=1e-5)


def test_cut_reads_refuses_to_drop_tokens_or_answers(setup):
  full = setup[3]
  length = length_buckets.group_length(full, "reader_", 8)
  with pytest.raises(ValueError, match=f"reader_\\*: a row is longer than {length - 8} tokens"):
    finetune.cut_reads(full, length - 8, MODEL.max_span_width)
  with pytest.raises(ValueError, match="outside"):
    finetune.cut_reads(full, TASK.reader_length + 1, MODEL.max_span_width)
  bad = dict(full, span_is_answer=full["span_is_answer"].copy())
  bad["span_is_answer"][0, 0, -1] = True  # a label on a span that ends at the last position
  with pytest.raises(ValueError, match=f"an answer span ends past token {length}"):
    finetune.cut_reads(bad, length, MODEL.max_span_width)


@pytest.mark.parametrize("process_count", [2, 4, 8])
def test_per_process_batches_add_up_to_the_global_batch(process_count):
  """Each process's rows, in process order, are exactly the one-process global batch, step after
  step and across epoch ends (13 examples, batches of 8); a batch that does not split is refused."""
  single = example_order.ExampleOrder(13, 8, seed=5)
  parts = [example_order.ExampleOrder(13, 8, seed=5, process_index=p, process_count=process_count)
           for p in range(process_count)]
  seen = []
  for _ in range(6):
    global_batch = single.next_local_indices()
    local = [o.next_local_indices() for o in parts]
    assert all(len(rows) == 8 // process_count for rows in local)
    np.testing.assert_array_equal(np.concatenate(local), global_batch)
    seen.extend(global_batch.tolist())
  assert sorted(seen[:13]) == list(range(13))  # the first epoch is a permutation
  assert all(o.state() == single.state() for o in parts)
  with pytest.raises(ValueError, match="not divisible by 3 processes"):
    example_order.ExampleOrder(13, 8, seed=5, process_index=0, process_count=3)


def test_separate_document_tower_is_frozen_while_fine_tuning(setup):
  """With `share_embedders=False` fine-tuning leaves the document tower (the frozen index's
  embedder) bit for bit unchanged, weight decay included, while the query tower and reader train."""
  batch = {k: np.concatenate([v, v]) for k, v in setup[3].items()}
  model = dataclasses.replace(MODEL, share_embedders=False)
  config = optim.OptimizerConfig(learning_rate=1e-3, num_train_steps=100, warmup_steps=0,
                                 weight_decay=0.1)
  tx = finetune.make_optimizer(config)
  mesh = sharding.make_mesh()
  params = realm.init_params(model, jax.random.key(0), parts=finetune.PARTS)
  before = jax.device_get(params)
  state = train_state.create_train_state(params, tx, mesh)
  train_fn = loop.jit_train_step(finetune.step_parts(model, TASK, 8, tx).train_step, mesh)
  for _ in range(2):
    state, _ = train_fn(state, sharding.global_batch_from_local(batch, mesh), jax.random.key(1))
  after = jax.device_get(state.params)
  for a, b in zip(jax.tree_util.tree_leaves(before["retriever"]["document_embedder"]),
                  jax.tree_util.tree_leaves(after["retriever"]["document_embedder"])):
    np.testing.assert_array_equal(a, b)
  for name, ref, new in (
      ("query tower", before["retriever"]["query_embedder"], after["retriever"]["query_embedder"]),
      ("reader", before["reader"], after["reader"])):
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(ref),
                                                         jax.tree_util.tree_leaves(new))), name
  mask = finetune.trainable_mask(before)
  assert not any(jax.tree_util.tree_leaves(mask["retriever"]["document_embedder"]))
  assert all(jax.tree_util.tree_leaves(mask["reader"]))
  # Shared towers: nothing frozen.
  shared = realm.init_params(MODEL, jax.random.key(0), parts=finetune.PARTS)
  assert all(jax.tree_util.tree_leaves(finetune.trainable_mask(shared)))
