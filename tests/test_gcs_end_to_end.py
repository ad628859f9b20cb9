"""The paper's route on `gs://`, rehearsed against a local Cloud Storage server (fake-gcs-server).

Work directories, the corpus (given as a glob over two shards), the question files (one a glob) and the
model directory (`config.json`, `model.safetensors`, `vocab.txt` of the tiny BERT) all sit in a bucket
of `gcs_emulator.gcs_server`, reached through gcsfs (`realm_jax.fileio`) and, for orbax checkpoints,
tensorstore's GCS driver (`TENSORSTORE_GCS_HTTP_URL`). Through the CLI functions, with
`experiments/models/tiny.gin`:

  * `finetune` (2 steps) then `predict` (reading `config.gin` from the bucket);
  * `index-builder`: the first index from the bucket's model, then a refresh from a checkpoint;
  * `pretrain` (3 steps, random-token masking, an inline refresh at step 2); its TFDS data directory is
    in the bucket too, and the pre-training examples are prepared in the local cache instead.

Every expected output must be in the bucket (checkpoints, snapshots, config.gin, summary.json,
predictions, TensorBoard events, the builder's status and journal), and nothing may be written to a
local folder named like a mangled URL (`gs:`): the tests run from an empty temporary cwd, checked after
each test and at the end. Remote model files, the corpus copy, the prepared questions and the
pre-training examples go to a temporary `REALM_JAX_CACHE`, also checked for `gs:` folders.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

import gcs_emulator  # pylint: disable=g-bad-import-order  (before gcsfs is imported)
from realm_jax import cli  # pylint: disable=g-import-not-at-top
from realm_jax import fileio  # pylint: disable=g-import-not-at-top

BUCKET = "realm-jax-e2e"  # GCS (and tensorstore) want bucket names of 3 characters or more.
ROOT = f"gs://{BUCKET}"
CORPUS_GLOB = f"{ROOT}/data/corpus/part-*.jsonl"
TRAIN_QUESTIONS = f"{ROOT}/data/questions/train-*.jsonl"
DEV_QUESTIONS = f"{ROOT}/data/questions/dev.jsonl"
MODEL_DIR = f"{ROOT}/models/tiny"
# Includes are absolute: under pytest the project root is on sys.path, and gin's package-resource reader
# then fails on `experiments/...` (a namespace package) when the cwd is not the project root.
PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon").split()


def _town(i: int) -> tuple[str, str]:
  return (f"Town {i}", f"{WORDS[i % 20].capitalize()} {i} is a town on the {WORDS[(i * 7) % 20]} "
                       f"river. It was founded in {1800 + i} by {WORDS[(i * 3) % 20]} settlers.")


def _upload_inputs() -> None:
  """Corpus shards, question files and the tiny BERT's model directory, written to the bucket."""
  import jax  # pylint: disable=g-import-not-at-top
  from realm_jax import tokenization  # pylint: disable=g-import-not-at-top
  from realm_jax.models import bert  # pylint: disable=g-import-not-at-top
  from realm_jax.models import checkpoint_import  # pylint: disable=g-import-not-at-top

  for shard in range(2):  # 24 documents over two shards, read through the glob.
    lines = [json.dumps(dict(zip(("title", "text"), _town(i)))) + "\n"
             for i in range(shard * 12, shard * 12 + 12)]
    fileio.write_atomic(f"{ROOT}/data/corpus/part-{shard}.jsonl", "".join(lines))
  fileio.write_atomic(f"{ROOT}/data/corpus/notes.txt", "not a corpus shard")  # Not matched.

  def question(i):
    return json.dumps({"question": f"When was {WORDS[i % 20]} {i} founded?",
                       "answer": [str(1800 + i)]}) + "\n"
  for shard in range(2):
    fileio.write_atomic(f"{ROOT}/data/questions/train-{shard}.jsonl",
                        "".join(question(i) for i in range(shard * 8, shard * 8 + 8)))
  fileio.write_atomic(DEV_QUESTIONS, "".join(question(i) for i in range(16, 24)))

  # The tiny BERT of experiments/models/tiny.gin as a Hugging Face directory, with MiniLM's vocabulary.
  cfg = bert.BertConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_position_embeddings=512)
  ids = np.ones((1, 4), np.int32)
  params = bert.BertEncoder(cfg).init(jax.random.key(0), input_ids=ids, input_mask=ids,
                                      segment_ids=ids * 0)["params"]
  checkpoint_import.export_bert_checkpoint(jax.device_get(params), cfg, MODEL_DIR)
  fileio.write_atomic(f"{MODEL_DIR}/vocab.txt",
                      (tokenization.minilm_model_dir() / "vocab.txt").read_bytes())


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """A bucket holding the inputs; the cwd an empty folder and `REALM_JAX_CACHE` a temporary one."""
  cwd = tmp_path_factory.mktemp("cwd")
  cache = tmp_path_factory.mktemp("cache")
  saved_cache = os.environ.get(fileio.CACHE_DIR_ENV)
  old_cwd = os.getcwd()
  with gcs_emulator.gcs_server(BUCKET):
    os.environ[fileio.CACHE_DIR_ENV] = str(cache)
    os.chdir(cwd)
    try:
      _upload_inputs()
      yield ROOT
      _no_local_gs_folder(cwd, cache)
    finally:
      os.chdir(old_cwd)
      if saved_cache is None:
        os.environ.pop(fileio.CACHE_DIR_ENV, None)
      else:
        os.environ[fileio.CACHE_DIR_ENV] = saved_cache


