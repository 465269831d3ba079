"""xraytpu.serve: the JSON API against xraytpu.predict, every bad input, batching under load."""

from __future__ import annotations

import base64
import concurrent.futures
import datetime
import glob
import http.client
import io
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import zlib

import numpy as np
import pytest
from PIL import Image

from tests._runs import copy_run, evaluated_copy
from tests._serve_process import ServeProcess
from xraytpu.run import model_card

from xraytpu.inference import predict_lib
from xraytpu.serving import auth, batching, http_api, tf_serving
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 60  # seconds, per HTTP request


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated_run(trained_run, tmp_path_factory):
  """A private copy of the shared tiny run, evaluated: threshold.json (youden on val) + test report."""
  return evaluated_copy(trained_run, tmp_path_factory, "serve")


@pytest.fixture(scope="module")
def loaded(evaluated_run):
  return predict_lib.load(evaluated_run[0])


@pytest.fixture(scope="module")
def server(evaluated_run, loaded):
  opts = http_api.ServeOptions(model_dir=evaluated_run[0], host="127.0.0.1", port=0, max_upload_mb=1,
                                max_files=3, max_pixels=1_000_000, batch_timeout_ms=20, max_batch=8,
                                access_log=False)
  srv = http_api.make_server(opts, run=loaded)
  http_api.start_in_thread(srv)
  yield srv
  srv.close()


@pytest.fixture(scope="module")
def demo_files(demo_data_dir):
  from tfrecord_tools import schema
  root = schema.read_manifest(demo_data_dir)["args"]["input_dir"]
  return sorted(glob.glob(os.path.join(root, "test", "*", "*.png")))


@pytest.fixture(scope="module")
def real_files(shared_data):
  """Two real chest films (grayscale JPEG) and one CT slice PNG (often RGBA) from ../shared/data."""
  xray = sorted(glob.glob(str(shared_data / "chest_xray_400x300" / "Normal" / "*.jpeg")))[:1]
  xray += sorted(glob.glob(str(shared_data / "chest_xray_400x300" / "BacterialPneumonia" / "*.jpeg")))[:1]
  ct = sorted(glob.glob(str(shared_data / "covid_ct" / "test" / "COVID" / "*.png")))[:1]
  files = xray + ct
  assert len(files) == 3, f"expected real images under {shared_data}"
  return files


# -- a small HTTP client -------------------------------------------------------


def _request(srv, method, path, body=b"", headers=None, context=None):
  """-> (status, parsed JSON or raw bytes, response headers). context: an ssl.SSLContext (HTTPS)."""
  host, port = srv.server_address[:2]
  if context is not None:
    conn = http.client.HTTPSConnection(host, port, timeout=TIMEOUT, context=context)
  else:
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
  try:
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, (json.loads(data) if ctype.startswith("application/json") else data), resp
  finally:
    conn.close()


