"""xraytpu.predict: files, folders, 16-bit, DICOM, corrupt inputs, Grad-CAM."""

from __future__ import annotations

import glob
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests._runs import copy_run
from xraytpu.inference import predict_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(trained_run):
  return trained_run


@pytest.fixture(scope="module")
def loaded(run_dir):
  return predict_lib.load(run_dir)


def _test_images(demo_data_dir):
  from tfrecord_tools import schema
  root = schema.read_manifest(demo_data_dir)["args"]["input_dir"]
  return root, sorted(glob.glob(os.path.join(root, "test", "*", "*.png")))


def test_same_pixels_and_probabilities_as_the_input_pipeline(loaded, demo_data_dir):
  """predict on the source files == the model on the converted records (one code path)."""
  from xraytpu.evaluation import evaluate_lib
  root, files = _test_images(demo_data_dir)
  split = evaluate_lib.predict_split(loaded, demo_data_dir, "test")
  by_name = {name: p for name, p in zip(split.filenames, split.probs)}
  results = predict_lib.predict_files(loaded, files)
  assert len(results) == 8 and all(r.error is None for r in results)
  for r in results:
    rel = os.path.relpath(r.path, root).replace(os.sep, "/")
    expected = by_name[rel]
    got = [r.probabilities[c] for c in loaded.classes]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert r.label == ("PNEUMONIA" if got[1] >= loaded.threshold else "NORMAL")
  # Without threshold.json the binary threshold is 0.5, with it the frozen one.
  assert loaded.threshold == 0.5


def test_corrupt_and_missing_files_are_reported_and_the_rest_predicted(run_dir, demo_data_dir, tmp_path):
  run = copy_run(run_dir, tmp_path)
  with open(os.path.join(run, "threshold.json"), "w") as f:
    json.dump({"threshold": 0.41, "policy": "youden", "source_split": "val", "temperature": None}, f)
  _, files = _test_images(demo_data_dir)
  bad = tmp_path / "corrupt.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  truncated = tmp_path / "truncated.jpeg"
  truncated.write_bytes(open(files[0], "rb").read()[:60])
  empty_dir = tmp_path / "empty"
  empty_dir.mkdir()
  inputs = [files[0], str(bad), str(tmp_path / "missing.png"), str(truncated), files[1], str(empty_dir)]
  out, err = io.StringIO(), io.StringIO()
  csv_path = str(tmp_path / "preds.csv")
  failed = predict_lib.run_predict(run, inputs, output=csv_path, out=out, err=err)
  assert failed == 4
  lines = out.getvalue().splitlines()
  assert len(lines) == 2
  for line in lines:
    path, text = line.split("\t")
    label, prob = text.split()[:2]
    assert label in ("NORMAL", "PNEUMONIA") and 0 <= float(prob) <= 1
    assert "threshold 0.41" in text
  errors = err.getvalue()
  assert f"{bad}\tERROR" in errors and "missing.png\tERROR no such file" in errors
  assert "truncated.jpeg\tERROR" in errors and "no image" in errors
  rows = open(csv_path).read().splitlines()
  assert rows[0].startswith("path,label,probability,prob_NORMAL,prob_PNEUMONIA")
  assert len(rows) == 1 + len(inputs)
  jsonl = str(tmp_path / "preds.jsonl")
  predict_lib.write_predictions(predict_lib.predict_files(predict_lib.load(run), inputs),
                                ["NORMAL", "PNEUMONIA"], jsonl)
  recs = [json.loads(x) for x in open(jsonl)]
  assert [r["error"] is None for r in recs] == [True, False, False, False, True, False]


