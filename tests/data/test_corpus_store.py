"""Tests for realm_jax.data.corpus_store: streamed build, memory-mapped read, several processes."""

from __future__ import annotations

import json
import os
import re
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from realm_jax import tokenization
from realm_jax.data import corpus
from realm_jax.data import corpus_store

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "data"
SQUAD_TINY = FIXTURES / "squad_dev_tiny.json"
WIKI = FIXTURES / "wikitext2_valid_head12.tokens"
REPO = pathlib.Path(__file__).parents[2]


@pytest.fixture(scope="module")
def tok() -> tokenization.WordPieceTokenizer:
  return tokenization.WordPieceTokenizer.from_vocab_file(
      tokenization.minilm_model_dir() / "vocab.txt")


def _assert_same_blocks(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert (g.block_id, g.doc_id, g.title, g.text) == (w.block_id, w.doc_id, w.title, w.text)
    for field in ("title_ids", "body_ids", "body_offsets", "sentence_starts"):
      assert np.array_equal(getattr(g, field), getattr(w, field)), field
      assert getattr(g, field).dtype == np.int32


def _jsonl_sources(directory: pathlib.Path, n_files: int = 3) -> list[pathlib.Path]:
  """Splits the SQuAD fixture's paragraphs into `n_files` JSON-lines files (titled documents)."""
  docs = corpus.read_documents(SQUAD_TINY) + corpus.read_documents(WIKI)
  directory.mkdir(parents=True, exist_ok=True)
  paths = []
  for k in range(n_files):
    path = directory / f"wiki-{k:02d}.jsonl"
    path.write_text("".join(json.dumps({"id": d.doc_id, "title": d.title, "text": d.text}) + "\n"
                            for d in docs[k::n_files]), encoding="utf-8")
    paths.append(path)
  return paths


def test_build_round_trip_fingerprint_and_reuse(tmp_path, tok):
  data_dir = tmp_path / "data"
  built = corpus_store.build_corpus([SQUAD_TINY, WIKI], tok, data_dir, 64, show_progress=False)
  direct = corpus.split_into_blocks(
      corpus.read_documents(SQUAD_TINY) + corpus.read_documents(WIKI), tok, 64, show_progress=False)
  assert len(direct) > 4
  _assert_same_blocks(built, direct)
  # The fingerprint equals the reference hash over Block objects (unchanged by the store).
  assert built.fingerprint == corpus.corpus_fingerprint(direct, 64)
  assert built.lengths.tolist() == [b.num_tokens for b in direct]
  assert [built.titles[i] for i in range(3)] == [b.title for b in direct[:3]]
  assert built.texts[2:4] == [b.text for b in direct[2:4]]
  assert list(built.doc_ids[np.array([0, 5])]) == [direct[0].doc_id, direct[5].doc_id]
  # Token ids are stored as uint16 (BERT's vocabulary fits) and memory-mapped.
  part = built._parts[0]  # pylint: disable=protected-access
  assert part.tokens.dtype == np.uint16 and isinstance(part.tokens.base, np.memmap)

  directory = built.directory
  files_before = {p: p.stat().st_mtime_ns for p in pathlib.Path(directory).rglob("*")}
  again = corpus_store.build_corpus([SQUAD_TINY, WIKI], tok, data_dir, 64, show_progress=False)
  assert again.fingerprint == built.fingerprint
  assert {p: p.stat().st_mtime_ns for p in pathlib.Path(directory).rglob("*")} == files_before

  # The name hashes contents, not paths: a moved copy maps to the same corpus ...
  moved = tmp_path / "elsewhere.json"
  shutil.copy(SQUAD_TINY, moved)
  assert (corpus_store.corpus_spec([moved, WIKI], tok, 64).name
          == corpus_store.corpus_spec([SQUAD_TINY, WIKI], tok, 64).name)
  # ... while another block length is another corpus.
  other = corpus_store.build_corpus([SQUAD_TINY], tok, data_dir, 288, show_progress=False)
  assert len(other) == 3 and other.fingerprint != built.fingerprint
  assert len(list((data_dir / "realm_corpus").glob("c*"))) == 2


def test_in_memory_corpus_matches_blocks(tok):
  docs = corpus.read_squad_documents(SQUAD_TINY)
  blocks = corpus.split_into_blocks(docs, tok, 64, show_progress=False)
  c = corpus_store.Corpus(blocks[::-1], tok, 64)  # any order in; sorted by id
  assert c.block_ids.tolist() == list(range(len(blocks)))
  _assert_same_blocks(c, blocks)
  assert c.lengths.tolist() == [b.num_tokens for b in blocks]
  assert c.fingerprint == corpus.corpus_fingerprint(blocks, 64)
  assert c[-1].block_id == blocks[-1].block_id
  with pytest.raises(IndexError):
    c[len(blocks)]  # pylint: disable=pointless-statement
  assert c.positions([3, 0]).tolist() == [3, 0]
  with pytest.raises(KeyError, match="999"):
    c.positions([999])
  warsaw = c.positions_of_doc("Warsaw#0")
  assert [c.doc_ids[i] for i in warsaw] == ["Warsaw#0"] * len(warsaw) and len(warsaw) >= 1
  assert warsaw.tolist() == [b.block_id for b in blocks if b.doc_id == "Warsaw#0"]
  assert len(c.positions_of_doc("nope")) == 0
  subset = [4, 1]
  expected = corpus.retrieval_inputs([blocks[i] for i in subset], tok, 64, pad_to_multiple_of=32)
  got = c.retrieval_inputs(subset, pad_to_multiple_of=32)
  assert all(np.array_equal(got[k], expected[k]) for k in expected)
  with pytest.raises(ValueError, match="duplicate block_id 0"):
    corpus_store.Corpus([blocks[0], blocks[0]], tok)
  # Sparse block ids (a subset) keep their ids; the fingerprint hashes them.
  sub = corpus_store.Corpus([blocks[1], blocks[3]], tok, 64)
  assert sub.block_ids.tolist() == [1, 3] and sub.positions([3]).tolist() == [1]
  assert sub.fingerprint == corpus.corpus_fingerprint([blocks[1], blocks[3]], 64)


def test_glob_sources_are_sorted_and_an_empty_glob_is_one_clear_error(tmp_path, tok):
  paths = _jsonl_sources(tmp_path / "src")
  data_dir = tmp_path / "data"
  by_glob = corpus_store.build_corpus(str(tmp_path / "src" / "wiki-*.jsonl"), tok, data_dir, 64,
                                      show_progress=False)
  direct = corpus.split_into_blocks(
      [d for p in paths for d in corpus.read_documents(p)], tok, 64, show_progress=False)
  _assert_same_blocks(by_glob, direct)
  assert by_glob.fingerprint == corpus.corpus_fingerprint(direct, 64)
  metadata = corpus_store.read_metadata(by_glob.directory)
  assert [pathlib.Path(s).name for s in metadata["config"]["sources"]] == [p.name for p in paths]
  with pytest.raises(FileNotFoundError, match=r"corpus source .*nothing-\*\.jsonl: the glob matches"):
    corpus_store.build_corpus(str(tmp_path / "src" / "nothing-*.jsonl"), tok, tmp_path / "d2", 64,
                              show_progress=False)
  assert not (tmp_path / "d2").exists()


def test_doc_id_repeated_across_sources_commits_nothing(tmp_path, tok):
  a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
  a.write_text(json.dumps({"id": "x", "title": "T", "text": "One sentence here."}) + "\n")
  b.write_text(json.dumps({"id": "x", "title": "U", "text": "Another sentence."}) + "\n")
  with pytest.raises(corpus_store.CorpusStoreError, match="duplicate doc_id 'x'"):
    corpus_store.build_corpus([a, b], tok, tmp_path / "data", 64, show_progress=False)
  assert not list((tmp_path / "data").rglob(corpus_store.METADATA_FILE))
  # Inside one file: the line's file is named.
  a.write_text(a.read_text() * 2)
  with pytest.raises(corpus.DataFormatError, match=r"a\.jsonl:2: field 'id' gives doc id 'x', "
                     r"already used at line 1"):
    corpus_store.build_corpus([a], tok, tmp_path / "data", 64, show_progress=False)


def test_malformed_source_names_file_line_and_field(tmp_path, tok):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"title": "T", "text": "Fine."}) + "\n" + json.dumps({"title": "U"}) + "\n")
  with pytest.raises(corpus.DataFormatError, match=r"bad\.jsonl:2: missing field 'text'"):
    corpus_store.build_corpus([bad], tok, tmp_path / "data", 64, show_progress=False)
  assert not list((tmp_path / "data").rglob("*.bin"))  # nothing half-written is left


