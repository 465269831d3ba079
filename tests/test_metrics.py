"""xraytpu.evaluation.metrics against hand-worked examples, degenerate data and scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from xraytpu.evaluation import metrics as M, operating_point

# The hand-worked example used throughout:
#   label  0    0    1     1
#   score  0.1  0.4  0.35  0.8
# Positive/negative pairs: (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> AUC 3/4.
# Ranked by score: 0.8(+) 0.4(-) 0.35(+) 0.1(-): precision at each recall step
# is 1 (R=.5) and 2/3 (R=1) -> AP = .5*1 + .5*2/3 = 5/6.
Y = np.array([0, 0, 1, 1])
S = np.array([0.1, 0.4, 0.35, 0.8])


def test_auc_and_pr_auc_hand_computed():
  assert M.roc_auc(Y, S, ci=False).value == pytest.approx(0.75)
  assert M.pr_auc(Y, S, ci=False).value == pytest.approx(5 / 6)


def test_auc_ties_count_half_and_match_sklearn():
  # One tie between a positive and a negative: pairs (.5 vs .5)=.5, (.5 vs .2)=1, (.9 vs .5)=1, (.9 vs .2)=1.
  assert M.roc_auc([0, 0, 1, 1], [0.5, 0.2, 0.5, 0.9], ci=False).value == pytest.approx(3.5 / 4)
  rng = np.random.default_rng(1)
  y = rng.integers(0, 2, 300)
  s = np.round(rng.random(300) + 0.3 * y, 1)  # many ties
  assert M.roc_auc(y, s, ci=False).value == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
  assert M.pr_auc(y, s, ci=False).value == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)


def test_degenerate_one_class_only_gives_none_with_reason():
  for y in ([1, 1, 1], [0, 0, 0]):
    m = M.roc_auc(y, [0.2, 0.5, 0.9])
    assert m.value is None and m.ci is None
    assert "one class" in m.reason
    assert "n/a" in m.format()
  assert M.pr_auc([0, 0, 0], [0.2, 0.5, 0.9]).value is None
  assert "no positive" in M.pr_auc([0, 0, 0], [0.2, 0.5, 0.9]).reason
  t = operating_point.choose_threshold([1, 1, 1], [0.2, 0.5, 0.9], "youden")
  assert t.threshold is None and "one class" in t.reason
  r = M.metrics_at_threshold([1, 1, 1], [0.2, 0.5, 0.9], 0.5)
  assert r["specificity"].value is None and "no negative" in r["specificity"].reason
  assert r["sensitivity"].value == pytest.approx(2 / 3)
  assert r["npv"].value == 0.0  # 1 predicted negative, it is a false negative
  assert M.roc_auc([], []).value is None
  assert M.fit_temperature([1, 1], [0.6, 0.7]).temperature == 1.0


def test_degenerate_all_equal_scores():
  y = np.array([0, 1, 0, 1, 1])
  s = np.full(5, 0.7)
  assert M.roc_auc(y, s).value == pytest.approx(0.5)  # every pair is a tie
  assert M.pr_auc(y, s, ci=False).value == pytest.approx(3 / 5)  # the prevalence
  t = operating_point.choose_threshold(y, s, "youden")
  assert t.threshold is None and "separate" in t.reason
  # sensitivity:0.95 is still achievable: call everything positive.
  t = operating_point.choose_threshold(y, s, "sensitivity:0.95")
  assert t.threshold == pytest.approx(0.7) and t.sensitivity == 1.0 and t.specificity == 0.0
  r = M.metrics_at_threshold(y, s, 0.8)  # nobody predicted positive
  assert r["ppv"].value is None and "predicted positive" in r["ppv"].reason
  assert r["specificity"].value == 1.0 and r["sensitivity"].value == 0.0
  assert r["f1"].value == 0.0


def test_threshold_policies_hand_computed():
  # ROC points (threshold: tpr, fpr): .8: .5,0   .4: .5,.5   .35: 1,.5   .1: 1,1
  t = operating_point.choose_threshold(Y, S, "youden")  # J=.5 at .8 and .35: ties -> higher sensitivity
  assert (t.threshold, t.sensitivity, t.specificity) == (0.35, 1.0, 0.5)
  assert operating_point.choose_threshold(Y, S, "sensitivity:0.95").threshold == 0.35
  assert operating_point.choose_threshold(Y, S, "sensitivity:0.5").threshold == 0.8
  assert operating_point.choose_threshold(Y, S, "specificity:1").threshold == 0.8
  t = operating_point.choose_threshold(Y, S, "fixed:0.5")
  assert (t.threshold, t.policy, t.sensitivity, t.specificity) == (0.5, "fixed:0.5", 0.5, 1.0)
  assert operating_point.canonical_policy(" Sensitivity:0.950 ") == "sensitivity:0.95"
  for bad in ("yoden", "fixed:", "fixed:1.5", "sensitivity:x", ""):
    with pytest.raises(ValueError, match="threshold policy"):
      operating_point.parse_threshold_policy(bad)


def test_metrics_at_threshold_hand_computed():
  r = M.metrics_at_threshold(Y, S, 0.35, ci=False)  # predictions 0 1 1 1
  assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (2, 1, 1, 0)
  assert r["confusion_matrix"] == [[1, 1], [0, 2]]
  expect = dict(sensitivity=1.0, specificity=0.5, ppv=2 / 3, npv=1.0, accuracy=0.75, f1=0.8)
  for k, v in expect.items():
    assert r[k].value == pytest.approx(v), k
  cm = M.confusion_matrix([0, 1, 2, 2], [0, 2, 2, 1], 3)
  np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 0, 1], [0, 1, 1]])


def test_bootstrap_ci_contains_estimate_narrows_with_data_and_is_seeded():
  def sample(n, seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    return y, rng.normal(size=n) + 1.2 * y

  y_small, s_small = sample(60, 0)
  y_big, s_big = sample(2000, 1)
  small = M.roc_auc(y_small, s_small, n_resamples=1000, seed=3)
  big = M.roc_auc(y_big, s_big, n_resamples=1000, seed=3)
  for m in (small, big):
    assert m.ci[0] <= m.value <= m.ci[1]
  assert big.ci[1] - big.ci[0] < 0.5 * (small.ci[1] - small.ci[0])
  assert M.roc_auc(y_small, s_small, seed=3).ci == small.ci  # seeded: reproducible
  assert M.roc_auc(y_small, s_small, seed=4).ci != small.ci

  pr_small, pr_big = M.pr_auc(y_small, s_small), M.pr_auc(y_big, s_big)
  assert pr_small.ci[0] <= pr_small.value <= pr_small.ci[1]
  assert pr_big.ci[1] - pr_big.ci[0] < pr_small.ci[1] - pr_small.ci[0]

  at_small = M.metrics_at_threshold(y_small, s_small, 0.6)
  at_big = M.metrics_at_threshold(y_big, s_big, 0.6)
  for name in M.THRESHOLD_METRICS:
    lo, hi = at_small[name].ci
    assert lo <= at_small[name].value <= hi, name
    assert (at_big[name].ci[1] - at_big[name].ci[0]) < (hi - lo), name


def test_stratified_bootstrap_keeps_class_counts():
  y = np.array([0] * 7 + [1] * 3)
  idx = M.stratified_bootstrap_indices(y, 50, seed=0)
  assert idx.shape == (50, 10)
  np.testing.assert_array_equal(y[idx].sum(axis=1), np.full(50, 3))


def test_brier_and_ece_hand_computed():
  assert M.brier_score([0, 1], [0.2, 0.7]).value == pytest.approx((0.04 + 0.09) / 2)
  # Multi-class: rows (.7,.2,.1) true 0 -> .09+.04+.01; (.5,.5,0) true 1 -> .25+.25.
  assert M.brier_score([0, 1], [[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]]).value == pytest.approx(0.32)
  # Bin [.1,.2): conf .15, observed .5; bin [.8,.9): conf .85, observed 1. ECE=.5*.35+.5*.15
  assert M.expected_calibration_error([0, 1, 1, 1], [0.15, 0.15, 0.85, 0.85]).value == pytest.approx(0.25)
  assert M.expected_calibration_error([1, 0], [1.0, 0.0]).value == pytest.approx(0.0)
  b = M.calibration_bins([0, 1, 1, 1], [0.15, 0.15, 0.85, 0.85])
  assert b["count"].tolist() == [0, 2, 0, 0, 0, 0, 0, 0, 2, 0]


def test_temperature_scaling_recovers_overconfidence():
  rng = np.random.default_rng(0)
  z = rng.normal(scale=1.5, size=4000)
  y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)
  overconfident = 1 / (1 + np.exp(-3 * z))
  fit = M.fit_temperature(y, overconfident)
  assert 2.5 < fit.temperature < 3.5
  assert fit.nll_after < fit.nll_before
  calibrated = M.apply_temperature(overconfident, fit.temperature)
  assert (M.expected_calibration_error(y, calibrated).value
          < M.expected_calibration_error(y, overconfident).value)
  # Multi-class: softmax(log p / T) with T=1 is the identity; fitting also improves NLL.
  p = np.array([[0.98, 0.01, 0.01], [0.01, 0.98, 0.01], [0.98, 0.01, 0.01], [0.1, 0.1, 0.8]])
  np.testing.assert_allclose(M.apply_temperature(p, 1.0), p, atol=1e-6)
  fit = M.fit_temperature([0, 1, 1, 2], p)
  assert fit.temperature > 1 and fit.nll_after < fit.nll_before


def test_multiclass_auc_hand_computed_and_vs_sklearn():
  y = np.array([0, 1, 2, 0])
  p = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.5, 0.1, 0.4], [0.3, 0.4, 0.3]])
  r = M.multiclass_auc(y, p, ["a", "b", "c"], n_resamples=200)
  # class a scores: pos {.6,.3} vs neg {.2,.5}: (.6>.2)(.6>.5)(.3>.2)(.3<.5) -> 3/4
  # class b: pos {.5} vs {.3,.1,.4} -> 1;  class c: pos {.4} vs {.1,.3,.3} -> 1
  assert r["per_class"]["a"].value == pytest.approx(0.75)
  assert r["per_class"]["b"].value == pytest.approx(1.0)
  assert r["per_class"]["c"].value == pytest.approx(1.0)
  assert r["macro"].value == pytest.approx(2.75 / 3)
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 200)
  logits = rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[y]
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  r = M.multiclass_auc(y, p)
  assert r["macro"].value == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"), abs=1e-12)
  assert r["micro"].value == pytest.approx(skm.roc_auc_score(np.eye(3)[y], p, average="micro"), abs=1e-12)
  for m in (r["macro"], r["micro"], *r["per_class"].values()):
    assert m.ci[0] <= m.value <= m.ci[1]


def test_multiclass_missing_class_is_reported_not_crashing():
  p = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
  r = M.multiclass_auc([0, 1, 0], p, ["x", "y", "z"], n_resamples=100)
  assert r["per_class"]["z"].value is None and "one class" in r["per_class"]["z"].reason
  assert r["macro"].value == pytest.approx(1.0) and "2 of 3" in r["macro"].reason
  r = M.multiclass_auc([1, 1], p[:2], ["x", "y", "z"])
  assert r["macro"].value is None
  rates = M.per_class_rates([0, 1, 0], [0, 1, 1], 3)
  assert rates[0]["sensitivity"] == 0.5 and rates[2]["sensitivity"] is None


def test_classification_report_and_json_safety():
  d, text = M.classification_report([0, 1, 1, 0], [0, 1, 0, 0], ["NORMAL", "PNEUMONIA"])
  assert d["PNEUMONIA"]["recall"] == pytest.approx(0.5)
  assert d["NORMAL"]["precision"] == pytest.approx(2 / 3)
  assert "PNEUMONIA" in text
  blob = M.to_jsonable({"m": M.Metric(float("nan")), "a": np.array([1.0, np.nan]), "i": np.int64(3)})
  json.dumps(blob, allow_nan=False)  # raises if a NaN slipped through
  assert blob["a"] == [1.0, None] and blob["i"] == 3


def test_bad_inputs_raise_clearly():
  with pytest.raises(ValueError, match="0 and 1"):
    M.roc_auc([0, 2], [0.1, 0.2])
  with pytest.raises(ValueError, match="NaN"):
    M.roc_auc([0, 1], [0.1, float("nan")])
  with pytest.raises(ValueError, match="values"):
    M.roc_auc([0, 1, 1], [0.1, 0.2])
