"""`realm-jax serve`: the JSON endpoint through a real HTTP client, the page in a real browser.

The server is the console command in a subprocess (`python -m realm_jax.cli serve --port 0`) over
the tiny work directory of tests/test_predictor.py (`tiny_run`, made once per session). The browser
test drives Debian's `chromium` with Playwright; without that package it is skipped.
"""

import concurrent.futures
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from test_predictor import tiny_run  # pylint: disable=g-bad-import-order

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUESTION = "Where is the Vistula?"
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/lib/chromium/chromium")


def _cli(*args: str, **kwargs) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "realm_jax.cli", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  """`realm-jax serve --workdir W --port 0` running; yields its base URL."""
  workdir = tiny_run(tmp_path_factory)
  proc = _cli("serve", "--workdir", workdir, "--host", "127.0.0.1", "--port", "0")
  stderr: list[str] = []
  threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
  lines: list[str] = []
  reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
  reader.start()
  reader.join(timeout=300)  # loads the run and compiles the model first
  if not lines or not lines[0].startswith("serving http://"):
    proc.kill()
    pytest.fail(f"the server did not start: {lines} {''.join(stderr)[-3000:]}")
  yield lines[0].split()[1]
  proc.terminate()
  proc.wait(timeout=30)


def _get(url: str) -> tuple[int, str, str]:
  try:
    with urllib.request.urlopen(url, timeout=60) as r:
      return r.status, r.headers.get_content_type(), r.read().decode("utf-8")
  except urllib.error.HTTPError as e:
    return e.code, e.headers.get_content_type(), e.read().decode("utf-8")


def _post(url: str, body: bytes | dict) -> tuple[int, dict]:
  data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
  request = urllib.request.Request(url, data=data, method="POST",
                                   headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=60) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_info_and_answer_endpoint(server):
  status, kind, body = _get(server + "api/info")
  assert status == 200 and kind == "application/json"
  info = json.loads(body)
  assert info["num_blocks"] == 10 and info["num_retrieved"] == 3 and info["num_read"] == 2
  assert info["params_step"] == 1 and info["searcher"] == "exact"

  status, a = _post(server + "api/answer", {"question": QUESTION, "top_k": 3})
  assert status == 200
  assert a["question"] == QUESTION and [b["rank"] for b in a["top_blocks"]] == [0, 1, 2]
  assert sum(b["p_z"] for b in a["top_blocks"]) == pytest.approx(1.0, abs=1e-5)
  ev = a["evidence"]
  assert a["prediction"] and ev["text"][ev["answer_start"]:ev["answer_end"]] == a["prediction"]
  assert a["top_blocks"][a["evidence_rank"]] == ev
  status, default = _post(server + "api/answer", {"question": QUESTION})
  assert status == 200 and len(default["top_blocks"]) == 2  # num_read
  assert default["prediction"] == a["prediction"] and default["evidence"] == ev


def test_concurrent_requests_get_the_same_answer(server):
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(lambda _: _post(server + "api/answer", {"question": QUESTION}),
                            range(4)))
  assert all(status == 200 for status, _ in results)
  assert all(r == results[0][1] for _, r in results)


@pytest.mark.parametrize("body, message", [
    (b"not json", "the body must be a JSON object"),
    (["a list"], "the body must be a JSON object"),
    ({"top_k": 1}, "'question' must be a string"),
    ({"question": 3}, "'question' must be a string"),
    ({"question": "  "}, "question 0 is blank"),
    ({"question": "ok", "top_k": "2"}, "'top_k' must be an integer"),
    ({"question": "ok", "top_k": True}, "'top_k' must be an integer"),
    ({"question": "ok", "top_k": 4}, "top_k must be an integer in 1 … 3"),
])
def test_bad_requests_are_400_with_a_message(server, body, message):
  status, answer = _post(server + "api/answer", body)
  assert status == 400 and message in answer["error"], answer


def test_routes(server):
  status, kind, page = _get(server)
  assert status == 200 and kind == "text/html"
  assert '<input id="question"' in page and "p(z|x)" in page
  assert _get(server + "nope")[0] == 404
  assert _get(server + "api/answer")[0] == 405


def test_port_in_use_is_a_one_line_error(server):
  port = server.rstrip("/").rsplit(":", 1)[1]
  start = time.monotonic()
  proc = _cli("serve", "--workdir", "unused", "--gin_file", "tests/fixtures/gin/tiny_finetune.gin",
              "--port", port)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 2, err[-2000:]
  assert err.strip().splitlines()[-1] == (f"realm-jax: error: cannot listen on 127.0.0.1:{port}: "
                                          "Address already in use")
  assert "Traceback" not in err and not out
  assert time.monotonic() - start < 60  # refused before the run is loaded


def _chromium() -> str | None:
  for path in (shutil.which("chromium"), *CHROMIUM_PATHS):
    if path and os.access(path, os.X_OK):
      return path
  return None


def test_page_in_a_headless_browser(server):
  sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra's playwright")
  executable = _chromium()
  if executable is None:
    pytest.skip("no browser: install Debian's `chromium` package (apt-get install chromium)")
  _, expected = _post(server + "api/answer", {"question": QUESTION, "top_k": 3})
  with sync_api.sync_playwright() as pw:
    browser = pw.chromium.launch(executable_path=executable, headless=True,
                                 args=["--no-sandbox", "--disable-gpu"])
    try:
      page = browser.new_page()
      errors: list[str] = []
      page.on("pageerror", lambda e: errors.append(str(e)))
      page.goto(server)
      sync_api.expect(page.locator("#status")).to_contain_text("10 blocks")
      assert page.input_value("#top_k") == "2"  # num_read, from /api/info
      page.fill("#question", QUESTION)
      page.fill("#top_k", "3")
      page.click("#submit")
      blocks = page.locator("#blocks .block")
      sync_api.expect(blocks).to_have_count(3)
      assert page.text_content("#answer") == expected["prediction"]
      for i, b in enumerate(expected["top_blocks"]):
        block = blocks.nth(i)
        assert block.locator(".title").text_content() == f"[{i + 1}] {b['title']}"
        assert block.locator(".pz").text_content() == f"p(z|x) = {b['p_z']:.3f}"
        assert block.locator(".text").text_content() == b["text"]
      # The answer span is highlighted in the evidence block, and only there.
      marks = page.locator("#blocks mark")
      sync_api.expect(marks).to_have_count(1)
      assert marks.text_content() == expected["prediction"]
      evidence = page.locator("#blocks .block.evidence")
      assert evidence.get_attribute("data-rank") == str(expected["evidence_rank"])
      assert evidence.locator("mark").count() == 1
      # A bad request shows the server's message.
      page.fill("#top_k", "7")
      page.click("#submit")
      sync_api.expect(page.locator("#status")).to_contain_text("top_k must be an integer")
      assert blocks.count() == 0 and page.text_content("#answer") == ""
      assert not errors
    finally:
      browser.close()
