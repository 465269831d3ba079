"""Prediction web app and JSON API for a trained run (`python -m xraytpu.serve`).

  GET  /                 the page (xraytpu/static/: plain HTML + JS + CSS, no build step, no CDN)
  GET  /healthz          {"status": "ok", "model": ..., "requests": n, "images": n, "batches": n}
  GET  /v1/model         the model card (see `model_card`)
  POST /v1/predict[?gradcam=1][&window=auto|lung|...|CENTER,WIDTH]
                         body: multipart/form-data with one or more file parts
                         (curl -F file=@a.png -F file=@b.jpeg), or the raw bytes of one
                         image (curl --data-binary @a.png)
       200 -> {"model": "xray_cnn", "classes": ["NORMAL", "PNEUMONIA"],
               "positive_class": "PNEUMONIA", "threshold": 0.41, "threshold_policy": "youden",
               "threshold_source_split": "val", "disclaimer": "...",
               "predictions": [{"index": 0, "filename": "a.png", "label": "PNEUMONIA",
                                "label_index": 1, "probability": 0.93,
                                "probabilities": {"NORMAL": 0.07, "PNEUMONIA": 0.93},
                                "threshold": 0.41, "summary": "PNEUMONIA 0.93 (threshold 0.41)",
                                "gradcam_png_base64": "iVBOR..."   (only with ?gradcam=1)}, ...]}
       4xx -> {"error": "one line for a person", "status": 413, "file": "a.png", "index": 0}
              400 corrupt/truncated image, malformed multipart, bad query parameter, empty body
              411 no Content-Length      413 body over --max_upload_mb (checked before
              reading), more than --max_files files, an image over --max_pixels (checked from
              the file header, before decoding)      415 not an image (or DICOM without pydicom)
              404 unknown path    405 wrong method    408 body not sent in time
              503 the model did not answer within request_timeout_s (busy)

A request is all or nothing: every file is checked before any reaches the model.

Predictions are those of `python -m xraytpu.predict`: the same run loader
(`predict_lib.load`: model, manifest, frozen RUN/threshold.json), the same
per-image steps (`predict_lib.is_dicom`/`dicom_to_png`, the converter's
`prepare_image` with the manifest's arguments, the input pipeline's
`load_image`, as `predict_lib.encoded_to_pixels` calls it), the same model call
(`run.model(x, training=False)` + `predict_lib.to_class_probabilities`, as
`predict_lib.model_probabilities`), the same decision (`predict_lib.decide`)
and the same Grad-CAM (`xraytpu.gradcam`). The two TensorFlow steps run as
tf.functions traced once at start-up (`GraphFunctions`): on a CPU, 2-3x less
time per image than predict_lib's eager calls, same outputs.

Threads: `ThreadingHTTPServer` reads and decodes each request in its own
thread; one worker thread owns the model and runs it on batches gathered from
concurrent requests (`Batcher`: up to `max_batch` images, waiting at most
`batch_timeout_ms` after the first). Nothing a request sends is ever used as a
file system path: the page's three files are read from the package at start-up.
"""

from __future__ import annotations

import base64
import dataclasses
import email.message
import email.parser
import email.policy
import http
import http.server
import io
import ipaddress
import json
import os
import queue
import socket
import sys
import threading
import time
import traceback
import urllib.parse
import warnings
from importlib import resources
from typing import Any, Callable, Sequence

import numpy as np

from tfrecord_tools import storage
from xraytpu import __version__, predict_lib
from xraytpu.config import ServeError, ServeOptions  # noqa: F401 - defined with the other options

MB = 1 << 20
DISCLAIMER = ("Not a diagnostic device. This is research software: its output is not a diagnosis, has "
              "not been cleared by any regulator, and must not be used to make clinical decisions.")

# URL path -> (file in xraytpu/static, Content-Type). Read once at start-up.
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_FILE_FIELDS = ("file", "files", "image", "images")
_QUERY_PARAMS = ("gradcam", "window")
_MAX_FILENAME = 200


class RequestError(Exception):
  """A bad request: HTTP `status` (4xx) and a one-line `message` for the client."""

  def __init__(self, status: int, message: str, **extra: Any):
    super().__init__(message)
    self.status, self.message, self.extra = int(status), message, extra


# --------------------------------------------------------------------------
# The model card.
# --------------------------------------------------------------------------

_CARD_METRICS = ("auc", "auc_ci", "pr_auc", "pr_auc_ci", "sensitivity", "sensitivity_ci", "specificity",
                 "specificity_ci", "ppv", "ppv_ci", "npv", "npv_ci", "accuracy", "accuracy_ci",
                 "micro_auc", "micro_auc_ci", "threshold", "threshold_policy", "threshold_source_split",
                 "threshold_source_dataset", "num_examples", "class_counts", "dataset", "split", "task",
                 "ci", "notes", "undefined", "created", "temperature")