def _no_local_gs_folder(*roots: os.PathLike) -> None:
  """No file or folder named `gs:…` under the cwd, the cache (or `roots`)."""
  roots = roots or (pathlib.Path.cwd(), fileio.default_cache_dir())
  leaked = [str(p) for root in roots for p in pathlib.Path(root).rglob("*")
            if p.name.startswith("gs:")]
  assert not leaked, f"written to a local gs: folder: {leaked}"


def _files(prefix: str) -> list[str]:
  """Every object under `prefix`, as paths relative to it."""
  fs, p = fileio._fs(prefix)  # pylint: disable=protected-access
  return sorted(f[len(p) + 1:] for f in fs.find(p))


def _assert_events(workdir: str, files: list[str]) -> None:
  """A non-empty TensorBoard event file in `workdir/tensorboard`."""
  events = [f for f in files if f.startswith("tensorboard/events.out.tfevents.")]
  assert events, files
  assert max(fileio.size(f"{workdir}/{f}") for f in events) > 0, events


def _finetune_gin() -> str:
  """`tests/fixtures/gin/tiny_finetune.gin` with every input in the bucket; the file is there too."""
  path = f"{ROOT}/configs/finetune.gin"
  fileio.write_atomic(path, f"""
from __gin__ import dynamic_registration
from realm_jax.models import realm
from realm_jax.data import corpus_config
from realm_jax.training import finetune
from realm_jax.training import loop
include '{PROJECT_ROOT}/experiments/models/tiny.gin'
include '{PROJECT_ROOT}/experiments/runs/finetune.gin'
realm.ModelConfig.init_checkpoint = '{MODEL_DIR}'
TRAIN_STEPS = 2
BATCH_SIZE = 8
LEARNING_RATE = 1e-3
SEARCHER = 'exact'
DATA = @finetune.OpenQADataConfig()
TASK = @finetune.OpenQAConfig()
finetune.OpenQADataConfig:
  corpus = @corpus_config.CorpusConfig()
  train_questions = '{TRAIN_QUESTIONS}'
  eval_questions = '{DEV_QUESTIONS}'
  questions_format = 'nq_open'
corpus_config.CorpusConfig:
  sources = ('{CORPUS_GLOB}',)
  max_block_length = 64
finetune.OpenQAConfig:
  num_retrieved = 3
  num_read = 2
  query_length = 16
  reader_length = 64
  reader_query_length = 16
finetune.train_and_evaluate:
  index_batch_size = 8
loop.LoopConfig:
  log_every_steps = 1
  checkpoint_every_steps = 1
""")
  return path


