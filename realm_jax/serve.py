"""`realm-jax serve --workdir W`: the `Predictor` over HTTP, with a page to look at the evidence.

REALM's retrieved blocks are the model's interpretable evidence (Guu et al., 2020, §1): this page
shows, for a question, the answer, the retrieved blocks with their p(z|x), and the answer span
highlighted in the block it was read from.

Routes (aiohttp, the `[serve]` extra):
  GET  /              the page (a question box; no external assets)
  GET  /api/info      the loaded run: `Predictor.info()` (work directory, snapshot, step, sizes)
  POST /api/answer    `{"question": str, "top_k": int (optional)}` → `Predictor.answer(question,
                      top_k)` as JSON; 400 with `{"error": …}` on a bad request

Answers are computed one at a time in a worker thread, so the server stays responsive while the
reader runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import socket
from typing import Any, Callable, Sequence

try:
  from aiohttp import web
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError("realm-jax serve needs aiohttp: pip install 'realm-jax[serve]'") from e

from realm_jax import predict as predict_lib

MAX_BODY_BYTES = 64 * 1024  # A question is a few hundred bytes.

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>REALM — answers and evidence</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; max-width: 56rem; margin: 2rem auto;
         padding: 0 1rem; color: #222; }
  form { display: flex; gap: .5rem; align-items: center; }
  #question { flex: 1; padding: .45rem; font-size: 1rem; }
  #top_k { width: 4rem; }
  #answer { font-size: 1.3rem; margin: 1.2rem 0 .2rem; }
  #status { color: #666; min-height: 1.2em; }
  #status.error { color: #b00020; }
  .block { border: 1px solid #ddd; border-radius: 6px; padding: .6rem .8rem; margin: .6rem 0; }
  .block.evidence { border-color: #e0a800; background: #fffbea; }
  .head { display: flex; justify-content: space-between; gap: 1rem; font-weight: 600; }
  .bar { height: 4px; background: #4a7bd0; margin: .3rem 0 .4rem; }
  mark { background: #ffd54f; padding: 0 .1em; }
</style>
</head>
<body>
<h1>REALM: answers and evidence</h1>
<form id="ask" novalidate>
  <input id="question" name="question" placeholder="Ask a question" autocomplete="off" required>
  <label>top k <input id="top_k" name="top_k" type="number" min="1" value="3"></label>
  <button id="submit" type="submit">Answer</button>
</form>
<div id="answer"></div>
<div id="status"></div>
<div id="blocks"></div>
<script>
"use strict";
const form = document.getElementById("ask");
const status = document.getElementById("status");
fetch("api/info").then(r => r.json()).then(info => {
  const k = document.getElementById("top_k");
  k.max = info.num_retrieved;
  k.value = Math.min(info.num_read, info.num_retrieved);
  status.textContent = `${info.num_blocks} blocks; reads the top ${info.num_read} of ` +
                       `${info.num_retrieved} retrieved`;
});
function blockView(b, isEvidence) {
  const div = document.createElement("div");
  div.className = "block" + (isEvidence ? " evidence" : "");
  div.dataset.rank = b.rank;
  const head = document.createElement("div");
  head.className = "head";
  const title = document.createElement("span");
  title.className = "title";
  title.textContent = `[${b.rank + 1}] ${b.title}`;
  const pz = document.createElement("span");
  pz.className = "pz";
  pz.textContent = `p(z|x) = ${b.p_z.toFixed(3)}`;
  head.append(title, pz);
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.style.width = `${(100 * b.p_z).toFixed(1)}%`;
  const text = document.createElement("div");
  text.className = "text";
  if (b.answer_start !== null && b.answer_end !== null) {
    const mark = document.createElement("mark");
    mark.textContent = b.text.slice(b.answer_start, b.answer_end);
    text.append(b.text.slice(0, b.answer_start), mark, b.text.slice(b.answer_end));
  } else {
    text.textContent = b.text;
  }
  div.append(head, bar, text);
  return div;
}
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = document.getElementById("question").value;
  const topK = parseInt(document.getElementById("top_k").value, 10);
  const answer = document.getElementById("answer");
  const blocks = document.getElementById("blocks");
  status.className = "";
  status.textContent = "thinking…";
  try {
    const response = await fetch("api/answer", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({question: question, top_k: topK})});
    const result = await response.json();
    if (!response.ok) throw new Error(result.error || response.statusText);
    answer.textContent = result.prediction || "(no answer)";
    blocks.replaceChildren(...result.top_blocks.map(
        b => blockView(b, b.rank === result.evidence_rank)));
    if (result.evidence && result.evidence_rank >= result.top_blocks.length) {
      blocks.append(blockView(result.evidence, true));  // the evidence ranked below top k
    }
    status.textContent = `score ${result.score.toFixed(2)}; read from block ` +
                         `${result.evidence_rank + 1}`;
  } catch (error) {
    answer.textContent = "";
    blocks.replaceChildren();
    status.className = "error";
    status.textContent = `error: ${error.message}`;
  }
});
</script>
</body>
</html>
"""


