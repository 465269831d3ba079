"""The model card: what a run's model is, how it was evaluated, what its numbers mean.

One place for the card's content: `model_card(run)` is the dict (GET /v1/model
and the page of `xraytpu.serve`), `render_markdown(card)` the same for people,
which `xraytpu.evaluate` writes to RUN/MODEL_CARD.md (`write`) and
`xraytpu.export` copies to the SavedModel's assets.extra/. The dict carries the
text too ("model_card_md"), so any server can show the card as a file.

MODEL_CARD.md follows Model Cards for Model Reporting (Mitchell et al., FAT* 2019)
and Hugging Face's model card format:

  ---                          YAML header (`metadata`): license, library_name, tags,
  ...                          datasets, pipeline_tag image-classification, metrics and
  ---                          model-index (every evaluation's AUC, sensitivity, ...)
  # Model card: RUN (MODEL)    the not-a-diagnostic-device notice (DISCLAIMER)
  ## Model details             version (sha256 of the weights), date, licence, software
                               versions, architecture, training and its hyperparameters
                               (config.json)
  ## Intended use              primary use and users, out-of-scope uses
  ## Factors                   what changes the model's performance; what was evaluated
  ## Metrics                   ROC/PR AUC, sensitivity, ... with 95% CIs, Brier score, ECE;
                               the operating point and how it was chosen
  ## Evaluation data           the split and data set behind the numbers, and the others
  ## Training data             provenance from the manifest: the source folder, the
                               conversion's arguments and counts, the data's digests,
                               how patient ids were written (never the ids)
  ## Quantitative analyses     per class / finding, confusion matrix, calibration, per
                               data set, per subgroup when the report has subgroups
  ## Ethical considerations    patient data (PHI), risks, not a medical device
  ## Caveats and recommendations
  ## Notice                    DISCLAIMER again

Every fact comes from the run directory: config.json, dataset.json (the
manifest copy), threshold.json and eval/*/report.json; the card holds no
patient identifier (the records and the manifest hold none: docs/privacy.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from tfrecord_tools import storage
from xraytpu import config
from xraytpu.config import AUGMENT_FIELDS
from xraytpu.run import card_metadata, ensemble, reports, rundir

DISCLAIMER = ("Not a diagnostic device. This is research software: its output is not a diagnosis, has "
              "not been cleared by any regulator, and must not be used to make clinical decisions.")
CARD_FORMAT = 2          # 1: before the YAML header and Mitchell et al.'s sections

_CARD_METRICS = ("auc", "auc_ci", "pr_auc", "pr_auc_ci", "sensitivity", "sensitivity_ci", "specificity",
                 "specificity_ci", "ppv", "ppv_ci", "npv", "npv_ci", "accuracy", "accuracy_ci",
                 "micro_auc", "micro_auc_ci", "threshold", "threshold_policy", "threshold_source_split",
                 "threshold_source_dataset", "num_examples", "class_counts", "dataset", "split", "task",
                 "ci", "notes", "undefined", "created", "temperature", "brier", "ece",
                 "brier_uncalibrated", "ece_uncalibrated", "confusion_matrix", "per_class", "subgroups",
                 "subgroups_info", "tta")
# config.json's fields that shaped the weights (Model details > hyperparameters).
_HYPERPARAMETERS = ("model", "weights", "head", "dropout", "image_size", "channels", "aspect",
                    "pixel_contract",
                    "optimizer", "learning_rate", "lr_schedule", "warmup_epochs", "weight_decay",
                    "batch_size", "epochs", "steps_per_epoch", "fine_tune_at", "fine_tune_epochs",
                    "fine_tune_learning_rate", "class_weight", "label_smoothing",
                    "early_stopping_patience", "reduce_lr_patience", "mixed_precision", "seed",
                    "augment", *AUGMENT_FIELDS)
# The manifest's conversion arguments that say nothing about the data (where it went, how fast),
# or are shown apart (input_dir: the source).
_NOT_PROVENANCE = ("output_dir", "num_workers", "overwrite", "quiet", "patient_key_file",
                   "beam_pipeline_options", "num_shards", "input_dir", "max_skipped_fraction")
# Options that only mean something with --labels_csv.
_LABEL_OPTIONS = ("uncertain", "blank", "label_separator", "findings", "image_column",
                  "labels_column", "label_columns", "patient_column", "split_lists", "labels_csv")


def find_eval_report(run: rundir.LoadedRun) -> dict | None:
  """The report the card quotes (`reports.find`: the training data's test split first)."""
  return reports.find(run.model_dir, reports.dataset_name(run.cfg.data_dir or "", run.manifest))


def _all_reports(run: rundir.LoadedRun) -> list[dict]:
  """Every readable eval/*/report.json of the run (the card's per-data-set analysis)."""
  out = []
  for path in rundir.eval_report_paths(run.model_dir):
    try:
      report = reports.read(path)
    except (OSError, ValueError):
      continue
    if isinstance(report, dict) and "auc" in report:
      out.append({k: report.get(k) for k in (
          "dataset", "split", "num_examples", "auc", "auc_ci", "pr_auc", "sensitivity", "specificity",
          "ppv", "npv", "accuracy", "brier", "ece", "threshold_policy", "created",
          "data_change", "training_overlap")})
  return out


def _data_caveats(card: dict) -> list[str]:
  """Caveat lines for evaluations on changed training data (--allow_data_change) or whose films
  the run trained on (xraytpu.evaluation's data_change / training_overlap); the quoted
  report's own notes already say it."""
  ev, out = card.get("evaluation") or {}, []
  for e in card.get("evaluations") or []:
    if (e.get("dataset"), e.get("split")) == (ev.get("dataset"), ev.get("split")):
      continue
    where = f"`{e.get('dataset')}` / `{e.get('split')}`"
    change = e.get("data_change")
    if change:
      out.append(f"- {where} was evaluated with --allow_data_change: the training data changed "
                 f"since training ({'; '.join(change.get('differences') or [])})")
    seen = (e.get("training_overlap") or {}).get("in_train")
    if seen:
      out.append(f"- {where}: {seen} of {e['training_overlap'].get('num_films')} evaluated films "
                 "were in the training split: its numbers overstate performance on new films")
  return out


def _weights_version(run: rundir.LoadedRun) -> str | None:
  """"sha256:<12 hex>" of the files the served weights come from (model.keras, best weights;
  an ensemble: its members' in order)."""
  digests = [rundir.weights_sha256(d) for d in ([m.model_dir for m in run.members] or [run.model_dir])]
  if any(d is None for d in digests):
    return None
  digest = digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()
  return "sha256:" + digest[:12]


def _model_details(run: rundir.LoadedRun, doc: dict) -> dict[str, Any]:
  info = doc.get("run") or {}
  strategy = info.get("strategy") or {}
  best = info.get("best") or {}
  return {
      "name": rundir.name_of(run.model_dir),
      "version": _weights_version(run),
      "date": str(info.get("finished") or info.get("started") or "")[:10] or None,
      "license": getattr(run.cfg, "model_license", "") or card_metadata.UNKNOWN_LICENSE,
      "status": doc.get("status"),
      "architecture": getattr(run.cfg, "model", None) or "unknown",
      "parameters": (info.get("params") or {}).get("total"),
      "software": dict(sorted((info.get("versions") or {}).items())),
      "hyperparameters": {k: doc[k] for k in _HYPERPARAMETERS if k in doc},
      "training": {"epochs_trained": info.get("epochs_trained"), "best_monitor": best.get("monitor"),
                   "best_value": best.get("value"),
                   "best_epoch": None if best.get("epoch") is None else int(best["epoch"]) + 1,
                   "strategy": strategy.get("name"), "accelerator": strategy.get("accelerator"),
                   "replicas": info.get("replicas"), "global_batch": info.get("global_batch"),
                   "steps_per_epoch": info.get("steps_per_epoch"),
                   "precision_policy": info.get("mixed_precision_policy"),
                   "init_from": info.get("init_from")},   # xraytpu.training.transfer.Source.record
  }


def _provenance(run: rundir.LoadedRun, doc: dict) -> dict[str, Any]:
  """Where the training data came from, as its manifest and config.json record it."""
  m = run.manifest
  args = m.get("args") or {}
  info = doc.get("run") or {}
  labels = m.get("labels") or {}
  return {
      "name": m.get("name"),
      "source": args.get("input_dir"),
      "layout": m.get("layout"),
      "converted_by": " ".join(str(x) for x in (m.get("tool"), m.get("tool_version")) if x) or None,
      "converted": m.get("created"),
      "data_dir": run.cfg.data_dir or None,
      "conversion_args": {k: v for k, v in sorted(args.items())
                          if k not in _NOT_PROVENANCE and v not in ("", None, [], {}, False)
                          and (args.get("labels_csv") or k not in _LABEL_OPTIONS)},
      "labels": ({k: labels.get(k) for k in ("layout", "csv", "split_lists", "uncertain", "blank")}
                 if labels else None),
      "counts": {k: m.get(k) for k in ("num_found", "num_converted", "num_skipped", "num_dropped")},
      "dropped": m.get("dropped") or {},
      "manifest_sha256": (info.get("manifest") or {}).get("sha256"),
      "data_digest": (info.get("data") or {}).get("digest"),
      "privacy": m.get("privacy"),
  }


def _training_warning(run: rundir.LoadedRun, doc: dict) -> str | None:
  """One line when the training went wrong: a run that collapsed (rundir.collapse's rule),
  or one that diverged or failed (its weights are those of its best finished epoch)."""
  info = doc.get("run") or {}
  if info.get("diverged"):
    d = info["diverged"]
    return (f"training diverged (the loss became NaN/inf in epoch {int(d.get('epoch', 0)) + 1}) and "
            "the run is unfinished: these are the weights of its best earlier epoch")
  if doc.get("status") == "failed":
    return (f"the training run failed ({info.get('failure')}) and is unfinished: these are the "
            "weights of its best finished epoch")
  try:
    rows = rundir.read_history(run.model_dir)
  except (OSError, ValueError):
    rows = []
  return info.get("collapsed") or rundir.collapse_of(doc, rows)


def model_card(run: rundir.LoadedRun, opts=None) -> dict[str, Any]:
  """What the model is and what its numbers mean (GET /v1/model).

  {"card_format": 2, "model": "xray_cnn", "run": "<run folder name>",
   "task": "binary"|"multiclass"|"multi_label", "classes": [...], "positive_class": str|null,
   "input": {"size": S, "channels": C, "aspect": "squash", "dtype": "uint8", "pixel_contract": 5},
   "preprocessing": {the converter's arguments from the manifest (pixels.conversion_args)},
   "model_details": {"name", "version" ("sha256:<12 hex>" of the weights), "date", "license",
                     "architecture", "parameters", "software" {package: version},
                     "hyperparameters" {config.json field: value}, "training" {...}},
   "training_data": {"dataset": name, "splits": {split: {"num_examples": n, "class_counts": {...}}},
                     "provenance": {"source" (the converted folder), "layout", "converted_by",
                                    "converted", "conversion_args", "labels", "counts",
                                    "manifest_sha256", "data_digest", "privacy"}},
   "threshold": float|null, "thresholds": {finding: float} (multi-label) | null, "threshold_policy": str, "threshold_source_split": str|null,
   "threshold_source_dataset": str|null, "threshold_note": str|null, "temperature": float|null,
   "tta": the test-time augmentation every prediction applies (threshold.json's; "none"),
   "threshold_evidence": what the threshold rests on, on val (threshold.json's "evidence":
                         positives, negatives, achieved rates with exact CIs, target, warning) | null;
                         multi-label: {finding: evidence | null},
   "evaluation": null | {report.json's headline numbers (auc, auc_ci, sensitivity, ..., brier, ece,
                         confusion_matrix, per_class, subgroups), "headline": one line, "stale": bool},
   "evaluations": [every eval/*/report.json's headline numbers],
   "metadata": the YAML header as a dict (license, library_name, tags, datasets, pipeline_tag,
               metrics, model-index),
   "disclaimer": str, "model_card_md": render_markdown(card), the card as Markdown (MODEL_CARD.md),
   "training_warning": one line when the run collapsed, diverged or failed (at the card's top), or null,
   "limits": {"max_upload_mb", "max_files", "max_pixels"} (with serve's options only)}
  """
  op = run.operating_point or {}
  manifest = run.manifest
  try:   # an ensemble's training is its runs': the first one's config.json (same data)
    doc = rundir.read_config((run.members[0] if run.members else run).model_dir) or {}
  except rundir.RunError:
    doc = {}
  splits = {}
  for name, info in sorted((manifest.get("splits") or {}).items()):
    splits[name] = {"num_examples": info.get("num_examples"), "class_counts": info.get("class_counts")}
    if info.get("finding_counts"):
      splits[name]["finding_counts"] = info["finding_counts"]
  has_op = run.has_operating_point or (bool(op) and run.task == "multiclass")
  needs_op = run.binary or run.multi_label
  card: dict[str, Any] = {
      "card_format": CARD_FORMAT,
      "model": "ensemble" if run.members else getattr(run.cfg, "model", None) or "unknown",
      "run": rundir.name_of(run.model_dir),
      "ensemble": ensemble.members_of(run) or None,   # its runs: name, path, model, auc
      "task": run.task,
      "classes": run.classes,
      "positive_class": run.classes[1] if run.binary else None,
      "input": {"size": run.size, "channels": run.channels, "aspect": run.aspect, "dtype": "uint8",
                "pixel_contract": run.contract},
      "preprocessing": run.conversion,
      "model_details": _model_details(run, doc),
      "training_data": {"dataset": reports.dataset_name(run.cfg.data_dir or "", manifest),
                        "splits": splits, "provenance": _provenance(run, doc)},
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
      "tta": run.tta,
      "threshold_evidence": ({c: (e or {}).get("evidence") for c, e in (op.get("per_finding") or {}).items()}
                             if run.multi_label else op.get("evidence")),
      "evaluation": None,
      "evaluations": _all_reports(run),
      "disclaimer": DISCLAIMER,
      "training_warning": _training_warning(run, doc) if not run.members else "; ".join(
          f"run {rundir.name_of(m.model_dir)} of the ensemble: {w}"
          for m in run.members for w in [_training_warning(m, rundir.read_config(m.model_dir) or {})]
          if w) or None,
  }
  if run.members:   # the first run's training details do not describe the average
    card["model_details"].update(date=None, parameters=None, hyperparameters={}, training={})
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
    tta_report = report.get("tta") or config.DEFAULT_TTA
    if tta_report != run.tta:   # the model is called with other views now
      ev["stale"], t_report, t_now = True, f"{t_report} (tta {tta_report})", f"{t_now} (tta {run.tta})"
    if ev["stale"]:
      ev["notes"] = list(ev.get("notes") or []) + [
          f"this report used threshold {t_report}; {rundir.OPERATING_POINT} now says "
          f"{t_now}: rerun python -m xraytpu.evaluate"]
    card["evaluation"] = ev
  card["metadata"] = card_metadata.metadata(card)
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
    f"sensitivity:{rundir.POLICY_LOWER}": "the highest threshold whose sensitivity reaches {x:g} at "
                                          "its {c:.0%} exact lower confidence bound on val",
    f"specificity:{rundir.POLICY_LOWER}": "the lowest threshold whose specificity reaches {x:g} at "
                                          "its {c:.0%} exact lower confidence bound on val",
    "fixed": "a fixed threshold of {x:g}, not chosen on data",
}
_METRICS = (("auc", "ROC AUC"), ("pr_auc", "PR AUC (average precision)"), ("micro_auc", "ROC AUC (micro)"),
            ("sensitivity", "sensitivity"), ("specificity", "specificity"), ("ppv", "PPV"),
            ("npv", "NPV"), ("accuracy", "accuracy"))