def test_truncated_column_file_is_one_clear_error(tmp_path, tok):
  built = corpus_store.build_corpus([SQUAD_TINY], tok, tmp_path / "data", 64, show_progress=False)
  tokens = pathlib.Path(built.directory) / "part-00000" / "tokens.bin"
  with open(tokens, "r+b") as f:
    f.truncate(tokens.stat().st_size - 2)
  with pytest.raises(corpus_store.CorpusStoreError, match=r"part-00000/tokens\.bin: \d+ bytes, but"):
    corpus_store.Corpus.open(built.directory, tok)
  with pytest.raises(corpus_store.CorpusStoreError, match="tokenizer"):
    texts = [d.text for d in corpus.read_documents(SQUAD_TINY)]
    sp = tokenization.SentencePieceTokenizer.train(texts, tmp_path / "spm" / "m", vocab_size=120)
    corpus_store.Corpus.open(built.directory, sp)


def test_memory_does_not_hold_blocks(tmp_path, tok):
  """Opening reads only the per-block index: the token and text columns stay mapped, untouched."""
  paths = _jsonl_sources(tmp_path / "src", 2)
  built = corpus_store.build_corpus([str(p) for p in paths], tok, tmp_path / "data", 64,
                                    show_progress=False)
  for part in built._parts:  # pylint: disable=protected-access
    for column in ("tokens", "offsets", "text", "sentences", "doc_ids", "titles"):
      array = getattr(part, column)
      assert array.size == 0 or isinstance(array.base, np.memmap), column


