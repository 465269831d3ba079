"""Multi-label training end to end: pipeline targets, finding statistics, masked loss and AUC,
K-sigmoid models, and a short real training run with a resume.

`ml_data` writes a tiny multi-label data set by hand (tests/_multilabel.py: records + a
dataset.json following the issue-13 contract): 32x32 grayscale films where
each of K=3 findings has its own visible sign (a bright block top-left, a
bright block top-right, a bright bar at the bottom), and about one label in
five is ignored (mask 0.0). The ignored entries' multi_hot values are the
*opposite* of what the film shows, so anything that does not honour the mask
learns or scores the wrong thing.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from tfrecord_tools import schema
from xraytpu import models
from xraytpu.training import multilabel, train_lib
from xraytpu.run import rundir
from xraytpu._keras import keras
from xraytpu.config import Config
from xraytpu.data import DataError, input_pipeline, stats

from tests._multilabel import FINDINGS, K, LAYOUT, METRICS, SIZE, write_multilabel_dataset


@pytest.fixture(scope="module")
def ml_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("multilabel") / "tfrecords"
  truth = write_multilabel_dataset(root)
  return str(root), truth


def _spec() -> input_pipeline.InputSpec:
  return input_pipeline.InputSpec(image_size=SIZE, channels=0, aspect="squash")


def _cfg(data_dir: str, model_dir: str, **kw) -> Config:
  base = dict(data_dir=data_dir, model_dir=model_dir, model="xray_cnn", image_size=SIZE,
              batch_size=16, epochs=3, augment="none", cache="memory", seed=0, learning_rate=1e-3)
  base.update(kw)
  return Config(**base).resolve_augment()


def _history(run_dir: str) -> list[dict]:
  with open(os.path.join(run_dir, "history.csv")) as f:
    return list(csv.DictReader(f))


# ---------------------------------------------------------------------------
# Input pipeline and statistics
# ---------------------------------------------------------------------------

def test_pipeline_yields_multi_hot_and_mask_in_one_target(ml_data):
  data_dir, truth = ml_data
  ds = input_pipeline.eval_dataset(data_dir, "val", _spec(), batch_size=10, label_mode="multi_label")
  ys, n = [], 0
  for x, y in ds:
    assert x.dtype == tf.uint8 and tuple(x.shape[1:]) == (SIZE, SIZE, 1)
    assert y.dtype == tf.float32 and y.shape[-1] == 2 * K
    ys.append(y.numpy())
    n += len(y)
  assert n == LAYOUT["val"][0]
  y = np.concatenate(ys)
  multi_hot, mask, _ = truth["val"]
  np.testing.assert_array_equal(y[:, :K], multi_hot)
  np.testing.assert_array_equal(y[:, K:], mask)
  hot, m = input_pipeline.split_multi_label(tf.constant(y))
  np.testing.assert_array_equal(hot.numpy(), multi_hot)
  np.testing.assert_array_equal(m.numpy(), mask)
  assert (mask == 0).any() and (mask == 1).any()

  train = input_pipeline.train_dataset(data_dir, _spec(), global_batch=16, label_mode="multi_label",
                                       with_filenames=True)
  x, y, names = next(iter(train))
  assert tuple(y.shape) == (16, 2 * K) and tuple(x.shape) == (16, SIZE, SIZE, 1)  # static for TPU
  assert names.dtype == tf.string


def test_a_file_cache_is_kept_per_target_form(ml_data, tmp_path):
  """The cached elements differ ((image, int label) vs (image, y [2K])): one cache file set each."""
  data_dir, truth = ml_data
  spec = dataclasses.replace(_spec(), cache=str(tmp_path / "cache" / "c"))
  for _ in range(2):   # the second pass reads the caches back
    y = np.concatenate([y.numpy() for _, y in input_pipeline.eval_dataset(
        data_dir, "test", spec, batch_size=8, label_mode="multi_label")])
    np.testing.assert_array_equal(y[:, :K], truth["test"][0])
    labels = np.concatenate([y.numpy() for _, y in input_pipeline.eval_dataset(
        data_dir, "test", spec, batch_size=8, label_mode="int")])
    assert labels.shape == (LAYOUT["test"][0],) and not labels.any()   # label 0 in multi-label records
  names = os.listdir(tmp_path / "cache")
  assert any("-ml-" in n for n in names) and any("-ml-" not in n for n in names)


def test_label_mode_must_fit_the_task(ml_data, demo_data_dir):
  data_dir, _ = ml_data
  for mode in ("binary", "one_hot"):
    with pytest.raises(DataError, match="use 'multi_label'"):
      input_pipeline.eval_dataset(data_dir, "val", _spec(), batch_size=4, label_mode=mode)
  with pytest.raises(DataError, match="single_label data set"):
    input_pipeline.eval_dataset(demo_data_dir, "val", _spec(), batch_size=4, label_mode="multi_label")


def test_finding_statistics_from_the_manifest(ml_data):
  data_dir, truth = ml_data
  manifest = schema.read_manifest(data_dir)
  multi_hot, mask, _ = truth["train"]
  pos = ((multi_hot == 1) & (mask == 1)).sum(0)
  neg = ((multi_hot == 0) & (mask == 1)).sum(0)
  assert stats.task(manifest) == "multi_label" and stats.task({"classes": []}) == "single_label"
  np.testing.assert_allclose(stats.prevalence(manifest), pos / (pos + neg))
  bias = stats.initial_bias(manifest)
  np.testing.assert_allclose(bias, np.log(pos / neg), rtol=1e-6)
  np.testing.assert_allclose(1 / (1 + np.exp(-bias)), pos / (pos + neg), rtol=1e-5)   # logit(prevalence)
  np.testing.assert_allclose(stats.positive_weights(manifest), neg / pos, rtol=1e-6)
  assert stats.steps_per_epoch(manifest, "train", 16, True) == 128 // 16   # unchanged

  # Uncertain entries kept by the converter (not ignored, not in positive/negative)
  # go to the side of the --uncertain policy.
  m = json.loads(json.dumps(manifest))
  m["splits"]["train"]["finding_counts"] = {f: {"positive": 10, "negative": 90, "uncertain": 28,
                                                "ignored": 0} for f in FINDINGS}
  m["labels"]["uncertain"] = "ones"
  np.testing.assert_allclose(stats.prevalence(m), 38 / 128)
  m["labels"]["uncertain"] = "zeros"
  np.testing.assert_allclose(stats.prevalence(m), 10 / 128)
  np.testing.assert_allclose(stats.positive_weights(m), 118 / 10, rtol=1e-6)
  with pytest.raises(DataError, match="task 'nope'"):
    stats.task({"task": "nope"})
  del m["splits"]["train"]["finding_counts"]
  with pytest.raises(DataError, match="no 'finding_counts'"):
    stats.initial_bias(m)


# ---------------------------------------------------------------------------
# Loss and metrics
# ---------------------------------------------------------------------------

def _bce(y, p, w=1.0):
  return -(w * y * np.log(p) + (1 - y) * np.log(1 - p))


def test_masked_loss_counts_only_labelled_entries():
  rng = np.random.default_rng(0)
  hot = (rng.uniform(size=(8, K)) < 0.5).astype(np.float32)
  mask = (rng.uniform(size=(8, K)) < 0.7).astype(np.float32)
  p = rng.uniform(0.05, 0.95, (8, K)).astype(np.float32)
  y = np.concatenate([hot, mask], 1)
  loss = multilabel.MaskedBinaryCrossentropy()
  expected = (_bce(hot, p) * mask).sum() / mask.sum()   # mean over labelled entries
  assert float(loss(y, p)) == pytest.approx(expected, rel=1e-5)
  # Flipping the ignored labels changes nothing ...
  flipped = np.concatenate([np.where(mask > 0, hot, 1 - hot), mask], 1)
  assert float(loss(flipped, p)) == pytest.approx(expected, rel=1e-5)
  # ... while a loss that ignored the mask would see them.
  unmasked = _bce(hot, p).mean()
  assert abs(unmasked - expected) > 1e-3
  assert float(loss(np.concatenate([hot, np.ones_like(mask)], 1), p)) == pytest.approx(unmasked, rel=1e-5)
  # Positive weights multiply each finding's positive term.
  w = np.array([1.0, 3.0, 0.5], np.float32)
  weighted = multilabel.MaskedBinaryCrossentropy(pos_weight=w)
  assert float(weighted(y, p)) == pytest.approx((_bce(hot, p, w) * mask).sum() / mask.sum(), rel=1e-5)
  # Nothing labelled: zero, not NaN.
  assert float(loss(np.concatenate([hot, 0 * mask], 1), p)) == 0.0
  again = keras.losses.deserialize(keras.losses.serialize(weighted))
  assert float(again(y, p)) == pytest.approx(float(weighted(y, p)), rel=1e-6)


def test_masked_auc_per_finding_and_mean_match_sklearn():
  from sklearn.metrics import roc_auc_score
  rng = np.random.default_rng(1)
  n = 400
  hot = (rng.uniform(size=(n, K)) < 0.4).astype(np.float32)
  mask = (rng.uniform(size=(n, K)) < 0.75).astype(np.float32)
  p = np.clip(0.3 * hot + rng.uniform(0, 0.7, (n, K)), 0, 1).astype(np.float32)
  p_ignored = np.where(mask > 0, p, 1.0 - hot)   # ignored entries scored "wrong": must not count
  y = np.concatenate([hot, mask], 1)
  metrics = multilabel.make_metrics(FINDINGS)
  assert [m.name for m in metrics] == ["auc"] + METRICS
  for m in metrics:
    m.update_state(y[:200], p_ignored[:200])
    m.update_state(y[200:], p_ignored[200:])
  per = [roc_auc_score(hot[mask[:, k] > 0, k], p[mask[:, k] > 0, k]) for k in range(K)]
  for k in range(K):
    assert float(metrics[1 + k].result()) == pytest.approx(per[k], abs=0.01)
  assert float(metrics[0].result()) == pytest.approx(np.mean(per), abs=0.01)

  # A finding without labelled positives stays out of the mean.
  hot[:, 2] = 0.0
  mean = multilabel.MaskedAUC(K)
  mean.update_state(np.concatenate([hot, mask], 1), p)
  assert float(mean.result()) == pytest.approx(np.mean(per[:2]), abs=0.01)
  config = mean.get_config()
  assert (config["num_findings"], config["finding"]) == (K, None)
  assert multilabel.MaskedAUC.from_config(config).multi_label
  assert multilabel.metric_names(["A b", "a-b", "X"]) == {"A b": "auc_a_b", "a-b": "auc_a_b_2", "X": "auc_x"}


# ---------------------------------------------------------------------------
# Models: K sigmoids, every architecture
# ---------------------------------------------------------------------------

@pytest.fixture()
def _float32_policy():
  keras.mixed_precision.set_global_policy("float32")
  yield
  keras.mixed_precision.set_global_policy("float32")


SMALL = {"inception_v3": 75, "xception": 71}


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_model_trains_one_multi_label_step(name, _float32_policy):
  size = SMALL.get(name, 32)
  cfg = Config(model=name, image_size=size, augment="none", weights="none").resolve_augment()
  bias = np.log(np.array([0.1, 0.5, 0.25]) / np.array([0.9, 0.5, 0.75]))
  model = models.build_model(cfg, num_classes=K, channels=1, output_bias=bias, task="multi_label")
  assert tuple(model.output.shape) == (None, K)
  np.testing.assert_allclose(model.get_layer("probabilities").bias.numpy(), bias, rtol=1e-6)
  model.compile(keras.optimizers.Adam(1e-3), multilabel.MaskedBinaryCrossentropy(),
                metrics=multilabel.make_metrics(FINDINGS), run_eagerly=True)
  x = np.random.default_rng(0).integers(0, 256, (2, size, size, 1), dtype=np.uint8)
  y = np.array([[1, 0, 1, 1, 1, 0], [0, 1, 0, 1, 0, 1]], np.float32)
  logs = model.train_on_batch(x, y, return_dict=True)
  assert np.isfinite(logs["loss"]) and {"auc", *METRICS} <= set(logs)
  p = model.predict(x, verbose=0)
  assert p.shape == (2, K) and p.dtype == np.float32 and np.all((p >= 0) & (p <= 1))
  assert model.get_layer("probabilities").activation.__name__ == "sigmoid"   # independent, not softmax


def test_multi_label_output_errors(_float32_policy):
  cfg = Config(model="xray_cnn", image_size=32, augment="none").resolve_augment()
  one = models.build_model(cfg, num_classes=1, channels=1, task="multi_label")   # one finding is fine
  assert tuple(one.output.shape) == (None, 1)
  with pytest.raises(models.ModelError, match="expected \\(3,\\) for 3 findings"):
    models.build_model(cfg, num_classes=3, channels=1, output_bias=np.zeros(2), task="multi_label")
  with pytest.raises(models.ModelError, match="task must be one of"):
    models.build_model(cfg, num_classes=3, channels=1, task="multi_class")


# ---------------------------------------------------------------------------
# Training: metrics in the history, beats chance, resumes
# ---------------------------------------------------------------------------

class _Preempted(Exception):
  pass


def test_multi_label_training_logs_auc_per_finding_beats_chance_and_resumes(
    ml_data, tmp_path, monkeypatch, _float32_policy):
  data_dir, _ = ml_data
  run = str(tmp_path / "run")
  # As on GPUs/TPUs: MirroredStrategy (one CPU replica; metric variables are sync-on-read) and
  # mixed precision (they are autocast variables too). steps_per_execution=2: train_lib passes
  # validation_steps to Keras only then, which a distributed validation set needs.
  cfg = _cfg(data_dir, run, epochs=3, early_stopping_patience=3, reduce_lr_patience=2,
             strategy="mirrored", steps_per_execution=2, mixed_precision="bfloat16")
  real_make_callbacks = train_lib.make_callbacks

  def crash_after_epoch_two(*args, **kw):
    cbs = real_make_callbacks(*args, **kw)

    class Crash(keras.callbacks.Callback):
      def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
          raise _Preempted()   # after BackupAndRestore saved this epoch
    return cbs + [Crash()]

  monkeypatch.setattr(train_lib, "make_callbacks", crash_after_epoch_two)
  with pytest.raises(_Preempted):
    train_lib.train_and_evaluate(cfg, verbose=0)
  before = _history(run)
  assert [int(r["epoch"]) for r in before] == [0, 1]

  monkeypatch.setattr(train_lib, "make_callbacks", real_make_callbacks)
  result = train_lib.train_and_evaluate(cfg, verbose=0)
  rows = _history(run)
  assert [int(r["epoch"]) for r in rows] == [0, 1, 2] and rows[:2] == before   # resumed, not redone
  for col in ["loss", "auc", "val_loss", "val_auc", "lr"] + METRICS + [f"val_{m}" for m in METRICS]:
    assert col in rows[0], col
  for absent in ("accuracy", "precision", "pr_auc"):
    assert absent not in rows[0]
  best = max(float(r["val_auc"]) for r in rows)
  print("val mean AUC per epoch:", [round(float(r["val_auc"]), 3) for r in rows],
        "per finding (last):", {m: round(float(rows[-1][f"val_{m}"]), 3) for m in METRICS})
  # Every finding's sign is plain to see: far above chance. Ignored entries carry the
  # opposite label, so an AUC that counted them would stay near 0.75 (one finding 0.6).
  assert best >= 0.9, rows
  # Each finding reaches 0.85 in some epoch (3 short epochs under mixed precision vary a little;
  # the last epoch's lowest finding measured 0.82-0.99 over reruns).
  assert min(max(float(r[f"val_{m}"]) for r in rows) for m in METRICS) >= 0.85, rows
  # The mean is the mean of the per-finding AUCs (every finding has both labels in val).
  last = rows[-1]
  assert float(last["val_auc"]) == pytest.approx(np.mean([float(last[f"val_{m}"]) for m in METRICS]),
                                                 abs=1e-4)

  doc = json.load(open(os.path.join(run, "config.json")))
  info = doc["run"]
  assert doc["status"] == "finished" and info["task"] == "multi_label"
  assert info["label_mode"] == "multi_label" and info["monitor"] == "val_auc"
  assert info["best"]["value"] == pytest.approx(best, abs=1e-4)
  assert [f["name"] for f in info["findings"]] == FINDINGS
  assert [f["metric"] for f in info["findings"]] == METRICS
  manifest = schema.read_manifest(data_dir)
  np.testing.assert_allclose(info["output_bias"], stats.initial_bias(manifest), rtol=1e-6)
  np.testing.assert_allclose([f["positive_weight"] for f in info["findings"]],
                             stats.positive_weights(manifest), rtol=1e-6)   # --class_weight=balanced
  assert info["class_weight"] == {}
  copy = json.load(open(os.path.join(run, "dataset.json")))
  assert copy["task"] == "multi_label" and copy["classes"] == FINDINGS

  assert tuple(result.model.output.shape) == (None, K)
  final = keras.models.load_model(os.path.join(run, "model.keras"), compile=False)
  x = next(iter(input_pipeline.eval_dataset(data_dir, "val", _spec(), batch_size=8,
                                            label_mode="multi_label")))[0]
  p = final.predict(x, verbose=0)
  assert p.shape == (8, K) and np.all((p > 0) & (p < 1))
  np.testing.assert_allclose(p, result.model.predict(x, verbose=0), rtol=1e-5)


def test_single_label_runs_are_unchanged(trained_run):
  run = trained_run   # the shared single-label run (tests/conftest.py): demo data, 1 epoch
  rows = _history(run)
  for col in ("loss", "accuracy", "precision", "recall", "auc", "pr_auc", "val_auc", "val_pr_auc"):
    assert col in rows[0], col
  assert not any(k.startswith(("auc_", "val_auc_")) for k in rows[0])
  info = json.load(open(os.path.join(run, "config.json")))["run"]
  assert info["task"] == "single_label" and info["label_mode"] == "binary" and "findings" not in info
  assert set(info["class_weight"]) == {"0", "1"}
  loaded = rundir.load(run)
  assert tuple(loaded.model.output.shape) == (None, 1)
  assert loaded.model.get_layer("probabilities").activation.__name__ == "sigmoid"
  assert loaded.manifest.get("task", "single_label") == "single_label"


def test_chexnet_recipe_trains_on_multi_label_data(chexnet_recipe_run):
  """configs/chexnet.flags as written, made CPU-fast (as tests/test_configs.py does), on multi-label
  data (this module's, tests/_multilabel.py): the one training both tests check
  (conftest.chexnet_recipe_run)."""
  from tests import _runs
  run = chexnet_recipe_run
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "chexnet.flags"
  assert "14-finding NIH" in path.read_text()
  cfg = _runs.recipe_config(path, _runs.recipe_flags(rundir.read_config(run)["data_dir"], run, 32))
  assert (cfg.model, cfg.class_weight, cfg.horizontal_flip) == ("densenet121", "balanced", True)
  saved = rundir.read_config(run)   # what the run was trained with
  assert (saved["model"], saved["class_weight"], saved["horizontal_flip"]) == (
      cfg.model, cfg.class_weight, cfg.horizontal_flip)
  model = keras.models.load_model(os.path.join(run, "model.keras"), compile=False)
  assert tuple(model.output.shape) == (None, K)
  assert {"val_auc", *(f"val_{m}" for m in METRICS)} <= set(_history(run)[0])
