"""tfrecord_tools.inspect: read every record back, reconcile counts, draw a sample grid."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import ROOT
from tfrecord_tools import inspect as tfr_inspect
from tfrecord_tools import records, schema, storage


@pytest.fixture
def data_copy(tmp_path, demo_data_dir):
  out = tmp_path / "data"
  shutil.copytree(demo_data_dir, out)
  return out


def test_clean_data_set_passes_and_grid_is_drawn(demo_data_dir, tmp_path):
  lines = []
  grid = tmp_path / "grid.png"
  report = tfr_inspect.inspect_dataset(demo_data_dir, grid_path=str(grid), grid_per_class=3,
                                       log=lines.append)
  assert report["ok"], report["problems"]
  assert report["num_records"] == 60
  assert report["counts"] == {"train": {"NORMAL": 22, "PNEUMONIA": 22},
                              "val": {"NORMAL": 4, "PNEUMONIA": 4},
                              "test": {"NORMAL": 4, "PNEUMONIA": 4}}
  assert any(line.split()[:3] == ["train", "2", "44"] for line in "\n".join(lines).splitlines())
  im = Image.open(grid)
  assert im.format == "PNG" and im.width > im.height > 100   # 2 rows x 3 columns


def test_corrupt_shard_is_reported(data_copy):
  m = schema.read_manifest(str(data_copy))
  shard = data_copy / m["splits"]["train"]["shards"][0]["file"]
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0xFF   # flip bits inside some record's data
  shard.write_bytes(bytes(data))
  report = tfr_inspect.inspect_dataset(str(data_copy), log=lambda _: None)
  assert not report["ok"]
  assert any(shard.name in p and ("corrupt" in p or "decode" in p) for p in report["problems"])


def test_count_mismatch_and_missing_shard_are_reported(data_copy):
  path = data_copy / "dataset.json"
  m = json.loads(path.read_text())
  m["splits"]["val"]["class_counts"]["NORMAL"] += 1
  m["splits"]["val"]["shards"][0]["num_examples"] += 1
  path.write_text(json.dumps(m))
  (data_copy / m["splits"]["test"]["shards"][0]["file"]).unlink()
  report = tfr_inspect.inspect_dataset(str(data_copy), log=lambda _: None)
  text = "\n".join(report["problems"])
  assert "val: class counts" in text
  assert "records but the manifest says" in text
  assert "missing" in text


def test_leakage_across_splits_is_reported(data_copy):
  m = schema.read_manifest(str(data_copy))
  train0 = data_copy / m["splits"]["train"]["shards"][0]["file"]
  val_path = data_copy / m["splits"]["val"]["shards"][0]["file"]
  val_path.write_bytes(val_path.read_bytes() + train0.read_bytes())   # train images in val too
  report = tfr_inspect.inspect_dataset(str(data_copy), log=lambda _: None)
  assert any("more than one split" in p for p in report["problems"])


def test_cli(demo_data_dir, tmp_path):
  grid = tmp_path / "g.png"
  r = subprocess.run([sys.executable, "-m", "tfrecord_tools.inspect", demo_data_dir,
                      f"--grid={grid}", "--grid_per_class=2"],
                     cwd=ROOT, capture_output=True, text=True, timeout=180)
  assert r.returncode == 0, r.stderr
  assert "read 60 records" in r.stdout and "OK" in r.stdout and grid.exists()
  r = subprocess.run([sys.executable, "-m", "tfrecord_tools.inspect", str(tmp_path)],
                     cwd=ROOT, capture_output=True, text=True, timeout=180)
  assert r.returncode == 2 and "Traceback" not in r.stderr and "no manifest" in r.stderr


def test_records_are_read_by_tensorflow_not_by_the_writer_code(data_copy, monkeypatch):
  """The converter's own framing reader is not used: a bug there cannot hide a bad shard."""
  def not_used(*args, **kwargs):
    raise AssertionError("inspect must read shards with tf.data.TFRecordDataset")
  monkeypatch.setattr(records, "read_records", not_used)
  monkeypatch.setattr(records, "iter_offsets", not_used)
  report = tfr_inspect.inspect_dataset(str(data_copy), log=lambda _: None)
  assert report["ok"], report["problems"]
  assert report["num_records"] == 60


def test_a_writer_bug_in_a_feature_type_is_caught_by_the_parse_spec(data_copy):
  """A record whose label was written as bytes (a writer bug) fails TensorFlow's parse."""
  buggy = tuple(dataclasses.replace(f, kind=records.BYTES) if f.key == records.LABEL else f
                for f in records.FEATURES)
  m = schema.read_manifest(str(data_copy))
  shard = data_copy / m["splits"]["val"]["shards"][0]["file"]
  raw = records.serialize_example(
      features=buggy, encoded=b"x", image_format="png", height=1, width=1, channels=1,
      bit_depth=8, label=b"1", text="PNEUMONIA", filename="val/PNEUMONIA/bug.png")
  shard.write_bytes(shard.read_bytes() + records.frame(raw))
  report = tfr_inspect.inspect_dataset(str(data_copy), log=lambda _: None)
  assert any(f"{shard.name} record 4: does not parse as an Example" in p
             for p in report["problems"]), report["problems"]


def test_truncated_shard_is_named(data_copy):
  m = schema.read_manifest(str(data_copy))
  shard = data_copy / m["splits"]["test"]["shards"][1]["file"]
  shard.write_bytes(shard.read_bytes()[:-7])
  report = tfr_inspect.inspect_dataset(str(data_copy), log=lambda _: None)
  assert any(p.startswith(f"{shard.name}: corrupt after ") for p in report["problems"]), (
      report["problems"])


def test_gcs_data_set_is_read_through_a_local_copy(gcs_emulator, demo_data_dir, tmp_path):
  """TensorFlow's gs:// cannot reach the emulator: inspect reads each gs:// shard from a
  temp copy, and names a corrupt one as it does locally."""
  data = gcs_emulator.url(f"inspect/{tmp_path.name}")
  for name in os.listdir(demo_data_dir):
    storage.upload_file(os.path.join(demo_data_dir, name), f"{data}/{name}")
  report = tfr_inspect.inspect_dataset(data, max_per_shard=3, log=lambda _: None)
  assert report["ok"], report["problems"]
  assert report["num_records"] == 18   # 3 per shard, 6 shards
  m = schema.read_manifest(data)
  name = m["splits"]["train"]["shards"][1]["file"]
  storage.write_bytes(f"{data}/{name}", storage.read_bytes(f"{data}/{name}")[:-7])
  report = tfr_inspect.inspect_dataset(data, log=lambda _: None)
  assert any(p.startswith(f"{name}: corrupt after ") for p in report["problems"]), (
      report["problems"])
