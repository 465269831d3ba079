"""Predict on image files with a trained run: the same pixels and the same model call
as every other door.

  file bytes ─(DICOM: tfrecord_tools.dicom -> PNG, rendered as the run's training
     │           data was (the manifest's dicom_window) unless --window says otherwise;
     │           TIFF/WebP -> PNG: `pixels.graph_input`)
     └─ xraytpu.inference.model_call.InferenceModule.file_pixels     the pixel contract (tfrecord_tools.pixels):
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

from tfrecord_tools import dicom
from tfrecord_tools import pixels
from tfrecord_tools import storage
from xraytpu import errors
from xraytpu.config import PredictConfig
from xraytpu.inference import model_call
from xraytpu.run import ensemble, rundir

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


class PredictError(errors.UserError):
  """A user mistake (missing run, bad flag); one line for the user."""


class InputError(errors.UserError):
  """One input file cannot be predicted (reported per file, the others go on)."""


# --------------------------------------------------------------------------
# Inputs: files, folders, DICOM.
# --------------------------------------------------------------------------


def _wanted(path: str) -> bool:
  """An image or DICOM file name, or a (regular) file without an extension that starts like
  DICOM."""
  if path.lower().endswith(IMAGE_EXTENSIONS + dicom.EXTENSIONS):
    return True
  if not dicom.worth_probing(path):
    return False
  try:
    return dicom.has_preamble(storage.read_input(path, 0, 132))
  except OSError:   # storage.NotRegularFileError included: a FIFO is not waited for
    return False


def expand_inputs(paths: Iterable[str]) -> list[tuple[str, str | None]]:
  """Files as given, folders walked (sorted) for image and DICOM files (.dcm, .dicom, and
  files without an extension that carry the DICM preamble).

  Returns [(path, error or None)]: paths as the os module takes them (outputs write them
  as `storage.escape_name` does); a missing path is an entry with an error. One that is no
  regular file (a FIFO, device or socket, itself or through a link) is listed like a file:
  `read_file` refuses it without opening it, as one per-file error.
  """
  out: list[tuple[str, str | None]] = []
  for p in paths:
    remote = storage.is_remote(p)
    if storage.isdir(p) if remote else os.path.isdir(p):
      if remote:   # one listing (gs://: google-cloud-storage)
        found = [(storage.join(p, rel), None) for rel, _, _ in storage.walk_files(p)
                 if _wanted(storage.join(p, rel))]
      else:
        found = []
        for root, dirs, files in os.walk(p):
          dirs.sort()
          for f in sorted(files):
            if _wanted(os.path.join(root, f)):
              found.append((os.path.join(root, f), None))
      if not found:
        out.append((p, "folder holds no image or DICOM files"))
      out.extend(found)
    elif remote or os.path.exists(p):   # a FIFO or device too: read_file refuses it
      out.append((p, None))
    else:
      out.append((p, "no such file or folder"))
  return out


def parse_window(window: str) -> str | None:
  """--dicom_window (or serve's ?dicom_window=): "" / "auto" -> None, the run's own dicom_window (how
  the converter rendered its training data); else viewer | full | file | none | CENTER,WIDTH |
  a preset, checked by `tfrecord_tools.dicom.parse_window`."""
  w = (window or "").strip().lower()
  if w in ("", "auto"):
    return None
  try:
    dicom.parse_window(w)
  except ValueError as e:
    raise PredictError(f"--dicom_window={e}") from None
  return w


def read_file(path: str) -> bytes:
  """An input file's bytes: a regular file only, never more than its size (storage.read_input)."""
  try:
    return storage.read_input(path)
  except storage.NotRegularFileError as e:
    raise InputError(e.strerror) from None
  except Exception as e:  # noqa: BLE001 - permissions, missing, remote errors
    raise InputError(f"cannot read ({storage.as_text(str(e))})") from None


def file_bytes(path: str, dicom_window: str = dicom.DEFAULT_WINDOW,
               max_pixels: int = PredictConfig.max_pixels) -> bytes:
  """A file's bytes as the inference graph takes them (`pixels.graph_input`: its size held
  against max_pixels from the header first; DICOM rendered with `dicom_window`, TIFF/WebP
  decoded, both to PNG); InputError when unusable or too large."""
  return graph_bytes(read_file(path), dicom_window, name=storage.escape_name(path), max_pixels=max_pixels)


def graph_bytes(data: bytes, dicom_window: str = dicom.DEFAULT_WINDOW, name: str = "",
                max_pixels: int = PredictConfig.max_pixels) -> bytes:
  """Encoded bytes as the inference graph takes them (see file_bytes); InputError when unusable."""
  try:
    return pixels.graph_input(data, dicom_window=dicom_window, name=name, max_pixels=max_pixels)
  except pixels.ImageError as e:
    raise InputError(e.reason) from None


def file_pixels(module, data: bytes, max_pixels: int = PredictConfig.max_pixels) -> np.ndarray:
  """Encoded file bytes -> uint8 [S, S, C] by the pixel contract; InputError when unusable."""
  try:
    return module.file_pixels(data, max_pixels=max_pixels)
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


def prediction(run: rundir.LoadedRun, path: str, probs, *, label_index: int | None = None,
               positive=None, gradcam: str | None = None) -> Prediction:
  """One image's Prediction from the module's outputs for it (`predict_batches`: its
  probabilities row, and label_index (single-label) or positive (multi-label)): the one
  place a result is assembled, for predict, serve and the Python API."""
  if run.multi_label:
    return multi_label_prediction(run, path, probs, positive, gradcam=gradcam)
  return Prediction(path=path, label=run.classes[label_index], probability=float(probs[label_index]),
                    probabilities={c: float(v) for c, v in zip(run.classes, probs)},
                    threshold=run.threshold, gradcam=gradcam)


def multi_label_prediction(run: rundir.LoadedRun, path: str, probs, positive,
                           gradcam: str | None = None) -> Prediction:
  """A multi-label result: every finding's probability, those at/above their thresholds."""
  findings = [c for c, on in zip(run.classes, positive) if on]
  return Prediction(path=path, label="|".join(findings) or model_call.NO_FINDING, probability=None,
                    probabilities={c: float(v) for c, v in zip(run.classes, probs)},
                    threshold=None, gradcam=gradcam, findings=findings,
                    thresholds=dict(zip(run.classes, run.thresholds)))


def load(model_dir: str) -> rundir.LoadedRun:
  """The run (its `module` is the inference path), an ensemble's directory, or the
  comma-separated runs averaged in memory (xraytpu.run.ensemble); PredictError when it cannot
  be loaded."""
  try:
    return ensemble.load_model_dir(model_dir)
  except rundir.RunError as e:
    raise PredictError(str(e)) from e


def model_dir_of(model_dir: str, ensemble_dir: str = "", writer: str = "") -> str:
  """--model_dir and --ensemble_dir -> the model directory to `load` (xraytpu.run.ensemble.resolve:
  an ensemble's folder created or reused); PredictError when refused."""
  try:
    return ensemble.resolve(model_dir, ensemble_dir, writer)
  except rundir.RunError as e:
    raise PredictError(str(e)) from e


def predict_files(run: rundir.LoadedRun, paths: Sequence[str], *,
                  dicom_window: str = PredictConfig.dicom_window,
                  gradcam_dir: str | None = None, batch_size: int = PredictConfig.batch_size,
                  progress=None, max_pixels: int = PredictConfig.max_pixels) -> list[Prediction]:
  """Predicts every input (folders expanded); failures are per file, never raised.

  dicom_window: how DICOM files are rendered (`parse_window`; auto: as the run's data was).
  progress: optional callable(Prediction) called as results arrive.
  max_pixels: an input whose header says more pixels is reported, not decoded.
  """
  dicom_window = pixels.dicom_window_of(run.conversion, parse_window(dicom_window))
  items = expand_inputs(paths)
  results: list[Prediction] = []
  cams: dict = {}
  pending: list[tuple[str, np.ndarray]] = []

  def flush():
    for r in predict_pixels(run, pending, gradcam_dir=gradcam_dir, batch_size=batch_size, cams=cams):
      results.append(r)
      if progress:
        progress(r)
    pending.clear()

  for path, error in items:
    name = storage.escape_name(path)   # how every output writes it: a name that is not UTF-8, escaped
    if error is None:
      try:
        data = file_bytes(path, dicom_window, max_pixels)
        pending.append((name, file_pixels(model_call.module_of(run), data, max_pixels)))
      except InputError as e:
        error = str(e)
    if error is not None:
      r = Prediction(path=name, error=error)
      results.append(r)
      if progress:
        progress(r)
    if len(pending) >= batch_size:
      flush()
  flush()
  order = {storage.escape_name(p): i for i, (p, _) in enumerate(items)}
  results.sort(key=lambda r: order.get(r.path, 0))
  return results


def predict_pixels(run: rundir.LoadedRun, named: Sequence[tuple[str, np.ndarray]], *,
                   gradcam_dir: str | None = None, batch_size: int = PredictConfig.batch_size,
                   cams: dict | None = None) -> list[Prediction]:
  """(name, uint8 [S, S, C] from `file_pixels`) pairs -> their Predictions, in order: the model
  call, the label at the run's operating point, and Grad-CAM PNGs when `gradcam_dir` is set
  (`cams` keeps the Grad-CAM model between calls)."""
  if not named:
    return []
  pix = np.stack([p for _, p in named])
  out = model_call.module_of(run).predict_batches(pix, batch_size)
  probs = out["probabilities"].astype(np.float64)
  # Multi-label: Grad-CAM explains the most probable finding.
  labels = probs.argmax(axis=1) if run.multi_label else out["label_index"]
  cam_paths: list[str | None] = [None] * len(named)
  if gradcam_dir:
    from xraytpu.inference import gradcam
    cams = {} if cams is None else cams
    cam = cams["cam"] = cams.get("cam") or gradcam.GradCam(run.model)
    cam_paths = _write_gradcams(cam, pix, labels, [p for p, _ in named], gradcam_dir, run)
  return [prediction(run, path, pr, label_index=int(lab),
                     positive=out["positive"][i] if run.multi_label else None, gradcam=cp)
          for i, ((path, _), pr, lab, cp) in enumerate(zip(named, probs, labels, cam_paths))]


def _write_gradcams(cam, pixels, labels, paths, out_dir, run) -> list[str]:
  from PIL import Image
  from xraytpu.inference import gradcam
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


def run_predict(model_dir: str, paths: Sequence[str], *,
                dicom_window: str = PredictConfig.dicom_window,
                output: str | None = None, gradcam_dir: str | None = None,
                batch_size: int = PredictConfig.batch_size, out=None, err=None,
                max_pixels: int = PredictConfig.max_pixels,
                ensemble_dir: str = PredictConfig.ensemble_dir) -> int:
  """The predict command: prints one line per input; returns the number that failed.

  out / err: where results and per-file errors go; None = sys.stdout / sys.stderr as they
  are when called (not when this module was imported: a caller may have redirected them)."""
  out = sys.stdout if out is None else out
  err = sys.stderr if err is None else err
  if not paths:
    raise PredictError("give at least one image, DICOM file or folder to predict")
  if output and not output.lower().endswith((".csv", ".jsonl")):
    raise PredictError(f"--output={output}: the file name must end in .csv or .jsonl")
  if max_pixels < 1:
    raise PredictError(f"--max_pixels={max_pixels}: must be >= 1")
  parse_window(dicom_window)  # fail before loading the model
  run = load(model_dir_of(model_dir, ensemble_dir))
  if gradcam_dir and run.is_ensemble:
    raise PredictError(f"--gradcam: not available for an ensemble of {len(run.members)} runs (Grad-CAM "
                       "explains one model's feature map); ask one of its runs")
  if (run.binary or run.multi_label) and not run.has_operating_point:
    print(f"note: {run.model_dir} has no {rundir.OPERATING_POINT}; using threshold {rundir.DEFAULT_THRESHOLD}. "
          "Run `python -m xraytpu.evaluate` to choose one on the validation split.", file=err)

  def show(r: Prediction):
    print(r.line(run.classes), file=err if r.error else out, flush=True)

  results = predict_files(run, paths, dicom_window=dicom_window, gradcam_dir=gradcam_dir,
                          batch_size=batch_size, progress=show, max_pixels=max_pixels)
  failed = sum(r.error is not None for r in results)
  if output:
    write_predictions(results, run.classes, output)
    print(f"wrote {len(results)} predictions to {output}", file=err)
  if gradcam_dir:
    print(f"Grad-CAM overlays in {gradcam_dir}", file=err)
  if failed:
    print(f"{failed} of {len(results)} inputs could not be predicted", file=err)
  return failed
