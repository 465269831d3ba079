"""Numbers the trainer needs, read from dataset.json's counts (records are never scanned).

  class_weights(manifest)                 {label: weight}, scikit-learn's 'balanced'
  initial_bias(manifest)                  the output layer's starting bias
  steps_per_epoch(manifest, split, ...)   batches in one pass over a split
  input_channels(manifest, cfg)           1 (every image grayscale) or 3

`manifest` is the dict `tfrecord_tools.schema.read_manifest` returns; the
counts live in `manifest["splits"][split]["class_counts"]`, keyed by class
name, in the label order of `manifest["classes"]`.
"""

from __future__ import annotations

import math

import numpy as np
from absl import logging

from tfrecord_tools import schema
from xraytpu.data import DataError


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


def initial_bias(manifest: dict, split: str = "train") -> np.ndarray:
  """float32 bias for the output layer, so the first predictions match the priors.

  Binary (2 classes, one sigmoid unit): [log(pos / neg)], pos = label 1.
  K > 2 classes (softmax): log(count_k / total), the log-priors.
  Zero counts are replaced by 1 so the bias stays finite.
  """
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