def test_finetune_and_predict_on_gcs(bucket, capsys):
  workdir = f"{bucket}/runs/finetune"
  summary = cli.run(["finetune", "--gin_file", _finetune_gin(), "--workdir", workdir])
  assert summary["steps"] == 2
  assert summary["num_blocks"] == 24 and summary["num_train_questions"] == 16
  assert summary["predictions_path"] == f"{workdir}/predictions/eval-step2.jsonl"
  files = _files(workdir)
  for name in ("config.gin", "summary.json", "snapshots/0/manifest.json",
               "predictions/eval-step2.jsonl"):
    assert name in files, (name, files)
  assert any(f.startswith("checkpoints/2/params/") for f in files), files
  _assert_events(workdir, files)
  assert json.loads(fileio.read_text(f"{workdir}/summary.json"))["steps"] == 2
  assert MODEL_DIR in fileio.read_text(f"{workdir}/config.gin")
  preds = [json.loads(line) for line in
           fileio.read_text(f"{workdir}/predictions/eval-step2.jsonl").splitlines()]
  assert len(preds) == 8

  answers = cli.run(["predict", "--workdir", workdir, "When was alpha 0 founded?"])
  assert len(answers) == 1 and answers[0]["top_blocks"]
  assert "Q: When was alpha 0 founded?" in capsys.readouterr().out
  _no_local_gs_folder()


def _index_builder_gin() -> str:
  """An index-builder experiment, itself kept in the bucket (gin reads it through fileio)."""
  path = f"{ROOT}/configs/index_builder.gin"
  fileio.write_atomic(path, f"""
from __gin__ import dynamic_registration
from realm_jax.models import realm
from realm_jax import index_builder
from realm_jax.data import corpus_config
include '{PROJECT_ROOT}/experiments/models/tiny.gin'
include '{PROJECT_ROOT}/experiments/runs/index_builder.gin'
realm.ModelConfig.init_checkpoint = '{MODEL_DIR}'
TRAIN_STEPS = 1
DATA = @corpus_config.CorpusConfig()
corpus_config.CorpusConfig:
  sources = ('{CORPUS_GLOB}',)
  max_block_length = 64
index_builder.run:
  batch_size = 8
  poll_interval_s = 0.2
  max_refreshes = 1
""")
  return path


def test_index_builder_on_gcs(bucket):
  import jax  # pylint: disable=g-import-not-at-top
  from realm_jax.retrieval import snapshot as snapshot_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.training import checkpointing  # pylint: disable=g-import-not-at-top

  workdir = f"{bucket}/runs/index_builder"
  gin_file = _index_builder_gin()
  first = cli.run(["index-builder", "--gin_file", gin_file, "--workdir", workdir])
  assert first["num_blocks"] == 24
  assert [r["params_step"] for r in first["refreshes"]] == [0]  # The first index, from the model.
  assert snapshot_lib.latest_snapshot(f"{workdir}/snapshots") == f"{workdir}/snapshots/0"

  # The trainer's checkpoint at step 1 (its retriever perturbed), then one refresh from it.
  snapshot = snapshot_lib.read_snapshot(f"{workdir}/snapshots/0")
  from realm_jax.models import realm  # pylint: disable=g-import-not-at-top
  cli.parse_gin([gin_file], [])
  model = cli.configured("realm_jax.models.realm", "ModelConfig")()
  params = realm.init_params(model, jax.random.key(0), parts=("retriever",))["retriever"]
  params = jax.tree_util.tree_map(lambda x: np.asarray(x) * 1.5, jax.device_get(params))
  manager = checkpointing.CheckpointManager(checkpointing.checkpoint_dir(workdir),
                                            save_interval_steps=1, async_save=False)
  manager.save(1, {"retriever": params}, {"count": np.asarray(1, np.int32)}, {"data": {}},
               force=True)
  manager.close()
  second = cli.run(["index-builder", "--gin_file", gin_file, "--workdir", workdir])
  assert [r["params_step"] for r in second["refreshes"]] == [1]
  refreshed = snapshot_lib.read_snapshot(f"{workdir}/snapshots/1")
  assert not np.allclose(refreshed.embeddings, snapshot.embeddings)

  files = _files(workdir)
  for name in ("config-index-builder.gin", "index_builder/status.json",
               "index_builder/refreshes.jsonl", "snapshots/0/manifest.json",
               "snapshots/1/manifest.json"):
    assert name in files, (name, files)
  journal = [json.loads(line) for line in
             fileio.read_text(f"{workdir}/index_builder/refreshes.jsonl").splitlines()]
  assert [r["params_step"] for r in journal] == [0, 1]
  _no_local_gs_folder()


