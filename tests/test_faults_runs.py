"""Runs that went wrong: no NaN weights leave a run, a collapse is flagged, a full disk is one line.

  diverged   (sgd at --learning_rate=1e6: the loss becomes NaN) -> marked failed, no NaN
             checkpoint, and predict / evaluate / export / serve refuse a run with NaN weights
  collapsed  (adam at too high a rate: finite, loss ~1e10, val AUC 0.5) -> flagged in
             config.json, train's last lines, xraytpu.summary and the model card
  full disk / read-only --model_dir while training -> one line naming the file and the cause,
             the run marked failed, no truncated checkpoint, the same command resumes

The refusal tests use a copy of the shared `trained_run` with NaN written into its weights
(cheap). The diverged, collapsed and full-disk tests need trainings of their own (the shared
run is a healthy finished one): each is the smallest there is, 2 steps of 8 films at 32 px
on `demo_data_dir`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(data_dir, run_dir, **kw):
  from xraytpu.config import Config
  base = dict(data_dir=data_dir, model_dir=str(run_dir), model="xray_cnn", image_size=32,
              batch_size=8, epochs=1, steps_per_epoch=2, augment="none", cache="off", seed=0)
  base.update(kw)
  return Config(**base).resolve_augment()


def _config(run_dir) -> dict:
  with open(os.path.join(run_dir, "config.json")) as f:
    return json.load(f)


def _temp_files(run_dir) -> list[str]:
  return [os.path.join(d, n) for d, _, names in os.walk(run_dir) for n in names if ".tmp-" in n]


def _error_line(proc) -> str:
  lines = [ln for ln in proc.stderr.strip().splitlines() if ": error: " in ln]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return lines[0]


def _demo_files(demo_data_dir) -> list[str]:
  import glob
  from tfrecord_tools import schema
  root = schema.read_manifest(demo_data_dir)["args"]["input_dir"]
  return sorted(glob.glob(os.path.join(root, "test", "*", "*.png")))


# ---- a diverged run -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def diverged_run(demo_data_dir, tmp_path_factory):
  """sgd at lr 1e6: the loss becomes NaN in the first epoch (train exits 3 on the command line)."""
  from xraytpu.training import train_lib
  run = str(tmp_path_factory.mktemp("diverged") / "run")
  with pytest.raises(train_lib.TrainingDiverged, match="loss became NaN/inf") as e:
    train_lib.train_and_evaluate(_cfg(demo_data_dir, run, optimizer="sgd", learning_rate=1e6,
                                      epochs=2), verbose=0)
  return run, str(e.value)


def test_a_diverged_run_keeps_no_nan_weights_and_is_marked_failed(diverged_run):
  from xraytpu.run import rundir
  run, message = diverged_run
  doc = _config(run)
  assert doc["status"] == "failed" and doc["run"]["failure"] == message
  assert doc["run"]["diverged"]["epoch"] == 0
  assert not os.path.exists(os.path.join(run, "model.keras"))
  best = os.path.join(run, rundir.BEST_WEIGHTS)
  if os.path.exists(best):   # only ever of an epoch with finite weights
    import h5py
    with h5py.File(best) as f:
      arrays = []
      f.visititems(lambda _, o: arrays.append(np.asarray(o)) if isinstance(o, h5py.Dataset) else None)
    assert arrays and all(np.isfinite(a).all() for a in arrays)
  with pytest.raises(rundir.RunError, match="no finite weights: training diverged"):
    rundir.load(run)


def test_summary_says_a_run_diverged(diverged_run):
  from xraytpu import summary
  text = summary.summarize(diverged_run[0])
  assert "DIVERGED: the training loss became NaN/inf in epoch 1" in text, text
  assert "no finite checkpoint" in text and "AUC 0.000" not in text, text


@pytest.fixture(scope="module")
def nan_run(trained_run, tmp_path_factory):
  """A copy of the shared run whose best weights hold NaN (what a diverged run kept before)."""
  import h5py
  from tests._runs import copy_run
  from xraytpu.run import rundir
  run = copy_run(trained_run, tmp_path_factory.mktemp("nan"))
  with h5py.File(os.path.join(run, rundir.BEST_WEIGHTS), "r+") as f:
    datasets = []
    f.visititems(lambda _, o: datasets.append(o) if isinstance(o, h5py.Dataset) else None)
    for d in datasets:
      if d.dtype.kind == "f":
        d[...] = np.nan
  return run


def test_predict_refuses_nan_weights_with_one_line(nan_run, demo_data_dir):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-m", "xraytpu.predict", f"--model_dir={nan_run}",
                         _demo_files(demo_data_dir)[0]], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2, (proc.stdout, proc.stderr[-2000:])
  line = _error_line(proc)
  assert "weights that are not finite (NaN or inf" in line and "--learning_rate" in line
  assert "nan" not in proc.stdout.lower()


def test_evaluate_export_and_serve_refuse_nan_weights(nan_run):
  from xraytpu.evaluation import evaluate_lib
  from xraytpu.inference import export_lib
  from xraytpu.serving import http_api
  with pytest.raises(evaluate_lib.EvaluateError, match="not finite"):
    evaluate_lib.evaluate(nan_run, split="test", n_resamples=5, write_plots=False)
  with pytest.raises(export_lib.ExportError, match="not finite"):
    export_lib.export(nan_run)
  assert not os.path.exists(os.path.join(nan_run, "export"))
  with pytest.raises(http_api.ServeError, match="not finite"):
    http_api.make_server(http_api.ServeOptions(model_dir=nan_run, port=0, access_log=False))


def _nan_outputs(module):
  """Makes the run's InferenceModule answer NaN (finite weights that overflow on some input)."""
  import tensorflow as tf
  module.raw = lambda images: tf.fill([tf.shape(images)[0], 1], float("nan"))