def find_eval_report(run: predict_lib.LoadedRun) -> dict | None:
  """RUN/eval/<dataset>-<split>/report.json, preferring the training data's test split.

  Order: <training dataset>-test, any *-test, then any other report; the
  first that parses. None when the run has not been evaluated.
  """
  from xraytpu import evaluate_lib
  try:
    paths = storage.glob(storage.join(run.model_dir, "eval", "*", "report.json"))
  except (OSError, storage.StorageError):
    return None
  preferred = f"{evaluate_lib.dataset_name(run.cfg.data_dir or '', run.manifest)}-test"

  def rank(path: str) -> tuple[int, str]:
    name = os.path.basename(os.path.dirname(path))
    return (0 if name == preferred else 1 if name.endswith("-test") else 2, name)

  for path in sorted(paths, key=rank):
    try:
      report = json.loads(storage.read_text(path))
    except (OSError, ValueError):   # StorageError is a ValueError
      continue
    if isinstance(report, dict) and "auc" in report:
      return report
  return None


def model_card(run: predict_lib.LoadedRun, opts: ServeOptions | None = None) -> dict[str, Any]:
  """What the model is and what its numbers mean (GET /v1/model).

  {"model": "xray_cnn", "run": "<run folder name>", "task": "binary"|"multiclass",
   "classes": [...], "positive_class": str|null,
   "input": {"size": S, "channels": C, "aspect": "squash", "dtype": "uint8"},
   "preprocessing": {prepare_image arguments from the manifest},
   "training_data": {"dataset": name, "splits": {split: {"num_examples": n, "class_counts": {...}}}},
   "threshold": float|null, "threshold_policy": str, "threshold_source_split": str|null,
   "threshold_source_dataset": str|null, "threshold_note": str|null, "temperature": float|null,
   "evaluation": null | {report.json's headline numbers (auc, auc_ci, sensitivity, ...),
                         "headline": one line, "stale": bool},
   "limits": {"max_upload_mb", "max_files", "max_pixels"}, "disclaimer": str}
  """
  from xraytpu import evaluate_lib
  op = run.operating_point or {}
  manifest = run.manifest
  splits = {}
  for name, info in sorted((manifest.get("splits") or {}).items()):
    splits[name] = {"num_examples": info.get("num_examples"), "class_counts": info.get("class_counts")}
  has_op = bool(op) and (op.get("threshold") is not None or not run.binary)
  card: dict[str, Any] = {
      "model": getattr(run.cfg, "model", None) or "unknown",
      "run": os.path.basename(os.path.normpath(run.model_dir)),
      "task": "binary" if run.binary else "multiclass",
      "classes": run.classes,
      "positive_class": run.classes[1] if run.binary else None,
      "input": {"size": run.size, "channels": run.channels, "aspect": run.aspect, "dtype": "uint8"},
      "preprocessing": run.prepare_args,
      "training_data": {"dataset": evaluate_lib.dataset_name(run.cfg.data_dir or "", manifest),
                        "splits": splits},
      "threshold": run.threshold,
      "threshold_policy": op.get("policy") or ("fixed:0.5" if run.binary else "argmax"),
      "threshold_source_split": op.get("source_split"),
      "threshold_source_dataset": op.get("source_dataset"),
      "threshold_note": None if has_op or not run.binary else (
          f"no {predict_lib.OPERATING_POINT_FILE} in the run: the default threshold "
          f"{predict_lib.DEFAULT_THRESHOLD} is used; run python -m xraytpu.evaluate to choose one "
          "on the validation split"),
      "temperature": run.temperature,
      "evaluation": None,
      "disclaimer": DISCLAIMER,
  }
  report = find_eval_report(run)
  if report is not None:
    ev = {k: report.get(k) for k in _CARD_METRICS}
    try:
      ev["headline"] = evaluate_lib.headline(report)
    except (KeyError, TypeError, ValueError):
      ev["headline"] = None
    t_report, t_now = report.get("threshold"), run.threshold
    ev["stale"] = (t_report is not None and t_now is not None and abs(float(t_report) - t_now) > 1e-9)
    if ev["stale"]:
      ev["notes"] = list(ev.get("notes") or []) + [
          f"this report used threshold {t_report}; {predict_lib.OPERATING_POINT_FILE} now says "
          f"{t_now}: rerun python -m xraytpu.evaluate"]
    card["evaluation"] = ev
  if opts is not None:
    card["limits"] = {"max_upload_mb": opts.max_upload_mb, "max_files": opts.max_files,
                      "max_pixels": opts.max_pixels}
  return card


# --------------------------------------------------------------------------
# One uploaded file -> the model's input.
# --------------------------------------------------------------------------


