"""xraytpu.export: a SavedModel taking encoded bytes, equal to xraytpu.predict."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests._runs import copy_run
from xraytpu.inference import export_lib, model_call, predict_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(trained_run):
  return trained_run


def _real_files(shared_data):
  """A few real images: 28x28 8-bit PNGs and 400x300 JPEG radiographs."""
  pngs = sorted(glob.glob(str(shared_data / "pneumoniamnist28" / "test" / "*" / "*.png")))
  jpegs = sorted(glob.glob(str(shared_data / "chest_xray_400x300" / "*" / "*.jpeg")))
  files = pngs[:3] + pngs[-3:] + jpegs[:2] + jpegs[-2:]
  assert len(files) == 10
  return files


@pytest.mark.slow
def test_export_round_trip_equals_predict_on_real_bytes(run_dir, shared_data, tmp_path):
  import tensorflow as tf
  run = copy_run(run_dir, tmp_path)
  with open(os.path.join(run, "threshold.json"), "w") as f:
    json.dump({"threshold": 0.5001, "policy": "youden", "source_split": "val",
               "temperature": 1.7}, f)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  res = subprocess.run([sys.executable, "-m", "xraytpu.export", f"--model_dir={run}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  path = os.path.join(run, "export", "1")
  assert f"SavedModel written to {path}" in res.stdout
  assert sorted(os.listdir(os.path.join(run, "export"))) == ["1"]  # no temp folder left
  meta = export_lib.load_metadata(path)
  assert meta["classes"] == ["NORMAL", "PNEUMONIA"] and meta["threshold"] == 0.5001
  assert meta["temperature"] == 1.7
  assert "Not DICOM" in meta["input"] and meta["conversion"]["dicom_window"] == "viewer"

  files = _real_files(shared_data)
  loaded_run = predict_lib.load(run)
  want = predict_lib.predict_files(loaded_run, files)
  assert all(r.error is None for r in want)
  expected = np.array([[r.probabilities[c] for c in loaded_run.classes] for r in want])

  served = tf.saved_model.load(path)
  fn = served.signatures["serving_default"]
  out = fn(image_bytes=tf.constant([open(f, "rb").read() for f in files]))
  np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
  assert [s.decode() for s in out["label"].numpy()] == [r.label for r in want]
  assert out["label_index"].numpy().tolist() == [loaded_run.classes.index(r.label) for r in want]

  # The pixel signature takes what the input pipeline yields.
  pixels = np.stack([predict_lib.file_pixels(model_call.module_of(loaded_run), open(f, "rb").read()) for f in files[:3]])
  out2 = served.signatures["serving_pixels"](image=tf.constant(pixels))
  np.testing.assert_allclose(out2["probabilities"].numpy(), expected[:3], atol=1e-5)

  # Versions: the next export is 2; an existing version is refused.
  assert export_lib.next_version(os.path.join(run, "export")) == 2
  with pytest.raises(export_lib.ExportError, match="already exists"):
    export_lib.export(run, version=1)


def test_next_version_ignores_non_integer_folders(tmp_path):
  root = tmp_path / "export"
  assert export_lib.next_version(str(root)) == 1
  for name in ("1", "7", ".tmp-8-123", "notes"):
    (root / name).mkdir(parents=True)
  assert export_lib.next_version(str(root)) == 8


def test_missing_run_is_a_one_line_error(tmp_path):
  with pytest.raises(export_lib.ExportError, match="no such run directory"):
    export_lib.export(str(tmp_path / "nope"))
