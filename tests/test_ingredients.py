"""Training ingredients (issue 25, item 2): --ema_decay, --mixup_alpha / --cutmix_alpha,
--label_smoothing and the radiograph-safe augmentation preset each change what they claim,
and one tiny real training with all of them on (mirrored over 2 logical CPUs, bfloat16,
steps_per_execution 2) evaluates and exports through the normal path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from xraytpu._keras import keras
from xraytpu.config import Config
from xraytpu.data import augment, input_pipeline
from xraytpu.training import callbacks, inputs, multilabel, train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(b=4, s=16, seed=0):
  rng = np.random.RandomState(seed)
  return tf.constant(rng.randint(0, 256, (b, s, s, 1)).astype(np.uint8))


# ---- mixup / cutmix ----------------------------------------------------------------------

def test_mixup_labels_are_convex_combinations_and_images_mix_with_the_same_lambda():
  images = _batch()
  labels = tf.one_hot([0, 1, 2, 3], 4)            # every film's partner (reversed batch) differs
  out, mixed = augment.mixup(images, labels, 1.0, seed=1)
  assert out.dtype == tf.uint8 and out.shape == images.shape
  x, y, m = images.numpy().astype(np.float32), labels.numpy(), mixed.numpy()
  lams = []
  for i in range(4):
    j = 3 - i
    lam = m[i, i]
    lams.append(lam)
    np.testing.assert_allclose(m[i], lam * y[i] + (1 - lam) * y[j], atol=1e-6)
    np.testing.assert_allclose(out.numpy()[i], np.round(lam * x[i] + (1 - lam) * x[j]), atol=1.0)
  assert np.all((np.array(lams) >= 0) & (np.array(lams) <= 1))
  assert np.allclose(m.sum(-1), 1.0) and len({round(float(v), 4) for v in lams}) > 1   # per film


def test_cutmix_pastes_a_box_and_weighs_labels_by_its_area():
  images = tf.constant(np.arange(1, 5, dtype=np.uint8)[:, None, None, None] * np.ones((1, 16, 16, 1), np.uint8) * 40)
  labels = tf.constant([[1.0], [0.0], [1.0], [0.0]])   # binary [b, 1]; partners 0<->3, 1<->2
  pasted = 0
  for seed in range(4):
    out, mixed = augment.cutmix(images, labels, 1.0, seed=seed)
    o = out.numpy()[..., 0]
    for i in range(4):
      j = 3 - i
      inside = o[i] == (j + 1) * 40
      assert np.all(inside | (o[i] == (i + 1) * 40))   # only its own pixels and the partner's
      area = int(inside.sum())
      if area:
        rows, cols = np.where(inside)
        box = inside[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all() and box.size == area      # one axis-aligned box
        pasted += 1
      lam = 1.0 - area / 256.0
      want = lam * labels.numpy()[i, 0] + (1 - lam) * labels.numpy()[j, 0]
      assert mixed.numpy()[i, 0] == pytest.approx(want, abs=1e-6)
  assert pasted > 0


def test_multi_label_mixing_mixes_multi_hot_and_keeps_only_entries_known_in_both():
  hot = tf.constant([[1.0, 0.0], [0.0, 1.0]])
  mask = tf.constant([[1.0, 1.0], [1.0, 0.0]])
  y = input_pipeline.multi_label_targets(hot, mask)
  out = augment.mix_labels(y, tf.constant([0.25, 0.75]), multi_label=True).numpy()
  np.testing.assert_allclose(out[0], [0.25, 0.75, 1.0, 0.0])
  np.testing.assert_allclose(out[1], [0.25, 0.75, 1.0, 0.0])


def test_the_training_pipeline_mixes_labels_and_keeps_uint8_images(demo_data_dir):
  spec = input_pipeline.InputSpec(image_size=16, channels=0, aspect="squash", seed=0,
                                  mixup_alpha=0.4, cutmix_alpha=1.0)
  ds = input_pipeline.train_dataset(demo_data_dir, spec, global_batch=16, label_mode="binary")
  soft = 0
  for x, y in ds.take(3):
    assert x.dtype == tf.uint8 and y.shape == (16, 1)
    y = y.numpy()
    assert np.all((y >= 0) & (y <= 1))
    soft += int(np.sum((y > 1e-6) & (y < 1 - 1e-6)))
  assert soft > 0
  # Evaluation never mixes.
  ev = input_pipeline.eval_dataset(demo_data_dir, "val", spec, batch_size=8, label_mode="binary")
  assert set(np.unique(next(iter(ev))[1].numpy())) <= {0.0, 1.0}


def test_class_weights_of_a_soft_binary_label_are_proportional():
  fn = inputs._class_weight_fn({0: 1.0, 1: 3.0}, 2)   # noqa: SLF001
  _, _, w = fn(tf.zeros([3, 2, 2, 1]), tf.constant([[0.0], [1.0], [0.25]]))
  np.testing.assert_allclose(w.numpy(), [1.0, 3.0, 1.5])


# ---- label smoothing -------------------------------------------------------------------

def _bce(y, p):
  return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


def test_label_smoothing_changes_the_loss_as_the_formula_says():
  ls = 0.2
  y, p = np.array([[1.0], [0.0]]), np.array([[0.9], [0.3]], np.float32)
  got = float(train_lib.make_loss(2, ls)(y, p))
  assert got == pytest.approx(_bce(y * (1 - ls) + 0.5 * ls, p), rel=1e-4)
  assert got != pytest.approx(float(train_lib.make_loss(2, 0.0)(y, p)), rel=1e-3)
  # K classes: towards 1/K.
  y3, p3 = np.eye(3)[[0, 2]], np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32)
  smooth = y3 * (1 - ls) + ls / 3
  want = float(np.mean(-(smooth * np.log(p3)).sum(-1)))
  assert float(train_lib.make_loss(3, ls)(y3, p3)) == pytest.approx(want, rel=1e-4)
  # Multi-label: towards 0.5, ignored entries still ignored.
  yml = input_pipeline.multi_label_targets(tf.constant([[1.0, 0.0]]), tf.constant([[1.0, 0.0]]))
  pml = np.array([[0.8, 0.01]], np.float32)
  loss = multilabel.MaskedBinaryCrossentropy(label_smoothing=ls)(yml, pml)
  assert float(loss) == pytest.approx(_bce(np.array([1 - ls / 2]), np.array([0.8])), rel=1e-4)


# ---- the radiograph preset ---------------------------------------------------------------

def _flipped(preset: str) -> int:
  """How many of 64 augmented copies of a top-left-bright film came out mirrored."""
  cfg = Config(augment=preset, seed=5).resolve_augment()
  img = np.zeros((64, 32, 32, 1), np.float32)
  img[:, :12, :10] = 255.0                              # bright top-left corner: asymmetric both ways
  out = augment.build_augmentation(cfg)(tf.constant(img), training=True).numpy()[..., 0]
  left, right = out[:, :, :16].mean((1, 2)), out[:, :, 16:].mean((1, 2))
  top, bottom = out[:, :16].mean((1, 2)), out[:, 16:].mean((1, 2))
  return int(np.sum((right > left) | (bottom > top)))


def test_the_radiograph_preset_never_flips():
  cfg = Config().resolve_augment()
  assert cfg.augment == "light" and not cfg.horizontal_flip and not cfg.vertical_flip
  assert cfg.rotation_range and cfg.zoom_range and cfg.width_shift_range and cfg.brightness_range
  assert _flipped("light") == 0
  assert _flipped("tutorial") > 0          # the check sees a flip when there is one


# ---- EMA -----------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_ema_weights_are_validated_and_saved_and_differ_from_the_raw_weights(tmp_path, policy):
  keras.mixed_precision.set_global_policy(policy)
  try:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid",
                                                                    dtype="float32")])
    opt = train_lib.make_optimizer("sgd", 0.5, ema_decay=0.9)
    if policy == "mixed_float16":
      opt = keras.mixed_precision.LossScaleOptimizer(opt)
    model.compile(optimizer=opt, loss="binary_crossentropy")
    rng = np.random.RandomState(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x[:, :1] > 0).astype(np.float32)
    seen = {}

    class Spy(keras.callbacks.Callback):
      def on_test_begin(self, logs=None):
        seen["validated"] = [v.numpy().copy() for v in self.model.trainable_variables]

      def on_epoch_end(self, epoch, logs=None):
        seen["raw"] = [v.numpy().copy() for v in self.model.trainable_variables]
        inner = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)
        seen["ema"] = [v.numpy().copy() for v in inner._model_variables_moving_average]  # noqa: SLF001
        seen["val_loss"] = logs["val_loss"]

    class Monitor(keras.callbacks.Callback):   # a "higher is better" monitor for BestCheckpoint
      def on_epoch_end(self, epoch, logs=None):
        logs["val_neg"] = -logs["val_loss"]

    best = str(tmp_path / "best.weights.h5")
    model.fit(x, y, batch_size=8, epochs=1, validation_data=(x, y), verbose=0,
              callbacks=[callbacks.EmaValidation(), Spy(), Monitor(),
                         callbacks.BestCheckpoint(best, "val_neg", None, True,
                                                  callbacks.StopOnNaN())])
    for r, e, v in zip(seen["raw"], seen["ema"], seen["validated"]):
      np.testing.assert_allclose(v, e, rtol=1e-6)           # validation saw the averages
      assert not np.allclose(r, e)                          # ... which are not the raw weights
    saved = keras.models.clone_model(model)
    saved.load_weights(best)
    for s, e in zip(saved.get_weights(), seen["ema"]):
      np.testing.assert_allclose(s, e, rtol=1e-6)           # the best checkpoint holds them
    for w, e in zip(model.get_weights(), seen["ema"]):
      np.testing.assert_allclose(w, e, rtol=1e-6)           # and the model after fit (model.keras)
    assert float(model.evaluate(x, y, verbose=0)) == pytest.approx(seen["val_loss"], rel=1e-4)
  finally:
    keras.mixed_precision.set_global_policy("float32")


def test_ingredient_flags_are_checked():
  for kw, flag in [(dict(ema_decay=1.0), "--ema_decay"), (dict(mixup_alpha=-1.0), "--mixup_alpha"),
                   (dict(cutmix_alpha=-0.5), "--cutmix_alpha")]:
    with pytest.raises(train_lib.TrainError, match=flag):
      train_lib.validate_config(Config(data_dir="d", model_dir="m", **kw))


# ---- one tiny real training with everything on -------------------------------------------

_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from tests import _matrix
    _matrix._split_cpu(2)
    from xraytpu.config import Config
    from xraytpu.training import train_lib
    from xraytpu.evaluation import evaluate_lib
    from xraytpu.inference import export_lib
    from xraytpu.data import input_pipeline
    from benchmarks import stored
    data, run = sys.argv[1], sys.argv[2]
    cfg = Config(data_dir=data, model_dir=run, model="xray_cnn", image_size=32, batch_size=8,
                 epochs=1, cache="off", seed=0, strategy="mirrored", mixed_precision="bfloat16",
                 steps_per_execution=2, ema_decay=0.9, mixup_alpha=0.4, cutmix_alpha=1.0,
                 label_smoothing=0.1, augment="light").resolve_augment()
    r = train_lib.train_and_evaluate(cfg, verbose=0)
    plain = _matrix._plain_val_metrics(r.model, data, 8)
    spec = input_pipeline.InputSpec(image_size=32, channels=0, aspect="squash")
    xv, yv = next(iter(input_pipeline.eval_dataset(data, "val", spec, batch_size=64,
                                                    label_mode="binary")))
    plain["val_loss"] = float(train_lib.make_loss(2, 0.1)(yv, r.model(xv, training=False)))
    report = evaluate_lib.evaluate(run, split="test", n_resamples=20, write_plots=False)
    path = export_lib.export(run)
    x, _ = next(iter(input_pipeline.eval_dataset(data, "test", spec, batch_size=64,
                                                  label_mode="binary")))
    want = np.asarray(r.model(x, training=False), np.float32).reshape(-1)
    got = export_lib.serve(path, stored.encoded_images(data, "test"))[:, -1]
    print("RESULT " + json.dumps({
        "replicas": r.strategy.replicas, "policy": json.load(open(run + "/config.json"))["run"]["mixed_precision_policy"],
        "history": r.history[-1], "plain": plain,
        "counted": int(sum(report["class_counts"].values())),
        "export_gap": float(np.max(np.abs(got - want)))}))
""")


