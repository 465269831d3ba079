"""Predict on image files with a trained run: the same pixels training saw.

One code path from a file to the model, shared with training and export:

  file bytes ─(DICOM only: pydicom -> windowed 16-bit PNG, see `dicom_to_png`)
     └─ tfrecord_tools.images.prepare_image(**manifest["args"])   what the converter stored
          └─ xraytpu.data.preprocess.load_image(channels, size, aspect)   what the input pipeline feeds
               └─ model -> probabilities [K] (binary: [1 - p, p]), temperature from threshold.json
                    └─ label: binary p >= frozen threshold (threshold.json, chosen on val by
                       xraytpu.evaluate); multi-class argmax

`LoadedRun` also carries the operating point used by xraytpu.evaluate and
xraytpu.export (`read_operating_point` / `write_operating_point`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
from typing import Any, Iterable, Sequence

import numpy as np

from tfrecord_tools import storage
from xraytpu import errors

OPERATING_POINT_FILE = "threshold.json"
DEFAULT_THRESHOLD = 0.5
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")

# Window presets for CT/X-ray DICOM, (center, width) in Hounsfield units.
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
WINDOW_HELP = ("DICOM windowing: 'auto' (the file's VOI LUT or window, else the full range), "
               f"a preset ({', '.join(WINDOWS)}), or 'CENTER,WIDTH'.")


class PredictError(errors.UserError):
  """A user mistake (missing run, bad flag); one line for the user."""


class InputError(errors.UserError):
  """One input file cannot be predicted (reported per file, the others go on)."""


# --------------------------------------------------------------------------
# The operating point: RUN/threshold.json.
# --------------------------------------------------------------------------
#
# {
#   "threshold": 0.41,              # binary: P(positive) >= threshold -> positive; null for multi-class
#   "policy": "youden",             # or "sensitivity:0.95", "fixed:0.5", "argmax" (multi-class)
#   "source_split": "val",          # the split it was chosen on (null for fixed/argmax)
#   "source_data_dir": "...", "source_dataset": "chest_xray",
#   "positive_class": "PNEUMONIA",  # binary only
#   "sensitivity": 0.95, "specificity": 0.71,   # achieved on the source split
#   "temperature": null,            # or T fitted on the source split (--temperature_scaling)
#   "fallback_reason": null,        # why the policy could not be applied (then threshold 0.5)
#   "num_examples": 524, "created": "2026-11-23T18:00:00Z"
# }


def read_operating_point(model_dir: str) -> dict[str, Any] | None:
  path = storage.join(model_dir, OPERATING_POINT_FILE)
  text = _read_text(path)
  if text is None:
    return None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise PredictError(f"{path} is not valid JSON ({e}); delete it and rerun xraytpu.evaluate") from e


def write_operating_point(model_dir: str, op: dict[str, Any]) -> str:
  path = storage.join(model_dir, OPERATING_POINT_FILE)
  storage.write_bytes(path, (json.dumps(op, indent=2, sort_keys=True) + "\n").encode())
  return path


def _read_text(path: str) -> str | None:
  """The file's text, or None when it does not exist."""
  try:
    return storage.read_text(path)
  except FileNotFoundError:
    return None


# --------------------------------------------------------------------------
# A loaded run.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedRun:
  """A run directory ready to predict.

  classes: label order (manifest["classes"]); binary when len == 2 (model
  output [B, 1] = P(classes[1])). size/channels/aspect: the model input
  (uint8 [B, size, size, channels]). prepare_args: the converter's
  prepare_image arguments from the manifest. operating_point: threshold.json
  or None.
  """
  model_dir: str
  cfg: Any
  manifest: dict
  model: Any
  classes: list[str]
  size: int
  channels: int
  aspect: str
  prepare_args: dict[str, Any]
  operating_point: dict[str, Any] | None

  @property
  def binary(self) -> bool:
    return len(self.classes) == 2

  @property
  def threshold(self) -> float | None:
    """The frozen binary threshold (0.5 when evaluate has not chosen one); None for multi-class."""
    if not self.binary:
      return None
    if self.operating_point and self.operating_point.get("threshold") is not None:
      return float(self.operating_point["threshold"])
    return DEFAULT_THRESHOLD

  @property
  def temperature(self) -> float | None:
    t = (self.operating_point or {}).get("temperature")
    return float(t) if t is not None else None