def _pretrain_gin() -> str:
  """A tiny REALM pre-training experiment with an inline refresh, kept in the bucket."""
  path = f"{ROOT}/configs/pretrain.gin"
  fileio.write_atomic(path, f"""
from __gin__ import dynamic_registration
from realm_jax.models import realm
from realm_jax.data import corpus_config
from realm_jax.training import pretrain
from realm_jax.training import loop
include '{PROJECT_ROOT}/experiments/models/tiny.gin'
include '{PROJECT_ROOT}/experiments/runs/pretrain.gin'
realm.ModelConfig.init_checkpoint = '{MODEL_DIR}'
TRAIN_STEPS = 3
BATCH_SIZE = 8
LEARNING_RATE = 1e-3
WARMUP_STEPS = 1
INDEX_REFRESH = 'inline'
REFRESH_EVERY_STEPS = 2
SEARCHER = 'exact'
DATA = @pretrain.PretrainDataConfig()
TASK = @pretrain.PretrainConfig()
pretrain.PretrainDataConfig:
  corpus = @corpus_config.CorpusConfig()
  masking = 'random_token'
corpus_config.CorpusConfig:
  sources = ('{CORPUS_GLOB}',)
  max_block_length = 64
pretrain.PretrainConfig:
  num_candidates = 4
  query_length = 16
  candidate_length = 32
  max_masks = 3
pretrain.train:
  index_batch_size = 8
loop.LoopConfig:
  log_every_steps = 1
  checkpoint_every_steps = 2
""")
  return path


def test_pretrain_with_inline_refresh_on_gcs(bucket):
  workdir = f"{bucket}/runs/pretrain"
  summary = cli.run(["pretrain", "--gin_file", _pretrain_gin(), "--workdir", workdir])
  assert [h["step"] for h in summary["history"]] == [1, 2, 3]
  assert summary["num_refreshes"] == 1 and summary["final_snapshot_params_step"] == 2
  files = _files(workdir)
  for name in ("config.gin", "summary.json", "snapshots/0/manifest.json",
               "snapshots/2/manifest.json"):
    assert name in files, (name, files)
  for step in (2, 3):
    assert any(f.startswith(f"checkpoints/{step}/params/") for f in files), (step, files)
  _assert_events(workdir, files)
  assert json.loads(fileio.read_text(f"{workdir}/summary.json"))["num_refreshes"] == 1
  # The blocked corpus is shared in the bucket's TFDS data directory; the pre-training examples
  # (array_record, read through local file handles) are prepared in the local cache instead.
  assert any(f.startswith("tfds/realm_corpus/") and f.endswith("/metadata.json") for f in files), files
  assert not any(f.startswith(("tfds/realm_salient_sentences", "tfds/realm_pretraining_examples"))
                 for f in files), [f for f in files if f.startswith("tfds/")]
  prepared = list((fileio.default_cache_dir() / "tfds" / "realm_pretraining_examples").rglob(
      "dataset_info.json"))
  assert len(prepared) == 1 and "random_token-q16-m3-" in str(prepared[0]), prepared
  _no_local_gs_folder()
