"""The model card: what a run's model is, how it was evaluated, what its numbers mean.

One place for the card's content: `model_card(run)` is the dict (GET /v1/model
and the page of `xraytpu.serve`), `render_markdown(card)` the same for people,
which `xraytpu.evaluate` writes to RUN/MODEL_CARD.md (`write`) and
`xraytpu.export` copies to the SavedModel's assets.extra/. The dict carries the
text too ("model_card_md"), so any server can show the card as a file.

MODEL_CARD.md's sections: intended use, model, data (counts per split and
class / finding), metrics with 95% CIs, the operating point and how it was
chosen, limitations, and the not-a-diagnostic-device notice (DISCLAIMER).
"""

from __future__ import annotations

import os
from typing import Any

from tfrecord_tools import storage
from xraytpu.run import reports, rundir

DISCLAIMER = ("Not a diagnostic device. This is research software: its output is not a diagnosis, has "
              "not been cleared by any regulator, and must not be used to make clinical decisions.")

_CARD_METRICS = ("auc", "auc_ci", "pr_auc", "pr_auc_ci", "sensitivity", "sensitivity_ci", "specificity",
                 "specificity_ci", "ppv", "ppv_ci", "npv", "npv_ci", "accuracy", "accuracy_ci",
                 "micro_auc", "micro_auc_ci", "threshold", "threshold_policy", "threshold_source_split",
                 "threshold_source_dataset", "num_examples", "class_counts", "dataset", "split", "task",
                 "ci", "notes", "undefined", "created", "temperature")