def _multipart(files, extra_fields=()):
  """[(filename, bytes)] -> (body, content type) as a browser's FormData sends them."""
  boundary = "----xraytpu" + uuid.uuid4().hex
  out = io.BytesIO()
  for name, data in files:
    out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
              "Content-Type: application/octet-stream\r\n\r\n".encode())
    out.write(data + b"\r\n")
  for name, value in extra_fields:
    out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode())
  out.write(f"--{boundary}--\r\n".encode())
  return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def _post_files(srv, files, query=""):
  body, ctype = _multipart(files)
  return _request(srv, "POST", "/v1/predict" + query, body, {"Content-Type": ctype})


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _png_header_only(width, height):
  """A PNG that declares width x height but holds no pixel data (decoding it would fail)."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _probs(prediction, classes):
  return np.array([prediction["probabilities"][c] for c in classes])


# -- the API -------------------------------------------------------------------


def test_health_and_model_card(server, evaluated_run, loaded):
  _, report = evaluated_run
  status, health, _ = _request(server, "GET", "/healthz")
  assert status == 200 and health["status"] == "ok" and health["model"] == "xray_cnn"
  status, card, _ = _request(server, "GET", "/v1/model")
  assert status == 200
  # The model card as a file: the text evaluate wrote into the run, served as Markdown.
  status, text, resp = _request(server, "GET", "/v1/model_card.md")
  assert status == 200 and resp.getheader("Content-Type").startswith("text/markdown")
  assert text.decode() == card["model_card_md"] == open(
      os.path.join(evaluated_run[0], "MODEL_CARD.md"), encoding="utf-8").read()
  op = json.load(open(os.path.join(evaluated_run[0], "threshold.json")))
  assert card["classes"] == ["NORMAL", "PNEUMONIA"] and card["positive_class"] == "PNEUMONIA"
  assert card["input"] == {"size": 32, "channels": 1, "aspect": "squash", "dtype": "uint8",
                           "pixel_contract": 5}
  assert card["threshold"] == op["threshold"] == loaded.threshold
  assert card["threshold_policy"] == op["policy"] == "youden"
  assert card["threshold_source_split"] == "val"
  assert card["training_data"]["splits"]["train"]["num_examples"] == 44
  ev = card["evaluation"]
  assert ev["split"] == "test" and ev["num_examples"] == 8 and not ev["stale"]
  assert ev["auc"] == report["auc"] and ev["auc_ci"] == report["auc_ci"]
  assert "AUC" in ev["headline"]
  assert "Not a diagnostic device" in card["disclaimer"]
  assert card["limits"] == {"max_upload_mb": 1, "max_files": 3, "max_pixels": 1_000_000}


def test_page_and_static_files_are_served_with_a_strict_policy(server):
  status, html, resp = _request(server, "GET", "/")
  assert status == 200 and b"Not a diagnostic device" in html
  csp = resp.getheader("Content-Security-Policy")
  assert "script-src 'self'" in csp and "default-src 'none'" in csp
  for path in ("/static/app.js", "/static/style.css"):
    status, body, _ = _request(server, "GET", path)
    assert status == 200 and body
  # Nothing else is reachable, whatever the path says.
  for path in ("/static/../http_api.py", "/static/%2e%2e/http_api.py", "/static/index.html",
               "//etc/passwd", "/static/app.js/../../serve.py"):
    status, body, _ = _request(server, "GET", path)
    assert status == 404, path
    assert "error" in body


def test_results_equal_xraytpu_predict(server, loaded, demo_files, real_files, tmp_path):
  """Multipart, several files: the same probabilities, label and threshold as predict_lib (the CLI's code)."""
  files = demo_files[:2] + real_files
  expected = predict_lib.predict_files(loaded, files, gradcam_dir=str(tmp_path))
  assert all(r.error is None for r in expected)
  body, ctype = _multipart([(os.path.basename(f), _read(f)) for f in files[:3]])
  status, out, _ = _request(server, "POST", "/v1/predict?gradcam=1", body, {"Content-Type": ctype})
  assert status == 200, out
  status2, out2, _ = _post_files(server, [(os.path.basename(f), _read(f)) for f in files[3:]], "?gradcam=1")
  assert status2 == 200, out2
  got = out["predictions"] + out2["predictions"]
  assert [p["filename"] for p in got] == [os.path.basename(f) for f in files]
  assert out["threshold"] == loaded.threshold and out["threshold_policy"] == "youden"
  for p, r in zip(got, expected):
    np.testing.assert_allclose(_probs(p, loaded.classes), [r.probabilities[c] for c in loaded.classes],
                               atol=1e-6)
    assert p["label"] == r.label and p["threshold"] == r.threshold == loaded.threshold
    assert p["summary"] == r.line(loaded.classes).split("\t", 1)[1]
    # Grad-CAM: the overlay `xraytpu.predict --gradcam` writes (upscaled to 256 px).
    cam = np.asarray(Image.open(io.BytesIO(base64.b64decode(p["gradcam_png_base64"]))))
    want = np.asarray(Image.open(r.gradcam))
    assert cam.shape == want.shape == (256, 256, 3)
    assert np.abs(cam.astype(int) - want.astype(int)).max() <= 2


def test_raw_body_equals_multipart(server, real_files):
  data = _read(real_files[0])
  status, raw, _ = _request(server, "POST", "/v1/predict", data, {"Content-Type": "image/jpeg"})
  assert status == 200 and len(raw["predictions"]) == 1 and "gradcam_png_base64" not in raw["predictions"][0]
  status, form, _ = _post_files(server, [("a.jpeg", data)])
  assert status == 200
  assert raw["predictions"][0]["probabilities"] == pytest.approx(form["predictions"][0]["probabilities"],
                                                                 abs=1e-6)


def _bad_requests(real_files):
  """(what, method, path, body, headers, expected status, words in the message)."""
  jpeg = _read(real_files[0])
  good = ("good.jpeg", jpeg)
  cases = []

  def form(name, files, status, words, query=""):
    body, ctype = _multipart(files)
    cases.append((name, "POST", "/v1/predict" + query, body, {"Content-Type": ctype}, status, words))

  def raw(name, body, status, words, headers=None):
    cases.append((name, "POST", "/v1/predict", body, {"Content-Type": "image/png", **(headers or {})},
                  status, words))

  raw("not an image", b"hello, this is text", 415, ["not an image"])
  raw("corrupt png", b"\x89PNG\r\n\x1a\n not really a png", 415, ["not an image"])
  raw("truncated jpeg", jpeg[:len(jpeg) // 2], 400, ["truncated"])
  raw("truncated jpeg header", jpeg[:40], 400, ["truncated"])
  raw("empty body", b"", 400, ["empty"])
  # A header that promises 3000x3000 pixels and holds none: refused from the header (413), not
  # discovered at decoding (which would be a 400 "truncated").
  raw("decompression bomb", _png_header_only(3000, 3000), 413, ["3000x3000", "max_pixels"])
  raw("bomb past PIL's own limit", _png_header_only(20000, 20000), 413, ["too large"])
  form("too many files", [good] * 4, 413, ["more than 3 files", "max_files"])
  form("one bad file among good ones", [good, ("notes.txt", b"text")], 415,
       ["file 2 of 2", "notes.txt", "not an image"])
  form("no files", [], 400, ["no files"])
  body, ctype = _multipart([good])
  cases.append(("multipart without closing boundary", "POST", "/v1/predict", body[:-30],
                {"Content-Type": ctype}, 400, ["closing boundary"]))
  cases.append(("multipart without boundary", "POST", "/v1/predict", body,
                {"Content-Type": "multipart/form-data"}, 400, ["boundary"]))
  body, ctype = _multipart([good], extra_fields=[("gradcam", "1")])
  cases.append(("form field that is not a file", "POST", "/v1/predict", body,
                {"Content-Type": ctype}, 400, ["'gradcam' is not a file"]))
  form("unknown query parameter", [good], 400, ["unknown query parameter 'path'"], "?path=/etc/passwd")
  form("bad gradcam value", [good], 400, ["gradcam"], "?gradcam=maybe")
  form("bad window", [good], 400, ["window"], "?window=wide")
  form("bad dicom_window", [good], 400, ["dicom_window='wide'"], "?dicom_window=wide")
  cases.append(("GET on predict", "GET", "/v1/predict", b"", {}, 405, ["POST"]))
  cases.append(("PUT", "PUT", "/v1/predict", b"x", {}, 405, ["not supported"]))
  cases.append(("unknown endpoint", "POST", "/v1/train", b"x", {}, 404, ["no such endpoint"]))
  return cases


def test_bad_inputs_get_a_clear_4xx(server, real_files):
  failures = []
  for name, method, path, body, headers, want, words in _bad_requests(real_files):
    status, out, _ = _request(server, method, path, body, headers)
    message = out.get("error", "") if isinstance(out, dict) else ""
    if status != want or not all(w in message for w in words) or out.get("status") != want:
      failures.append(f"{name}: got {status} {out!r}, want {want} with {words}")
  assert not failures, "\n".join(failures)
  # The server took all of that in its stride.
  status, out, _ = _post_files(server, [("ok.jpeg", _read(real_files[0]))])
  assert status == 200 and out["predictions"][0]["label"] in ("NORMAL", "PNEUMONIA")


def _raw_exchange(srv, head: bytes, body: bytes = b"", shut_write=False) -> tuple[int, dict]:
  """Sends bytes over a plain socket; returns (status, JSON body) of the answer."""
  with socket.create_connection(srv.server_address[:2], timeout=TIMEOUT) as s:
    s.sendall(head + body)
    if shut_write:
      s.shutdown(socket.SHUT_WR)
    resp = http.client.HTTPResponse(s)
    resp.begin()
    return resp.status, json.loads(resp.read())


def test_upload_size_is_checked_before_reading(server, real_files):
  # Content-Length of 1 GB and not a byte of body: refused at once (nothing read, nothing waited for).
  head = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
          b"Content-Length: 1000000000\r\n\r\n")
  status, out = _raw_exchange(server, head)
  assert status == 413 and "max_upload_mb" in out["error"] and "953.7 MiB" in out["error"]
  # A real 1.5 MiB body over the 1 MiB limit: the client still reads the 413.
  big = b"\0" * (3 * http_api.MB // 2)
  status, out, resp = _request(server, "POST", "/v1/predict", big, {"Content-Type": "image/png"})
  assert status == 413 and "1 MiB" in out["error"] and resp.getheader("Connection") == "close"
  # No Content-Length (chunked) and a body shorter than its Content-Length.
  head = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
  status, out = _raw_exchange(server, head, b"5\r\nhello\r\n0\r\n\r\n")
  assert status == 411 and "Content-Length" in out["error"]
  head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
  status, out = _raw_exchange(server, head, _read(real_files[0])[:100], shut_write=True)
  assert status == 400 and "truncated upload" in out["error"]
  head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"
  status, out = _raw_exchange(server, head)
  assert status == 400 and "Content-Length" in out["error"]


def test_concurrent_requests_are_batched_and_equal_single_requests(server, demo_files, real_files):
  files = [(f"{i}-{os.path.basename(f)}", _read(f)) for i, f in enumerate(demo_files[:2] + real_files)]
  single = []
  for name, data in files:
    status, out, _ = _post_files(server, [(name, data)])
    assert status == 200
    single.append(out["predictions"][0])
  before = server.app.batcher.images
  jobs = [i % len(files) for i in range(20)]
  with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
    answers = list(pool.map(lambda i: _post_files(server, [files[i]]), jobs))
  for i, (status, out, _) in zip(jobs, answers):
    assert status == 200, out
    p = out["predictions"][0]
    assert p["filename"] == files[i][0] and p["label"] == single[i]["label"]
    assert p["probabilities"] == pytest.approx(single[i]["probabilities"], abs=1e-6)
  assert server.app.batcher.images - before == 20  # each image went through the model once


def test_batcher_gathers_waiting_jobs_up_to_max_batch():
  """Jobs queued while the model is busy go into the next call together, never past max_batch."""
  release, started, calls = threading.Event(), threading.Event(), []

  def fn(jobs):
    calls.append([len(j.pixels) for j in jobs])
    started.set()
    release.wait(30)
    for j in jobs:
      j.finish(result=len(j.pixels))

  batcher = batching.Batcher(fn, max_batch=4, timeout_s=0.2)
  try:
    first = batcher.submit(batching.Job(np.zeros((4, 2, 2, 1), np.uint8)))  # full batch: runs at once
    assert started.wait(30)
    rest = [batcher.submit(batching.Job(np.zeros((1, 2, 2, 1), np.uint8))) for _ in range(6)]
    release.set()
    assert first.wait(30) == 4 and [j.wait(30) for j in rest] == [1] * 6
    assert calls == [[4], [1, 1, 1, 1], [1, 1]]
  finally:
    release.set()
    batcher.stop()


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
  def fn(jobs):
    if any(j.gradcam for j in jobs):
      raise RuntimeError("boom")
    for j in jobs:
      j.finish(result="ok")

  batcher = batching.Batcher(fn, max_batch=1, timeout_s=0.0)
  try:
    with pytest.raises(RuntimeError, match="boom"):
      batcher.submit(batching.Job(np.zeros((1, 1, 1, 1), np.uint8), gradcam=True)).wait(30)
    assert batcher.submit(batching.Job(np.zeros((1, 1, 1, 1), np.uint8))).wait(30) == "ok"
  finally:
    batcher.stop()


def test_options_are_validated():
  with pytest.raises(http_api.ServeError, match="max_batch"):
    http_api.ServeOptions(model_dir="run", max_batch=0).validate()
  with pytest.raises(http_api.ServeError, match="port"):
    http_api.ServeOptions(model_dir="run", port=70000).validate()
  with pytest.raises(http_api.ServeError, match="max_upload_mb"):
    http_api.ServeOptions(model_dir="run", max_upload_mb=0).validate()
  with pytest.raises(http_api.ServeError, match="decode_budget"):
    http_api.ServeOptions(model_dir="run", max_pixels=10, decode_budget=9).validate()
  with pytest.raises(http_api.ServeError, match="body_timeout_s"):
    http_api.ServeOptions(model_dir="run", body_timeout_s=0).validate()
  assert http_api.is_loopback("127.0.0.1") and http_api.is_loopback("::1")
  assert not http_api.is_loopback("0.0.0.0")


def test_entry_point_reports_a_missing_run_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "xraytpu.serve", f"--model_dir={tmp_path}/nope"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.startswith("xraytpu.serve: error:")]
  assert lines and "no such run directory" in lines[0]
  assert "Traceback" not in proc.stderr


def test_serve_process_that_does_not_start_raises_with_its_output(tmp_path):
  """http_api.ServeProcess (the browser test's and benchmarks/serve_load's server): the child's error comes back."""
  with pytest.raises(http_api.ServeError, match=r"did not start \(exit code 2\)(.|\n)*no such run directory"):
    ServeProcess(str(tmp_path / "nope"), timeout=120)


def test_dicom_without_pydicom_or_broken_is_a_4xx(server):
  fake = b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage"
  status, out, _ = _request(server, "POST", "/v1/predict", fake, {"Content-Type": "application/dicom"})
  try:
    import pydicom  # noqa: F401
    assert status == 400 and "DICOM" in out["error"]
  except ImportError:
    assert status == 415 and "pydicom" in out["error"]


def test_dicom_upload_answers_as_predict_and_as_its_png(server, loaded, demo_files, tmp_path):
  """A DICOM upload (raw body or multipart, with or without the .dcm name) is rendered as the
  run's data was, and scores as xraytpu.predict scores the file, and as the film's PNG."""
  pytest.importorskip("pydicom")
  from tfrecord_tools import synthetic
  film = np.asarray(Image.open(demo_files[0]).convert("L")) / 255.0
  dcm = tmp_path / "film.dcm"
  dcm.write_bytes(synthetic.encode_dicom(film, "monochrome1", patient_id="x"))
  want = predict_lib.predict_files(loaded, [str(dcm), demo_files[0]])
  status, out, _ = _request(server, "POST", "/v1/predict", dcm.read_bytes(),
                            {"Content-Type": "application/dicom"})
  assert status == 200, out
  got = _probs(out["predictions"][0], loaded.classes)
  np.testing.assert_allclose(got, [want[0].probabilities[c] for c in loaded.classes], atol=1e-6)
  assert abs(got[1] - want[1].probabilities["PNEUMONIA"]) <= 0.02
  status, out, _ = _post_files(server, [("film.dcm", dcm.read_bytes())], "?dicom_window=file")
  assert status == 200 and len(out["predictions"]) == 1
  status, out, _ = _post_files(server, [("film.dcm", dcm.read_bytes())], "?window=wide")
  assert status == 400 and "window=" in out["error"]


def test_card_of_an_unevaluated_run_says_so(trained_run, tmp_path):
  run = predict_lib.load(copy_run(trained_run, tmp_path))
  card = model_card.model_card(run)
  assert card["evaluation"] is None and card["threshold"] == 0.5
  assert card["threshold_policy"] == "fixed:0.5" and "xraytpu.evaluate" in card["threshold_note"]


def test_a_busy_port_is_a_clear_error(server, evaluated_run, loaded):
  opts = http_api.ServeOptions(model_dir=evaluated_run[0], port=server.server_address[1], access_log=False)
  with pytest.raises(http_api.ServeError, match="cannot listen on 127.0.0.1"):
    http_api.make_server(opts, run=loaded)


# -- TensorFlow Serving's REST API, Vertex AI, OpenAPI ------------------------------


_SAVED_MODELS = {}   # export path -> the loaded SavedModel (loaded once per test session)


def _tf_serving_reference(export_path, request):
  """What TensorFlow Serving answers for `request` (a predict body) with the export loaded:
  its REST layer decodes {"b64": ...} into the signature's one string input, runs
  serving_default and lays the outputs out per instance (row) or per output (columnar)."""
  import tensorflow as tf
  if export_path not in _SAVED_MODELS:
    _SAVED_MODELS[export_path] = tf.saved_model.load(export_path)
  fn = _SAVED_MODELS[export_path].signatures["serving_default"]
  fmt = "instances" if "instances" in request else "inputs"
  values = request[fmt]
  values = values["image_bytes"] if isinstance(values, dict) else values
  raw = [base64.b64decode((v.get("image_bytes") or v)["b64"]) for v in values]
  out = {k: v.numpy() for k, v in fn(image_bytes=tf.constant(raw)).items()}
  out = {k: [x.decode() if isinstance(x, bytes) else x.tolist() for x in v] for k, v in out.items()}
  if fmt == "instances":
    return {"predictions": [{k: v[i] for k, v in out.items()} for i in range(len(raw))]}
  return {"outputs": out}


def _post_json(srv, path, obj):
  return _request(srv, "POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def exported(evaluated_run):
  """The run's SavedModel, written by xraytpu.export (export_lib): RUN/export/1."""
  from xraytpu.inference import export_lib
  return export_lib.export(evaluated_run[0])


def test_tf_serving_predict_equals_the_exported_saved_model(server, exported, demo_files, real_files):
  """The same TF Serving request, to xraytpu.serve and to the export's serving_default: same answer."""
  export_path = exported
  images = [_read(f) for f in demo_files[:1] + real_files[:2]]   # --max_files=3
  b64 = [base64.b64encode(d).decode() for d in images]
  requests = [
      {"instances": [{"b64": b} for b in b64]},
      {"instances": [{"image_bytes": {"b64": b}} for b in b64[:2]], "signature_name": "serving_default"},
      {"inputs": {"image_bytes": [{"b64": b} for b in b64]}},
      {"inputs": [{"b64": b} for b in b64[:1]]},
  ]
  for name in ("xray_cnn", "default", "xray_cnn/versions/1"):
    for req in requests:
      status, got, _ = _post_json(server, f"/v1/models/{name}:predict", req)
      assert status == 200, got
      want = _tf_serving_reference(export_path, req)
      assert set(got) == set(want)
      if "predictions" in want:
        assert [sorted(p) for p in got["predictions"]] == [sorted(p) for p in want["predictions"]]
        for g, w in zip(got["predictions"], want["predictions"]):
          np.testing.assert_allclose(g["probabilities"], w["probabilities"], atol=1e-6)
          assert g["label"] == w["label"] and g["label_index"] == w["label_index"]
      else:
        assert sorted(got["outputs"]) == sorted(want["outputs"]) == ["label", "label_index", "probabilities"]
        np.testing.assert_allclose(got["outputs"]["probabilities"], want["outputs"]["probabilities"],
                                   atol=1e-6)
        assert got["outputs"]["label"] == want["outputs"]["label"]
        assert got["outputs"]["label_index"] == want["outputs"]["label_index"]


def _saved_model_cli(export_path):
  """`saved_model_cli show --dir EXPORT --all`, parsed: {signature: {"inputs"|"outputs": {key:
  (dtype, shape, name)}, "method": method name}}."""
  cli = shutil.which("saved_model_cli", path=os.path.dirname(sys.executable)) or shutil.which("saved_model_cli")
  assert cli, "saved_model_cli (installed with tensorflow) not found"
  out = subprocess.run([cli, "show", "--dir", export_path, "--all"], capture_output=True, text=True,
                       timeout=300, check=True).stdout
  sigs, sig, side, key = {}, None, None, None
  for line in out.splitlines():
    line = line.strip()
    if m := re.fullmatch(r"signature_def\['(.+)'\]:", line):
      sig = sigs.setdefault(m.group(1), {"inputs": {}, "outputs": {}})
    elif m := re.fullmatch(r"(inputs|outputs)\['(.+)'\] tensor_info:", line):
      side, key = m.group(1), m.group(2)
      sig[side][key] = {}
    elif sig is not None and (m := re.fullmatch(r"(dtype|shape|name): ?(.*)", line)):
      sig[side][key][m.group(1)] = m.group(2)
    elif sig is not None and line.startswith("Method name is:"):
      sig["method"] = line.split(":", 1)[1].strip()
  return sigs


def _shape_text(tensor_shape):
  """TF Serving's JSON tensor_shape -> saved_model_cli's text: (-1, 2), (-1) or unknown_rank."""
  if tensor_shape.get("unknown_rank"):
    return "unknown_rank"
  return "(" + ", ".join(d["size"] for d in tensor_shape.get("dim", [])) + ")"


def test_tf_serving_metadata_is_the_exported_signature(server, exported):
  """/metadata is the SavedModel's own signature_def map: the same JSON TF Serving prints from the
  export's saved_model.pb, and the names, dtypes and shapes saved_model_cli shows."""
  from google.protobuf import json_format
  from tensorflow.core.protobuf import saved_model_pb2
  status, out, _ = _request(server, "GET", "/v1/models/xray_cnn/metadata")
  assert status == 200, out
  assert out["model_spec"] == {"name": "xray_cnn", "signature_name": "", "version": "1"}
  got = out["metadata"]["signature_def"]["signature_def"]
  saved = saved_model_pb2.SavedModel.FromString(open(os.path.join(exported, "saved_model.pb"), "rb").read())
  want = {k: json_format.MessageToDict(v, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True)
          for k, v in saved.meta_graphs[0].signature_def.items()}
  assert got == want
  shown = _saved_model_cli(exported)
  assert set(shown) == set(got) >= {"serving_default", "serving_pixels"}
  for name, sig in got.items():
    assert shown[name]["method"] == sig["method_name"]
    for side in ("inputs", "outputs"):
      assert {k: {"dtype": t["dtype"], "shape": _shape_text(t["tensor_shape"]), "name": t["name"]}
              for k, t in sig[side].items()} == shown[name][side], (name, side)
  # The outputs' tensor names are the export's: label :0, label_index :1, probabilities :2.
  outputs = got["serving_default"]["outputs"]
  assert {k: v["name"] for k, v in outputs.items()} == {
      "label": "StatefulPartitionedCall:0", "label_index": "StatefulPartitionedCall:1",
      "probabilities": "StatefulPartitionedCall:2"}
  # The same document for the served version and for "default"; other versions are not served.
  status, versioned, _ = _request(server, "GET", "/v1/models/default/versions/1/metadata")
  assert status == 200 and versioned["metadata"] == out["metadata"]
  assert versioned["model_spec"] == {"name": "default", "signature_name": "", "version": "1"}


def _tf_cases(good_b64):
  """(method, path, JSON body or None, status, exact error message) as TF Serving answers them
  for a model named xray_cnn whose served version is 1 (and no classify/regress signature)."""
  ok = {"instances": [{"b64": good_b64}]}
  examples = {"examples": [{"x": [1.0]}]}
  return [
      ("GET", "/v1/models/other", None, 404, "Could not find any versions of model other"),
      ("GET", "/v1/models/xray_cnn/versions/2", None, 404, "Could not find version 2 of model xray_cnn"),
      ("GET", "/v1/models/other/versions/1", None, 404, "Could not find version 1 of model other"),
      ("GET", "/v1/models/other/metadata", None, 404, "Servable not found for request: Latest(other)"),
      ("GET", "/v1/models/xray_cnn/versions/2/metadata", None, 404,
       "Servable not found for request: Specific(xray_cnn, 2)"),
      ("POST", "/v1/models/other:predict", ok, 404, "Servable not found for request: Latest(other)"),
      ("POST", "/v1/models/xray_cnn/versions/2:predict", ok, 404,
       "Servable not found for request: Specific(xray_cnn, 2)"),
      ("POST", "/v1/models/default/versions/7:classify", examples, 404,
       "Servable not found for request: Specific(default, 7)"),
      # No classify/regress signature: TF Serving checks the signature's shape (its default,
      # --enable_signature_method_name_check=false) and refuses it.
      ("POST", "/v1/models/xray_cnn:classify", examples, 400, "Expected one or two output Tensors, found 3"),
      ("POST", "/v1/models/xray_cnn/versions/1:classify", examples, 400,
       "Expected one or two output Tensors, found 3"),
      ("POST", "/v1/models/default:regress", examples, 400, "Expected one output Tensor."),
      ("POST", "/v1/models/xray_cnn:classify", {**examples, "signature_name": "x"}, 400,
       "No signature was found with the name: x"),
      ("POST", "/v1/models/xray_cnn:classify", {}, 400,
       "When method is classify, key 'examples' is expected and was not found"),
      ("POST", "/v1/models/xray_cnn:predict", {**ok, "signature_name": "x"}, 400,
       'Serving signature name: "x" not found in signature def'),
      ("GET", "/v1/models", None, 400, "Missing model name in request."),
      ("GET", "/v1/models/xray_cnn:predict", None, 400, "Malformed request: GET /v1/models/xray_cnn:predict"),
      ("POST", "/v1/models/xray_cnn", ok, 400, "Malformed request: POST /v1/models/xray_cnn"),
      ("POST", "/v1/models/xray_cnn:train", ok, 400, "Malformed request: POST /v1/models/xray_cnn:train"),
      ("GET", "/v1/models/xray_cnn/labels/stable", None, 400,
       "Malformed request: GET /v1/models/xray_cnn/labels/stable"),
  ]


def test_tf_serving_versions_and_errors_as_tf_serving_answers(server):
  good = base64.b64encode(_png_header_only(8, 8)).decode()
  for path in ("/v1/models/xray_cnn", "/v1/models/default/versions/1", "/v1/models/xray_cnn/versions/001"):
    status, out, _ = _request(server, "GET", path)
    assert status == 200 and out == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}, path
  failures = []
  for method, path, body, want, message in _tf_cases(good):
    data = b"" if body is None else json.dumps(body).encode()
    status, out, _ = _request(server, method, path, data, {"Content-Type": "application/json"})
    if (status, out) != (want, {"error": message}):
      failures.append(f"{method} {path}: got {status} {out!r}, want {want} {message!r}")
  assert not failures, "\n".join(failures)
  # Our own checks answer in TF Serving's shape too: exactly {"error": "..."}.
  cases = [({"instances": []}, 400, "non-empty"),
           ({"instances": [{"b64": "%%%"}]}, 400, "base64"),
           ({"instances": [[1, 2]]}, 400, "b64"),
           ({"instances": [{"b64": good}] * 4}, 413, "max_files"),
           ({"inputs": {"x": []}}, 400, "image_bytes"),
           ({"instances": [{"b64": good}], "signature_name": "serving_pixels"}, 400, "serving_default"),
           ({"instances": [{"b64": base64.b64encode(b"text").decode()}]}, 415, "not an image")]
  for body, want, words in cases:
    status, out, _ = _post_json(server, "/v1/models/default/versions/1:predict", body)
    assert status == want and set(out) == {"error"} and words in out["error"], (body, out)
  status, out, _ = _request(server, "POST", "/v1/models/default:predict", b"{not json",
                            {"Content-Type": "application/json"})
  assert status == 400 and set(out) == {"error"} and "not JSON" in out["error"]
  head = b"POST /v1/models/default:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
  status, out = _raw_exchange(server, head, b"2\r\n{}\r\n0\r\n\r\n")
  assert status == 411 and set(out) == {"error"}
  # The other routes keep their richer body: the status, and the file at fault.
  status, out, _ = _request(server, "POST", "/v1/predict", b"text", {"Content-Type": "image/png"})
  assert status == 415 and out["status"] == 415 and out["file"] == "" and out["index"] == 0


def test_the_served_version_is_the_runs_latest_export(tmp_path):
  assert tf_serving.served_version(str(tmp_path)) == 1
  for name in ("2", "10", ".tmp-11-123", "notes"):
    (tmp_path / "export" / name).mkdir(parents=True)
  assert tf_serving.served_version(str(tmp_path)) == 10


def test_vertex_ai_routes_and_port(evaluated_run, loaded, real_files):
  env = {"AIP_HTTP_PORT": "0", "AIP_HEALTH_ROUTE": "/vertex/health", "AIP_PREDICT_ROUTE": "/vertex/predict"}
  opts = http_api.ServeOptions(model_dir=evaluated_run[0], port=12345, access_log=False)
  assert http_api.vertex_settings(opts, {"AIP_HTTP_PORT": "8081"}) == (8081, {})
  with pytest.raises(http_api.ServeError, match="AIP_HTTP_PORT"):
    http_api.vertex_settings(opts, {"AIP_HTTP_PORT": "http"})
  srv = http_api.make_server(opts, run=loaded, environ=env)
  http_api.start_in_thread(srv)
  try:
    assert srv.server_address[1] != 12345   # AIP_HTTP_PORT=0 won over --port
    status, health, _ = _request(srv, "GET", "/vertex/health")
    assert status == 200 and health["status"] == "ok"
    b64 = base64.b64encode(_read(real_files[0])).decode()
    status, out, _ = _post_json(srv, "/vertex/predict", {"instances": [{"b64": b64}]})
    status2, want, _ = _post_json(srv, "/v1/models/default:predict", {"instances": [{"b64": b64}]})
    assert status == status2 == 200 and out == want
    status, doc, _ = _request(srv, "GET", "/openapi.json")
    assert "/vertex/predict" in doc["paths"] and "/vertex/health" in doc["paths"]
  finally:
    srv.close()


def _documented(route_path):
  """A Starlette route's path as OpenAPI writes it: {version:int} -> {version}."""
  return re.sub(r"\{(\w+):\w+\}", r"{\1}", route_path)


def test_openapi_describes_every_route(server):
  status, doc, _ = _request(server, "GET", "/openapi.json")
  assert status == 200 and doc["openapi"].startswith("3.")
  routes = {(_documented(r.path), m.lower()) for r in server.web.routes for m in r.methods if m != "HEAD"}
  documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
  assert routes == documented
  assert "413" in doc["paths"]["/v1/predict"]["post"]["responses"]
  assert {("/v1/models/{name}/versions/{version}:predict", "post"),
          ("/v1/models/{name}:classify", "post")} <= routes
  # TF Serving's errors are exactly {"error": ...}; the others carry their status too.
  tf_error = doc["paths"]["/v1/models/{name}:predict"]["post"]["responses"]["404"]
  assert tf_error["content"]["application/json"]["schema"]["required"] == ["error"]
  assert "security" not in doc   # no --auth_token_file


# -- access: bearer tokens, TLS, no open public host ---------------------------------------


TOKENS = ("tok-" + "a1b2" * 6, "second-client+token/" + "7f3a" * 4 + "==")


def _self_signed(folder, password=None):
  """(cert.pem, key.pem): a self-signed certificate for 127.0.0.1 and its key, made with the
  cryptography package when installed, else with the openssl command."""
  cert, key = folder / "cert.pem", folder / "key.pem"
  try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
  except ImportError:
    if password or not shutil.which("openssl"):
      pytest.fail("neither the cryptography package nor the openssl command is installed")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return str(cert), str(key)
  private = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
  now = datetime.datetime.now(datetime.timezone.utc)
  certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                 .public_key(private.public_key()).serial_number(x509.random_serial_number())
                 .not_valid_before(now - datetime.timedelta(minutes=5))
                 .not_valid_after(now + datetime.timedelta(days=1))
                 .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
                 .sign(private, hashes.SHA256()))
  cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
  encryption = (serialization.BestAvailableEncryption(password) if password
                else serialization.NoEncryption())
  key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        encryption))
  return str(cert), str(key)