def prepare_args(manifest: dict) -> dict[str, Any]:
  """The converter's per-image arguments recorded in dataset.json (prepare_image kwargs)."""
  args = manifest.get("args") or {}
  out = {}
  for key in ("max_side", "channels", "image_format", "jpeg_quality"):
    if args.get(key) is not None:
      out[key] = args[key]
  if "max_side" in out:
    out["max_side"] = int(out["max_side"] or 0)
  if "channels" in out:
    out["channels"] = str(out["channels"])
  return out


def load(model_dir: str) -> LoadedRun:
  """Loads RUN (config.json, model.keras, the training manifest, threshold.json)."""
  from xraytpu import train_lib
  if not storage.isdir(model_dir):
    raise PredictError(f"--model_dir={model_dir}: no such run directory")
  try:
    cfg, manifest, model = train_lib.load_run(model_dir)
  except (OSError, ValueError) as e:
    raise PredictError(f"cannot load the run in {model_dir}: {e}") from e
  shape = model.inputs[0].shape
  return LoadedRun(
      model_dir=model_dir, cfg=cfg, manifest=manifest, model=model,
      classes=list(manifest["classes"]), size=int(shape[1]), channels=int(shape[-1]),
      aspect=getattr(cfg, "aspect", "squash"), prepare_args=prepare_args(manifest),
      operating_point=read_operating_point(model_dir))


def model_probabilities(run: LoadedRun, images, batch_size: int = 64) -> np.ndarray:
  """uint8 [n, S, S, C] -> float64 [n, K] class probabilities (binary: [1 - p, p]).

  Applies the run's temperature (threshold.json) when one was fitted.
  """
  images = np.asarray(images)
  outs = []
  for start in range(0, len(images), batch_size):
    out = run.model(images[start:start + batch_size], training=False)
    outs.append(np.asarray(out, dtype=np.float32))
  raw = np.concatenate(outs) if outs else np.zeros((0, 1 if run.binary else len(run.classes)), np.float32)
  return to_class_probabilities(raw, run.binary, run.temperature)


def to_class_probabilities(raw: np.ndarray, binary: bool, temperature: float | None) -> np.ndarray:
  """Model output -> [n, K] float64: binary [n, 1] P(positive) -> [1 - p, p]; optional temperature."""
  from xraytpu import metrics
  raw = np.asarray(raw, dtype=np.float64)
  if binary:
    p = raw.reshape(-1)
    if temperature is not None:
      p = metrics.apply_temperature(p, temperature)
    return np.stack([1.0 - p, p], axis=1)
  if temperature is not None:
    raw = metrics.apply_temperature(raw, temperature)
  return raw


def decide(probs: np.ndarray, threshold: float | None) -> np.ndarray:
  """[n, K] probabilities -> int [n] labels: binary p1 >= threshold, else argmax."""
  probs = np.asarray(probs)
  if probs.shape[1] == 2 and threshold is not None:
    return (probs[:, 1] >= threshold).astype(np.int64)
  return probs.argmax(axis=1).astype(np.int64)


# --------------------------------------------------------------------------
# Inputs: files, folders, DICOM.
# --------------------------------------------------------------------------


def expand_inputs(paths: Iterable[str]) -> list[tuple[str, str | None]]:
  """Files as given, folders walked (sorted) for image and DICOM files.

  Returns [(path, error or None)]; a missing path is an entry with an error.
  """
  out: list[tuple[str, str | None]] = []
  for p in paths:
    remote = storage.is_remote(p)
    if storage.isdir(p) if remote else os.path.isdir(p):
      if remote:   # one listing (gs://: google-cloud-storage)
        found = [storage.join(p, rel) for rel, _, _ in storage.walk_files(p)
                 if rel.lower().endswith(IMAGE_EXTENSIONS + DICOM_EXTENSIONS)]
      else:
        found = []
        for root, dirs, files in os.walk(p):
          dirs.sort()
          for f in sorted(files):
            if f.lower().endswith(IMAGE_EXTENSIONS + DICOM_EXTENSIONS):
              found.append(os.path.join(root, f))
      if not found:
        out.append((p, "folder holds no image or DICOM files"))
      out.extend((f, None) for f in found)
    elif remote or os.path.isfile(p):
      out.append((p, None))
    else:
      out.append((p, "no such file or folder"))
  return out


