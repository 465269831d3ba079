"""Clinical evaluation of a trained run on one split of a converted data set.

  evaluate(model_dir, split="test") ->
    RUN/threshold.json                      the operating point, chosen on the training data's
                                            VAL split (never on the split being reported)
    RUN/eval/<dataset>-<split>/
      predictions.csv   filename, true_label, prob_<class>..., predicted_label, correct
      report.json       the numbers (keys below), report.md the same for people (report_md)
      roc.png pr.png confusion_matrix.png calibration.png samples.png history.png

The operating point: binary tasks call P(positive) >= threshold positive, with
the threshold chosen by `threshold_policy` (see xraytpu.evaluation.metrics:
youden | sensitivity:X | specificity:X | fixed:X; sensitivity:X:lower and
specificity:X:lower hold X at the 95% exact lower confidence bound) on the val split of the data
the run was trained on, written to RUN/threshold.json and then applied
unchanged to whatever split / data set is evaluated. An existing
threshold.json is reused unless another policy (or temperature setting, or
test-time augmentation) is asked for. Multi-class tasks predict the argmax.
`tta` (config.TTA_PRESETS) averages the model's outputs over views of each image
(xraytpu.inference.tta): the threshold is chosen with it, threshold.json records
it, and predict, serve and export apply it. `temperature_scaling` fits a
temperature on val (metrics.fit_temperature) and applies it everywhere
(predict and export read it from threshold.json too).

report.json keys (stable; `null` when undefined, with the reason in `undefined`):
  report_version, task ("binary" | "multiclass"), model_dir, data_dir, dataset, split,
  classes, positive_class (binary; null otherwise), num_examples, class_counts {class: n},
  auc, auc_ci [lo, hi]          binary ROC AUC; multi-class macro one-vs-rest AUC
  micro_auc, micro_auc_ci       multi-class only (null for binary)
  pr_auc, pr_auc_ci             binary average precision; multi-class macro AP (no CI)
  threshold, threshold_policy, threshold_source_split, threshold_source_dataset,
  threshold_fallback_reason     (multi-class: threshold null, policy "argmax")
  threshold_evidence            what the threshold rests on, on val (operating_point.threshold_evidence):
                                {positives, negatives, sensitivity, sensitivity_ci,
                                sensitivity_lower_bound, specificity, ..., target {metric, value,
                                requested_at, cases, needed, lower_bound, met}, warning}; null when
                                not chosen on data (multi-label: per_finding[f].threshold_evidence)
  sensitivity, specificity, ppv, npv, accuracy, f1, each with <name>_ci
                                binary: at the threshold; multi-class: the macro average
                                of one-vs-rest values (accuracy: overall), CI for accuracy only
  confusion_matrix [[...]]      rows = true class, columns = predicted, in `classes` order
                                (binary: [[TN, FP], [FN, TP]])
  tp, fp, tn, fn                binary only (null otherwise)
  per_class {class: {auc, auc_ci, sensitivity, specificity, ppv, npv, f1, support}}
  brier, ece, temperature, brier_uncalibrated, ece_uncalibrated
  tta                           the test-time augmentation applied ("none", "zoom", "shift")
  classification_report         scikit-learn's, as a dict
  ci {method, level, resamples, seed}, undefined {key: reason}, notes [..], files {name: file}
  data_change                   null, or (--allow_data_change) how the run's training data changed
                                since training: {data_dir, differences [..], trained_digest, digest}
  subgroups, subgroups_info     per sex / age band / view (and --metadata_columns attribute):
                                AUC, sensitivity, specificity with CIs (xraytpu.evaluation.subgroups);
                                {} when the data records no attributes
  training_overlap              the evaluated films the run trained on, by content hash
                                (xraytpu.run.films): {checked, num_films, without_hash, in_train,
                                in_val, reason (why not checked)}

The data: the run's training data is checked against the fingerprint recorded in
config.json at training (schema.data_fingerprint / fingerprint_differences, the check
a resume makes). When it changed (converted again, e.g. with another --seed, so
"test" may now hold films the model trained on) and this evaluation reads it (its
split, or its val split for a new threshold), the evaluation is refused with one
line naming the change, unless allow_data_change. Other data (data_dir=OTHER) is
evaluated as it is; for every evaluation the films of the split are looked up in
the run's list of training films (RUN/training_films.json, written at training) and
the count that the model trained on is reported (a note, a warning on stderr).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import time
from typing import Any, Sequence

import numpy as np
from absl import logging

from tfrecord_tools import schema, storage
from xraytpu import config, errors
from xraytpu.config import EvalConfig
from xraytpu.evaluation import metrics, multilabel, operating_point, plots, report_md, subgroups
from xraytpu.evaluation.training_data import TrainingData, training_data, training_overlap
from xraytpu.inference import model_call, predict_lib
from xraytpu.run import model_card, reports, rundir

REPORT_VERSION = 1
DEFAULT_POLICY = "youden"
THRESHOLD_SPLIT = "val"
_KEEP_IMAGES = 64  # images kept in memory for the sample grid


class EvaluateError(errors.UserError):
  """A user mistake (missing split, class mismatch, bad policy); one line for the user."""


@dataclasses.dataclass
class SplitPredictions:
  """Model outputs on one split, in record order.

  filenames [n] (record image/filename); labels int [n] in the RUN's class
  order; raw float32 [n, 1 | K] the model's outputs; probs float64 [n, K]
  before any temperature (binary: [1 - p, p]); images: {row index: uint8
  [S, S, C]} for the first few rows.
  """
  dataset: str
  data_dir: str
  split: str
  filenames: list[str]
  labels: np.ndarray
  raw: np.ndarray
  probs: np.ndarray
  images: dict[int, np.ndarray]
  mask: np.ndarray | None = None     # multi-label: bool [n, K], False where the label is ignored


def class_probabilities(run: rundir.LoadedRun, raw: np.ndarray, *, temperature: float | None = None,
                        threshold: float | None = None,
                        thresholds: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Model outputs -> (probabilities float64 [n, K], the decision) through the run's
  InferenceModule (the one calibration and decision; it is left set to these values).

  The decision is the label index [n] (single-label) or, multi-label, bool [n, K]:
  each finding against its threshold (`thresholds` [K]; None keeps the module's).
  """
  import tensorflow as tf  # noqa: PLC0415
  module = model_call.module_of(run)
  module.set_operating_point(threshold, temperature, thresholds)
  out = module.decide(tf.constant(np.asarray(raw, np.float32)))
  decision = out["positive"] if run.multi_label else out["label_index"]
  return out["probabilities"].numpy().astype(np.float64), decision.numpy()