def _token_file(folder):
  path = folder / "tokens.txt"
  path.write_text("# the test's two clients\n\n" + TOKENS[0] + "\n  " + TOKENS[1] + "  \n")
  path.chmod(0o600)
  return str(path)


@pytest.fixture(scope="module")
def locked(evaluated_run, loaded, tmp_path_factory):
  """A server with --auth_token_file (two tokens), TLS and Vertex AI's routes:
  (server, an ssl context that trusts its self-signed certificate)."""
  folder = tmp_path_factory.mktemp("locked")
  cert, key = _self_signed(folder)
  opts = http_api.ServeOptions(model_dir=evaluated_run[0], port=0, max_files=3, access_log=False,
                                auth_token_file=_token_file(folder), ssl_certfile=cert, ssl_keyfile=key)
  env = {"AIP_HEALTH_ROUTE": "/vertex/health", "AIP_PREDICT_ROUTE": "/vertex/predict"}
  srv = http_api.make_server(opts, run=loaded, environ=env)
  http_api.start_in_thread(srv)
  yield srv, ssl.create_default_context(cafile=cert)
  srv.close()


def _concrete(route_path):
  """/v1/models/{name}/versions/{version:int} -> /v1/models/xray_cnn/versions/1."""
  return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: {"name": "xray_cnn", "version": "1"}[m.group(1)], route_path)


