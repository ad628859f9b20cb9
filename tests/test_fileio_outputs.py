"""Every writer and reader the jobs use goes through `realm_jax.fileio`: URLs work, no local `memory:` folder.

fsspec's in-memory file system (`memory://`) stands in for a bucket. Each test runs from an empty
temporary cwd and checks that no folder named like a mangled URL (`memory:`) appeared there.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import uuid

import numpy as np
import pytest

from realm_jax import cli
from realm_jax import evaluation
from realm_jax import fileio
from realm_jax import tokenization
from realm_jax.data import corpus as corpus_lib
from realm_jax.data import questions as questions_lib
from realm_jax.training import metric_writer

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """A fresh `memory://` prefix; the cwd is an empty temporary folder checked for `memory:` at the end."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setenv(fileio.CACHE_DIR_ENV, str(tmp_path / "cache"))
  url = f"memory://test-{uuid.uuid4().hex[:10]}"
  yield url
  fileio.rmtree(url)
  leaked = [p for p in cwd.rglob("*") if p.name.startswith("memory:")]
  assert not leaked, leaked


def test_summary_json_goes_to_the_url(bucket):
  path = metric_writer.write_summary_json(f"{bucket}/run", {"x": np.float32(1.5), "n": np.int64(3)})
  assert path == f"{bucket}/run/summary.json"
  assert json.loads(fileio.read_text(path)) == {"x": 1.5, "n": 3}


def test_tensorboard_events_are_staged_locally_and_synced(bucket):
  writer = metric_writer.MetricWriter(f"{bucket}/run", enabled=True, sync_every_steps=10)
  assert writer.remote_dir == f"{bucket}/run/tensorboard"
  writer.write(1, {"loss": 1.0})  # The first write uploads.
  first = fileio.glob(f"{bucket}/run/tensorboard", "events.out.tfevents.*")
  assert len(first) == 1
  size_1 = len(fileio.read_bytes(first[0]))
  writer.write(2, {"loss": 0.5})  # Within 10 steps of the last upload: not uploaded yet.
  assert len(fileio.read_bytes(first[0])) == size_1
  local_dir = writer._local_dir  # pylint: disable=protected-access
  writer.close()  # Uploads the rest and removes the local copy.
  assert len(fileio.read_bytes(first[0])) > size_1
  assert not os.path.exists(local_dir)


def test_local_tensorboard_is_written_in_place(tmp_path):
  writer = metric_writer.MetricWriter(str(tmp_path / "run"), enabled=True)
  assert writer.remote_dir is None
  writer.write(1, {"gold_recall@5": 0.5})
  writer.close()
  assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_predictions_round_trip_through_a_url(bucket):
  path = f"{bucket}/run/predictions/eval-step2.jsonl"
  records = [{"qid": "a", "score": np.float32(0.25)}, {"qid": "b", "ids": np.arange(2)}]
  assert evaluation.write_predictions_jsonl(path, records) == 2
  assert evaluation.read_predictions_jsonl(path) == [{"qid": "a", "score": 0.25},
                                                     {"qid": "b", "ids": [0, 1]}]
  with pytest.raises(TypeError):  # Nothing is written when a record cannot be serialised.
    evaluation.write_predictions_jsonl(f"{bucket}/bad.jsonl", [{"qid": object()}])
  assert not fileio.exists(f"{bucket}/bad.jsonl")


def test_config_gin_on_a_url_is_written_and_parsed(bucket):
  fileio.write_atomic(f"{bucket}/exp.gin", "from __gin__ import dynamic_registration\n"
                      "from realm_jax.training import finetune\n"
                      "finetune.train_and_evaluate.batch_size = 4\n")
  cli.parse_gin([f"{bucket}/exp.gin"], [])  # gin reads URLs through fileio.
  cli.write_config(f"{bucket}/run")
  assert "batch_size = 4" in fileio.read_text(f"{bucket}/run/config.gin")
  cli.parse_gin([f"{bucket}/run/config.gin"], [])
  with pytest.raises(cli.UsageError, match=f"{bucket}/nope.gin"):
    cli.parse_gin([f"{bucket}/nope.gin"], [])


def test_predict_config_check_reads_the_url(bucket):
  with pytest.raises(cli.UsageError, match=f"{bucket}/run/config.gin not found"):
    cli.run(["predict", "--workdir", f"{bucket}/run", "Who?"])


def _nq_line(question: str, answer: str) -> str:
  return json.dumps({"question": question, "answer": [answer]}) + "\n"


