"""Subgroup results: AUC, sensitivity and specificity per sex, age band, view (and any
--metadata_columns attribute), each with its bootstrap CI.

The attributes come from the records' image/meta/* fields (written by the
converter from the label CSV's columns or the DICOM header; rules in
`tfrecord_tools.metadata`), read apart from the images
(`xraytpu.data.input_pipeline.record_metadata`) only when the data set's
manifest says it has them ("metadata"), and matched to the predictions by
record order and file name.

Subgroups (`groups_of`):
  sex     F, M, unknown
  age     AGE_BANDS in years: <18, 18-39, 40-59, 60-79, 80+ (80+ holds the records' "90",
          which means 90 or older), unknown
  view    as recorded (PA, AP, LATERAL, FRONTAL, ...), most images first, unknown last
  other   each --metadata_columns column: its values, unknown (blank) last; a column with
          more than MAX_LEVELS distinct values is not split (stated in subgroups_info)
An attribute no evaluated image has a value for is left out (stated too); "unknown"
is a subgroup like the others, never dropped.

Per subgroup, by the same functions as the whole split (xraytpu.evaluation.metrics):
  binary        auc (metrics.roc_auc), sensitivity and specificity at the run's threshold
                (metrics.metrics_at_threshold), positives, negatives
  multi-class   auc = macro one-vs-rest (metrics.multiclass_auc); sensitivity, specificity =
                macro one-vs-rest at the argmax (sensitivity is balanced accuracy), CIs from
                the same stratified resamples (metrics.stratified_bootstrap_indices); class_counts
  multi-label   per_finding {finding: the binary entry over its labelled images, at its
                threshold}; auc, sensitivity, specificity = macro means over findings (no CI:
                the per-finding entries carry them)
A CI needs at least MIN_PER_CLASS images of every class it is computed over (AUC: each
class present; sensitivity: positives; specificity: negatives) and both classes for an
AUC. A subgroup below that keeps its point values, its CIs are null, and "note" says
why ("too small for a CI: 3 positive, 12 negative ..." or "one class only ...").

report.json: "subgroups" {attribute: {subgroup: {num_examples, auc, auc_ci, sensitivity,
sensitivity_ci, specificity, specificity_ci, note, ...}}} ({} when the data has no
attributes) and "subgroups_info" {age_bands, min_per_class, left_out {attribute: why}}.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tfrecord_tools import metadata, records, schema
from xraytpu.evaluation import metrics
from xraytpu.run import reports, rundir

UNKNOWN = "unknown"
# (lowest age, first age not in the band, name); ages are whole years.
AGE_BANDS = ((0, 18, "<18"), (18, 40, "18-39"), (40, 60, "40-59"), (60, 80, "60-79"),
             (80, 1000, "80+"))
MIN_PER_CLASS = 5
MAX_LEVELS = 20
_ORDER = {"sex": ["F", "M"], "age": [b[2] for b in AGE_BANDS]}


def age_band(text: str) -> str:
  """A record's age ("" unknown, whole years) -> its AGE_BANDS name, or UNKNOWN."""
  try:
    years = float(text)
  except (TypeError, ValueError):
    return UNKNOWN
  return next((name for lo, hi, name in AGE_BANDS if lo <= years < hi), UNKNOWN)


def has_metadata(manifest: dict) -> bool:
  """Whether the data set's records carry attributes: its manifest's "metadata" (label CSV
  columns), or image_stats' dicom_attributes (DICOM headers)."""
  manifest = manifest or {}
  return bool(manifest.get("metadata") or (manifest.get("image_stats") or {}).get("dicom_attributes"))


