"""A run's training input: the distributed train and val datasets (xraytpu.training.train_lib).

`make_datasets` gives the strategy's train dataset (repeating, with per-example class
weights for single-label tasks: `_class_weight_fn`) and its val dataset (one padded pass,
padding weighing 0), both from xraytpu.data.input_pipeline, and the number of val steps.
"""

from __future__ import annotations

from absl import logging
import tensorflow as tf

from xraytpu.config import Config
from xraytpu.data import input_pipeline


def _class_weight_fn(weights: dict[int, float], num_classes: int):
  """(image, label) -> (image, label, weight[b]) for binary [b,1] or one-hot [b,K] labels.

  A soft label (mixup/cutmix) weighs the classes' weights in its proportions."""
  table = tf.constant([weights[i] for i in range(num_classes)], tf.float32)

  def add_weight(image, label):
    if num_classes == 2:
      y = tf.reshape(tf.cast(label, tf.float32), [-1])
      w = table[0] * (1.0 - y) + table[1] * y
    else:
      w = tf.reduce_sum(label * table, axis=-1)
    return image, label, w
  return add_weight


def make_datasets(cfg: Config, strategy, manifest: dict, *, label_mode: str,
                  class_weights: dict[int, float] | None, has_val: bool):
  """Distributed train (repeating, weighted) and val (one padded pass) datasets,
  and the number of validation steps.

  class_weights: single-label only, as per-example weights; multi-label
  weighting lives in the loss (positive weights per finding).

  Validation, under every strategy, is `input_pipeline.eval_dataset(padded=True)`:
  each replica gets the same number of full batches (static shapes for XLA and
  TPU, no replica left with an empty batch), padding weighs 0, and every val
  example counts exactly once in the loss and metrics. The step count is
  `input_pipeline.eval_plan`'s, over the input pipelines the strategy made.
  """
  num_classes = len(manifest["classes"])
  spec = input_pipeline.InputSpec.from_config(cfg, manifest)

  def train_fn(ctx: tf.distribute.InputContext):
    ds = input_pipeline.train_dataset(cfg.data_dir, spec, global_batch=cfg.batch_size,
                                      input_context=ctx, label_mode=label_mode, manifest=manifest)
    if class_weights:
      ds = ds.map(_class_weight_fn(class_weights, num_classes),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds

  pipelines: list[int] = []

  def val_fn(ctx: tf.distribute.InputContext):
    pipelines.append(ctx.num_input_pipelines)
    return input_pipeline.eval_dataset(cfg.data_dir, "val", spec, batch_size=cfg.batch_size,
                                       input_context=ctx, label_mode=label_mode, manifest=manifest,
                                       padded=True)

  train = strategy.distribute_datasets_from_function(train_fn)
  if not has_val:
    return train, None, None
  val = strategy.distribute_datasets_from_function(val_fn)
  plan = input_pipeline.eval_plan(manifest, "val", cfg.batch_size, max(pipelines or [1]),
                                  multi_label=label_mode == "multi_label")
  logging.info("Validation: %d example(s) in %d step(s) of %d (%d padding, weight 0)",
               plan.examples, plan.steps, cfg.batch_size, plan.padding)
  return train, val, plan.steps