def test_serve_answers_a_nan_output_with_a_json_error_and_never_starts_on_one(
    trained_run, demo_data_dir):
  import urllib.error
  import urllib.request
  from xraytpu.inference import model_call, predict_lib
  from xraytpu.serving import http_api
  opts = http_api.ServeOptions(model_dir=trained_run, host="127.0.0.1", port=0, access_log=False)
  run = predict_lib.load(trained_run)
  srv = http_api.make_server(opts, run=run)
  http_api.start_in_thread(srv)
  try:
    _nan_outputs(model_call.module_of(run))
    with open(_demo_files(demo_data_dir)[0], "rb") as f:
      req = urllib.request.Request(srv.url + "v1/predict", data=f.read(), method="POST",
                                   headers={"Content-Type": "application/octet-stream"})
    with pytest.raises(urllib.error.HTTPError) as e:
      urllib.request.urlopen(req, timeout=60)
    body = json.loads(e.value.read())
    assert e.value.code == 422 and body["status"] == 422, body
    assert "not a finite number (NaN or inf)" in body["error"] and "Traceback" not in body["error"]
  finally:
    srv.close()
  with pytest.raises(http_api.ServeError, match="not serving the run .*not a finite number"):
    http_api.make_server(opts, run=run)   # its start-up check answers NaN


def test_predict_and_evaluate_refuse_a_nan_output_in_one_line(trained_run, demo_data_dir, tmp_path,
                                                               monkeypatch):
  """Finite weights that still answer NaN: one line naming the cause, never 'NORMAL nan' or a
  NaN report."""
  from tests._runs import copy_run
  from xraytpu.evaluation import evaluate_lib
  from xraytpu.inference import model_call, predict_lib
  run = predict_lib.load(trained_run)
  _nan_outputs(model_call.module_of(run))
  with pytest.raises(model_call.NonFiniteOutput, match=r"not a finite number \(NaN or inf\)"):
    predict_lib.predict_files(run, _demo_files(demo_data_dir)[:2])
  copy = copy_run(trained_run, tmp_path)
  monkeypatch.setattr(predict_lib, "load", lambda model_dir: run)
  with pytest.raises(model_call.NonFiniteOutput, match="not a finite number .* for the val split"):
    evaluate_lib.evaluate(copy, split="test", n_resamples=5, write_plots=False)
  assert not os.path.exists(os.path.join(copy, "eval"))


# ---- a collapsed run ------------------------------------------------------------------------


def test_the_collapse_rule():
  from xraytpu.run import rundir
  healthy_but_unlucky = [{"epoch": 0, "loss": 0.70, "val_auc": 0.52}]
  assert rundir.collapse(healthy_but_unlucky, "val_auc", 2) is None
  learned = [{"epoch": 0, "loss": 3e5, "val_auc": 0.91}]
  assert rundir.collapse(learned, "val_auc", 2) is None
  collapsed = [{"epoch": 0, "loss": 2e5, "val_auc": 0.5}, {"epoch": 1, "loss": 3e5, "val_auc": 0.47}]
  line = rundir.collapse(collapsed, "val_auc", 2)
  assert line.startswith("the run collapsed: its best val_auc 0.500") and "ln 2 = 6.93" in line
  # A NaN epoch is never the best, nor the last word on the loss.
  rows = [{"epoch": 0, "loss": 0.6, "val_auc": 0.8}, {"epoch": 1, "loss": float("nan"), "val_auc": 0.9}]
  assert rundir.best_row(rows, "val_auc")["epoch"] == 0


