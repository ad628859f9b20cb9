"""Tests for realm_jax.data.corpus: readers, sentence splitting, blocking, fingerprints, inputs."""

from __future__ import annotations

import gzip
import hashlib
import json
import pathlib
import re

import numpy as np
import pytest

from realm_jax import tokenization
from realm_jax.data import corpus

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "data"
SQUAD_TINY = FIXTURES / "squad_dev_tiny.json"


@pytest.fixture(scope="module")
def tok() -> tokenization.WordPieceTokenizer:
  return tokenization.WordPieceTokenizer.from_vocab_file(
      tokenization.minilm_model_dir() / "vocab.txt")


# ----------------------------------------------------------------------------- readers


def test_read_squad_documents_paragraph_per_document(tmp_path):
  docs = corpus.read_squad_documents(SQUAD_TINY)
  assert [d.doc_id for d in docs] == ["Super_Bowl_50#0", "Super_Bowl_50#1", "Warsaw#0"]
  assert [d.title for d in docs] == ["Super Bowl 50", "Super Bowl 50", "Warsaw"]
  assert docs[0].text.startswith("Super Bowl 50 was an American football game")
  gz = tmp_path / "squad.json.gz"
  gz.write_bytes(gzip.compress(SQUAD_TINY.read_bytes()))
  assert corpus.read_documents(gz) == docs


def test_excluded_titles_are_dropped(tmp_path):
  data = {"data": [{"title": t, "paragraphs": [{"context": "Some text.", "qas": []}]}
                   for t in ("List_of_numbered_streets_in_Manhattan", "Index of Paris articles",
                             "Outline of physics", "Mercury (disambiguation)", "Listeria")]}
  path = tmp_path / "s.json"
  path.write_text(json.dumps(data), encoding="utf-8")
  assert [d.title for d in corpus.read_squad_documents(path)] == ["Listeria"]
  assert len(corpus.read_squad_documents(path, drop_excluded_titles=False)) == 5
  assert corpus.is_excluded_title("List of lists") and not corpus.is_excluded_title("Lists")


def test_squad_format_errors_name_file_and_field(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"data": [{"title": "A", "paragraphs": [
      {"context": "ok", "qas": []}, {"qas": []}]}]}), encoding="utf-8")
  with pytest.raises(corpus.DataFormatError,
                     match=r"bad.json: data\[0\].paragraphs\[1\]: missing field 'context'"):
    corpus.read_squad_documents(bad)
  bad.write_text('{"data": [\n {"title": 3, "paragraphs": []}]}', encoding="utf-8")
  with pytest.raises(corpus.DataFormatError,
                     match=r"data\[0\]: field 'title' must be str, got int"):
    corpus.read_squad_documents(bad)
  bad.write_text('{"data": [\n\n {"title": "x",, }]}', encoding="utf-8")
  with pytest.raises(corpus.DataFormatError, match=r"bad.json:3: invalid JSON"):
    corpus.read_squad_documents(bad)
  with pytest.raises(FileNotFoundError, match="nope.json"):
    corpus.read_squad_documents(tmp_path / "nope.json")


