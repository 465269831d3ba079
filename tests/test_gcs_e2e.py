"""gs:// end to end through a local GCS emulator, with the commands a user types.

images on gs:// -> convert -> shards + dataset.json on gs:// -> inspect (grid on
gs://) -> train into a gs:// run directory -> evaluate, export, predict and
summary reading that run back from gs://.

What the emulator cannot cover: tf.data reading the shards for training. That
stays on TensorFlow's own gs:// file system (it has no endpoint setting), so
training here reads a local copy of the converted data through the same
TFRecordDataset code path every other test uses.
"""

import csv
import io
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tfrecord_tools import records, schema, storage

# TFDS's metadata beside dataset.json (tfrecord_tools.convert.tfds_metadata; a single-label set).
TFDS_FILES = ["dataset_info.json", "features.json", "image.class.label.labels.txt"]

pytestmark = pytest.mark.slow


def _cli(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _upload_tree(local: str, remote: str) -> int:
  n = 0
  for folder, _, files in os.walk(local):
    for name in files:
      path = os.path.join(folder, name)
      storage.upload_file(path, f"{remote}/{os.path.relpath(path, local)}")
      n += name.endswith(".png")   # the generator also writes synthetic.json
  return n


def _local_conversion(images: str, out: str) -> str:
  """The reference: the same images converted locally, in this process (the library the
  command runs, with the flags' defaults and --num_shards=2 --num_workers=1)."""
  from tfrecord_tools import convert as convert_lib  # noqa: PLC0415
  convert_lib.convert(convert_lib.ConvertOptions(input_dir=images, output_dir=out, num_shards=2,
                                                 num_workers=1, quiet=True))
  return out


def _records(data_dir: str) -> dict[str, bytes]:
  """file name -> shard bytes, for every shard a manifest lists."""
  manifest = schema.read_manifest(data_dir)
  return {s["file"]: storage.read_bytes(storage.join(data_dir, s["file"]))
          for split in manifest["splits"].values() for s in split["shards"]}


def test_convert_inspect_train_evaluate_export_predict_on_gcs(gcs_emulator, demo_images_dir, tmp_path):
  root = gcs_emulator.url(f"e2e/{tmp_path.name}")
  images, data, run = f"{root}/images", f"{root}/data", f"{root}/runs/xray"
  n_images = _upload_tree(demo_images_dir, images)

  # ---- convert: gs:// in, gs:// out; the same bytes as a local conversion ------------
  args = ["--num_shards=2", "--num_workers=1"]
  out = _ok(_cli("tfrecord_tools.convert", f"--input_dir={images}", f"--output_dir={data}", *args))
  assert f"converted {n_images} of {n_images} files" in out.stdout
  local_data = _local_conversion(demo_images_dir, str(tmp_path / "local_data"))
  remote_shards = _records(data)
  assert remote_shards == _records(local_data) and len(remote_shards) == 6
  remote_manifest = schema.read_manifest(data)
  assert remote_manifest["num_converted"] == n_images
  assert storage.listdir(data) == sorted([schema.MANIFEST_NAME, *remote_shards, *TFDS_FILES])  # no state left
  # A rerun finds the finished data set on GCS and refuses without --overwrite.
  again = _cli("tfrecord_tools.convert", f"--input_dir={images}", f"--output_dir={data}", *args)
  assert again.returncode == 2 and "already holds a converted data set" in again.stderr

  # ---- inspect reads the records from GCS and writes the grid there ----------------------
  grid = f"{root}/grid.png"
  insp = _ok(_cli("tfrecord_tools.inspect", data, f"--grid={grid}"))
  assert f"read {n_images} records from {data}: OK" in insp.stdout
  assert storage.read_bytes(grid)[:8] == b"\x89PNG\r\n\x1a\n"
  assert sum(1 for _ in records.read_records(f"{data}/{next(iter(remote_shards))}")) > 0

  # ---- train into gs://: TFRecords read locally (TF's own gs:// cannot reach an emulator) --
  with storage.local_copy(data) as train_data:
    train_args = [f"--data_dir={train_data}", f"--model_dir={run}", "--model=xray_cnn",
                  "--image_size=32", "--batch_size=8", "--epochs=2", "--augment=none",
                  "--cache=off", "--seed=0"]
    tr = _ok(_cli("xraytpu.train", *train_args))
    assert "pushed" in tr.stderr
    names = {rel for rel, _, _ in storage.walk_files(run)}
    assert {"config.json", "history.csv", "dataset.json", "model.keras",
            "checkpoints/best.weights.h5"} <= names
    assert any(n.startswith("logs/train/") for n in names)
    assert not any(n.startswith("backup/") for n in names)   # removed at the end, remotely too
    cfg = json.loads(storage.read_text(f"{run}/config.json"))
    assert cfg["status"] == "finished" and cfg["model_dir"] == run
    rows = list(csv.DictReader(io.StringIO(storage.read_text(f"{run}/history.csv"))))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    # The finished run is read back from GCS: a second train refuses it.
    refused = _cli("xraytpu.train", *train_args)
    assert refused.returncode != 0 and "holds a finished run" in refused.stderr

    # ---- evaluate: model from GCS, report + operating point written to GCS -------------
    _ok(_cli("xraytpu.evaluate", f"--model_dir={run}", f"--data_dir={train_data}", "--split=test",
             "--bootstrap_resamples=50"))
  found = storage.glob(f"{run}/eval/*-test/report.json")
  assert len(found) == 1, storage.walk_files(run)
  report = json.loads(storage.read_text(found[0]))
  assert {"predictions.csv", "report.md", "roc.png"} <= set(storage.listdir(storage.dirname(found[0])))
  assert report["num_examples"] == 8 and 0.0 <= report["auc"] <= 1.0
  assert storage.exists(f"{run}/threshold.json")

  # ---- export to gs:// and serve the SavedModel back from there ---------------------------
  _ok(_cli("xraytpu.export", f"--model_dir={run}"))
  exported = {rel for rel, _, _ in storage.walk_files(f"{run}/export/1")}
  assert {"saved_model.pb", "assets.extra/xraytpu.json"} <= exported
  assert any(n.startswith("variables/") for n in exported)

  # ---- predict: model and images on gs://, predictions written to gs:// -----------------
  test_images = f"{images}/test"
  pred_csv = f"{root}/predictions.csv"
  pr = _ok(_cli("xraytpu.predict", f"--model_dir={run}", test_images, f"--output={pred_csv}"))
  rows = list(csv.DictReader(io.StringIO(storage.read_text(pred_csv))))
  assert len(rows) == 8 and all(r["path"].startswith(test_images) and not r["error"] for r in rows)
  assert "wrote 8 predictions" in pr.stderr

  from xraytpu.inference import export_lib  # noqa: PLC0415
  first = sorted(rows, key=lambda r: r["path"])[0]
  probs = export_lib.serve(f"{run}/export/1", [storage.read_bytes(first["path"])])
  assert abs(float(probs[0, 1]) - float(first["prob_PNEUMONIA"])) < 1e-4

  summ = _ok(_cli("xraytpu.summary", run))
  assert "training: 2 epochs" in summ.stdout and "eval:" in summ.stdout


def test_train_resumes_from_the_gcs_copy(gcs_emulator, demo_data_dir, tmp_path):
  """A preempted run (backup on GCS, no model.keras) resumes on a machine that has
  no local copy: the mirror pulls the backup, training goes on from the next epoch."""
  from xraytpu.training import train_lib  # noqa: PLC0415
  from xraytpu.config import Config  # noqa: PLC0415
  run = gcs_emulator.url(f"resume/{tmp_path.name}")
  cfg = Config(data_dir=demo_data_dir, model_dir=run, model="xray_cnn", image_size=32,
               batch_size=8, epochs=2, augment="none", cache="off", seed=0).resolve_augment()

  class Preempted(Exception):
    pass

  real_push = storage.Mirror.push
  pushes = []

  def push_then_die(self, *a, **k):
    out = real_push(self, *a, **k)
    pushes.append(out)
    if len(pushes) == 1:       # right after epoch 1 reached GCS: the machine goes away
      raise Preempted()
    return out

  storage.Mirror.push = push_then_die
  try:
    with pytest.raises(Preempted):
      train_lib.train_and_evaluate(cfg, verbose=0)
  finally:
    storage.Mirror.push = real_push
  names = {rel for rel, _, _ in storage.walk_files(run)}
  assert any(n.startswith("backup/") for n in names) and "model.keras" not in names
  assert json.loads(storage.read_text(f"{run}/config.json"))["status"] == "running"

  result = train_lib.train_and_evaluate(cfg, verbose=0)
  assert [int(r["epoch"]) for r in result.history] == [0, 1]
  assert result.run_dir == run
  assert json.loads(storage.read_text(f"{run}/config.json"))["run"]["resumed"] is True
  assert storage.exists(f"{run}/model.keras")


def test_beam_conversion_writes_to_gcs(gcs_emulator, demo_images_dir, tmp_path):
  """--runner=beam (DirectRunner) writes the same shards to gs:// as the local converter."""
  out = gcs_emulator.url(f"beam/{tmp_path.name}")
  args = ["--num_shards=2", "--num_workers=1"]
  _ok(_cli("tfrecord_tools.convert", "--runner=beam", f"--input_dir={demo_images_dir}",
           f"--output_dir={out}", *args))
  local = _local_conversion(demo_images_dir, str(tmp_path / "local"))
  assert _records(out) == _records(local)
  assert storage.listdir(out) == sorted([schema.MANIFEST_NAME, *_records(local), *TFDS_FILES])
