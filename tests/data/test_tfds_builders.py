"""Tests for realm_jax.data.tfds_builders: array_record question sets, no TF."""

from __future__ import annotations

import pathlib
import sys

import pytest

from realm_jax import tokenization
from realm_jax.data import questions
from realm_jax.data import tfds_builders

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "data"
SQUAD_TINY = FIXTURES / "squad_dev_tiny.json"


@pytest.fixture(scope="module")
def tok() -> tokenization.WordPieceTokenizer:
  return tokenization.WordPieceTokenizer.from_vocab_file(
      tokenization.minilm_model_dir() / "vocab.txt")


def _dataset_dirs(data_dir: pathlib.Path, name: str) -> list[pathlib.Path]:
  return sorted(p for p in (data_dir / name).glob("*/1.0.0") if p.is_dir())


def test_build_questions(tmp_path):
  data_dir = tmp_path / "tfds"
  splits = {"train": FIXTURES / "squad_dev_tiny.json", "dev": FIXTURES / "squad_dev_tiny.json"}
  got = tfds_builders.build_questions(splits, "squad_open", data_dir)
  want = questions.read_squad_open(FIXTURES / "squad_dev_tiny.json")
  assert got == {"train": want, "dev": want}
  ct_path = FIXTURES / "curatedtrec_head5_plus_train701.txt"
  ct = tfds_builders.build_questions({"test": ct_path}, "curatedtrec", data_dir)
  assert ct["test"] == questions.read_questions(ct_path, "curatedtrec")
  assert ct["test"][0].answers_are_regex and ct["test"][0].gold_doc_ids == ()
  assert tfds_builders.build_questions({"test": ct_path}, "curatedtrec", data_dir) == ct
  assert len(_dataset_dirs(data_dir, "realm_open_qa")) == 2
  with pytest.raises(ValueError, match="unknown question format"):
    tfds_builders.build_questions({"test": ct_path}, "trec", data_dir)
  assert "tensorflow" not in sys.modules


def test_question_split_from_a_glob(tmp_path):
  """A split given as a glob reads its matches in name order, one after the other."""
  src = FIXTURES / "curatedtrec_head5_plus_train701.txt"
  lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
  (tmp_path / "q").mkdir()
  (tmp_path / "q" / "part-b.txt").write_text("".join(lines[3:]), encoding="utf-8")
  (tmp_path / "q" / "part-a.txt").write_text("".join(lines[:3]), encoding="utf-8")
  got = tfds_builders.build_questions({"test": str(tmp_path / "q" / "part-*.txt")}, "curatedtrec",
                                      tmp_path / "tfds")
  want = questions.read_questions(src, "curatedtrec")
  assert [(q.question, q.answers) for q in got["test"]] == [(q.question, q.answers) for q in want]
  with pytest.raises(FileNotFoundError, match=r"test questions .*none-\*\.txt: the glob matches"):
    tfds_builders.build_questions({"test": str(tmp_path / "q" / "none-*.txt")}, "curatedtrec",
                                  tmp_path / "tfds")
