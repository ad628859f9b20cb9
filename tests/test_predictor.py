"""`realm_jax.Predictor`: a work directory loaded once, answers with evidence and answer offsets.

One tiny fine-tune (tests/fixtures/gin/tiny_finetune.gin, one step) makes the work directory; it is
shared with tests/test_serve.py through `tiny_run` (once per session).
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import realm_jax
from realm_jax import cli
from realm_jax import predict
from realm_jax.data.questions import Question
from realm_jax.training import finetune

ROOT = pathlib.Path(__file__).resolve().parent.parent
GIN = "tests/fixtures/gin/tiny_finetune.gin"  # 10 blocks; num_retrieved 3, num_read 2.
QUESTIONS = ["Where is the Vistula?", "Who won Super Bowl 50?", "What is the capital of Poland?"]


def tiny_run(tmp_path_factory) -> str:
  """The work directory of a one-step tiny fine-tune, made once per test session."""
  workdir = tmp_path_factory.getbasetemp() / "tiny_predictor_run"
  if not (workdir / "summary.json").exists():
    cwd = os.getcwd()
    os.chdir(ROOT)  # The fixture gin file names its data relative to the checkout.
    try:
      cli.run(["finetune", "--gin_file", GIN, "--workdir", str(workdir),
               "--gin_param", "TRAIN_STEPS=1", "--log_level", "WARNING"])
    finally:
      os.chdir(cwd)
  return str(workdir)


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
  monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def predictor(workdir):
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    return realm_jax.Predictor.from_workdir(workdir)
  finally:
    os.chdir(cwd)


def _check_answer(a: dict, question: str, top_k: int, num_retrieved: int = 3) -> None:
  """The documented shape of one answer, and its offsets pointing at the prediction."""
  assert a["question"] == question
  assert [b["rank"] for b in a["top_blocks"]] == list(range(top_k))
  assert len({b["block_id"] for b in a["top_blocks"]}) == top_k
  for b in a["top_blocks"]:
    assert 0.0 <= b["p_z"] <= 1.0 and isinstance(b["text"], str) and b["title"]
  ps = [b["p_z"] for b in a["top_blocks"]]
  assert ps == sorted(ps, reverse=True)  # MIPS order = retriever-score order
  ev = a["evidence"]
  assert ev is not None and 0 <= a["evidence_rank"] == ev["rank"] < 2  # one of the num_read blocks
  assert a["prediction"] and ev["text"][ev["answer_start"]:ev["answer_end"]] == a["prediction"]
  for b in a["top_blocks"]:
    if b["rank"] == ev["rank"]:
      assert b == ev
    else:
      assert b["answer_start"] is None and b["answer_end"] is None
  assert top_k <= num_retrieved and np.isfinite(a["score"])


def test_answers_like_the_evaluator(predictor):
  """Same retrieval, p(z|x) and answer as `finetune.OpenQAEvaluator`, the fine-tuning eval path."""
  a = predictor.answer(QUESTIONS[0])
  assert isinstance(a, dict)
  _check_answer(a, QUESTIONS[0], top_k=2)  # default top_k: num_read
  evaluator = finetune.OpenQAEvaluator(predictor.featurizer, predictor.searcher,
                                       predictor.query_embed_fn, predictor.eval_fn, predictor.mesh,
                                       recall_ks=(3,))
  _, (expected,) = evaluator(predictor.params, [Question(qid="0", question=QUESTIONS[0],
                                                         answers=["Poland"])])
  assert a["prediction"] == expected["prediction"]
  assert a["evidence_rank"] == expected["evidence_rank"]
  assert a["score"] == pytest.approx(expected["score"], rel=1e-5)
  assert [b["block_id"] for b in a["top_blocks"]] == [b["block_id"]
                                                      for b in expected["top_blocks"]]
  np.testing.assert_allclose([b["p_z"] for b in a["top_blocks"]],
                             [b["p_z"] for b in expected["top_blocks"]], rtol=1e-5)


def test_loaded_once_and_compiled_once(predictor, monkeypatch):
  """Answering reads no file again and reuses the compiled reader for every batch."""
  from realm_jax.retrieval import snapshot as snapshot_lib

  def fail(*args, **kwargs):
    raise AssertionError("answer() must not reload the run")

  for module, name in ((finetune, "load_openqa_data"), (finetune, "make_eval_step"),
                       (snapshot_lib, "read_snapshot"), (predict, "_params")):
    monkeypatch.setattr(module, name, fail)
  predictor.answer(QUESTIONS[0])
  compiled = predictor.eval_fn._cache_size()  # pylint: disable=protected-access
  many = predictor.answer(QUESTIONS * 3)  # 9 questions: two batches of the data axis (8)
  assert predictor.eval_fn._cache_size() == compiled == 1  # pylint: disable=protected-access
  assert len(many) == 9
  # Batching does not change answers: each equals the question asked alone.
  for i, q in enumerate(QUESTIONS):
    alone = predictor.answer(q, top_k=3)
    _check_answer(alone, q, top_k=3)
    assert many[i]["prediction"] == many[i + 3]["prediction"] == alone["prediction"]
    assert [b["block_id"] for b in many[i]["top_blocks"]] == [
        b["block_id"] for b in alone["top_blocks"][:2]]


def test_top_k_and_p_z(predictor):
  a = predictor.answer(QUESTIONS[1], top_k=3)  # all retrieved blocks: p(z|x) sums to 1
  _check_answer(a, QUESTIONS[1], top_k=3)
  assert sum(b["p_z"] for b in a["top_blocks"]) == pytest.approx(1.0, abs=1e-5)
  one = predictor.answer([QUESTIONS[1]], top_k=1)
  assert isinstance(one, list) and len(one) == 1 and len(one[0]["top_blocks"]) == 1
  assert one[0]["top_blocks"][0] == a["top_blocks"][0]
  # The evidence block is returned even when it ranks below top_k.
  assert one[0]["evidence"] == a["evidence"]


@pytest.mark.parametrize("questions, top_k, error, message", [
    ("   ", None, ValueError, "question 0 is blank"),
    (["ok", ""], None, ValueError, "question 1 is blank"),
    ([], None, ValueError, "no questions"),
    (["ok", 3], None, TypeError, "question 1 is int"),
    ("ok", 0, ValueError, "top_k must be an integer in 1 … 3"),
    ("ok", 4, ValueError, "top_k must be an integer in 1 … 3"),
    ("ok", True, ValueError, "top_k"),
    ("ok", 1.5, ValueError, "top_k"),
])
def test_bad_input_is_refused(predictor, questions, top_k, error, message):
  with pytest.raises(error, match=message):
    predictor.answer(questions, top_k=top_k)


def test_gin_params_and_overrides(workdir):
  p = predict.Predictor.from_workdir(workdir, gin_params=["finetune.OpenQAConfig.num_read = 1"],
                                     searcher="exact", batch_size=3)
  assert p.task.num_read == 1 and p.task.num_retrieved == 3 and p.searcher_kind == "exact"
  assert p.batch_size == 8  # rounded up to the data axis of the 8-device mesh
  assert p.info() == {"workdir": workdir, "snapshot": str(pathlib.Path(workdir, "snapshots", "0")),
                      "params_step": 1, "num_blocks": 10, "num_retrieved": 3, "num_read": 1,
                      "searcher": "exact"}
  a = p.answer(QUESTIONS[0])
  assert len(a["top_blocks"]) == 1 and a["evidence_rank"] == 0
  assert a["evidence"]["text"][a["evidence"]["answer_start"]:a["evidence"]["answer_end"]] == \
      a["prediction"]


def test_missing_config_or_snapshot(tmp_path, workdir):
  with pytest.raises(FileNotFoundError, match="config.gin not found"):
    predict.Predictor.from_workdir(str(tmp_path))
  (tmp_path / "config.gin").write_text(pathlib.Path(workdir, "config.gin").read_text())
  with pytest.raises(FileNotFoundError, match="no embedding snapshot"):
    predict.Predictor.from_workdir(str(tmp_path))


def test_cli_predict_runs_on_the_predictor(workdir, predictor, capsys):
  preds = cli.run(["predict", "--workdir", workdir, QUESTIONS[0], QUESTIONS[1]])
  expected = predictor.answer(QUESTIONS[:2])
  assert [p["prediction"] for p in preds] == [p["prediction"] for p in expected]
  out = capsys.readouterr().out
  assert f"Q: {QUESTIONS[0]}" in out and f"A: {expected[0]['prediction']}" in out
  assert "p(z|x)=" in out


def test_span_offsets_outside_the_body_are_none():
  offsets = np.array([[0, 3], [4, 9], [10, 12]], np.int32)
  assert predict._span_offsets(offsets, 5, 6, 7) == (4, 12)  # pylint: disable=protected-access
  assert predict._span_offsets(offsets, 5, 4, 5) is None  # pylint: disable=protected-access
  assert predict._span_offsets(offsets, 5, 7, 8) is None  # pylint: disable=protected-access


def test_import_realm_jax_is_light():
  code = ("import sys, realm_jax; assert 'jax' not in sys.modules, 'jax imported'; "
          "from realm_jax import Predictor; assert 'jax' in sys.modules; "
          "assert Predictor.__module__ == 'realm_jax.predict'; print(realm_jax.__version__)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == realm_jax.__version__
  with pytest.raises(AttributeError, match="no attribute 'Nope'"):
    getattr(realm_jax, "Nope")
