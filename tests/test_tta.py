"""Test-time augmentation (evaluate --tta): radiograph-safe views, averaged by the one way of
calling a model (model_call.InferenceModule), recorded in threshold.json and applied alike by
evaluate, predict and the exported SavedModel."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests._runs import copy_run
from xraytpu import config
from xraytpu.evaluation import evaluate_lib
from xraytpu.inference import export_lib, model_call, predict_lib, tta
from xraytpu.run import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(n_resamples=20, write_plots=False)


def _asymmetric(batch: int = 3, size: int = 32, channels: int = 1) -> np.ndarray:
  """uint8 [B, S, S, C] films that differ from their left-right and up-down mirrors: a bright
  'heart' left of centre and a ramp from top to bottom."""
  y, x = np.mgrid[:size, :size]
  base = 40 + 120 * y / size + 90 * ((x - 0.3 * size) ** 2 + (y - 0.6 * size) ** 2 < (0.15 * size) ** 2)
  imgs = [np.clip(base + 7 * b, 0, 255) for b in range(batch)]
  return np.repeat(np.stack(imgs)[..., None], channels, axis=-1).astype(np.uint8)


def test_views_are_deterministic_in_the_image_and_never_flip():
  import tensorflow as tf
  assert config.TTA_PRESETS[config.DEFAULT_TTA] == ("identity",)
  assert set(config.TTA_PRESETS) == {"none", "zoom", "shift"}
  for size in (28, 32, 224, 513):
    for name in config.TTA_VIEWS:
      top, left, side = tta.crop_box(name, size)
      assert 0 <= top and 0 <= left and top + side <= size and left + side <= size   # no border
      assert side >= 0.9 * size   # small changes only
  x = _asymmetric()
  for name in config.TTA_VIEWS:
    a = tta.view(tf.constant(x), name, 32).numpy()
    assert a.dtype == np.uint8 and a.shape == x.shape
    np.testing.assert_array_equal(a, tta.view(tf.constant(x), name, 32).numpy())   # deterministic
    d = lambda u, v: np.abs(u.astype(float) - v.astype(float)).mean()  # noqa: E731
    for mirror in (x[:, :, ::-1], x[:, ::-1]):   # left-right, up-down
      assert d(a, x) < d(a, mirror), name
  # A view is the crop resized by the pixel contract's own resize, image by image.
  from tfrecord_tools import pixels
  rgb = np.random.default_rng(0).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
  top, left, side = tta.crop_box("right", 40)
  want = np.stack([pixels.resize_image(im[top:top + side, left:left + side], 40).numpy() for im in rgb])
  np.testing.assert_array_equal(tta.view(tf.constant(rgb), "right", 40).numpy(), want)
  with pytest.raises(tta.TTAError, match="unknown test-time augmentation 'flip'"):
    tta.views_of("flip")


def _tiny_module(k: int, multi_label: bool, name: str) -> model_call.InferenceModule:
  from xraytpu._keras import keras
  inp = keras.Input((32, 32, 1), dtype="uint8")
  h = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255.0)(inp))
  out = keras.layers.Dense(k, activation="sigmoid" if multi_label else "softmax",
                           kernel_initializer=keras.initializers.RandomNormal(stddev=0.05, seed=1))(h)
  return model_call.InferenceModule(keras.Model(inp, out), classes=[f"c{i}" for i in range(k)],
                                    size=32, channels=1, aspect="squash", conversion={},
                                    multi_label=multi_label, tta=name)


def _by_hand(model, x, name: str) -> np.ndarray:
  """The mean over the views of model(view(x)), one model call per view."""
  import tensorflow as tf
  outs = [model(tta.view(tf.constant(x), v, 32), training=False).numpy()
          for v in config.TTA_PRESETS[name]]
  return np.mean(outs, axis=0)


@pytest.mark.parametrize("multi_label", [False, True], ids=["multiclass", "multilabel"])
def test_raw_is_the_mean_of_the_model_over_the_views(multi_label):
  import tensorflow as tf
  x = _asymmetric(4)
  for name in ("zoom", "shift"):
    m = _tiny_module(3, multi_label, name)
    raw = m.raw(tf.constant(x)).numpy()
    np.testing.assert_allclose(raw, _by_hand(m.model, x, name), atol=1e-6)
    assert not np.allclose(raw, m.model(tf.constant(x)).numpy(), atol=1e-6)   # the views count
    probs = m.predict_batches(x, batch_size=3)["probabilities"]   # batches of any size alike
    np.testing.assert_allclose(probs, raw, atol=1e-6)
    if not multi_label:
      np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)


def _real_files(shared_data) -> list[str]:
  """Real films: 28x28 8-bit PNGs and a 400x300 JPEG radiograph."""
  pngs = sorted(glob.glob(str(shared_data / "pneumoniamnist28" / "test" / "*" / "*.png")))
  jpegs = sorted(glob.glob(str(shared_data / "chest_xray_400x300" / "*" / "*.jpeg")))
  return pngs[:1] + pngs[-1:] + jpegs[:1]


def test_evaluate_tta_is_recorded_and_predict_and_export_apply_it(trained_run, shared_data, tmp_path):
  import tensorflow as tf
  run_dir = copy_run(trained_run, tmp_path)
  report = evaluate_lib.evaluate(run_dir, split="test", tta="shift", **FAST)
  op = rundir.read_operating_point(run_dir)
  assert op["tta"] == "shift" and report["tta"] == "shift"
  assert json.load(open(os.path.join(report["report_dir"], "report.json")))["tta"] == "shift"
  assert "test-time augmentation: `shift`" in open(os.path.join(report["report_dir"], "report.md")).read()
  card = open(rundir.path(run_dir, rundir.MODEL_CARD)).read()
  assert "test-time augmentation `shift`" in card and "6 views" in card

  # A loaded run calls its model with the views: val (where the threshold is chosen) too.
  run = predict_lib.load(run_dir)
  assert run.tta == "shift" and model_call.module_of(run).tta == "shift"
  val = evaluate_lib.predict_split(run, run.cfg.data_dir, "val")
  images = np.stack([val.images[i] for i in sorted(val.images)])
  np.testing.assert_allclose(val.raw, _by_hand(run.model, images, "shift"), atol=1e-6)
  plain = model_call.InferenceModule.from_run(run, tta="none").raw(tf.constant(images)).numpy()
  assert not np.allclose(val.raw, plain, atol=1e-6)

  # predict and the SavedModel (the views inside its graph) agree on real file bytes.
  files = _real_files(shared_data)
  got = predict_lib.predict_files(run, files)
  assert all(r.error is None for r in got)
  predicted = np.array([[r.probabilities[c] for c in run.classes] for r in got])
  pix = np.stack([model_call.module_of(run).file_pixels(open(f, "rb").read()) for f in files])
  np.testing.assert_allclose(predicted[:, 1], _by_hand(run.model, pix, "shift")[:, 0], atol=1e-6)
  path = export_lib.export(run_dir)
  assert export_lib.load_metadata(path)["tta"] == "shift"
  served = tf.saved_model.load(path).signatures["serving_default"]
  out = served(image_bytes=tf.constant([open(f, "rb").read() for f in files]))
  np.testing.assert_allclose(out["probabilities"].numpy(), predicted, atol=1e-6)

  # Without --tta the recorded one is kept; --tta=none chooses the operating point again.
  # Kept silently would surprise (a later --threshold_policy run still averages views): a note.
  kept = evaluate_lib.evaluate(run_dir, split="val", **FAST)
  assert rundir.read_operating_point(run_dir) == op
  assert any("'shift' kept from threshold.json" in n and "--tta=none" in n for n in kept["notes"])
  report = evaluate_lib.evaluate(run_dir, split="val", tta="none", **FAST)
  assert rundir.read_operating_point(run_dir)["tta"] == "none" and report["tta"] == "none"
  assert not any("kept from threshold.json" in n for n in report["notes"])


def test_without_tta_the_model_is_called_as_before(trained_run, tmp_path):
  import tensorflow as tf
  run_dir = copy_run(trained_run, tmp_path)
  report = evaluate_lib.evaluate(run_dir, split="test", **FAST)
  assert rundir.read_operating_point(run_dir)["tta"] == "none" and report["tta"] == "none"
  assert "test-time augmentation" not in open(os.path.join(report["report_dir"], "report.md")).read()
  run = predict_lib.load(run_dir)
  test = evaluate_lib.predict_split(run, run.cfg.data_dir, "test")
  images = np.stack([test.images[i] for i in sorted(test.images)])
  # What InferenceModule._raw was before --tta: the model in a tf.function (graph numbers,
  # which differ from eager's in the last bit).
  before = tf.function(lambda x: tf.cast(run.model(x, training=False), tf.float32))
  np.testing.assert_array_equal(test.raw, before(tf.constant(images)).numpy())   # bit-identical
  # A threshold.json written before --tta existed (no "tta") is the same.
  op = rundir.read_operating_point(run_dir)
  del op["tta"]
  rundir.write_operating_point(run_dir, op)
  assert predict_lib.load(run_dir).tta == "none"


def test_a_bad_tta_is_one_line(trained_run, tmp_path):
  run_dir = copy_run(trained_run, tmp_path)
  with pytest.raises(evaluate_lib.EvaluateError, match="--tta=flip: choose one of none, zoom, shift"):
    evaluate_lib.evaluate(run_dir, tta="flip", **FAST)
  rundir.write_operating_point(run_dir, {"threshold": 0.5, "policy": "youden", "tta": "flip"})
  with pytest.raises(tta.TTAError, match="unknown test-time augmentation 'flip'"):
    model_call.module_of(predict_lib.load(run_dir))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  bad = subprocess.run([sys.executable, "-m", "xraytpu.evaluate", f"--model_dir={run_dir}",
                        "--tta=flip"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "Traceback" not in bad.stderr
  lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and "--tta" in lines[0] and "flip" in lines[0], bad.stderr
