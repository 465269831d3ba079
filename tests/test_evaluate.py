"""xraytpu.evaluate on a real (tiny) training run of the demo data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests._runs import copy_run
from xraytpu.evaluation import evaluate_lib, metrics, operating_point, report_md

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED_KEYS = ("auc", "auc_ci", "pr_auc", "threshold", "threshold_policy", "threshold_source_split",
                 "sensitivity", "specificity", "ppv", "npv", "accuracy", "confusion_matrix",
                 "num_examples", "classes")
FAST = dict(n_resamples=1000, write_plots=False)  # plots are checked once, in the first test


@pytest.fixture(scope="module")
def run_dir(trained_run):
  return trained_run


def _read_predictions(path):
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  y = np.array([r["true_label"] == "PNEUMONIA" for r in rows], dtype=int)
  p = np.array([float(r["prob_PNEUMONIA"]) for r in rows])
  pred = np.array([r["predicted_label"] == "PNEUMONIA" for r in rows], dtype=int)
  return rows, y, p, pred


def test_threshold_chosen_on_val_and_applied_unchanged_to_test(run_dir, tmp_path):
  run = copy_run(run_dir, tmp_path)
  test = evaluate_lib.evaluate(run, split="test", n_resamples=1000)
  out = test["report_dir"]
  assert out == os.path.join(run, "eval", f"{test['dataset']}-test")
  on_disk = json.load(open(os.path.join(out, "report.json")))
  for key in REQUIRED_KEYS:
    assert key in on_disk, key
  assert on_disk["threshold_source_split"] == "val"
  assert on_disk["threshold_policy"] == "youden"
  assert on_disk["classes"] == ["NORMAL", "PNEUMONIA"] and on_disk["num_examples"] == 8
  assert on_disk["ci"]["resamples"] >= 1000
  op = json.load(open(os.path.join(run, "threshold.json")))
  assert op["threshold"] == on_disk["threshold"] and op["source_split"] == "val"
  assert op["policy"] == "youden"

  # Applied unchanged: every test prediction is P(PNEUMONIA) >= the val threshold.
  rows, y, p, pred = _read_predictions(os.path.join(out, "predictions.csv"))
  assert len(rows) == 8 and {r["filename"].split("/")[0] for r in rows} == {"test"}
  np.testing.assert_array_equal(pred, (p >= on_disk["threshold"] - 1e-6).astype(int))
  cm = np.array(on_disk["confusion_matrix"])
  assert cm.sum() == 8 and cm[1, 1] == int(((pred == 1) & (y == 1)).sum())
  # A threshold chosen on test itself would differ from the one chosen on val.
  assert operating_point.choose_threshold(y, p, "youden").threshold != pytest.approx(on_disk["threshold"], abs=1e-9)
  if on_disk["auc"] is not None:
    assert on_disk["auc_ci"][0] <= on_disk["auc"] <= on_disk["auc_ci"][1]

  # The val split's own report: the threshold is Youden's on exactly these predictions.
  val = evaluate_lib.evaluate(run, split="val", **FAST)
  _, yv, pv, _ = _read_predictions(os.path.join(val["report_dir"], "predictions.csv"))
  expected = operating_point.choose_threshold(yv, pv, "youden")
  if expected.threshold is not None:
    assert op["threshold"] == pytest.approx(expected.threshold, abs=1e-6)
  else:
    assert op["fallback_reason"]
  assert any("same split" in n for n in val["notes"])

  for name in ("roc.png", "pr.png", "confusion_matrix.png", "calibration.png", "samples.png",
               "history.png", "report.md"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  md = open(os.path.join(out, "report.md")).read()
  assert "chosen on the `val` split" in md and "ROC AUC" in md
  json.loads(open(os.path.join(out, "report.json")).read(), parse_constant=pytest.fail)  # no NaN


def test_policy_and_temperature_are_rechosen_on_val(run_dir, tmp_path):
  run = copy_run(run_dir, tmp_path)
  fixed = evaluate_lib.evaluate(run, split="test", threshold_policy="fixed:0.3", **FAST)
  assert fixed["threshold"] == 0.3 and fixed["threshold_policy"] == "fixed:0.3"
  assert json.load(open(os.path.join(run, "threshold.json")))["threshold"] == 0.3
  # Reused while nothing else is asked for.
  from xraytpu.inference import predict_lib
  loaded = predict_lib.load(run)
  assert evaluate_lib.resolve_operating_point(loaded, policy=None, temperature_scaling=None)["threshold"] == 0.3
  assert evaluate_lib.resolve_operating_point(loaded, policy="fixed:0.3", temperature_scaling=False)["threshold"] == 0.3
  sens = evaluate_lib.evaluate(run, split="test", threshold_policy="sensitivity:0.95",
                               temperature_scaling=True, **FAST)
  op = json.load(open(os.path.join(run, "threshold.json")))
  assert op["policy"] == "sensitivity:0.95" and op["source_split"] == "val"
  assert op["sensitivity"] >= 0.95  # on val, where it was chosen
  assert op["temperature_fit"] is not None
  assert sens["threshold"] == op["threshold"] and sens["temperature"] == op["temperature"]
  with pytest.raises(evaluate_lib.EvaluateError, match="threshold policy"):
    evaluate_lib.evaluate(run, threshold_policy="youdn")


def test_other_dataset_classes_matched_by_name(run_dir, demo_data_dir, tmp_path):
  from tfrecord_tools import convert as convert_lib, schema, synthetic
  run = copy_run(run_dir, tmp_path)
  base = evaluate_lib.evaluate(run, split="test", **FAST)
  # The same images with the label order reversed: results must not change.
  images = schema.read_manifest(demo_data_dir)["args"]["input_dir"]
  reordered = str(tmp_path / "reordered")
  convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=images, output_dir=reordered, class_map="PNEUMONIA=PNEUMONIA,NORMAL=NORMAL",
      num_workers=1, quiet=True, name="reordered"))
  assert schema.read_manifest(reordered)["classes"] == ["PNEUMONIA", "NORMAL"]
  other = evaluate_lib.evaluate(run, data_dir=reordered, split="test", **FAST)
  assert other["report_dir"].endswith(os.path.join("eval", "reordered-test"))
  assert other["classes"] == ["NORMAL", "PNEUMONIA"]
  assert other["auc"] == pytest.approx(base["auc"])
  assert other["confusion_matrix"] == base["confusion_matrix"]
  assert other["threshold"] == base["threshold"] and other["threshold_source_split"] == "val"
  # A data set with a class the model never saw is a clear error.
  three = str(tmp_path / "three_images")
  synthetic.generate(three, num_images=6, size=16, num_classes=3, with_splits=False)
  three_tfr = str(tmp_path / "three")
  convert_lib.convert(convert_lib.ConvertOptions(input_dir=three, output_dir=three_tfr,
                                                 val_fraction=0.0, test_fraction=0.5, num_workers=1, quiet=True))
  with pytest.raises(evaluate_lib.EvaluateError, match="class mismatch.*COVID"):
    evaluate_lib.evaluate(run, data_dir=three_tfr, split="test", **FAST)
  with pytest.raises(evaluate_lib.EvaluateError, match="split 'nope'"):
    evaluate_lib.evaluate(run, split="nope", **FAST)


@pytest.mark.slow
def test_cli_prints_headline_and_usage_errors_are_one_line(run_dir, tmp_path):
  run = copy_run(run_dir, tmp_path)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  res = subprocess.run([sys.executable, "-m", "xraytpu.evaluate", f"--model_dir={run}",
                        "--split=test", "--threshold_policy=sensitivity:0.95", "--noplots"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "AUC" in res.stdout and "threshold" in res.stdout and "on val" in res.stdout
  report_md = res.stdout.split("report: ")[1].split()[0]
  assert os.path.exists(report_md)
  bad = subprocess.run([sys.executable, "-m", "xraytpu.evaluate", f"--model_dir={run}",
                        "--threshold_policy=best"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert "bad threshold policy 'best'" in bad.stderr


def test_report_multiclass_and_degenerate_without_crashing():
  rng = np.random.default_rng(0)
  y = np.repeat([0, 1, 2], 20)
  logits = rng.normal(size=(60, 3)) + 2.0 * np.eye(3)[y]
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  op = {"threshold": None, "policy": "argmax", "source_split": None}
  r = evaluate_lib.compute_report(["A", "B", "C"], y, probs, op, n_resamples=200)
  assert r["task"] == "multiclass" and r["threshold"] is None and r["threshold_policy"] == "argmax"
  assert r["auc_ci"][0] <= r["auc"] <= r["auc_ci"][1]
  assert r["micro_auc"] is not None and set(r["per_class"]) == {"A", "B", "C"}
  assert np.array(r["confusion_matrix"]).sum() == 60
  assert r["accuracy"] == pytest.approx((probs.argmax(1) == y).mean())
  text = r.pop("_classification_report_text")
  r.pop("_pred")
  r.update(model_dir="m", data_dir="d", dataset="x", split="test", notes=[], files={})
  md = report_md.render_markdown(metrics.to_jsonable(r), text)
  assert "Per class" in md and "macro" in md

  # One class only: AUC undefined with a reason, the rest still reported.
  one = np.ones(10, dtype=int)
  p = np.linspace(0.1, 0.9, 10)
  p2 = np.stack([1 - p, p], 1)
  r = evaluate_lib.compute_report(["N", "P"], one, p2, {"threshold": 0.5, "policy": "youden",
                                                        "source_split": "val"}, n_resamples=200)
  assert r["auc"] is None and "one class" in r["undefined"]["auc"]
  assert r["specificity"] is None and r["sensitivity"] == pytest.approx(0.5)
  json.dumps(metrics.to_jsonable({k: v for k, v in r.items() if not k.startswith("_")}),
             allow_nan=False)


def test_match_classes():
  np.testing.assert_array_equal(evaluate_lib.match_classes(["a", "B"], ["b", "a"]), [1, 0])
  np.testing.assert_array_equal(evaluate_lib.match_classes(["a", "b", "c"], ["c"]), [2])
  with pytest.raises(evaluate_lib.EvaluateError, match="'x' unknown"):
    evaluate_lib.match_classes(["a", "b"], ["a", "x"])
