r"""Images/sec of the training step: the real input pipeline vs batches already in memory.

  python -m benchmarks.train_throughput --data_dir=DIR --model=keras_tpu_cnn \
      --image_size=180 --batch_size=32 --steps_per_execution=1,8 [--json=PATH]

DIR is a folder written by `python -m tfrecord_tools.convert` (dataset.json +
shards). For every --steps_per_execution value the same compiled model
(`xraytpu.models.build_model` + `train_lib.compile_model`, exactly what
`python -m xraytpu.train` runs, augmentation included) trains --steps steps on

  (a) real       the training input: `inputs.make_datasets` -> train_dataset on
                 the TFRecords (cached uint8, shuffle, repeat, batch, prefetch,
                 class weights) through strategy.distribute_datasets_from_function
  (b) synthetic  one batch of that same pipeline held in memory and repeated,
                 so the step never waits for input (the upper bound)

First one full pass over the training split fills (a)'s cache (reported as
"first pass": trace + decode + resize cost). Then --repeats rounds run --steps
steps of (b) followed by --steps steps of (a), calling Keras' compiled train
step (`model.train_function`, what `fit` runs) on two live iterators, so both
inputs see the same machine load; a/b is the median of the per-round ratios.
a/b near 1 means the step is compute-bound and the pipeline keeps up; the
target for keras_tpu_cnn at 180x180 is a/b >= 0.95.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time

from absl import app, flags, logging

from xraytpu import flags as xflags

_FIELDS = ("data_dir", "model", "image_size", "batch_size", "channels", "aspect", "cache",
           "shuffle_buffer", "strategy", "tpu", "mixed_precision", "jit_compile", "weights",
           "optimizer", "learning_rate", "class_weight", "seed") + xflags.AUGMENT_FLAG_FIELDS


def define_flags() -> None:
  """The command's flags, defined when it runs: importing this module defines none (tests
  call its functions in-process beside other modules that define the same names)."""
  xflags.define_config_flags(_FIELDS)
  flags.FLAGS.set_default("model", "keras_tpu_cnn")
  flags.FLAGS.set_default("image_size", 180)
  flags.DEFINE_list("steps_per_execution", ["1", "8"], "Steps per compiled call to compare.")
  flags.DEFINE_integer("steps", 24, "Measured steps per run (rounded up to a multiple of "
                       "steps_per_execution).")
  flags.DEFINE_integer("repeats", 5, "Rounds of (b) then (a), --steps steps each; medians "
                       "are reported (a/b = median of the per-round ratios).")
  flags.DEFINE_string("json", "", "Also write the results here.")


def measure(cfg, steps_per_execution: list[int], steps: int, repeats: int) -> dict:
  """Runs the benchmark; returns {"setup": ..., "runs": [...], "first_pass": ...}."""
  import numpy as np  # noqa: PLC0415
  import tensorflow as tf  # noqa: PLC0415

  from tfrecord_tools import schema  # noqa: PLC0415
  from xraytpu.training import distribute, inputs, train_lib  # noqa: PLC0415
  from xraytpu import models
  from xraytpu._keras import keras  # noqa: PLC0415
  from xraytpu.data import stats  # noqa: PLC0415

  manifest = schema.read_manifest(cfg.data_dir)
  strategy = distribute.get_strategy(cfg.strategy, tpu=cfg.tpu)
  info = distribute.describe(strategy, cfg.strategy)
  per_replica = distribute.per_replica_batch(cfg.batch_size, strategy)
  num_classes = len(manifest["classes"])
  channels = stats.input_channels(manifest, cfg)
  policy = distribute.mixed_precision_policy(cfg.mixed_precision, strategy)
  jit = bool(cfg.jit_compile or info.accelerator == "tpu")
  keras.mixed_precision.set_global_policy(policy)
  keras.utils.set_random_seed(cfg.seed)
  label_mode = "binary" if num_classes == 2 else "one_hot"
  weights = stats.class_weights(manifest, "train") if cfg.class_weight == "balanced" else None
  real, _, _ = inputs.make_datasets(cfg, strategy, manifest, label_mode=label_mode,
                                    class_weights=weights, has_val=False)

  # (b): one per-replica batch of the real pipeline, repeated from memory.
  from xraytpu.data import input_pipeline  # noqa: PLC0415
  one = input_pipeline.train_dataset(cfg.data_dir, input_pipeline.InputSpec.from_config(cfg, manifest),
                                     global_batch=cfg.batch_size, label_mode=label_mode,
                                     manifest=manifest)
  if weights:
    one = one.map(inputs._class_weight_fn(weights, num_classes))  # noqa: SLF001
  batch = next(iter(one))
  batch = tuple(t[:per_replica] for t in batch)
  synthetic = strategy.distribute_datasets_from_function(
      lambda ctx: tf.data.Dataset.from_tensors(batch).repeat().prefetch(tf.data.AUTOTUNE))

  with strategy.scope():
    model = models.build_model(cfg, num_classes=num_classes, channels=channels,
                               output_bias=stats.initial_bias(manifest))
  params = model.count_params()

  # Keras' own compiled train step (what `fit` calls), driven directly so the
  # two inputs can alternate block by block under the same machine load.
  it_real, it_synthetic = iter(real), iter(synthetic)

  def block(iterator, calls: int, spe: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
      logs = model.train_function(iterator)
    float(logs["loss"])  # wait for the last step
    return calls * spe * cfg.batch_size / (time.perf_counter() - t0)

  full_pass = stats.steps_per_epoch(manifest, "train", cfg.batch_size, True)
  results, first_pass = [], None
  for spe in steps_per_execution:
    calls = -(-steps // spe)
    with strategy.scope():
      train_lib.compile_model(model, dataclasses.replace(cfg, steps_per_execution=spe),
                              learning_rate=cfg.learning_rate, num_classes=num_classes, jit_compile=jit)
    model.make_train_function(force=True)
    block(it_synthetic, 1, spe)  # trace
    if first_pass is None:
      # One full pass fills the real pipeline's cache (decode + resize happen here only).
      first_pass = block(it_real, -(-full_pass // spe), spe)
      logging.info("first pass of the real pipeline (trace + decode + cache fill): %.1f images/sec", first_pass)
    else:
      block(it_real, 1, spe)
    a, b = [], []
    for _ in range(repeats):
      b.append(block(it_synthetic, calls, spe))
      a.append(block(it_real, calls, spe))
    ratios = [x / y for x, y in zip(a, b)]
    row = {"steps_per_execution": spe, "steps": calls * spe,
           "synthetic_images_per_sec": statistics.median(b), "real_images_per_sec": statistics.median(a),
           "ratio_real_to_synthetic": statistics.median(ratios),
           "synthetic_all": b, "real_all": a, "ratios_all": ratios}
    logging.info("steps_per_execution=%d: synthetic %.1f, real %.1f images/sec (a/b %.3f, per round %s)",
                 spe, row["synthetic_images_per_sec"], row["real_images_per_sec"],
                 row["ratio_real_to_synthetic"], ", ".join(f"{r:.3f}" for r in ratios))
    results.append(row)
  setup = {"model": cfg.model, "image_size": cfg.image_size, "channels": channels,
           "global_batch": cfg.batch_size, "per_replica_batch": per_replica, "replicas": info.replicas,
           "strategy": info.cls, "accelerator": info.accelerator, "policy": policy, "jit_compile": jit,
           "augment": cfg.augment, "params": params, "train_examples": stats.num_examples(manifest, "train"),
           "tensorflow": tf.__version__, "numpy": np.__version__}
  return {"setup": setup, "first_pass_images_per_sec": first_pass, "runs": results}


def format_table(res: dict) -> str:
  s = res["setup"]
  lines = [
      f"{s['model']} {s['image_size']}x{s['image_size']}x{s['channels']}, global batch {s['global_batch']} "
      f"({s['replicas']} x {s['per_replica_batch']}), {s['strategy']} on {s['accelerator']}, "
      f"policy {s['policy']}, jit {s['jit_compile']}, augment {s['augment']}",
      f"first pass of the real pipeline (trace + decode + cache fill): "
      f"{res['first_pass_images_per_sec']:.1f} images/sec",
      "",
      "| steps/execution | (b) synthetic img/s | (a) real pipeline img/s | a/b   |",
      "| --------------- | ------------------- | ----------------------- | ----- |",
  ]
  for r in res["runs"]:
    lines.append(f"| {r['steps_per_execution']:>15} | {r['synthetic_images_per_sec']:>19.1f} | "
                 f"{r['real_images_per_sec']:>23.1f} | {r['ratio_real_to_synthetic']:.3f} |")
  if len(res["runs"]) > 1:
    base = res["runs"][0]
    for r in res["runs"][1:]:
      lines.append(f"steps_per_execution {r['steps_per_execution']} vs {base['steps_per_execution']}: "
                   f"real x{r['real_images_per_sec'] / base['real_images_per_sec']:.2f}, "
                   f"synthetic x{r['synthetic_images_per_sec'] / base['synthetic_images_per_sec']:.2f}")
  return "\n".join(lines)


def main(argv):
  F = flags.FLAGS
  del argv
  cfg = xflags.config_from_flags(_FIELDS)
  if not cfg.data_dir:
    print("train_throughput: error: --data_dir is required", file=sys.stderr)
    sys.exit(2)
  try:
    spe = [int(v) for v in F.steps_per_execution]
  except ValueError:
    print(f"train_throughput: error: --steps_per_execution takes integers, got {F.steps_per_execution}", file=sys.stderr)
    sys.exit(2)
  from xraytpu.training import train_lib  # noqa: PLC0415
  try:
    res = measure(cfg, spe, F.steps, F.repeats)
  except train_lib.USAGE_ERRORS as e:
    print(f"train_throughput: error: {e}", file=sys.stderr)
    sys.exit(2)
  res["command"] = " ".join(sys.argv)
  print(format_table(res))
  if F.json:
    with open(F.json, "w") as f:
      json.dump(res, f, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
