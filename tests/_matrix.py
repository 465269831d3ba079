"""The accelerator matrix: strategy x precision x XLA x steps_per_execution, trained for real.

One process runs a list of combinations on one converted data set and prints one
`ROW {json}` line per combination, then `RESULT [rows]`. Devices must be set up
before TensorFlow starts, so callers run it as a subprocess:

  python -m tests._matrix --data_dir=DIR --out_dir=DIR --cpu_devices=2 \
      --combos=mirrored:bfloat16:0:3,mirrored:float16:0:1 [--evaluate] [--export=COMBO,...]

A combination is STRATEGY:PRECISION:JIT(0|1):STEPS_PER_EXECUTION[:GLOBAL_BATCH]. For each it
  1. trains 1 epoch (xray_cnn, 32 px, light augmentation + --low_resolution_range, global
     batch --batch_size),
  2. recomputes the last epoch's validation loss, accuracy and AUC in one plain
     pass over the val split (no strategy, no padding) and reports the gaps to
     what `fit` logged under the strategy: the padded distributed validation must
     count every example exactly once,
  3. with --evaluate: `evaluate_lib.evaluate` on test; the report must count
     every test example; with --export: the SavedModel scores test records as
     the trained model does.
A combination the product refuses (`StrategyError`) is a row with "refused".

Used by tests/test_matrix.py (TF of the venv) and .ci/compat (TF 2.20).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

_DATA = flags.DEFINE_string("data_dir", "", "converted data set")
_OUT = flags.DEFINE_string("out_dir", "", "runs go here, one folder per combination")
_CPUS = flags.DEFINE_integer("cpu_devices", 1, "logical CPU devices to split the CPU into")
_COMBOS = flags.DEFINE_list("combos", [], "STRATEGY:PRECISION:JIT:SPE, ...")
_BATCH = flags.DEFINE_integer("batch_size", 16, "global batch")
_EVALUATE = flags.DEFINE_bool("evaluate", False, "evaluate every trained run on test")
_EXPORT = flags.DEFINE_list("export", [], "export these combinations' runs and score test through "
                            "each SavedModel")


def _split_cpu(n: int) -> None:
  import tensorflow as tf  # noqa: PLC0415
  if n > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)


def _plain_val_metrics(model, data_dir: str, batch: int) -> dict:
  """Loss, accuracy and AUC of `model` over the whole val split in one unpadded pass."""
  import numpy as np  # noqa: PLC0415
  from xraytpu._keras import keras  # noqa: PLC0415
  from xraytpu.data import input_pipeline  # noqa: PLC0415
  spec = input_pipeline.InputSpec(image_size=32, channels=0, aspect="squash")
  ds = input_pipeline.eval_dataset(data_dir, "val", spec, batch_size=batch, label_mode="binary")
  ys, ps = [], []
  for x, y in ds:
    ys.append(y.numpy())
    ps.append(np.asarray(model(x, training=False), np.float32))
  y, p = np.concatenate(ys), np.concatenate(ps)
  loss = keras.losses.BinaryCrossentropy()(y, p).numpy()
  acc = keras.metrics.BinaryAccuracy()
  acc.update_state(y, p)
  auc = keras.metrics.AUC()
  auc.update_state(y, p)
  return {"n": int(len(y)), "val_loss": float(loss), "val_accuracy": float(acc.result()),
          "val_auc": float(auc.result())}


def run_combo(combo: str, data_dir: str, out_dir: str, batch: int, evaluate: bool,
              export: bool) -> dict:
  import numpy as np  # noqa: PLC0415
  from tfrecord_tools import schema  # noqa: PLC0415
  from xraytpu.training import distribute, train_lib  # noqa: PLC0415
  from xraytpu.evaluation import evaluate_lib
  from xraytpu.inference import export_lib
  from xraytpu.config import Config  # noqa: PLC0415
  from xraytpu.data import input_pipeline  # noqa: PLC0415
  strategy, precision, jit, spe, *rest = combo.split(":")
  batch = int(rest[0]) if rest else batch
  row = {"combo": combo, "strategy": strategy, "precision": precision, "jit": jit == "1",
         "steps_per_execution": int(spe), "batch_size": batch}
  run_dir = f"{out_dir}/{combo.replace(':', '_')}"
  cfg = Config(data_dir=data_dir, model_dir=run_dir, strategy=strategy, model="xray_cnn",
               image_size=32, batch_size=batch, epochs=1, steps_per_execution=int(spe),
               mixed_precision=precision, jit_compile=jit == "1", augment="light", cache="off",
               low_resolution_range=0.2, seed=0, overwrite=True).resolve_augment()
  try:
    r = train_lib.train_and_evaluate(cfg, verbose=0)
  except distribute.StrategyError as e:
    row.update(status="refused", message=str(e))
    return row
  row.update(status="trained", replicas=r.strategy.replicas, workers=r.strategy.num_workers,
             chief=r.strategy.is_chief)
  if not r.strategy.is_chief:   # the chief alone writes (and reads back) history.csv
    return row
  last = r.history[-1]
  row.update(policy=json.load(open(f"{run_dir}/config.json"))["run"]["mixed_precision_policy"],
             logged={k: float(last[k]) for k in ("val_loss", "val_accuracy", "val_auc", "loss")})
  plain = _plain_val_metrics(r.model, data_dir, batch)
  row["plain"] = plain
  row["gap"] = {k: abs(plain[k] - row["logged"][k]) for k in ("val_loss", "val_accuracy", "val_auc")}
  manifest = schema.read_manifest(data_dir)
  row["val_examples"] = int(manifest["splits"]["val"]["num_examples"])
  plan = input_pipeline.eval_plan(manifest, "val", batch, r.strategy.num_workers)
  row["val_steps"], row["val_padding"] = plan.steps, plan.padding
  if evaluate:
    report = evaluate_lib.evaluate(run_dir, split="test", n_resamples=20, write_plots=False)
    row["test_counted"] = int(sum(report["class_counts"].values()))
    row["test_examples"] = int(manifest["splits"]["test"]["num_examples"])
  if export:
    path = export_lib.export(run_dir)
    spec = input_pipeline.InputSpec(image_size=32, channels=0, aspect="squash")
    ds = input_pipeline.eval_dataset(data_dir, "test", spec, batch_size=64, label_mode="binary")
    x, _ = next(iter(ds))
    want = np.asarray(r.model(x, training=False), np.float32).reshape(-1)
    from benchmarks import stored  # noqa: PLC0415 - the records' bytes, in manifest order
    got = export_lib.serve(path, stored.encoded_images(data_dir, "test"))[:, -1]
    row["export_max_gap"] = float(np.max(np.abs(got - want)))
  return row


def main(argv):
  del argv
  _split_cpu(_CPUS.value)
  rows = []
  for combo in _COMBOS.value:
    row = run_combo(combo, _DATA.value, _OUT.value, _BATCH.value, _EVALUATE.value,
                    combo in _EXPORT.value)
    print("ROW " + json.dumps(row), flush=True)
    rows.append(row)
  print("RESULT " + json.dumps(rows), flush=True)


if __name__ == "__main__":
  sys.exit(app.run(main))
