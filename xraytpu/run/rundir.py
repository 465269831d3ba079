"""The run directory: its layout, and the one way to read and write it.

No other module spells a run-directory file name. Layout (`--model_dir`,
local or gs://):

  config.json        the resolved Config fields at top level (Config.from_dict reads it),
                     "status": "running" | "finished" | "failed", and "run": strategy, replicas,
                     batch sizes, library versions, manifest sha256, parameter counts,
                     and at the end the best validation AUC and epochs trained; a failed run
                     has "failure" (one line) and, when the loss became NaN/inf, "diverged"
                     {"epoch", "step"}; a finished run that collapsed (`collapse`) has
                     "collapsed" (one line)
  dataset.json       copy of the data set's manifest (classes in label order)
  training_films.json  content hashes of the train and val films (xraytpu.run.films)
  history.csv        one row per epoch: epoch, loss and metrics, val_*, lr,
                     images_per_sec, epoch_seconds (kept across resumes)
  logs/              TensorBoard event files (train/, validation/)
  checkpoints/best.weights.h5   weights of the epoch with the best val_auc
  backup/            Keras BackupAndRestore state while a phase runs (resume point);
                     phase1_done.weights.h5, phase<N>_plateau.json
  model.keras        the final model (architecture + weights, no optimizer)
  threshold.json     the operating point chosen by xraytpu.evaluate (see below)
  MODEL_CARD.md      the model card (xraytpu.run.model_card), written by xraytpu.evaluate
  eval/<dataset>-<split>/   report.json, report.md, predictions.csv, *.png
  export/<version>/  SavedModel; assets.extra/xraytpu.json (metadata), assets.extra/MODEL_CARD.md

An ensemble of runs is a directory too (xraytpu.run.ensemble): ensemble.json (its members),
and threshold.json, MODEL_CARD.md, eval/ and export/ as above; `load` loads one run, and
xraytpu.run.ensemble.load_model_dir a run, an ensemble (its runs with `load`) or A,B,....

threshold.json:
  {"threshold": 0.41,              # binary: P(positive) >= threshold -> positive; null for multi-class
   "thresholds": {"Effusion": 0.3, ...},   # multi-label: one per finding (then "threshold" is null)
   "policy": "youden",             # or "sensitivity:0.95", "fixed:0.5", "argmax" (multi-class)
   "source_split": "val", "source_data_dir": "...", "source_dataset": "chest_xray",
   "positive_class": "PNEUMONIA", "sensitivity": 0.95, "specificity": 0.71,
   "temperature": null,            # or T fitted on the source split (--temperature_scaling)
   "tta": "shift",                 # the test-time augmentation the threshold was chosen with
                                   # (evaluate --tta; config.TTA_PRESETS); absent = "none"
   "fallback_reason": null, "num_examples": 524, "created": "2026-11-23T18:00:00Z"}

`load(run_dir)` gives a `LoadedRun` (config, manifest, model, operating
point); `xraytpu.inference.model_call.InferenceModule.from_run` turns it into the one
way of calling the model.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
from typing import Any, Iterator

from tfrecord_tools import pixels
from tfrecord_tools import schema
from tfrecord_tools import errors as tools_errors
from tfrecord_tools import storage
from xraytpu import errors

CONFIG = "config.json"
MANIFEST_COPY = schema.MANIFEST_NAME
HISTORY = "history.csv"
LOGS = "logs"
CHECKPOINTS = "checkpoints"
BEST_WEIGHTS = os.path.join(CHECKPOINTS, "best.weights.h5")
BACKUP = "backup"
PHASE1_WEIGHTS = os.path.join(BACKUP, "phase1_done.weights.h5")
MODEL = "model.keras"
OPERATING_POINT = "threshold.json"
EVAL = "eval"
EXPORT = "export"
EXPORT_METADATA = os.path.join("assets.extra", "xraytpu.json")
MODEL_CARD = "MODEL_CARD.md"
TRAINING_FILMS = "training_films.json"   # content hashes of the train/val films (xraytpu.run.films)
ENSEMBLE = "ensemble.json"   # an ensemble directory's members (xraytpu.run.ensemble)
EXPORT_MODEL_CARD = os.path.join(os.path.dirname(EXPORT_METADATA), MODEL_CARD)
# Files of one evaluation report folder, eval/<dataset>-<split>/, by role.
EVAL_FILES = {
    "predictions": "predictions.csv", "report_json": "report.json", "report_md": "report.md",
    "roc": "roc.png", "pr": "pr.png", "calibration": "calibration.png",
    "confusion_matrix": "confusion_matrix.png", "samples": "samples.png", "history": "history.png",
}
# What a finished run holds; `clear` removes exactly these (never the folder).
_ENTRIES = (CONFIG, HISTORY, MANIFEST_COPY, MODEL, OPERATING_POINT, MODEL_CARD, TRAINING_FILMS, LOGS,
            CHECKPOINTS, BACKUP, EVAL, EXPORT, ENSEMBLE)

DEFAULT_THRESHOLD = 0.5
DEFAULT_POLICY = f"fixed:{DEFAULT_THRESHOLD}"   # what a run without threshold.json applies
# A threshold policy's third part, "sensitivity:0.95:lower": hold the target at the exact
# one-sided lower confidence bound of this level on val (xraytpu.evaluation.operating_point).
POLICY_LOWER = "lower"
POLICY_CONFIDENCE = 0.95
# Temperature scaling works on logits of probabilities clipped to [PROB_CLIP, 1 - PROB_CLIP]:
# the same clip where it is fitted (xraytpu.evaluation.metrics, numpy) and applied (model_call, TF).
PROB_CLIP = 1e-7
MULTI_LABEL = schema.MULTI_LABEL


class RunError(errors.UserError):
  """The run directory is missing, unfinished or unreadable; one line for the user."""


class WriteError(RunError):
  """A file of the run could not be written (a full disk, a quota, no permission): one line
  naming the file and the cause."""


@contextlib.contextmanager
def writing(path: str, hint: str = "") -> Iterator[None]:
  """Turns a failed write in the block into one WriteError line: 'cannot write PATH: No space
  left on device (ENOSPC); HINT'. A failed write is what tfrecord_tools.errors.write_failure
  recognises (an OSError, or an h5py or TensorFlow error naming the errno); other errors
  pass unchanged."""
  try:
    yield
    return
  except errors.UserError:
    raise
  except Exception as e:  # noqa: BLE001 - only write failures are turned into a line
    cause = tools_errors.write_failure(e)
    if cause is None:
      raise
    # Its own words for the errno (h5py's strerror is its whole message), raised outside the
    # except block and holding nothing of the error: the failed writer's frames (an h5py
    # file still open on the full disk) are let go, so its space is free again before the
    # run is marked failed.
    line = tools_errors.write_error_text(path, OSError(cause.errno, os.strerror(cause.errno)))
    cause = None
  raise WriteError(line + (f"; {hint}" if hint else ""))


def path(run_dir: str, name: str) -> str:
  """RUN/name (local or gs://)."""
  return storage.join(run_dir, name)


def backup_dir(run_dir: str, phase: int) -> str:
  return storage.join(run_dir, BACKUP, f"phase{phase}")


def plateau_state(run_dir: str, phase: int) -> str:
  return storage.join(run_dir, BACKUP, f"phase{phase}_plateau.json")


def eval_dir(run_dir: str, dataset: str, split: str) -> str:
  return storage.join(run_dir, EVAL, f"{dataset}-{split}")


def export_root(run_dir: str) -> str:
  return storage.join(run_dir, EXPORT)


# --------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------

def read_config(run_dir: str) -> dict | None:
  """config.json as a dict, or None when the folder holds no run."""
  p = path(run_dir, CONFIG)
  if not storage.exists(p):
    return None
  try:
    return json.loads(storage.read_text(p))
  except json.JSONDecodeError as e:
    raise RunError(f"{p} is not valid JSON ({e}); move the run directory away or pass --overwrite") from e


def is_ensemble(run_dir: str) -> bool:
  """Whether the folder is an ensemble's (it holds ENSEMBLE: xraytpu.run.ensemble)."""
  return storage.exists(path(run_dir, ENSEMBLE))


def name_of(run_dir: str) -> str:
  """A run (or ensemble) directory's short name, for people: its last folder's name."""
  return os.path.basename(os.path.normpath(run_dir))


def same_dir(a: str, b: str) -> bool:
  """Whether two run-directory paths name one folder (locally: after links and '..')."""
  if storage.is_remote(a) or storage.is_remote(b):
    return a.rstrip("/") == b.rstrip("/")
  return os.path.realpath(a) == os.path.realpath(b)


def run_config(run_dir: str, name: str = "", ensemble_why: str = "",
               hint: str = "train one first with python -m xraytpu.train") -> dict:
  """config.json of the run in run_dir, for what needs a run: one RunError line, starting with
  `name` (default "--model_dir=RUN") and ending with `hint`, when the folder is missing or holds
  no run, or, given `ensemble_why` (why one run is needed), when it is an ensemble's."""
  name = name or f"--model_dir={run_dir}"
  if ensemble_why and is_ensemble(run_dir):
    raise RunError(f"{name} is an ensemble of runs, not a run: {ensemble_why}; name one of its "
                   f"runs (listed in {path(run_dir, ENSEMBLE)})")
  doc = read_config(run_dir)
  if doc is None:
    missing = not storage.is_remote(run_dir) and not os.path.isdir(run_dir)
    raise RunError(f"{name} is not a run directory ({'no such folder' if missing else 'no ' + CONFIG}): "
                   f"{hint}")
  return doc


def write_config(run_dir: str, doc: dict) -> None:
  storage.write_text(path(run_dir, CONFIG), json.dumps(doc, indent=2, sort_keys=True, default=str))


def mark_failed(run_dir: str, reason: str, **details: Any) -> bool:
  """config.json's status becomes "failed" (with the one-line reason and `details`, e.g.
  diverged={"epoch": 1, "step": 3}) if the run was running. Returns whether it was written:
  on a disk that is still full it cannot be (the status then stays "running")."""
  try:
    doc = read_config(run_dir)
  except (RunError, OSError):
    return False
  if doc is None or doc.get("status") not in ("running", "failed"):
    return False
  doc["status"] = "failed"
  doc.setdefault("run", {}).update(failure=reason, **details)
  try:
    write_config(run_dir, doc)
  except OSError:
    return False
  return True


def write_manifest_copy(run_dir: str, manifest: dict) -> None:
  storage.write_text(path(run_dir, MANIFEST_COPY), json.dumps(manifest, indent=2, sort_keys=True))


def clear(run_dir: str) -> None:
  """Removes what a previous run wrote (only the known entries, never the folder).

  threshold.json too: an operating point chosen for the old model must never
  be applied to the new one.
  """
  for name in _ENTRIES:
    storage.remove_any(path(run_dir, name))


# --------------------------------------------------------------------------
# history.csv: the one reader and writer.
# --------------------------------------------------------------------------

def read_history(run_dir: str) -> list[dict]:
  """history.csv rows as dicts (epoch int, other columns float); [] when absent."""
  p = path(run_dir, HISTORY)
  if not storage.exists(p):
    return []
  rows = []
  for r in csv.DictReader(io.StringIO(storage.read_text(p))):
    rows.append({k: (int(v) if k == "epoch" else float(v)) for k, v in r.items() if v not in ("", None)})
  return rows


def write_history(run_dir: str, rows: list[dict]) -> None:
  keys = sorted({k for r in rows for k in r} - {"epoch"})
  out = io.StringIO()
  w = csv.DictWriter(out, fieldnames=["epoch"] + keys, lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow(r)
  storage.write_text(path(run_dir, HISTORY), out.getvalue())


# --------------------------------------------------------------------------
# What history.csv says about the training: the best epoch, a collapse.
# --------------------------------------------------------------------------

# A collapsed run: it finished with finite weights, yet learned nothing. The rule: its best
# monitored AUC (validation, or training without a val split) is within COLLAPSE_AUC_MARGIN
# of chance (0.5), AND its last epoch's training loss is over COLLAPSE_LOSS_FACTOR x ln K,
# the loss a model with no information starts from (K classes; 2 for a binary or
# multi-label task, whose loss is a mean of per-finding binary cross-entropies: ln 2 = 0.69).
# The model's output bias starts at the class priors, so its loss starts at ln K or below.
COLLAPSE_AUC_MARGIN = 0.05
COLLAPSE_LOSS_FACTOR = 10.0


def finite_rows(rows: list[dict]) -> list[dict]:
  """The epochs that ended with a finite training loss. In an epoch where the loss became
  NaN/inf, the weights (and the metrics measured with them) are meaningless: it is never
  the best epoch."""
  return [r for r in rows if "loss" not in r or math.isfinite(r["loss"])]


def best_row(rows: list[dict], monitor: str) -> dict | None:
  """The epoch with the highest finite `monitor` among `finite_rows`, or None."""
  scored = [r for r in finite_rows(rows) if math.isfinite(r.get(monitor, math.nan))]
  return max(scored, key=lambda r: r[monitor]) if scored else None


def monitor_of(doc: dict | None, rows: list[dict]) -> str:
  """The metric the run chose its best epoch by: config.json's, else val_auc when recorded, else auc."""
  recorded = ((doc or {}).get("run") or {}).get("monitor")
  if recorded:
    return recorded
  return "val_auc" if any("val_auc" in r for r in rows) else "auc"


def collapse(rows: list[dict], monitor: str, num_classes: int, task: str = "") -> str | None:
  """One line saying why the run collapsed (the rule above), or None when it did not."""
  best, last = best_row(rows, monitor), (finite_rows(rows) or [None])[-1]
  if best is None or last is None or "loss" not in last:
    return None
  k = 2 if task == MULTI_LABEL else max(int(num_classes or 2), 2)
  chance_loss = math.log(k)
  auc, loss = best[monitor], last["loss"]
  if abs(auc - 0.5) > COLLAPSE_AUC_MARGIN or loss <= COLLAPSE_LOSS_FACTOR * chance_loss:
    return None
  return (f"the run collapsed: its best {monitor} {auc:.3f} is within {COLLAPSE_AUC_MARGIN} of "
          f"chance (0.5) and its last training loss {loss:.4g} is over {COLLAPSE_LOSS_FACTOR:g} x "
          f"ln {k} = {COLLAPSE_LOSS_FACTOR * chance_loss:.2f}, where an untrained model starts: "
          "the model learned nothing usable; retrain with a lower --learning_rate")


def collapse_of(doc: dict | None, rows: list[dict]) -> str | None:
  """`collapse` for a run directory's config.json and history.csv rows (what train records
  in config.json, and what summary and the model card show, for runs of any age)."""
  info = (doc or {}).get("run") or {}
  if (doc or {}).get("status") != "finished":
    return None
  num_classes = info.get("num_classes") or len((info.get("manifest") or {}).get("classes") or ())
  return collapse(rows, monitor_of(doc, rows), num_classes, info.get("task", ""))


# --------------------------------------------------------------------------
# threshold.json
# --------------------------------------------------------------------------

def read_operating_point(run_dir: str) -> dict[str, Any] | None:
  p = path(run_dir, OPERATING_POINT)
  try:
    text = storage.read_text(p)
  except FileNotFoundError:
    return None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise RunError(f"{p} is not valid JSON ({e}); delete it and rerun xraytpu.evaluate") from e


def write_operating_point(run_dir: str, op: dict[str, Any]) -> str:
  p = path(run_dir, OPERATING_POINT)
  storage.write_bytes(p, (json.dumps(op, indent=2, sort_keys=True) + "\n").encode())
  return p


# --------------------------------------------------------------------------
# eval/*/report.json
# --------------------------------------------------------------------------

def eval_report_paths(run_dir: str) -> list[str]:
  """RUN/eval/*/report.json (sorted); [] when none or unreadable."""
  try:
    return sorted(storage.glob(storage.join(run_dir, EVAL, "*", EVAL_FILES["report_json"])))
  except (OSError, storage.StorageError):
    return []


# --------------------------------------------------------------------------
# A loaded run.
# --------------------------------------------------------------------------

@dataclasses.dataclass
class LoadedRun:
  """A run directory ready to predict.

  classes: label order (manifest["classes"]); binary when len == 2 (model
  output [B, 1] = P(classes[1])). size/channels/aspect: the model input
  (uint8 [B, size, size, channels]). conversion: the converter's arguments
  from the manifest (`pixels.conversion_args`), which the pixel contract
  replays for files that were never converted. operating_point: threshold.json or None.
  """
  model_dir: str
  cfg: Any
  manifest: dict
  model: Any
  classes: list[str]
  size: int
  channels: int
  aspect: str
  contract: int   # the pixel contract it reads with (Config.pixel_contract; pixels.READ_CONTRACTS)
  conversion: dict[str, Any]
  operating_point: dict[str, Any] | None
  # The run's InferenceModule once built (xraytpu.inference.model_call.module_of builds it: the
  # run directory knows nothing of TensorFlow graphs, so that dependency points one way).
  module_cache: Any = dataclasses.field(default=None, repr=False, compare=False)
  # An ensemble (xraytpu.run.ensemble): its member runs, loaded (their models are inside `model`,
  # which averages their raw outputs); [] for a run.
  members: list = dataclasses.field(default_factory=list, repr=False, compare=False)

  @property
  def is_ensemble(self) -> bool:
    return bool(self.members)

  @property
  def task(self) -> str:
    return task_of(self.manifest)

  @property
  def multi_label(self) -> bool:
    return self.task == MULTI_LABEL

  @property
  def binary(self) -> bool:
    return self.task == "binary"

  @property
  def thresholds(self) -> list[float] | None:
    """Multi-label: the frozen threshold of each finding (0.5 where none was chosen); else None."""
    if not self.multi_label:
      return None
    return thresholds_of(self.operating_point, self.classes)

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

  @property
  def tta(self) -> str:
    """The test-time augmentation the operating point was chosen with (config.TTA_PRESETS'
    name), which every caller of the model applies; config.DEFAULT_TTA when none is recorded."""
    from xraytpu import config  # noqa: PLC0415
    return (self.operating_point or {}).get("tta") or config.DEFAULT_TTA

  @property
  def has_operating_point(self) -> bool:
    op = self.operating_point or {}
    return bool(op.get("thresholds")) if self.multi_label else op.get("threshold") is not None


def task_of(manifest: dict) -> str:
  """"multi_label" (K findings, K sigmoids), "binary" (2 classes) or "multiclass": what a run
  trained on data with this manifest is asked."""
  if manifest.get("task") == MULTI_LABEL:
    return MULTI_LABEL
  return "binary" if len(manifest.get("classes") or ()) == 2 else "multiclass"


def thresholds_of(op: dict | None, findings: list[str]) -> list[float]:
  """A multi-label operating point's threshold per finding (DEFAULT_THRESHOLD where none)."""
  chosen = (op or {}).get("thresholds") or {}
  return [float(chosen.get(c, DEFAULT_THRESHOLD)) for c in findings]


def load(run_dir: str, weights: str = "best") -> LoadedRun:
  """Loads RUN: config.json, the manifest copy, the model, threshold.json.

  weights: "best" = checkpoints/best.weights.h5 when present (the epoch with the
  best validation AUC), else the final weights; "final" = model.keras as saved.
  The model is not compiled. Raises RunError for a missing or unfinished run, and for an
  ensemble's directory: one run only (xraytpu.run.ensemble.load_model_dir loads a run, an
  ensemble or A,B,..., and loads an ensemble's runs with this function).
  """
  if weights not in ("best", "final"):
    raise RunError(f"weights must be 'best' or 'final', got {weights!r}")
  if not storage.is_remote(run_dir) and not os.path.isdir(run_dir):
    raise RunError(f"--model_dir={run_dir}: no such run directory")
  doc = run_config(run_dir, ensemble_why="rundir.load loads one run (load an ensemble with "
                                         "xraytpu.run.ensemble.load_model_dir)")
  from absl import logging  # noqa: PLC0415
  from xraytpu import models as models_lib  # noqa: PLC0415 - TensorFlow loads here
  from xraytpu._keras import keras  # noqa: PLC0415
  from xraytpu.config import Config  # noqa: PLC0415
  from xraytpu.data import stats  # noqa: PLC0415
  cfg = Config.from_dict(doc)
  manifest = read_manifest(run_dir, cfg.data_dir)
  keras.mixed_precision.set_global_policy("float32")
  model_path, best_path = path(run_dir, MODEL), path(run_dir, BEST_WEIGHTS)
  try:
    if storage.exists(model_path):
      with storage.local_copy(model_path) as local:   # Keras reads local files (gs:// is copied)
        model = models_lib.load_model(local)
    else:
      if not storage.exists(best_path):
        if (doc.get("run") or {}).get("diverged"):
          raise RunError(f"the run in {run_dir} has no finite weights: {_failure(doc)}; no epoch "
                         "ended with finite weights, so there is nothing to use: retrain with a "
                         "lower --learning_rate (python -m xraytpu.train ... --overwrite)")
        raise RunError(f"{run_dir} has neither {MODEL} nor {BEST_WEIGHTS}: the run has not "
                       "finished an epoch")
      logging.warning("%s has no %s (unfinished run): rebuilding from %s", run_dir, MODEL, CONFIG)
      model = models_lib.build_model(
          dataclasses.replace(cfg, weights="none"), num_classes=len(manifest["classes"]),
          channels=cfg.channels or stats.input_channels(manifest, cfg), task=stats.task(manifest))
      weights = "best"
    if weights == "best" and storage.exists(best_path):
      try:
        with storage.local_copy(best_path) as local:
          model.load_weights(local)
      except (OSError, ValueError) as e:
        raise RunError(f"cannot load {best_path}: the file is incomplete or damaged (a write that "
                       f"stopped, e.g. on a full disk: {' '.join(str(e).split())[:200]}); rerun the "
                       "training command to resume the run, or delete the file to use "
                       f"{MODEL}") from None
  except RunError:
    raise
  except (OSError, ValueError) as e:
    raise RunError(f"cannot load the run in {run_dir}: {e}") from e
  bad = nonfinite_weights(model)
  if bad:
    why = f" ({_failure(doc)})" if (doc.get("run") or {}).get("failure") else ""
    raise RunError(f"the run in {run_dir} has weights that are not finite (NaN or inf, in "
                   f"{len(bad)} variable(s), e.g. {bad[0]}){why}: its outputs would be meaningless, "
                   "so predict, evaluate, export and serve refuse it; retrain with a lower "
                   "--learning_rate (python -m xraytpu.train ... --overwrite)")
  shape = model.inputs[0].shape
  return LoadedRun(
      model_dir=run_dir, cfg=cfg, manifest=manifest, model=model,
      classes=list(manifest["classes"]), size=int(shape[1]), channels=int(shape[-1]),
      aspect=getattr(cfg, "aspect", "squash"), contract=int(cfg.pixel_contract),
      conversion=pixels.conversion_args(manifest.get("args")),
      operating_point=read_operating_point(run_dir))


def read_manifest(run_dir: str, data_dir: str) -> dict:
  """The run's copy of its data set's manifest (dataset.json), else the data set's own."""
  copy = path(run_dir, MANIFEST_COPY)
  try:
    return (json.loads(storage.read_text(copy)) if storage.exists(copy)
            else schema.read_manifest(data_dir))
  except (OSError, ValueError) as e:
    raise RunError(f"cannot read the data set manifest of the run in {run_dir}: {e}") from e


def weights_sha256(run_dir: str) -> str | None:
  """The sha256 (hex) of the files a run's weights come from (model.keras, then the best
  weights), read in that order; None when the run has neither. The model card's version and
  an ensemble's record of its members (a member retrained later no longer matches)."""
  h = hashlib.sha256()
  found = False
  for name in (MODEL, BEST_WEIGHTS):
    p = path(run_dir, name)
    try:
      if not storage.exists(p):
        continue
      with storage.open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          h.update(block)
      found = True
    except (OSError, storage.StorageError):
      continue
  return h.hexdigest() if found else None


def nonfinite_weights(model) -> list[str]:
  """The names of the model's variables that hold a NaN or an inf ([] when all are finite)."""
  import numpy as np  # noqa: PLC0415
  return [w.name for w in model.weights if not np.all(np.isfinite(np.asarray(w.numpy(), np.float64)))]


def _failure(doc: dict) -> str:
  """config.json's recorded failure, as one short clause."""
  info = doc.get("run") or {}
  d = info.get("diverged")
  if d:
    return (f"training diverged: the loss became NaN/inf in epoch {int(d.get('epoch', 0)) + 1} "
            f"(step {d.get('step')})")
  return f"the run failed: {info.get('failure')}"

