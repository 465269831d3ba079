"""MODEL_CARD.md: written by evaluate from the card dict, carried by the card itself
("model_card_md", for any server) and copied into the export's assets.extra/."""

from __future__ import annotations

import json
import os

import pytest

from tests._runs import copy_run, evaluated_copy
from xraytpu.inference import export_lib, predict_lib

from xraytpu.run import card_metadata, model_card, rundir

# Mitchell et al. 2019's sections (the operating point is part of Metrics), then the notice.
SECTIONS = ("## Model details", "## Intended use", "## Factors", "## Metrics", "## Evaluation data",
            "## Training data", "## Quantitative analyses", "## Ethical considerations",
            "## Caveats and recommendations", "## Notice")


def _sections(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.startswith("## ")]


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
  return evaluated_copy(trained_run, tmp_path_factory, "card")


def test_evaluate_writes_the_card_of_a_binary_run(evaluated):
  run, report = evaluated
  text = open(os.path.join(run, "MODEL_CARD.md")).read()
  assert _sections(text) == list(SECTIONS)
  assert model_card.DISCLAIMER in text and text.count(model_card.DISCLAIMER) == 2   # top and notice
  # Data with counts: every split of the training data, per class.
  assert "| train | 44 | NORMAL 22, PNEUMONIA 22 |" in text
  assert "| val | 8 | NORMAL 4, PNEUMONIA 4 |" in text
  assert "Evaluated on the `test` split" in text and "8 images (NORMAL 4, PNEUMONIA 4)" in text
  # Metrics with their CIs, as report.json has them.
  lo, hi = report["auc_ci"]
  assert f"| ROC AUC | {report['auc']:.3f} ({lo:.3f}-{hi:.3f}) |" in text
  assert "| sensitivity | " in text and "| specificity | " in text and "percentile bootstrap" in text
  # The operating point and how it was chosen.
  op = json.load(open(os.path.join(run, "threshold.json")))
  assert f"P(PNEUMONIA) >= **{op['threshold']:.4f}**" in text
  assert "`youden`: Youden's J" in text and "chosen on the `val` split" in text
  # The card dict carries the same text (what a server shows).
  loaded = predict_lib.load(run)
  assert model_card.model_card(loaded)["model_card_md"] == text


def test_export_copies_the_card_to_assets_extra(evaluated, tmp_path):
  run, _ = evaluated
  path = export_lib.export(run, export_dir=str(tmp_path / "export"))
  exported = open(os.path.join(path, "assets.extra", "MODEL_CARD.md")).read()
  assert exported == open(os.path.join(run, rundir.MODEL_CARD)).read()
  assert export_lib.load_metadata(path)["classes"] == ["NORMAL", "PNEUMONIA"]


def test_card_of_an_unevaluated_run_says_so(trained_run, tmp_path):
  run = predict_lib.load(copy_run(trained_run, tmp_path))
  text = model_card.model_card(run)["model_card_md"]
  assert _sections(text) == list(SECTIONS)
  assert "Not evaluated yet" in text and "P(PNEUMONIA) >= **0.5000**" in text
  assert "no threshold.json in the run" in text and model_card.DISCLAIMER in text
  # --overwrite clears the card with the rest of the old run.
  assert rundir.MODEL_CARD in rundir._ENTRIES


def test_multiclass_card_renders_argmax_and_macro_metrics():
  card = {"model": "xray_cnn", "run": "r", "task": "multiclass", "classes": ["A", "B", "C"],
          "positive_class": None, "input": {"size": 64, "channels": 1, "aspect": "squash", "dtype": "uint8"},
          "preprocessing": {"max_side": 256},
          "training_data": {"dataset": "tri", "splits": {"train": {"num_examples": 30,
                                                                   "class_counts": {"A": 10, "B": 10, "C": 10}}}},
          "threshold": None, "thresholds": None, "threshold_policy": "argmax",
          "threshold_source_split": None, "threshold_source_dataset": None, "threshold_note": None,
          "temperature": 1.7, "disclaimer": model_card.DISCLAIMER,
          "evaluation": {"split": "test", "dataset": "tri", "num_examples": 9,
                         "class_counts": {"A": 3, "B": 3, "C": 3}, "auc": 0.9, "auc_ci": [0.8, 0.95],
                         "micro_auc": 0.91, "micro_auc_ci": [0.85, 0.97], "accuracy": 0.7,
                         "accuracy_ci": [0.5, 0.9], "sensitivity": 0.7, "sensitivity_ci": None,
                         "ci": {"method": "stratified percentile bootstrap", "resamples": 100},
                         "notes": ["no test examples of D"], "headline": "test: AUC 0.9"}}
  text = model_card.render_markdown(card)
  assert _sections(text) == list(SECTIONS)
  assert "| ROC AUC (micro) | 0.910 (0.850-0.970) |" in text and "| accuracy | 0.700 (0.500-0.900) |" in text
  assert "argmax" in text and "T = 1.700" in text and "- no test examples of D" in text
  assert "| train | 30 | A 10, B 10, C 10 |" in text


