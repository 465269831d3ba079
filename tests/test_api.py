"""The Python front door (`import xraytpu`): the numbers are the command line's."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT

import xraytpu
from xraytpu.inference import predict_lib


@pytest.fixture(scope="module")
def run_dir(trained_run):
  return trained_run


def _files(demo_data_dir, n=5):
  from tfrecord_tools import schema
  root = schema.read_manifest(demo_data_dir)["args"]["input_dir"]
  return sorted(glob.glob(os.path.join(root, "test", "*", "*.png")))[:n]


def test_load_and_predict_equal_the_predict_command(run_dir, demo_data_dir, tmp_path):
  files = _files(demo_data_dir)
  out = tmp_path / "p.jsonl"
  res = subprocess.run([sys.executable, "-m", "xraytpu.predict", f"--model_dir={run_dir}",
                        f"--output={out}", *files], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  cli = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}

  run = xraytpu.load(run_dir)
  assert run.task == "binary" and run.classes == ["NORMAL", "PNEUMONIA"]
  got = run.predict(files)
  assert [p.path for p in got] == files
  for p in got:
    want = cli[p.path]
    assert p.label == want["label"] and p.threshold == pytest.approx(want["threshold"], abs=1e-6)
    for c in run.classes:
      assert p.probabilities[c] == pytest.approx(want["probabilities"][c], abs=1e-6)
  one = run.predict(files[0])                       # one input -> one Prediction
  assert isinstance(one, predict_lib.Prediction) and one.label == got[0].label
  assert one.probabilities["PNEUMONIA"] == pytest.approx(got[0].probabilities["PNEUMONIA"], abs=1e-6)

  # Encoded bytes and decoded uint8 pixels take the same path as the file.
  data = open(files[1], "rb").read()
  pixels = np.asarray(Image.open(files[1]))
  by_bytes, by_array = run.predict(data), run.predict(pixels)
  assert by_bytes.path == "<bytes 0>" and by_array.path == "<array 0>"
  for p in (by_bytes, by_array):
    assert p.label == got[1].label
    for c in run.classes:
      assert p.probabilities[c] == pytest.approx(got[1].probabilities[c], abs=1e-6)
  batch = run.predict(np.stack([pixels, pixels]))   # [N, H, W]: a batch of two
  assert len(batch) == 2 and batch[1].label == by_array.label
  assert batch[1].probabilities["PNEUMONIA"] == pytest.approx(by_array.probabilities["PNEUMONIA"], abs=1e-6)

  # A bad input: raised alone, reported in its place within a batch.
  with pytest.raises(predict_lib.InputError, match="not an image"):
    run.predict(b"garbage")
  mixed = run.predict([files[0], b"garbage", pixels.astype(np.float32)])
  assert mixed[0].error is None and mixed[0].label == got[0].label
  assert "not an image" in mixed[1].error and "uint8" in mixed[2].error


def test_load_names_a_missing_run_in_one_line(tmp_path):
  with pytest.raises(predict_lib.PredictError, match="no such run|not a run|does not exist"):
    xraytpu.load(str(tmp_path / "nowhere"))


def test_import_xraytpu_is_light():
  """`import xraytpu` must not load TensorFlow (a notebook's first cell, and every --help)."""
  code = "import sys, xraytpu; print('tensorflow' in sys.modules, xraytpu.__version__)"
  res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 0, res.stderr
  loaded_tf, version = res.stdout.split()
  assert loaded_tf == "False" and version == xraytpu.__version__


def test_train_refuses_an_unknown_option_in_one_line(tmp_path):
  from xraytpu.training import train_lib
  with pytest.raises(train_lib.TrainError, match="epoch"):
    xraytpu.train(str(tmp_path), str(tmp_path / "run"), epoch=3)
