"""TensorBoard through Keras' own callback: the scalars read back with tensorboard's
event reader equal history.csv, the graph is there, --profile_steps writes a
profiler trace, and Vertex AI's AIP_MODEL_DIR / AIP_TENSORBOARD_LOG_DIR are honoured."""

from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np
import pytest

from tfrecord_tools import storage
from xraytpu.training import callbacks, train_lib
from xraytpu.run import rundir
from xraytpu.config import Config


def _cfg(data_dir: str, model_dir: str, **kw) -> Config:
  base = dict(data_dir=data_dir, model_dir=model_dir, model="xray_cnn", image_size=32,
              batch_size=8, epochs=2, augment="none", cache="memory", seed=0)
  base.update(kw)
  return Config(**base).resolve_augment()


def _scalars(folder: str) -> tuple[dict[str, dict[int, float]], bool]:
  """{tag: {step: value}} of every scalar in an event folder (tensorboard's own reader), and
  whether it holds a graph."""
  from tensorboard.backend.event_processing import event_accumulator as ea
  from tensorboard.util import tensor_util
  acc = ea.EventAccumulator(folder, size_guidance={ea.TENSORS: 0, ea.SCALARS: 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["tensors"]:
    values = {e.step: tensor_util.make_ndarray(e.tensor_proto) for e in acc.Tensors(tag)}
    if all(np.ndim(v) == 0 and np.asarray(v).dtype.kind == "f" for v in values.values()):
      out[tag] = {step: float(v) for step, v in values.items()}
  return out, acc.Tags()["graph"]


@pytest.fixture(scope="module")
def tb_run(demo_data_dir, tmp_path_factory):
  """Two epochs under a cosine schedule (the learning rate moves), profiling steps 2-3."""
  run = str(tmp_path_factory.mktemp("tb") / "run")
  cfg = _cfg(demo_data_dir, run, lr_schedule="cosine", warmup_epochs=0.5, profile_steps="2,3")
  train_lib.train_and_evaluate(cfg, verbose=0)
  return run


def test_scalars_read_back_equal_history_csv(tb_run):
  history = rundir.read_history(tb_run)
  assert [r["epoch"] for r in history] == [0, 1]
  train, train_graph = _scalars(os.path.join(tb_run, "logs", "train"))
  val, _ = _scalars(os.path.join(tb_run, "logs", "validation"))
  assert train_graph   # the model's graph (Graphs tab)
  pairs = [(train, "epoch_loss", "loss"), (train, "epoch_auc", "auc"), (train, "epoch_lr", "lr"),
           (val, "epoch_loss", "val_loss"),
           (val, "epoch_auc", "val_auc")]
  for scalars, tag, column in pairs:
    assert tag in scalars, (tag, sorted(scalars))
    got = scalars[tag]
    assert sorted(got) == [0, 1], (tag, got)
    want = [r[column] for r in history]
    np.testing.assert_allclose([got[0], got[1]], want, rtol=1e-6, err_msg=tag)
  assert history[0]["lr"] != history[1]["lr"]   # the schedule moved: a real comparison
  assert "epoch_learning_rate" not in train      # one learning-rate curve, history.csv's


def test_profile_steps_write_a_profiler_trace(tb_run):
  traces = glob.glob(os.path.join(tb_run, "logs", "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces
  train, _ = _scalars(os.path.join(tb_run, "logs", "train"))
  assert "epoch_loss" in train


@pytest.mark.parametrize("text,want", [("", None), ("5", (5, 5)), ("10,20", (10, 20)),
                                       (" 2 , 3 ", (2, 3))])
def test_profile_steps_parse(text, want):
  assert callbacks.parse_profile_steps(text) == want


@pytest.mark.parametrize("text", ["0,3", "5,2", "a,b", "1,2,3", "-1"])
def test_bad_profile_steps_are_a_one_line_error(text):
  cfg = Config(data_dir="d", model_dir="m", profile_steps=text)
  with pytest.raises(train_lib.TrainError, match="--profile_steps="):
    train_lib.validate_config(cfg)


def test_vertex_env_resolution():
  cfg = Config(data_dir="d")
  env = {"AIP_MODEL_DIR": "gs://b/job/model/", "AIP_TENSORBOARD_LOG_DIR": "gs://b/tb/run/"}
  got, logs = train_lib.vertex_env(cfg, env)
  assert got.model_dir == "gs://b/job/model" and logs == "gs://b/tb/run"
  # An explicit --model_dir wins over AIP_MODEL_DIR; nothing set = RUN/logs ("").
  got, logs = train_lib.vertex_env(dataclasses.replace(cfg, model_dir="runs/x"), env)
  assert got.model_dir == "runs/x"
  assert train_lib.vertex_env(cfg, {}) == (cfg, "")


@pytest.mark.slow
def test_aip_model_dir_and_tensorboard_log_dir_on_gcs(demo_data_dir, gcs_emulator, tmp_path,
                                                      monkeypatch):
  """On Vertex AI both are gs:// folders: the run goes to AIP_MODEL_DIR, the events to
  AIP_TENSORBOARD_LOG_DIR (written locally, pushed after every epoch), none to RUN/logs."""
  model_dir = gcs_emulator.url(f"aip/{tmp_path.name}/model")
  log_dir = gcs_emulator.url(f"aip/{tmp_path.name}/tensorboard")
  monkeypatch.setenv("AIP_MODEL_DIR", model_dir + "/")
  monkeypatch.setenv("AIP_TENSORBOARD_LOG_DIR", log_dir)
  result = train_lib.train_and_evaluate(_cfg(demo_data_dir, "", epochs=1), verbose=0)
  assert result.run_dir == model_dir
  names = {rel for rel, _, _ in storage.walk_files(model_dir)}
  assert {"config.json", "history.csv", "model.keras"} <= names
  assert not any(n.startswith("logs/") for n in names)
  events = {rel for rel, _, _ in storage.walk_files(log_dir)}
  assert any(n.startswith("train/events.out.tfevents.") for n in events), events
  assert any(n.startswith("validation/events.out.tfevents.") for n in events), events
  with storage.local_copy(log_dir) as local:
    train, _ = _scalars(os.path.join(local, "train"))
  history = rundir.read_history(model_dir)
  np.testing.assert_allclose(train["epoch_loss"][0], history[0]["loss"], rtol=1e-6)