# -- the full card: Hugging Face's YAML header and Mitchell et al.'s sections (issue 23) --------


def _header(text: str) -> dict:
  """The YAML header between the first two '---' lines, parsed (PyYAML; without it, a strict
  check that the header is the block-style subset the card writes)."""
  lines = text.splitlines()
  assert lines[0] == "---", "the card starts with its YAML header"
  end = lines.index("---", 1)
  block = "\n".join(lines[1:end])
  try:
    import yaml
  except ImportError:   # pragma: no cover - PyYAML is in the test environment
    for line in lines[1:end]:
      assert line and not line.startswith("\t") and (": " in line or line.rstrip().endswith(":")
                                                     or line.lstrip().startswith("- ")), line
    pytest.skip("PyYAML is not installed: only the header's shape was checked")
  return yaml.safe_load(block)


def _section(text: str, title: str) -> str:
  """The text of one '## title' section (up to the next '## ')."""
  start = text.index(f"\n## {title}\n")
  end = text.find("\n## ", start + 1)
  return text[start:end if end > 0 else len(text)]


def test_the_card_has_a_hugging_face_header_and_every_model_card_section(evaluated):
  import hashlib

  import tensorflow as tf
  run, report = evaluated
  text = open(os.path.join(run, "MODEL_CARD.md")).read()
  loaded = predict_lib.load(run)
  card = model_card.model_card(loaded)
  config = json.load(open(os.path.join(run, "config.json")))
  manifest = json.load(open(os.path.join(run, "dataset.json")))

  # The YAML header: what the Hub reads, and the same dict the card serves.
  meta = _header(text)
  assert meta == card["metadata"]
  assert meta["license"] == "unknown" and meta["library_name"] == "keras"
  assert meta["pipeline_tag"] == "image-classification"
  assert {"xraytpu", "medical-imaging", "image-classification", "binary-classification"} <= set(meta["tags"])
  assert meta["datasets"] == ["tfrecords"]
  (index,) = meta["model-index"]
  assert index["name"] == os.path.basename(run)
  (result,) = index["results"]
  assert result["task"]["type"] == "image-classification"
  assert result["dataset"] == {"type": "tfrecords", "name": "tfrecords", "split": "test"}
  values = {m["type"]: m["value"] for m in result["metrics"]}
  for key, kind in (("auc", "roc_auc"), ("pr_auc", "average_precision"), ("sensitivity", "recall"),
                    ("specificity", "specificity"), ("brier", "brier_score"), ("ece", "ece")):
    assert values[kind] == round(report[key], 4), kind
  assert set(meta["metrics"]) == set(values)

  # Model details: version (the weights' sha256), date, licence, software, hyperparameters.
  details = _section(text, "Model details")
  h = hashlib.sha256()
  for name in ("model.keras", os.path.join("checkpoints", "best.weights.h5")):
    if os.path.exists(os.path.join(run, name)):
      h.update(open(os.path.join(run, name), "rb").read())
  assert card["model_details"]["version"] == "sha256:" + h.hexdigest()[:12]
  assert f"version: `sha256:{h.hexdigest()[:12]}`" in details
  assert f"date: {config['run']['finished'][:10]}" in details
  assert "licence: `unknown`" in details and "--model_license" in details
  assert f"tensorflow={tf.__version__}" in details and f"xraytpu={config['run']['versions']['xraytpu']}" in details
  hyper = card["model_details"]["hyperparameters"]
  assert (hyper["batch_size"], hyper["epochs"], hyper["learning_rate"], hyper["optimizer"]) == (8, 1, 0.001, "adam")
  assert "batch_size=8" in details and "learning_rate=0.001" in details and "optimizer=adam" in details
  assert f"{config['run']['params']['total']:,} parameters" in details

  # Intended use, factors.
  assert "out of scope: any clinical use" in _section(text, "Intended use")
  factors = _section(text, "Factors")
  assert "view AP / PA / lateral" in factors and "no subgroup was measured" in factors

  # Metrics: the CIs, Brier score and ECE as report.json has them, and the operating point.
  metrics = _section(text, "Metrics")
  assert f"| Brier score | {report['brier']:.4f} |" in metrics
  assert f"| ECE (10 bins) | {report['ece']:.4f} |" in metrics
  assert "### Operating point" in metrics and "P(PNEUMONIA) >= **" in metrics

  # Evaluation data and training data: provenance from the manifest, not a folder name.
  assert "held-out split of the training data set" in _section(text, "Evaluation data")
  data = _section(text, "Training data")
  prov = card["training_data"]["provenance"]
  assert prov["source"] == manifest["args"]["input_dir"] and prov["layout"] == "splits"
  assert f"from `{manifest['args']['input_dir']}` (splits layout)" in data
  assert f"converted by tfrecord_tools.convert {manifest['tool_version']} on {manifest['created'][:10]}" in data
  assert "60 found, 60 converted, 0 skipped" in data and "labels: the class folders" in data
  assert f"manifest sha256 `{config['run']['manifest']['sha256'][:16]}`" in data
  assert "the data set holds no patient ids" in data    # converted without --group_regex

  # Quantitative analyses: per class, the confusion matrix, calibration, every evaluation.
  quant = _section(text, "Quantitative analyses")
  cm = report["confusion_matrix"]
  assert "| true \\ predicted | NORMAL | PNEUMONIA |" in quant
  assert f"| NORMAL | {cm[0][0]} | {cm[0][1]} |" in quant and f"| PNEUMONIA | {cm[1][0]} | {cm[1][1]} |" in quant
  assert card["evaluation"]["confusion_matrix"] == cm and card["evaluation"]["brier"] == report["brier"]
  pc = report["per_class"]["PNEUMONIA"]
  assert (f"| PNEUMONIA | {pc['auc']:.3f} | {pc['sensitivity']:.3f} | {pc['specificity']:.3f} |") in quant
  assert f"Brier score {report['brier']:.4f}, ECE {report['ece']:.4f}" in quant
  assert "| `tfrecords` / `test` | 8 |" in quant and "Subgroups: none measured" in quant

  # Ethical considerations, caveats.
  ethics = _section(text, "Ethical considerations")
  assert "(PHI)" in ethics and "automation bias" in ethics and "medical device" in ethics
  assert "Recommended: evaluate on data from the intended site" in _section(text, "Caveats and recommendations")


