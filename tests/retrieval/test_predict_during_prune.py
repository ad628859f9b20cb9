"""`predict` while newer snapshots are committed and old ones pruned (issue #14 §1, last bullet).

A writer thread commits snapshot after snapshot (random embeddings, seeded by the step, at seeded
random intervals) and prunes all but the newest three while the main thread answers questions with
`realm_jax.predict.predict`. Every call must either answer from ONE consistent snapshot (the
retrieved block ids are the top blocks of some committed snapshot's embeddings for the query,
and p(z|x) is the softmax of that same snapshot's scores) or raise one clear error: a
`SnapshotError` / `FileNotFoundError` that names the snapshot — never an exception from inside
numpy, orbax or JAX. Also the two ends of that race, without a thread: a long-lived `Predictor`
(what `realm-jax serve` holds) whose snapshot is pruned under it, and `realm-jax predict` (the CLI)
when its snapshot is pruned between choosing and reading it.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import threading
import traceback

import numpy as np
import pytest

from realm_jax import cli
from realm_jax import predict as predict_lib
from realm_jax.data import corpus_config
from realm_jax.data.questions import Question
from realm_jax.models import bert
from realm_jax.models import realm
from realm_jax.retrieval import embedding
from realm_jax.retrieval import snapshot as snapshot_lib
from realm_jax.training import finetune

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = str(ROOT / "tests/fixtures/data/squad_dev_tiny.json")
MODEL = realm.ModelConfig(
    init_checkpoint=None, pooling="cls_projection", projection_size=8, span_hidden_size=8,
    max_span_width=4, bert=bert.BertConfig(vocab_size=30522, hidden_size=16, num_layers=1,
                                           num_heads=2, intermediate_size=32,
                                           max_position_embeddings=128))
DATA = finetune.OpenQADataConfig(
    corpus=corpus_config.CorpusConfig(sources=(FIXTURE,), max_block_length=64),
    train_questions=FIXTURE, eval_questions=FIXTURE)
TASK = finetune.OpenQAConfig(num_retrieved=3, num_read=2, query_length=16, reader_length=64,
                             reader_query_length=16)
QUESTION = "Where is the Vistula?"
CALLS = 8
KWARGS = dict(model=MODEL, data=DATA, task=TASK, searcher="exact")


def _embeddings(step: int, num_blocks: int) -> np.ndarray:
  return np.random.default_rng([14, step]).standard_normal((num_blocks, MODEL.projection_size),
                                                           dtype=np.float32)


def _commit(root: pathlib.Path, step: int, block_ids: np.ndarray, fingerprint: str) -> None:
  snapshot_lib.write_snapshot(root, step, block_ids, _embeddings(step, len(block_ids)), fingerprint)


class _Churn(threading.Thread):
  """Commits snapshot 1, 2, … at seeded random intervals and prunes all but the newest `keep`."""

  def __init__(self, root: pathlib.Path, block_ids: np.ndarray, fingerprint: str, keep: int):
    super().__init__(daemon=True)
    self.root, self.block_ids, self.fingerprint, self.keep = root, block_ids, fingerprint, keep
    self.stop = threading.Event()
    self.committed, self.pruned, self.error = 0, 0, None

  def run(self):
    pauses = np.random.default_rng(14).uniform(0.0, 1.2, 10_000)
    step = 1
    try:
      while not self.stop.is_set():
        _commit(self.root, step, self.block_ids, self.fingerprint)
        self.committed = step
        self.pruned += len(snapshot_lib.prune_snapshots(self.root, keep=self.keep))
        self.stop.wait(pauses[step % len(pauses)])
        step += 1
    except BaseException as e:  # pylint: disable=broad-except
      self.error = e


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A work directory with snapshot 0 and no checkpoint, a loaded Predictor and the query vector."""
  workdir = tmp_path_factory.mktemp("predict") / "run"
  _, corpus, _, _ = finetune.load_openqa_data(DATA, MODEL, str(workdir), 0)
  block_ids = np.asarray(corpus.block_ids, np.int64)
  _commit(workdir / "snapshots", 0, block_ids, corpus.fingerprint)
  predictor = predict_lib.Predictor(str(workdir), **KWARGS)
  # The query embedding (no checkpoint: the seed-0 initial params, the same in every Predictor).
  query = np.asarray(embedding.run_batched(
      predictor.query_embed_fn, predictor.params["retriever"],
      predictor.featurizer.query_batch([Question("0", QUESTION, [])]), 64, predictor.mesh,
      bucket=16, progress=False))[0]
  return workdir, block_ids, corpus.fingerprint, predictor, query


def _consistent_snapshot(result: dict, query: np.ndarray, steps: range,
                         block_ids: np.ndarray) -> int | None:
  """The step of a snapshot whose top-3 blocks and p(z|x) for `query` are those of `result`."""
  got_ids = [b["block_id"] for b in result["top_blocks"]]
  got_pz = np.array([b["p_z"] for b in result["top_blocks"]])
  for step in steps:
    scores = MODEL.score_scale * _embeddings(step, len(block_ids)) @ query
    top = np.argsort(-scores, kind="stable")[:TASK.num_retrieved]
    if [int(block_ids[i]) for i in top] != got_ids:
      continue
    want_pz = np.exp(scores[top] - scores[top].max())
    if np.allclose(got_pz, want_pz / want_pz.sum(), rtol=1e-4, atol=1e-6):
      return step
  return None


