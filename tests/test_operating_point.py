"""Operating points that say how much they can be trusted (issue 25, item 5).

`--threshold_policy=sensitivity:X:lower` (specificity:X:lower) holds the target at the exact
one-sided 95% lower confidence bound on val, not only at the point estimate; every choice
records what it rests on (val positives / negatives, achieved rates with exact CIs) and warns,
with the computed count, when val is too small for the requested point. Numpy for the policy,
the shared `trained_run` (copied, no new training) for report.json / report.md / the card.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from scipy import stats

from tests._runs import copy_run
from xraytpu.evaluation import evaluate_lib, multilabel, operating_point
from xraytpu.run import rundir


def _scores(n_pos: int, n_neg: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  y = np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(int)
  s = np.r_[rng.normal(2.0, 1.0, n_pos), rng.normal(0.0, 1.0, n_neg)]
  return y, 1 / (1 + np.exp(-s))


def _lower(k: int, n: int) -> float:
  return stats.binomtest(k, n, alternative="greater").proportion_ci(0.95).low


def test_parse_the_lower_bound_spelling():
  p = operating_point.parse_threshold_policy(" Sensitivity:0.950:LOWER ")
  assert (p.kind, p.target, p.lower, p.name) == ("sensitivity", 0.95, True, "sensitivity:0.95:lower")
  assert operating_point.canonical_policy("specificity:0.9:lower") == "specificity:0.9:lower"
  assert operating_point.canonical_policy("sensitivity:0.95") == "sensitivity:0.95"
  for bad in ("fixed:0.5:lower", "youden:lower", "sensitivity:0.9:upper", "sensitivity:0.9:",
              "sensitivity:1.5:lower"):
    with pytest.raises(ValueError, match="lower"):
      operating_point.parse_threshold_policy(bad)


def test_needed_count_is_computed_from_the_exact_bound():
  """59 positives for 0.95 at 95% (the bound with no miss: 58 fall short), computed, not tabulated."""
  for target, n in ((0.95, 59), (0.9, 29), (0.99, 299)):
    assert operating_point.needed_for_lower_bound(target) == n
    assert _lower(n, n) >= target > _lower(n - 1, n - 1)
  assert operating_point.needed_for_lower_bound(1.0) is None


def test_lower_bound_policy_is_stricter_than_the_point_policy():
  y, s = _scores(300, 300)
  point = operating_point.choose_threshold(y, s, "sensitivity:0.95")
  lower = operating_point.choose_threshold(y, s, "sensitivity:0.95:lower")
  assert lower.reason is None and lower.policy == "sensitivity:0.95:lower"
  assert lower.threshold < point.threshold          # stricter for sensitivity: a lower threshold
  assert lower.sensitivity > point.sensitivity and lower.specificity < point.specificity
  ev_point = operating_point.threshold_evidence(y, s, point.threshold, "sensitivity:0.95")
  ev_lower = operating_point.threshold_evidence(y, s, lower.threshold, "sensitivity:0.95:lower")
  assert ev_point["target"]["lower_bound"] < 0.95 <= ev_lower["target"]["lower_bound"]
  assert ev_lower["target"]["met"] and not ev_point["target"]["met"]
  assert ev_lower["positives"] == 300 and ev_lower["negatives"] == 300 and ev_lower["warning"] is None
  tp = int(round(lower.sensitivity * 300))
  assert ev_lower["sensitivity_lower_bound"] == pytest.approx(_lower(tp, 300))
  lo, hi = ev_lower["sensitivity_ci"]
  assert lo < ev_lower["sensitivity"] < hi
  # the best specificity among the thresholds whose bound meets the target: one step up fails it
  higher = np.unique(s)[np.unique(s) > lower.threshold].min()
  assert _lower(int((s[y == 1] >= higher).sum()), 300) < 0.95
  # specificity: stricter is a higher threshold
  sp_point = operating_point.choose_threshold(y, s, "specificity:0.9")
  sp_lower = operating_point.choose_threshold(y, s, "specificity:0.9:lower")
  assert sp_lower.threshold > sp_point.threshold and sp_lower.specificity > sp_point.specificity
  assert operating_point.threshold_evidence(y, s, sp_lower.threshold, "specificity:0.9:lower")["target"]["met"]


def test_val_too_small_falls_back_to_the_point_estimate_with_the_count():
  y, s = _scores(30, 30)
  point = operating_point.choose_threshold(y, s, "sensitivity:0.95")
  lower = operating_point.choose_threshold(y, s, "sensitivity:0.95:lower")
  assert lower.threshold == point.threshold
  assert "30 positives" in lower.reason and "at least 59 positives" in lower.reason
  assert "point estimate (sensitivity:0.95) was applied" in lower.reason
  for policy in ("sensitivity:0.95:lower", "sensitivity:0.95"):   # the point policy warns too
    ev = operating_point.threshold_evidence(y, s, point.threshold, policy)
    assert ev["target"]["needed"] == 59 and ev["target"]["cases"] == 30 and not ev["target"]["met"]
    assert "at least 59 positives" in ev["warning"]
  ev = operating_point.threshold_evidence(y, s, point.threshold, "specificity:0.99")
  assert "30 negatives are too few" in ev["warning"] and "299 negatives" in ev["warning"]
  assert operating_point.threshold_evidence(y, s, 0.5, "youden")["warning"] is None


def test_multi_label_thresholds_carry_evidence_per_finding():
  """The same policy code per finding: the large finding meets the bound, the small one falls back."""
  y1, s1 = _scores(300, 300, seed=1)
  y2, s2 = _scores(20, 580, seed=2)
  classes = ["Big", "Small"]
  val = types.SimpleNamespace(labels=np.c_[y1, y2], probs=np.c_[s1, s2], mask=np.ones((600, 2), bool),
                              split="val", data_dir="d", dataset="d", raw=None)
  run = types.SimpleNamespace(classes=classes)
  op = multilabel.choose_operating_point(run, val, "sensitivity:0.95:lower", False, None, ValueError)
  big, small = op["per_finding"]["Big"], op["per_finding"]["Small"]
  assert big["fallback_reason"] is None and big["evidence"]["target"]["met"]
  assert op["thresholds"]["Big"] < operating_point.choose_threshold(y1, s1, "sensitivity:0.95").threshold
  assert "20 positives" in small["fallback_reason"] and small["evidence"]["warning"]
  assert op["thresholds"]["Small"] == operating_point.choose_threshold(y2, s2, "sensitivity:0.95").threshold
  rep = multilabel.compute_report(classes, val.labels, val.mask, val.probs, op, n_resamples=5, seed=0)
  assert rep["per_finding"]["Small"]["threshold_evidence"]["positives"] == 20
  md = "\n".join(multilabel.render_markdown(rep))
  assert "- Small: 20 positives / 580 negatives" in md and "at least 59 positives" in md
  notes = evaluate_lib._evidence_notes(op)
  assert notes == []   # Small's warning is already in its fallback note


def test_evaluate_reports_what_the_threshold_rests_on(trained_run, tmp_path):
  run = copy_run(trained_run, tmp_path)
  with pytest.raises(evaluate_lib.EvaluateError, match="sensitivity:X:lower"):
    evaluate_lib.evaluate(run, threshold_policy="sensitivity:0.95:upper")
  report = evaluate_lib.evaluate(run, split="test", threshold_policy="sensitivity:0.95:lower",
                                 n_resamples=20, write_plots=False)
  op = json.loads(open(f"{run}/{rundir.OPERATING_POINT}").read())
  assert op["policy"] == report["threshold_policy"] == "sensitivity:0.95:lower"
  ev = report["threshold_evidence"]
  assert ev == op["evidence"]
  manifest = json.loads(open(rundir.path(run, rundir.MANIFEST_COPY)).read())
  val_counts = [manifest["splits"]["val"]["class_counts"][c] for c in manifest["classes"]]
  n_pos = ev["positives"]
  assert (n_pos, ev["negatives"]) == (val_counts[1], val_counts[0])
  assert n_pos < 59   # the demo val split is tiny: it cannot bound 0.95
  assert ev["target"] == {**ev["target"], "metric": "sensitivity", "value": 0.95,
                          "requested_at": "lower bound", "needed": 59, "cases": n_pos, "met": False}
  assert f"{n_pos} positives are too few" in ev["warning"]
  assert "at least 59 positives" in report["threshold_fallback_reason"]
  assert any("at least 59 positives" in n for n in report["notes"])
  md = open(f"{report['report_dir']}/{report['files']['report_md']}").read()
  assert f"what the threshold rests on (`val`): {n_pos} positives / {ev['negatives']} negatives" in md
  assert "**warning**: `val` is too small" in md and "at least 59 positives" in md
  card = open(f"{run}/{rundir.MODEL_CARD}").read()
  assert f"on `val`, {n_pos} positives / {ev['negatives']} negatives" in card
  assert "exact lower confidence bound on val" in card and "at least 59 positives" in card