def read(data_dir: str, split: str, manifest: dict, filenames: Sequence[str]
         ) -> list[dict[str, str]] | None:
  """Each evaluated record's attributes ({"sex", "age", "view", column: value}), in the
  order of `filenames` (the predictions'); None when the data set records none."""
  if not has_metadata(manifest):
    return None
  from xraytpu.data import input_pipeline  # noqa: PLC0415 (TensorFlow; only when needed)
  names, values = input_pipeline.record_metadata(data_dir, split, manifest)
  if list(names) != list(filenames):
    raise ValueError(f"the {split} records' attributes do not line up with the predictions "
                     f"({len(names)} records, {len(filenames)} predictions)")
  arg_of = {f.key: f.arg for f in records.FEATURES}
  return [metadata.from_record({arg_of[k]: v for k, v in record.items()}) for record in values]


def groups_of(attributes: Sequence[dict[str, str]]) -> tuple[dict[str, list[str]], dict[str, str]]:
  """({attribute: each image's subgroup}, {attribute left out: why})."""
  out: dict[str, list[str]] = {}
  left_out: dict[str, str] = {}
  names: list[str] = []
  for a in attributes:
    names += [k for k in a if k not in names]
  for name in names:
    raw = [a.get(name, "") for a in attributes]
    labels = [age_band(v) if name == "age" else (v or UNKNOWN) for v in raw]
    if all(v == UNKNOWN for v in labels):
      left_out[name] = "no evaluated image has a value"
      continue
    levels = {v for v in labels if v != UNKNOWN}
    if len(levels) > MAX_LEVELS:
      left_out[name] = f"{len(levels)} distinct values (more than {MAX_LEVELS}): not split"
      continue
    out[name] = labels
  return out, left_out


def _order(name: str, labels: Sequence[str]) -> list[str]:
  counts: dict[str, int] = {}
  for v in labels:
    counts[v] = counts.get(v, 0) + 1
  known = [v for v in counts if v != UNKNOWN]
  fixed = _ORDER.get(name)
  if fixed:
    known = [v for v in fixed if v in counts] + sorted(v for v in known if v not in fixed)
  elif name == "view":
    known.sort(key=lambda v: (-counts[v], v))
  else:
    known.sort()
  return known + ([UNKNOWN] if UNKNOWN in counts else [])


def _put(d: dict, name: str, m: metrics.Metric, ci: bool) -> None:
  d[name] = m.value
  d[f"{name}_ci"] = list(m.ci) if (ci and m.ci) else None


def _binary(y: np.ndarray, p: np.ndarray, threshold: float, kw: dict) -> dict[str, Any]:
  """One subgroup of a binary task (or one finding's labelled images in it)."""
  pos, neg = int(y.sum()), int(y.size - y.sum())
  d: dict[str, Any] = {"num_examples": int(y.size), "positives": pos, "negatives": neg}
  auc_ci = min(pos, neg) >= MIN_PER_CLASS
  _put(d, "auc", metrics.roc_auc(y, p, ci=auc_ci, **kw), auc_ci)
  at = metrics.metrics_at_threshold(y, p, threshold, ci=max(pos, neg) >= MIN_PER_CLASS, **kw)
  _put(d, "sensitivity", at["sensitivity"], pos >= MIN_PER_CLASS)
  _put(d, "specificity", at["specificity"], neg >= MIN_PER_CLASS)
  d["note"] = _note({"positive": pos, "negative": neg})
  return d


def _note(counts: dict[str, int]) -> str | None:
  """Why a subgroup's CIs (or AUC) are missing, or None."""
  text = ", ".join(f"{n} {c}" for c, n in counts.items())
  present = [n for n in counts.values() if n]
  small = bool(present) and min(present) < MIN_PER_CLASS
  why = f"a CI needs at least {MIN_PER_CLASS} of each class it is computed over"
  if len(present) < 2:
    return f"one class only ({text}): no AUC" + (f"; too small for a CI ({why})" if small else "")
  if small:
    return f"too small for a CI: {text} ({why})"
  return None


