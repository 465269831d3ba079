"""Clinical evaluation of a multi-label run (K findings, K sigmoids): per finding, and the
macro mean over findings.

Used by `xraytpu.evaluation.evaluate_lib.evaluate` when the run's data set is multi-label
(manifest "task": "multi_label"). Ignored labels (mask 0: uncertain or blank
cells the converter was told to ignore) never count, for any metric.

The operating point (RUN/threshold.json): one threshold per finding, each chosen
on the training data's val split by the same `--threshold_policy` as a binary
task (youden | sensitivity:X | specificity:X | fixed:X, and sensitivity:X:lower |
specificity:X:lower at the exact lower confidence bound; xraytpu.evaluation.metrics),
over that finding's labelled val images, each with its evidence (val positives and
negatives, achieved rates with exact CIs, a warning when too few for the target);
optionally one temperature fitted on every labelled
(image, finding) pair of val. The thresholds are then applied unchanged.

report.json keys for a multi-label task (besides the shared ones: model_dir,
data_dir, dataset, split, classes = the findings, num_examples, notes, files, ci):
  task "multi_label"; auc, auc_ci, pr_auc, pr_auc_ci     macro means over findings with a defined
                                                          AUC, CIs by bootstrap over images
  sensitivity, specificity, ppv, npv, f1                  macro means at the thresholds
  per_finding {finding: {auc, auc_ci, pr_auc, pr_auc_ci, threshold, sensitivity, sensitivity_ci,
               specificity, specificity_ci, ppv, npv, positives, negatives, ignored,
               threshold_evidence (on val: operating_point.threshold_evidence, or null)}}
  class_counts {finding: positives}; thresholds {finding: t}; threshold_policy, threshold_source_split
  brier, ece (pooled over labelled pairs), temperature; undefined {key: reason}
"""

from __future__ import annotations

import csv
import io
import os
import time
from typing import Any, Sequence

import numpy as np
from absl import logging

from tfrecord_tools import storage
from xraytpu.evaluation import metrics, operating_point, plots


