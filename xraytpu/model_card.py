"""The model card: what a run's model is, how it was evaluated, what its numbers mean.

One place for the card's content, shown by `xraytpu.serve` (GET /v1/model and
the page) and by the export's metadata.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tfrecord_tools import storage
from xraytpu import rundir

DISCLAIMER = ("Not a diagnostic device. This is research software: its output is not a diagnosis, has "
              "not been cleared by any regulator, and must not be used to make clinical decisions.")

_CARD_METRICS = ("auc", "auc_ci", "pr_auc", "pr_auc_ci", "sensitivity", "sensitivity_ci", "specificity",
                 "specificity_ci", "ppv", "ppv_ci", "npv", "npv_ci", "accuracy", "accuracy_ci",
                 "micro_auc", "micro_auc_ci", "threshold", "threshold_policy", "threshold_source_split",
                 "threshold_source_dataset", "num_examples", "class_counts", "dataset", "split", "task",
                 "ci", "notes", "undefined", "created", "temperature")


def find_eval_report(run: rundir.LoadedRun) -> dict | None:
  """RUN/eval/<dataset>-<split>/report.json, preferring the training data's test split.

  Order: <training dataset>-test, any *-test, then any other report; the
  first that parses. None when the run has not been evaluated.
  """
  from xraytpu import evaluate_lib
  paths = rundir.eval_report_paths(run.model_dir)
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


def model_card(run: rundir.LoadedRun, opts=None) -> dict[str, Any]:
  """What the model is and what its numbers mean (GET /v1/model).

  {"model": "xray_cnn", "run": "<run folder name>", "task": "binary"|"multiclass"|"multi_label",
   "classes": [...], "positive_class": str|null,
   "input": {"size": S, "channels": C, "aspect": "squash", "dtype": "uint8"},
   "preprocessing": {the converter's arguments from the manifest (pixels.conversion_args)},
   "training_data": {"dataset": name, "splits": {split: {"num_examples": n, "class_counts": {...}}}},
   "threshold": float|null, "thresholds": {finding: float} (multi-label) | null, "threshold_policy": str, "threshold_source_split": str|null,
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
  has_op = run.has_operating_point or (bool(op) and run.task == "multiclass")
  needs_op = run.binary or run.multi_label
  card: dict[str, Any] = {
      "model": getattr(run.cfg, "model", None) or "unknown",
      "run": os.path.basename(os.path.normpath(run.model_dir)),
      "task": run.task,
      "classes": run.classes,
      "positive_class": run.classes[1] if run.binary else None,
      "input": {"size": run.size, "channels": run.channels, "aspect": run.aspect, "dtype": "uint8"},
      "preprocessing": run.conversion,
      "training_data": {"dataset": evaluate_lib.dataset_name(run.cfg.data_dir or "", manifest),
                        "splits": splits},
      "threshold": run.threshold,
      "thresholds": dict(zip(run.classes, run.thresholds)) if run.multi_label else None,
      "threshold_policy": op.get("policy") or ("fixed:0.5" if needs_op else "argmax"),
      "threshold_source_split": op.get("source_split"),
      "threshold_source_dataset": op.get("source_dataset"),
      "threshold_note": None if has_op or not needs_op else (
          f"no {rundir.OPERATING_POINT} in the run: the default threshold "
          f"{rundir.DEFAULT_THRESHOLD} is used; run python -m xraytpu.evaluate to choose one "
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
    if run.multi_label:
      t_report, t_now = report.get("thresholds"), dict(zip(run.classes, run.thresholds))
      ev["stale"] = t_report is not None and any(
          abs(float(t_report.get(c, t)) - t) > 1e-9 for c, t in t_now.items())
      ev["per_finding"] = {c: {k: d.get(k) for k in ("auc", "auc_ci", "sensitivity", "specificity",
                                                     "threshold")}
                           for c, d in (report.get("per_finding") or {}).items()}
    else:
      t_report, t_now = report.get("threshold"), run.threshold
      ev["stale"] = (t_report is not None and t_now is not None
                     and abs(float(t_report) - t_now) > 1e-9)
    if ev["stale"]:
      ev["notes"] = list(ev.get("notes") or []) + [
          f"this report used threshold {t_report}; {rundir.OPERATING_POINT} now says "
          f"{t_now}: rerun python -m xraytpu.evaluate"]
    card["evaluation"] = ev
  if opts is not None:
    card["limits"] = {"max_upload_mb": opts.max_upload_mb, "max_files": opts.max_files,
                      "max_pixels": opts.max_pixels}
  return card