def make_app(predictor: predict_lib.Predictor) -> web.Application:
  """The aiohttp application serving `predictor` (routes in the module docstring).

  Args:
    predictor: a loaded `Predictor` (or any object with `answer(question, top_k)` and `info()`).

  Returns:
    The application; its worker thread is shut down on cleanup.
  """
  executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="predictor")

  async def page(request: web.Request) -> web.Response:
    del request
    return web.Response(text=PAGE, content_type="text/html", charset="utf-8")

  async def info(request: web.Request) -> web.Response:
    del request
    return web.json_response(predictor.info())

  async def answer(request: web.Request) -> web.Response:
    try:
      body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
      return _error("the body must be a JSON object")
    if not isinstance(body, dict):
      return _error("the body must be a JSON object")
    question, top_k = body.get("question"), body.get("top_k")
    if not isinstance(question, str):
      return _error("'question' must be a string")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
      return _error("'top_k' must be an integer")
    loop = asyncio.get_running_loop()
    try:
      result = await loop.run_in_executor(executor, predictor.answer, question, top_k)
    except (ValueError, TypeError) as e:
      return _error(str(e))
    return web.json_response(result)

  async def shutdown(app: web.Application) -> None:
    del app
    executor.shutdown(wait=False, cancel_futures=True)

  app = web.Application(client_max_size=MAX_BODY_BYTES)
  app.router.add_get("/", page)
  app.router.add_get("/api/info", info)
  app.router.add_post("/api/answer", answer)
  app.on_cleanup.append(shutdown)
  return app


def _error(message: str, status: int = 400):
  return web.json_response({"error": message}, status=status)


class BindError(OSError):
  """The server's address cannot be bound (e.g. the port is in use)."""


def bind_socket(host: str, port: int) -> socket.socket:
  """A TCP socket bound to `host:port` (port 0: a free port), not yet listening.

  Raises:
    BindError: naming the address, if it cannot be bound.
  """
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except (OSError, OverflowError) as e:  # OverflowError: a port outside 0 … 65535
    sock.close()
    raise BindError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from e
  return sock


def url_of(sock: socket.socket) -> str:
  """`http://HOST:PORT/` of a bound socket."""
  host, port = sock.getsockname()[:2]
  return f"http://[{host}]:{port}/" if sock.family == socket.AF_INET6 else f"http://{host}:{port}/"


async def run_app(app: web.Application, sock: socket.socket,
                  on_ready: Callable[[str], None] | None = None,
                  stop: asyncio.Event | None = None) -> None:
  """Serves `app` on a bound socket until `stop` is set (or the task is cancelled).

  Args:
    app: the application (`make_app`).
    sock: a bound socket (`bind_socket`); closed when serving ends.
    on_ready: called with the base URL (`url_of(sock)`) once the server accepts connections.
    stop: an event that ends serving; default serve until cancelled (Ctrl-C).
  """
  runner = web.AppRunner(app, access_log=None)
  await runner.setup()
  try:
    await web.SockSite(runner, sock).start()
    if on_ready is not None:
      on_ready(url_of(sock))
    await (stop or asyncio.Event()).wait()
  finally:
    await runner.cleanup()
    sock.close()


def serve(workdir: str, host: str = "127.0.0.1", port: int = 8000,
          gin_files: Sequence[str] = (), gin_params: Sequence[str] = (),
          **overrides: Any) -> None:
  """`realm-jax serve`: loads `workdir` once (`Predictor.from_workdir`) and serves it over HTTP.

  The address is bound first (a port in use fails at once), then the run is loaded and the model
  compiled by one warm-up answer; `serving http://HOST:PORT/` is printed when requests are
  answered, and the server runs until interrupted (Ctrl-C).

  Args:
    workdir: the run directory (its `config.gin`, or `gin_files`, configure it).
    host / port: where to listen (port 0: a free port, printed).
    gin_files / gin_params / **overrides: as `Predictor.from_workdir`.

  Raises:
    BindError: if the address cannot be bound.
    FileNotFoundError: if the work directory has no config.gin or snapshot.
  """
  sock = bind_socket(host, port)
  try:
    predictor = predict_lib.Predictor.from_workdir(workdir, gin_files=gin_files,
                                                   gin_params=gin_params, **overrides)
    predictor.warmup()
  except BaseException:
    sock.close()
    raise
  app = make_app(predictor)

  def ready(url: str) -> None:
    logging.info("serving %s on %s", predictor.workdir, url)
    print(f"serving {url}", flush=True)

  try:
    asyncio.run(run_app(app, sock, on_ready=ready))
  except KeyboardInterrupt:
    pass  # Ctrl-C is how a user stops the server: a normal exit, no traceback.