def _body_for(path, jpeg):
  """(body, content type) that a POST route accepts."""
  if path == "/v1/predict":
    return jpeg, "image/jpeg"
  if path.endswith((":classify", ":regress")):
    return json.dumps({"examples": [{"x": [1.0]}]}).encode(), "application/json"
  return json.dumps({"instances": [{"b64": base64.b64encode(jpeg).decode()}]}).encode(), "application/json"


def test_a_locked_server_answers_401_on_every_route_but_healthz_and_the_page(locked, real_files):
  srv, tls = locked
  assert srv.url.startswith("https://127.0.0.1:")
  jpeg = _read(real_files[0])
  routes = [(_concrete(r.path), m) for r in srv.web.routes for m in sorted(r.methods) if m != "HEAD"]
  assert {("/vertex/predict", "POST"), ("/v1/models/xray_cnn/versions/1:predict", "POST"),
          ("/v1/models/xray_cnn:classify", "POST"), ("/openapi.json", "GET"),
          ("/v1/model_card.md", "GET")} <= set(routes)
  open_paths = {"/healthz", "/vertex/health", "/", "/index.html", "/static/app.js", "/static/style.css"}
  good = ("Bearer " + TOKENS[0], "bearer " + TOKENS[1])
  wrong = ("Bearer " + TOKENS[0][:-1] + "x", "Bearer " + TOKENS[1] + "x")
  headers_tried = (None, "Basic " + base64.b64encode(b"user:" + TOKENS[0].encode()).decode(), *wrong, *good)
  failures = []
  for path, method in routes + [("/v1/no-such-route", "GET"), ("/v1/models/xray_cnn:train", "POST")]:
    body, ctype = _body_for(path, jpeg) if method == "POST" else (b"", "")
    for authorization in headers_tried:
      headers = {"Content-Type": ctype} if ctype else {}
      if authorization:
        headers["Authorization"] = authorization
      status, out, resp = _request(srv, method, path, body, headers, context=tls)
      what = f"{method} {path} with {(authorization or 'no token').split(' ')[0]}: {status} {out!r:.200}"
      if path in open_paths or authorization in good:
        if status == 401 or (method == "GET" and path != "/v1/no-such-route" and status != 200):
          failures.append(what)
        continue
      challenge = resp.getheader("WWW-Authenticate") or ""
      tf = path.startswith("/v1/models") or path == "/vertex/predict"
      if (status != 401 or set(out) != ({"error"} if tf else {"error", "status"})
          or not challenge.startswith('Bearer realm="xraytpu"')
          or ('error="invalid_token"' in challenge) != (authorization in wrong)):
        failures.append(f"{what} {challenge!r}")
  assert not failures, "\n".join(failures)
  # With a token the answers are the unlocked server's.
  status, out, _ = _request(srv, "POST", "/v1/predict", jpeg, {"Content-Type": "image/jpeg",
                                                              "Authorization": good[0]}, context=tls)
  assert status == 200 and out["predictions"][0]["label"] in ("NORMAL", "PNEUMONIA")
  # The OpenAPI document names the scheme, and which routes are open.
  status, doc, _ = _request(srv, "GET", "/openapi.json", headers={"Authorization": good[1]}, context=tls)
  assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
  assert doc["paths"]["/healthz"]["get"]["security"] == []
  assert "401" in doc["paths"]["/v1/models/{name}:predict"]["post"]["responses"]
  # HTTPS only: plain HTTP on the port gets no answer.
  with pytest.raises((http.client.HTTPException, OSError)):
    _request(srv, "GET", "/healthz")


