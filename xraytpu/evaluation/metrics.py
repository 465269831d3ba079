"""Clinical metrics, computed once, in pure numpy + scikit-learn (no TensorFlow).

Inputs are plain arrays:
  * binary: `y_true` int {0, 1} of shape [n] (1 = the positive class, the
    manifest's second class), `y_score` float [n], the model's probability of
    the positive class (any real-valued score works for the rank metrics);
  * multi-class: `y_true` int in [0, K) of shape [n], `probs` float [n, K]
    (rows sum to 1).

Every metric comes back as a `Metric`: a point value, an optional 95%
confidence interval, and a `reason` whenever either is undefined. Degenerate
data (one class only, all-equal scores, no predicted positives) never raises:
the value is None and the reason says why, so a report can show "n/a (only
one class present)" instead of crashing or printing a misleading number.

Confidence intervals are percentile intervals of a *stratified* bootstrap:
each resample draws the positives and the negatives (for multi-class: each
class) separately with replacement, so every resample keeps the observed class
counts and AUC stays defined. Resampling is seeded (`seed`) and vectorised.

Threshold policies and the choice of an operating point: xraytpu.evaluation.operating_point.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np
from scipy import optimize, stats
from sklearn import metrics as skm

from xraytpu.config import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from xraytpu.run import rundir

DEFAULT_RESAMPLES = BOOTSTRAP_RESAMPLES
DEFAULT_SEED = BOOTSTRAP_SEED
DEFAULT_ALPHA = 0.05  # 95% intervals
_MIN_VALID_FRACTION = 0.5  # a CI needs at least this share of resamples to be defined


# --------------------------------------------------------------------------
# The result type.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Metric:
  """A metric value with an optional confidence interval.

  value: the point estimate, or None when undefined (then `reason` says why).
  ci:    (low, high) percentile bootstrap interval, or None (not computed or
         undefined; `reason` says why when it was asked for).
  reason: human-readable explanation of a None, else None.
  """
  value: float | None
  ci: tuple[float, float] | None = None
  reason: str | None = None

  @property
  def defined(self) -> bool:
    return self.value is not None

  def to_dict(self) -> dict[str, Any]:
    return {"value": self.value, "ci": list(self.ci) if self.ci else None, "reason": self.reason}

  def format(self, digits: int = 3) -> str:
    """'0.912 (95% CI 0.871-0.948)' or 'n/a (only one class present)'."""
    if self.value is None:
      return f"n/a ({self.reason})" if self.reason else "n/a"
    s = f"{self.value:.{digits}f}"
    if self.ci is not None:
      s += f" (95% CI {self.ci[0]:.{digits}f}-{self.ci[1]:.{digits}f})"
    return s


def _undefined(reason: str) -> Metric:
  return Metric(None, None, reason)


# --------------------------------------------------------------------------
# Input checks.
# --------------------------------------------------------------------------


def binary_inputs(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
  y = np.asarray(y_true).reshape(-1)
  s = np.asarray(y_score, dtype=np.float64).reshape(-1)
  if y.shape != s.shape:
    raise ValueError(f"y_true has {y.size} values but y_score has {s.size}")
  if y.size and not np.isin(y, (0, 1)).all():
    raise ValueError(f"binary y_true must hold only 0 and 1, got {np.unique(y)[:10]}")
  if not np.isfinite(s).all():
    raise ValueError("y_score holds NaN or infinite values")
  return y.astype(np.int64), s


def _multiclass_inputs(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
  y = np.asarray(y_true).reshape(-1).astype(np.int64)
  p = np.asarray(probs, dtype=np.float64)
  if p.ndim != 2 or p.shape[0] != y.size:
    raise ValueError(f"probs must be [n, K] with n={y.size}, got shape {p.shape}")
  if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
    raise ValueError(f"y_true must be in [0, {p.shape[1]}), got range [{y.min()}, {y.max()}]")
  if not np.isfinite(p).all():
    raise ValueError("probs hold NaN or infinite values")
  return y, p


def class_reason(y: np.ndarray) -> str | None:
  """Why rank metrics are undefined for binary labels `y`, or None."""
  n_pos = int(y.sum())
  n_neg = int(y.size - n_pos)
  if y.size == 0:
    return "no examples"
  if n_pos == 0 or n_neg == 0:
    return f"only one class present ({n_pos} positive, {n_neg} negative)"
  return None


# --------------------------------------------------------------------------
# Bootstrap.
# --------------------------------------------------------------------------


def stratified_bootstrap_indices(y_true, n_resamples: int = DEFAULT_RESAMPLES,
                                 seed: int = DEFAULT_SEED) -> np.ndarray:
  """[n_resamples, n] int indices; each row keeps every class's count.

  Row r draws, for each class c, count(c) indices with replacement from the
  examples of class c.
  """
  y = np.asarray(y_true).reshape(-1)
  rng = np.random.default_rng(seed)
  out = np.empty((n_resamples, y.size), dtype=np.int64)
  col = 0
  for c in np.unique(y):
    members = np.flatnonzero(y == c)
    draw = rng.integers(0, members.size, size=(n_resamples, members.size))
    out[:, col:col + members.size] = members[draw]
    col += members.size
  return out


def _percentile_ci(samples: np.ndarray, alpha: float) -> tuple[tuple[float, float] | None, str | None]:
  samples = np.asarray(samples, dtype=np.float64)
  valid = samples[np.isfinite(samples)]
  if samples.size == 0:
    return None, "no bootstrap resamples"
  if valid.size < _MIN_VALID_FRACTION * samples.size:
    return None, (f"undefined in {samples.size - valid.size} of {samples.size} bootstrap "
                  "resamples")
  lo, hi = np.percentile(valid, [100 * alpha / 2, 100 * (1 - alpha / 2)])
  return (float(lo), float(hi)), None


def bootstrap_ci(stat: Callable[[np.ndarray, np.ndarray], float], y_true, y_score,
                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                 alpha: float = DEFAULT_ALPHA) -> tuple[tuple[float, float] | None, str | None]:
  """Percentile CI of `stat(y, s)` (NaN = undefined) over stratified resamples.

  Generic (one call per resample); the rank and confusion-matrix metrics below
  use vectorised versions of the same resampling.
  Returns ((low, high), None) or (None, reason).
  """
  y = np.asarray(y_true)
  s = np.asarray(y_score)
  idx = stratified_bootstrap_indices(y, n_resamples, seed)
  vals = np.array([stat(y[i], s[i]) for i in idx], dtype=np.float64)
  return _percentile_ci(vals, alpha)


# --------------------------------------------------------------------------
# Rank metrics (binary).
# --------------------------------------------------------------------------


def _auc_by_ranks(y: np.ndarray, s: np.ndarray) -> np.ndarray:
  """Mann-Whitney AUC along the last axis (ties count one half).

  y, s: [..., n] with both classes present in every row (same counts per row).
  """
  ranks = stats.rankdata(s, axis=-1)  # average ranks for ties
  n_pos = y.sum(axis=-1)
  n_neg = y.shape[-1] - n_pos
  rank_sum = (ranks * y).sum(axis=-1)
  return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def roc_auc(y_true, y_score, *, ci: bool = True, n_resamples: int = DEFAULT_RESAMPLES,
            seed: int = DEFAULT_SEED, alpha: float = DEFAULT_ALPHA) -> Metric:
  """Area under the ROC curve (probability a random positive outscores a random negative).

  All-equal scores give exactly 0.5 (every pair is a tie); one class only
  gives None.
  """
  y, s = binary_inputs(y_true, y_score)
  reason = class_reason(y)
  if reason:
    return _undefined(reason)
  value = float(_auc_by_ranks(y, s))
  if not ci:
    return Metric(value)
  idx = stratified_bootstrap_indices(y, n_resamples, seed)
  boot = []
  for chunk in np.array_split(idx, max(1, idx.size // 2_000_000 + 1)):  # bound memory
    boot.append(_auc_by_ranks(y[chunk], s[chunk]))
  interval, why = _percentile_ci(np.concatenate(boot), alpha)
  return Metric(value, interval, why)


def _average_precision_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
  """Average precision along the last axis (sklearn's definition, ties grouped).

  AP = (1 / n_pos) * sum over positives of the precision at the end of the
  positive's tie group (examples sorted by decreasing score). NaN for rows
  without positives.
  """
  order = np.argsort(-s, axis=-1, kind="stable")
  ys = np.take_along_axis(y, order, axis=-1).astype(np.float64)
  ss = np.take_along_axis(s, order, axis=-1)
  n = ys.shape[-1]
  cum_tp = np.cumsum(ys, axis=-1)
  is_end = np.ones(ss.shape, dtype=bool)
  is_end[..., :-1] = ss[..., :-1] != ss[..., 1:]
  ends = np.where(is_end, np.arange(n), n)
  group_end = np.minimum.accumulate(ends[..., ::-1], axis=-1)[..., ::-1]
  precision = np.take_along_axis(cum_tp, group_end, axis=-1) / (group_end + 1)
  n_pos = ys.sum(axis=-1)
  with np.errstate(divide="ignore", invalid="ignore"):
    return (ys * precision).sum(axis=-1) / n_pos


def pr_auc(y_true, y_score, *, ci: bool = True, n_resamples: int = DEFAULT_RESAMPLES,
           seed: int = DEFAULT_SEED, alpha: float = DEFAULT_ALPHA) -> Metric:
  """Area under the precision-recall curve, as average precision (step-wise, no interpolation).

  AP = sum_k (R_k - R_{k-1}) P_k over thresholds. All-equal scores give the
  prevalence; no positives gives None.
  """
  y, s = binary_inputs(y_true, y_score)
  if y.size == 0:
    return _undefined("no examples")
  if y.sum() == 0:
    return _undefined(f"no positive examples ({y.size} negative): precision-recall is undefined")
  value = float(_average_precision_rows(y, s))
  if not ci:
    return Metric(value)
  if y.sum() == y.size:
    return Metric(value, None, "only positive examples: the bootstrap interval is degenerate")
  idx = stratified_bootstrap_indices(y, n_resamples, seed)
  interval, why = _percentile_ci(_average_precision_rows(y[idx], s[idx]), alpha)
  return Metric(value, interval, why)


def roc_curve(y_true, y_score) -> dict[str, np.ndarray] | None:
  """{'fpr', 'tpr', 'thresholds'} (decreasing thresholds; the first is +inf), or None if one class."""
  y, s = binary_inputs(y_true, y_score)
  if class_reason(y):
    return None
  fpr, tpr, thr = skm.roc_curve(y, s, drop_intermediate=False)
  return {"fpr": fpr, "tpr": tpr, "thresholds": thr}


def pr_curve(y_true, y_score) -> dict[str, np.ndarray] | None:
  """{'precision', 'recall', 'thresholds'}, or None when there are no positives."""
  y, s = binary_inputs(y_true, y_score)
  if y.size == 0 or y.sum() == 0:
    return None
  p, r, thr = skm.precision_recall_curve(y, s)
  return {"precision": p, "recall": r, "thresholds": thr}


# --------------------------------------------------------------------------
# Metrics at a threshold.
# --------------------------------------------------------------------------

THRESHOLD_METRICS = ("sensitivity", "specificity", "ppv", "npv", "accuracy", "f1")


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
  """[K, K] int counts: rows = true class, columns = predicted class (label order).

  Binary: [[TN, FP], [FN, TP]].
  """
  y = np.asarray(y_true).reshape(-1)
  p = np.asarray(y_pred).reshape(-1)
  return skm.confusion_matrix(y, p, labels=list(range(num_classes))).astype(np.int64)


def _rates(tp, fp, tn, fn) -> dict[str, np.ndarray]:
  """Vectorised rates from count arrays; NaN where a denominator is 0."""
  tp, fp, tn, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, tn, fn))
  with np.errstate(divide="ignore", invalid="ignore"):
    out = {
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "ppv": tp / (tp + fp),
        "npv": tn / (tn + fn),
        "accuracy": (tp + tn) / (tp + fp + tn + fn),
        "f1": 2 * tp / (2 * tp + fp + fn),
    }
  return out


_RATE_REASONS = {
    "sensitivity": "no positive examples",
    "specificity": "no negative examples",
    "ppv": "no examples predicted positive",
    "npv": "no examples predicted negative",
    "accuracy": "no examples",
    "f1": "no positive examples and none predicted positive",
}


def metrics_at_threshold(y_true, y_score, threshold: float, *, ci: bool = True,
                         n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                         alpha: float = DEFAULT_ALPHA) -> dict[str, Any]:
  """Binary operating-point metrics at `threshold` (score >= threshold -> positive).

  Returns {"threshold", "tp", "fp", "tn", "fn", "confusion_matrix" [[TN, FP], [FN, TP]],
  and one `Metric` per name in THRESHOLD_METRICS}.
  """
  y, s = binary_inputs(y_true, y_score)
  pred = (s >= threshold).astype(np.int64)
  tp = int(((pred == 1) & (y == 1)).sum())
  fp = int(((pred == 1) & (y == 0)).sum())
  tn = int(((pred == 0) & (y == 0)).sum())
  fn = int(((pred == 0) & (y == 1)).sum())
  point = _rates(tp, fp, tn, fn)
  boot = None
  if ci and y.size:
    idx = stratified_bootstrap_indices(y, n_resamples, seed)
    yb, pb = y[idx], pred[idx]
    boot = _rates(((pb == 1) & (yb == 1)).sum(1), ((pb == 1) & (yb == 0)).sum(1),
                  ((pb == 0) & (yb == 0)).sum(1), ((pb == 0) & (yb == 1)).sum(1))
  out: dict[str, Any] = {"threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
                         "confusion_matrix": [[tn, fp], [fn, tp]]}
  for name in THRESHOLD_METRICS:
    v = float(point[name])
    if math.isnan(v):
      out[name] = _undefined(_RATE_REASONS[name])
    elif boot is None:
      out[name] = Metric(v)
    else:
      interval, why = _percentile_ci(boot[name], alpha)
      out[name] = Metric(v, interval, why)
  return out


# --------------------------------------------------------------------------
# Calibration.
# --------------------------------------------------------------------------


def brier_score(y_true, probs) -> Metric:
  """Mean squared error of the probabilities.

  Binary: probs [n] = P(positive): mean((p - y)^2).
  Multi-class: probs [n, K]: mean over examples of sum_k (p_k - onehot_k)^2.
  """
  p = np.asarray(probs, dtype=np.float64)
  if p.ndim == 2 and p.shape[1] > 1:
    y, p = _multiclass_inputs(y_true, p)
    if y.size == 0:
      return _undefined("no examples")
    onehot = np.eye(p.shape[1])[y]
    return Metric(float(((p - onehot) ** 2).sum(axis=1).mean()))
  y, s = binary_inputs(y_true, p)
  if y.size == 0:
    return _undefined("no examples")
  return Metric(float(((s - y) ** 2).mean()))


def calibration_bins(y_true, probs, n_bins: int = 10) -> dict[str, np.ndarray]:
  """Equal-width reliability bins over [0, 1].

  Binary (probs [n]): confidence = P(positive), outcome = y.
  Multi-class (probs [n, K]): confidence = max prob, outcome = (argmax == y).
  Returns {"edges" [n_bins+1], "count" [n_bins], "confidence" [n_bins] (mean
  predicted, NaN if empty), "observed" [n_bins] (fraction of outcomes, NaN if empty)}.
  Bin i holds confidence in [edges[i], edges[i+1]) (the last bin includes 1).
  """
  p = np.asarray(probs, dtype=np.float64)
  if p.ndim == 2 and p.shape[1] > 1:
    y, p = _multiclass_inputs(y_true, p)
    conf = p.max(axis=1)
    outcome = (p.argmax(axis=1) == y).astype(np.float64)
  else:
    y, conf = binary_inputs(y_true, p)
    outcome = y.astype(np.float64)
  edges = np.linspace(0.0, 1.0, n_bins + 1)
  which = np.clip(np.digitize(conf, edges[1:-1], right=False), 0, n_bins - 1)
  count = np.bincount(which, minlength=n_bins).astype(np.int64)
  with np.errstate(divide="ignore", invalid="ignore"):
    mean_conf = np.bincount(which, weights=conf, minlength=n_bins) / count
    observed = np.bincount(which, weights=outcome, minlength=n_bins) / count
  return {"edges": edges, "count": count, "confidence": mean_conf, "observed": observed}


def expected_calibration_error(y_true, probs, n_bins: int = 10) -> Metric:
  """ECE = sum_bins (count/n) * |observed - mean confidence| over equal-width bins.

  See `calibration_bins` for what confidence/observed mean (binary: P(positive)
  vs the positive rate; multi-class: top-label confidence vs accuracy).
  """
  b = calibration_bins(y_true, probs, n_bins)
  n = int(b["count"].sum())
  if n == 0:
    return _undefined("no examples")
  full = b["count"] > 0
  gap = np.abs(b["observed"][full] - b["confidence"][full])
  return Metric(float((b["count"][full] * gap).sum() / n))


# Temperature scaling -------------------------------------------------------

_EPS = rundir.PROB_CLIP


def _to_logits(probs: np.ndarray) -> np.ndarray:
  """Binary [n] -> logit(p); multi-class [n, K] -> log(p) (softmax is shift-invariant)."""
  p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
  if p.ndim == 2 and p.shape[1] > 1:
    return np.log(p)
  return np.log(p) - np.log1p(-p)


def apply_temperature(probs, temperature: float) -> np.ndarray:
  """Rescales probabilities by a temperature: sigmoid(logit(p)/T) or softmax(log(p)/T).

  Same shape as `probs`; T=1 returns (clipped) probs, T>1 softens, T<1 sharpens.
  """
  p = np.asarray(probs, dtype=np.float64)
  z = _to_logits(p) / float(temperature)
  if p.ndim == 2 and p.shape[1] > 1:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
  return 1.0 / (1.0 + np.exp(-z))


def _nll(y: np.ndarray, p: np.ndarray) -> float:
  p = np.clip(p, _EPS, 1 - _EPS)
  if p.ndim == 2 and p.shape[1] > 1:
    return float(-np.log(p[np.arange(y.size), y]).mean())
  p = p.reshape(-1)
  return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())


@dataclasses.dataclass(frozen=True)
class TemperatureFit:
  """temperature: fitted T (1.0 when not fitted; `reason` says why). nll_*: mean log loss."""
  temperature: float
  nll_before: float | None
  nll_after: float | None
  reason: str | None = None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def fit_temperature(y_true, probs, bounds: tuple[float, float] = (0.05, 20.0)) -> TemperatureFit:
  """Fits the temperature T minimising the log loss of apply_temperature(probs, T).

  Binary: y_true {0,1} [n], probs [n]. Multi-class: y_true int [n], probs [n, K].
  Bounded 1-D search over log T. One class only -> T = 1 with a reason
  (any sharpening would look perfect).
  """
  p = np.asarray(probs, dtype=np.float64)
  multi = p.ndim == 2 and p.shape[1] > 1
  if multi:
    y, p = _multiclass_inputs(y_true, p)
    single = np.unique(y).size < 2
  else:
    y, p = binary_inputs(y_true, p)
    single = class_reason(y) is not None
  if y.size == 0:
    return TemperatureFit(1.0, None, None, "no examples")
  before = _nll(y, p)
  if single:
    return TemperatureFit(1.0, before, before, "only one class present: temperature not fitted")
  res = optimize.minimize_scalar(lambda lt: _nll(y, apply_temperature(p, math.exp(lt))),
                                 bounds=(math.log(bounds[0]), math.log(bounds[1])),
                                 method="bounded", options={"xatol": 1e-5})
  t = float(math.exp(res.x))
  after = _nll(y, apply_temperature(p, t))
  if after > before:  # never worse than doing nothing
    return TemperatureFit(1.0, before, before, "fit did not improve the log loss")
  return TemperatureFit(t, before, after)


# --------------------------------------------------------------------------
# Multi-class.
# --------------------------------------------------------------------------


def multiclass_auc(y_true, probs, class_names: Sequence[str] | None = None, *, ci: bool = True,
                   n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                   alpha: float = DEFAULT_ALPHA) -> dict[str, Any]:
  """One-vs-rest ROC AUC per class, their macro mean, and the micro AUC.

  y_true int [n], probs [n, K].
  Returns {"per_class": {name: Metric}, "macro": Metric, "micro": Metric}.
  per-class: class k vs the rest on probs[:, k] (None if class k is absent or
  is every example). macro: unweighted mean over the defined classes (reason
  names any left out). micro: AUC of the flattened one-hot labels vs probs.
  CIs: bootstrap stratified by class; a resample's macro uses the classes
  defined in the full data.
  """
  y, p = _multiclass_inputs(y_true, probs)
  k = p.shape[1]
  names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
  if len(names) != k:
    raise ValueError(f"{len(names)} class names for {k} probability columns")
  onehot = np.eye(k, dtype=np.int64)[y] if y.size else np.zeros((0, k), np.int64)
  per_class: dict[str, Metric] = {}
  defined = []
  for c in range(k):
    reason = class_reason(onehot[:, c])
    if reason:
      per_class[names[c]] = _undefined(f"class {names[c]!r}: {reason}")
    else:
      defined.append(c)
  idx = stratified_bootstrap_indices(y, n_resamples, seed) if (ci and y.size) else None
  boot_per_class = {}
  for c in defined:
    value = float(_auc_by_ranks(onehot[:, c], p[:, c]))
    if idx is None:
      per_class[names[c]] = Metric(value)
      continue
    b = _auc_by_ranks(onehot[idx, c], p[idx, c])
    boot_per_class[c] = b
    interval, why = _percentile_ci(b, alpha)
    per_class[names[c]] = Metric(value, interval, why)
  if not defined:
    macro = _undefined("no class has both positive and negative examples")
  else:
    value = float(np.mean([per_class[names[c]].value for c in defined]))
    missing = [names[c] for c in range(k) if c not in defined]
    why = f"mean over {len(defined)} of {k} classes (undefined: {', '.join(missing)})" if missing else None
    interval = None
    if idx is not None:
      interval, ci_why = _percentile_ci(np.mean([boot_per_class[c] for c in defined], axis=0), alpha)
      why = why or ci_why
    macro = Metric(value, interval, why)
  flat_y, flat_p = onehot.reshape(-1), p.reshape(-1)
  if class_reason(flat_y) or k < 2:
    micro = _undefined("micro AUC needs examples of at least two classes")
  else:
    value = float(_auc_by_ranks(flat_y, flat_p))
    interval, why = None, None
    if idx is not None:
      b = _auc_by_ranks(onehot[idx].reshape(len(idx), -1), p[idx].reshape(len(idx), -1))
      interval, why = _percentile_ci(b, alpha)
    micro = Metric(value, interval, why)
  return {"per_class": per_class, "macro": macro, "micro": micro}


def classification_report(y_true, y_pred, class_names: Sequence[str]) -> tuple[dict, str]:
  """scikit-learn's classification report as (dict, text), every class listed.

  Undefined precision/recall (no predicted/true examples of a class) is 0.0
  (sklearn's zero_division=0), as in the text report.
  """
  labels = list(range(len(class_names)))
  kw = dict(labels=labels, target_names=list(class_names), zero_division=0)
  d = skm.classification_report(y_true, y_pred, output_dict=True, **kw)
  text = skm.classification_report(y_true, y_pred, digits=3, **kw)
  return _jsonable(d), text


def per_class_rates(y_true, y_pred, num_classes: int) -> dict[int, dict[str, float | None]]:
  """One-vs-rest sensitivity/specificity/ppv/npv/accuracy/f1 for each class (None if undefined)."""
  cm = confusion_matrix(y_true, y_pred, num_classes)
  total = cm.sum()
  out = {}
  for c in range(num_classes):
    tp = cm[c, c]
    fn = cm[c].sum() - tp
    fp = cm[:, c].sum() - tp
    tn = total - tp - fn - fp
    r = _rates(tp, fp, tn, fn)
    out[c] = {k: (None if math.isnan(float(v)) else float(v)) for k, v in r.items()}
  return out


# --------------------------------------------------------------------------
# Helpers for reports.
# --------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
  """Converts numpy scalars/arrays and NaN into JSON-safe Python values (NaN -> None)."""
  if isinstance(x, Metric):
    return _jsonable(x.to_dict())
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    f = float(x)
    return None if math.isnan(f) or math.isinf(f) else f
  return x


to_jsonable = _jsonable