_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


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
  x, _, bound = x.partition(":")   # sensitivity:X:lower (xraytpu.evaluation.metrics' policies)
  if kind == "argmax":
    return "argmax: the most probable class, no threshold"
  text = _POLICIES.get(kind if bound != rundir.POLICY_LOWER else f"{kind}:{bound}")
  if text is None:
    return f"`{policy}`"
  try:
    return f"`{policy}`: " + text.format(x=float(x) if x else 0.0, c=rundir.POLICY_CONFIDENCE)
  except ValueError:
    return f"`{policy}`"


def _counts(counts: dict | None, order: list[str]) -> str:
  """"A 3, B 5" in the run's class / finding order (others after them)."""
  counts = counts or {}
  keys = [k for k in order if k in counts] + sorted(k for k in counts if k not in order)
  return ", ".join(f"{k} {counts[k]}" for k in keys) or "n/a"


def _kv(d: dict | None) -> str:
  return ", ".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}"
                   for k, v in (d or {}).items()) or "n/a"


def _what(card: dict) -> str:
  task, classes = card["task"], card["classes"]
  return {"binary": f"binary classifier ({' vs '.join(classes)})",
          "multiclass": f"{len(classes)}-class classifier ({', '.join(classes)})",
          rundir.MULTI_LABEL: f"multi-label classifier of {len(classes)} findings "
                              f"({', '.join(classes)})"}.get(task, "classifier")