def test_a_refused_upload_is_answered_401_not_reset(locked):
  srv, tls = locked
  big = b"\0" * (3 * http_api.MB)
  status, out, resp = _request(srv, "POST", "/v1/predict", big, {"Content-Type": "image/png"}, context=tls)
  assert status == 401 and resp.getheader("Connection") == "close" and "Authorization: Bearer" in out["error"]


def test_the_token_file_and_the_constant_time_check(tmp_path, monkeypatch):
  f = tmp_path / "tokens.txt"
  f.write_text("# a comment\n\n  " + TOKENS[0] + "  \n" + TOKENS[1] + "\n")
  assert auth.read_tokens(str(f)) == list(TOKENS)
  f.chmod(0o644)
  assert "chmod 600" in auth.file_warning(str(f))
  f.chmod(0o600)
  assert auth.file_warning(str(f)) is None
  secret = "short-secret"
  for text, words in [("", "holds no token"), ("# only a comment\n", "holds no token"),
                      (f"{TOKENS[0]}\n{secret}\n", "line 2: not a token"),
                      ("with a space inside it\n", "line 1: not a token"), ("x" * 513, "line 1: not a token")]:
    f.write_text(text)
    with pytest.raises(http_api.ServeError, match=words) as e:
      auth.read_tokens(str(f))
    assert secret not in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(http_api.ServeError, match="cannot read"):
    auth.read_tokens(str(tmp_path / "missing.txt"))
  # Every token is compared (hmac.compare_digest), whichever one matches: no early exit.
  real, calls = auth.hmac.compare_digest, []
  monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
  tokens = auth.Tokens(list(TOKENS))
  for header, want in [(b"Bearer " + TOKENS[0].encode(), ""), (b"Bearer " + TOKENS[1].encode(), ""),
                       (b"bearer " + TOKENS[0].encode(), ""), (b"Bearer " + TOKENS[0].encode()[:-1], "invalid"),
                       (b"Bearer", "invalid"), (b"Basic dXNlcjpwYXNz", "missing"), (None, "missing")]:
    calls.clear()
    assert tokens.check(header) == want, header
    assert len(calls) == (2 if header and header.lower().startswith(b"bearer") else 0)
  assert tokens.redact(f"GET /v1/model?t={urllib.parse.quote(TOKENS[1], safe='')} x {TOKENS[0]}") == \
      "GET /v1/model?t=[token] x [token]"


