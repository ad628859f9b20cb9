"""Wikipedia-scale rehearsal on this machine: REALM's route, stage by stage, at growing corpus sizes.

REALM's knowledge corpus is English Wikipedia in 13.35M blocks of ≤ 288 wordpieces (Guu et al., 2020,
§3.4 and §4.2). No TPU or Wikipedia dump is at hand, so this builds a Wikipedia-like corpus of real
sentences — the SQuAD v1.1 paragraphs embedded under `data/` (Wikipedia text), split into sentences,
reshuffled and recombined into titled documents of ~2.4 blocks each (Wikipedia's 13.35M blocks /
~5.5M articles) — and runs it through the project's real code, each stage in its own process so its
peak RSS is its own:

  generate   write the documents as JSON-lines shards (`wiki-00000.jsonl`, …)
  build      `corpus_store.build_corpus` over the glob `wiki-*.jsonl`: read, block, write, fingerprint
  open       `Corpus.open`: memory-map the corpus; then featurise 4,096 random blocks
  embed      the index builder's `embed_snapshot` with the tiny model (experiments/models/tiny.gin,
             randomly initialised, 16-d embeddings) → an embedding snapshot with its ScaNN searcher
  search     load the snapshot and its serialized searcher; queries/s and recall@10 against exact
  swap       an `IndexWatcher` finds the snapshot, loads it off-thread and swaps it in
  finetune   `realm-jax finetune` (tiny model, 4 steps) against the corpus and snapshot
  pretrain   `realm-jax pretrain` (tiny model, 4 steps, an inline index refresh after step 2)

For sizes past `--max_embed_blocks` only the stages that need no embedding run; the searcher stages
at 13.35M × 128 use random embeddings (`benchmarks/searcher_scale.py`).

    .venv/bin/python benchmarks/wikipedia_scale.py --sizes 10000 100000 1000000 \
        --workdir /tmp/wiki_scale --json /tmp/wiki_scale.json --plot docs/wikipedia_scale.png

Prints a Markdown table (wall time, throughput, peak RSS per stage and size).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BLOCKS_PER_DOC = 2.4  # English Wikipedia: 13.35M blocks from ~5.5M articles (REALM §4.2).
DOCS_PER_SHARD = 20_000
STAGES = ("generate", "build", "replicate", "open", "embed", "search", "swap", "finetune",
          "pretrain")


# ----------------------------------------------------------------------------------------------------
# Stages (each runs in a child process: `--_stage NAME --_args JSON`)
# ----------------------------------------------------------------------------------------------------


def _sentences() -> list[str]:
  """Every sentence of the embedded SQuAD paragraphs (dev + 30 train articles), in file order."""
  from realm_jax.data import corpus
  out = []
  for path in corpus.embedded_squad_paths().values():
    with gzip.open(path, "rt", encoding="utf-8") as f:
      squad = json.load(f)
    for article in squad["data"]:
      for paragraph in article["paragraphs"]:
        text = paragraph["context"]
        out.extend(text[a:b] for a, b in corpus.split_sentences(text))
  return out


def stage_generate(a: dict[str, Any]) -> dict[str, Any]:
  """Writes ~`num_blocks` blocks' worth of titled documents, recombined from real sentences."""
  from realm_jax.data import corpus
  rng = np.random.default_rng(a["seed"])
  sentences = _sentences()
  words = sum(len(s.split()) for s in sentences) / len(sentences)
  # ~1.6 wordpieces per word (measured on these sentences); ~270 body wordpieces per block.
  per_doc = max(1, round(BLOCKS_PER_DOC * 270 / (1.6 * words)))
  num_docs = int(a["num_blocks"] / BLOCKS_PER_DOC)
  titles = sorted({s.split(",")[0][:40] for s in sentences[::50]})
  out = pathlib.Path(a["src"])
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  n_bytes = 0
  for shard in range(0, num_docs, DOCS_PER_SHARD):
    path = out / f"wiki-{shard // DOCS_PER_SHARD:05d}.jsonl"
    lines = []
    for k in range(shard, min(num_docs, shard + DOCS_PER_SHARD)):
      n = int(rng.integers(per_doc // 2, per_doc * 3 // 2 + 1))
      picks = rng.integers(0, len(sentences), size=n)
      paragraphs = [" ".join(sentences[i] for i in chunk)
                    for chunk in np.array_split(picks, max(1, n // 5))]
      title = f"{titles[int(rng.integers(len(titles)))]} ({k})"
      lines.append(json.dumps({"id": f"wiki-{k}", "title": title, "text": "\n\n".join(paragraphs)}))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    n_bytes += len(data)
  del corpus
  return {"docs": num_docs, "sentences_per_doc": per_doc, "bytes": n_bytes,
          "seconds": time.perf_counter() - start}


def _tokenizer():
  from realm_jax import tokenization
  return tokenization.WordPieceTokenizer.from_vocab_file(tokenization.minilm_model_dir() / "vocab.txt")


def stage_build(a: dict[str, Any]) -> dict[str, Any]:
  from realm_jax.data import corpus_store
  start = time.perf_counter()
  c = corpus_store.build_corpus(str(pathlib.Path(a["src"]) / "wiki-*.jsonl"), _tokenizer(),
                                a["data_dir"], 288, show_progress=False)
  seconds = time.perf_counter() - start
  metadata = corpus_store.read_metadata(c.directory)
  disk = sum(p.stat().st_size for p in pathlib.Path(c.directory).rglob("*") if p.is_file())
  return {"blocks": len(c), "docs": metadata["num_docs"], "seconds": seconds,
          "blocks_per_s": len(c) / seconds, "disk_bytes": disk, "fingerprint": c.fingerprint,
          "tokens": int(c.lengths.sum())}


def _corpus_dir(a: dict[str, Any], tok) -> Any:
  from realm_jax.data import corpus_store
  if a.get("corpus_dir"):
    return a["corpus_dir"]
  spec = corpus_store.corpus_spec(str(pathlib.Path(a["src"]) / "wiki-*.jsonl"), tok, 288)
  return corpus_store.corpus_directory(a["data_dir"], spec)


def stage_replicate(a: dict[str, Any]) -> dict[str, Any]:
  """A `target_blocks` corpus made of renamed copies of a built corpus's parts (no re-blocking).

  Blocking 13.35M blocks takes hours on 2 cores, so the 13.35M-block corpus reuses the parts of the
  largest corpus built for real: the token, offset, sentence, text and title columns are hard links;
  the doc ids get a `~r<copy>` suffix (new `doc_ids.bin`, `docs.bin` with their hashes), so every
  document stays unique. The fingerprint of the whole corpus is computed as `build_corpus` does and
  `metadata.json` is committed last, so the result is an ordinary corpus for `Corpus.open`.
  """
  from realm_jax.data import corpus_store
  tok = _tokenizer()
  source_dir = pathlib.Path(a["source_corpus_dir"])
  metadata = corpus_store.read_metadata(source_dir)
  out = pathlib.Path(a["corpus_dir"])
  if (out / corpus_store.METADATA_FILE).is_file():
    shutil.rmtree(out)
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  parts, total, copy = [], 0, 0
  while total < a["target_blocks"]:
    for entry in metadata["parts"]:
      if total >= a["target_blocks"]:
        break
      src = source_dir / entry["name"]
      name = corpus_store.part_name(len(parts))
      dst = out / name
      dst.mkdir()
      description = json.loads((src / corpus_store.PART_FILE).read_text())
      for column in ("blocks", "tokens", "offsets", "sentences", "text", "titles"):
        os.link(src / f"{column}.bin", dst / f"{column}.bin")
      docs = np.fromfile(src / "docs.bin", dtype=corpus_store.DOC_DTYPE)
      raw = (src / "doc_ids.bin").read_bytes()
      starts = np.concatenate([[0], docs["id_end"][:-1]])
      suffix = f"~r{copy}".encode()
      new_ids = [raw[b:e] + suffix for b, e in zip(starts, docs["id_end"])]
      docs["id_end"] = np.cumsum([len(x) for x in new_ids])
      docs["id_hash"] = [corpus_store.doc_id_hash(x) for x in new_ids]
      ids_bytes = b"".join(new_ids)
      (dst / "doc_ids.bin").write_bytes(ids_bytes)
      docs.tofile(dst / "docs.bin")
      description["files"]["doc_ids"] = {"bytes": len(ids_bytes),
                                         "sha256": hashlib.sha256(ids_bytes).hexdigest()}
      description["files"]["docs"] = {"bytes": docs.nbytes,
                                      "sha256": hashlib.sha256(docs.tobytes()).hexdigest()}
      (dst / corpus_store.PART_FILE).write_text(json.dumps(description, indent=1, sort_keys=True))
      parts.append({"name": name, "num_blocks": entry["num_blocks"], "num_docs": entry["num_docs"]})
      total += entry["num_blocks"]
    copy += 1
  new = dict(metadata, parts=parts, num_blocks=total,
             num_docs=int(sum(p["num_docs"] for p in parts)), fingerprint=None,
             replicated_from=str(source_dir))
  link_s = time.perf_counter() - start
  c = corpus_store._open_uncommitted(out, new, tok, None)  # pylint: disable=protected-access
  start = time.perf_counter()
  corpus_store._check_unique_doc_ids(c, out)  # pylint: disable=protected-access
  unique_s = time.perf_counter() - start
  start = time.perf_counter()
  new["fingerprint"] = corpus_store.fingerprint_of(
      c, parts=corpus_store.remapped_parts(corpus_store.local_part_dirs(out, new)))
  fingerprint_s = time.perf_counter() - start
  (out / corpus_store.METADATA_FILE).write_text(json.dumps(new, indent=1, sort_keys=True))
  return {"blocks": total, "copies": copy, "link_s": link_s, "unique_check_s": unique_s,
          "fingerprint_s": fingerprint_s, "seconds": link_s + unique_s + fingerprint_s,
          "fingerprint_blocks_per_s": total / fingerprint_s}


def stage_open(a: dict[str, Any]) -> dict[str, Any]:
  from realm_jax.data import corpus_store
  tok = _tokenizer()
  directory = _corpus_dir(a, tok)
  start = time.perf_counter()
  c = corpus_store.Corpus.open(directory, tok)
  open_s = time.perf_counter() - start
  rss_open = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  rng = np.random.default_rng(0)
  rows = rng.integers(0, len(c), size=4096)
  start = time.perf_counter()
  for lo in range(0, len(rows), 32):
    c.retrieval_inputs(rows[lo:lo + 32], pad_to_multiple_of=32)
  featurise_s = time.perf_counter() - start
  start = time.perf_counter()
  found = c.positions_of_doc(c.doc_ids[int(rows[0])])
  doc_index_s = time.perf_counter() - start
  assert int(rows[0]) in found.tolist()
  return {"blocks": len(c), "seconds": open_s, "rss_after_open": rss_open,
          "random_blocks_per_s": len(rows) / featurise_s, "doc_index_s": doc_index_s}


def _tiny_model():
  """experiments/models/tiny.gin, as parsed by the CLI."""
  import gin
  gin.clear_config()
  gin.parse_config_files_and_bindings([str(REPO / "experiments/models/tiny.gin")], [])
  return gin.query_parameter("%MODEL").scoped_configurable_fn()


def stage_embed(a: dict[str, Any]) -> dict[str, Any]:
  import jax
  from realm_jax import index_builder
  from realm_jax import sharding
  from realm_jax.data import corpus_store
  from realm_jax.retrieval import embedding
  tok = _tokenizer()
  c = corpus_store.Corpus.open(_corpus_dir(a, tok), tok)
  model = _tiny_model()
  mesh = sharding.make_mesh(devices=jax.local_devices())
  params = index_builder._initial_retriever_params(model, 0, mesh)  # pylint: disable=protected-access
  start = time.perf_counter()
  result = embedding.embed_snapshot(
      a["snapshots"], c, model.retriever_config(), params, params_step=0, mesh=mesh,
      batch_size=256, blocks_per_shard=65536, overwrite=True, searcher={})
  seconds = time.perf_counter() - start
  return {"blocks": len(c), "seconds": seconds, "blocks_per_s": len(c) / seconds,
          "devices": len(jax.local_devices()), "embed_s": result.embed_s, "searcher_s": result.searcher_s, "commit_s": result.commit_s,
          "dim": model.retriever_config().embedding_dim}


def stage_search(a: dict[str, Any]) -> dict[str, Any]:
  from realm_jax.retrieval import searchers
  from realm_jax.retrieval import snapshot as snapshot_lib
  path = snapshot_lib.latest_snapshot(a["snapshots"])
  start = time.perf_counter()
  snap = snapshot_lib.read_snapshot(path)
  load_s = time.perf_counter() - start
  start = time.perf_counter()
  searcher = searchers.searcher_from_snapshot(snap, kind="scann")
  searcher_load_s = time.perf_counter() - start
  rng = np.random.default_rng(1)
  emb = np.asarray(snap.embeddings)
  queries = emb[rng.integers(0, len(emb), size=1000)] + rng.normal(
      0, emb.std(), size=(1000, emb.shape[1])).astype(np.float32)
  start = time.perf_counter()
  _, got = searcher.search(queries, 10)
  qps = len(queries) / (time.perf_counter() - start)
  start = time.perf_counter()  # numpy reference, 100 queries at a time (scores stay ~0.4 GB at 1M)
  exact = np.concatenate([np.argpartition(-(chunk @ emb.T), 10, axis=1)[:, :10]
                          for chunk in np.split(queries, 10)])
  exact_qps = len(queries) / (time.perf_counter() - start)
  exact_ids = np.asarray(snap.block_ids)[exact]
  recall = np.mean([len(set(g.tolist()) & set(e.tolist())) / 10 for g, e in zip(got, exact_ids)])
  return {"blocks": len(emb), "snapshot_load_s": load_s, "searcher_load_s": searcher_load_s,
          "qps": qps, "exact_numpy_qps": exact_qps, "recall_at_10": float(recall)}


def stage_swap(a: dict[str, Any]) -> dict[str, Any]:
  from realm_jax.retrieval import searchers
  from realm_jax.retrieval import snapshot as snapshot_lib
  from realm_jax.retrieval import watcher as watcher_lib
  path = snapshot_lib.latest_snapshot(a["snapshots"])
  fingerprint = snapshot_lib.read_manifest(path)["corpus_fingerprint"]
  start = time.perf_counter()
  w = watcher_lib.IndexWatcher(a["snapshots"], fingerprint,
                               lambda snap: searchers.searcher_from_snapshot(snap, kind="scann"),
                               poll_interval_s=0.2, max_index_staleness_steps=None,
                               wait_timeout_s=3600)
  try:
    live = w.before_step(0)  # blocks until the snapshot is loaded, then swaps it in
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    w.before_step(1)
    step_overhead_s = time.perf_counter() - start
  finally:
    w.close()
  return {"seconds": seconds, "params_step": live.params_step, "before_step_s": step_overhead_s}


def _cli(args: list[str]) -> dict[str, Any]:
  start = time.perf_counter()
  proc = subprocess.run([str(pathlib.Path(sys.executable).parent / "realm-jax"), *args],
                        capture_output=True, text=True, cwd=REPO, check=False)
  if proc.returncode:
    raise RuntimeError(f"realm-jax {args[0]} failed:\n{proc.stderr[-3000:]}")
  return {"seconds": time.perf_counter() - start}


_FINETUNE_GIN = """
from __gin__ import dynamic_registration
from realm_jax.data import corpus_config
from realm_jax.training import finetune
from realm_jax.training import loop
include 'experiments/models/tiny.gin'
include 'experiments/runs/finetune.gin'
TRAIN_STEPS = 4
BATCH_SIZE = 2
LEARNING_RATE = 1e-4
DATA = @finetune.OpenQADataConfig()
TASK = @finetune.OpenQAConfig()
finetune.OpenQADataConfig:
  corpus = @corpus_config.CorpusConfig()
  questions_format = 'squad_open'
  max_eval_questions = 16
corpus_config.CorpusConfig:
  sources = ['{glob}']
  data_dir = '{data_dir}'
  max_block_length = 288
finetune.OpenQAConfig:
  num_retrieved = 20
  num_read = 2
  query_length = 32
  reader_length = 320
  reader_query_length = 32
finetune.train_and_evaluate:
  eval_batch_size = 8
  index_batch_size = 256
loop.LoopConfig:
  checkpoint_every_steps = 4
"""

_PRETRAIN_GIN = """
from __gin__ import dynamic_registration
from realm_jax.data import corpus_config
from realm_jax.training import pretrain
from realm_jax.training import loop
include 'experiments/models/tiny.gin'
include 'experiments/runs/pretrain.gin'
TRAIN_STEPS = 3
BATCH_SIZE = 2
LEARNING_RATE = 1e-4
WARMUP_STEPS = 1
DATA = @pretrain.PretrainDataConfig()
TASK = @pretrain.PretrainConfig()
INDEX_REFRESH = '{refresh}'
REFRESH_EVERY_STEPS = 2
pretrain.PretrainDataConfig:
  corpus = @corpus_config.CorpusConfig()
  pretraining_sources = ['{text}']
  masking = 'salient'
corpus_config.CorpusConfig:
  sources = ['{glob}']
  data_dir = '{data_dir}'
  max_block_length = 288
pretrain.PretrainConfig:
  num_candidates = 4
  query_length = 32
  candidate_length = 288
  max_masks = 10
pretrain.train:
  index_batch_size = 256
loop.LoopConfig:
  log_every_steps = 1
  checkpoint_every_steps = 2
"""


def stage_finetune(a: dict[str, Any]) -> dict[str, Any]:
  """`realm-jax finetune` against the corpus; the first index is the `embed` stage's snapshot."""
  gin_file = pathlib.Path(a["src"]).parent / "finetune_tiny.gin"
  gin_file.write_text(_FINETUNE_GIN.format(glob=pathlib.Path(a["src"]) / "wiki-*.jsonl",
                                           data_dir=a["data_dir"]))
  out = _cli(["finetune", "--gin_file", str(gin_file), "--workdir", a["trainer_workdir"]])
  summary = json.loads((pathlib.Path(a["trainer_workdir"]) / "summary.json").read_text())
  timings = summary.get("timings", summary)
  out.update({k: float(v) for k, v in timings.items()
              if k.endswith("_s") and isinstance(v, (int, float))})
  return out


def stage_pretrain(a: dict[str, Any]) -> dict[str, Any]:
  """`realm-jax pretrain`: 3 steps, one inline refresh (re-embeds the whole corpus) after step 2.

  The first index is the `embed` stage's snapshot (linked into the work directory). Salient spans
  are found in a 200-document text (`pretraining_sources`), not in the whole knowledge corpus.
  """
  src = pathlib.Path(a["src"])
  text = src.parent / "pretraining_text.jsonl"
  first = sorted(src.glob("wiki-*.jsonl"))[0].read_text().splitlines()[:200]
  text.write_text("\n".join(first) + "\n")
  workdir = pathlib.Path(a["pretrain_workdir"])
  (workdir / "snapshots").mkdir(parents=True, exist_ok=True)
  first_index = workdir / "snapshots" / "0"
  if not first_index.exists():
    os.symlink(pathlib.Path(a["snapshots"]) / "0", first_index)
  gin_file = src.parent / "pretrain_tiny.gin"
  gin_file.write_text(_PRETRAIN_GIN.format(glob=src / "wiki-*.jsonl", text=text,
                                           data_dir=a["data_dir"],
                                           refresh="inline" if a.get("pretrain_refresh", True)
                                           else "none"))
  out = _cli(["pretrain", "--gin_file", str(gin_file), "--workdir", str(workdir)])
  out["refresh"] = "inline" if a.get("pretrain_refresh", True) else "none"
  summary = json.loads((workdir / "summary.json").read_text())
  timings = summary.get("timings", summary)
  out.update({k: float(v) for k, v in timings.items()
              if k.endswith("_s") and isinstance(v, (int, float))})
  return out


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------


def run_stage(name: str, args: dict[str, Any], log: pathlib.Path) -> dict[str, Any]:
  """Runs one stage in a child process; adds its wall time and peak RSS (bytes).

  The embedding stage sees one XLA CPU device per core (`args["devices"]`), so the index builder
  embeds data-parallel on every core, as it does on every chip of a TPU slice.
  """
  env = dict(os.environ, PYTHONPATH=str(REPO))
  if name == "embed":
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args['devices']}"
  start = time.perf_counter()
  with open(log, "a") as f:
    proc = subprocess.Popen([sys.executable, __file__, "--_stage", name, "--_args", json.dumps(args)],
                            stdout=subprocess.PIPE, stderr=f, text=True, env=env)
    out, _ = proc.communicate()
  wall = time.perf_counter() - start
  if proc.returncode:
    return {"error": f"exit {proc.returncode} (see {log})", "wall_s": wall}
  result = json.loads(out.strip().splitlines()[-1])
  result["wall_s"] = wall
  result["peak_rss"] = result.pop("_peak_rss")
  return result


def _child(name: str, args: dict[str, Any]) -> None:
  result = globals()[f"stage_{name}"](args)
  # ru_maxrss of this process and of the children it waited for (the CLI stages), in bytes.
  rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024
  result["_peak_rss"] = rss
  print(json.dumps(result))


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f}"


def markdown(results: dict[str, dict[str, Any]]) -> str:
  """The per-stage table: wall time, throughput, peak RSS."""
  rows = ["| blocks | stage | wall s | throughput | peak RSS GiB | notes |",
          "|---|---|---|---|---|---|"]
  for size, stages in results.items():
    for stage, r in stages.items():
      if "error" in r:
        rows.append(f"| {int(size):,} | {stage} | {r['wall_s']:.1f} | — | — | {r['error']} |")
        continue
      thr, notes = "", ""
      if stage == "generate":
        notes = f"{r['docs']:,} docs, {r['bytes'] / 2**20:.0f} MiB JSONL"
      elif stage == "build":
        thr = f"{r['blocks_per_s']:,.0f} blocks/s"
        notes = f"{r['blocks']:,} blocks, {r['disk_bytes'] / 2**30:.2f} GiB on disk"
      elif stage == "replicate":
        thr = f"{r['fingerprint_blocks_per_s']:,.0f} blocks/s fingerprinted"
        notes = (f"{r['blocks']:,} blocks = {r['copies']} renamed copies of the largest built "
                 f"corpus; links {r['link_s']:.0f} s, doc-id check {r['unique_check_s']:.1f} s, "
                 f"fingerprint {r['fingerprint_s']:.0f} s")
      elif stage == "open":
        thr = f"{r['random_blocks_per_s']:,.0f} random blocks/s featurised"
        notes = f"open {r['seconds']:.2f} s, RSS after open {_gib(r['rss_after_open'])} GiB"
      elif stage == "embed":
        thr = f"{r['blocks_per_s']:,.0f} blocks/s"
        notes = (f"{r.get('devices', 1)} CPU device(s); ScaNN build + serialize "
                 f"{r['searcher_s']:.1f} s; dim {r['dim']}")
      elif stage == "search":
        thr = f"{r['qps']:,.0f} q/s (exact numpy {r['exact_numpy_qps']:,.0f})"
        notes = (f"recall@10 {r['recall_at_10']:.3f}; snapshot load {r['snapshot_load_s']:.2f} s, "
                 f"searcher load {r['searcher_load_s']:.2f} s")
      elif stage == "swap":
        notes = f"found → live {r['seconds']:.2f} s; before_step after {r['before_step_s'] * 1e3:.2f} ms"
      elif stage in ("finetune", "pretrain"):
        notes = ("no refresh; " if r.get("refresh") == "none" else "") + ", ".join(f"{k} {v:.1f}" for k, v in r.items()
                          if k.endswith("_s") and k not in ("wall_s",) and isinstance(v, float))
      rows.append(f"| {int(size):,} | {stage} | {r['wall_s']:.1f} | {thr} | {_gib(r['peak_rss'])} | "
                  f"{notes} |")
  return "\n".join(rows)


def plot(results: dict[str, dict[str, Any]], path: pathlib.Path) -> None:
  """Wall time and peak RSS of each stage against corpus size (log-log)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
  for stage in STAGES:
    pts = [(int(s), r[stage]) for s, r in results.items() if stage in r and "error" not in r[stage]]
    if len(pts) < 1:
      continue
    xs = [p[0] for p in pts]
    ax_t.plot(xs, [p[1]["wall_s"] for p in pts], "o-", label=stage)
    ax_m.plot(xs, [p[1]["peak_rss"] / 2**30 for p in pts], "o-", label=stage)
  for ax, label in ((ax_t, "wall time (s)"), (ax_m, "peak RSS (GiB)")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("corpus blocks")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
  ax_t.legend(fontsize=7)
  fig.suptitle("realm_jax on 2 CPU cores: cost per stage against corpus size")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
  parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
  parser.add_argument("--max_embed_blocks", type=int, default=1_000_000,
                      help="sizes above this run only the stages that need no embedding")
  parser.add_argument("--workdir", default="/tmp/realm_wikipedia_scale")
  parser.add_argument("--json", default=None)
  parser.add_argument("--plot", default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--devices", type=int, default=os.cpu_count(),
                      help="XLA CPU devices of the embedding stage (default: one per core)")
  parser.add_argument("--pretrain_refresh_max_blocks", type=int, default=100_000,
                      help="larger corpora run the pre-training steps without the inline refresh "
                           "(a refresh re-embeds the corpus: the embed stage's cost again)")
  parser.add_argument("--replicate_from", type=int, default=None,
                      help="sizes above this one are made by the `replicate` stage from the corpus "
                           "built at this size (e.g. 1000000) instead of generate + build")
  parser.add_argument("--_stage", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--_args", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._stage:  # pylint: disable=protected-access
    _child(args._stage, json.loads(args._args))  # pylint: disable=protected-access
    return
  root = pathlib.Path(args.workdir)
  root.mkdir(parents=True, exist_ok=True)
  log = root / "stages.log"
  results: dict[str, dict[str, Any]] = {}
  if args.json and pathlib.Path(args.json).is_file():
    results = json.loads(pathlib.Path(args.json).read_text())
  for size in args.sizes:
    base = root / f"n{size}"
    stage_args = {"num_blocks": size, "seed": args.seed, "src": str(base / "src"),
                  "devices": args.devices,
                  "pretrain_refresh": size <= args.pretrain_refresh_max_blocks,
                  "data_dir": str(base / "data"), "snapshots": str(base / "trainer" / "snapshots"),
                  "trainer_workdir": str(base / "trainer"), "pretrain_workdir": str(base / "pretrain")}
    replicated = args.replicate_from is not None and size > args.replicate_from
    if replicated:
      source = root / f"n{args.replicate_from}"
      (name,) = [p.name for p in (source / "data" / "realm_corpus").iterdir() if p.name != "specs"]
      stage_args["source_corpus_dir"] = str(source / "data" / "realm_corpus" / name)
      stage_args["corpus_dir"] = str(base / "data" / "realm_corpus" / f"replica{size}")
      stage_args["target_blocks"] = size
    for stage in args.stages:
      if size > args.max_embed_blocks and stage not in ("generate", "build", "replicate", "open"):
        continue
      if (stage == "replicate") != replicated and stage in ("generate", "build", "replicate"):
        continue
      print(f"[{time.strftime('%H:%M:%S')}] {size:,} blocks: {stage} …", flush=True)
      result = run_stage(stage, stage_args, log)
      results.setdefault(str(size), {})[stage] = result
      print(f"    {json.dumps(result)}", flush=True)
      if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
  print(markdown(results))
  if args.plot:
    plot(results, pathlib.Path(args.plot))


if __name__ == "__main__":
  main()