def image_size(data: bytes) -> tuple[int, int]:
  """(width, height) from the file's header only (PIL's lazy open; DICOM: Rows/Columns).

  Raises RequestError: 415 not an image, 400 unreadable header, 413 PIL's own bomb limit.
  """
  from PIL import Image, UnidentifiedImageError
  if predict_lib.is_dicom(data):
    try:
      import pydicom
    except ImportError:
      raise RequestError(415, "DICOM input needs pydicom on the server: "
                              "pip install 'xraytpu[dicom]' (or send PNG/JPEG)") from None
    try:
      ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
      return int(ds.Columns), int(ds.Rows)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for corrupt files
      raise RequestError(400, f"unreadable DICOM header ({type(e).__name__}: {e})") from None
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # DecompressionBombWarning: the limit below decides
      with Image.open(io.BytesIO(data)) as im:  # reads the header, decodes no pixels
        return im.size
  except Image.DecompressionBombError as e:
    raise RequestError(413, f"image too large ({e})") from None
  except UnidentifiedImageError:
    raise RequestError(415, "not an image (unrecognised format): send PNG or JPEG") from None
  except Exception as e:  # noqa: BLE001 - PIL raises many types for broken headers
    kind = "truncated" if "truncated" in str(e).lower() else "corrupt"
    raise RequestError(400, f"{kind} image ({type(e).__name__}: {e})") from None


def prepare_upload(run: predict_lib.LoadedRun, data: bytes, *, max_pixels: int,
                   window: tuple[float, float] | None = None,
                   to_pixels: Callable[[bytes], np.ndarray] | None = None) -> np.ndarray:
  """An uploaded file's bytes -> uint8 [S, S, C], exactly as xraytpu.predict prepares a file.

  The pixel count is checked from the header first, so a decompression bomb
  is refused before anything is decoded. to_pixels: encoded PNG/JPEG -> uint8
  [S, S, C] (default predict_lib.encoded_to_pixels; the server passes
  `GraphFunctions.pixels`, the same function traced). Raises RequestError (4xx).
  """
  from tfrecord_tools import images as images_lib
  if not data:
    raise RequestError(400, "empty file (0 bytes)")
  width, height = image_size(data)
  if width * height > max_pixels:
    raise RequestError(413, f"image is {width}x{height} = {width * height} pixels, more than the "
                            f"server's limit of {max_pixels} (--max_pixels)")
  try:
    # The steps of predict_lib.prepare_file, on bytes instead of a path.
    if predict_lib.is_dicom(data):
      data = predict_lib.dicom_to_png(data, window)
    encoded = images_lib.prepare_image(data, **run.prepare_args).encoded
    if to_pixels is None:
      return predict_lib.encoded_to_pixels(run, encoded)
    return to_pixels(encoded)
  except images_lib.ImageError as e:
    status = 413 if e.reason.startswith("image too large") else (
        415 if e.reason.startswith(("not an image", "DICOM")) else 400)
    raise RequestError(status, e.reason) from None
  except predict_lib.InputError as e:
    raise RequestError(415 if "pydicom" in str(e) else 400, str(e)) from None