def test_one_tiny_training_with_every_ingredient_evaluates_and_exports(demo_data_dir, tmp_path):
  # Not `trained_run`: that run has no ingredient on. A subprocess, because two logical CPU
  # devices (MirroredStrategy over 2 replicas) must be set before TensorFlow starts.
  run = str(tmp_path / "run")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
  env.pop("TF_CONFIG", None)
  proc = subprocess.run([sys.executable, "-c", _CHILD, demo_data_dir, run], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
  assert out["replicas"] == 2 and out["policy"] == "mixed_bfloat16"
  assert np.isfinite(out["history"]["loss"]) and np.isfinite(out["history"]["val_loss"])
  # The logged validation (with label smoothing) is the final, averaged model's: the same loss
  # in one plain pass (bfloat16's tolerance, as tests/test_matrix.py's).
  assert out["plain"]["val_loss"] == pytest.approx(out["history"]["val_loss"], abs=3e-3), out
  assert out["counted"] == 8 and out["export_gap"] < 0.02
  cfg = json.load(open(os.path.join(run, "config.json")))
  assert cfg["status"] == "finished"
  assert (cfg["ema_decay"], cfg["mixup_alpha"], cfg["cutmix_alpha"], cfg["label_smoothing"]) == \
      (0.9, 0.4, 1.0, 0.1)