def is_dicom(data: bytes, path: str = "") -> bool:
  return data[128:132] == b"DICM" or path.lower().endswith(DICOM_EXTENSIONS)


def parse_window(window: str) -> tuple[float, float] | None:
  """'auto'/'' -> None; a preset name or 'CENTER,WIDTH' -> (center, width)."""
  w = (window or "auto").strip().lower()
  if w == "auto":
    return None
  if w in WINDOWS:
    return WINDOWS[w]
  try:
    center, width = (float(v) for v in w.split(","))
  except ValueError:
    raise PredictError(f"--window={window}: expected auto, {', '.join(WINDOWS)} or CENTER,WIDTH") from None
  if width <= 0:
    raise PredictError(f"--window={window}: width must be positive")
  return center, width


def dicom_pixels(ds, window: tuple[float, float] | None = None) -> np.ndarray:
  """A DICOM data set (pydicom Dataset or any object with the same attributes) -> image.

  Steps: first frame of a multi-frame image; RescaleSlope/RescaleIntercept
  (-> e.g. Hounsfield units); then the window: the given (center, width), else
  the file's VOI LUT (pydicom's apply_voi_lut, when ds is a real Dataset) or
  WindowCenter/WindowWidth, else the full range; MONOCHROME1 (white = low) is
  inverted so bright means dense as in MONOCHROME2.
  Returns uint16 [H, W] (grayscale, full 16-bit range) or uint8 [H, W, 3] (RGB).
  """
  arr = np.asarray(ds.pixel_array)
  photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
  frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
  if frames > 1:
    arr = arr[0]
  if arr.ndim == 3 and arr.shape[-1] == 3:  # colour (RGB / YBR already converted by pydicom)
    if arr.dtype != np.uint8:
      arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr
  if arr.ndim != 2:
    raise InputError(f"unsupported DICOM pixel array shape {arr.shape}")
  x = arr.astype(np.float64)
  slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
  intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
  x = x * slope + intercept
  if window is None:
    voi = _file_voi(ds, arr)
    if voi is not None:
      x = voi
    else:
      center, width = _first(getattr(ds, "WindowCenter", None)), _first(getattr(ds, "WindowWidth", None))
      if center is not None and width is not None and width > 0:
        window = (center, width)
  if window is not None:
    center, width = window
    lo, hi = center - width / 2.0, center + width / 2.0
    unit = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
  else:
    lo, hi = float(x.min()), float(x.max())
    unit = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
  if photometric == "MONOCHROME1":
    unit = 1.0 - unit
  return np.round(unit * 65535.0).astype(np.uint16)


def _first(v) -> float | None:
  """A DICOM value that may be multi-valued (pydicom MultiValue) -> its first float."""
  if v is None:
    return None
  if not isinstance(v, (str, bytes)) and hasattr(v, "__len__"):
    v = v[0] if len(v) else None
  try:
    return float(v)
  except (TypeError, ValueError):
    return None


def _file_voi(ds, arr) -> np.ndarray | None:
  """A VOI LUT sequence applied by pydicom, or None when absent / not a pydicom Dataset."""
  if not hasattr(ds, "VOILUTSequence"):
    return None
  try:
    try:
      from pydicom.pixels import apply_voi_lut
    except ImportError:
      from pydicom.pixel_data_handlers.util import apply_voi_lut
    return np.asarray(apply_voi_lut(arr, ds), dtype=np.float64)
  except Exception:  # noqa: BLE001 - a broken LUT falls back to the window
    return None