_BUILD_SCRIPT = """
import sys, json
from realm_jax import tokenization
from realm_jax.data import corpus_store
index, count, data_dir, *sources = sys.argv[1:]
tok = tokenization.WordPieceTokenizer.from_vocab_file(tokenization.minilm_model_dir() / "vocab.txt")
c = corpus_store.build_corpus(sources, tok, data_dir, 64, show_progress=False,
                              process_index=int(index), process_count=int(count),
                              split_across_processes=True, wait_timeout_s=120)
print(json.dumps({"fingerprint": c.fingerprint, "num_blocks": len(c)}))
"""


def _run_processes(data_dir, sources, count=2):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  procs = [subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT, str(i), str(count), str(data_dir),
                             *map(str, sources)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env) for i in range(count)]
  return [p.communicate(timeout=300) + (p.returncode,) for p in procs]


def test_two_processes_build_their_shares_into_the_same_corpus(tmp_path, tok):
  sources = _jsonl_sources(tmp_path / "src", 3)
  results = _run_processes(tmp_path / "data", sources)
  for out, err, code in results:
    assert code == 0, err
  got = [json.loads(out) for out, _, _ in results]
  single = corpus_store.build_corpus(sources, tok, tmp_path / "single", 64, show_progress=False)
  assert got[0] == got[1] == {"fingerprint": single.fingerprint, "num_blocks": len(single)}
  directory = corpus_store.corpus_directory(tmp_path / "data",
                                            corpus_store.corpus_spec(sources, tok, 64))
  builders = [json.loads((pathlib.Path(directory) / corpus_store.part_name(i) / "part.json")
                         .read_text())["process_index"] for i in range(3)]
  assert builders == [0, 1, 0]  # source i is built by process i mod 2


def test_source_changed_between_processes_is_named(tmp_path, tok):
  sources = _jsonl_sources(tmp_path / "src", 2)
  spec = corpus_store.corpus_spec(sources, tok, 64)
  # Process 0 published its view of the sources, then the second file changed.
  corpus_store._agree_on_spec(tmp_path / "data", spec, 0, 1.0)  # pylint: disable=protected-access
  with open(sources[1], "a", encoding="utf-8") as f:
    f.write(json.dumps({"title": "New", "text": "A late edit."}) + "\n")
  with pytest.raises(corpus_store.CorpusStoreError,
                     match=r"wiki-01\.jsonl: changed between processes"):
    corpus_store.build_corpus(sources, tok, tmp_path / "data", 64, show_progress=False,
                              process_index=1, process_count=2, split_across_processes=True,
                              spec_wait_s=0.5)
  assert not list((tmp_path / "data").rglob(corpus_store.METADATA_FILE))