def test_read_jsonl_documents_ids_and_errors(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text("\n".join([
      json.dumps({"title": "Paris", "text": "Paris is the capital of France."}),
      "",
      json.dumps({"title": "Paris", "text": "A second page with the same title."}),
      json.dumps({"title": "Rome", "text": "Rome is in Italy.", "id": 42}),
      json.dumps({"title": "List of rivers", "text": "Dropped."}),
  ]) + "\n", encoding="utf-8")
  docs = corpus.read_documents(path)
  assert [(d.doc_id, d.title) for d in docs] == [("Paris#0", "Paris"), ("Paris#1", "Paris"),
                                                 ("42", "Rome")]
  path.write_text('{"title": "A", "text": "x"}\n{"title": "B"}\n', encoding="utf-8")
  with pytest.raises(corpus.DataFormatError, match=r"docs.jsonl:2: missing field 'text'"):
    corpus.read_jsonl_documents(path)
  path.write_text('{"title": "A", "text": ["x"]}\n', encoding="utf-8")
  with pytest.raises(corpus.DataFormatError,
                     match=r"docs.jsonl:1: field 'text' must be str, got list"):
    corpus.read_jsonl_documents(path)
  path.write_text('{"title": "A", "text": "x"}\n{oops\n', encoding="utf-8")
  with pytest.raises(corpus.DataFormatError, match=r"docs.jsonl:2: invalid JSON"):
    corpus.read_jsonl_documents(path)
  path.write_text('["not", "an", "object"]\n', encoding="utf-8")
  with pytest.raises(corpus.DataFormatError,
                     match=r"docs.jsonl:1: expected a JSON object, got list"):
    corpus.read_jsonl_documents(path)


def test_read_text_documents_plain(tmp_path):
  path = tmp_path / "pages.txt"
  path.write_text("Paris\nParis is the capital of France.\nIt has 2 million people.\n\n\n"
                  "Outline of geography\nDropped.\n\nRome\nRome is in Italy.\n", encoding="utf-8")
  docs = corpus.read_documents(path)
  assert docs == [
      corpus.Document("Paris#0", "Paris",
                      "Paris is the capital of France.\nIt has 2 million people."),
      corpus.Document("Rome#0", "Rome", "Rome is in Italy."),
  ]


def test_read_text_documents_wikitext():
  docs = corpus.read_documents(FIXTURES / "wikitext2_valid_head12.tokens")
  assert len(docs) == 1
  doc = docs[0]
  assert (doc.doc_id, doc.title) == ("Homarus gammarus#0", "Homarus gammarus")
  assert "Description" not in doc.text  # the "= = Description = =" sub-heading is dropped
  assert doc.text.startswith("Homarus gammarus , known as the European lobster")
  assert "0.7" in doc.text and "@.@" not in doc.text  # "0 @.@ 7" is detokenised
  assert doc.text.count("\n\n") == 5  # six paragraphs


def test_read_documents_unknown_extension(tmp_path):
  with pytest.raises(ValueError, match=r"x.csv: unknown corpus format"):
    corpus.read_documents(tmp_path / "x.csv")


def test_embedded_squad_files_match_attribution():
  paths = corpus.embedded_squad_paths()
  attribution = (paths["dev"].parents[1] / "ATTRIBUTION.md").read_text(encoding="utf-8")
  for path in paths.values():
    assert hashlib.sha256(path.read_bytes()).hexdigest() in attribution, path
  train = corpus.load_squad_json(paths["train"])
  assert len(train) == 30 and train[0]["title"] == "University_of_Notre_Dame"


# ----------------------------------------------------------------------------- sentences


@pytest.mark.parametrize("text, expected", [
    ("Dr. Smith met J. R. R. Tolkien in the U.S. in 1950. He said \"Hi!\" Then left.",
     ["Dr. Smith met J. R. R. Tolkien in the U.S. in 1950.", "He said \"Hi!\"", "Then left."]),
    ("First paragraph without a period\n\nSecond one. 3.14 is pi. (Really.) done",
     ["First paragraph without a period", "Second one.", "3.14 is pi.", "(Really.) done"]),
    ("It costs $5 vs. $6 etc. and ends here... Next? yes",
     ["It costs $5 vs. $6 etc. and ends here...", "Next? yes"]),
    ("   ", []),
])
def test_split_sentences(text, expected):
  spans = corpus.split_sentences(text)
  assert [text[s:e] for s, e in spans] == expected
  covered = "".join(text[s:e] for s, e in spans)
  assert re.sub(r"\s", "", covered) == re.sub(r"\s", "", text)


# ----------------------------------------------------------------------------- blocks


PETS = corpus.Document("Pets#0", "Pets", "Cats purr. Dogs bark at night. Birds sing.")
# Tokens: title [pets] (1); sentences [cats pu ##rr .] (4), [dogs bark at night .] (5),
# [birds sing .] (3).


@pytest.mark.parametrize("max_len, texts, sentence_starts", [
    (13, ["Cats purr. Dogs bark at night.", "Birds sing."], [[0, 4], [0]]),  # 3+1+9 = 13 fits
    (12, ["Cats purr.", "Dogs bark at night. Birds sing."], [[0], [0, 5]]),  # greedy, not balanced
    (9, ["Cats purr.", "Dogs bark at night.", "Birds sing."], [[0], [0], [0]]),
    # Budget 4: the 5-token sentence is cut at a word boundary; its tail continues the next block.
    (8, ["Cats purr.", "Dogs bark at night", ". Birds sing."], [[0], [0], [0, 1]]),
])
def test_split_into_blocks_hand_checked(tok, max_len, texts, sentence_starts):
  blocks = corpus.split_into_blocks([PETS], tok, max_len, show_progress=False)
  assert [b.text for b in blocks] == texts
  assert [b.sentence_starts.tolist() for b in blocks] == sentence_starts
  assert [b.block_id for b in blocks] == list(range(len(texts)))
  assert all(b.num_tokens <= max_len for b in blocks)


def test_long_word_is_cut_inside_only_when_needed(tok):
  doc = corpus.Document("W#0", "T", "Antidisestablishmentarianism is long.")
  # Body budget 7 - 3 - 1 = 3 tokens; the 8-piece word cannot fit whole anywhere.
  blocks = corpus.split_into_blocks([doc], tok, 7, show_progress=False)
  assert [b.text for b in blocks] == ["Antidisest", "ablishment", "arianism is", "long."]
  assert np.concatenate([b.body_ids for b in blocks]).tolist() == tok.encode(doc.text)


def test_blocks_invariants_on_real_paragraphs(tok):
  docs = corpus.read_squad_documents(SQUAD_TINY)
  max_len = 64
  blocks = corpus.split_into_blocks(docs, tok, max_len, batch_size=2, show_progress=False)
  assert [b.block_id for b in blocks] == list(range(len(blocks)))
  assert len(blocks) > len(docs)  # 64 tokens force splits
  for doc in docs:
    mine = [b for b in blocks if b.doc_id == doc.doc_id]
    # No token lost or duplicated: the blocks of a document concatenate to its tokens.
    assert np.concatenate([b.body_ids for b in mine]).tolist() == tok.encode(doc.text)
    for b in mine:
      assert b.num_tokens <= max_len
      assert b.title == doc.title and b.title_ids.tolist() == tok.encode(doc.title)
      assert b.text in doc.text
      ids, offsets = tok.encode_with_offsets(b.text)
      assert ids == b.body_ids.tolist()
      assert offsets == [tuple(o) for o in b.body_offsets.tolist()]
      assert b.body_ids.dtype == np.int32 and b.body_offsets.shape == (len(b.body_ids), 2)
      assert b.sentence_starts[0] == 0 and np.all(np.diff(b.sentence_starts) > 0)
    # Greedy packing: the next block's first sentence would not have fit in the previous block.
    for prev, nxt in zip(mine, mine[1:]):
      first_sentence = (nxt.sentence_starts[1] if len(nxt.sentence_starts) > 1
                        else len(nxt.body_ids))
      assert prev.num_tokens + first_sentence > max_len
  again = corpus.split_into_blocks(docs, tok, max_len, show_progress=False)
  assert corpus.corpus_fingerprint(again, max_len) == corpus.corpus_fingerprint(blocks, max_len)


def test_split_into_blocks_errors(tok):
  with pytest.raises(ValueError, match="duplicate doc_id 'Pets#0'"):
    corpus.split_into_blocks([PETS, PETS], tok, show_progress=False)
  with pytest.raises(ValueError, match="at least 5"):
    corpus.split_into_blocks([PETS], tok, 4, show_progress=False)
  empty = corpus.Document("E#0", "Empty", "   ")
  assert corpus.split_into_blocks([empty], tok, show_progress=False) == []


def test_corpus_fingerprint_is_sensitive(tok):
  blocks = corpus.split_into_blocks([PETS], tok, 12, show_progress=False)
  fp = corpus.corpus_fingerprint(blocks, 12)
  assert re.fullmatch(r"[0-9a-f]{64}", fp)
  assert corpus.corpus_fingerprint(blocks, 13) != fp
  renamed = corpus.split_into_blocks([corpus.Document("Pets#0", "Pet", PETS.text)], tok, 12,
                                     show_progress=False)
  assert corpus.corpus_fingerprint(renamed, 12) != fp
  assert corpus.corpus_fingerprint(blocks[::-1], 12) != fp


# ----------------------------------------------------------------------------- retriever inputs


def test_retrieval_inputs_layout(tok):
  blocks = corpus.split_into_blocks([PETS], tok, 12, show_progress=False)
  out = corpus.retrieval_inputs(blocks, tok, max_length=16)
  pets, cats, pu, rr, dot = tok.convert_tokens_to_ids(["pets", "cats", "pu", "##rr", "."])
  assert out["input_ids"].shape == (2, 16) and out["input_ids"].dtype == np.int32
  assert out["input_ids"][0].tolist() == [101, pets, 102, cats, pu, rr, dot, 102] + [0] * 8
  assert out["segment_ids"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1] + [0] * 8
  assert out["input_mask"][0].tolist() == [1] * 8 + [0] * 8
  assert out["input_mask"][1].sum() == blocks[1].num_tokens == 12
  bucketed = corpus.retrieval_inputs(blocks, tok, max_length=288, pad_to_multiple_of=32)
  assert bucketed["input_ids"].shape == (2, 32)
  assert np.array_equal(bucketed["input_ids"][:, :16], out["input_ids"])
  # Truncation: body first, then the closing [SEP] stays.
  short = corpus.retrieval_inputs(blocks[:1], tok, max_length=6)
  assert short["input_ids"][0].tolist() == [101, pets, 102, cats, pu, 102]
  mapping = corpus.retrieval_inputs({"title_ids": [np.array([7, 8])], "body_ids": [np.array([9])]},
                                    tok, max_length=8)
  assert mapping["input_ids"][0].tolist() == [101, 7, 8, 102, 9, 102, 0, 0]
  with pytest.raises(ValueError, match="no 'body_ids'"):
    corpus.retrieval_inputs({"title_ids": []}, tok)


def test_bucketed_and_padded_length():
  assert corpus.bucketed_length(33, [128, 32, 64]) == 64
  assert corpus.bucketed_length(32, [32, 64]) == 32
  with pytest.raises(ValueError, match="exceed the largest bucket"):
    corpus.bucketed_length(300, [32, 288])
  assert corpus.padded_length(200, 288, 32) == 224
  assert corpus.padded_length(280, 288, 32) == 288
  assert corpus.padded_length(5, 288, None) == 288