def _multiclass(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], kw: dict) -> dict[str, Any]:
  k = len(classes)
  counts = {c: int((y == i).sum()) for i, c in enumerate(classes)}
  d: dict[str, Any] = {"num_examples": int(y.size), "class_counts": counts}
  present = [i for i in range(k) if counts[classes[i]]]
  ci = len(present) >= 2 and all(counts[classes[i]] >= MIN_PER_CLASS for i in present)
  _put(d, "auc", metrics.multiclass_auc(y, probs, classes, ci=ci, **kw)["macro"], ci)
  pred = probs.argmax(axis=1)
  rates = metrics.per_class_rates(y, pred, k)
  for name in ("sensitivity", "specificity"):
    vals = [rates[i][name] for i in present if rates[i][name] is not None]
    d[name] = float(np.mean(vals)) if vals else None
    d[f"{name}_ci"] = None
  if ci:   # macro one-vs-rest rates over the same stratified resamples as the AUC's
    idx = metrics.stratified_bootstrap_indices(y, kw["n_resamples"], kw["seed"])
    yb, pb = y[idx], pred[idx]
    sens, spec = [], []
    for i in present:
      t, q = yb == i, pb == i
      r = metrics._rates((t & q).sum(1), (~t & q).sum(1), (~t & ~q).sum(1), (t & ~q).sum(1))
      sens.append(r["sensitivity"])
      spec.append(r["specificity"])
    for name, rows in (("sensitivity", sens), ("specificity", spec)):
      interval, _ = metrics._percentile_ci(np.mean(rows, axis=0), metrics.DEFAULT_ALPHA)
      d[f"{name}_ci"] = list(interval) if interval else None
  d["note"] = _note({c: n for c, n in counts.items() if n} if len(present) >= 2 else counts)
  return d


def _multilabel(y: np.ndarray, mask: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                thresholds: Sequence[float], kw: dict) -> dict[str, Any]:
  per = {}
  for j, c in enumerate(classes):
    m = mask[:, j]
    per[c] = _binary(y[m, j].astype(np.int64), probs[m, j], float(thresholds[j]), kw)
  d: dict[str, Any] = {"num_examples": int(y.shape[0])}
  for name in ("auc", "sensitivity", "specificity"):
    vals = [e[name] for e in per.values() if e[name] is not None]
    d[name] = float(np.mean(vals)) if vals else None
    d[f"{name}_ci"] = None
  small = [c for c, e in per.items() if e["note"]]
  d["note"] = (f"macro mean over findings (CIs per finding); {len(small)} of {len(classes)} "
               "findings too small for a CI or with one class only" if small
               else "macro mean over findings (CIs per finding)")
  d["per_finding"] = per
  return d