@pytest.mark.slow
def test_cli_exit_code_and_gradcam(run_dir, demo_data_dir, tmp_path):
  _, files = _test_images(demo_data_dir)
  bad = tmp_path / "bad.jpeg"
  bad.write_bytes(b"garbage")
  cams = tmp_path / "cams"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  res = subprocess.run([sys.executable, "-m", "xraytpu.predict", f"--model_dir={run_dir}",
                        f"--gradcam={cams}", files[0], str(bad), files[-1]],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 1, res.stderr[-3000:]  # one input failed
  assert "Traceback" not in res.stderr
  # TensorFlow's start-up notices are filtered (tfrecord_tools.cli.TF_NOISE); the errors are not.
  assert "oneDNN custom operations" not in res.stderr and "absl::InitializeLog" not in res.stderr
  assert len(res.stdout.strip().splitlines()) == 2
  assert f"{bad}\tERROR not an image" in res.stderr
  pngs = sorted(os.listdir(cams))
  assert len(pngs) == 2 and all(".gradcam-" in p for p in pngs)
  im = Image.open(cams / pngs[0])
  assert im.mode == "RGB" and min(im.size) >= 256
  usage = subprocess.run([sys.executable, "-m", "xraytpu.predict", f"--model_dir={run_dir}",
                          "--output=x.txt", files[0]], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
  assert usage.returncode == 2 and ".csv or .jsonl" in usage.stderr and "Traceback" not in usage.stderr


def test_16bit_png_predicts_like_its_8bit_source(loaded, demo_data_dir, tmp_path):
  _, files = _test_images(demo_data_dir)
  a8 = np.asarray(Image.open(files[0]).convert("L"))
  p16 = tmp_path / "sixteen.png"
  Image.fromarray(a8.astype(np.uint16) * 257).save(p16)
  assert Image.open(p16).mode.startswith("I")
  r8, r16 = predict_lib.predict_files(loaded, [files[0], str(p16)])
  assert r16.error is None
  assert r16.probabilities["PNEUMONIA"] == pytest.approx(r8.probabilities["PNEUMONIA"], abs=1e-6)


def _dicom(raw, **attrs):
  """A pydicom data set holding `raw` as 12-bit stored values, with the given attributes."""
  from pydicom.dataset import Dataset, FileMetaDataset
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.set_pixel_data(raw, attrs.pop("PhotometricInterpretation", "MONOCHROME2"), 12)
  for k, v in attrs.items():
    setattr(ds, k, v)
  return ds


def test_dicom_pixels_rescale_window_and_monochrome1():
  """predict renders DICOM with tfrecord_tools.dicom: rescale first, then the window, then MONOCHROME1."""
  from tfrecord_tools import dicom
  pytest.importorskip("pydicom")
  raw = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)
  # CT-like: HU = 1 * raw - 1024; the lung window (-600, 1500) spans [-1350, 150] HU (LINEAR).
  ds = _dicom(raw, RescaleSlope=1, RescaleIntercept=-1024)
  out = dicom.pixels_of(ds, predict_lib.parse_window("lung"))
  hu = raw.astype(float) - 1024
  expected = np.round(np.clip((hu - (-600 - 0.5)) / 1499 + 0.5, 0, 1) * 255)
  np.testing.assert_array_equal(out, expected.astype(np.uint8))
  # MONOCHROME1: low values are white -> inverted; full range (of the stored 12 bits) -> 16-bit.
  ds1 = _dicom(raw, PhotometricInterpretation="MONOCHROME1")
  out1 = dicom.pixels_of(ds1, "full")
  assert out1.dtype == np.uint16 and out1[0, 0] == 65535 and out1[1, 1] == 0
  # The file's own window (multi-valued: the first is used) with --window=file.
  ds2 = _dicom(raw, WindowCenter=[2000, 0], WindowWidth=[2000, 1])
  out2 = dicom.pixels_of(ds2, "file")
  assert out2[0, 0] == 0 and out2[1, 0] == 128 and out2[1, 1] == 255
  # --window: auto = the run's own rendering; values are checked before anything is loaded.
  assert predict_lib.parse_window("auto") is None and predict_lib.parse_window("") is None
  assert predict_lib.parse_window("40,400") == "40,400"
  for bad in ("lungs", "40", "40,-1"):
    with pytest.raises(predict_lib.PredictError, match="--dicom_window"):
      predict_lib.parse_window(bad)


def test_dicom_without_pydicom_is_a_clear_per_file_error(loaded, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
  dcm = tmp_path / "scan.dcm"
  dcm.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
  (r,) = predict_lib.predict_files(loaded, [str(dcm)])
  assert r.error and "pydicom" in r.error


def test_gradcam_points_at_the_evidence():
  """A model whose only evidence is brightness: the map must peak on the bright patch."""
  from xraytpu.inference import gradcam
  from xraytpu._keras import keras
  inp = keras.Input((16, 16, 1), dtype="uint8")
  x = keras.layers.Rescaling(1 / 255.0)(inp)
  x = keras.layers.Conv2D(2, 1, kernel_initializer=keras.initializers.Constant([[[[1.0, -1.0]]]]),
                          use_bias=False)(x)
  x = keras.layers.Activation("linear", name="features")(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  out = keras.layers.Dense(1, activation="sigmoid", name="probabilities",
                           kernel_initializer=keras.initializers.Constant([[5.0], [-5.0]]))(x)
  model = keras.Model(inp, out)
  img = np.full((1, 16, 16, 1), 20, np.uint8)
  img[0, 10:14, 2:6] = 250
  cam = gradcam.GradCam(model)(img, [1])
  assert cam.shape == (1, 16, 16) and cam.max() == pytest.approx(1.0)
  assert np.unravel_index(cam[0].argmax(), (16, 16))[0] in range(9, 15)
  assert cam[0, 10:14, 2:6].mean() > 3 * cam[0, :6, 10:].mean()
  rgb = gradcam.overlay(img[0], cam[0])
  assert rgb.shape == (256, 256, 3) and rgb.dtype == np.uint8


def test_expand_inputs_walks_folders(tmp_path):
  (tmp_path / "a" / "b").mkdir(parents=True)
  for name in ("a/x.png", "a/b/y.JPG", "a/b/z.dcm", "a/notes.txt"):
    (tmp_path / name).write_bytes(b"x")
  got = predict_lib.expand_inputs([str(tmp_path / "a"), str(tmp_path / "nope")])
  names = [os.path.relpath(p, tmp_path) for p, e in got if e is None]
  assert names == [os.path.join("a", "x.png"), os.path.join("a", "b", "y.JPG"),
                   os.path.join("a", "b", "z.dcm")]
  assert got[-1][1] == "no such file or folder"
