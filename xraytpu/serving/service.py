"""What a prediction request does, independent of HTTP: uploaded bytes -> checked
-> the run's InferenceModule -> the JSON answer.

Predictions are those of `python -m xraytpu.predict`: the same run
(`xraytpu.run.ensemble.load_model_dir`), the same pixel contract and model call
(`model_call.module_of(run)`, the InferenceModule that export saves), the same
DICOM rendering (`tfrecord_tools.dicom` through `pixels.graph_input`, with the
run's dicom_window unless ?window= says otherwise) and the same Grad-CAM.
Uploads are checked from their header first (pixel count: width x height,
x frames for DICOM), so a decompression bomb is refused before anything is
decoded, and decoding waits for room in the decode budget (`PixelBudget`).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import threading
import warnings
from typing import Any, Sequence

import numpy as np

from tfrecord_tools import dicom, pixels
from xraytpu.inference import model_call, predict_lib
from xraytpu.run import model_card as card_lib
from xraytpu.run import rundir
from xraytpu.serving.batching import Batcher, BatchTimeout, Job


class RequestError(Exception):
  """A bad request: HTTP `status` (4xx) and a one-line `message` for the client."""

  def __init__(self, status: int, message: str, **extra: Any):
    super().__init__(message)
    self.status, self.message, self.extra = int(status), message, extra


def _status(reason: str) -> int:
  """The HTTP status of a pixels.ImageError: 413 too large, 415 not an image or a DICOM
  object/encoding this server cannot render, 400 a broken file."""
  if reason.startswith("image too large"):
    return 413
  if reason.startswith(("not an image", "DICOM", "unsupported DICOM", "multi-frame")):
    return 415
  return 400


def image_size(data: bytes, name: str = "") -> tuple[int, int]:
  """(width, height) from the file's header only (see `header_size`)."""
  width, height, _ = header_size(data, name)
  return width, height


def header_size(data: bytes, name: str = "") -> tuple[int, int, int]:
  """(width, height, frames) from the file's header only, nothing decoded (PIL's lazy open;
  DICOM: Columns, Rows, NumberOfFrames, read by pydicom without the pixel data).

  Raises RequestError: 415 not an image, 400 unreadable header, 413 PIL's own bomb limit.
  """
  from PIL import Image, UnidentifiedImageError
  if dicom.is_dicom(data, name):
    try:
      return dicom.header_size(data)
    except pixels.ImageError as e:
      raise RequestError(_status(e.reason), e.reason) from None
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # DecompressionBombWarning: the limit below decides
      with Image.open(io.BytesIO(data)) as im:  # reads the header, decodes no pixels
        return im.width, im.height, 1
  except Image.DecompressionBombError as e:
    raise RequestError(413, f"image too large ({e})") from None
  except UnidentifiedImageError:
    raise RequestError(415, "not an image (unrecognised format): send PNG or JPEG") from None
  except Exception as e:  # noqa: BLE001 - PIL raises many types for broken headers
    kind = "truncated" if "truncated" in str(e).lower() else "corrupt"
    raise RequestError(400, f"{kind} image ({type(e).__name__}: {e})") from None


class PixelBudget:
  """A weighted semaphore over pixels: the images being decoded at once, across all requests,
  hold at most `capacity` pixels (width x height from their headers). This bounds the
  decoders' memory (see docs/serving.md: the memory bound)."""

  def __init__(self, capacity: int):
    self.capacity, self.used, self.peak = int(capacity), 0, 0
    self._cond = threading.Condition()

  @contextlib.contextmanager
  def hold(self, pixels: int, timeout: float | None = None):
    """Waits until `pixels` (at most the whole budget) fit, holds them for the block.
    Raises RequestError 503 when they do not fit within `timeout` seconds."""
    n = min(int(pixels), self.capacity)
    with self._cond:
      if not self._cond.wait_for(lambda: self.used + n <= self.capacity, timeout):
        raise RequestError(503, f"the server is busy decoding other images (waited {timeout:g} s); "
                                "try again")
      self.used += n
      self.peak = max(self.peak, self.used)
    try:
      yield
    finally:
      with self._cond:
        self.used -= n
        self._cond.notify_all()


