"""Fixtures shared by the pre-training and ICT tests: tiny corpus, tiny models, masked queries."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from realm_jax import tokenization
from realm_jax.data import corpus as corpus_lib
from realm_jax.data import corpus_store
from realm_jax.data import pretraining as pretraining_data
from realm_jax.models import bert
from realm_jax.models import realm

DOCS = [
    ("Paris", "Paris is the capital of France. The Eiffel Tower was completed in March 1889 for "
              "the World's Fair in Paris."),
    ("Rome", "Rome is the capital of Italy. The Colosseum in Rome could hold 50,000 spectators "
             "during the reign of Vespasian."),
    ("Tokyo", "Tokyo is the capital of Japan. Tokyo hosted the Summer Olympics in 1964 and again "
              "in 2021."),
    ("Nile", "The Nile is a river in Africa. The Nile flows through Egypt into the Mediterranean "
             "Sea near Alexandria."),
    ("Barack Obama", "Barack Obama was born on 4 August 1961 in Honolulu, Hawaii. He served as the "
                     "44th president of the United States from 2009 to 2017."),
    ("Amazon", "The Amazon River flows through Brazil and Peru. The Amazon rainforest covers much "
               "of Brazil."),
    ("Mount Everest", "Mount Everest lies on the border of Nepal and China. Edmund Hillary and "
                      "Tenzing Norgay climbed Mount Everest in May 1953."),
    ("Berlin", "Berlin is the capital of Germany. The Berlin Wall fell on 9 November 1989 after "
               "weeks of protests."),
    ("Shakespeare", "William Shakespeare was born in Stratford-upon-Avon in 1564. Shakespeare "
                    "wrote Hamlet and Macbeth for the Globe Theatre in London."),
    ("Moon landing", "Apollo 11 landed on the Moon on 20 July 1969. Neil Armstrong and Buzz Aldrin "
                     "walked on the Moon while Michael Collins orbited."),
]


def tokenizer() -> tokenization.Tokenizer:
  return tokenization.WordPieceTokenizer.from_vocab_file(
      tokenization.minilm_model_dir() / "vocab.txt")


def vocab_path() -> str:
  return str(tokenization.minilm_model_dir() / "vocab.txt")


def documents() -> list[corpus_lib.Document]:
  return [corpus_lib.Document(f"{t}#0", t, x) for t, x in DOCS]


def write_jsonl(path: pathlib.Path) -> str:
  with open(path, "w") as f:
    for title, text in DOCS:
      f.write(json.dumps({"title": title, "text": text}) + "\n")
  return str(path)


def tiny_model(share_embedders: bool = True, hidden: int = 16) -> realm.ModelConfig:
  """A 1-layer BERT (hidden 16) with the MiniLM WordPiece vocabulary, no dropout."""
  return realm.ModelConfig(
      init_checkpoint=None, pooling="cls_projection", projection_size=8, span_hidden_size=8,
      max_span_width=4, share_embedders=share_embedders,
      bert=bert.BertConfig(vocab_size=30522, hidden_size=hidden, num_layers=1, num_heads=2,
                           intermediate_size=2 * hidden, max_position_embeddings=64,
                           hidden_dropout=0.0, attention_dropout=0.0))


def corpus(tok, max_block_length: int = 64) -> corpus_store.Corpus:
  blocks = corpus_lib.split_into_blocks(documents(), tok, max_block_length, show_progress=False)
  return corpus_store.Corpus(blocks, tok, max_block_length)


def masked_examples(corp, tok, query_length: int, max_masks: int, n: int,
                    mask_at=(2, 3)) -> pretraining_data.PretrainingDataset:
  """`n` queries: the first wordpieces of blocks 0, 1, … (cycling), tokens `mask_at` masked."""
  rows = {k: [] for k in pretraining_data.ARRAY_FIELDS}
  for i in range(n):
    pos = i % len(corp)
    body = corp.body_ids(pos)[:query_length - 2]
    ids = np.full(query_length, tok.pad_id, np.int32)
    ids[0], ids[1:len(body) + 1], ids[len(body) + 1] = tok.cls_id, body, tok.sep_id
    mask = (np.arange(query_length) < len(body) + 2).astype(np.int32)
    positions = np.zeros(max_masks, np.int32)
    targets = np.zeros(max_masks, np.int32)
    weights = np.zeros(max_masks, np.float32)
    for slot, p in enumerate(mask_at):
      positions[slot], targets[slot], weights[slot] = p, ids[p], 1.0
      ids[p] = tok.mask_id
    for name, value in (("query_input_ids", ids), ("query_input_mask", mask),
                        ("query_segment_ids", np.zeros(query_length, np.int32)),
                        ("mlm_positions", positions), ("mlm_targets", targets),
                        ("mlm_weights", weights), ("source_block_id", corp.block_ids[pos]),
                        ("sentence_index", 0)):
      rows[name].append(value)
  arrays = {k: np.stack([np.asarray(v) for v in vs]) for k, vs in rows.items()}
  arrays["source_block_id"] = arrays["source_block_id"].astype(np.int64)
  arrays["sentence_index"] = arrays["sentence_index"].astype(np.int32)
  return pretraining_data.PretrainingDataset(arrays, "random_token")
