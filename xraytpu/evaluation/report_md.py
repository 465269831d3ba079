"""report.md: an evaluation's report.json (xraytpu.evaluation.evaluate_lib) for people.

`render_markdown(report, classification_text)` renders the same numbers: the model and data,
the operating point and what it rests on, the metrics with their confidence intervals, the
confusion matrix (per class for multi-class; per finding for multi-label, from
xraytpu.evaluation.multilabel), then the closing sections: subgroups
(xraytpu.evaluation.subgroups), scikit-learn's classification report, the notes and the plots.
"""

from __future__ import annotations

from xraytpu import config
from xraytpu.evaluation import multilabel, subgroups
from xraytpu.run import reports, rundir


def render_markdown(report: dict, classification_text: str = "") -> str:
  """report.md: the same numbers as report.json, for people."""
  r = report
  lines = [f"# Evaluation: {r['dataset']} / {r['split']}", "",
           f"- model: `{r['model_dir']}`", f"- data: `{r['data_dir']}` (split `{r['split']}`, "
           f"{r['num_examples']} images: " + ", ".join(f"{c} {n}" for c, n in r["class_counts"].items()) + ")",
           f"- task: {r['task']}, classes {', '.join(r['classes'])}"]
  if r.get("tta") not in (None, config.DEFAULT_TTA):
    lines.append(f"- test-time augmentation: `{r['tta']}` (the outputs averaged over "
                 f"{len(config.TTA_PRESETS[r['tta']])} views of each image)")
  if r["task"] == rundir.MULTI_LABEL:
    lines += multilabel.render_markdown(r)
    return _markdown_tail(r, lines, classification_text)
  if r["task"] == "binary":
    src = r["threshold_source_split"]
    lines.append(f"- operating threshold: **{r['threshold']:.4f}** on P({r['positive_class']}), "
                 f"policy `{r['threshold_policy']}`, chosen on "
                 + (f"the `{src}` split of {r.get('threshold_source_dataset')}" if src else "no data (fixed)")
                 + ", applied unchanged here")
    if r.get("threshold_evidence"):
      lines.append(f"- what the threshold rests on (`{src}`): {reports.evidence(r['threshold_evidence'])}")
      if r["threshold_evidence"].get("warning"):
        lines.append(f"- **warning**: `{src}` is too small for this operating point: "
                     f"{r['threshold_evidence']['warning']}")
  else:
    lines.append("- decision: the most probable class (argmax)")
  if r.get("temperature") is not None:
    lines.append(f"- temperature scaling: T = {r['temperature']:.3f} (fitted on val)")
  lines += ["", f"95% confidence intervals: {r['ci']['method']}, {r['ci']['resamples']} "
            f"resamples, seed {r['ci']['seed']}.", "", "| metric | value (95% CI) |", "| --- | --- |"]
  names = ["auc", "pr_auc"] + (["micro_auc"] if r["task"] != "binary" else [])
  names += ["sensitivity", "specificity", "ppv", "npv", "accuracy", "f1"]
  labels = {"auc": "ROC AUC" if r["task"] == "binary" else "ROC AUC (macro)",
            "pr_auc": "PR AUC (average precision)" if r["task"] == "binary" else "PR AUC (macro average precision)",
            "micro_auc": "ROC AUC (micro)", "ppv": "PPV (precision)", "npv": "NPV",
            "f1": "F1", "sensitivity": "sensitivity (recall)", "specificity": "specificity",
            "accuracy": "accuracy"}
  for n in names:
    suffix = " (macro)" if r["task"] != "binary" and n in ("sensitivity", "specificity", "ppv", "npv", "f1") else ""
    lines.append(f"| {labels[n]}{suffix} | {reports.metric(r, n)} |")
  lines.append(f"| Brier score | {reports.fmt(r['brier'], 4)} |")
  lines.append(f"| ECE (10 bins) | {reports.fmt(r['ece'], 4)} |")
  if r.get("temperature") is not None:
    lines.append(f"| Brier / ECE before temperature | {reports.fmt(r['brier_uncalibrated'], 4)} / "
                 f"{reports.fmt(r['ece_uncalibrated'], 4)} |")
  cls = r["classes"]
  lines += ["", "## Confusion matrix (rows: true, columns: predicted)", "",
            "| | " + " | ".join(cls) + " |", "|---" * (len(cls) + 1) + "|"]
  for c, row in zip(cls, r["confusion_matrix"]):
    lines.append(f"| **{c}** | " + " | ".join(str(v) for v in row) + " |")
  if r["task"] != "binary":
    lines += ["", "## Per class (one-vs-rest)", "", "| class | AUC (95% CI) | sensitivity | specificity | PPV | support |",
              "| --- | --- | --- | --- | --- | --- |"]
    for c, d in r["per_class"].items():
      auc = reports.fmt(d["auc"]) + (f" ({d['auc_ci'][0]:.3f}-{d['auc_ci'][1]:.3f})" if d["auc_ci"] else "")
      lines.append(f"| {c} | {auc} | {reports.fmt(d['sensitivity'])} | {reports.fmt(d['specificity'])} | "
                   f"{reports.fmt(d['ppv'])} | {d['support']} |")
  return _markdown_tail(r, lines, classification_text)


def _markdown_tail(r: dict, lines: list[str], classification_text: str) -> str:
  """report.md's closing sections: subgroups, classification report, notes, plots."""
  lines += subgroups.render_markdown(r)   # xraytpu.evaluation.subgroups
  if classification_text:
    lines += ["", "## Classification report", "", "```", classification_text.rstrip(), "```"]
  if r.get("notes") or r.get("undefined"):
    lines += ["", "## Notes", ""]
    lines += [f"- {n}" for n in r.get("notes", [])]
    lines += [f"- `{k}` undefined: {v}" for k, v in r.get("undefined", {}).items()]
  plot_names = {"roc": "ROC", "pr": "Precision-recall", "calibration": "Calibration",
                "confusion_matrix": "Confusion matrix", "samples": "Samples", "history": "Training history"}
  shown = [(k, v) for k, v in r.get("files", {}).items() if k in plot_names]
  if shown:
    lines += ["", "## Plots", ""]
    lines += [f"![{plot_names[k]}]({v})" for k, v in shown]
  return "\n".join(lines) + "\n"
