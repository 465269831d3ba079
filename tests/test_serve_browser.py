"""The prediction page in a real headless browser: Debian's chromium driven by Playwright.

Starts the real entry point (`python -m xraytpu.serve --port=0`) on a tiny
evaluated run, uploads real chest films from ../shared/data through the page's
file chooser, reads the results off the page and compares them with
`xraytpu.predict` (predict_lib.predict_files, what the CLI runs). A second server
with --auth_token_file checks that the page asks for the token once, keeps it in
the tab, sends it on its API calls and asks again when it is refused.

Needs (installed by `make test` / .ci/run; nothing is downloaded from a browser vendor):
  apt-get install -y chromium        (/usr/bin/chromium, or set XRAYTPU_CHROMIUM)
  pip install playwright             (the Python driver only; no `playwright install`)
"""

from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest

from tests._runs import evaluated_copy
from tests._serve_process import ServeProcess

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTALL = ("install Debian's chromium and the Playwright driver: `apt-get install -y chromium` and "
           "`pip install playwright` (no `playwright install`: the system chromium is used)")
START_TIMEOUT = 180  # seconds for the server subprocess to load TensorFlow and the model
PAGE_TIMEOUT = 60_000  # ms for the page to show results


def _chromium() -> str:
  path = os.environ.get("XRAYTPU_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
  if not os.path.isfile(path):
    pytest.fail(f"no chromium at {path}: {INSTALL}")
  return path


def _sync_playwright():
  try:
    from playwright.sync_api import sync_playwright
  except ImportError:
    pytest.fail(f"the playwright Python package is missing: {INSTALL}")
  return sync_playwright


@pytest.fixture(scope="module")
def evaluated_run(trained_run, tmp_path_factory):
  return evaluated_copy(trained_run, tmp_path_factory, "serve_browser")


@pytest.fixture(scope="module")
def server_url(evaluated_run):
  """The real `python -m xraytpu.serve` on 127.0.0.1, any free port; stopped afterwards."""
  with ServeProcess(evaluated_run[0], timeout=START_TIMEOUT) as server:
    assert server.url.startswith("http://127.0.0.1:")
    yield server.url


@pytest.fixture(scope="module")
def browser():
  chromium, sync_playwright = _chromium(), _sync_playwright()
  with sync_playwright() as p:
    b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
    try:
      yield b
    finally:
      b.close()


def test_page_predicts_real_films_like_xraytpu_predict(browser, server_url, evaluated_run, shared_data,
                                                       tmp_path):
  from xraytpu.inference import predict_lib
  from xraytpu.run import rundir
  run_dir, report = evaluated_run
  films = (sorted(glob.glob(str(shared_data / "chest_xray_400x300" / "Normal" / "*.jpeg")))[:1] +
           sorted(glob.glob(str(shared_data / "chest_xray_400x300" / "ViralPneumonia" / "*.jpeg")))[1:2])
  assert len({os.path.basename(f) for f in films}) == 2, f"no chest films under {shared_data}"
  notes = tmp_path / "notes.txt"
  notes.write_text("not an image")

  page = browser.new_page()
  requested = []
  page.on("request", lambda r: requested.append(r.url))
  page.goto(server_url)

  # The model card: name, training data, test AUC with its CI, the threshold policy, the disclaimer.
  page.wait_for_selector("#card-facts:not([hidden])", timeout=PAGE_TIMEOUT)
  assert "xray_cnn" in page.text_content("#model-name")
  assert "train 44" in page.text_content("#training-data")
  auc_text = page.text_content("#test-auc")
  auc, lo, hi = (f"{x:.3f}" for x in (report["auc"], *report["auc_ci"]))   # as report.md prints them
  assert f"AUC {auc} (95% CI {lo}–{hi})" in auc_text and "test" in auc_text
  op = rundir.read_operating_point(run_dir)
  threshold_text = page.text_content("#threshold")
  assert f"{op['threshold']:.4f}" in threshold_text and "youden" in threshold_text and "val" in threshold_text
  assert "Not a diagnostic device" in page.text_content("#disclaimer")

  # Choose the films and a text file with the page's file chooser.
  page.set_input_files("#file-input", films + [str(notes)])
  # (Locators, not wait_for_function: the page's CSP forbids evaluating strings, rightly.)
  page.locator("article.result").nth(2).wait_for(timeout=PAGE_TIMEOUT)
  page.locator('article.result[data-state="pending"]').first.wait_for(state="detached",
                                                                       timeout=PAGE_TIMEOUT)
  assert page.locator("article.result").count() == 3
  shown = {}
  for card in page.query_selector_all("article.result"):
    name = card.get_attribute("data-filename")
    state = card.get_attribute("data-state")
    if state != "done":
      shown[name] = {"state": state, "error": card.query_selector(".error").text_content()}
      continue
    probs = {td.get_attribute("data-class"): float(td.get_attribute("data-value"))
             for td in card.query_selector_all("td.prob")}
    cam = card.query_selector(".gradcam img").get_attribute("src")
    shown[name] = {"state": state, "label": card.query_selector(".label").text_content(), "probs": probs,
                   "summary": card.query_selector(".summary").text_content(), "gradcam": cam}
  assert shown["notes.txt"]["state"] == "error" and "not an image" in shown["notes.txt"]["error"]

  loaded = predict_lib.load(run_dir)
  expected = predict_lib.predict_files(loaded, films)
  for film, want in zip(films, expected):
    got = shown[os.path.basename(film)]
    assert got["state"] == "done"
    assert got["label"] == want.label
    np.testing.assert_allclose([got["probs"][c] for c in loaded.classes],
                               [want.probabilities[c] for c in loaded.classes], atol=1e-6)
    assert got["summary"] == want.line(loaded.classes).split("\t", 1)[1]
    assert got["gradcam"].startswith("data:image/png;base64,")

  # Everything the page loaded came from the server itself (no CDN), or from the page's own data.
  outside = [u for u in requested if not u.startswith((server_url, "data:", "blob:"))]
  assert not outside, outside
  page.close()


TOKEN = "page-token-" + "5e1f" * 6


@pytest.fixture(scope="module")
def locked_url(evaluated_run, tmp_path_factory):
  """The real entry point with --auth_token_file (one token)."""
  tokens = tmp_path_factory.mktemp("page_tokens") / "tokens.txt"
  tokens.write_text(TOKEN + "\n")
  tokens.chmod(0o600)
  with ServeProcess(evaluated_run[0], [f"--auth_token_file={tokens}"], timeout=START_TIMEOUT) as server:
    yield server.url


def _give_token(page, token):
  page.wait_for_selector("#access:not([hidden])", timeout=PAGE_TIMEOUT)
  page.fill("#token-input", token)
  page.click("#token-submit")


def test_a_locked_page_asks_for_the_token_once_and_keeps_it_in_the_tab(browser, locked_url, shared_data):
  film = sorted(glob.glob(str(shared_data / "chest_xray_400x300" / "Normal" / "*.jpeg")))[:1]
  assert film, f"no chest films under {shared_data}"
  context = browser.new_context()
  page = context.new_page()
  sent = []   # (path, Authorization header) of every request the page made
  page.on("request", lambda r: sent.append((r.url[len(locked_url) - 1:], r.headers.get("authorization"))))
  page.goto(locked_url)
  # The page itself loads without a token; its first API call is refused, so it asks.
  assert "needs an access token" in page.text_content("#token-message")
  assert page.is_hidden("#card-facts")
  # A wrong token is refused: the page asks again, saying so.
  _give_token(page, "wrong-token-" + "0" * 16)
  page.wait_for_selector("#access:not([hidden])", timeout=PAGE_TIMEOUT)
  page.locator("#token-message", has_text="refused").wait_for(timeout=PAGE_TIMEOUT)
  _give_token(page, TOKEN)
  page.wait_for_selector("#card-facts:not([hidden])", timeout=PAGE_TIMEOUT)
  assert page.is_hidden("#access") and "xray_cnn" in page.text_content("#model-name")
  # Predictions and the model card go through with the token.
  page.set_input_files("#file-input", film)
  page.locator('article.result[data-state="done"]').first.wait_for(timeout=PAGE_TIMEOUT)
  page.click("#model-card-link")
  page.wait_for_selector("#model-card-text:not([hidden])", timeout=PAGE_TIMEOUT)
  assert "xray_cnn" in page.text_content("#model-card-text")
  api_calls = [(path, auth) for path, auth in sent if path.startswith("/v1/")]
  assert {p for p, _ in api_calls} >= {"/v1/model", "/v1/predict?gradcam=1", "/v1/model_card.md"}
  assert api_calls[-3:] == [(p, f"Bearer {TOKEN}") for p, _ in api_calls[-3:]]
  # The page's own files were fetched without a token.
  assert all(auth is None for path, auth in sent if not path.startswith("/v1/"))
  # Reloaded, the tab still has its token: no question, the card loads at once.
  sent.clear()
  page.reload()
  page.wait_for_selector("#card-facts:not([hidden])", timeout=PAGE_TIMEOUT)
  assert page.is_hidden("#access")
  assert [auth for path, auth in sent if path == "/v1/model"] == [f"Bearer {TOKEN}"]
  # Another tab (a new browsing context) asks again: the token stayed in the first tab.
  other = browser.new_context().new_page()
  other.goto(locked_url)
  other.wait_for_selector("#access:not([hidden])", timeout=PAGE_TIMEOUT)
  other.context.close()
  # Forgetting the token: the next API call asks for it again.
  page.click("#forget-token")
  page.set_input_files("#file-input", film)
  page.wait_for_selector("#access:not([hidden])", timeout=PAGE_TIMEOUT)
  _give_token(page, TOKEN)
  page.locator('article.result[data-state="done"]').first.wait_for(timeout=PAGE_TIMEOUT)   # (the reload cleared the page)
  assert page.locator("article.result").count() == 1
  context.close()