def dicom_to_png(data: bytes, window: tuple[float, float] | None = None) -> bytes:
  """DICOM file bytes -> PNG bytes (16-bit grayscale or 8-bit RGB), via `dicom_pixels`."""
  try:
    import pydicom
  except ImportError:
    raise InputError("DICOM input needs pydicom: pip install 'xraytpu[dicom]' (or pydicom)") from None
  from PIL import Image
  try:
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    pixels = dicom_pixels(ds, window)
  except InputError:
    raise
  except Exception as e:  # noqa: BLE001 - pydicom raises many types for corrupt files
    raise InputError(f"unreadable DICOM ({type(e).__name__}: {e})") from None
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def read_file(path: str) -> bytes:
  try:
    return storage.read_bytes(path)
  except Exception as e:  # noqa: BLE001 - permissions, missing, remote errors
    raise InputError(f"cannot read ({e})") from None


def prepare_file(run: LoadedRun, path: str, window: tuple[float, float] | None = None) -> bytes:
  """A file's bytes as the converter would have stored them (DICOM first becomes a PNG)."""
  from tfrecord_tools import images as images_lib
  data = read_file(path)
  if is_dicom(data, path):
    data = dicom_to_png(data, window)
  try:
    return images_lib.prepare_image(data, **run.prepare_args).encoded
  except images_lib.ImageError as e:
    raise InputError(e.reason) from None


def encoded_to_pixels(run: LoadedRun, encoded: bytes) -> np.ndarray:
  """Encoded PNG/JPEG -> uint8 [S, S, C]: the input pipeline's own load_image."""
  import tensorflow as tf
  from xraytpu.data import preprocess
  try:
    img = preprocess.load_image(tf.constant(encoded), channels=run.channels, size=run.size,
                                aspect=run.aspect)
    return img.numpy()
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    raise InputError(f"cannot decode ({e.message.splitlines()[0] if e.message else e})") from None


# --------------------------------------------------------------------------
# Predicting files.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Prediction:
  """One input's result; `error` set (and the rest None) when it could not be predicted."""
  path: str
  label: str | None = None
  probability: float | None = None          # of `label`
  probabilities: dict[str, float] | None = None
  threshold: float | None = None            # binary: applied to P(positive class)
  gradcam: str | None = None
  error: str | None = None

  def line(self, classes: Sequence[str]) -> str:
    """'PNEUMONIA 0.93 (threshold 0.41)' style, prefixed with the path."""
    if self.error:
      return f"{self.path}\tERROR {self.error}"
    if self.threshold is None:
      return f"{self.path}\t{self.label} {self.probability:.2f}"
    pos = classes[1]
    p = self.probabilities[pos]
    d = 2  # enough digits that the comparison with the threshold shows
    while d < 6 and round(p, d) == round(self.threshold, d):
      d += 1
    if self.label == pos:
      text = f"{self.label} {self.probability:.{d}f} (threshold {self.threshold:.{d}f})"
    else:
      text = f"{self.label} {self.probability:.{d}f} ({pos} {p:.{d}f} < threshold {self.threshold:.{d}f})"
    return f"{self.path}\t{text}"


def predict_files(run: LoadedRun, paths: Sequence[str], *, window: str = "auto",
                  gradcam_dir: str | None = None, batch_size: int = 32,
                  progress=None) -> list[Prediction]:
  """Predicts every input (folders expanded); failures are per file, never raised.

  progress: optional callable(Prediction) called as results arrive.
  """
  win = parse_window(window)
  items = expand_inputs(paths)
  results: list[Prediction] = []
  cam = None
  pending: list[tuple[str, np.ndarray]] = []

  def flush():
    nonlocal cam
    if not pending:
      return
    pix = np.stack([p for _, p in pending])
    probs = model_probabilities(run, pix, batch_size)
    labels = decide(probs, run.threshold)
    cam_paths: list[str | None] = [None] * len(pending)
    if gradcam_dir:
      from xraytpu import gradcam
      cam = cam or gradcam.GradCam(run.model)
      cam_paths = _write_gradcams(cam, pix, labels, [p for p, _ in pending], gradcam_dir, run)
    for (path, _), pr, lab, cp in zip(pending, probs, labels, cam_paths):
      r = Prediction(path=path, label=run.classes[lab], probability=float(pr[lab]),
                     probabilities={c: float(v) for c, v in zip(run.classes, pr)},
                     threshold=run.threshold, gradcam=cp)
      results.append(r)
      if progress:
        progress(r)
    pending.clear()

  for path, error in items:
    if error is None:
      try:
        pending.append((path, encoded_to_pixels(run, prepare_file(run, path, win))))
      except InputError as e:
        error = str(e)
    if error is not None:
      r = Prediction(path=path, error=error)
      results.append(r)
      if progress:
        progress(r)
    if len(pending) >= batch_size:
      flush()
  flush()
  order = {p: i for i, (p, _) in enumerate(items)}
  results.sort(key=lambda r: order.get(r.path, 0))
  return results


