"""The model card's YAML header: Hugging Face's model card metadata (license,
library_name, tags, datasets, pipeline_tag, model-index), built from the card dict
(xraytpu.run.model_card), and `to_yaml`, which writes the plain dicts, lists and
scalars the header holds, quoting what YAML would otherwise read as another type.
"""

from __future__ import annotations

import json
import re
from typing import Any

from xraytpu.run import rundir

LIBRARY_NAME = "keras"   # Hugging Face's library_name for Keras models (model.keras, tf-keras)
PIPELINE_TAG = "image-classification"
# (report key, model-index metric type, name) of the headline metrics.
_INDEX_METRICS = (("auc", "roc_auc", "ROC AUC"), ("pr_auc", "average_precision", "PR AUC"),
                  ("sensitivity", "recall", "Sensitivity"), ("specificity", "specificity", "Specificity"),
                  ("ppv", "precision", "PPV"), ("npv", "npv", "NPV"), ("accuracy", "accuracy", "Accuracy"),
                  ("brier", "brier_score", "Brier score"), ("ece", "ece", "ECE (10 bins)"))
UNKNOWN_LICENSE = "unknown"



def _tag(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")


def metadata(card: dict[str, Any]) -> dict[str, Any]:
  """The card's YAML header as a dict: license, library_name, tags, datasets, pipeline_tag,
  metrics and (once evaluated) model-index with every evaluation's results."""
  details = card.get("model_details") or {}
  data = card["training_data"]
  evaluations = list(card.get("evaluations") or [])
  ev = card.get("evaluation")
  if ev and not any((e.get("dataset"), e.get("split")) == (ev.get("dataset"), ev.get("split"))
                    for e in evaluations):
    evaluations.insert(0, ev)
  # The report the card quotes first, then the others in their order.
  if ev:
    evaluations.sort(key=lambda e: (e.get("dataset"), e.get("split")) != (ev.get("dataset"), ev.get("split")))
  datasets = [data["dataset"]] + sorted({str(e["dataset"]) for e in evaluations
                                          if e.get("dataset") and e["dataset"] != data["dataset"]})
  task = card["task"]
  tags = ["xraytpu", "medical-imaging", "chest-x-ray", "radiology", PIPELINE_TAG,
          {"binary": "binary-classification", "multiclass": "multiclass-classification",
           rundir.MULTI_LABEL: "multi-label-classification"}.get(task, task), _tag(card["model"])]
  meta: dict[str, Any] = {
      "license": details.get("license") or UNKNOWN_LICENSE,
      "library_name": LIBRARY_NAME,
      "pipeline_tag": PIPELINE_TAG,
      "tags": list(dict.fromkeys(t for t in tags if t)),
      "datasets": datasets,
  }
  results = []
  for e in evaluations:
    values = [{"type": kind, "value": round(float(e[key]), 4), "name": name
               + (" (macro over findings)" if task == rundir.MULTI_LABEL and key not in ("brier", "ece") else "")}
              for key, kind, name in _INDEX_METRICS if e.get(key) is not None]
    if values:
      results.append({"task": {"type": PIPELINE_TAG, "name": "Image Classification"},
                      "dataset": {"type": str(e.get("dataset")), "name": str(e.get("dataset")),
                                  "split": str(e.get("split"))},
                      "metrics": values})
  if results:
    meta["metrics"] = list(dict.fromkeys(v["type"] for r in results for v in r["metrics"]))
    meta["model-index"] = [{"name": card["run"], "results": results}]
  return meta


_PLAIN = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-/ ]*$")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _scalar(v) -> str:
  if v is None:
    return "null"
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, (int, float)):
    return json.dumps(v)
  s = str(v)
  if _PLAIN.match(s) and s.lower() not in _YAML_WORDS and not s.endswith(" "):
    return s
  return json.dumps(s)   # a JSON string is a YAML double-quoted scalar


def to_yaml(obj, indent: int = 0) -> list[str]:
  """Block-style YAML of dicts, lists and scalars (what the header needs; no library)."""
  pad = " " * indent
  lines = []
  if isinstance(obj, dict):
    for k, v in obj.items():
      if isinstance(v, (dict, list)) and v:
        lines.append(f"{pad}{k}:")
        lines += to_yaml(v, indent + (2 if isinstance(v, dict) else 0))
      else:
        lines.append(f"{pad}{k}: {_scalar(v) if not isinstance(v, (dict, list)) else ('{}' if isinstance(v, dict) else '[]')}")
  elif isinstance(obj, list):
    for v in obj:
      if isinstance(v, (dict, list)) and v:
        sub = to_yaml(v, indent + 2)
        lines.append(f"{pad}- {sub[0].lstrip()}")
        lines += sub[1:]
      else:
        lines.append(f"{pad}- {_scalar(v)}")
  else:
    lines.append(pad + _scalar(obj))
  return lines
