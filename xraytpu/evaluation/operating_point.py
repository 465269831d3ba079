"""The operating point: a threshold policy, parsed in one place, chosen on val, and the
evidence that says how far the choice can be trusted (pure numpy + scipy; no TensorFlow).

Threshold policies (binary, and each finding of a multi-label task; a score >=
threshold is called positive), parsed in one place (`parse_threshold_policy`):
  youden              maximise sensitivity + specificity - 1 (ties: higher sensitivity)
  sensitivity:X       the highest threshold whose sensitivity is >= X (best specificity)
  specificity:X       the lowest threshold whose specificity is >= X (best sensitivity)
  sensitivity:X:lower the highest threshold whose sensitivity is >= X at the one-sided 95%
  specificity:X:lower exact (Clopper-Pearson) LOWER confidence bound, not only at the point
                      estimate: val supports the claim "sensitivity >= X" at 95% confidence.
                      When no threshold can (val has too few positives / negatives: even
                      with no miss the bound stays below X), the point-estimate policy
                      (sensitivity:X) is applied instead and the reason says so.
  fixed:X             X itself
The threshold is chosen on validation data and then applied unchanged to the
evaluated split (see xraytpu.evaluation.evaluate_lib). `threshold_evidence` says
how far that choice can be trusted: the val positives and negatives behind it,
the achieved val sensitivity / specificity with exact binomial CIs, and a warning
when val is too small for the requested point (with the count it would need).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from xraytpu.evaluation import metrics
from xraytpu.run import rundir


POLICY_HELP = (f"youden | sensitivity:X | specificity:X | fixed:X (X in [0, 1]); "
               f"sensitivity:X:{rundir.POLICY_LOWER} | specificity:X:{rundir.POLICY_LOWER} hold X at "
               f"the {rundir.POLICY_CONFIDENCE:.0%} lower confidence bound on val")
EXACT_METHOD = "exact binomial (Clopper-Pearson)"


@dataclasses.dataclass(frozen=True)
class ThresholdPolicy:
  """A parsed threshold policy.

  kind:   "youden" | "sensitivity" | "specificity" | "fixed".
  target: X of sensitivity:X / specificity:X / fixed:X; None for youden.
  lower:  hold the target at the exact one-sided lower confidence bound
          (rundir.POLICY_CONFIDENCE), not only at the point estimate.
  """
  kind: str
  target: float | None = None
  lower: bool = False

  @property
  def name(self) -> str:
    """The canonical spelling ("sensitivity:0.95:lower"), as threshold.json records it."""
    if self.target is None:
      return self.kind
    return f"{self.kind}:{self.target:g}" + (f":{rundir.POLICY_LOWER}" if self.lower else "")

  @property
  def metric(self) -> str | None:
    """The rate the policy targets (sensitivity / specificity), else None."""
    return self.kind if self.kind in ("sensitivity", "specificity") else None

  @property
  def point(self) -> "ThresholdPolicy":
    """The same target at the point estimate (the fallback of a lower-bound policy)."""
    return dataclasses.replace(self, lower=False)


@dataclasses.dataclass(frozen=True)
class ThresholdChoice:
  """A chosen operating threshold.

  threshold: scores >= threshold are positive; None when the policy could not
             choose one (then `reason` says why; callers decide the fallback).
  policy:    the canonical policy string ("youden", "sensitivity:0.95", ...).
  sensitivity, specificity: achieved on the data it was chosen on (None if undefined).
  reason:    why the threshold is None, or (a lower-bound policy that fell back to its
             point estimate, threshold set) why and what was applied instead.
  """
  threshold: float | None
  policy: str
  sensitivity: float | None = None
  specificity: float | None = None
  reason: str | None = None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def parse_threshold_policy(policy: str) -> ThresholdPolicy:
  """'sensitivity:0.95' -> ThresholdPolicy('sensitivity', 0.95); 'youden' -> ('youden', None);
  'specificity:0.9:lower' -> ThresholdPolicy('specificity', 0.9, lower=True).

  The one parser of threshold policies. Raises ValueError with the accepted forms on anything else.
  """
  text = (policy or "").strip().lower()
  if text == "youden":
    return ThresholdPolicy("youden")
  kind, sep, arg = text.partition(":")
  arg, third, bound = arg.partition(":")
  if sep and kind in ("sensitivity", "specificity", "fixed") and (
      not third or (bound == rundir.POLICY_LOWER and kind != "fixed")):
    try:
      x = float(arg)
    except ValueError:
      x = float("nan")
    if 0.0 <= x <= 1.0:
      return ThresholdPolicy(kind, x, bool(bound))
  raise ValueError(f"bad threshold policy {policy!r}; expected {POLICY_HELP}")


def canonical_policy(policy: str) -> str:
  return parse_threshold_policy(policy).name


def exact_lower_bound(k: int, n: int, confidence: float = rundir.POLICY_CONFIDENCE) -> float | None:
  """One-sided exact (Clopper-Pearson) lower confidence bound of the proportion k / n; None if n = 0.

  scipy's binomtest (a kept library) rather than a hand-written beta quantile.
  """
  if n <= 0:
    return None
  return float(stats.binomtest(int(k), int(n), alternative="greater").proportion_ci(confidence).low)


def exact_ci(k: int, n: int, confidence: float = 1 - metrics.DEFAULT_ALPHA) -> tuple[float, float] | None:
  """Two-sided exact (Clopper-Pearson) confidence interval of k / n; None if n = 0."""
  if n <= 0:
    return None
  ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence, method="exact")
  return float(ci.low), float(ci.high)


def fewest_hits(n: int, target: float, confidence: float = rundir.POLICY_CONFIDENCE) -> int | None:
  """The fewest successes k of n whose exact lower bound reaches `target`; None when even
  k = n does not (n too small). The bound grows with k, so a bisection finds it."""
  if n <= 0 or exact_lower_bound(n, n, confidence) < target:
    return None
  lo, hi = -1, n  # bound(lo) < target <= bound(hi)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if mid >= 0 and exact_lower_bound(mid, n, confidence) >= target:
      hi = mid
    else:
      lo = mid
  return hi


def needed_for_lower_bound(target: float, confidence: float = rundir.POLICY_CONFIDENCE) -> int | None:
  """The fewest cases n whose exact lower bound can reach `target` at all (with no miss, k = n):
  e.g. 59 positives for sensitivity 0.95 at 95% confidence. None when no n can (target 1)."""
  if target <= 0:
    return 0
  if target >= 1:
    return None
  lo, hi = 0, 1
  while exact_lower_bound(hi, hi, confidence) < target:
    lo, hi = hi, hi * 2
  while hi - lo > 1:  # bound(lo, lo) < target <= bound(hi, hi)
    mid = (lo + hi) // 2
    if exact_lower_bound(mid, mid, confidence) >= target:
      hi = mid
    else:
      lo = mid
  return hi


def choose_threshold(y_true, y_score, policy: str = "youden") -> ThresholdChoice:
  """Chooses an operating threshold on (y_true, y_score) according to `policy`.

  Candidate thresholds are the observed scores (sklearn's roc_curve without
  dropping points). Degenerate data (one class only; for youden also
  all-equal scores, where J is 0 everywhere) gives threshold None + reason,
  except for fixed:X which needs no data. A lower-bound policy that no threshold
  can meet (too few positives / negatives) applies its point estimate instead,
  with the reason set.
  """
  pol = parse_threshold_policy(policy)
  kind, x, name = pol.kind, pol.target, pol.name
  y, s = metrics.binary_inputs(y_true, y_score)
  if kind == "fixed":
    sens, spec = _sens_spec(y, s, x)
    return ThresholdChoice(float(x), name, sens, spec)
  reason = metrics.class_reason(y)
  if reason:
    return ThresholdChoice(None, name, reason=f"{reason}: cannot choose a threshold by {name}")
  fpr, tpr, thr = skm.roc_curve(y, s, drop_intermediate=False)
  fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]  # drop the +inf "nobody positive" point
  if kind == "youden":
    j = tpr - fpr
    if np.unique(s).size == 1 or j.max() <= 0:
      return ThresholdChoice(None, name, reason="scores do not separate the classes "
                             "(Youden's J <= 0 at every threshold)")
    best = np.flatnonzero(np.isclose(j, j.max(), rtol=0, atol=1e-12))
    i = best[np.argmax(tpr[best])]  # ties: the higher sensitivity
  elif pol.lower:
    n = int(y.sum()) if kind == "sensitivity" else int(y.size - y.sum())
    rate = tpr if kind == "sensitivity" else 1.0 - fpr
    k = fewest_hits(n, x)
    hits = np.rint(rate * n)
    ok = np.flatnonzero(hits >= k) if k is not None else np.zeros(0, np.int64)
    if ok.size == 0:
      fallback = choose_threshold(y, s, pol.point.name)
      why = _too_small(pol, n, k is None) or (
          f"no threshold holds {kind} {x:g} at its {rundir.POLICY_CONFIDENCE:.0%} lower bound "
          "(ties among the top scores)")
      if fallback.threshold is None:
        return dataclasses.replace(fallback, policy=name, reason=f"{why}; {fallback.reason}")
      return dataclasses.replace(fallback, policy=name,
                                 reason=f"{why}: the point estimate ({pol.point.name}) was applied")
    i = int(ok[0]) if kind == "sensitivity" else int(ok[-1])
  elif kind == "sensitivity":
    i = int(np.flatnonzero(tpr >= x - 1e-12)[0])  # tpr is non-decreasing; last point has tpr 1
  else:  # specificity
    ok = np.flatnonzero(1.0 - fpr >= x - 1e-12)
    if ok.size == 0:
      return ThresholdChoice(None, name, reason=f"no threshold reaches specificity {x:g} "
                             "(ties among the negatives' top scores)")
    i = int(ok[-1])
  t = float(thr[i])
  return ThresholdChoice(t, name, float(tpr[i]), float(1.0 - fpr[i]))


def _too_small(pol: ThresholdPolicy, n: int, too_few: bool = True) -> str | None:
  """'val has 20 positives, too few for ...' when n cases cannot bound pol's target; else None."""
  needed = needed_for_lower_bound(pol.target)
  if not too_few or (needed is not None and n >= needed):
    return None
  cases = "positives" if pol.kind == "sensitivity" else "negatives"
  conf = f"{rundir.POLICY_CONFIDENCE:.0%}"
  if needed is None:
    return (f"no number of {cases} can put the {conf} lower bound of {pol.kind} at {pol.target:g}")
  return (f"{n} {cases} are too few for {pol.kind} {pol.target:g}: its {conf} lower confidence bound "
          f"reaches {pol.target:g} only with at least {needed} {cases}, even with no miss")


