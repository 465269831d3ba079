"""xraytpu.train / train_lib: the run directory, resume after a kill, fine-tuning, real data."""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from xraytpu import models

from xraytpu.run import rundir

from xraytpu.training import train_lib
from xraytpu._keras import keras
from xraytpu.config import Config
from xraytpu.models import applications

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(data_dir: str, model_dir: str, **kw) -> Config:
  base = dict(data_dir=data_dir, model_dir=model_dir, model="xray_cnn", image_size=32,
              batch_size=8, epochs=1, augment="none", cache="memory", seed=0)
  base.update(kw)
  return Config(**base).resolve_augment()


def _history(run_dir: str) -> list[dict]:
  with open(os.path.join(run_dir, "history.csv")) as f:
    return list(csv.DictReader(f))


# ---------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------

def test_run_dir_layout_config_and_load_run(demo_data_dir, tmp_path):
  run = str(tmp_path / "run")
  cfg = _cfg(demo_data_dir, run, epochs=2, augment="light", lr_schedule="cosine", warmup_epochs=0.5,
             steps_per_execution=2, label_smoothing=0.1)
  result = train_lib.train_and_evaluate(cfg, verbose=0)

  for name in ("config.json", "dataset.json", "history.csv", "model.keras", "checkpoints/best.weights.h5"):
    assert os.path.isfile(os.path.join(run, name)), name
  assert not os.path.exists(os.path.join(run, "backup"))  # removed once the run is complete
  assert glob.glob(os.path.join(run, "logs", "train", "events.out.tfevents.*"))
  assert glob.glob(os.path.join(run, "logs", "validation", "events.out.tfevents.*"))

  doc = json.load(open(os.path.join(run, "config.json")))
  assert doc["status"] == "finished"
  assert Config.from_dict(doc) == result.config  # resolved fields at top level
  assert doc["channels"] == 1 and doc["steps_per_epoch"] == 44 // 8
  info = doc["run"]
  assert info["replicas"] == 1 and info["global_batch"] == 8 and info["per_replica_batch"] == 8
  assert info["strategy"]["cls"] == "_DefaultDistributionStrategy"
  with open(os.path.join(demo_data_dir, "dataset.json"), "rb") as f:
    assert info["manifest"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
  assert info["params"]["total"] == result.model.count_params()
  assert {"tensorflow", "tf_keras", "numpy", "xraytpu"} <= set(info["versions"])
  assert info["epochs_trained"] == 2 and info["best"]["monitor"] == "val_auc"

  rows = _history(run)
  assert [int(r["epoch"]) for r in rows] == [0, 1]
  for col in ("loss", "accuracy", "precision", "recall", "auc", "pr_auc", "val_auc", "val_pr_auc",
              "lr", "images_per_sec"):
    assert col in rows[0], col
  assert float(rows[0]["images_per_sec"]) > 0
  assert float(rows[0]["lr"]) < float(rows[1]["lr"]) or float(rows[1]["lr"]) < cfg.learning_rate  # schedule moves

  final = rundir.load(run, weights="final")
  cfg2, manifest, model = final.cfg, final.manifest, final.model
  assert cfg2 == result.config and manifest["classes"] == ["NORMAL", "PNEUMONIA"]
  x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
  np.testing.assert_allclose(model.predict(x, verbose=0), result.model.predict(x, verbose=0), rtol=1e-5)
  best = rundir.load(run).model  # weights of the best val_auc epoch
  assert best.predict(x, verbose=0).shape == (3, 1)
  assert isinstance(keras.models.load_model(os.path.join(run, "model.keras")), keras.Model)

  # A finished run is kept ...
  with pytest.raises(train_lib.TrainError, match="finished run; pass --overwrite"):
    train_lib.train_and_evaluate(cfg, verbose=0)
  # ... unless --overwrite: the old outputs go (the old model's operating point
  # included), the folder stays.
  with open(os.path.join(run, "threshold.json"), "w") as f:
    f.write('{"threshold": 0.35}')
  assert train_lib.prepare_run_dir(dataclasses.replace(result.config, overwrite=True)) == "fresh"
  assert os.path.isdir(run) and not os.path.exists(os.path.join(run, "model.keras"))
  assert not os.path.exists(os.path.join(run, "threshold.json"))


def test_unfinished_run_with_other_settings_is_refused(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  old = Config(data_dir="d", model_dir=str(run), epochs=3)
  (run / "config.json").write_text(json.dumps({**old.to_dict(), "status": "running"}))
  assert train_lib.prepare_run_dir(dataclasses.replace(old, strategy="mirrored")) == "resume"
  with pytest.raises(train_lib.TrainError, match=r"other settings \(epochs: 3 -> 5\)"):
    train_lib.prepare_run_dir(dataclasses.replace(old, epochs=5))
  assert train_lib.prepare_run_dir(dataclasses.replace(old, epochs=5, overwrite=True)) == "fresh"
  assert not (run / "config.json").exists()


@pytest.mark.parametrize("kw,message", [
    (dict(data_dir=""), "--data_dir is required"),
    (dict(model="nope"), "unknown model"),
    (dict(weights="imagenet"), "applies to backbone models"),
    (dict(fine_tune_at=10, fine_tune_epochs=1), "apply to backbone models"),
    (dict(model="resnet50", fine_tune_at=10), "fine-tuning needs both"),
    (dict(reduce_lr_patience=2, lr_schedule="cosine"), "needs --lr_schedule=constant"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(steps_per_epoch=-1), "steps_per_epoch must be >= 0"),
])
def test_bad_flag_combinations(kw, message):
  cfg = dataclasses.replace(Config(data_dir="d", model_dir="m"), **kw)
  with pytest.raises(train_lib.TrainError, match=message):
    train_lib.validate_config(cfg)


def test_learning_rate_schedules():
  s = train_lib.WarmupSchedule(1.0, "cosine", warmup_steps=10, total_steps=110, steps_per_epoch=10)
  assert float(s(0)) == pytest.approx(0.1) and float(s(9)) == pytest.approx(1.0)
  assert float(s(10)) == pytest.approx(1.0) and float(s(60)) == pytest.approx(0.5, abs=1e-5)
  assert float(s(110)) == pytest.approx(0.0, abs=1e-6)
  e = train_lib.WarmupSchedule(1.0, "exponential", warmup_steps=0, total_steps=1000, steps_per_epoch=10)
  assert float(e(200)) == pytest.approx(0.1, rel=1e-4)  # x0.1 per 20 epochs, as in the Keras TPU example
  assert train_lib.make_learning_rate(Config(), 10) == Config().learning_rate  # constant stays a float


def test_nan_loss_stops_with_a_clear_message(demo_data_dir, tmp_path, monkeypatch):
  import tensorflow as tf
  monkeypatch.setattr(train_lib, "make_loss",
                      lambda *a, **k: lambda y, p: tf.reduce_mean(p) * float("nan"))
  run = str(tmp_path / "run")
  with pytest.raises(train_lib.TrainingDiverged, match="loss became NaN/inf in epoch 1"):
    train_lib.train_and_evaluate(_cfg(demo_data_dir, run, epochs=3), verbose=0)
  assert json.load(open(os.path.join(run, "config.json")))["status"] == "failed"   # diverged
  assert not os.path.exists(os.path.join(run, "model.keras"))


# ---------------------------------------------------------------------------
# Two phases (frozen backbone, then fine-tuning) with a resume inside phase 2
# ---------------------------------------------------------------------------

def _tiny_backbone(include_top=False, weights=None, input_shape=None):
  """A 3-layer stand-in for a keras.applications model (same call signature)."""
  layers = keras.layers
  inp = keras.Input(input_shape)
  x = layers.Conv2D(8, 3, strides=2, activation="relu")(inp)
  x = layers.BatchNormalization()(x)
  x = layers.Conv2D(8, 3, strides=2, activation="relu")(x)
  return keras.Model(inp, x)


class _Preempted(Exception):
  pass


def test_two_phases_and_resume_in_phase_two(demo_data_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(applications.BACKBONES, "tiny",
                      applications.Backbone(_tiny_backbone, "tf", 16, "simple"))
  monkeypatch.setitem(models.MODELS, "tiny", applications.builder("tiny"))
  weights = str(tmp_path / "tiny.weights.h5")
  _tiny_backbone(input_shape=(32, 32, 3)).save_weights(weights)
  run = str(tmp_path / "run")
  cfg = _cfg(demo_data_dir, run, model="tiny", weights=weights, epochs=1, fine_tune_at=2,
             fine_tune_epochs=2, fine_tune_learning_rate=1e-4)

  real_make_callbacks = train_lib.make_callbacks
  seen = {}

  def crash_in_phase_two(*args, **kw):
    cbs = real_make_callbacks(*args, **kw)

    class Crash(keras.callbacks.Callback):
      def on_train_begin(self, logs=None):
        seen[kw["phase"]] = [layer.trainable for layer in self.model.get_layer("backbone").layers]

      def on_epoch_end(self, epoch, logs=None):
        if kw["phase"] == 2:
          raise _Preempted()  # after BackupAndRestore saved this epoch
    return cbs + [Crash()]

  monkeypatch.setattr(train_lib, "make_callbacks", crash_in_phase_two)
  with pytest.raises(_Preempted):
    train_lib.train_and_evaluate(cfg, verbose=0)
  assert seen[1] == [False] * 4  # pretrained backbone frozen in phase 1 (Input + 3 layers)
  assert seen[2] == [False, False, True, True]  # unfrozen from --fine_tune_at=2
  before = _history(run)
  assert [int(r["epoch"]) for r in before] == [0, 1]

  monkeypatch.setattr(train_lib, "make_callbacks", real_make_callbacks)
  result = train_lib.train_and_evaluate(cfg, verbose=0)
  after = _history(run)
  assert [int(r["epoch"]) for r in after] == [0, 1, 2]
  assert after[:2] == before  # neither phase 1 nor the first phase-2 epoch was redone
  assert float(after[2]["lr"]) == pytest.approx(1e-4)
  assert json.load(open(os.path.join(run, "config.json")))["run"]["epochs_trained"] == 3
  assert result.model.get_layer("backbone").layers[-1].trainable


def test_resume_keeps_the_patience_counters(demo_data_dir, tmp_path, monkeypatch):
  """EarlyStopping / ReduceLROnPlateau pick up where they were, not from zero."""
  run = str(tmp_path / "run")
  cfg = _cfg(demo_data_dir, run, epochs=6, early_stopping_patience=5, reduce_lr_patience=4)
  real_make_callbacks = train_lib.make_callbacks
  at_crash, at_resume = {}, {}
  plateau_types = (keras.callbacks.EarlyStopping, keras.callbacks.ReduceLROnPlateau)

  class FlatValAuc(keras.callbacks.Callback):
    """Shows the plateau callbacks a val_auc that never improves: their counters
    then grow by one per epoch, whatever the model learns."""
    def on_epoch_end(self, epoch, logs=None):
      logs["val_auc"] = 0.5

  def counters(cbs):
    return {type(cb).__name__: (cb.wait, float(cb.best)) for cb in cbs
            if isinstance(cb, plateau_types)}

  def with_flat_val_auc(*args, **kw):
    cbs = real_make_callbacks(*args, **kw)
    first = next(i for i, cb in enumerate(cbs) if isinstance(cb, plateau_types))
    return cbs[:first] + [FlatValAuc()] + cbs[first:]

  def crash_after_epoch_three(*args, **kw):
    cbs = with_flat_val_auc(*args, **kw)

    class Crash(keras.callbacks.Callback):
      def on_epoch_end(self, epoch, logs=None):
        if epoch == 2:
          at_crash.update(counters(cbs))
          raise _Preempted()  # after BackupAndRestore and PlateauState saved this epoch
    return cbs + [Crash()]

  monkeypatch.setattr(train_lib, "make_callbacks", crash_after_epoch_three)
  with pytest.raises(_Preempted):
    train_lib.train_and_evaluate(cfg, verbose=0)
  assert at_crash == {"EarlyStopping": (2, 0.5), "ReduceLROnPlateau": (2, 0.5)}

  def spy(*args, **kw):
    cbs = with_flat_val_auc(*args, **kw)

    class Spy(keras.callbacks.Callback):
      def on_train_begin(self, logs=None):
        at_resume.update(counters(cbs))
    return cbs + [Spy()]

  monkeypatch.setattr(train_lib, "make_callbacks", spy)
  result = train_lib.train_and_evaluate(cfg, verbose=0)
  assert at_resume == at_crash
  # Patience 5 counted from the restored 2: epochs 4-6 bring it to 5, the run stops at 6.
  assert len(result.history) == 6


# ---------------------------------------------------------------------------
# The command line: kill -9, run again, same epoch count
# ---------------------------------------------------------------------------

def _train_cmd(flagfile: str) -> list[str]:
  return [sys.executable, "-m", "xraytpu.train", f"--flagfile={flagfile}"]


def _env():
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
  return env


@pytest.mark.slow
def test_kill_and_resume_from_the_command_line(demo_data_dir, tmp_path):
  run = tmp_path / "run"
  flagfile = tmp_path / "train.flags"
  flagfile.write_text("\n".join([
      f"--data_dir={demo_data_dir}", f"--model_dir={run}", "--model=xray_cnn", "--image_size=32",
      "--batch_size=8", "--epochs=3", "--steps_per_epoch=20", "--augment=light", "--seed=1", ""]))
  log = open(tmp_path / "first.log", "w")
  proc = subprocess.Popen(_train_cmd(str(flagfile)), cwd=ROOT, env=_env(), stdout=log,
                          stderr=subprocess.STDOUT)
  backup_index = str(run / "backup" / "phase1" / "**" / "checkpoint")  # BackupAndRestore's index file
  deadline = time.time() + 240
  try:
    # Wait until epoch 1 is in history.csv and backed up, then kill -9.
    while time.time() < deadline and proc.poll() is None:
      if glob.glob(backup_index, recursive=True) and (run / "history.csv").exists() and _history(str(run)):
        break
      time.sleep(0.1)
    assert proc.poll() is None, f"training ended before it could be killed:\n{open(tmp_path / 'first.log').read()[-3000:]}"
    assert time.time() < deadline, "the first epoch never finished"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait(timeout=30)
  killed_rows = _history(str(run))
  assert 1 <= len(killed_rows) < 3 and not (run / "model.keras").exists()

  second = subprocess.run(_train_cmd(str(flagfile)), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Resuming at epoch" in second.stderr
  rows = _history(str(run))
  assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
  assert rows[0] == killed_rows[0]  # epoch 1 was not trained again
  for name in ("config.json", "model.keras", "checkpoints/best.weights.h5", "dataset.json"):
    assert (run / name).is_file(), name
  assert json.loads((run / "config.json").read_text())["status"] == "finished"

  # The same command once more: the finished run is refused with one line, exit 2.
  third = subprocess.run(_train_cmd(str(flagfile)), cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300)
  assert third.returncode == 2
  last = third.stderr.strip().splitlines()[-1]
  assert last.startswith("xraytpu.train: error:") and "finished run; pass --overwrite" in last
  assert "Traceback" not in third.stderr


# ---------------------------------------------------------------------------
# Real data: chest X-rays, NORMAL vs PNEUMONIA
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_real_chest_xray_training_beats_chance(shared_data, tmp_path):
  """chest_xray_400x300 (Normal vs Bacterial+Viral pneumonia), 32 px, 4 epochs: val AUC >= 0.85."""
  from sklearn.metrics import roc_auc_score
  from tfrecord_tools import convert as convert_lib
  from xraytpu.data import input_pipeline

  src = shared_data / "chest_xray_400x300"
  if not src.is_dir():
    pytest.skip(f"{src} not found")
  data = str(tmp_path / "tfrecords")
  convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=str(src), output_dir=data, val_fraction=0.2, test_fraction=0.0, seed=0, max_side=64, num_workers=2,
      class_map="NORMAL=Normal,PNEUMONIA=BacterialPneumonia+ViralPneumonia", quiet=True))
  cfg = _cfg(data, str(tmp_path / "run"), image_size=32, batch_size=32, epochs=4)
  result = train_lib.train_and_evaluate(cfg, verbose=0)

  loaded = rundir.load(result.run_dir)  # best val_auc weights
  manifest, model = loaded.manifest, loaded.model
  assert manifest["classes"] == ["NORMAL", "PNEUMONIA"]
  ds = input_pipeline.eval_dataset(data, "val", input_pipeline.InputSpec.from_config(result.config),
                                   batch_size=result.config.batch_size, label_mode="int",
                                   manifest=manifest)
  labels, probs = [], []
  for x, y in ds:
    labels.append(y.numpy())
    probs.append(model.predict_on_batch(x)[:, 0])
  labels, probs = np.concatenate(labels), np.concatenate(probs)
  assert len(labels) == manifest["splits"]["val"]["num_examples"]
  auc = roc_auc_score(labels, probs)
  print(f"real-data val AUC: {auc:.4f} (history best {max(float(r['val_auc']) for r in result.history):.4f})")
  assert auc >= 0.85


def test_augment_preview_flag_writes_a_png_and_trains_nothing(demo_data_dir, tmp_path):
  out = tmp_path / "preview.png"
  r = subprocess.run([sys.executable, "-m", "xraytpu.train", f"--data_dir={demo_data_dir}",
                      "--image_size=48", "--augment=tutorial", f"--augment_preview={out}"],
                     cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert list(tmp_path.iterdir()) == [out]  # no run directory was made