def test_a_public_host_without_a_token_is_refused(tmp_path):
  for host in ("0.0.0.0", "::", "192.0.2.7", "example.org", ""):
    with pytest.raises(http_api.ServeError, match="allow_unauthenticated"):
      http_api.ServeOptions(model_dir="run", host=host).validate()
  http_api.ServeOptions(model_dir="run", host="0.0.0.0", allow_unauthenticated=True).validate()
  http_api.ServeOptions(model_dir="run", host="0.0.0.0", auth_token_file="tokens.txt").validate()
  for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
    http_api.ServeOptions(model_dir="run", host=host).validate()
  with pytest.raises(http_api.ServeError, match="needs --ssl_certfile"):
    http_api.ServeOptions(model_dir="run", ssl_keyfile="key.pem").validate()
  # The real entry point: one line, exit code 2, before loading anything.
  proc = subprocess.run([sys.executable, "-m", "xraytpu.serve", f"--model_dir={tmp_path}", "--host=0.0.0.0"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr and "Serving on" not in proc.stdout
  lines = [l for l in proc.stderr.splitlines() if l.startswith("xraytpu.serve: error:")]
  assert len(lines) == 1 and "--auth_token_file" in lines[0] and "--allow_unauthenticated" in lines[0], \
      proc.stderr


def test_tls_files_that_do_not_load_are_one_line(tmp_path):
  cert, key = _self_signed(tmp_path)
  bad = tmp_path / "bad.pem"
  bad.write_text("not a certificate\n")
  (tmp_path / "locked").mkdir()
  locked_cert, locked_key = _self_signed(tmp_path / "locked", password=b"secret")
  for c, k in [(str(bad), key), (cert, str(bad)), (cert, str(tmp_path / "missing.pem")), (cert, ""),
               (locked_cert, locked_key)]:   # an encrypted key: refused, never a password prompt
    with pytest.raises(http_api.ServeError, match="cannot load the certificate") as e:
      http_api.check_tls(http_api.ServeOptions(model_dir="run", ssl_certfile=c, ssl_keyfile=k))
    assert "\n" not in str(e.value)
  http_api.check_tls(http_api.ServeOptions(model_dir="run", ssl_certfile=cert, ssl_keyfile=key))


def test_tokens_never_appear_in_the_logs(evaluated_run, tmp_path):
  """The real entry point with its access log on: a token sent right (a header), wrong (in
  the URL, raw or percent-encoded) or refused never shows in what the server writes."""
  flags = [f"--auth_token_file={_token_file(tmp_path)}", "--access_log"]
  with ServeProcess(evaluated_run[0], flags, timeout=300) as proc:
    srv = _Address(proc.url)
    good = {"Authorization": "Bearer " + TOKENS[0]}
    assert _request(srv, "GET", "/v1/model", headers=good)[0] == 200
    assert _request(srv, "GET", "/v1/model?access_token=" + TOKENS[1])[0] == 401
    assert _request(srv, "GET", "/v1/model?access_token=" + urllib.parse.quote(TOKENS[1], safe=""))[0] == 401
    assert _request(srv, "GET", "/v1/" + TOKENS[0], headers=good)[0] == 404
    assert _request(srv, "GET", "/v1/model", headers={"Authorization": "Bearer " + TOKENS[1][:-2]})[0] == 401
    assert _request(srv, "POST", "/v1/predict", b"text", {"Content-Type": "image/png", **good})[0] == 415
    assert _request(srv, "POST", f"/v1/models/{TOKENS[0]}:predict", b"{}", good)[0] == 404
    time.sleep(1.0)
    output = "".join(proc.output)
  assert '"GET /v1/model HTTP/1.1" 200' in output, output   # the access log is on
  assert "[token]" in output, output                         # the URL's token was logged, redacted
  for token in TOKENS:
    for form in {token, urllib.parse.quote(token, safe=""), token[:-2]}:
      assert form not in output, output


# -- deadlines, disconnects, the memory bound ------------------------------------------


@pytest.fixture(scope="module")
def strict_server(evaluated_run, loaded):
  """Short deadlines and one request slot: a slot that is not freed blocks the next request."""
  opts = http_api.ServeOptions(model_dir=evaluated_run[0], port=0, max_upload_mb=1, max_inflight=1,
                                header_timeout_s=1.5, body_timeout_s=1.5, access_log=False)
  srv = http_api.make_server(opts, run=loaded)
  http_api.start_in_thread(srv)
  yield srv
  srv.close()


def test_a_trickled_body_gets_408_and_frees_its_slot(strict_server, real_files):
  data = _read(real_files[0])
  with socket.create_connection(strict_server.server_address[:2], timeout=TIMEOUT) as s:
    s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
              b"Content-Length: %d\r\n\r\n" % len(data))
    resp = http.client.HTTPResponse(s)
    sender = threading.Thread(target=lambda: [_send_quietly(s, data[i:i + 1], 0.5) for i in range(8)])
    sender.start()
    resp.begin()
    out = json.loads(resp.read())
    sender.join()
  assert resp.status == 408 and "body_timeout_s" in out["error"] and resp.getheader("Connection") == "close"
  status, out, _ = _request(strict_server, "POST", "/v1/predict", data, {"Content-Type": "image/jpeg"})
  assert status == 200, out   # the only slot was freed


def _send_quietly(s, data, pause):
  time.sleep(pause)
  try:
    s.sendall(data)
  except OSError:
    pass


def test_trickled_headers_are_cut_off(strict_server):
  with socket.create_connection(strict_server.server_address[:2], timeout=TIMEOUT) as s:
    t0 = time.monotonic()
    got = b""
    try:
      for c in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
        s.sendall(bytes([c]))
        time.sleep(0.25)
        s.setblocking(False)
        try:
          got += s.recv(4096)
        except BlockingIOError:
          pass
        s.setblocking(True)
        if got:
          break
    except OSError:
      pass
    s.settimeout(10)
    try:
      while True:
        chunk = s.recv(4096)
        if not chunk:
          break
        got += chunk
    except OSError:
      pass
  assert got.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 8, got


@pytest.fixture(scope="module")
def bounded_process(evaluated_run):
  """The real entry point with a small decode budget: 4 Mpx images, one decoded at a time."""
  flags = ["--max_pixels=4000000", "--decode_budget=4000000", "--max_inflight=20", "--max_upload_mb=1",
           "--max_batch=8"]
  with ServeProcess(evaluated_run[0], flags, timeout=300) as proc:
    yield proc


class _Address:
  """A server subprocess's URL as `_request` takes a server: server_address = (host, port)."""

  def __init__(self, url):
    u = urllib.parse.urlsplit(url)
    self.server_address = (u.hostname, u.port)


def _vm(pid, key):
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) * 1024
  raise AssertionError(key)


