"""The multi-label task's loss and training metrics (K findings per image, some labels ignored).

The input pipeline (label_mode "multi_label") yields targets y = float32
[b, 2K] = concat([multi_hot, mask]) (`input_pipeline.multi_label_targets`;
`input_pipeline.split_multi_label` splits it again); the model ends in K
sigmoids, float32 [b, K]. Here, as Keras objects `compile` takes:

  MaskedBinaryCrossentropy   BCE averaged over the labelled entries (mask 1.0) of the batch,
                             each finding's positive term times its positive weight
                             (`stats.positive_weights`, --class_weight=balanced)
  MaskedAUC                  ROC AUC over labelled entries: of one finding ("auc_<finding>"),
                             or the mean over findings ("auc", the run's monitor)
  metric_names(findings)     {finding: "auc_<sanitised finding>"}, the history.csv column names
                             (validation: "val_" in front)
"""

from __future__ import annotations

import re

import numpy as np
import tensorflow as tf

from xraytpu._keras import keras
from xraytpu.data import input_pipeline

MEAN_AUC = "auc"   # the mean over findings: what early stopping and the best checkpoint follow


def metric_names(findings: list[str]) -> dict[str, str]:
  """{finding: metric name}: "auc_" + the finding lower-cased, runs of other characters as "_".

  E.g. "Pleural_Thickening" -> "auc_pleural_thickening", "COVID-19" -> "auc_covid_19";
  names that would collide get "_2", "_3", ... in `findings` order.
  """
  names: dict[str, str] = {}
  used: set[str] = set()
  for finding in findings:
    base = "auc_" + (re.sub(r"[^0-9a-z]+", "_", str(finding).lower()).strip("_") or "finding")
    name, i = base, 2
    while name in used:
      name, i = f"{base}_{i}", i + 1
    used.add(name)
    names[finding] = name
  return names


@keras.saving.register_keras_serializable(package="xraytpu")
class MaskedBinaryCrossentropy(keras.losses.Loss):
  """Binary cross-entropy of K sigmoids, averaged over the labelled entries of the batch.

  loss = sum(mask * l) / max(sum(mask), 1), where per entry
  l = -(w_k * y * log(p) + (1 - y) * log(1 - p)), p clipped to [eps, 1 - eps],
  w_k the finding's positive weight (1 without), y smoothed towards 0.5 by
  `label_smoothing`. Ignored entries (mask 0.0) add nothing, to the loss or
  to the count. Under a distribution strategy each replica averages its own
  labelled entries (Keras then averages the replicas).
  """

  def __init__(self, pos_weight=None, label_smoothing: float = 0.0, name: str = "masked_bce", **kwargs):
    super().__init__(name=name, **kwargs)
    self.pos_weight = None if pos_weight is None else [float(w) for w in np.reshape(pos_weight, -1)]
    self.label_smoothing = float(label_smoothing)

  def call(self, y_true, y_pred):
    labels, mask = input_pipeline.split_multi_label(tf.cast(y_true, tf.float32))
    if self.label_smoothing:
      labels = labels * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
    eps = keras.backend.epsilon()
    p = tf.clip_by_value(tf.cast(y_pred, tf.float32), eps, 1.0 - eps)
    positive = labels * tf.math.log(p)
    if self.pos_weight is not None:
      positive = positive * tf.constant(self.pos_weight, tf.float32)
    per_entry = -(positive + (1.0 - labels) * tf.math.log(1.0 - p))
    return tf.reduce_sum(mask * per_entry) / tf.maximum(tf.reduce_sum(mask), 1.0)

  def get_config(self):
    return {**super().get_config(), "pos_weight": self.pos_weight,
            "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="xraytpu")
class MaskedAUC(keras.metrics.AUC):
  """ROC AUC over the labelled entries of multi-label targets y = [multi_hot, mask].

  finding=k: the AUC of finding k alone (Keras' AUC with the mask as sample
  weight; 0.0 while the finding has no labelled positive or no negative).
  finding=None: each finding's own AUC, averaged over the findings that have
  both a labelled positive and a labelled negative (0.0 when none has).
  """

  def __init__(self, num_findings: int, finding: int | None = None, name: str = MEAN_AUC, **kwargs):
    for key in ("multi_label", "num_labels", "label_weights", "from_logits"):
      kwargs.pop(key, None)   # fixed by num_findings / finding (from_config passes them back)
    self.num_findings, self.finding = int(num_findings), finding
    super().__init__(name=name, multi_label=finding is None,
                     num_labels=self.num_findings if finding is None else None, **kwargs)

  def update_state(self, y_true, y_pred, sample_weight=None):
    labels, mask = input_pipeline.split_multi_label(tf.cast(y_true, tf.float32))
    y_pred = tf.cast(y_pred, tf.float32)
    if sample_weight is not None:
      mask = mask * tf.reshape(tf.cast(sample_weight, tf.float32), [-1, 1])
    if self.finding is not None:
      k = self.finding
      labels, mask, y_pred = labels[:, k], mask[:, k], y_pred[:, k]
    return super().update_state(labels, y_pred, sample_weight=mask)

  def result(self):
    if self.finding is not None:
      return super().result()
    # [thresholds, K] tensors (read as tensors: under a strategy these are sync-on-read variables).
    tp, fp, tn, fn = (tf.convert_to_tensor(v) for v in (self.true_positives, self.false_positives,
                                                          self.true_negatives, self.false_negatives))
    tpr = tf.math.divide_no_nan(tp, tp + fn)
    fpr = tf.math.divide_no_nan(fp, fp + tn)
    # Keras' ROC rule (interpolation): trapezoids between neighbouring thresholds.
    by_finding = tf.reduce_sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2.0, axis=0)
    # The first threshold is below every prediction: tp + fn, fp + tn are the label counts.
    defined = tf.cast(tf.logical_and(tp[0] + fn[0] > 0, fp[0] + tn[0] > 0), tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(by_finding * defined), tf.reduce_sum(defined))

  def get_config(self):
    config = super().get_config()
    for key in ("multi_label", "num_labels", "label_weights", "from_logits"):
      config.pop(key, None)
    return {**config, "num_findings": self.num_findings, "finding": self.finding}


def make_metrics(findings: list[str]) -> list:
  """The mean AUC ("auc") first, then one "auc_<finding>" per finding, in `findings` order."""
  k = len(findings)
  # float32 under any mixed-precision policy (see train_lib.make_metrics).
  return [MaskedAUC(k, name=MEAN_AUC, dtype="float32")] + [
      MaskedAUC(k, finding=i, name=name, dtype="float32")
      for i, name in enumerate(metric_names(findings).values())]
