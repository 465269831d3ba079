"""Ensembles of runs (xraytpu.run.ensemble): evaluate, predict, serve and export average the
runs' raw probabilities; the ensemble directory holds its own operating point and reports.

The members are two private copies of the shared `trained_run` (no new training), the
second with its output layer's weights scaled so the two models answer differently.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests._runs import copy_run
from xraytpu.inference import model_call, predict_lib
from xraytpu.run import ensemble, rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _perturb(run_dir: str) -> None:
  """Scales the run's output layer (model.keras and the best weights) in place."""
  run = rundir.load(run_dir)
  layer = run.model.get_layer("probabilities")
  layer.set_weights([w * 1.7 + 0.05 for w in layer.get_weights()])
  run.model.save(rundir.path(run_dir, rundir.MODEL))
  run.model.save_weights(rundir.path(run_dir, rundir.BEST_WEIGHTS))


@pytest.fixture(scope="module")
def members(trained_run, tmp_path_factory) -> list[str]:
  runs = []
  for name in ("run_a", "run_b"):
    copy = copy_run(trained_run, tmp_path_factory.mktemp(name))
    runs.append(os.path.join(os.path.dirname(copy), name))
    os.rename(copy, runs[-1])
  _perturb(runs[1])
  return runs


@pytest.fixture(scope="module")
def evaluated(members, tmp_path_factory):
  """evaluate --model_dir=A,B --ensemble_dir=ENS (50 resamples, no plots): (ENS, report)."""
  from xraytpu.evaluation import evaluate_lib
  ens = str(tmp_path_factory.mktemp("ens") / "ensemble")
  report = evaluate_lib.evaluate(",".join(members), ensemble_dir=ens, split="test", n_resamples=50,
                                 write_plots=False)
  return ens, report


@pytest.fixture(scope="module")
def expected(evaluated, demo_data_dir):
  """ENS loaded (--model_dir=ENS) and what predict answers for the test films: (run, files, results)."""
  run = ensemble.load_model_dir(evaluated[0])
  files = _files(demo_data_dir)
  return run, files, predict_lib.predict_files(run, files)


def _files(demo_data_dir) -> list[str]:
  from tfrecord_tools import schema
  root = schema.read_manifest(demo_data_dir)["args"]["input_dir"]
  return sorted(glob.glob(os.path.join(root, "test", "*", "*.png")))


def test_predict_averages_the_runs_raw_probabilities(members, demo_data_dir, tmp_path):
  """--model_dir=A,B without --ensemble_dir: in memory, P = mean of the runs' raw outputs."""
  files = _files(demo_data_dir)
  out, err, csv_path = io.StringIO(), io.StringIO(), str(tmp_path / "p.csv")
  assert predict_lib.run_predict(",".join(members), files, out=out, err=err, output=csv_path) == 0
  # No operating point: the note a run never evaluated gets, and threshold 0.5.
  assert f"has no {rundir.OPERATING_POINT}; using threshold 0.5" in err.getvalue()
  assert len(out.getvalue().splitlines()) == len(files)
  with open(csv_path) as f:
    rows = list(csv.DictReader(f))
  assert {r["threshold"] for r in rows} == {"0.5"}
  # Each run alone (its weights as rundir.load picks them), on the same pixels.
  a, b = rundir.load(members[0]), rundir.load(members[1])
  module = model_call.module_of(a)
  pix = np.stack([module.file_pixels(predict_lib.file_bytes(f)) for f in files])
  raw_a, raw_b = (np.asarray(r.model(pix))[:, 0] for r in (a, b))
  assert np.abs(raw_a - raw_b).max() > 1e-3            # the runs differ
  mean = (raw_a + raw_b) / 2
  np.testing.assert_allclose([float(r["prob_PNEUMONIA"]) for r in rows], mean, atol=1e-6)
  np.testing.assert_allclose([float(r["prob_NORMAL"]) for r in rows], 1 - mean, atol=1e-6)


def test_evaluate_writes_the_operating_point_and_report_into_the_ensemble_dir(members, evaluated):
  ens, report = evaluated
  assert report["model_dir"] == ens
  assert report["report_dir"].startswith(os.path.join(ens, rundir.EVAL))
  op = json.load(open(rundir.path(ens, rundir.OPERATING_POINT)))
  assert op["source_split"] == "val" and op["threshold"] is not None
  doc = json.load(open(rundir.path(ens, rundir.ENSEMBLE)))
  assert [m["path"] for m in doc["members"]] == [os.path.abspath(m) for m in members]
  assert all(len(m["weights_sha256"]) == 64 for m in doc["members"])
  for m in members:   # the runs themselves are left as they were
    assert not os.path.exists(rundir.path(m, rundir.OPERATING_POINT))
  card = open(rundir.path(ens, rundir.MODEL_CARD)).read()
  assert "ensemble of 2 runs" in card
  assert all(f"`{os.path.basename(m)}`" in card for m in members)
  # --model_dir=ENS is a run to every door: its own threshold.
  run = ensemble.load_model_dir(ens)
  assert run.is_ensemble and run.threshold == op["threshold"]
  # rundir.load loads one run: an ensemble is refused in one line naming what loads it.
  with pytest.raises(rundir.RunError, match="ensemble.load_model_dir") as e:
    rundir.load(ens)
  assert "\n" not in str(e.value)
  # The same members again reuse the folder; other members are refused in one line.
  assert ensemble.create(ens, members[::-1])["created"] == doc["created"]
  with pytest.raises(ensemble.EnsembleError, match="is the ensemble of") as e:
    ensemble.create(ens, [members[0], members[0] + "x"])
  assert "\n" not in str(e.value)


