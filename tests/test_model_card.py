"""MODEL_CARD.md: written by evaluate from the card dict, carried by the card itself
("model_card_md", for any server) and copied into the export's assets.extra/."""

from __future__ import annotations

import json
import os

import pytest

from tests._runs import copy_run, evaluated_copy
from xraytpu.inference import export_lib, predict_lib

from xraytpu.run import model_card, rundir
SECTIONS = ("## Intended use", "## Model", "## Data", "## Metrics", "## Operating point",
            "## Limitations", "## Notice")


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