def test_object_store_build_and_cached_open(tmp_path, tok):
  """A memory:// data directory: parts uploaded, metadata last; reading goes through a local copy."""
  fsspec = pytest.importorskip("fsspec")
  fs = fsspec.filesystem("memory")
  for k, p in enumerate(_jsonl_sources(tmp_path / "src", 2)):
    fs.pipe(f"/bucket/wiki/{p.name}", p.read_bytes())
  try:
    built = corpus_store.build_corpus("memory://bucket/wiki/wiki-*.jsonl", tok,
                                      "memory://bucket/data", 64, show_progress=False,
                                      cache_dir=tmp_path / "cache")
    local = corpus_store.build_corpus(sorted((tmp_path / "src").glob("*.jsonl")), tok,
                                      tmp_path / "data", 64, show_progress=False)
    assert built.fingerprint == local.fingerprint and len(built) == len(local)
    _assert_same_blocks(built, local)
    assert fs.isfile(f"/bucket/data/realm_corpus/{fileio_name(built)}/metadata.json")
    assert len(list((tmp_path / "cache").rglob("tokens.bin"))) == 2  # one cached copy per part
  finally:
    fs.rm("/bucket", recursive=True)


def fileio_name(c) -> str:
  return str(c.directory).rstrip("/").rsplit("/", 1)[-1]


def test_unreadable_source_is_one_clear_error(tmp_path, tok, monkeypatch):
  """An object the job may not read (a 403 on gs://, EACCES locally) names the source."""
  src = _jsonl_sources(tmp_path / "src", 2)
  real_sha256 = corpus_store.fileio.sha256

  def forbidden(path):
    if str(path).endswith("wiki-01.jsonl"):
      raise PermissionError(13, "Permission denied", str(path))
    return real_sha256(path)

  monkeypatch.setattr(corpus_store.fileio, "sha256", forbidden)
  with pytest.raises(corpus_store.CorpusStoreError,
                     match=r"wiki-01\.jsonl: cannot read the corpus source \(PermissionError"):
    corpus_store.build_corpus(src, tok, tmp_path / "data", 64, show_progress=False)
  assert not (tmp_path / "data").exists()


def test_cli_reports_a_truncated_corpus_in_one_line(tmp_path, tok, capsys):
  """The CLI prints a corpus-store error as one line and exits 2 (no traceback)."""
  from realm_jax import cli
  built = corpus_store.build_corpus([SQUAD_TINY], tok, tmp_path / "data", 64, show_progress=False)
  text = pathlib.Path(built.directory) / "part-00000" / "text.bin"
  with open(text, "r+b") as f:
    f.truncate(1)
  gin = tmp_path / "ft.gin"
  gin.write_text(f"""
from __gin__ import dynamic_registration
from realm_jax.data import corpus_config
from realm_jax.training import finetune
include '{REPO}/experiments/models/tiny.gin'
include '{REPO}/experiments/runs/finetune.gin'
TRAIN_STEPS = 1
BATCH_SIZE = 8
LEARNING_RATE = 1e-4
DATA = @finetune.OpenQADataConfig()
TASK = @finetune.OpenQAConfig()
finetune.OpenQADataConfig:
  corpus = @corpus_config.CorpusConfig()
  train_questions = '{SQUAD_TINY}'
  eval_questions = '{SQUAD_TINY}'
corpus_config.CorpusConfig:
  sources = ['{SQUAD_TINY}']
  data_dir = '{tmp_path / "data"}'
  max_block_length = 64
""")
  code = cli.main(["finetune", "--gin_file", str(gin), "--workdir", str(tmp_path / "w")])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert len(err) == 1 and re.search(r"part-00000/text\.bin: 1 bytes, but part\.json records", err[0])


def test_processes_sharing_a_local_directory_keep_the_first_committed_part(tmp_path, tok):
  """Without a split, every process builds every part; an equal committed part is never replaced."""
  directory = tmp_path / "part-00000"
  blocks = corpus.split_into_blocks(corpus.read_documents(SQUAD_TINY), tok, 64, show_progress=False)
  first = corpus_store.write_part(directory, blocks, tok)
  inode = (directory / "tokens.bin").stat().st_ino
  again = corpus_store.write_part(directory, blocks, tok)
  assert again["files"] == first["files"]
  assert (directory / "tokens.bin").stat().st_ino == inode  # a reader's files were left alone
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