def _model_details_md(card: dict) -> list[str]:
  d = card.get("model_details") or {}
  inp = card["input"]
  multi = card["task"] == rundir.MULTI_LABEL
  tr = d.get("training") or {}
  lines = ["## Model details", "",
           f"- {_what(card)}, trained with xraytpu; task: {card['task']}"
           + (f"; positive class: {card['positive_class']}" if card.get("positive_class") else ""),
           f"- version: `{d.get('version') or 'n/a'}` (sha256 of the weights); date: "
           f"{d.get('date') or 'n/a'} (training finished); licence: `{d.get('license') or card_metadata.UNKNOWN_LICENSE}`"
           + (" (set with xraytpu.train --model_license; the training data's terms apply too)"
              if (d.get("license") or card_metadata.UNKNOWN_LICENSE) == card_metadata.UNKNOWN_LICENSE else ""),
           *_ensemble_md(card),
           f"- architecture: `{card['model']}`"
           + (f", {d['parameters']:,} parameters" if d.get("parameters") else ""),
           f"- input: {inp['size']}x{inp['size']} px, {inp['channels']} channel(s), uint8, non-square "
           f"images: {inp['aspect']}"
           + (f", pixel contract {inp['pixel_contract']}" if inp.get("pixel_contract") else ""),
           "- preprocessing (the converter's settings, replayed for new files): "
           + (", ".join(f"{k}={v}" for k, v in sorted((card.get("preprocessing") or {}).items())) or "defaults"),
           "- output: " + ("one probability per finding (sigmoid)" if multi else "one probability per class"),
           f"- software: {_kv(d.get('software'))}"]
  if tr.get("epochs_trained") is not None:
    best = ""
    if tr.get("best_value") is not None:
      best = (f"; best {tr.get('best_monitor')} {_num(tr['best_value'])} at epoch {tr.get('best_epoch')}"
              " (these weights)")
    lines.append(f"- training: {tr['epochs_trained']} epochs{best}; strategy {tr.get('strategy')} on "
                 f"{tr.get('replicas')} {tr.get('accelerator')} replica(s), global batch "
                 f"{tr.get('global_batch')}, {tr.get('steps_per_epoch')} steps per epoch, "
                 f"{tr.get('precision_policy')}")
  if tr.get("init_from"):
    src = tr["init_from"]
    lines.append(f"- warm-started (--init_from) from the {src.get('model')} run `{src.get('run_dir')}` "
                 f"(weights `sha256:{str(src.get('weights_sha256'))[:12]}`, {src.get('task')} on "
                 f"{', '.join(src.get('classes') or [])}): {src.get('layers')} backbone layers copied, "
                 "a new head for this task")
  if d.get("hyperparameters"):
    lines.append(f"- hyperparameters (config.json): {_kv(d['hyperparameters'])}")
  return lines + [""]