# --------------------------------------------------------------------------
# Data and predictions.
# --------------------------------------------------------------------------


def match_classes(run_classes: Sequence[str], data_classes: Sequence[str], data_dir: str = "") -> np.ndarray:
  """Maps the data set's label indices to the run's, by class name.

  Exact names first, then case-insensitive. Every class of the data set must
  be known to the model (a subset is fine: e.g. a test set without COVID-19).
  Returns int [len(data_classes)] with the run index of each data class.
  """
  exact = {c: i for i, c in enumerate(run_classes)}
  folded = {c.casefold(): i for i, c in enumerate(run_classes)}
  out, unknown = [], []
  for c in data_classes:
    i = exact.get(c, folded.get(str(c).casefold()))
    if i is None:
      unknown.append(c)
    out.append(-1 if i is None else i)
  if unknown:
    where = f" in {data_dir}" if data_dir else ""
    raise EvaluateError(
        f"class mismatch: the data set{where} has classes {list(data_classes)}, the model was "
        f"trained on {list(run_classes)} ({', '.join(map(repr, unknown))} unknown to the model); "
        "convert the data with matching class folder names (tfrecord_tools.convert --class_map)")
  return np.array(out, dtype=np.int64)


def predict_split(run: rundir.LoadedRun, data_dir: str, split: str, *, manifest: dict | None = None,
                  batch_size: int = 0) -> SplitPredictions:
  """Runs the model over every record of `split` (input pipeline in eval mode, record order)."""
  from tfrecord_tools import schema
  from xraytpu.data import input_pipeline, integrity
  try:
    manifest = manifest or schema.read_manifest(data_dir)
    schema.split_info(manifest, split)
  except schema.ManifestError as e:
    raise EvaluateError(str(e)) from e
  multi = run.multi_label
  if multi:
    if manifest.get("task") != rundir.MULTI_LABEL:
      raise EvaluateError(f"{data_dir} is a single-label data set; the run predicts {len(run.classes)} "
                          "findings (multi-label): evaluate it on multi-label data")
    cols = multilabel.match_findings(run.classes, manifest["classes"], data_dir, EvaluateError)
  else:
    if manifest.get("task") == rundir.MULTI_LABEL:
      raise EvaluateError(f"{data_dir} is a multi-label data set; the run is single-label")
    mapping = match_classes(run.classes, manifest["classes"], data_dir)
  # What the run's model sees; the run's tf.data thread and RAM settings, nothing cached.
  spec = input_pipeline.InputSpec(image_size=run.size, channels=run.channels, aspect=run.aspect,
                                  pixel_contract=run.contract,
                                  private_threads=run.cfg.private_threads,
                                  ram_budget_mb=run.cfg.ram_budget_mb)
  ds = input_pipeline.eval_dataset(data_dir, split, spec,
                                   batch_size=batch_size or run.cfg.batch_size or 32,
                                   with_filenames=True, manifest=manifest,
                                   label_mode="multi_label" if multi else "int")
  total = int(schema.split_info(manifest, split).get("num_examples", 0))
  raws, labels, names, images = [], [], [], {}
  start, last_log, seen = time.time(), time.time(), 0
  with integrity.named_data_errors(data_dir, manifest, (split,)):
    for image, label, filename in ds:
      raws.append(model_call.module_of(run).raw(image).numpy())
      labels.append(label.numpy() if multi else mapping[label.numpy()])
      names.extend(f.decode("utf-8", "replace") for f in filename.numpy())
      img = image.numpy()
      for j in range(img.shape[0]):
        if seen + j < _KEEP_IMAGES:
          images[seen + j] = img[j]
      seen += img.shape[0]
      if time.time() - last_log > 10:
        last_log = time.time()
        logging.info("%s: %d/%d images (%.0f images/s)", split, seen, total, seen / (last_log - start))
  integrity.check_count(data_dir, split, seen, total)
  k = len(run.classes)
  raw = np.concatenate(raws) if raws else np.zeros((0, 1 if run.binary else k), np.float32)
  model_call.check_finite(raw, f"the {split} split of {data_dir}")   # one line, not a NaN report
  logging.info("%s: %d images predicted in %.1fs", split, seen, time.time() - start)
  mask = None
  if multi:
    y = np.concatenate(labels) if labels else np.zeros((0, 2 * len(manifest["classes"])), np.float32)
    y, mask = multilabel.align(*multilabel.split_labels(y, len(manifest["classes"])),
                                        cols)
  else:
    y = np.concatenate(labels) if labels else np.zeros(0, np.int64)
  return SplitPredictions(
      dataset=reports.dataset_name(data_dir, manifest), data_dir=data_dir, split=split, filenames=names,
      labels=y, raw=raw, probs=class_probabilities(run, raw)[0], images=images, mask=mask)