class GraphFunctions:
  """predict_lib's two TensorFlow steps, traced once as tf.functions.

  pixels(encoded) = predict_lib.encoded_to_pixels (preprocess.load_image with
  the run's channels/size/aspect); probabilities(pixels) =
  predict_lib.model_probabilities (run.model(x, training=False), then
  predict_lib.to_class_probabilities with the run's temperature). The same
  functions in graph mode: on a CPU several times cheaper per image than
  eager calls; tests/test_serve.py checks the outputs equal predict_lib's.
  """

  def __init__(self, run: predict_lib.LoadedRun):
    import tensorflow as tf
    from xraytpu.data import preprocess
    self.run = run
    self._errors = tf.errors.OpError
    self._pixels = tf.function(
        lambda e: preprocess.load_image(e, channels=run.channels, size=run.size, aspect=run.aspect),
        input_signature=[tf.TensorSpec([], tf.string)])
    self._model = tf.function(
        lambda x: run.model(x, training=False),
        input_signature=[tf.TensorSpec([None, run.size, run.size, run.channels], tf.uint8)])

  def pixels(self, encoded: bytes) -> np.ndarray:
    """Encoded PNG/JPEG -> uint8 [S, S, C]; predict_lib's InputError when it cannot be decoded."""
    try:
      return self._pixels(encoded).numpy()
    except self._errors:
      return predict_lib.encoded_to_pixels(self.run, encoded)  # raises with predict's message

  def probabilities(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 [n, S, S, C] -> float64 [n, K] (binary: [1 - p, p])."""
    outs = [np.asarray(self._model(pixels[i:i + batch_size]), dtype=np.float32)
            for i in range(0, len(pixels), batch_size)]
    return predict_lib.to_class_probabilities(np.concatenate(outs), self.run.binary, self.run.temperature)

  def warm_up(self) -> None:
    """Traces both functions (a black PNG of the model's input size)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("L", (self.run.size, self.run.size)).save(buf, format="PNG")
    self.probabilities(self.pixels(buf.getvalue())[None], 1)


# --------------------------------------------------------------------------
# Batching concurrent requests.
# --------------------------------------------------------------------------


class Job:
  """One request's images waiting for the model: pixels uint8 [n, S, S, C]."""

  def __init__(self, pixels: np.ndarray, gradcam: bool = False):
    self.pixels, self.gradcam = pixels, gradcam
    self.result: Any = None
    self.error: BaseException | None = None
    self._done = threading.Event()

  def finish(self, result: Any = None, error: BaseException | None = None) -> None:
    self.result, self.error = result, error
    self._done.set()

  def wait(self, timeout: float | None = None) -> Any:
    if not self._done.wait(timeout):
      raise RequestError(503, f"the model did not answer within {timeout:g} s; try again")
    if self.error is not None:
      raise self.error
    return self.result


class Batcher:
  """A queue and one worker thread that runs `fn(jobs)` on gathered jobs.

  The worker takes the first waiting job, then keeps taking jobs until they
  hold `max_batch` images or `timeout_s` has passed since the first, and calls
  fn(jobs), which must call job.finish(...) on each. An exception from fn
  fails every job of that batch. Counters: batches, images.
  """

  def __init__(self, fn: Callable[[list[Job]], None], *, max_batch: int, timeout_s: float):
    self._fn, self._max_batch, self._timeout_s = fn, max(1, int(max_batch)), max(0.0, timeout_s)
    self._queue: queue.Queue[Job | None] = queue.Queue()
    self.batches = self.images = 0
    self.batch_sizes: list[int] = []
    self._thread = threading.Thread(target=self._loop, name="xraytpu-batcher", daemon=True)
    self._thread.start()

  def submit(self, job: Job) -> Job:
    self._queue.put(job)
    return job

  def stop(self) -> None:
    self._queue.put(None)
    self._thread.join(timeout=30)

  def _loop(self) -> None:
    while True:
      first = self._queue.get()
      if first is None:
        return
      jobs, n, stop = [first], len(first.pixels), False
      deadline = time.monotonic() + self._timeout_s
      while n < self._max_batch:
        try:
          left = deadline - time.monotonic()
          job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
        except queue.Empty:
          break
        if job is None:
          stop = True
          break
        jobs.append(job)
        n += len(job.pixels)
      try:
        self._fn(jobs)
      except BaseException as e:  # noqa: BLE001 - fail the waiting requests, keep serving
        for job in jobs:
          if not job._done.is_set():
            job.finish(error=e)
      self.batches += 1
      self.images += n
      if len(self.batch_sizes) < 100_000:
        self.batch_sizes.append(n)
      if stop:
        return


# --------------------------------------------------------------------------
# The application: run + batcher + card.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class ImageResult:
  """The model's answer for one image: probabilities float64 [K], label index, Grad-CAM map or None."""
  probabilities: np.ndarray
  label_index: int
  cam: np.ndarray | None = None


class App:
  """Everything a request needs; shared by the handler threads."""

  def __init__(self, run: predict_lib.LoadedRun, opts: ServeOptions):
    self.run, self.opts = run, opts
    self.graph = GraphFunctions(run)
    self.card = model_card(run, opts)
    self.static = load_static()
    self.batcher = Batcher(self._predict_batch, max_batch=opts.max_batch,
                           timeout_s=opts.batch_timeout_ms / 1000.0)
    self.inflight = threading.BoundedSemaphore(opts.max_inflight)
    self.requests = 0
    self._requests_lock = threading.Lock()
    self._cam = None
    self._cam_error: str | None = None

  def close(self) -> None:
    self.batcher.stop()

  def _gradcam(self):
    """Built on first use, in the worker thread (the only thread that runs the model)."""
    if self._cam is None and self._cam_error is None:
      from xraytpu import gradcam
      try:
        self._cam = gradcam.GradCam(self.run.model)
      except ValueError as e:
        self._cam_error = str(e)
    return self._cam

  def _predict_batch(self, jobs: list[Job]) -> None:
    pixels = np.concatenate([j.pixels for j in jobs])
    probs = self.graph.probabilities(pixels, self.opts.max_batch)
    labels = predict_lib.decide(probs, self.run.threshold)
    want = np.concatenate([np.full(len(j.pixels), j.gradcam) for j in jobs])
    cams: list[np.ndarray | None] = [None] * len(pixels)
    if want.any() and self._gradcam() is not None:
      idx = np.flatnonzero(want)
      for i, m in zip(idx, self._cam(pixels[idx], labels[idx])):
        cams[i] = m
    start = 0
    for job in jobs:
      n = len(job.pixels)
      job.finish([ImageResult(probs[i], int(labels[i]), cams[i]) for i in range(start, start + n)])
      start += n

  def predict(self, files: Sequence[tuple[str, bytes]], *, gradcam: bool = False,
              window: tuple[float, float] | None = None) -> dict[str, Any]:
    """[(filename, bytes)] -> the POST /v1/predict JSON. Raises RequestError (all or nothing)."""
    run = self.run
    pixels = []
    for i, (name, data) in enumerate(files):
      try:
        pixels.append(prepare_upload(run, data, max_pixels=self.opts.max_pixels, window=window,
                                     to_pixels=self.graph.pixels))
      except RequestError as e:
        where = f"file {i + 1} of {len(files)}" + (f" ({name})" if name else "")
        where = where if len(files) > 1 else (name or "the image")
        raise RequestError(e.status, f"{where}: {e.message}", file=name, index=i) from None
    results = self.batcher.submit(Job(np.stack(pixels), gradcam)).wait(self.opts.request_timeout_s)
    predictions = []
    for i, ((name, _), r, pix) in enumerate(zip(files, results, pixels)):
      p = predict_lib.Prediction(
          path=name, label=run.classes[r.label_index], probability=float(r.probabilities[r.label_index]),
          probabilities={c: float(v) for c, v in zip(run.classes, r.probabilities)},
          threshold=run.threshold)
      item = {"index": i, "filename": name, "label": p.label, "label_index": r.label_index,
              "probability": p.probability, "probabilities": p.probabilities,
              "threshold": p.threshold, "summary": p.line(run.classes).split("\t", 1)[1]}
      if gradcam:
        item["gradcam_png_base64"] = None if r.cam is None else overlay_png_base64(pix, r.cam)
        if r.cam is None:
          item["gradcam_error"] = self._cam_error or "Grad-CAM unavailable for this model"
      predictions.append(item)
    card = self.card
    return {"model": card["model"], "classes": run.classes, "positive_class": card["positive_class"],
            "threshold": run.threshold, "threshold_policy": card["threshold_policy"],
            "threshold_source_split": card["threshold_source_split"], "disclaimer": DISCLAIMER,
            "predictions": predictions}

  def count_request(self) -> None:
    with self._requests_lock:
      self.requests += 1

  def health(self) -> dict[str, Any]:
    b = self.batcher
    return {"status": "ok", "model": self.card["model"], "requests": self.requests,
            "images": b.images, "batches": b.batches,
            "mean_batch": round(b.images / b.batches, 2) if b.batches else None}


def overlay_png_base64(pixels: np.ndarray, cam: np.ndarray) -> str:
  """uint8 [S, S, C] + map [S, S] -> base64 PNG of gradcam.overlay (what predict --gradcam writes)."""
  from PIL import Image
  from xraytpu import gradcam
  buf = io.BytesIO()
  Image.fromarray(gradcam.overlay(pixels, cam)).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode("ascii")


def load_static() -> dict[str, tuple[bytes, str]]:
  """URL path -> (bytes, Content-Type) for the page, from the installed package."""
  root = resources.files("xraytpu") / "static"
  out = {}
  for path, (name, ctype) in STATIC_FILES.items():
    try:
      out[path] = ((root / name).read_bytes(), ctype)
    except OSError as e:
      raise ServeError(f"the web page's {name} is missing from the installed package ({e}); "
                       "reinstall xraytpu (setup.cfg [options.package_data] lists static/*)") from e
  return out


# --------------------------------------------------------------------------
# HTTP.
# --------------------------------------------------------------------------


def _content_type(value: str) -> tuple[str, dict[str, str]]:
  msg = email.message.Message()
  msg["content-type"] = value or "application/octet-stream"
  params = {k.lower(): v for k, v in msg.get_params()[1:]} if msg.get_params() else {}
  return msg.get_content_type(), params


def parse_multipart(body: bytes, boundary: str, max_files: int) -> list[tuple[str, bytes]]:
  """multipart/form-data -> [(filename, bytes)] of its file parts, in order.

  Parts with a filename, or named file/files/image/images, are files; any
  other field is a 400 (the options are query parameters). Raises
  RequestError 400 (malformed / truncated: no closing boundary) or 413
  (more than max_files).
  """
  if not boundary or len(boundary) > 200:
    raise RequestError(400, "multipart/form-data needs a boundary parameter (1-200 characters)")
  delim = b"--" + boundary.encode("latin-1", "replace")
  if body.startswith(delim):
    pos = len(delim)
  else:
    i = body.find(b"\r\n" + delim)
    if i < 0:
      raise RequestError(400, "malformed multipart body: the boundary never appears")
    pos = i + 2 + len(delim)
  files: list[tuple[str, bytes]] = []
  parser = email.parser.BytesHeaderParser(policy=email.policy.HTTP)
  while True:
    if body.startswith(b"--", pos):  # the closing delimiter
      return files
    eol = body.find(b"\r\n", pos)
    end = body.find(b"\r\n" + delim, pos)
    if eol < 0 or end < 0:
      raise RequestError(400, "malformed multipart body: it ends without its closing boundary "
                              "(truncated upload?)")
    part = body[eol + 2:end]
    if part.startswith(b"\r\n"):
      head, data = b"", part[2:]
    else:
      head, sep, data = part.partition(b"\r\n\r\n")
      if not sep:
        raise RequestError(400, "malformed multipart body: a part has no blank line after its headers")
    headers = parser.parsebytes(head + b"\r\n\r\n")
    name = headers.get_param("name", header="content-disposition") or ""
    filename = headers.get_filename()
    if filename is None and str(name).lower() not in _FILE_FIELDS:
      raise RequestError(400, f"form field {str(name)[:50]!r} is not a file; send images as file parts "
                              "(curl -F file=@x.png) and options as query parameters (?gradcam=1)")
    if len(files) >= max_files:
      raise RequestError(413, f"more than {max_files} files in one request (--max_files)")
    filename = os.path.basename(str(filename or name).replace("\\", "/"))[:_MAX_FILENAME]
    files.append((filename, data))
    pos = end + 2 + len(delim)


def _parse_query(query: str) -> tuple[bool, tuple[float, float] | None]:
  params = urllib.parse.parse_qs(query, keep_blank_values=True)
  unknown = sorted(set(params) - set(_QUERY_PARAMS))
  if unknown:
    raise RequestError(400, f"unknown query parameter {unknown[0]!r}; known: {', '.join(_QUERY_PARAMS)}")
  gradcam = (params.get("gradcam") or ["0"])[-1].lower()
  if gradcam not in ("", "0", "1", "true", "false", "yes", "no"):
    raise RequestError(400, f"gradcam={gradcam[:20]!r}: use 1 or 0")
  try:
    window = predict_lib.parse_window((params.get("window") or ["auto"])[-1])
  except predict_lib.PredictError as e:
    raise RequestError(400, str(e).replace("--window", "window")) from None
  return gradcam in ("", "1", "true", "yes"), window


class _Handler(http.server.BaseHTTPRequestHandler):
  """Routes requests to the server's App. Every response is JSON except the page."""

  server: "Server"
  protocol_version = "HTTP/1.1"  # keep-alive: every response carries Content-Length
  server_version = f"xraytpu-serve/{__version__}"
  sys_version = ""

  def setup(self):
    self.timeout = self.server.app.opts.request_timeout_s
    super().setup()

  # -- responses ------------------------------------------------------------

  def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None):
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    self.send_header("X-Content-Type-Options", "nosniff")
    self.send_header("Referrer-Policy", "no-referrer")
    for k, v in (extra or {}).items():
      self.send_header(k, v)
    if self.close_connection:
      self.send_header("Connection", "close")
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _json(self, status: int, obj: Any, extra: dict[str, str] | None = None):
    body = (json.dumps(obj, allow_nan=False) + "\n").encode()
    self._send(status, body, "application/json", extra)

  def _error(self, status: int, message: str, **extra: Any):
    self._json(status, {"error": message, "status": status, **extra})

  def send_error(self, code, message=None, explain=None):
    """http.server's own errors (bad request line, 501 method) as JSON too."""
    self.close_connection = True
    try:
      phrase = http.HTTPStatus(code).phrase
    except ValueError:
      phrase = "error"
    self._error(code, message or phrase)

  def log_message(self, format, *args):  # noqa: A002 - http.server's signature
    if self.server.app.opts.access_log:
      super().log_message(format, *args)

  # -- routes ---------------------------------------------------------------

  def do_GET(self):
    self._discard_unexpected_body()
    app = self.server.app
    path = urllib.parse.urlsplit(self.path).path
    if path in app.static:
      body, ctype = app.static[path]
      extra = {"Content-Security-Policy": PAGE_CSP, "X-Frame-Options": "DENY"}
      return self._send(200, body, ctype, extra if ctype.startswith("text/html") else None)
    if path == "/healthz":
      return self._json(200, app.health())
    if path == "/v1/model":
      return self._json(200, app.card)
    if path == "/v1/predict":
      return self._error(405, "use POST for /v1/predict", allow="POST")
    return self._error(404, f"no such page: {path[:100]}")

  do_HEAD = do_GET

  def _method_not_allowed(self):
    self.close_connection = True
    self._error(405, f"{self.command} is not supported here; use GET, or POST /v1/predict")

  do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _method_not_allowed

  def do_POST(self):
    app = self.server.app
    url = urllib.parse.urlsplit(self.path)
    if url.path != "/v1/predict":
      self.close_connection = True
      return self._error(404, f"no such endpoint: POST {url.path[:100]}; use POST /v1/predict")
    app.count_request()
    self._body_read = False
    acquired = app.inflight.acquire(timeout=app.opts.request_timeout_s)
    if not acquired:
      self.close_connection = True
      return self._error(503, "the server is busy; try again")
    try:
      try:
        gradcam, window = _parse_query(url.query)
        files = self._read_files()
        self._json(200, app.predict(files, gradcam=gradcam, window=window))
      except RequestError as e:
        if not self._body_read:  # the rest of the request is still on the socket
          self.close_connection = True
        self._error(e.status, e.message, **e.extra)
      except (ConnectionError, TimeoutError):
        self.close_connection = True
      except Exception as e:  # noqa: BLE001 - a bug, not the client's fault: 500, logged
        traceback.print_exc()
        self.close_connection = True
        self._error(500, f"internal error ({type(e).__name__}); see the server's log")
    finally:
      app.inflight.release()

  # -- request bodies -------------------------------------------------------

  def _content_length(self) -> int:
    if self.headers.get("Transfer-Encoding"):
      self.close_connection = True
      raise RequestError(411, "chunked uploads are not accepted; send a Content-Length")
    value = self.headers.get("Content-Length")
    if value is None:
      self.close_connection = True
      raise RequestError(411, "Content-Length is required")
    try:
      n = int(value)
      if n < 0:
        raise ValueError
    except ValueError:
      self.close_connection = True
      raise RequestError(400, f"bad Content-Length {value[:30]!r}") from None
    return n

  def _read_files(self) -> list[tuple[str, bytes]]:
    app = self.server.app
    n = self._content_length()
    limit = app.opts.max_upload_bytes
    if n > limit:  # refused before reading a byte of it
      self.close_connection = True
      self._drain_after_refusal(n)
      raise RequestError(413, f"upload of {n / MB:.1f} MiB is over the server's limit of "
                              f"{app.opts.max_upload_mb:g} MiB (--max_upload_mb)")
    try:
      body = self.rfile.read(n)
    except (TimeoutError, socket.timeout):
      self.close_connection = True
      raise RequestError(408, f"the body did not arrive within {app.opts.request_timeout_s:g} s") from None
    self._body_read = True
    if len(body) < n:
      self.close_connection = True
      raise RequestError(400, f"the body ended after {len(body)} of {n} bytes (truncated upload)")
    ctype, params = _content_type(self.headers.get("Content-Type", ""))
    if ctype == "multipart/form-data":
      files = parse_multipart(body, params.get("boundary", ""), app.opts.max_files)
      if not files:
        raise RequestError(400, "the form holds no files")
      return files
    if ctype.startswith("multipart/"):
      raise RequestError(415, f"{ctype} is not accepted: use multipart/form-data or raw image bytes")
    if not body:
      raise RequestError(400, "empty body: send an image (raw bytes or multipart/form-data)")
    return [("", body)]

  def _drain_after_refusal(self, n: int) -> None:
    """Reads (and drops) a little of a refused body so the client sees our 413, not a reset."""
    left, deadline = min(n, 8 * MB), time.monotonic() + 1.0
    try:
      self.connection.settimeout(0.2)
      while left > 0 and time.monotonic() < deadline:
        chunk = self.rfile.read1(min(left, 64 * 1024)) if hasattr(self.rfile, "read1") else b""
        if not chunk:
          break
        left -= len(chunk)
    except OSError:
      pass
    finally:
      self.connection.settimeout(self.timeout)

  def _discard_unexpected_body(self) -> None:
    if self.headers.get("Content-Length", "0") not in ("", "0") or self.headers.get("Transfer-Encoding"):
      self.close_connection = True


class Server(http.server.ThreadingHTTPServer):
  """ThreadingHTTPServer with the App attached; `url` is where it listens."""

  daemon_threads = True
  request_queue_size = 256  # listen backlog: many clients may connect at once

  def __init__(self, address: tuple[str, int], app: App):
    self.app = app
    host = address[0]
    if _is_ipv6(host):
      self.address_family = socket.AF_INET6
    super().__init__(address, _Handler)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/"

  def close(self) -> None:
    """Stops serving (when serve_forever runs in another thread), closes the socket and the worker."""
    self.shutdown()
    self.server_close()
    self.app.close()


def _is_ipv6(host: str) -> bool:
  try:
    return ipaddress.ip_address(host).version == 6
  except ValueError:
    return False


def is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def load_run(opts: ServeOptions) -> predict_lib.LoadedRun:
  opts.validate()
  if not storage.is_remote(opts.model_dir) and not os.path.isdir(opts.model_dir):  # before importing TF
    raise ServeError(f"--model_dir={opts.model_dir}: no such run directory")
  try:
    return predict_lib.load(opts.model_dir)
  except predict_lib.PredictError as e:
    raise ServeError(str(e)) from e


def make_server(opts: ServeOptions, run: predict_lib.LoadedRun | None = None) -> Server:
  """Loads the run (unless given), warms the model up and binds host:port (not serving yet)."""
  opts.validate()
  run = run or load_run(opts)
  app = App(run, opts)
  app.graph.warm_up()
  try:
    return Server((opts.host, opts.port), app)
  except OSError as e:
    app.close()
    raise ServeError(f"cannot listen on {opts.host}:{opts.port}: {e.strerror or e}") from None


def start_in_thread(server: Server) -> threading.Thread:
  """serve_forever in a daemon thread (tests, benchmarks); stop with server.close()."""
  t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                       name="xraytpu-serve", daemon=True)
  t.start()
  return t