def _ensemble_md(card: dict) -> list[str]:
  """An ensemble's line: its runs, averaged (xraytpu.run.ensemble)."""
  runs = card.get("ensemble") or []
  if not runs:
    return []
  return [f"- ensemble of {len(runs)} runs, the mean of their raw probabilities, with its own "
          "operating point: " + ", ".join(
              f"`{r['name']}` ({r.get('model')}"
              + (f", AUC {_num(r['auc'])} on {r['auc_split']}" if r.get("auc") is not None else "")
              + ")" for r in runs)]


def _intended_use_md(card: dict) -> list[str]:
  return ["## Intended use", "",
          "Research and teaching: studying how well a " + _what(card)
          + " does on chest X-ray / CT images like those it was trained on. Not for diagnosis, "
            "triage or any decision about a patient (see the notice below).", "",
          "- primary users: machine-learning engineers and clinical researchers, who read this card "
          "and evaluate the model on their own data first",
          "- out of scope: any clinical use; images unlike the training data (another modality, body "
          "part, view, age group, scanner or hospital) until evaluated there; finding classes it "
          "was not trained on; use without a human expert reading the images", ""]


def _factors_md(card: dict) -> list[str]:
  ev = card.get("evaluation") or {}
  sub = ev.get("subgroups") or {}
  measured = [f"data set and split ({len(card.get('evaluations') or []) or 'no'} evaluation(s))",
              "class" if card["task"] != rundir.MULTI_LABEL else "finding"]
  measured += [f"subgroups by {a}" for a in sub]
  return ["## Factors", "",
          "- relevant factors: patient (age, sex, body habitus, disease severity and prevalence), "
          "acquisition (scanner and vendor, view AP / PA / lateral, portable films, exposure, "
          "DICOM rendering), site and population, and how the labels were made (radiologist reads "
          "or rules run on reports)",
          f"- evaluation factors reported here: {', '.join(measured)}"
          + ("" if sub else "; the data set records no patient or acquisition attributes, so no "
             "subgroup was measured"), ""]