def _assert_clear(error: BaseException, root: pathlib.Path) -> None:
  text = "".join(traceback.format_exception(error))
  assert isinstance(error, (snapshot_lib.SnapshotError, FileNotFoundError)), text
  assert str(root) in str(error), text  # names the snapshot it could not read


def test_predict_while_snapshots_are_committed_and_pruned(run):
  workdir, block_ids, fingerprint, predictor, query = run
  root = workdir / "snapshots"
  quiet = predictor.answer(QUESTION, top_k=TASK.num_retrieved)
  assert _consistent_snapshot(quiet, query, range(1), block_ids) == 0
  churn = _Churn(root, block_ids, fingerprint, keep=3)  # as the inline refresh
  churn.start()
  outcomes = []
  try:
    # At least CALLS predictions, and on until the churn has committed CALLS snapshots during
    # them (a faster host answers sooner; the race must run whatever the relative speeds).
    while len(outcomes) < CALLS or (churn.committed < CALLS and len(outcomes) < 4 * CALLS):
      try:
        [result] = predict_lib.predict(str(workdir), [QUESTION], top_k=TASK.num_retrieved,
                                       **KWARGS)
        outcomes.append(result)
      except Exception as e:  # pylint: disable=broad-except
        outcomes.append(e)
  finally:
    churn.stop.set()
    churn.join(timeout=30)
  assert churn.error is None, repr(churn.error)
  assert churn.committed >= CALLS and churn.pruned >= CALLS - 3  # the race really ran
  report = []
  for outcome in outcomes:
    if isinstance(outcome, BaseException):
      report.append(f"{type(outcome).__name__}: {outcome}")
      _assert_clear(outcome, root)
    else:
      step = _consistent_snapshot(outcome, query, range(churn.committed + 1), block_ids)
      report.append(f"answer from snapshot {step}")
      assert step is not None, f"answer from no single snapshot: {outcome}"
  print(f"{churn.committed} snapshots committed, {churn.pruned} pruned:", *report, sep="\n")


def test_long_lived_predictor_after_its_snapshot_is_pruned(tmp_path, run):
  """`realm-jax serve` holds one Predictor; an index refresh prunes its snapshot under it."""
  _, block_ids, fingerprint, _, query = run
  workdir = tmp_path / "run"
  root = workdir / "snapshots"
  _commit(root, 0, block_ids, fingerprint)
  predictor = predict_lib.Predictor(str(workdir), **KWARGS)
  assert _consistent_snapshot(predictor.answer(QUESTION, top_k=3), query, range(1), block_ids) == 0
  for step in (1, 2):
    _commit(root, step, block_ids, fingerprint)
  snapshot_lib.prune_snapshots(root, keep=2)
  assert [s for s, _ in snapshot_lib.list_snapshots(root)] == [1, 2]
  with pytest.raises(snapshot_lib.SnapshotError, match="pruned while being read") as e:
    predictor.answer(QUESTION, top_k=3)
  _assert_clear(e.value, root / "0")
  # A new Predictor answers from the newest snapshot.
  fresh = predict_lib.predict(str(workdir), [QUESTION], top_k=3, **KWARGS)[0]
  assert _consistent_snapshot(fresh, query, range(3), block_ids) == 2


def test_cli_predict_when_its_snapshot_is_pruned_while_loading(tmp_path, run, monkeypatch):
  _, block_ids, fingerprint, _, _ = run
  workdir = tmp_path / "run"
  root = workdir / "snapshots"
  _commit(root, 0, block_ids, fingerprint)
  gin_file = tmp_path / "predict.gin"
  gin_file.write_text(_PREDICT_GIN.format(fixture=FIXTURE))
  read_snapshot = snapshot_lib.read_snapshot

  def pruned_first(path, *args, **kwargs):  # a refresh lands between latest_snapshot and here
    _commit(root, 1, block_ids, fingerprint)
    snapshot_lib.prune_snapshots(root, keep=1)
    return read_snapshot(path, *args, **kwargs)

  monkeypatch.setattr(snapshot_lib, "read_snapshot", pruned_first)
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    rc = cli.main(["predict", "--workdir", str(workdir), "--gin_file", str(gin_file), QUESTION])
  assert rc == 2
  assert "realm-jax: error:" in stderr.getvalue() and str(root / "0") in stderr.getvalue()


_PREDICT_GIN = """
from __gin__ import dynamic_registration
from realm_jax import predict
from realm_jax.data import corpus_config
from realm_jax.models import bert
from realm_jax.models import realm
from realm_jax.training import finetune

predict.predict:
  model = @realm.ModelConfig()
  data = @finetune.OpenQADataConfig()
  task = @finetune.OpenQAConfig()
  searcher = 'exact'
realm.ModelConfig:
  init_checkpoint = None
  pooling = 'cls_projection'
  projection_size = 8
  span_hidden_size = 8
  max_span_width = 4
  bert = @bert.BertConfig()
bert.BertConfig:
  vocab_size = 30522
  hidden_size = 16
  num_layers = 1
  num_heads = 2
  intermediate_size = 32
  max_position_embeddings = 128
finetune.OpenQADataConfig:
  corpus = @corpus_config.CorpusConfig()
  train_questions = '{fixture}'
  eval_questions = '{fixture}'
corpus_config.CorpusConfig:
  sources = ('{fixture}',)
  max_block_length = 64
finetune.OpenQAConfig:
  num_retrieved = 3
  num_read = 2
  query_length = 16
  reader_length = 64
  reader_query_length = 16
"""