class ServeProcess:
  """The real entry point, `python -m xraytpu.serve`, as a child process on 127.0.0.1 (tests, benchmarks).

  Runs it with `--model_dir=model_dir --host=127.0.0.1 --port=0 --noaccess_log` plus
  `extra_flags` (e.g. ["--max_batch=8"]) and waits up to `timeout` seconds (TensorFlow
  import, model load, warm-up) for the "Serving on URL ..." line `serve` prints; `url`
  is then that URL, "http://127.0.0.1:PORT/". If the process exits or stays silent
  instead, it is stopped and ServeError carries the last lines of its output.
  Its stdout+stderr keep being read, so it never blocks on a full pipe; `output`
  holds the last 50 lines. stop() ends it (SIGTERM, then SIGKILL); a context manager.
  """

  def __init__(self, model_dir: str, extra_flags: Sequence[str] = (), *, timeout: float = 300.0):
    import collections
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `-m xraytpu.serve` resolves
    cmd = [sys.executable, "-m", "xraytpu.serve", f"--model_dir={model_dir}", "--host=127.0.0.1",
           "--port=0", "--noaccess_log", *extra_flags]
    self.proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
    self.output: collections.deque[str] = collections.deque(maxlen=50)
    self.url = ""
    ready, ended = threading.Event(), threading.Event()

    def read() -> None:
      for line in self.proc.stdout:
        self.output.append(line)
        if not self.url and line.startswith("Serving on "):
          self.url = line.split()[2]
          ready.set()
      ended.set()  # end of output: the process is exiting
      ready.set()

    threading.Thread(target=read, name="xraytpu-serve-output", daemon=True).start()
    ready.wait(timeout)
    if not self.url:
      why = f"not serving after {timeout:g} s"
      if ended.is_set():
        try:
          why = f"exit code {self.proc.wait(timeout=30)}"
        except subprocess.TimeoutExpired:
          pass
      self.stop()
      raise ServeError(f"the server did not start ({why}):\n" + "".join(self.output))

  def stop(self) -> None:
    import subprocess
    self.proc.terminate()
    try:
      self.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait(timeout=30)

  def __enter__(self) -> ServeProcess:
    return self

  def __exit__(self, *exc) -> None:
    self.stop()