def _metrics_md(card: dict) -> list[str]:
  ev = card.get("evaluation")
  task = card["task"]
  multi = task == rundir.MULTI_LABEL
  lines = ["## Metrics", ""]
  if not ev:
    lines += ["Not evaluated yet: run `python -m xraytpu.evaluate --model_dir=RUN` to measure the "
              "model on the test split.", ""]
  else:
    ci = ev.get("ci") or {}
    lines += [f"On `{ev.get('dataset')}` / `{ev.get('split')}`"
              + (", macro means over findings" if multi else "")
              + (", multi-class: AUC macro one-vs-rest, sensitivity etc. macro averages" if task == "multiclass" else "")
              + f". 95% confidence intervals: {ci.get('method', 'bootstrap')}, "
              f"{ci.get('resamples', '?')} resamples. Brier score and ECE (expected calibration "
              "error, 10 bins) measure calibration: lower is better.", "",
              "| metric | value (95% CI) |", "| --- | --- |"]
    undefined = ev.get("undefined") or {}
    for key, label in _METRICS:
      if (key == "micro_auc" and task != "multiclass") or (key == "accuracy" and multi):
        continue
      value = _with_ci(ev.get(key), ev.get(key + "_ci"))
      if ev.get(key) is None and undefined.get(key):
        value += f" ({undefined[key]})"
      lines.append(f"| {label} | {value} |")
    lines.append(f"| Brier score | {_num(ev.get('brier'), 4)} |")
    lines.append(f"| ECE (10 bins) | {_num(ev.get('ece'), 4)} |")
    if ev.get("headline"):
      lines += ["", f"In one line: {ev['headline']}"]
    lines.append("")
  lines += ["### Operating point", ""]
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
    evidence = card.get("threshold_evidence") or {}
    for c, ev in ([(None, evidence)] if task == "binary" else list(evidence.items())):
      if ev:
        lines.append(f"- {c + ': ' if c else ''}on `{source}`, {reports.evidence(ev)}")
        if ev.get("warning"):
          lines.append(f"- **warning**{' (' + c + ')' if c else ''}: `{source}` is too small for this "
                       f"operating point: {ev['warning']}")
  if card.get("temperature") is not None:
    lines.append(f"- probabilities calibrated by temperature scaling, T = {_num(card['temperature'])}")
  if card.get("tta") not in (None, config.DEFAULT_TTA):
    lines.append(f"- test-time augmentation `{card['tta']}`: each probability is the mean over "
                 f"{len(config.TTA_PRESETS[card['tta']])} views of the image (zoomed/shifted, never "
                 "flipped), as the threshold was chosen")
  if card.get("threshold_note"):
    lines.append(f"- note: {card['threshold_note']}")
  return lines + [""]