def threshold_evidence(y_true, y_score, threshold: float, policy: str) -> dict[str, Any]:
  """How far a threshold chosen on (y_true, y_score) can be trusted (threshold.json's "evidence").

  {positives, negatives, confidence, method,
   sensitivity, sensitivity_ci, sensitivity_lower_bound, specificity, ... (exact binomial: the
   two-sided 95% CI and the one-sided rundir.POLICY_CONFIDENCE lower bound),
   target: null | {metric, value, requested_at ("lower bound" | "point estimate": the policy
           asked; a lower bound too few cases can reach falls back), cases (val positives
           for sensitivity, negatives for specificity), needed (the fewest cases whose lower
           bound can reach the value at all; null: none can), lower_bound, met (lower_bound >= value)},
   warning: null | one line (val too small for the requested point)}
  """
  pol = parse_threshold_policy(policy)
  y, s = metrics.binary_inputs(y_true, y_score)
  pred = s >= threshold
  n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
  hits = {"sensitivity": (int((pred & (y == 1)).sum()), n_pos),
          "specificity": (int((~pred & (y == 0)).sum()), n_neg)}
  ev: dict[str, Any] = {"positives": n_pos, "negatives": n_neg,
                        "confidence": rundir.POLICY_CONFIDENCE, "method": EXACT_METHOD}
  for m, (k, n) in hits.items():
    ci = exact_ci(k, n)
    ev[m] = k / n if n else None
    ev[f"{m}_ci"] = list(ci) if ci else None
    ev[f"{m}_lower_bound"] = exact_lower_bound(k, n)
  ev["target"], ev["warning"] = None, None
  if pol.metric:
    k, n = hits[pol.metric]
    lb = ev[f"{pol.metric}_lower_bound"]
    ev["target"] = {"metric": pol.metric, "value": pol.target,
                    "requested_at": "lower bound" if pol.lower else "point estimate",
                    "cases": n, "needed": needed_for_lower_bound(pol.target),
                    "lower_bound": lb, "met": lb is not None and lb >= pol.target - 1e-12}
    ev["warning"] = _too_small(pol, n)
  return ev


def _sens_spec(y: np.ndarray, s: np.ndarray, t: float) -> tuple[float | None, float | None]:
  pred = s >= t
  n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
  sens = float((pred & (y == 1)).sum() / n_pos) if n_pos else None
  spec = float((~pred & (y == 0)).sum() / n_neg) if n_neg else None
  return sens, spec