def compute(task: str, classes: Sequence[str], labels: np.ndarray, probs: np.ndarray,
            attributes: Sequence[dict[str, str]] | None, *, threshold: float | None = None,
            thresholds: Sequence[float] | None = None, mask: np.ndarray | None = None,
            n_resamples: int = metrics.DEFAULT_RESAMPLES, seed: int = metrics.DEFAULT_SEED
            ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(report.json's "subgroups", its "subgroups_info"); see the module doc.

  task: "binary" | "multiclass" | "multi_label"; labels int [n] (multi-label: [n, K] with
  `mask`); probs [n, K] as the report's (calibrated); threshold: binary; thresholds:
  multi-label, per finding. attributes: `read`'s, or None (no subgroups).
  """
  info: dict[str, Any] = {"age_bands": [b[2] for b in AGE_BANDS], "min_per_class": MIN_PER_CLASS,
                          "left_out": {}}
  if not attributes:
    info["left_out"] = {"all": "the data set's records carry no patient or acquisition attributes"}
    return {}, info
  groups, info["left_out"] = groups_of(attributes)
  kw = dict(n_resamples=n_resamples, seed=seed)
  labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
  out: dict[str, Any] = {}
  for name, each in groups.items():
    each = np.asarray(each)
    out[name] = {}
    for value in _order(name, list(each)):
      rows = each == value
      if task == "binary":
        out[name][value] = _binary(labels[rows].astype(np.int64), probs[rows, 1], float(threshold), kw)
      elif task == rundir.MULTI_LABEL:
        out[name][value] = _multilabel(labels[rows], np.asarray(mask)[rows], probs[rows], classes,
                                       thresholds, kw)
      else:
        out[name][value] = _multiclass(labels[rows].astype(np.int64), probs[rows], classes, kw)
  return out, info


def for_report(preds, manifest: dict | None, *, task: str, classes: Sequence[str],
               probs: np.ndarray, op: dict, n_resamples: int, seed: int,
               notes: list[str]) -> dict[str, Any]:
  """report.json's {"subgroups", "subgroups_info"} for one evaluated split (what
  xraytpu.evaluation.evaluate_lib adds): preds its SplitPredictions (labels in the run's
  order), probs the report's calibrated probabilities, op the operating point."""
  if manifest is None:
    manifest = schema.read_manifest(preds.data_dir)
  try:
    attrs = read(preds.data_dir, preds.split, manifest, preds.filenames)
  except ValueError as e:   # records and predictions out of step: said, not guessed
    notes.append(f"subgroups not reported: {e}")
    attrs = None
  kw: dict[str, Any] = {}
  if task == "binary":
    kw["threshold"] = float(op["threshold"])
  elif task == rundir.MULTI_LABEL:
    kw.update(thresholds=rundir.thresholds_of(op, list(classes)), mask=preds.mask)
  sub, info = compute(task, classes, preds.labels, probs, attrs, n_resamples=n_resamples,
                      seed=seed, **kw)
  return {"subgroups": sub, "subgroups_info": info}


def render_markdown(report: dict) -> list[str]:
  """report.md's "Subgroups" section (lines); [] when the report has none to show."""
  sub = report.get("subgroups")
  info = report.get("subgroups_info") or {}
  if sub is None:
    return []
  lines = ["", "## Subgroups", ""]
  if not sub:
    why = "; ".join(f"{k}: {v}" for k, v in (info.get("left_out") or {}).items())
    return lines + [f"None measured ({why or 'no attributes'})."]
  lines += [f"Age bands (years): {', '.join(info.get('age_bands', []))}; unknown: not recorded. "
            f"95% CIs by stratified bootstrap within each subgroup; a CI needs at least "
            f"{info.get('min_per_class', MIN_PER_CLASS)} images of each class it covers.", ""]
  multi_label = report.get("task") == rundir.MULTI_LABEL
  lines += ["| attribute | subgroup | images | classes | AUC (95% CI) | sensitivity (95% CI) | "
            "specificity (95% CI) | note |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for name, groups in sub.items():
    for value, d in groups.items():
      if "positives" in d:
        counts = f"{d['positives']} pos / {d['negatives']} neg"
      elif "class_counts" in d:
        counts = ", ".join(f"{c} {n}" for c, n in d["class_counts"].items())
      else:
        counts = f"{len(d.get('per_finding') or {})} findings"
      lines.append(f"| {name} | {value} | {d['num_examples']} | {counts} | {reports.metric(d, 'auc')} | "
                   f"{reports.metric(d, 'sensitivity')} | {reports.metric(d, 'specificity')} | {d.get('note') or ''} |")
  if multi_label:
    lines += ["", "Per finding:", "", "| attribute | subgroup | finding | labelled | AUC (95% CI) | "
              "sensitivity (95% CI) | specificity (95% CI) | note |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, groups in sub.items():
      for value, d in groups.items():
        for c, e in (d.get("per_finding") or {}).items():
          lines.append(f"| {name} | {value} | {c} | {e['num_examples']} ({e['positives']} pos) | "
                       f"{reports.metric(e, 'auc')} | {reports.metric(e, 'sensitivity')} | {reports.metric(e, 'specificity')} | "
                       f"{e.get('note') or ''} |")
  for name, why in (info.get("left_out") or {}).items():
    lines.append(f"- {name}: not reported ({why})")
  return lines