def _evaluation_data_md(card: dict) -> list[str]:
  ev = card.get("evaluation")
  multi = card["task"] == rundir.MULTI_LABEL
  lines = ["## Evaluation data", ""]
  if not ev:
    return lines + ["None yet: the model has not been evaluated.", ""]
  lines.append(f"Evaluated on the `{ev.get('split')}` split of `{ev.get('dataset')}`: "
               f"{ev.get('num_examples')} images ({_counts(ev.get('class_counts'), card['classes'])}"
               + (" positives" if multi else "") + "). "
               + ("It is a held-out split of the training data set: no image of it was trained on, "
                  "and the operating point was chosen on another split."
                  if ev.get("dataset") == card["training_data"]["dataset"] else
                  "It is another data set than the training data."))
  others = [e for e in card.get("evaluations") or []
            if (e.get("dataset"), e.get("split")) != (ev.get("dataset"), ev.get("split"))]
  if others:
    lines.append("Also evaluated on: " + "; ".join(
        f"`{e.get('dataset')}` / `{e.get('split')}` ({e.get('num_examples')} images)" for e in others)
                 + " (see Quantitative analyses).")
  return lines + [""]


def _training_data_md(card: dict) -> list[str]:
  data = card["training_data"]
  multi = card["task"] == rundir.MULTI_LABEL
  p = data.get("provenance") or {}
  lines = ["## Training data", ""]
  if p:
    lines.append(f"- data set: `{data['dataset']}`"
                 + (f", converted by {p['converted_by']}" if p.get("converted_by") else "")
                 + (f" on {str(p['converted'])[:10]}" if p.get("converted") else "")
                 + (f" from `{p['source']}`" if p.get("source") else "")
                 + (f" ({p['layout']} layout)" if p.get("layout") else ""))
    if p.get("labels"):
      lab = p["labels"]
      lines.append(f"- labels: {lab.get('layout')} label CSV(s) "
                   + ", ".join(f"`{os.path.basename(str(c))}`" for c in lab.get("csv") or [])
                   + (f"; uncertain labels: {lab['uncertain']}, blank cells: {lab['blank']}"
                      if lab.get("uncertain") else ""))
    else:
      lines.append("- labels: the class folders the images were found in")
    counts = p.get("counts") or {}
    if counts.get("num_found") is not None:
      lines.append(f"- files: {counts.get('num_found')} found, {counts.get('num_converted')} converted, "
                   f"{counts.get('num_skipped')} skipped (unreadable or not images), "
                   f"{counts.get('num_dropped')} dropped" + (f" ({_kv(p.get('dropped'))})" if p.get("dropped") else ""))
    if p.get("conversion_args"):
      lines.append(f"- conversion: {_kv(p['conversion_args'])}")
    ids = [f"manifest sha256 `{p['manifest_sha256'][:16]}`" if p.get("manifest_sha256") else "",
           f"data digest `{p['data_digest'][:16]}`" if p.get("data_digest") else "",
           f"read from `{p['data_dir']}`" if p.get("data_dir") else ""]
    if any(ids):
      lines.append("- identity: " + ", ".join(i for i in ids if i))
    lines.append("- patient identifiers: " + _privacy_text(p.get("privacy")))
    lines.append("")
  lines += [f"Images per split{' (positives per finding; masked labels are not counted)' if multi else ''}:", "",
            f"| split | images | {'positives per finding' if multi else 'images per class'} |",
            "| --- | --- | --- |"]
  for split, info in sorted(data["splits"].items(), key=lambda kv: (_SPLIT_ORDER.get(kv[0], 3), kv[0])):
    lines.append(f"| {split} | {info.get('num_examples')} | {_counts(info.get('class_counts'), card['classes'])} |")
  return lines + [""]