def _near_limit_png(width, height, seed):
  """A smooth RGB gradient (small file, width x height pixels to decode)."""
  x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
  y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
  img = ((x + y * 0.5 + seed * 7 + np.zeros((1, 1, 3), np.float32)) % 256).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG", compress_level=6)
  return buf.getvalue()


def test_memory_stays_under_the_stated_bound(bounded_process):
  """20 clients post near-limit images at once: the server's peak RSS stays under
  http_api.memory_bound (what README states), measured from /proc/PID/status."""
  srv = _Address(bounded_process.url)
  pid = bounded_process.pid
  idle = _vm(pid, "VmHWM")
  images = [_near_limit_png(2000, 2000, i) for i in range(20)]
  with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
    answers = list(pool.map(lambda d: _request(srv, "POST", "/v1/predict", d, {"Content-Type": "image/png"}),
                            images))
  assert all(status == 200 for status, _, _ in answers), [a[1] for a in answers if a[0] != 200][:2]
  peak = _vm(pid, "VmHWM")
  _, health, _ = _request(srv, "GET", "/healthz")
  # The decoders held one 4 Mpx image at a time: the budget, never more.
  assert health["decode_budget"] == {"pixels": 4_000_000, "peak_pixels": 4_000_000}
  opts = http_api.ServeOptions(model_dir="x", max_pixels=4_000_000, decode_budget=4_000_000,
                                max_inflight=20, max_upload_mb=1)
  bound = http_api.memory_bound(opts, idle)
  assert peak <= bound, f"idle {idle / http_api.MB:.0f} MiB, peak {peak / http_api.MB:.0f} MiB, " \
                        f"bound {bound / http_api.MB:.0f} MiB"


def test_a_client_that_disconnects_mid_upload_gives_one_quiet_log_line(bounded_process):
  url = urllib.parse.urlsplit(bounded_process.url)
  before = len(bounded_process.output)
  for linger in (False, True):   # a clean close (FIN) and a reset (RST)
    s = socket.create_connection((url.hostname, url.port), timeout=TIMEOUT)
    s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
              b"Content-Length: 100000\r\n\r\n" + b"\x89PNG" + b"\0" * 1000)
    time.sleep(0.3)
    if linger:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
  time.sleep(1.5)
  status, health, _ = _request(_Address(bounded_process.url), "GET", "/healthz")
  assert status == 200
  lines = list(bounded_process.output)[before:]
  assert not any("Traceback" in l or "Exception" in l for l in lines), "".join(lines)
  about = [l for l in lines if "1004 of 100000 bytes" in l]
  assert len(about) == 2, "".join(lines)