def find_eval_report(run: rundir.LoadedRun) -> dict | None:
  """The report the card quotes (`reports.find`: the training data's test split first)."""
  return reports.find(run.model_dir, reports.dataset_name(run.cfg.data_dir or "", run.manifest))


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
   "disclaimer": str, "model_card_md": render_markdown(card), the card as Markdown (MODEL_CARD.md),
   "limits": {"max_upload_mb", "max_files", "max_pixels"} (with serve's options only)}
  """
  op = run.operating_point or {}
  manifest = run.manifest
  splits = {}
  for name, info in sorted((manifest.get("splits") or {}).items()):
    splits[name] = {"num_examples": info.get("num_examples"), "class_counts": info.get("class_counts")}
    if info.get("finding_counts"):
      splits[name]["finding_counts"] = info["finding_counts"]
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
      "training_data": {"dataset": reports.dataset_name(run.cfg.data_dir or "", manifest),
                        "splits": splits},
      "threshold": run.threshold,
      "thresholds": dict(zip(run.classes, run.thresholds)) if run.multi_label else None,
      "threshold_policy": op.get("policy") or (rundir.DEFAULT_POLICY if needs_op else "argmax"),
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
      ev["headline"] = reports.headline(report)
    except (KeyError, TypeError, ValueError):
      ev["headline"] = None
    if run.multi_label:
      t_report, t_now = report.get("thresholds"), dict(zip(run.classes, run.thresholds))
      ev["stale"] = t_report is not None and any(
          abs(float(t_report.get(c, t)) - t) > 1e-9 for c, t in t_now.items())
      ev["per_finding"] = {c: {k: d.get(k) for k in ("auc", "auc_ci", "sensitivity", "sensitivity_ci",
                                                     "specificity", "specificity_ci", "threshold",
                                                     "positives", "negatives", "ignored")}
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
  card["model_card_md"] = render_markdown(card)
  if opts is not None:
    card["limits"] = {"max_upload_mb": opts.max_upload_mb, "max_files": opts.max_files,
                      "max_pixels": opts.max_pixels}
  return card


def write(run: rundir.LoadedRun) -> str:
  """Writes RUN/MODEL_CARD.md (the card as it stands now); returns its path."""
  p = rundir.path(run.model_dir, rundir.MODEL_CARD)
  storage.write_text(p, model_card(run)["model_card_md"])
  return p


# --------------------------------------------------------------------------
# MODEL_CARD.md
# --------------------------------------------------------------------------

_POLICIES = {
    "youden": "Youden's J: the threshold that maximises sensitivity + specificity - 1",
    "sensitivity": "the highest threshold whose sensitivity reaches {x:g}",
    "specificity": "the lowest threshold whose specificity reaches {x:g}",
    "fixed": "a fixed threshold of {x:g}, not chosen on data",
}
_METRICS = (("auc", "ROC AUC"), ("pr_auc", "PR AUC (average precision)"), ("micro_auc", "ROC AUC (micro)"),
            ("sensitivity", "sensitivity"), ("specificity", "specificity"), ("ppv", "PPV"),
            ("npv", "NPV"), ("accuracy", "accuracy"))


def _num(v, digits: int = 3) -> str:
  return "n/a" if v is None else f"{float(v):.{digits}f}"


def _with_ci(v, ci) -> str:
  if v is None:
    return "n/a"
  return _num(v) + (f" ({float(ci[0]):.3f}-{float(ci[1]):.3f})" if ci else "")


def _policy_text(policy: str | None) -> str:
  if not policy:
    return "none"
  kind, _, x = policy.partition(":")
  if kind == "argmax":
    return "argmax: the most probable class, no threshold"
  text = _POLICIES.get(kind)
  if text is None:
    return f"`{policy}`"
  try:
    return f"`{policy}`: " + text.format(x=float(x) if x else 0.0)
  except ValueError:
    return f"`{policy}`"


def _counts(counts: dict | None, order: list[str]) -> str:
  """"A 3, B 5" in the run's class / finding order (others after them)."""
  counts = counts or {}
  keys = [k for k in order if k in counts] + sorted(k for k in counts if k not in order)
  return ", ".join(f"{k} {counts[k]}" for k in keys) or "n/a"


def render_markdown(card: dict[str, Any]) -> str:
  """MODEL_CARD.md from the card dict (`model_card`): the same facts, for people."""
  task = card["task"]
  multi = task == rundir.MULTI_LABEL
  ev = card.get("evaluation")
  data = card["training_data"]
  lines = [f"# Model card: {card['run']} ({card['model']})", "", f"> **{card['disclaimer']}**", ""]

  lines += ["## Intended use", "",
            "Research and teaching: studying how well a "
            + {"binary": f"binary classifier ({' vs '.join(card['classes'])})",
               "multiclass": f"{len(card['classes'])}-class classifier ({', '.join(card['classes'])})",
               rundir.MULTI_LABEL: f"multi-label classifier of {len(card['classes'])} findings "
                                   f"({', '.join(card['classes'])})"}.get(task, "classifier")
            + " does on chest X-ray / CT images like those it was trained on. Not for diagnosis, "
              "triage or any decision about a patient (see the notice below).", "",
            "## Model", "",
            f"- architecture: `{card['model']}`; task: {task}"
            + (f"; positive class: {card['positive_class']}" if card.get("positive_class") else ""),
            f"- input: {card['input']['size']}x{card['input']['size']} px, {card['input']['channels']} "
            f"channel(s), uint8, non-square images: {card['input']['aspect']}",
            "- preprocessing (the converter's settings, replayed for new files): "
            + (", ".join(f"{k}={v}" for k, v in sorted((card.get("preprocessing") or {}).items())) or "defaults"),
            "- output: " + ("one probability per finding (sigmoid)" if multi else
                             "one probability per class"), ""]

  lines += ["## Data", "", f"Trained on `{data['dataset']}`"
            + (" (counts of positives per finding; masked labels are not counted)." if multi else "."), "",
            f"| split | images | {'positives per finding' if multi else 'images per class'} |",
            "| --- | --- | --- |"]
  order = {"train": 0, "val": 1, "test": 2}
  for split, info in sorted(data["splits"].items(), key=lambda kv: (order.get(kv[0], 3), kv[0])):
    lines.append(f"| {split} | {info.get('num_examples')} | {_counts(info.get('class_counts'), card['classes'])} |")
  if ev:
    lines += ["", f"Evaluated on the `{ev.get('split')}` split of `{ev.get('dataset')}`: "
              f"{ev.get('num_examples')} images ({_counts(ev.get('class_counts'), card['classes'])}"
              + (" positives" if multi else "") + ")."]
  lines.append("")

  lines += ["## Metrics", ""]
  if not ev:
    lines += ["Not evaluated yet: run `python -m xraytpu.evaluate --model_dir=RUN` to measure the "
              "model on the test split.", ""]
  else:
    ci = ev.get("ci") or {}
    lines += [f"On `{ev.get('dataset')}` / `{ev.get('split')}`"
              + (", macro means over findings" if multi else "")
              + (", multi-class: AUC macro one-vs-rest, sensitivity etc. macro averages" if task == "multiclass" else "")
              + f". 95% confidence intervals: {ci.get('method', 'bootstrap')}, "
              f"{ci.get('resamples', '?')} resamples.", "", "| metric | value (95% CI) |", "| --- | --- |"]
    undefined = ev.get("undefined") or {}
    for key, label in _METRICS:
      if (key == "micro_auc" and task != "multiclass") or (key == "accuracy" and multi):
        continue
      value = _with_ci(ev.get(key), ev.get(key + "_ci"))
      if ev.get(key) is None and undefined.get(key):
        value += f" ({undefined[key]})"
      lines.append(f"| {label} | {value} |")
    if multi and ev.get("per_finding"):
      lines += ["", "| finding | AUC (95% CI) | sensitivity | specificity | threshold | "
                "positives / negatives / ignored |", "| --- | --- | --- | --- | --- | --- |"]
      for c, d in ev["per_finding"].items():
        lines.append(f"| {c} | {_with_ci(d.get('auc'), d.get('auc_ci'))} | "
                     f"{_with_ci(d.get('sensitivity'), d.get('sensitivity_ci'))} | "
                     f"{_with_ci(d.get('specificity'), d.get('specificity_ci'))} | {_num(d.get('threshold'))} | "
                     f"{d.get('positives')} / {d.get('negatives')} / {d.get('ignored')} |")
    if ev.get("headline"):
      lines += ["", f"In one line: {ev['headline']}"]
    lines.append("")

  lines += ["## Operating point", ""]
  source = card.get("threshold_source_split")
  chosen_on = (f"chosen on the `{source}` split of `{card.get('threshold_source_dataset')}` (never on the "
               "split reported above) and applied unchanged everywhere" if source else
               "not chosen on data")
  if task == "binary":
    lines.append(f"- {card['positive_class']} when P({card['positive_class']}) >= "
                 f"**{_num(card['threshold'], 4)}**")
  elif multi:
    lines.append("- each finding is present when its probability reaches its own threshold: "
                 + ", ".join(f"{c} {_num(t, 4)}" for c, t in (card.get("thresholds") or {}).items()))
  else:
    lines.append("- the most probable class (argmax); no threshold")
  if task != "multiclass":
    lines.append(f"- policy {_policy_text(card.get('threshold_policy'))}; {chosen_on}")
  if card.get("temperature") is not None:
    lines.append(f"- probabilities calibrated by temperature scaling, T = {_num(card['temperature'])}")
  if card.get("threshold_note"):
    lines.append(f"- note: {card['threshold_note']}")
  lines.append("")

  tested = f" and evaluated on `{ev.get('dataset')}`" if ev else ""
  lines += ["## Limitations", "",
            f"- Trained on `{data['dataset']}`{tested} only: how it does on other hospitals, scanners, "
            "protocols, populations or patient ages is unknown until measured there "
            "(`python -m xraytpu.evaluate --data_dir=OTHER`).",
            "- No subgroup analysis (sex, age, device, view) has been made; the numbers are averages.",
            "- The confidence intervals cover sampling of the evaluated images only, not a change of "
            "population; small splits give wide intervals.",
            "- PPV and NPV depend on the prevalence of the evaluated split, which is unlikely to be "
            "that of any clinical setting.",
            "- Labels are those of the data set (often extracted from reports by rules), not a "
            "reference standard; the model learns their errors."]
  if multi:
    lines.append("- Uncertain or blank labels were masked out, never counted as negative: the "
                 "metrics of a finding cover its labelled images only.")
  for note in (ev or {}).get("notes") or []:
    lines.append(f"- {note}")
  lines += ["", "## Notice", "", card["disclaimer"], ""]
  return "\n".join(lines)