def _privacy_text(privacy: dict | None) -> str:
  if privacy is None:
    return ("the data set was converted before patient ids were pseudonymised: its records may "
            "hold them in clear (`python -m tfrecord_tools.inspect` says; docs/privacy.md)")
  if privacy.get("patient_ids") == "hmac-sha256":
    text = (f"records hold keyed pseudonyms (HMAC-SHA256, key id `{privacy.get('key_id')}`), "
            "never the ids")
  else:
    text = "the data set holds no patient ids"
  return text + ("; file names hashed" if privacy.get("filenames") == "hashed" else
                 "; a patient's id in a file name is replaced by its pseudonym")


def _quantitative_md(card: dict) -> list[str]:
  ev = card.get("evaluation")
  task, classes = card["task"], card["classes"]
  multi = task == rundir.MULTI_LABEL
  lines = ["## Quantitative analyses", ""]
  if not ev:
    return lines + ["None yet: evaluate the model first.", ""]
  where = f"`{ev.get('dataset')}` / `{ev.get('split')}`"
  if multi and ev.get("per_finding"):
    lines += [f"Per finding, on {where}:", "",
              "| finding | AUC (95% CI) | sensitivity | specificity | threshold | "
              "positives / negatives / ignored |", "| --- | --- | --- | --- | --- | --- |"]
    for c, d in ev["per_finding"].items():
      lines.append(f"| {c} | {_with_ci(d.get('auc'), d.get('auc_ci'))} | "
                   f"{_with_ci(d.get('sensitivity'), d.get('sensitivity_ci'))} | "
                   f"{_with_ci(d.get('specificity'), d.get('specificity_ci'))} | {_num(d.get('threshold'))} | "
                   f"{d.get('positives')} / {d.get('negatives')} / {d.get('ignored')} |")
    lines.append("")
  elif ev.get("per_class"):
    lines += [f"Per class (one vs the rest), on {where}:", "",
              "| class | AUC | sensitivity | specificity | PPV | NPV | F1 | images |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in classes:
      d = (ev["per_class"] or {}).get(c) or {}
      lines.append(f"| {c} | {_num(d.get('auc'))} | {_num(d.get('sensitivity'))} | "
                   f"{_num(d.get('specificity'))} | {_num(d.get('ppv'))} | {_num(d.get('npv'))} | "
                   f"{_num(d.get('f1'))} | {d.get('support')} |")
    lines.append("")
  cm = ev.get("confusion_matrix")
  if cm:
    lines += [f"Confusion matrix on {where} (rows: true class, columns: predicted"
              + (", at the operating point" if task == "binary" else "") + "):", "",
              "| true \\ predicted | " + " | ".join(classes) + " |",
              "| --- | " + " | ".join("---" for _ in classes) + " |"]
    for c, row in zip(classes, cm):
      lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    lines.append("")
  if ev.get("brier") is not None or ev.get("ece") is not None:
    text = f"Calibration on {where}: Brier score {_num(ev.get('brier'), 4)}, ECE {_num(ev.get('ece'), 4)}"
    if ev.get("temperature") is not None and ev.get("brier_uncalibrated") is not None:
      text += (f" (before temperature scaling: Brier {_num(ev.get('brier_uncalibrated'), 4)}, ECE "
               f"{_num(ev.get('ece_uncalibrated'), 4)})")
    lines += [text + ".", ""]
  evaluations = card.get("evaluations") or []
  if evaluations:
    lines += ["Every evaluation of this model (RUN/eval/):", "",
              "| data set / split | images | AUC (95% CI) | sensitivity | specificity | Brier | ECE |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for e in evaluations:
      lines.append(f"| `{e.get('dataset')}` / `{e.get('split')}` | {e.get('num_examples')} | "
                   f"{_with_ci(e.get('auc'), e.get('auc_ci'))} | {_num(e.get('sensitivity'))} | "
                   f"{_num(e.get('specificity'))} | {_num(e.get('brier'), 4)} | {_num(e.get('ece'), 4)} |")
    lines.append("")
  sub = ev.get("subgroups") or {}
  if sub:
    info = ev.get("subgroups_info") or {}
    lines += [f"Per subgroup (xraytpu.evaluation.subgroups; age bands in years: "
              f"{', '.join(info.get('age_bands') or []) or 'n/a'}; a CI needs at least "
              f"{info.get('min_per_class', 'n/a')} images of each class it covers, a smaller "
              "subgroup says so in its note):", "",
              "| attribute | value | images | AUC (95% CI) | sensitivity | specificity | note |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for attribute, groups in sub.items():
      for value, d in (groups or {}).items():
        lines.append(f"| {attribute} | {value} | {d.get('num_examples')} | "
                     f"{_with_ci(d.get('auc'), d.get('auc_ci'))} | "
                     f"{_with_ci(d.get('sensitivity'), d.get('sensitivity_ci'))} | "
                     f"{_with_ci(d.get('specificity'), d.get('specificity_ci'))} | "
                     f"{d.get('note') or ''} |")
    lines += [f"- {a}: not reported ({why})" for a, why in (info.get("left_out") or {}).items()]
    lines.append("")
  else:
    lines += ["Subgroups: none measured. The data set records no patient or acquisition attributes "
              "(sex, age, view, device), so how the model does for each is unknown; the numbers "
              "above are averages over the evaluated images.", ""]
  return lines


def _ethics_md(card: dict) -> list[str]:
  p = (card["training_data"].get("provenance") or {})
  if not p:
    ids = "how the data set wrote patient ids is in its dataset.json (\"privacy\")"
  elif p.get("privacy") is None:
    ids = ("this model's data set was converted before patient ids were pseudonymised, so its "
           "records may hold them in clear: convert it again (docs/privacy.md) before sharing it")
  else:
    ids = ("records, manifests, reports, predictions and this card carry no patient identifier in "
           "clear (" + _privacy_text(p.get("privacy")) + "); keep the pseudonym key apart from the data")
  return ["## Ethical considerations", "",
          "- data: trained on medical images of patients, which are protected health information "
          f"(PHI): {ids}. Treat the images themselves as health data too (faces, implants and "
          "burnt-in text can identify a patient)",
          "- risks: a wrong output can delay care (a missed finding) or lead to needless tests (a "
          "false alarm); people tend to trust a machine's answer (automation bias); performance "
          "can drop without warning on other scanners, hospitals or populations, and may differ "
          "between groups of patients, which was not measured",
          "- use: regulators treat software that informs diagnosis or treatment as a medical device; "
          "this model has no such clearance (see the notice)", ""]


def _caveats_md(card: dict) -> list[str]:
  ev = card.get("evaluation")
  data = card["training_data"]
  multi = card["task"] == rundir.MULTI_LABEL
  tested = f" and evaluated on `{ev.get('dataset')}`" if ev else ""
  lines = ["## Caveats and recommendations", "",
           f"- Trained on `{data['dataset']}`{tested} only: how it does on other hospitals, scanners, "
           "protocols, populations or patient ages is unknown until measured there "
           "(`python -m xraytpu.evaluate --data_dir=OTHER`).",
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
  lines += _data_caveats(card)
  lines += ["- Recommended: evaluate on data from the intended site before any study, choose the "
            "operating point on that site's validation data, and measure subgroups (sex, age, view, "
            "device) there.", ""]
  return lines


def render_markdown(card: dict[str, Any]) -> str:
  """MODEL_CARD.md from the card dict (`model_card`): the YAML header, then the same facts for people."""
  meta = card.get("metadata") or card_metadata.metadata(card)
  lines = ["---", *card_metadata.to_yaml(meta), "---", "",
           f"# Model card: {card['run']} ({card['model']})", "", f"> **{card['disclaimer']}**", ""]
  if card.get("training_warning"):
    lines += [f"> **Warning: {card['training_warning']}**", ""]
  for part in (_model_details_md, _intended_use_md, _factors_md, _metrics_md, _evaluation_data_md,
               _training_data_md, _quantitative_md, _ethics_md, _caveats_md):
    lines += part(card)
  lines += ["## Notice", "", card["disclaimer"], ""]
  return "\n".join(lines)