def test_question_globs_on_a_url_are_sorted_and_gz_is_read(bucket):
  fileio.write_atomic(f"{bucket}/q/part-1.jsonl", _nq_line("second?", "b"))
  fileio.write_atomic(f"{bucket}/q/part-0.jsonl.gz",
                      gzip.compress(_nq_line("first?", "a").encode()))
  fileio.write_atomic(f"{bucket}/q/other.txt", "not a question file")
  qs = questions_lib.read_questions(f"{bucket}/q/part-*", "nq_open")
  assert [q.question for q in qs] == ["first?", "second?"]
  assert [q.qid for q in qs] == ["part-0.jsonl.gz:1", "part-1.jsonl:1"]
  both = questions_lib.read_questions([f"{bucket}/q/part-1.jsonl", f"{bucket}/q/part-0.jsonl.gz"],
                                      "webquestions")
  assert [q.question for q in both] == ["second?", "first?"]


def test_question_errors_name_file_line_and_field(bucket):
  fileio.write_atomic(f"{bucket}/q/bad.jsonl",
                      _nq_line("ok?", "a") + json.dumps({"question": "no answer?"}) + "\n")
  with pytest.raises(corpus_lib.DataFormatError, match=r"bad\.jsonl:2: missing field 'answer'"):
    questions_lib.read_questions(f"{bucket}/q/bad.jsonl", "nq_open")
  with pytest.raises(FileNotFoundError, match=r"q/none-\*\.jsonl: the glob matches no file"):
    questions_lib.read_questions(f"{bucket}/q/none-*.jsonl", "nq_open")
  with pytest.raises(FileNotFoundError, match="q/missing.json"):
    questions_lib.read_questions(f"{bucket}/q/missing.json", "squad_open")


def test_squad_questions_from_a_url(bucket):
  fixture = ROOT / "tests/fixtures/data/squad_dev_tiny.json"
  fileio.write_atomic(f"{bucket}/squad.json.gz", gzip.compress(fixture.read_bytes()))
  remote = questions_lib.read_questions(f"{bucket}/squad.json.gz", "squad_open")
  assert remote == questions_lib.read_questions(str(fixture), "squad_open")


def test_tokenizer_files_on_a_url(bucket):
  vocab = tokenization.minilm_model_dir() / "vocab.txt"
  fileio.write_atomic(f"{bucket}/model/vocab.txt", vocab.read_bytes())
  local = tokenization.load_tokenizer("wordpiece", vocab)
  for path in (f"{bucket}/model/vocab.txt", f"{bucket}/model"):
    remote = tokenization.load_tokenizer("wordpiece", path)
    assert remote.fingerprint() == local.fingerprint()
  with pytest.raises(tokenization.TokenizerError, match=f"{bucket}/model/none.txt"):
    tokenization.load_tokenizer("wordpiece", f"{bucket}/model/none.txt")


def test_local_copy_stages_once_and_checks_the_size(bucket, tmp_path):
  url = f"{bucket}/model/weights.bin"
  fileio.write_atomic(url, b"x" * 100)
  first = fileio.local_copy(url)
  assert first.read_bytes() == b"x" * 100
  assert str(first).startswith(str(tmp_path / "cache"))
  assert fileio.local_copy(url) == first
  assert fileio.local_copy(f"{bucket}/model/weights.bin") == first
  fileio.write_atomic(url, b"y" * 50)  # A changed object (another size) is fetched again.
  assert fileio.local_copy(url).read_bytes() == b"y" * 50
  local = tmp_path / "plain.bin"
  local.write_bytes(b"z")
  assert fileio.local_copy(local) == local  # Local files are not copied.
  with pytest.raises(FileNotFoundError, match=f"{bucket}/model/none.bin"):
    fileio.local_copy(f"{bucket}/model/none.bin")


def test_bert_checkpoint_on_a_url(bucket, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from realm_jax.models import bert  # pylint: disable=g-import-not-at-top
  from realm_jax.models import checkpoint_import  # pylint: disable=g-import-not-at-top
  cfg = bert.BertConfig(vocab_size=64, hidden_size=8, num_layers=1, num_heads=2,
                        intermediate_size=16, max_position_embeddings=32)
  ids = np.ones((1, 4), np.int32)
  params = bert.BertEncoder(cfg).init(jax.random.key(0), input_ids=ids, input_mask=ids,
                                      segment_ids=ids * 0)["params"]
  checkpoint_import.export_bert_checkpoint(params, cfg, f"{bucket}/bert")
  assert sorted(fileio.listdir(f"{bucket}/bert")) == ["config.json", "model.safetensors"]
  assert checkpoint_import.config_from_json(f"{bucket}/bert/config.json").hidden_size == 8
  loaded = checkpoint_import.load_bert_checkpoint(f"{bucket}/bert")
  np.testing.assert_array_equal(
      loaded.params["embeddings"]["word_embeddings"]["embedding"],
      np.asarray(params["embeddings"]["word_embeddings"]["embedding"]))
  staged = list((tmp_path / "cache").rglob("model.safetensors"))
  assert len(staged) == 1 and (staged[0].parent / "config.json").is_file()
  with pytest.raises(FileNotFoundError, match=f"{bucket}/none"):
    checkpoint_import.load_bert_checkpoint(f"{bucket}/none")