def test_evaluate_with_a_list_and_no_ensemble_dir_is_refused_in_one_line(members):
  from xraytpu.evaluation import evaluate_lib
  with pytest.raises(evaluate_lib.EvaluateError, match="add --ensemble_dir=DIR") as e:
    evaluate_lib.evaluate(",".join(members))
  assert "\n" not in str(e.value) and "xraytpu.evaluate" in str(e.value)


def test_export_is_one_savedmodel_that_answers_as_predict(evaluated, expected):
  import tensorflow as tf
  from xraytpu.inference import export_lib
  ens, _ = evaluated
  run, files, results = expected
  path = export_lib.export(ens)
  assert path == os.path.join(ens, rundir.EXPORT, "1")
  assert len(export_lib.load_metadata(path)["ensemble"]) == 2
  out = tf.saved_model.load(path).signatures["serving_default"](
      image_bytes=tf.constant([open(f, "rb").read() for f in files]))
  for r, p, label in zip(results, out["probabilities"].numpy(), out["label"].numpy()):
    np.testing.assert_allclose(p, [r.probabilities[c] for c in run.classes], atol=1e-6)
    assert label.decode() == r.label


def test_serve_answers_as_predict(evaluated, expected):
  from xraytpu.config import ServeOptions
  from xraytpu.serving import service
  run, files, results = expected
  app = service.App(run, ServeOptions(model_dir=evaluated[0]))
  try:
    answer = app.predict([(os.path.basename(f), open(f, "rb").read()) for f in files[:3]])
  finally:
    app.close()
  assert answer["model"] == "ensemble" and answer["threshold"] == run.threshold
  for r, item in zip(results, answer["predictions"]):
    assert item["label"] == r.label
    np.testing.assert_allclose([item["probabilities"][c] for c in run.classes],
                               [r.probabilities[c] for c in run.classes], atol=1e-6)


def test_a_run_changed_after_the_ensemble_was_made_is_refused(members, tmp_path):
  a, b = (copy_run(m, tmp_path / n) for m, n in zip(members, ("a", "b")))
  ens = str(tmp_path / "ens")
  ensemble.create(ens, [a, b])
  _perturb(b)   # "retrained"
  with pytest.raises(rundir.RunError, match="changed since the ensemble") as e:
    ensemble.load_model_dir(ens)
  assert "\n" not in str(e.value)


def test_an_ensemble_is_not_a_member(members, evaluated):
  ens, _ = evaluated
  with pytest.raises(predict_lib.PredictError, match="members must be runs") as e:
    predict_lib.load(f"{members[0]},{ens}")
  assert "\n" not in str(e.value)


def test_runs_that_disagree_are_refused_by_the_command_in_one_line(members, tmp_path, demo_data_dir):
  """Other image size, other classes: refused before a model is loaded, naming both runs."""
  other = copy_run(members[0], tmp_path / "size")
  cfg = json.load(open(rundir.path(other, rundir.CONFIG)))
  cfg["image_size"] = 64
  json.dump(cfg, open(rundir.path(other, rundir.CONFIG), "w"))
  renamed = copy_run(members[0], tmp_path / "classes")
  manifest = json.load(open(rundir.path(renamed, rundir.MANIFEST_COPY)))
  manifest["classes"] = manifest["classes"][::-1]
  json.dump(manifest, open(rundir.path(renamed, rundir.MANIFEST_COPY), "w"))
  with pytest.raises(ensemble.EnsembleError, match="their classes differ"):
    ensemble.load_members([members[0], renamed], "x")
  proc = subprocess.run(
      [sys.executable, "-m", "xraytpu.predict", f"--model_dir={members[0]},{other}",
       _files(demo_data_dir)[0]], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  lines = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
  assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert "image size differ (32 vs 64)" in lines[0] and os.path.basename(other) in lines[0]


def test_runs_trained_on_other_data_need_allow_data_change(members, tmp_path):
  """An ensemble's training data is its runs': one trained on other data (another digest) is a
  change evaluate refuses on the training data, in one line, unless --allow_data_change."""
  from xraytpu.evaluation import evaluate_lib, training_data
  other = copy_run(members[1], tmp_path / "other")
  cfg = json.load(open(rundir.path(other, rundir.CONFIG)))
  cfg["run"]["data"]["digest"] = "0" * 64
  json.dump(cfg, open(rundir.path(other, rundir.CONFIG), "w"))
  with pytest.raises(training_data.DataChangedError, match="trained on other data") as e:
    evaluate_lib.evaluate(f"{members[0]},{other}", ensemble_dir=str(tmp_path / "ens"),
                          n_resamples=10, write_plots=False)
  assert "\n" not in str(e.value) and "--allow_data_change" in str(e.value)