from xraytpu.run import reports, rundir
def split_labels(y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The pipeline's y [n, 2K] (multi_hot | mask) -> (labels int [n, K], mask bool [n, K])."""
  from xraytpu.data import input_pipeline  # noqa: PLC0415 - the one definition of y's layout
  multi_hot, mask = input_pipeline.split_multi_label(np.asarray(y, np.float32).reshape(-1, 2 * k))
  return (multi_hot > 0.5).astype(np.int64), mask > 0.5


def match_findings(run_classes: Sequence[str], data_classes: Sequence[str], data_dir: str,
                   error) -> np.ndarray:
  """For each of the run's findings, its column in the data set (-1: not labelled there)."""
  folded = {str(c).casefold(): i for i, c in enumerate(data_classes)}
  cols = np.array([folded.get(str(c).casefold(), -1) for c in run_classes], np.int64)
  if (cols < 0).all():
    raise error(f"finding mismatch: the data set in {data_dir} labels {list(data_classes)}, the model "
                f"predicts {list(run_classes)}: none in common")
  return cols


def align(labels: np.ndarray, mask: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Data columns -> the run's finding order; findings the data does not label are masked."""
  n = labels.shape[0]
  out_y = np.zeros((n, cols.size), np.int64)
  out_m = np.zeros((n, cols.size), bool)
  for j, c in enumerate(cols):
    if c >= 0:
      out_y[:, j], out_m[:, j] = labels[:, c], mask[:, c]
  return out_y, out_m


def choose_operating_point(run: rundir.LoadedRun, val, policy: str, temperature_scaling: bool,
                           class_probabilities, error) -> dict[str, Any]:
  """Per-finding thresholds (and one temperature) on `val`; the threshold.json dict."""
  op: dict[str, Any] = {
      "threshold": None, "thresholds": {}, "policy": operating_point.canonical_policy(policy),
      "source_split": None, "source_data_dir": None, "source_dataset": None,
      "per_finding": {}, "temperature": None, "temperature_fit": None, "fallback_reason": None,
      "num_examples": None, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  pol = operating_point.parse_threshold_policy(policy)
  if val is None:
    if pol.kind != "fixed":
      raise error("choosing thresholds needs the val split of the training data")
    op["thresholds"] = {c: pol.target for c in run.classes}
    return op
  op.update(source_split=val.split, source_data_dir=val.data_dir, source_dataset=val.dataset,
            num_examples=int(val.labels.shape[0]))
  probs = val.probs
  if temperature_scaling:
    fit = metrics.fit_temperature(val.labels[val.mask], probs[val.mask])
    op["temperature_fit"] = fit.to_dict()
    if fit.reason is None:
      op["temperature"] = fit.temperature
      probs = class_probabilities(run, val.raw, temperature=fit.temperature)[0]
  for j, c in enumerate(run.classes):
    m = val.mask[:, j]
    choice = operating_point.choose_threshold(val.labels[m, j], probs[m, j], policy)
    entry: dict[str, Any] = {"labelled": int(m.sum()), "fallback_reason": None}
    if choice.threshold is not None and choice.reason:  # a lower bound val is too small for
      entry["fallback_reason"] = choice.reason
      logging.warning("threshold policy %s for %s on %s: %s", op["policy"], c, val.split, choice.reason)
    if choice.threshold is None:
      entry["fallback_reason"] = choice.reason
      logging.warning("threshold policy %s failed for %s on %s (%s): using %s", op["policy"], c,
                      val.split, choice.reason, rundir.DEFAULT_THRESHOLD)
      choice = operating_point.choose_threshold(val.labels[m, j], probs[m, j],
                                        rundir.DEFAULT_POLICY)
    op["thresholds"][c] = choice.threshold
    entry.update(sensitivity=choice.sensitivity, specificity=choice.specificity,
                 evidence=operating_point.threshold_evidence(val.labels[m, j], probs[m, j], choice.threshold,
                                                     policy))
    op["per_finding"][c] = entry
  return op


def _bootstrap_macro(stat_rows, n: int, n_resamples: int, seed: int):
  """95% percentile CI of a macro statistic over images resampled with replacement
  (metrics' percentile rule: undefined when fewer than half the resamples define it)."""
  if n == 0:
    return None
  rng = np.random.default_rng(seed)
  vals = [stat_rows(rng.integers(0, n, n)) for _ in range(n_resamples)]
  ci, _ = metrics._percentile_ci(np.array([np.nan if v is None else v for v in vals]),
                                 metrics.DEFAULT_ALPHA)
  return list(ci) if ci else None


def _macro(values: Sequence[float | None]) -> float | None:
  vals = [v for v in values if v is not None]
  return float(np.mean(vals)) if vals else None


def compute_report(classes: Sequence[str], labels: np.ndarray, mask: np.ndarray, probs: np.ndarray,
                   op: dict[str, Any], *, n_resamples: int, seed: int) -> dict[str, Any]:
  """The numbers of a multi-label report.json (see the module docstring)."""
  k = len(classes)
  undefined: dict[str, str] = {}
  kw = dict(n_resamples=n_resamples, seed=seed)
  thresholds = np.array(rundir.thresholds_of(op, list(classes)))
  per: dict[str, dict[str, Any]] = {}
  for j, c in enumerate(classes):
    m = mask[:, j]
    y, p = labels[m, j], probs[m, j]
    d: dict[str, Any] = {"positives": int(y.sum()), "negatives": int((1 - y).sum()),
                         "ignored": int((~m).sum()), "threshold": float(thresholds[j]),
                         "threshold_evidence": ((op.get("per_finding") or {}).get(c) or {}).get("evidence")}
    for name, metric in (("auc", metrics.roc_auc(y, p, **kw)), ("pr_auc", metrics.pr_auc(y, p, **kw))):
      d[name], d[f"{name}_ci"] = metric.value, (list(metric.ci) if metric.ci else None)
      if metric.reason:
        undefined[f"per_finding.{c}.{name}"] = metric.reason
    at = metrics.metrics_at_threshold(y, p, float(thresholds[j]), **kw)
    for name in ("sensitivity", "specificity", "ppv", "npv", "f1"):
      d[name] = at[name].value
      d[f"{name}_ci"] = list(at[name].ci) if at[name].ci else None
    per[c] = d

  def macro_auc(rows):
    vals = []
    for j in range(k):
      m = mask[rows, j]
      y, s = labels[rows, j][m], probs[rows, j][m]
      if 0 < y.sum() < y.size:
        vals.append(float(metrics._auc_by_ranks(y, s)))
    return float(np.mean(vals)) if vals else None

  n = labels.shape[0]
  r: dict[str, Any] = {"task": rundir.MULTI_LABEL, "classes": list(classes), "positive_class": None,
                       "num_examples": int(n),
                       "class_counts": {c: per[c]["positives"] for c in classes},
                       "per_finding": per}
  r["auc"] = _macro([per[c]["auc"] for c in classes])
  r["auc_ci"] = _bootstrap_macro(macro_auc, n, n_resamples, seed) if r["auc"] is not None else None
  if r["auc"] is None:
    undefined["auc"] = "no finding has both positive and negative labelled images"
  r["pr_auc"] = _macro([per[c]["pr_auc"] for c in classes])
  r["pr_auc_ci"] = None
  for name in ("sensitivity", "specificity", "ppv", "npv", "f1"):
    r[name] = _macro([per[c][name] for c in classes])
    r[f"{name}_ci"] = None
  r["micro_auc"], r["micro_auc_ci"], r["accuracy"], r["accuracy_ci"] = None, None, None, None
  r.update(threshold=None, thresholds={c: float(t) for c, t in zip(classes, thresholds)},
           threshold_policy=op.get("policy"), threshold_source_split=op.get("source_split"),
           threshold_source_dataset=op.get("source_dataset"),
           threshold_fallback_reason=op.get("fallback_reason"))
  pooled_y, pooled_p = labels[mask], probs[mask]
  r["brier"] = metrics.brier_score(pooled_y, pooled_p).value
  r["ece"] = metrics.expected_calibration_error(pooled_y, pooled_p).value
  r["temperature"] = op.get("temperature")
  r["ci"] = {"method": "percentile bootstrap over images (per finding: stratified)", "level": 0.95,
             "resamples": n_resamples, "seed": seed}
  r["undefined"] = undefined
  return r


def write_predictions(path: str, classes: Sequence[str], preds, probs: np.ndarray,
                      positive: np.ndarray) -> None:
  """filename, true_<finding> (1 / 0 / blank when ignored), prob_<finding>..., predicted findings."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["filename", *[f"true_{c}" for c in classes], *[f"prob_{c}" for c in classes],
              "predicted"])
  for i, name in enumerate(preds.filenames):
    truth = [str(int(preds.labels[i, j])) if preds.mask[i, j] else "" for j in range(len(classes))]
    found = [c for j, c in enumerate(classes) if positive[i, j]]
    w.writerow([name, *truth, *[f"{v:.6f}" for v in probs[i]], "|".join(found)])
  storage.write_bytes(path, buf.getvalue().encode("utf-8"))


def write_plots(out_dir: str, run: rundir.LoadedRun, preds, probs: np.ndarray, positive: np.ndarray,
                report: dict) -> dict[str, str]:
  """One ROC plot and one PR plot with a curve per finding; pooled calibration; samples."""
  files: dict[str, str] = {}
  tag = f"{preds.dataset} {preds.split}"
  entries = [(c, reports.fmt(report["per_finding"][c]["auc"]), preds.labels[preds.mask[:, j], j],
              probs[preds.mask[:, j], j]) for j, c in enumerate(run.classes)]
  written = plots.roc_and_pr_per_class(
      entries, storage.join(out_dir, rundir.EVAL_FILES["roc"]),
      storage.join(out_dir, rundir.EVAL_FILES["pr"]),
      roc_title=f"ROC per finding, {tag} (macro AUC {reports.fmt(report['auc'])})",
      pr_title=f"Precision-recall per finding, {tag}")
  files.update({k: rundir.EVAL_FILES[k] for k in written})
  plots.reliability(metrics.calibration_bins(preds.labels[preds.mask], probs[preds.mask]),
                    storage.join(out_dir, rundir.EVAL_FILES["calibration"]),
                    title=f"Calibration over labelled findings, {tag} (ECE {reports.fmt(report['ece'])})")
  files["calibration"] = rundir.EVAL_FILES["calibration"]
  if preds.images:
    chosen = sorted(preds.images)[:16]

    def names(row, which):
      return ", ".join(c for j, c in enumerate(run.classes) if which[row, j]) or "none"

    truth = preds.labels.astype(bool) & preds.mask
    titles = [f"{os.path.basename(preds.filenames[i])[:24]}\ntrue {names(i, truth)[:30]}\n"
              f"pred {names(i, positive)[:30]}" for i in chosen]
    colors = ["forestgreen" if ((truth[i] == positive[i]) | ~preds.mask[i]).all() else "crimson"
              for i in chosen]
    plots.image_grid([preds.images[i] for i in chosen], titles,
                     storage.join(out_dir, rundir.EVAL_FILES["samples"]), colors=colors,
                     title=f"Samples, {tag}")
    files["samples"] = rundir.EVAL_FILES["samples"]
  return files


def render_markdown(report: dict) -> list[str]:
  """The multi-label part of report.md: the per-finding table."""
  lines = [f"- task: multi-label, {len(report['classes'])} findings; each finding is positive when "
           f"its probability reaches its own threshold (policy `{report['threshold_policy']}`, chosen "
           f"on {report['threshold_source_split'] or 'no data (fixed)'}, applied unchanged here)"]
  if report.get("temperature") is not None:
    lines.append(f"- temperature scaling: T = {report['temperature']:.3f} (fitted on val)")
  lines += ["", f"95% confidence intervals: {report['ci']['method']}, {report['ci']['resamples']} "
            f"resamples, seed {report['ci']['seed']}.", "",
            f"**Macro mean over findings**: ROC AUC {reports.fmt_ci(report['auc'], report['auc_ci'])}, "
            f"PR AUC {reports.fmt(report['pr_auc'])}, sensitivity {reports.fmt(report['sensitivity'])}, "
            f"specificity {reports.fmt(report['specificity'])}; Brier {reports.fmt(report['brier'], 4)}, "
            f"ECE {reports.fmt(report['ece'], 4)} (labelled pairs).", "",
            "| finding | ROC AUC (95% CI) | PR AUC (95% CI) | threshold | sensitivity | specificity "
            "| PPV | positives / negatives / ignored |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for c, d in report["per_finding"].items():
    lines.append(f"| {c} | {reports.fmt_ci(d['auc'], d['auc_ci'])} | {reports.fmt_ci(d['pr_auc'], d['pr_auc_ci'])} | "
                 f"{d['threshold']:.3f} | {reports.fmt_ci(d['sensitivity'], d['sensitivity_ci'])} | "
                 f"{reports.fmt_ci(d['specificity'], d['specificity_ci'])} | {reports.fmt(d['ppv'])} | "
                 f"{d['positives']} / {d['negatives']} / {d['ignored']} |")
  chosen = {c: d["threshold_evidence"] for c, d in report["per_finding"].items()
            if d.get("threshold_evidence")}
  if chosen:
    src = report["threshold_source_split"]
    lines += ["", f"What each threshold rests on (`{src}`, exact binomial intervals):", ""]
    for c, ev in chosen.items():
      lines.append(f"- {c}: {reports.evidence(ev)}")
      if ev.get("warning"):
        lines.append(f"  - **warning**: `{src}` is too small for this operating point: {ev['warning']}")
  return lines
