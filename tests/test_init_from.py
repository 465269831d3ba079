"""--init_from=RUN_DIR (xraytpu.training.transfer): a new run's backbone starts from an earlier
run's best weights, with a new head for its own task.

The source is the shared run (conftest.trained_run: xray_cnn, 32 px, binary NORMAL/PNEUMONIA).
The trainings here are the smallest there are (32 px, one step per epoch): a warm start onto
another task (3 findings, multi-label) and a two-phase run stopped in phase 2 and resumed, which
cannot reuse trained_run because they are runs *from* it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests import _multilabel
from tests._runs import copy_run
from xraytpu import models
from xraytpu._keras import keras
from xraytpu.config import Config
from xraytpu.models import common
from xraytpu.run import model_card, rundir
from xraytpu.training import train_lib, transfer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONE = ("conv1", "conv2", "conv3", "conv4", "conv5")   # xray_cnn's layers with weights up to "features"


def _cfg(data_dir: str, model_dir: str, **kw) -> Config:
  base = dict(data_dir=data_dir, model_dir=model_dir, model="xray_cnn", image_size=32, batch_size=8,
              epochs=1, steps_per_epoch=1, augment="none", cache="off", seed=1)
  return Config(**{**base, **kw}).resolve_augment()


def _weights(model, name: str) -> list[np.ndarray]:
  return [np.asarray(w) for w in model.get_layer(name).get_weights()]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
  return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


def test_backbone_copied_head_new_for_another_task(trained_run, tmp_path):
  cfg = _cfg("d", str(tmp_path / "new"), init_from=trained_run, channels=1)
  source = transfer.load_source(cfg)
  src = rundir.load(trained_run).model          # its best weights, as the transfer reads them
  # A 3-finding multi-label model from the binary run (and at another image size: the
  # xray_cnn backbone's weights do not depend on it, its flatten head does).
  for size in (32, 64):
    new_cfg = dataclasses.replace(cfg, image_size=size)
    model = models.build_model(new_cfg, num_classes=3, channels=1, task="multi_label")
    fresh = {n: _weights(model, n) for n in BACKBONE + ("head_dense1", "probabilities")}
    copied = transfer.copy_backbone(model, source, new_cfg)
    assert copied == {"layers": 5, "tensors": 10,
                      "params": sum(int(np.prod(w.shape)) for n in BACKBONE for w in _weights(src, n))}
    for name in BACKBONE:
      assert _same(_weights(model, name), _weights(src, name)), name
      assert not _same(fresh[name], _weights(src, name)), name
    # The head is the new model's own initialisation; the output has one sigmoid per finding.
    assert _same(_weights(model, "head_dense1"), fresh["head_dense1"])
    assert not _same(_weights(model, "head_dense1"), _weights(src, "head_dense1"))
    assert model.get_layer("probabilities").get_weights()[0].shape == (64, 3)
  record = source.record(copied)
  assert record["weights_sha256"] == rundir.weights_sha256(trained_run)
  assert (record["model"], record["classes"], record["layers"]) == ("xray_cnn", ["NORMAL", "PNEUMONIA"], 5)

  # Weight shapes that differ (3 channels here, 1 in the source) are refused, naming the layer
  # and the setting; nothing is copied.
  rgb_cfg = dataclasses.replace(cfg, channels=3)
  rgb = models.build_model(rgb_cfg, num_classes=2, channels=3)
  before = _weights(rgb, "conv2")
  with pytest.raises(transfer.TransferError,
                     match=r"layer 'conv1' has weights of shape \(3, 3, 1, 32\) there and "
                           r"\(3, 3, 3, 32\) here \(the runs differ in --channels=1 there, 3 here\)"):
    transfer.copy_backbone(rgb, source, rgb_cfg)
  assert _same(_weights(rgb, "conv2"), before)


def test_sources_that_cannot_be_used_are_refused(trained_run, tmp_path):
  unfinished = tmp_path / "unfinished"
  shutil.copytree(trained_run, unfinished)
  doc = json.loads((unfinished / "config.json").read_text())
  (unfinished / "config.json").write_text(json.dumps({**doc, "status": "running"}))
  for init_from, message in [
      (str(tmp_path / "nothing"), "not a run directory"),
      (str(unfinished), "not finished"),
  ]:
    with pytest.raises(transfer.TransferError, match=message):
      transfer.check_source(_cfg("d", str(tmp_path / "new"), init_from=init_from))
  with pytest.raises(transfer.TransferError, match=r"is a --model=xray_cnn run; its weights do not "
                                                    r"fit --model=keras_tpu_cnn"):
    transfer.check_source(_cfg("d", str(tmp_path / "new"), init_from=trained_run, model="keras_tpu_cnn"))
  for kw, message in [
      (dict(model="densenet121", weights="imagenet"), "both give the backbone its starting weights"),
      (dict(init_from=str(tmp_path / "new") + "/"), "this run's own --model_dir"),
      (dict(init_from="", fine_tune_at=0, fine_tune_epochs=1), "apply to backbone models"),
  ]:
    with pytest.raises(train_lib.TrainError, match=message):
      train_lib.validate_config(_cfg("d", str(tmp_path / "new"), **{"init_from": trained_run, **kw}))
  # With --init_from, the from-scratch CNNs take the two-phase flags.
  train_lib.validate_config(_cfg("d", str(tmp_path / "new"), init_from=trained_run, fine_tune_at=0,
                                 fine_tune_epochs=1))


def test_the_command_line_refuses_another_architecture_in_one_line(trained_run, demo_data_dir, tmp_path):
  run = tmp_path / "run"
  r = subprocess.run([sys.executable, "-m", "xraytpu.train", f"--data_dir={demo_data_dir}",
                      f"--model_dir={run}", "--model=keras_tpu_cnn", "--image_size=32", "--epochs=1",
                      f"--init_from={trained_run}"],
                     cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if "error:" in line]
  assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert f"--init_from={trained_run} is a --model=xray_cnn run" in errors[0]
  assert not (run / "config.json").exists()   # refused before anything was trained or written


def test_warm_start_onto_a_multilabel_task_is_recorded(trained_run, tmp_path, monkeypatch):
  data = tmp_path / "multilabel"
  _multilabel.write_multilabel_dataset(data)
  src = rundir.load(trained_run).model
  seen = {}
  real_copy = transfer.copy_backbone

  def copy_and_look(model, source, cfg):   # the model train_lib built, right after the copy
    out = real_copy(model, source, cfg)
    seen.update({n: _weights(model, n) for n in BACKBONE})
    return out

  monkeypatch.setattr(transfer, "copy_backbone", copy_and_look)
  run = str(tmp_path / "run")
  result = train_lib.train_and_evaluate(_cfg(str(data), run, init_from=trained_run), verbose=0)
  for name in BACKBONE:   # the backbone started from the source's weights (before any step)
    assert _same(seen[name], _weights(src, name)), name
  assert result.model.get_layer("probabilities").get_weights()[0].shape == (64, 3)
  doc = json.load(open(os.path.join(run, "config.json")))
  assert doc["init_from"] == trained_run and doc["status"] == "finished"
  record = doc["run"]["init_from"]
  assert record["weights_sha256"] == rundir.weights_sha256(trained_run)
  assert (record["task"], record["classes"], record["layers"]) == ("single_label", ["NORMAL", "PNEUMONIA"], 5)
  card = model_card.model_card(rundir.load(run))["model_card_md"]
  assert (f"- warm-started (--init_from) from the xray_cnn run `{trained_run}` (weights "
          f"`sha256:{record['weights_sha256'][:12]}`, single_label on NORMAL, PNEUMONIA): 5 backbone "
          "layers copied, a new head for this task") in card


class _Preempted(Exception):
  pass


def test_two_phases_and_a_resume_that_does_not_read_the_source_again(trained_run, demo_data_dir,
                                                                       tmp_path, monkeypatch):
  source = copy_run(trained_run, tmp_path)       # deleted before the resume
  src = rundir.load(source).model
  run = str(tmp_path / "new")
  cfg = _cfg(demo_data_dir, run, init_from=source, fine_tune_at=0, fine_tune_epochs=2,
             fine_tune_learning_rate=1e-4)
  real_make_callbacks = train_lib.make_callbacks
  seen = {}

  def crash_in_phase_two(*args, **kw):
    phase = kw["phase"]

    class Look(keras.callbacks.Callback):
      def on_train_begin(self, logs=None):
        seen[phase] = {"trainable": [(layer.name, layer.trainable) for layer in self.model.layers
                                     if layer.weights],
                       "conv1": _weights(self.model, "conv1")}

      def on_train_end(self, logs=None):
        seen[f"{phase} end"] = {n: _weights(self.model, n) for n in ("conv1", "head_dense0")}

      def on_epoch_end(self, epoch, logs=None):
        if phase == 2:
          raise _Preempted()   # after BackupAndRestore saved this epoch
    return real_make_callbacks(*args, **kw) + [Look()]

  monkeypatch.setattr(train_lib, "make_callbacks", crash_in_phase_two)
  with pytest.raises(_Preempted):
    train_lib.train_and_evaluate(cfg, verbose=0)
  body = {layer.name for layer in common.body_layers(rundir.load(source).model)}
  # Phase 1: the copied backbone frozen, the new head trains; phase 2: every layer.
  assert all(t == (name not in body) for name, t in seen[1]["trainable"]), seen[1]["trainable"]
  assert all(t for _, t in seen[2]["trainable"])
  assert _same(seen[1]["conv1"], _weights(src, "conv1"))
  assert _same(seen["1 end"]["conv1"], _weights(src, "conv1"))          # frozen: unchanged
  assert not _same(seen["1 end"]["head_dense0"], _weights(src, "head_dense0"))
  record = json.load(open(os.path.join(run, "config.json")))["run"]["init_from"]
  # What decides it: weights of the run's own (a run stopped before any epoch ended has none,
  # and its resume copies from the source again).
  assert train_lib._has_saved_weights(run) and not train_lib._has_saved_weights(str(tmp_path))

  shutil.rmtree(source)   # a resume restores the run's own backup: the source is not needed
  monkeypatch.setattr(train_lib, "make_callbacks", real_make_callbacks)
  result = train_lib.train_and_evaluate(cfg, verbose=0)
  assert [int(r["epoch"]) for r in result.history] == [0, 1, 2]
  doc = json.load(open(os.path.join(run, "config.json")))
  assert doc["status"] == "finished" and doc["run"]["resumed"]
  assert doc["run"]["init_from"] == record
