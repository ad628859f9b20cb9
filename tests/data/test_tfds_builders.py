"""Tests for realm_jax.data.tfds_builders: array_record corpus and question sets, no TF."""

from __future__ import annotations

import pathlib
import shutil
import sys

import numpy as np
import pytest

from realm_jax import tokenization
from realm_jax.data import corpus
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


def test_build_corpus_round_trip_and_reuse(tmp_path, tok):
  data_dir = tmp_path / "tfds"
  wiki = FIXTURES / "wikitext2_valid_head12.tokens"
  built = tfds_builders.build_corpus([SQUAD_TINY, wiki], tok, data_dir, 64, show_progress=False)
  direct = corpus.split_into_blocks(
      corpus.read_documents(SQUAD_TINY) + corpus.read_documents(wiki), tok, 64,
      show_progress=False)
  assert len(built) == len(direct) > 4
  for want, got in zip(direct, built):
    assert (got.block_id, got.doc_id, got.title, got.text) == (
        want.block_id, want.doc_id, want.title, want.text)
    for field in ("title_ids", "body_ids", "body_offsets", "sentence_starts"):
      assert np.array_equal(getattr(got, field), getattr(want, field)), field
      assert getattr(got, field).dtype == np.int32
  assert built.fingerprint == corpus.corpus_fingerprint(direct, 64)

  (prepared,) = _dataset_dirs(data_dir, "realm_knowledge_corpus")
  files_before = {p: p.stat().st_mtime_ns for p in prepared.iterdir()}
  again = tfds_builders.build_corpus([SQUAD_TINY, wiki], tok, data_dir, 64, show_progress=False)
  assert again.fingerprint == built.fingerprint
  assert {p: p.stat().st_mtime_ns for p in prepared.iterdir()} == files_before  # re-used as is

  # The config name hashes contents, not paths: a moved copy maps to the same dataset ...
  moved = tmp_path / "elsewhere.json"
  shutil.copy(SQUAD_TINY, moved)
  assert (tfds_builders.corpus_config([moved, wiki], tok, 64).name
          == tfds_builders.corpus_config([SQUAD_TINY, wiki], tok, 64).name)
  # ... while another block length or source order is another dataset.
  other = tfds_builders.build_corpus([SQUAD_TINY], tok, data_dir, 288, show_progress=False)
  assert len(other) == 3 and other.fingerprint != built.fingerprint
  assert len(_dataset_dirs(data_dir, "realm_knowledge_corpus")) == 2
  assert "tensorflow" not in sys.modules


def test_builder_rejects_other_tokenizer(tmp_path, tok):
  config = tfds_builders.corpus_config([SQUAD_TINY], tok)
  sp_dir = tmp_path / "spm"
  texts = [d.text for d in corpus.read_documents(SQUAD_TINY)]
  sp = tokenization.SentencePieceTokenizer.train(texts, sp_dir / "m", vocab_size=120)
  with pytest.raises(ValueError, match="does not match the corpus config"):
    tfds_builders.KnowledgeCorpusBuilder(config=config, tokenizer=sp, data_dir=tmp_path)
  with pytest.raises(FileNotFoundError, match="missing.json"):
    tfds_builders.corpus_config([tmp_path / "missing.json"], tok)
  with pytest.raises(ValueError, match="at least one source"):
    tfds_builders.corpus_config([], tok)


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