def test_the_licence_comes_from_the_runs_config_and_an_unevaluated_card_has_no_results(trained_run, tmp_path):
  run = copy_run(trained_run, tmp_path)
  config = json.load(open(os.path.join(run, "config.json")))
  config["model_license"] = "cc-by-nc-4.0"
  json.dump(config, open(os.path.join(run, "config.json"), "w"))
  card = model_card.model_card(predict_lib.load(run))
  meta = _header(card["model_card_md"])
  assert meta["license"] == "cc-by-nc-4.0" and card["model_details"]["license"] == "cc-by-nc-4.0"
  assert "model-index" not in meta and "metrics" not in meta    # nothing measured yet
  assert "licence: `cc-by-nc-4.0`" in card["model_card_md"] and "--model_license" not in card["model_card_md"]
  assert "None yet" in _section(card["model_card_md"], "Evaluation data")


def test_subgroups_render_when_the_report_has_them_and_yaml_scalars_round_trip():
  yaml = pytest.importorskip("yaml")
  card = {"model": "xray_cnn", "run": "r", "task": "binary", "classes": ["NORMAL", "PNEUMONIA"],
          "positive_class": "PNEUMONIA", "input": {"size": 64, "channels": 1, "aspect": "squash", "dtype": "uint8"},
          "preprocessing": {}, "training_data": {"dataset": "cxr", "splits": {}},
          "threshold": 0.4, "thresholds": None, "threshold_policy": "youden", "threshold_source_split": "val",
          "threshold_source_dataset": "cxr", "threshold_note": None, "temperature": None,
          "disclaimer": model_card.DISCLAIMER,
          "evaluation": {"split": "test", "dataset": "cxr", "num_examples": 20, "auc": 0.8,
                         "subgroups": {"sex": {"F": {"num_examples": 9, "auc": 0.7, "auc_ci": [0.5, 0.9],
                                                     "sensitivity": 0.6, "specificity": 0.8}}}}}
  text = model_card.render_markdown(card)
  assert _sections(text) == list(SECTIONS)
  assert "| sex | F | 9 | 0.700 (0.500-0.900) | 0.600 | 0.800 |" in text
  assert "subgroups by sex" in _section(text, "Factors")
  tricky = {"a": "yes", "b": "1.0", "c": "x: y", "d": "#tag", "e": "- dash", "f": None, "g": True,
            "h": [], "i": {}, "j": [{"k": [1, 2.5, "it's"]}], "l": "ECE (10 bins)", "m": "null"}
  assert yaml.safe_load("\n".join(card_metadata.to_yaml(tricky))) == tricky
