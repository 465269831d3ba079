"""Numbers the trainer needs, read from dataset.json's counts (records are never scanned).

  task(manifest)                          "single_label" or "multi_label"
  class_weights(manifest)                 {label: weight}, scikit-learn's 'balanced'
  positive_weights(manifest)              multi-label: [K] neg/pos ratio per finding
  prevalence(manifest)                    multi-label: [K] positives among labelled entries
  initial_bias(manifest)                  the output layer's starting bias
  steps_per_epoch(manifest, split, ...)   batches in one pass over a split
  input_channels(manifest, cfg)           1 (every image grayscale) or 3

`manifest` is the dict `tfrecord_tools.schema.read_manifest` returns; the
counts live in `manifest["splits"][split]["class_counts"]`, keyed by class
name, in the label order of `manifest["classes"]`. A multi-label set
(`"task": "multi_label"`, `classes` = the K findings) also has, per split,
`"finding_counts"`: {finding: {"positive", "negative", "uncertain", "ignored"}},
where "ignored" entries are masked out (mask 0.0 in the records).
"""

from __future__ import annotations

import math

import numpy as np
from absl import logging

from tfrecord_tools import schema
from xraytpu.data import DataError

# The manifest's tasks (named in tfrecord_tools.schema): one class per image ("task" absent),
# or K findings per image (multi-hot labels and a mask).
SINGLE_LABEL, MULTI_LABEL = schema.SINGLE_LABEL, schema.MULTI_LABEL
TASKS = (SINGLE_LABEL, MULTI_LABEL)


def task(manifest: dict) -> str:
  """The manifest's "task": SINGLE_LABEL (also when absent) or MULTI_LABEL."""
  value = manifest.get("task") or SINGLE_LABEL
  if value not in TASKS:
    raise DataError(f"dataset.json has task {value!r}: expected one of {', '.join(TASKS)}")
  return value


def class_counts(manifest: dict, split: str = "train") -> np.ndarray:
  """int64 [K]: examples per class of `split`, in label order."""
  counts = schema.split_info(manifest, split).get("class_counts", {})
  return np.array([int(counts.get(c, 0)) for c in manifest["classes"]], np.int64)


def class_weights(manifest: dict, split: str = "train") -> dict[int, float]:
  """{label index: weight}, scikit-learn's `compute_class_weight("balanced")`.

  weight_k = n_examples / (n_present_classes * count_k), so every class
  contributes the same total weight to the loss. A class with no example in
  the split (sklearn would refuse) gets 1.0 and a warning; Keras wants every
  label index in the dict.
  """
  counts = class_counts(manifest, split)
  present = counts > 0
  if not present.any():
    raise DataError(f"split '{split}' has no examples: cannot compute class weights")
  total, n_present = counts.sum(), int(present.sum())
  weights = {}
  for k, n in enumerate(counts):
    if n == 0:
      logging.warning("class %r has no %s examples: class weight 1.0", manifest["classes"][k], split)
      weights[k] = 1.0
    else:
      weights[k] = float(total / (n_present * n))
  return weights


def finding_counts(manifest: dict, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """Multi-label: (positives [K], negatives [K]) among the labelled entries of `split`.

  Labelled = not ignored (mask 1.0). Entries counted as "uncertain" but kept
  (--uncertain=zeros|ones) are labelled too: when "positive" + "negative" +
  "ignored" leave some of the split's examples uncounted, those go to the side
  the manifest's labels.uncertain policy sent them to ("ones": positive, else negative).
  """
  if task(manifest) != MULTI_LABEL:
    raise DataError("finding counts exist for multi-label data sets only")
  info = schema.split_info(manifest, split)
  counts = info.get("finding_counts")
  if not isinstance(counts, dict):
    raise DataError(f"split '{split}' of the multi-label data set has no 'finding_counts' in dataset.json")
  ones = str((manifest.get("labels") or {}).get("uncertain", "")) == "ones"
  n = int(info.get("num_examples", 0))
  pos, neg = [], []
  for finding in manifest["classes"]:
    c = counts.get(finding) or {}
    p, q, ignored = int(c.get("positive", 0)), int(c.get("negative", 0)), int(c.get("ignored", 0))
    rest = max(0, n - ignored - p - q)   # kept uncertain entries not already in p or q
    pos.append(p + (rest if ones else 0))
    neg.append(q + (0 if ones else rest))
  return np.array(pos, np.int64), np.array(neg, np.int64)


def prevalence(manifest: dict, split: str = "train") -> np.ndarray:
  """Multi-label: float64 [K], each finding's positives / labelled entries (nan when none labelled)."""
  pos, neg = finding_counts(manifest, split)
  total = (pos + neg).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, pos / np.maximum(total, 1), np.nan)