@pytest.fixture(scope="module")
def collapsed_run(demo_data_dir, tmp_path_factory):
  """adam at lr 1.0, 2 epochs: finite, but the loss is ~1e10 and val AUC 0.5 (the issue's
  lr 1e6 collapsed a larger run; on this tiny one it diverges at once). Returns the run and
  train's warning lines."""
  from xraytpu.training import train_lib
  run = str(tmp_path_factory.mktemp("collapsed") / "run")
  records: list[logging.LogRecord] = []

  class Keep(logging.Handler):
    def emit(self, record):
      records.append(record)
  handler, absl_logger = Keep(level=logging.WARNING), logging.getLogger("absl")
  absl_logger.addHandler(handler)
  try:
    train_lib.train_and_evaluate(_cfg(demo_data_dir, run, learning_rate=1.0, epochs=2), verbose=0)
  finally:
    absl_logger.removeHandler(handler)
  return run, [r.getMessage() for r in records]


def test_a_collapsed_run_is_flagged_where_the_user_looks(collapsed_run):
  from xraytpu import summary
  from xraytpu.run import model_card, rundir
  run, logged = collapsed_run
  doc = _config(run)
  assert doc["status"] == "finished"
  assert doc["run"]["collapsed"].startswith("the run collapsed: its best val_auc"), doc["run"]
  assert logged[-1].startswith("WARNING: the run collapsed"), logged[-5:]   # train's last line
  assert "status:   WARNING: the run collapsed" in summary.summarize(run)
  md = model_card.model_card(rundir.load(run))["model_card_md"]
  top = md.split("## ", 1)[0]   # before the card's first section
  assert "> **Warning: the run collapsed" in top, md[:2000]


# ---- a full disk, a read-only run directory while training ----------------------------------


def test_a_full_disk_mid_training_is_one_line_marks_the_run_failed_and_resumes(
    demo_data_dir, tmp_path, monkeypatch):
  """history.csv cannot be written at the end of epoch 2: the run stops with one line, is
  marked failed, keeps epoch 1's checkpoint whole; the same command then resumes at epoch 2."""
  from tfrecord_tools import errors
  from xraytpu.run import rundir
  from xraytpu.training import train_lib
  run = str(tmp_path / "run")
  cfg = _cfg(demo_data_dir, run, epochs=2)
  real = rundir.write_history

  def full_at_epoch_two(run_dir, rows):
    if len(rows) == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    real(run_dir, rows)
  monkeypatch.setattr(rundir, "write_history", full_at_epoch_two)
  with pytest.raises(errors.UserError) as e:
    train_lib.train_and_evaluate(cfg, verbose=0)
  line = str(e.value)
  assert "\n" not in line
  assert line.startswith(f"cannot write {os.path.join(run, 'history.csv')}: No space left on "
                         "device (ENOSPC)"), line
  assert "run the same command again: it resumes" in line
  doc = _config(run)
  assert doc["status"] == "failed" and doc["run"]["failure"] == line
  assert _temp_files(run) == []
  from xraytpu import summary
  assert f"status:   FAILED: {line}" in summary.summarize(run)
  rundir.load(run)   # the checkpoint of epoch 1 is whole

  monkeypatch.setattr(rundir, "write_history", real)
  result = train_lib.train_and_evaluate(cfg, verbose=0)
  assert [int(r["epoch"]) for r in result.history] == [0, 1]
  doc = _config(run)
  assert doc["status"] == "finished" and doc["run"]["resumed"] and "failure" not in doc["run"]


class _TinyModel:
  @staticmethod
  def make():
    from xraytpu._keras import keras
    inp = keras.Input((4,))
    return keras.Model(inp, keras.layers.Dense(1, name="dense")(inp))


def test_a_full_disk_in_the_checkpoint_writer_leaves_the_previous_best_whole(tmp_path, monkeypatch):
  from xraytpu.run import rundir
  from xraytpu.training import callbacks
  model = _TinyModel.make()
  path = str(tmp_path / "checkpoints" / "best.weights.h5")
  os.makedirs(os.path.dirname(path))
  cb = callbacks.BestCheckpoint(path, "val_auc", None, True, callbacks.StopOnNaN())
  cb.set_model(model)
  cb.on_epoch_end(0, {"val_auc": 0.6})
  with open(path, "rb") as f:
    before = f.read()

  def half_written(target, *a, **k):   # h5py's own wording: no errno attribute, the code in text
    with open(target, "wb") as f:
      f.write(before[:100])
    raise OSError(f"Unable to synchronously write data (file write failed: time = now, filename "
                  f"= '{target}', errno = 28, error message = 'No space left on device')")
  monkeypatch.setattr(model, "save_weights", half_written)
  with pytest.raises(rundir.WriteError, match=r"^cannot write .*best\.weights\.h5: No space left "
                                              r"on device \(ENOSPC\); make room"):
    cb.on_epoch_end(1, {"val_auc": 0.7})
  with open(path, "rb") as f:
    assert f.read() == before
  assert _temp_files(str(tmp_path)) == []


