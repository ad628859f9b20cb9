"""Tests for realm_jax.data.pretraining: sentence records, masked examples, ICT, TFDS storage."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np
import pytest

from realm_jax import tokenization
from realm_jax.data import corpus
from realm_jax.data import pretraining as pt
from realm_jax.data import salient_spans as ss

HAS_MODEL = any(importlib.util.find_spec(m) is not None for m in ss.DEFAULT_MODELS)

DOCS = [
    corpus.Document("obama", "Barack Obama",
                    "Barack Obama was born on 4 August 1961 in Honolulu, Hawaii. He served as the "
                    "44th president of the United States from 2009 to 2017. He likes to read."),
    corpus.Document("paris", "Paris",
                    "Paris is the capital of France. The Eiffel Tower was completed in March "
                    "1889 for the World's Fair. Many tourists visit it every year."),
]


@pytest.fixture(scope="module")
def tokenizer() -> tokenization.Tokenizer:
  try:
    model_dir = tokenization.minilm_model_dir()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  return tokenization.WordPieceTokenizer.from_vocab_file(model_dir / "vocab.txt")


@pytest.fixture(scope="module")
def blocks(tokenizer):
  return corpus.split_into_blocks(DOCS, tokenizer, show_progress=False)


@pytest.fixture(scope="module")
def tagger():
  if not HAS_MODEL:
    pytest.skip(f"no spaCy model: {ss.MODEL_INSTALL_HINT}")
  return ss.SalientSpanTagger()


class CountingTagger:
  """Delegates to a real tagger and counts `tag_documents` calls."""

  def __init__(self, tagger):
    self._tagger = tagger
    self.fingerprint = tagger.fingerprint
    self.model_name = tagger.model_name
    self.calls = 0

  def tag_documents(self, *args, **kwargs):
    self.calls += 1
    return self._tagger.tag_documents(*args, **kwargs)


def test_sentence_records(blocks, tokenizer, tagger):
  records = pt.make_sentence_records(blocks, tokenizer, tagger, query_length=32, progress=False)
  assert [(r.block_id, r.sentence_index) for r in records] == [
      (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
  for r in records:
    block = blocks[r.block_id]
    n = r.num_tokens
    assert r.token_ids.shape == (32,) and r.token_ids.dtype == np.int32
    assert r.token_offsets.shape == (32, 2)
    assert r.token_ids[0] == tokenizer.cls_id and r.token_ids[n + 1] == tokenizer.sep_id
    assert (r.token_ids[n + 2:] == tokenizer.pad_id).all()
    assert (r.token_offsets[[0, n + 1]] == -1).all() and (r.token_offsets[n + 2:] == -1).all()
    # The query uses exactly the block's wordpieces.
    first = int(np.flatnonzero((block.body_offsets == r.token_offsets[1]).all(1))[0])
    np.testing.assert_array_equal(r.token_ids[1:n + 1], block.body_ids[first:first + n])
    # Spans lie inside the sentence and carry a known label.
    lo, hi = r.token_offsets[1:n + 1, 0].min(), r.token_offsets[1:n + 1, 1].max()
    assert ((r.spans[:, 0] >= lo) & (r.spans[:, 1] <= hi)).all()
    assert ((r.span_labels >= 0) & (r.span_labels < len(ss.SPAN_LABELS))).all()
  first = records[0]
  text = blocks[0].text
  found = {(text[s:e], ss.SPAN_LABELS[k]) for (s, e), k in zip(first.spans, first.span_labels)}
  assert {("Barack Obama", "PERSON"), ("4 August 1961", "DATE"), ("Honolulu", "GPE")} <= found
  assert records[2].spans.shape == (0, 2)  # "He likes to read."


def _masked_text(example: pt.PretrainingExample, tokenizer) -> str:
  targets = example.mlm_targets[example.mlm_weights > 0]
  return tokenizer.decode(targets)


def test_salient_examples(blocks, tokenizer, tagger):
  examples = pt.make_pretraining_examples(blocks, tokenizer, tagger, query_length=40,
                                          progress=False)
  records = pt.make_sentence_records(blocks, tokenizer, tagger, query_length=40, progress=False)
  usable = [(r.block_id, r.sentence_index) for r in records if len(r.spans)]
  assert [(e.source_block_id, e.sentence_index) for e in examples] == usable
  by_key = {(r.block_id, r.sentence_index): r for r in records}
  for e in examples:
    r = by_key[(e.source_block_id, e.sentence_index)]
    n = int(e.mlm_weights.sum())
    pos = e.mlm_positions[:n]
    assert e.masking == "salient"
    assert (e.query_input_ids[pos] == tokenizer.mask_id).all()
    np.testing.assert_array_equal(e.mlm_targets[:n], r.token_ids[pos])
    # The masked pieces are exactly the pieces of one stored span.
    text = blocks[e.source_block_id].text
    start, end = r.token_offsets[pos, 0].min(), r.token_offsets[pos, 1].max()
    assert any(s <= start and end <= e_ or (start <= s and e_ <= end)
               for s, e_ in r.spans.tolist())
    assert tokenizer.decode(e.mlm_targets[:n]).replace(" ", "") == \
        text[start:end].lower().replace(" ", "")
    assert e.query_input_mask.sum() == r.num_tokens + 2
    assert not e.query_segment_ids.any()
    assert e.mlm_positions.dtype == np.int32 and e.mlm_weights.dtype == np.float32


def test_masking_is_order_independent_and_seeded(blocks, tokenizer, tagger):
  records = pt.make_sentence_records(blocks, tokenizer, tagger, progress=False)
  for kind in pt.MASKING_KINDS:
    forward = pt.mask_sentences(records, kind, tokenizer, seed=3, progress=False)
    backward = pt.mask_sentences(records[::-1], kind, tokenizer, seed=3, progress=False)[::-1]
    other = pt.mask_sentences(records, kind, tokenizer, seed=4, progress=False)
    for a, b in zip(forward, backward):
      np.testing.assert_array_equal(a.query_input_ids, b.query_input_ids)
      np.testing.assert_array_equal(a.mlm_positions, b.mlm_positions)
    if kind != "salient":
      assert len(forward) == len(records)  # every sentence has maskable tokens
      assert any(not np.array_equal(a.mlm_positions, b.mlm_positions)
                 for a, b in zip(forward, other))
    for e in forward:
      n = int(e.mlm_weights.sum())
      assert 1 <= n <= pt.MAX_MASKS
      assert not np.isin(e.mlm_targets[:n], list(tokenizer.special_ids)).any()


def test_truncated_query_drops_spans_past_the_end(blocks, tokenizer, tagger):
  records = pt.make_sentence_records(blocks, tokenizer, tagger, query_length=6, progress=False)
  r = records[0]  # "barack obama was born" survives; the date and places do not
  assert r.num_tokens == 4 and r.token_ids[5] == tokenizer.sep_id
  for _ in range(5):
    e = pt.mask_sentence(r, "salient", tokenizer, seed=_)
    assert e.mlm_positions[:int(e.mlm_weights.sum())].tolist() == [1, 2]  # Barack Obama


def test_bad_block_names_block_and_field(blocks, tokenizer, tagger):
  bad = dataclasses.replace(blocks[1], body_offsets=blocks[1].body_offsets[:-1])
  with pytest.raises(ValueError, match=r"block 1 \(doc 'paris'\): field body_offsets"):
    pt.make_sentence_records([blocks[0], bad], tokenizer, tagger, progress=False)
  with pytest.raises(ValueError, match="masking must be one of"):
    pt.make_pretraining_examples(blocks, tokenizer, tagger, masking="bert", progress=False)


def _decode_real(ids, mask, tokenizer):
  return tokenizer.decode(ids[mask == 1])


def test_ict_examples(blocks, tokenizer):
  always = pt.make_ict_examples(blocks, tokenizer, query_length=24, block_length=64,
                                remove_sentence_prob=1.0, progress=False)
  never = pt.make_ict_examples(blocks, tokenizer, query_length=24, block_length=64,
                               remove_sentence_prob=0.0, progress=False)
  assert len(always) == len(never) == 2
  assert always.query_input_ids.shape == (2, 24) and always.block_input_ids.shape == (2, 64)
  assert always.block_id.dtype == np.int64 and always.block_id.tolist() == [0, 1]
  assert always.sentence_removed.all() and not never.sentence_removed.any()
  for i, block in enumerate(blocks):
    q_len = int(always.query_input_mask[i].sum())
    query = always.query_input_ids[i, 1:q_len - 1]
    assert always.query_input_ids[i, 0] == tokenizer.cls_id
    assert always.query_input_ids[i, q_len - 1] == tokenizer.sep_id
    # Same seed, same sentence: the kept block holds the sentence, the other one has it removed.
    np.testing.assert_array_equal(never.query_input_ids[i], always.query_input_ids[i])
    kept = never.block_input_ids[i, :int(never.block_input_mask[i].sum())]
    removed = always.block_input_ids[i, :int(always.block_input_mask[i].sum())]
    assert len(kept) == 3 + len(block.title_ids) + len(block.body_ids)
    assert len(removed) == len(kept) - len(query)
    windows = np.lib.stride_tricks.sliding_window_view(kept, len(query))
    assert (windows == query).all(1).any()
    # [CLS] title [SEP] | body [SEP]: segment 0 then 1, padding 0.
    t = len(block.title_ids)
    np.testing.assert_array_equal(kept[:t + 2], [tokenizer.cls_id, *block.title_ids,
                                                 tokenizer.sep_id])
    seg = never.block_segment_ids[i]
    assert not seg[:t + 2].any() and seg[t + 2:len(kept)].all() and not seg[len(kept):].any()
    assert kept[-1] == tokenizer.sep_id


def test_ict_removal_rate_and_truncation(blocks, tokenizer):
  removed = [pt.make_ict_examples(blocks[:1], tokenizer, seed=s, progress=False
                                  ).sentence_removed[0] for s in range(200)]
  assert 0.83 < np.mean(removed) < 0.97
  short = pt.make_ict_examples(blocks, tokenizer, query_length=5, block_length=12,
                               progress=False)
  assert short.query_input_mask.sum(1).max() <= 5 and short.block_input_mask.sum(1).max() <= 12
  assert (short.block_input_ids[:, 11] == tokenizer.sep_id).all()
  whole = lambda texts: [[(0, len(t))] for t in texts]  # noqa: E731
  one_sentence = pt.make_ict_examples(blocks, tokenizer, progress=False, sentence_splitter=whole)
  assert len(one_sentence) == 0  # a single sentence would leave an empty block


def test_tfds_round_trip_and_span_reuse(blocks, tokenizer, tagger, tmp_path):
  counting = CountingTagger(tagger)
  path = pt.build_pretraining_dataset(blocks, tokenizer, str(tmp_path), tagger=counting,
                                      query_length=32, progress=False)
  assert counting.calls == 1
  data = pt.load_pretraining_examples(path, progress=False)
  expected = pt.make_pretraining_examples(blocks, tokenizer, tagger, query_length=32,
                                          progress=False)
  assert len(data) == len(expected) > 0 and data.masking == "salient"
  ref = pt.stack_examples(expected)
  batch = data.batch(np.arange(len(data)))
  for k in pt.ARRAY_FIELDS:
    assert batch[k].dtype == ref[k].dtype, k
    np.testing.assert_array_equal(batch[k], ref[k], err_msg=k)
  one = data[1]
  np.testing.assert_array_equal(one.query_input_ids, expected[1].query_input_ids)
  assert one.source_block_id == expected[1].source_block_id
  assert data.batch([1, 0])["query_input_ids"].shape == (2, 32)

  # Another masking kind re-uses the stored spans: no second tagging pass.
  path2 = pt.build_pretraining_dataset(blocks, tokenizer, str(tmp_path), tagger=counting,
                                       masking="random_span", query_length=32, progress=False)
  assert counting.calls == 1 and path2 != path
  spans = pt.load_pretraining_examples(path2, progress=False)
  assert spans.masking == "random_span"
  assert len(spans) == len(pt.make_sentence_records(blocks, tokenizer, tagger, 32,
                                                    progress=False))
  # Same arguments: nothing rebuilt.
  assert pt.build_pretraining_dataset(blocks, tokenizer, str(tmp_path), tagger=counting,
                                      query_length=32, progress=False) == path
  assert counting.calls == 1


def test_tfds_refuses_an_empty_split(tokenizer, tagger, tmp_path):
  plain = corpus.split_into_blocks([corpus.Document("x", "X", "He likes to read. So do we.")],
                                   tokenizer, show_progress=False)
  with pytest.raises(ValueError, match="no sentence could be masked"):
    pt.build_pretraining_dataset(plain, tokenizer, str(tmp_path), tagger=tagger, progress=False)
  path = pt.build_pretraining_dataset(plain, tokenizer, str(tmp_path), tagger=tagger,
                                      masking="random_token", progress=False)
  assert len(pt.load_pretraining_examples(path, progress=False)) == 2


def test_config_names():
  a = pt.sentences_config_name("corpus", "tok", "tagger", 96)
  assert a.startswith("q96-") and a != pt.sentences_config_name("corpus2", "tok", "tagger", 96)
  assert a != pt.sentences_config_name("corpus", "tok", "tagger2", 96)
  b = pt.examples_config_name(a, "salient", 10, 0)
  assert b.startswith("salient-q96-m10-s0-")
  assert len({b, pt.examples_config_name(a, "random_token", 10, 0),
              pt.examples_config_name(a, "salient", 5, 0),
              pt.examples_config_name(a, "salient", 10, 1)}) == 4


def test_load_missing_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match="dataset_info.json"):
    pt.load_pretraining_examples(str(tmp_path / "nothing"))
  assert not os.path.exists(tmp_path / "nothing")