# --------------------------------------------------------------------------
# The operating point.
# --------------------------------------------------------------------------


def _wants_new(existing: dict | None, policy: str | None, temperature_scaling: bool | None,
               binary: bool, multi_label: bool = False) -> bool:
  if not existing:
    return True
  if multi_label != bool(existing.get("thresholds")):
    return True  # written for the other kind of task
  if binary and (existing.get("threshold") is None or existing.get("policy") == "argmax"):
    return True  # e.g. written for another task, or edited by hand
  if policy is not None and operating_point.canonical_policy(policy) != existing.get("policy"):
    return True
  if temperature_scaling is not None and temperature_scaling != (existing.get("temperature") is not None):
    return True
  return False


def choose_operating_point(run: rundir.LoadedRun, val: SplitPredictions | None, policy: str,
                           temperature_scaling: bool) -> dict[str, Any]:
  """Chooses threshold (binary) and temperature on `val`; returns the threshold.json dict."""
  op: dict[str, Any] = {
      "threshold": None, "policy": "argmax", "source_split": None, "source_data_dir": None,
      "source_dataset": None, "positive_class": None, "sensitivity": None, "specificity": None,
      "temperature": None, "temperature_fit": None, "fallback_reason": None, "num_examples": None,
      "evidence": None, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  if val is not None:
    op.update(source_split=val.split, source_data_dir=val.data_dir, source_dataset=val.dataset,
              num_examples=int(val.labels.size))
  probs = None if val is None else val.probs
  if temperature_scaling:
    if val is None:
      raise EvaluateError("--temperature_scaling needs a val split in the training data")
    fit = metrics.fit_temperature(val.labels, probs[:, 1] if run.binary else probs)
    op["temperature_fit"] = fit.to_dict()
    if fit.reason is None:
      op["temperature"] = fit.temperature
      probs = class_probabilities(run, val.raw, temperature=fit.temperature)[0]
  if not run.binary:
    return op
  op["positive_class"] = run.classes[1]
  pol = operating_point.parse_threshold_policy(policy)
  op["policy"] = pol.name
  if pol.kind == "fixed" and val is None:
    op["threshold"] = pol.target
    return op
  choice = operating_point.choose_threshold(val.labels, probs[:, 1], policy)
  if choice.threshold is not None and choice.reason:  # a lower bound val is too small for
    op["fallback_reason"] = choice.reason
    logging.warning("threshold policy %s on %s: %s", op["policy"], val.split, choice.reason)
  if choice.threshold is None:
    op.update(threshold=rundir.DEFAULT_THRESHOLD, fallback_reason=choice.reason)
    logging.warning("threshold policy %s failed on %s (%s): using %s", op["policy"], val.split,
                    choice.reason, rundir.DEFAULT_THRESHOLD)
    choice = operating_point.choose_threshold(val.labels, probs[:, 1], rundir.DEFAULT_POLICY)
  op.update(threshold=choice.threshold, sensitivity=choice.sensitivity, specificity=choice.specificity,
            evidence=operating_point.threshold_evidence(val.labels, probs[:, 1], choice.threshold, policy))
  return op


def _evidence_notes(op: dict[str, Any]) -> list[str]:
  """A note per threshold whose val split is too small for the requested point (its
  evidence's warning; multi-label: per finding), unless its fallback note says it already."""
  items = [("the threshold", op.get("evidence"), op.get("fallback_reason"))]
  items += [(f"the {c} threshold", e.get("evidence"), e.get("fallback_reason"))
            for c, e in (op.get("per_finding") or {}).items()]
  return [f"{what} ({op.get('policy')} on {op.get('source_split')}): {ev['warning']}"
          for what, ev, fallback in items
          if ev and ev.get("warning") and ev["warning"] not in (fallback or "")]


def resolve_operating_point(run: rundir.LoadedRun, *, policy: str | None,
                            temperature_scaling: bool | None, batch_size: int = 0,
                            cache: dict | None = None,
                            trained: TrainingData | None = None,
                            tta: str | None = None) -> dict[str, Any]:
  """The run's threshold.json, (re)chosen on the training data's val split when needed.

  policy None / temperature_scaling None = keep what threshold.json says (or
  the defaults youden / off when there is none). `cache` may hold val
  predictions already computed ({(data_dir, split): SplitPredictions}). `trained`: the
  training data checked (`training_data`); its val split is read only if unchanged, or
  changed and allowed. tta None = keep the run's test-time augmentation; another one
  chooses a new operating point with it (the run's module is rebuilt with it first).
  """
  if policy is not None:
    try:
      operating_point.parse_threshold_policy(policy)
    except ValueError as e:
      raise EvaluateError(str(e)) from e
  existing = run.operating_point
  tta = run.tta if tta is None else tta
  if tta == run.tta and not _wants_new(existing, policy, temperature_scaling, run.binary,
                                       run.multi_label):
    logging.info("using the operating point in %s (policy %s, chosen on %s)",
                 rundir.OPERATING_POINT, existing.get("policy"), existing.get("source_split"))
    return existing
  policy = policy or (existing or {}).get("policy") or DEFAULT_POLICY
  if policy == "argmax":
    policy = DEFAULT_POLICY
  if temperature_scaling is None:
    temperature_scaling = bool(existing and existing.get("temperature") is not None)
  model_call.module_of(run, tta=tta)   # val is predicted, and the threshold chosen, with it
  data_dir = run.cfg.data_dir
  needs_val = temperature_scaling or ((run.binary or run.multi_label)
                                      and operating_point.parse_threshold_policy(policy).kind != "fixed")
  val = None
  manifest = run.manifest
  if needs_val:
    trained = trained or training_data(run)
    manifest = trained.check(f"'{THRESHOLD_SPLIT}' split, on which the threshold is chosen,") or manifest
    if not data_dir or not _has_split(manifest, THRESHOLD_SPLIT):
      raise EvaluateError(
          f"the run's training data ({data_dir or 'unknown'}) has no '{THRESHOLD_SPLIT}' split to "
          f"choose the threshold on; convert with a validation split, or use "
          f"--threshold_policy={rundir.DEFAULT_POLICY} (and no --temperature_scaling)")
    key = (data_dir, THRESHOLD_SPLIT)
    if cache is not None and key in cache:
      val = cache[key]
    else:
      val = predict_split(run, data_dir, THRESHOLD_SPLIT, manifest=manifest, batch_size=batch_size)
      if cache is not None:
        cache[key] = val
  if run.multi_label:
    op = multilabel.choose_operating_point(run, val, policy, temperature_scaling,
                                                    class_probabilities, EvaluateError)
  else:
    op = choose_operating_point(run, val, policy, temperature_scaling)
  op["tta"] = tta
  path = rundir.write_operating_point(run.model_dir, op)
  run.operating_point = op
  logging.info("operating point written to %s: threshold %s (%s on %s)", path, op["threshold"],
               op["policy"], op["source_split"])
  return op


# --------------------------------------------------------------------------
# The data the run was trained on (xraytpu.evaluation.training_data).
# --------------------------------------------------------------------------


def _overlap_notes(overlap: dict, split: str, same: bool) -> list[str]:
  """The report's notes about its films the run trained on (loud: also logged as warnings)."""
  if not overlap["checked"]:
    return [f"not checked whether these films were in training: {overlap['reason']}"]
  n, notes = overlap["num_films"], []
  if overlap["in_train"]:
    whose = "this is the run's own training split" if same and split == "train" else (
        "these numbers overstate how the model does on films it has not seen")
    notes.append(f"{overlap['in_train']} of {n} {split} films were in the run's training split "
                 f"(same content hash): {whose}")
  if overlap["in_val"] and not (same and split == THRESHOLD_SPLIT):
    notes.append(f"{overlap['in_val']} of {n} {split} films were in the run's val split (which "
                 "chose the best epoch and the threshold)")
  if overlap["without_hash"]:
    notes.append(f"{overlap['without_hash']} of {n} {split} films carry no content hash "
                 "(image/sha256): not checked against the training films")
  for note in notes[:2]:
    logging.warning("%s", note)
  return notes


def _has_split(manifest: dict, split: str) -> bool:
  info = (manifest.get("splits") or {}).get(split)
  return bool(info and int(info.get("num_examples", 0)) > 0)


# --------------------------------------------------------------------------
# The report.
# --------------------------------------------------------------------------


def compute_report(classes: Sequence[str], labels: np.ndarray, probs: np.ndarray, op: dict[str, Any],
                   *, raw_probs: np.ndarray | None = None, n_resamples: int = metrics.DEFAULT_RESAMPLES,
                   seed: int = metrics.DEFAULT_SEED) -> dict[str, Any]:
  """The numbers of report.json (without the file/data description keys).

  labels int [n]; probs [n, K] after temperature; raw_probs before it (for
  the *_uncalibrated keys; defaults to probs).
  """
  k = len(classes)
  binary = k == 2
  labels = np.asarray(labels, dtype=np.int64)
  raw_probs = probs if raw_probs is None else raw_probs
  undefined: dict[str, str] = {}
  r: dict[str, Any] = {"task": "binary" if binary else "multiclass", "classes": list(classes),
                       "positive_class": classes[1] if binary else None,
                       "num_examples": int(labels.size),
                       "class_counts": {c: int((labels == i).sum()) for i, c in enumerate(classes)}}

  def put(name: str, m: metrics.Metric, with_ci: bool = True):
    r[name] = m.value
    if with_ci:
      r[f"{name}_ci"] = list(m.ci) if m.ci else None
    if m.reason:
      undefined[name] = m.reason

  kw = dict(n_resamples=n_resamples, seed=seed)
  if binary:
    y, p = labels, probs[:, 1]
    put("auc", metrics.roc_auc(y, p, **kw))
    put("pr_auc", metrics.pr_auc(y, p, **kw))
    r["micro_auc"], r["micro_auc_ci"] = None, None
    threshold = float(op["threshold"])
    at = metrics.metrics_at_threshold(y, p, threshold, **kw)
    for name in metrics.THRESHOLD_METRICS:
      put(name, at[name])
    r["confusion_matrix"] = at["confusion_matrix"]
    r.update(tp=at["tp"], fp=at["fp"], tn=at["tn"], fn=at["fn"])
    pred = (p >= threshold).astype(np.int64)
  else:
    pred = probs.argmax(axis=1)
    mc = metrics.multiclass_auc(labels, probs, classes, **kw)
    put("auc", mc["macro"])
    put("micro_auc", mc["micro"])
    aps = []
    for i in range(k):
      m = metrics.pr_auc((labels == i).astype(int), probs[:, i], ci=False)
      if m.value is not None:
        aps.append(m.value)
    r["pr_auc"] = float(np.mean(aps)) if aps else None
    r["pr_auc_ci"] = None
    if not aps:
      undefined["pr_auc"] = "no class has positive examples"
    rates = metrics.per_class_rates(labels, pred, k)
    for name in ("sensitivity", "specificity", "ppv", "npv", "f1"):
      vals = [rates[i][name] for i in range(k) if rates[i][name] is not None]
      r[name] = float(np.mean(vals)) if vals else None
      r[f"{name}_ci"] = None
      if not vals:
        undefined[name] = "undefined for every class"
    correct = (pred == labels).astype(np.float64)
    acc = float(correct.mean()) if labels.size else None
    ci, why = (metrics.bootstrap_ci(lambda _y, c: float(c.mean()), labels, correct, n_resamples, seed)
               if labels.size else (None, "no examples"))
    r["accuracy"], r["accuracy_ci"] = acc, list(ci) if ci else None
    if why:
      undefined["accuracy"] = why
    r["confusion_matrix"] = metrics.confusion_matrix(labels, pred, k).tolist()
    r.update(tp=None, fp=None, tn=None, fn=None)
    r["per_class"] = {}
    for i, c in enumerate(classes):
      m = mc["per_class"][c]
      r["per_class"][c] = {"auc": m.value, "auc_ci": list(m.ci) if m.ci else None,
                           **{n: rates[i][n] for n in ("sensitivity", "specificity", "ppv", "npv", "f1")},
                           "support": int((labels == i).sum())}
      if m.reason:
        undefined[f"per_class.{c}.auc"] = m.reason
  if binary:
    r["per_class"] = {}
    rates = metrics.per_class_rates(labels, pred, 2)
    for i, c in enumerate(classes):
      r["per_class"][c] = {"auc": r["auc"], "auc_ci": r["auc_ci"],
                           **{n: rates[i][n] for n in ("sensitivity", "specificity", "ppv", "npv", "f1")},
                           "support": int((labels == i).sum())}
  r.update(threshold=op.get("threshold"), threshold_policy=op.get("policy"),
           threshold_source_split=op.get("source_split"),
           threshold_source_dataset=op.get("source_dataset"),
           threshold_fallback_reason=op.get("fallback_reason"),
           threshold_evidence=op.get("evidence"))
  cal = probs[:, 1] if binary else probs
  raw_cal = raw_probs[:, 1] if binary else raw_probs
  put("brier", metrics.brier_score(labels, cal), with_ci=False)
  put("ece", metrics.expected_calibration_error(labels, cal), with_ci=False)
  r["temperature"] = op.get("temperature")
  r["brier_uncalibrated"] = metrics.brier_score(labels, raw_cal).value
  r["ece_uncalibrated"] = metrics.expected_calibration_error(labels, raw_cal).value
  if labels.size:
    r["classification_report"], r["_classification_report_text"] = metrics.classification_report(
        labels, pred, classes)
  else:
    r["classification_report"], r["_classification_report_text"] = {}, ""
  r["ci"] = {"method": "stratified percentile bootstrap", "level": 0.95, "resamples": n_resamples,
             "seed": seed}
  r["undefined"] = undefined
  r["_pred"] = pred
  return r


def evaluate(model_dir: str, *, data_dir: str = EvalConfig.data_dir, split: str = EvalConfig.split,
             threshold_policy: str | None = EvalConfig.threshold_policy,
             temperature_scaling: bool | None = EvalConfig.temperature_scaling,
             n_resamples: int = EvalConfig.bootstrap_resamples, seed: int = EvalConfig.bootstrap_seed,
             batch_size: int = EvalConfig.batch_size, out_dir: str = EvalConfig.out_dir,
             write_plots: bool = EvalConfig.plots,
             allow_data_change: bool = EvalConfig.allow_data_change,
             tta: str | None = EvalConfig.tta,
             ensemble_dir: str = EvalConfig.ensemble_dir) -> dict[str, Any]:
  """Evaluates RUN on `split` of `data_dir` (default: the run's training data).

  write_plots=False skips the PNGs (report.json/md and predictions.csv are
  always written). allow_data_change: evaluate the run's training data even when it
  changed since training (module docstring: "The data"); the change is in the report.
  model_dir may name several runs, comma-separated, with ensemble_dir (xraytpu.run.ensemble):
  the ensemble is evaluated, its operating point and reports written into ensemble_dir.
  tta: test-time augmentation (config.TTA_PRESETS; None = keep threshold.json's).

  Returns the report dict (as written to report.json) with "report_dir" added.
  """
  if threshold_policy is not None:  # fail before loading anything
    try:
      operating_point.parse_threshold_policy(threshold_policy)
    except ValueError as e:
      raise EvaluateError(str(e)) from e
  if n_resamples < 1:
    raise EvaluateError(f"bootstrap resamples must be >= 1, got {n_resamples}")
  if tta is not None and tta not in config.TTA_PRESETS:
    raise EvaluateError(f"--tta={tta}: choose one of {', '.join(config.TTA_PRESETS)}")
  try:
    run = predict_lib.load(predict_lib.model_dir_of(model_dir, ensemble_dir, writer="xraytpu.evaluate"))
  except predict_lib.PredictError as e:
    raise EvaluateError(str(e)) from e
  model_dir = run.model_dir   # the ensemble's folder when given a list of runs
  data_dir = data_dir or run.cfg.data_dir
  if not data_dir:
    raise EvaluateError("no --data_dir given and the run's config.json names none")
  cache: dict = {}
  trained = training_data(run, allow_data_change)
  same = os.path.normpath(data_dir) == os.path.normpath(run.cfg.data_dir or "")
  manifest = (trained.check(f"'{split}' split") or run.manifest) if same else None
  op = resolve_operating_point(run, policy=threshold_policy, temperature_scaling=temperature_scaling,
                               batch_size=batch_size, cache=cache, trained=trained, tta=tta)
  if manifest is None:
    try:
      manifest = schema.read_manifest(data_dir)
      schema.split_info(manifest, split)
    except schema.ManifestError as e:
      raise EvaluateError(str(e)) from e
  key = (run.cfg.data_dir, split)
  if same and key in cache:
    preds = cache[key]
  else:
    preds = predict_split(run, data_dir, split, manifest=manifest, batch_size=batch_size)
  notes = []
  provenance = {"data_change": trained.change(),
                "training_overlap": training_overlap(run, trained, data_dir, manifest, split)}
  if provenance["data_change"]:
    notes.append(f"evaluated with --allow_data_change: the run's training data {trained.data_dir} "
                 f"changed since training ({'; '.join(trained.differences)}); films the model "
                 "trained on may be among those evaluated here")
  notes += _overlap_notes(provenance["training_overlap"], split, same)
  if same and split == op.get("source_split"):
    notes.append(f"the threshold was chosen on this same split ({split}): its numbers are optimistic")
  if op.get("fallback_reason"):
    notes.append(f"threshold policy {op['policy']} could not be applied on "
                 f"{op.get('source_split')}: {op['fallback_reason']}; threshold {op['threshold']} used")
  notes += _evidence_notes(op)
  if tta is None and run.tta != config.DEFAULT_TTA:   # kept, as --temperature_scaling is: say so once
    notes.append(f"test-time augmentation '{run.tta}' kept from threshold.json (an earlier "
                 "evaluate chose the threshold with it); --tta=none drops it")
  if run.multi_label:
    return _with_model_card(run, _evaluate_multilabel(run, preds, op, notes, data_dir=data_dir,
                                                      split=split, n_resamples=n_resamples, seed=seed,
                                                      out_dir=out_dir, write_plots=write_plots,
                                                      provenance=provenance))
  # Calibrated probabilities at the operating point, by the one inference path.
  probs, _ = class_probabilities(run, preds.raw, temperature=op.get("temperature"),
                                 threshold=op.get("threshold"))
  rep = compute_report(run.classes, preds.labels, probs, op, raw_probs=preds.probs,
                       n_resamples=n_resamples, seed=seed)
  rep.update(subgroups.for_report(preds, manifest, task=rep["task"], classes=run.classes,
                                  probs=probs, op=op, n_resamples=n_resamples, seed=seed,
                                  notes=notes))
  pred = rep.pop("_pred")
  report_text = rep.pop("_classification_report_text")
  missing = [c for c, n in rep["class_counts"].items() if n == 0]
  if missing:
    notes.append(f"no {split} examples of {', '.join(missing)}")
  out_dir = out_dir or rundir.eval_dir(model_dir, preds.dataset, split)
  report = {"report_version": REPORT_VERSION, "model_dir": model_dir, "data_dir": data_dir,
            "dataset": preds.dataset, "split": split, **rep, "tta": run.tta, **provenance,
            "notes": notes,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  files = {k: rundir.EVAL_FILES[k] for k in ("predictions", "report_json", "report_md")}
  _write_predictions(storage.join(out_dir, files["predictions"]), run.classes, preds, probs, pred)
  if write_plots:
    files.update(_write_plots(out_dir, run, preds, probs, pred, report))
  return _with_model_card(run, _write_report(report, files, out_dir,
                                             report_md.render_markdown(report, report_text)))


def _with_model_card(run: rundir.LoadedRun, report: dict) -> dict:
  """RUN/MODEL_CARD.md rewritten now that the run has a new report (xraytpu.run.model_card)."""
  logging.info("model card written to %s", model_card.write(run))
  return report


def _write_report(report: dict, files: dict, out_dir: str, markdown_fn) -> dict:
  """report.json and report.md (markdown_fn(report) renders it) into out_dir; the report."""
  report["files"] = files
  report = metrics.to_jsonable(report)
  storage.write_bytes(storage.join(out_dir, files["report_json"]),
                      (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
  text = markdown_fn(report) if callable(markdown_fn) else markdown_fn
  storage.write_bytes(storage.join(out_dir, files["report_md"]), text.encode("utf-8"))
  report["report_dir"] = out_dir
  return report


def _evaluate_multilabel(run: rundir.LoadedRun, preds: SplitPredictions, op: dict, notes: list, *,
                         data_dir: str, split: str, n_resamples: int, seed: int, out_dir: str,
                         write_plots: bool, provenance: dict | None = None) -> dict:
  """evaluate()'s second half for a multi-label run (xraytpu.evaluation.multilabel)."""
  probs, positive = class_probabilities(run, preds.raw, temperature=op.get("temperature"),
                                        thresholds=rundir.thresholds_of(op, run.classes))
  rep = multilabel.compute_report(run.classes, preds.labels, preds.mask, probs, op,
                                           n_resamples=n_resamples, seed=seed)
  rep.update(subgroups.for_report(preds, None, task=rep["task"], classes=run.classes,
                                  probs=probs, op=op, n_resamples=n_resamples, seed=seed,
                                  notes=notes))
  fallbacks = {c: e["fallback_reason"] for c, e in (op.get("per_finding") or {}).items()
               if e.get("fallback_reason")}
  for c, why in fallbacks.items():
    notes.append(f"threshold policy {op['policy']} could not be applied to {c} on "
                 f"{op.get('source_split')}: {why}; threshold {op['thresholds'].get(c)} used")
  unlabelled = [c for j, c in enumerate(run.classes) if not preds.mask[:, j].any()]
  if unlabelled:
    notes.append(f"not labelled in {split}: {', '.join(unlabelled)}")
  out_dir = out_dir or rundir.eval_dir(run.model_dir, preds.dataset, split)
  report = {"report_version": REPORT_VERSION, "model_dir": run.model_dir, "data_dir": data_dir,
            "dataset": preds.dataset, "split": split, **rep, "tta": run.tta, **(provenance or {}),
            "notes": notes,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  files = {k: rundir.EVAL_FILES[k] for k in ("predictions", "report_json", "report_md")}
  multilabel.write_predictions(storage.join(out_dir, files["predictions"]), run.classes,
                                        preds, probs, positive)
  if write_plots:
    files.update(multilabel.write_plots(out_dir, run, preds, probs, positive, rep))
    hist = plots.training_history(rundir.read_history(run.model_dir),
                                  storage.join(out_dir, rundir.EVAL_FILES["history"]))
    if hist:
      files["history"] = rundir.EVAL_FILES["history"]
  return _write_report(report, files, out_dir, report_md.render_markdown)


def _write_predictions(path, classes, preds: SplitPredictions, probs, pred):
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["filename", "true_label", *[f"prob_{c}" for c in classes], "predicted_label", "correct"])
  for name, y, p, yhat in zip(preds.filenames, preds.labels, probs, pred):
    w.writerow([name, classes[y], *[f"{v:.6f}" for v in p], classes[yhat], int(y == yhat)])
  storage.write_bytes(path, buf.getvalue().encode("utf-8"))


def _write_plots(out_dir, run, preds: SplitPredictions, probs, pred, report) -> dict[str, str]:
  files: dict[str, str] = {}
  classes = run.classes
  y = preds.labels
  tag = f"{preds.dataset} {preds.split}"
  if run.binary:
    p = probs[:, 1]
    curve = metrics.roc_curve(y, p)
    if curve is not None:
      op_point = None
      if report["sensitivity"] is not None and report["specificity"] is not None:
        op_point = (1 - report["specificity"], report["sensitivity"])
      plots.roc({f"AUC {reports.fmt(report['auc'])}": curve}, storage.join(out_dir, rundir.EVAL_FILES["roc"]),
                title=f"ROC, {tag}", operating_point=op_point,
                op_label=f"threshold {report['threshold']:.3f} ({report['threshold_policy']} on "
                         f"{report['threshold_source_split'] or 'fixed'})")
      files["roc"] = rundir.EVAL_FILES["roc"]
    pr = metrics.pr_curve(y, p)
    if pr is not None:
      plots.precision_recall({f"AP {reports.fmt(report['pr_auc'])}": pr}, storage.join(out_dir, rundir.EVAL_FILES["pr"]),
                             prevalence=float(y.mean()), title=f"Precision-recall, {tag}",
                             operating_point=(report["sensitivity"], report["ppv"]),
                             op_label=f"threshold {report['threshold']:.3f}")
      files["pr"] = rundir.EVAL_FILES["pr"]
    bins = metrics.calibration_bins(y, p)
    extra = None
    if report.get("temperature") is not None:
      extra = {"before temperature scaling": metrics.calibration_bins(y, preds.probs[:, 1])}
    plots.reliability(bins, storage.join(out_dir, rundir.EVAL_FILES["calibration"]),
                      title=f"Calibration, {tag} (ECE {reports.fmt(report['ece'])})",
                      xlabel=f"predicted P({classes[1]})", ylabel=f"observed fraction {classes[1]}",
                      extra=extra)
  else:
    entries = [(c, reports.fmt(report["per_class"][c]["auc"]), (y == i).astype(int), probs[:, i])
               for i, c in enumerate(classes)]
    written = plots.roc_and_pr_per_class(
        entries, storage.join(out_dir, rundir.EVAL_FILES["roc"]),
        storage.join(out_dir, rundir.EVAL_FILES["pr"]),
        roc_title=f"One-vs-rest ROC, {tag} (macro AUC {reports.fmt(report['auc'])})",
        pr_title=f"One-vs-rest PR, {tag}")
    files.update({k: rundir.EVAL_FILES[k] for k in written})
    plots.reliability(metrics.calibration_bins(y, probs), storage.join(out_dir, rundir.EVAL_FILES["calibration"]),
                      title=f"Calibration, {tag} (ECE {reports.fmt(report['ece'])})",
                      xlabel="top-class confidence", ylabel="accuracy")
  files["calibration"] = rundir.EVAL_FILES["calibration"]
  plots.confusion_matrix(np.array(report["confusion_matrix"]), classes,
                         storage.join(out_dir, rundir.EVAL_FILES["confusion_matrix"]), title=f"Confusion matrix, {tag}")
  files["confusion_matrix"] = rundir.EVAL_FILES["confusion_matrix"]
  if preds.images:
    rows = sorted(preds.images)
    wrong = [i for i in rows if pred[i] != y[i]]
    right = [i for i in rows if pred[i] == y[i]]
    chosen = sorted((wrong[:8] + right)[:16])
    titles = [f"{os.path.basename(preds.filenames[i])[:24]}\ntrue {classes[y[i]]}\n"
              f"pred {classes[pred[i]]} {probs[i, pred[i]]:.2f}" for i in chosen]
    colors = ["forestgreen" if pred[i] == y[i] else "crimson" for i in chosen]
    plots.image_grid([preds.images[i] for i in chosen], titles, storage.join(out_dir, rundir.EVAL_FILES["samples"]),
                     colors=colors, title=f"Samples, {tag}")
    files["samples"] = rundir.EVAL_FILES["samples"]
  hist = plots.training_history(rundir.read_history(run.model_dir),
                                storage.join(out_dir, rundir.EVAL_FILES["history"]))
  if hist:
    files["history"] = rundir.EVAL_FILES["history"]
  return files