def positive_weights(manifest: dict, split: str = "train") -> np.ndarray:
  """Multi-label, --class_weight=balanced: float32 [K], negatives / positives per finding.

  The masked loss multiplies each finding's positive term by it, so positives
  and negatives of a finding weigh the same in total. A finding without a
  labelled positive or negative in the split gets 1.0 and a warning.
  """
  pos, neg = finding_counts(manifest, split)
  weights = []
  for finding, p, q in zip(manifest["classes"], pos, neg):
    if p == 0 or q == 0:
      logging.warning("finding %r has %d positive and %d negative labelled %s entries: positive "
                      "weight 1.0", finding, p, q, split)
      weights.append(1.0)
    else:
      weights.append(float(q / p))
  return np.array(weights, np.float32)


def initial_bias(manifest: dict, split: str = "train") -> np.ndarray:
  """float32 bias for the output layer, so the first predictions match the priors.

  Binary (2 classes, one sigmoid unit): [log(pos / neg)], pos = label 1.
  K > 2 classes (softmax): log(count_k / total), the log-priors.
  Multi-label (K sigmoids): logit(prevalence_k) = log(pos_k / neg_k) over the
  labelled entries of each finding.
  Zero counts are replaced by 1 so the bias stays finite.
  """
  if task(manifest) == MULTI_LABEL:
    pos, neg = finding_counts(manifest, split)
    return np.log(np.maximum(pos, 1) / np.maximum(neg, 1)).astype(np.float32)
  counts = np.maximum(class_counts(manifest, split), 1).astype(np.float64)
  if len(counts) == 2:
    return np.array([math.log(counts[1] / counts[0])], np.float32)
  return np.log(counts / counts.sum()).astype(np.float32)


def num_examples(manifest: dict, split: str) -> int:
  return int(schema.split_info(manifest, split)["num_examples"])


def steps_per_epoch(manifest: dict, split: str, global_batch: int, drop_remainder: bool) -> int:
  """Batches in one pass: n // batch when dropping the remainder, else ceil(n / batch).

  Raises DataError when a training split (drop_remainder) is smaller than one
  batch, which would otherwise train zero steps.
  """
  if global_batch <= 0:
    raise DataError(f"batch size must be positive, got {global_batch}")
  n = num_examples(manifest, split)
  steps = n // global_batch if drop_remainder else -(-n // global_batch)
  if steps == 0:
    raise DataError(f"split '{split}' has {n} examples, fewer than one batch of "
                    f"{global_batch}: lower --batch_size")
  return steps


def input_channels(manifest: dict, cfg) -> int:
  """Channels the pipeline decodes to: cfg.channels if 1 or 3, else from the data.

  cfg: anything with a `channels` field (a Config or an input_pipeline.InputSpec).

  With cfg.channels == 0, 1 when the manifest's image_stats say every image is
  single-channel (grayscale stays grayscale until the model needs RGB), else 3.
  Without image_stats (an older manifest) the converter's `channels` argument
  decides, and 3 is the safe default.
  """
  if cfg.channels in (1, 3):
    return int(cfg.channels)
  if cfg.channels != 0:
    raise DataError(f"--channels must be 0, 1 or 3, got {cfg.channels}")
  stats = (manifest.get("image_stats") or {}).get("channels")
  if stats:
    return 1 if all(str(k) == "1" for k, v in stats.items() if int(v) > 0) else 3
  arg = str((manifest.get("args") or {}).get("channels", "")).lower()
  if arg in ("1", "l", "gray", "grayscale"):
    return 1
  return 3
