"""Predict on image files with a trained run: the same pixels and the same model call
as every other door.

  file bytes ─(DICOM only: pydicom -> windowed 16-bit PNG, see `dicom_to_png`)
     └─ xraytpu.inference.InferenceModule.file_pixels     the pixel contract (tfrecord_tools.pixels):
          │                                               the converter's steps replayed in the graph,
          │                                               then what the input pipeline does to a record
          └─ InferenceModule.predict_batches              model -> calibrated probabilities [K]
               └─ label at the frozen operating point     (RUN/threshold.json, chosen on val by
                                                          xraytpu.evaluate); multi-class argmax

The exported SavedModel's serving_default is the same InferenceModule, so a
client sending the file's bytes gets these numbers.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
from typing import Iterable, Sequence

import numpy as np

from tfrecord_tools import pixels
from tfrecord_tools import storage
from xraytpu import errors
from xraytpu import rundir
from xraytpu.config import PredictConfig

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


def file_bytes(path: str, window: tuple[float, float] | None = None) -> bytes:
  """A file's bytes as the inference graph takes them (DICOM first becomes a PNG)."""
  data = read_file(path)
  if is_dicom(data, path):
    data = dicom_to_png(data, window)
  return data


def file_pixels(module, data: bytes) -> np.ndarray:
  """Encoded file bytes -> uint8 [S, S, C] by the pixel contract; InputError when unusable."""
  try:
    return module.file_pixels(data)
  except pixels.ImageError as e:
    raise InputError(e.reason) from None


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
  findings: list[str] | None = None         # multi-label: the findings at/above their thresholds
  thresholds: dict[str, float] | None = None  # multi-label: each finding's threshold

  def line(self, classes: Sequence[str]) -> str:
    """'PNEUMONIA 0.93 (threshold 0.41)' style, prefixed with the path.

    Multi-label: 'Effusion 0.81 (>= 0.34), Edema 0.62 (>= 0.55)' or 'No Finding (highest:
    Effusion 0.21 < 0.34)'.
    """
    if self.error:
      return f"{self.path}\tERROR {self.error}"
    if self.findings is not None:
      p, t = self.probabilities, self.thresholds
      if self.findings:
        text = ", ".join(f"{c} {p[c]:.2f} (>= {t[c]:.2f})" for c in self.findings)
      else:
        top = max(p, key=lambda c: p[c] - t[c])
        text = f"{self.label} (closest: {top} {p[top]:.2f} < {t[top]:.2f})"
      return f"{self.path}\t{text}"
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


def multi_label_prediction(run: rundir.LoadedRun, path: str, probs, positive,
                           gradcam: str | None = None) -> Prediction:
  """A multi-label result: every finding's probability, those at/above their thresholds."""
  from xraytpu import inference
  findings = [c for c, on in zip(run.classes, positive) if on]
  return Prediction(path=path, label="|".join(findings) or inference.NO_FINDING, probability=None,
                    probabilities={c: float(v) for c, v in zip(run.classes, probs)},
                    threshold=None, gradcam=gradcam, findings=findings,
                    thresholds=dict(zip(run.classes, run.thresholds)))


def load(model_dir: str) -> rundir.LoadedRun:
  """The run (its `module` is the inference path); PredictError when it cannot be loaded."""
  try:
    return rundir.load(model_dir)
  except rundir.RunError as e:
    raise PredictError(str(e)) from e


def predict_files(run: rundir.LoadedRun, paths: Sequence[str], *, window: str = PredictConfig.window,
                  gradcam_dir: str | None = None, batch_size: int = PredictConfig.batch_size,
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
    out = run.module.predict_batches(pix, batch_size)
    probs = out["probabilities"].astype(np.float64)
    # Multi-label: Grad-CAM explains the most probable finding.
    labels = probs.argmax(axis=1) if run.multi_label else out["label_index"]
    cam_paths: list[str | None] = [None] * len(pending)
    if gradcam_dir:
      from xraytpu import gradcam
      cam = cam or gradcam.GradCam(run.model)
      cam_paths = _write_gradcams(cam, pix, labels, [p for p, _ in pending], gradcam_dir, run)
    for i, ((path, _), pr, lab, cp) in enumerate(zip(pending, probs, labels, cam_paths)):
      if run.multi_label:
        r = multi_label_prediction(run, path, pr, out["positive"][i], gradcam=cp)
      else:
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
        pending.append((path, file_pixels(run.module, file_bytes(path, win))))
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
  """FILE.csv (path, label, probability, prob_<class>..., threshold, gradcam, error) or FILE.jsonl.

  Multi-label: label holds the findings at/above their thresholds, "|"-joined (or "No Finding").
  """
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


def run_predict(model_dir: str, paths: Sequence[str], *, window: str = PredictConfig.window,
                output: str | None = None, gradcam_dir: str | None = None,
                batch_size: int = PredictConfig.batch_size, out=sys.stdout, err=sys.stderr) -> int:
  """The predict command: prints one line per input; returns the number that failed."""
  if not paths:
    raise PredictError("give at least one image, DICOM file or folder to predict")
  if output and not output.lower().endswith((".csv", ".jsonl")):
    raise PredictError(f"--output={output}: the file name must end in .csv or .jsonl")
  parse_window(window)  # fail before loading the model
  run = load(model_dir)
  if (run.binary or run.multi_label) and not run.has_operating_point:
    print(f"note: {model_dir} has no {rundir.OPERATING_POINT}; using threshold {rundir.DEFAULT_THRESHOLD}. "
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