def serve(opts: ServeOptions, out=sys.stdout) -> None:
  """The serve command: loads the run and serves until Ctrl-C / SIGTERM."""
  import signal
  server = make_server(opts)
  card = server.app.card
  ev = card["evaluation"]
  print(f"xraytpu.serve: {card['model']} from {opts.model_dir} ({', '.join(card['classes'])}; "
        f"threshold {card['threshold']} {card['threshold_policy']})", file=out)
  print(f"  evaluation: {ev['headline'] if ev and ev.get('headline') else 'none (run xraytpu.evaluate)'}",
        file=out)
  if card["threshold_note"]:
    print(f"  note: {card['threshold_note']}", file=out)
  if not is_loopback(opts.host):
    print(f"  WARNING: listening on {opts.host}: anyone who can reach this machine can use it "
          "(no authentication, no TLS)", file=out)
  print(f"Serving on {server.url} (Ctrl-C to stop)", file=out, flush=True)

  def _term(signum, frame):
    raise KeyboardInterrupt
  previous = signal.signal(signal.SIGTERM, _term)
  try:
    server.serve_forever(poll_interval=0.2)
  except KeyboardInterrupt:
    pass
  finally:
    signal.signal(signal.SIGTERM, previous)
    server.server_close()
    server.app.close()
    print("xraytpu.serve: stopped", file=out, flush=True)