def prepare_upload(run: rundir.LoadedRun, data: bytes, *, max_pixels: int,
                   window: str | None = None, name: str = "",
                   budget: PixelBudget | None = None, timeout: float | None = None) -> np.ndarray:
  """An uploaded file's bytes -> uint8 [S, S, C], exactly as xraytpu.predict prepares a file
  (`predict_lib.file_bytes` then `predict_lib.file_pixels`, on bytes instead of a path).

  window: the DICOM rendering (`predict_lib.parse_window`); None = the run's dicom_window.
  name: the upload's file name (a .dcm without the DICM preamble is DICOM too).
  The pixel count (width x height x frames) is checked from the header first, so
  a decompression bomb is refused before anything is decoded; with a `budget`,
  decoding waits (up to `timeout` s) until the image's pixels fit in it. DICOM is
  held like any image: its rendering stays within the same bytes per pixel
  (http_api.DECODE_BYTES_PER_PIXEL). Raises RequestError (4xx, 503).
  """
  if not data:
    raise RequestError(400, "empty file (0 bytes)")
  width, height, frames = header_size(data, name)
  count = width * height * frames
  if count > max_pixels:
    size = f"{width}x{height}" + (f"x{frames} frames" if frames > 1 else "")
    raise RequestError(413, f"image is {size} = {count} pixels, more than the "
                            f"server's limit of {max_pixels} (--max_pixels)")
  try:
    with budget.hold(count, timeout) if budget else contextlib.nullcontext():
      dicom_window = pixels.dicom_window_of(run.conversion, window)
      data = pixels.graph_input(data, dicom_window=dicom_window, name=name, max_pixels=max_pixels)
      return model_call.module_of(run).file_pixels(data, max_pixels=max_pixels)
  except pixels.ImageError as e:
    raise RequestError(_status(e.reason), e.reason) from None


@dataclasses.dataclass
class ImageResult:
  """The model's answer for one image: probabilities float64 [K], label index, Grad-CAM map or None."""
  probabilities: np.ndarray
  label_index: int
  cam: np.ndarray | None = None
  positive: np.ndarray | None = None     # multi-label: bool [K], each finding against its threshold