def _write_gradcams(cam, pixels, labels, paths, out_dir, run) -> list[str]:
  from PIL import Image
  from xraytpu import gradcam
  maps = cam(pixels, labels)
  out = []
  for img, m, path, lab in zip(pixels, maps, paths, labels):
    stem = os.path.splitext(os.path.basename(path))[0]
    target = os.path.join(out_dir, f"{stem}.gradcam-{run.classes[lab]}.png")
    n = 1
    while target in out or storage.exists(target):  # same file name in two folders
      n += 1
      target = os.path.join(out_dir, f"{stem}-{n}.gradcam-{run.classes[lab]}.png")
    buf = io.BytesIO()
    Image.fromarray(gradcam.overlay(img, m)).save(buf, format="PNG")
    storage.write_bytes(target, buf.getvalue())
    out.append(target)
  return out


def write_predictions(results: Sequence[Prediction], classes: Sequence[str], path: str) -> str:
  """FILE.csv (path, label, probability, prob_<class>..., threshold, gradcam, error) or FILE.jsonl."""
  if path.lower().endswith(".jsonl"):
    text = "".join(json.dumps(dataclasses.asdict(r), sort_keys=True) + "\n" for r in results)
  elif path.lower().endswith(".csv"):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "probability", *[f"prob_{c}" for c in classes], "threshold",
                "gradcam", "error"])
    for r in results:
      probs = [("" if r.probabilities is None else f"{r.probabilities[c]:.6f}") for c in classes]
      w.writerow([r.path, r.label or "", "" if r.probability is None else f"{r.probability:.6f}",
                  *probs, "" if r.threshold is None else r.threshold, r.gradcam or "",
                  r.error or ""])
    text = buf.getvalue()
  else:
    raise PredictError(f"--output={path}: the file name must end in .csv or .jsonl")
  storage.write_bytes(path, text.encode("utf-8"))
  return path


def run_predict(model_dir: str, paths: Sequence[str], *, window: str = "auto",
                output: str | None = None, gradcam_dir: str | None = None,
                batch_size: int = 32, out=sys.stdout, err=sys.stderr) -> int:
  """The predict command: prints one line per input; returns the number that failed."""
  if not paths:
    raise PredictError("give at least one image, DICOM file or folder to predict")
  if output and not output.lower().endswith((".csv", ".jsonl")):
    raise PredictError(f"--output={output}: the file name must end in .csv or .jsonl")
  parse_window(window)  # fail before loading the model
  run = load(model_dir)
  if run.binary and not (run.operating_point and run.operating_point.get("threshold") is not None):
    print(f"note: {model_dir} has no {OPERATING_POINT_FILE}; using threshold {DEFAULT_THRESHOLD}. "
          "Run `python -m xraytpu.evaluate` to choose one on the validation split.", file=err)

  def show(r: Prediction):
    print(r.line(run.classes), file=err if r.error else out, flush=True)

  results = predict_files(run, paths, window=window, gradcam_dir=gradcam_dir,
                          batch_size=batch_size, progress=show)
  failed = sum(r.error is not None for r in results)
  if output:
    write_predictions(results, run.classes, output)
    print(f"wrote {len(results)} predictions to {output}", file=err)
  if gradcam_dir:
    print(f"Grad-CAM overlays in {gradcam_dir}", file=err)
  if failed:
    print(f"{failed} of {len(results)} inputs could not be predicted", file=err)
  return failed