def test_a_real_full_disk_is_one_short_line_and_the_run_is_marked_failed(demo_data_dir, tmp_path):
  """A real full disk (a 600 KB tmpfs: the first checkpoint does not fit). h5py's error is
  its whole message: the line says only the cause. HDF5 keeps a file whose close failed
  open, so the temp checkpoint is emptied as well as removed: else its space stays taken
  and even config.json's "failed" cannot be written."""
  from xraytpu.run import rundir
  from xraytpu.training import train_lib
  small = tmp_path / "small"
  small.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs",
                                          str(small)], capture_output=True).returncode != 0:
    pytest.skip("mounting a tmpfs needs root (the monkeypatched full-disk tests still run)")
  run = str(small / "run")
  try:
    with pytest.raises(rundir.WriteError) as e:
      train_lib.train_and_evaluate(_cfg(demo_data_dir, run), verbose=0)
    assert str(e.value).startswith(f"cannot write {os.path.join(run, rundir.BEST_WEIGHTS)}: No "
                                   "space left on device (ENOSPC); make room"), str(e.value)
    assert _config(run)["status"] == "failed"
    assert _temp_files(run) == [] and not os.path.exists(os.path.join(run, rundir.BEST_WEIGHTS))
  finally:   # lazily: this process still holds the aborted run's TensorBoard event files
    subprocess.run(["umount", "-l", str(small)], check=True)


def test_a_checkpoint_is_written_only_from_finite_weights(tmp_path):
  from xraytpu.training import callbacks
  model = _TinyModel.make()
  path = str(tmp_path / "best.weights.h5")
  nan = callbacks.StopOnNaN()
  cb = callbacks.BestCheckpoint(path, "val_auc", None, True, nan)
  cb.set_model(model)
  model.set_weights([np.full(w.shape, np.nan, np.float32) for w in model.get_weights()])
  cb.on_epoch_end(0, {"val_auc": 0.9})
  assert not os.path.exists(path)
  model.set_weights([np.zeros(w.shape, np.float32) for w in model.get_weights()])
  nan.where = (0, 3)       # the loss became NaN in this epoch
  cb.on_epoch_end(0, {"val_auc": 0.9})
  assert not os.path.exists(path)
  nan.where = None
  cb.on_epoch_end(1, {"val_auc": 0.9})
  assert os.path.exists(path)


def test_a_full_disk_in_the_tensorboard_writer_is_one_line(tmp_path, monkeypatch):
  import tensorflow as tf
  from xraytpu._keras import keras
  from xraytpu.run import rundir
  from xraytpu.training import callbacks
  log_dir = str(tmp_path / "logs")
  tb = callbacks.tensorboard(log_dir)

  def full(self, epoch, logs=None):
    raise tf.errors.ResourceExhaustedError(
        None, None, f"{log_dir}/train/events.out.tfevents.1.host; No space left on device")
  monkeypatch.setattr(keras.callbacks.TensorBoard, "on_epoch_end", full)
  with pytest.raises(rundir.WriteError,
                     match=rf"^cannot write {re.escape(log_dir)}: No space left on device "
                           r"\(ENOSPC\)"):
    tb.on_epoch_end(0, {})


def test_a_model_dir_that_cannot_be_written_is_one_line(demo_data_dir, tmp_path, monkeypatch):
  from tfrecord_tools import errors
  from xraytpu.training import train_lib
  parent = tmp_path / "read-only"
  parent.mkdir()
  run = parent / "run"
  if os.geteuid() != 0:
    parent.chmod(0o555)
  else:   # root writes anywhere: the refusal a read-only folder gives, made by hand
    real = os.makedirs

    def refuse(path, *a, **k):
      if str(path).startswith(str(parent)):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
      return real(path, *a, **k)
    monkeypatch.setattr(os, "makedirs", refuse)
  try:
    with pytest.raises(errors.UserError) as e:
      train_lib.train_and_evaluate(_cfg(demo_data_dir, run), verbose=0)
  finally:
    parent.chmod(0o755)
  line = str(e.value)
  assert "\n" not in line and f"cannot write {run}" in line and "Permission denied (EACCES)" in line, line


def test_a_truncated_checkpoint_is_named_not_a_layer_error(trained_run, tmp_path):
  """A best.weights.h5 cut short (written by an older version when the disk filled)."""
  from tests._runs import copy_run
  from xraytpu.run import rundir
  run = copy_run(trained_run, tmp_path)
  best = os.path.join(run, rundir.BEST_WEIGHTS)
  with open(best, "r+b") as f:
    f.truncate(os.path.getsize(best) // 2)
  with pytest.raises(rundir.RunError, match=r"cannot load .*best\.weights\.h5: the file is "
                                            r"incomplete or damaged") as e:
    rundir.load(run)
  assert "\n" not in str(e.value)