class App:
  """Everything a request needs; shared by the handler threads."""

  def __init__(self, run: rundir.LoadedRun, opts, static: dict[str, tuple[bytes, str]] | None = None):
    self.run, self.opts = run, opts
    self.module = model_call.module_of(run)
    self.card = card_lib.model_card(run, opts)
    self.static = static or {}
    self.batcher = Batcher(self._predict_batch, max_batch=opts.max_batch,
                           timeout_s=opts.batch_timeout_ms / 1000.0)
    self.decode_budget = PixelBudget(opts.decode_budget)
    self.requests = 0
    self._requests_lock = threading.Lock()
    self._cam = None
    self._cam_error: str | None = None

  def close(self) -> None:
    self.batcher.stop()

  def _gradcam(self):
    """Built on first use, in the worker thread (the only thread that runs the model)."""
    if self._cam is None and self._cam_error is None:
      from xraytpu.inference import gradcam
      try:
        self._cam = gradcam.GradCam(self.run.model)
      except ValueError as e:
        self._cam_error = str(e)
    return self._cam

  def _predict_batch(self, jobs: list[Job]) -> None:
    batch = np.concatenate([j.pixels for j in jobs])
    # Not checked here: a NaN answer is refused per request, in `predict` (one request's
    # image must not fail the others batched with it).
    out = self.module.predict_batches(batch, self.opts.max_batch, check=False)
    probs = out["probabilities"].astype(np.float64)
    multi = self.run.multi_label
    # Multi-label: the decision is per finding; Grad-CAM explains the most probable one.
    labels = probs.argmax(axis=1) if multi else out["label_index"]
    want = np.concatenate([np.full(len(j.pixels), j.gradcam) for j in jobs])
    cams: list[np.ndarray | None] = [None] * len(batch)
    if want.any() and self._gradcam() is not None:
      idx = np.flatnonzero(want)
      for i, m in zip(idx, self._cam(batch[idx], labels[idx])):
        cams[i] = m
    start = 0
    for job in jobs:
      n = len(job.pixels)
      job.finish([ImageResult(probs[i], int(labels[i]), cams[i],
                              out["positive"][i] if multi else None)
                  for i in range(start, start + n)])
      start += n

  def predict(self, files: Sequence[tuple[str, bytes]], *, gradcam: bool = False,
              window: str | None = None) -> dict[str, Any]:
    """[(filename, bytes)] -> the POST /v1/predict JSON. Raises RequestError (all or nothing)."""
    run = self.run
    images = []
    for i, (name, data) in enumerate(files):
      try:
        images.append(prepare_upload(run, data, max_pixels=self.opts.max_pixels, window=window,
                                     name=name, budget=self.decode_budget,
                                     timeout=self.opts.request_timeout_s))
      except RequestError as e:
        where = f"file {i + 1} of {len(files)}" + (f" ({name})" if name else "")
        where = where if len(files) > 1 else (name or "the image")
        raise RequestError(e.status, f"{where}: {e.message}", file=name, index=i) from None
    try:
      results = self.batcher.submit(Job(np.stack(images), gradcam)).wait(self.opts.request_timeout_s)
    except BatchTimeout as e:
      raise RequestError(503, str(e)) from None
    try:   # never a NaN in the answer (JSON has none: it would be a 500)
      model_call.check_finite(np.stack([r.probabilities for r in results]),
                              ", ".join(n for n, _ in files if n) or "the image")
    except model_call.NonFiniteOutput as e:
      raise RequestError(422, str(e)) from None
    predictions = []
    for i, ((name, _), r, pix) in enumerate(zip(files, results, images)):
      p = predict_lib.prediction(run, name, r.probabilities, label_index=r.label_index,
                                 positive=r.positive)
      if run.multi_label:
        item = {"index": i, "filename": name, "label": p.label, "findings": p.findings,
                "probabilities": p.probabilities, "thresholds": p.thresholds}
      else:
        item = {"index": i, "filename": name, "label": p.label, "label_index": r.label_index,
                "probability": p.probability, "probabilities": p.probabilities,
                "threshold": p.threshold}
      item["summary"] = p.line(run.classes).split("\t", 1)[1]
      if gradcam:
        item["gradcam_png_base64"] = None if r.cam is None else overlay_png_base64(pix, r.cam)
        if r.cam is None:
          item["gradcam_error"] = self._cam_error or "Grad-CAM unavailable for this model"
      predictions.append(item)
    card = self.card
    return {"model": card["model"], "task": card["task"], "classes": run.classes,
            "positive_class": card["positive_class"], "threshold": run.threshold,
            "thresholds": card.get("thresholds"), "threshold_policy": card["threshold_policy"],
            "threshold_source_split": card["threshold_source_split"], "disclaimer": card_lib.DISCLAIMER,
            "predictions": predictions}

  def count_request(self) -> None:
    with self._requests_lock:
      self.requests += 1

  def warm_up(self) -> None:
    """Traces the inference graph once (a black PNG of the model's input size)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("L", (self.run.size, self.run.size)).save(buf, format="PNG")
    out = self.module.predict_batches(self.module.file_pixels(buf.getvalue())[None], 1, check=False)
    # A model that answers NaN/inf is refused at start-up (rundir.load already refuses
    # non-finite weights; finite ones can still overflow).
    model_call.check_finite(out["probabilities"], "the start-up check's black image")

  def health(self) -> dict[str, Any]:
    b = self.batcher
    return {"status": "ok", "model": self.card["model"], "requests": self.requests,
            "images": b.images, "batches": b.batches,
            "mean_batch": round(b.images / b.batches, 2) if b.batches else None,
            "decode_budget": {"pixels": self.decode_budget.capacity,
                              "peak_pixels": self.decode_budget.peak}}


def overlay_png_base64(pixels: np.ndarray, cam: np.ndarray) -> str:
  """uint8 [S, S, C] + map [S, S] -> base64 PNG of gradcam.overlay (what predict --gradcam writes)."""
  from PIL import Image
  from xraytpu.inference import gradcam
  buf = io.BytesIO()
  Image.fromarray(gradcam.overlay(pixels, cam)).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode("ascii")
