"""TensorFlow Datasets both ways (issue 15).

(a) A converted folder carries TFDS metadata: `tfds.builder_from_directory`
    reads it without xraytpu, and `tfds.show_examples` draws it with class names.
(b) `xraytpu.train --data_dir=tfds:NAME` trains from a TFDS image-classification
    data set (a tiny builder written here; nothing is downloaded).
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from tfrecord_tools import convert as convert_lib, records, schema, synthetic
from tfrecord_tools.convert import tfds_metadata
from tfrecord_tools import inspect as tfr_inspect

tfds = pytest.importorskip("tensorflow_datasets")

# What TFDS writes for a single-label set (one ClassLabel: image/class/label).
TFDS_FILES = ["dataset_info.json", "features.json", "image.class.label.labels.txt"]


def _convert(inp, out, log=None, **kw) -> dict:
  kw.setdefault("num_workers", 1)
  kw.setdefault("quiet", True)
  kw.setdefault("num_shards", 2)
  return convert_lib.convert(convert_lib.ConvertOptions(input_dir=str(inp), output_dir=str(out), **kw),
                             log=log)


def _pil_pixels(encoded: bytes, channels: int) -> np.ndarray:
  """The record's image as PIL decodes it: [H, W, channels] (uint16 for 16-bit PNG)."""
  im = Image.open(io.BytesIO(encoded))
  if channels == 3:
    im = im.convert("RGB")
  a = np.asarray(im)
  if a.dtype == np.int32:           # PIL's I;16 / I modes
    a = a.astype(np.uint16)
  return a.reshape(a.shape[0], a.shape[1], -1)


def _own_records(out) -> dict[str, dict]:
  """filename -> parsed record (xraytpu's own reading: the reference)."""
  import tensorflow as tf
  m = schema.read_manifest(str(out))
  got = {}
  for split, info in m["splits"].items():
    for s in info["shards"]:
      for raw in records.read_records(os.path.join(out, s["file"])):
        ex = tf.io.parse_single_example(raw, records.feature_spec())
        ex = {k: v.numpy() for k, v in ex.items()}
        got[ex[records.FILENAME].decode()] = dict(ex, split=split)
  return got


def _tfds_writer_files(manifest: dict) -> dict[str, object]:
  """The metadata TFDS's own writer (`tfds.folder_dataset.write_metadata`) gives this data set:
  the reference tfds_metadata's hand-made JSON must equal (JSON parsed, labels.txt as text)."""
  import tempfile
  stats = manifest["image_stats"]
  formats = set(stats["format"])
  dtype = np.uint16 if "16" in stats["bit_depth"] else np.uint8
  encoding = (None if len(formats) != 1 or (dtype == np.uint16 and formats != {"png"})
              else next(iter(formats)))
  multi_label = manifest.get("task") == "multi_label"
  k = len(manifest["classes"])
  feats = {}
  for f in records.FEATURES:
    if f.omit_empty:     # in some records only: TFDS would require it in every one
      continue
    if f.key == records.ENCODED:
      feats[f.key] = tfds.features.Image(
          shape=(None, None, 3 if "3" in stats["channels"] else 1), dtype=dtype,
          encoding_format=encoding)
    elif f.key == records.LABEL:
      if not multi_label:
        feats[f.key] = tfds.features.ClassLabel(names=list(manifest["classes"]))
    elif f.kind == records.FLOAT_LIST:
      if multi_label:
        feats[f.key] = tfds.features.Tensor(shape=(k,), dtype=np.float32)
    elif f.kind == records.BYTES:
      feats[f.key] = tfds.features.Text()
    else:
      feats[f.key] = tfds.features.Scalar(dtype=np.int64)
  with tempfile.TemporaryDirectory() as tmp:
    template = tfds.core.ShardedFileTemplate(
        data_dir=tmp, template=tfds_metadata.TEMPLATE,
        dataset_name=tfds_metadata.dataset_name(manifest), filetype_suffix="tfrecord")
    shard_names = set()
    for info in manifest["splits"].values():
      for sh in info["shards"]:
        shard_names.add(sh["file"])
        open(os.path.join(tmp, sh["file"]), "wb").close()
    tfds.folder_dataset.write_metadata(
        data_dir=tmp, features=tfds.features.FeaturesDict(feats), filename_template=template,
        split_infos=[tfds.core.SplitInfo(name=split, num_bytes=0, filename_template=template,
                                         shard_lengths=[sh["num_examples"] for sh in info["shards"]])
                     for split, info in manifest["splits"].items()],
        check_data=False, description=tfds_metadata.dataset_info(manifest)["description"],
        supervised_keys=None if multi_label else (records.ENCODED, records.LABEL))
    got = {}
    for name in sorted(set(os.listdir(tmp)) - shard_names):
      text = pathlib.Path(tmp, name).read_text()
      got[name] = json.loads(text) if name.endswith(".json") else text
  return got


def _check_tfds_reads_everything(out, manifest):
  """Every split through TFDS: same images (pixel for pixel), labels and names as the records;
  and the metadata is what TFDS's own writer would have written."""
  ours = {name: (json.loads(data) if name.endswith(".json") else data.decode())
          for name, data in tfds_metadata.files(manifest).items()}
  assert ours == _tfds_writer_files(manifest)
  for name, want in ours.items():
    text = (out / name).read_text()
    assert (json.loads(text) if name.endswith(".json") else text) == want
  builder = tfds.builder_from_directory(str(out))
  info = builder.info
  assert sorted(info.splits) == sorted(manifest["splits"])
  own = _own_records(out)
  channels = 3 if "3" in manifest["image_stats"]["channels"] else 1
  sixteen = "16" in manifest["image_stats"]["bit_depth"]
  image_feature = info.features[records.ENCODED]
  assert image_feature.np_dtype == (np.uint16 if sixteen else np.uint8)
  seen = 0
  for split, sinfo in manifest["splits"].items():
    assert info.splits[split].num_examples == sinfo["num_examples"]
    assert info.splits[split].shard_lengths == [s["num_examples"] for s in sinfo["shards"]]
    for ex in tfds.as_numpy(builder.as_dataset(split=split)):
      ref = own[ex[records.FILENAME].decode()]
      assert ref["split"] == split
      want = _pil_pixels(ref[records.ENCODED], channels)
      if sixteen and want.dtype == np.uint8:
        want = want.astype(np.uint16) * 257    # TFDS's uint16 view of an 8-bit image
      assert ex[records.ENCODED].dtype == want.dtype
      if ref[records.FORMAT] == b"jpeg":   # TF's default IDCT is not libjpeg's accurate one
        assert np.abs(ex[records.ENCODED].astype(int) - want).max() <= 4
      else:
        np.testing.assert_array_equal(ex[records.ENCODED], want)
      assert ex[records.TEXT] == ref[records.TEXT]
      assert ex[records.PATIENT_ID] == ref[records.PATIENT_ID]
      if manifest.get("task") == "multi_label":
        assert records.LABEL not in ex
        np.testing.assert_array_equal(ex[records.MULTI_HOT], ref[records.MULTI_HOT])
        np.testing.assert_array_equal(ex[records.MASK], ref[records.MASK])
      else:
        assert ex[records.LABEL] == ref[records.LABEL]
        assert info.features[records.LABEL].int2str(ex[records.LABEL]) == ref[records.TEXT].decode()
        assert records.MULTI_HOT not in ex
      seen += 1
  assert seen == manifest["num_converted"] == len(own)
  return builder


@pytest.mark.parametrize("bit_depth,image_format,channels", [
    (8, "png", "keep"), (16, "png", "keep"), (8, "jpeg", "keep"), (8, "png", "3")])
def test_converted_folder_is_a_tfds_dataset(tmp_path, bit_depth, image_format, channels):
  inp = tmp_path / "images"
  synthetic.generate(str(inp), num_images=12, size=16, bit_depth=bit_depth, seed=1,
                     with_splits=True, image_format=image_format)
  out = tmp_path / "out"
  m = _convert(inp, out, channels=channels)
  assert sorted(os.listdir(out)) == sorted(
      ["dataset.json", *TFDS_FILES, *(s["file"] for sp in m["splits"].values() for s in sp["shards"])])
  builder = _check_tfds_reads_everything(out, m)
  assert builder.info.features[records.LABEL].names == m["classes"]
  assert builder.info.features[records.ENCODED].shape[-1] == (3 if channels == "3" else 1)
  assert builder.info.supervised_keys == (records.ENCODED, records.LABEL)
  image, label = next(iter(tfds.as_numpy(builder.as_dataset(split="train", as_supervised=True))))
  assert image.ndim == 3 and label in (0, 1)
  # Its own tools still see exactly the data set they wrote.
  report = tfr_inspect.inspect_dataset(str(out), log=lambda _: None)
  assert report["ok"], report["problems"]


@pytest.mark.parametrize("stats,task", [
    ({"format": {"png": 3, "jpeg": 2}, "bit_depth": {"8": 5}, "channels": {"1": 5}}, "single_label"),
    ({"format": {"png": 3, "jpeg": 2}, "bit_depth": {"8": 2, "16": 3}, "channels": {"1": 5}},
     "single_label"),
    ({"format": {"jpeg": 4}, "bit_depth": {"8": 4}, "channels": {"1": 1, "3": 3}}, "multi_label")])
def test_metadata_equals_tfds_own_writer(stats, task):
  """Mixed formats (no single encoding), 16-bit beside JPEG, RGB multi-label: the cases the
  converted synthetic sets above do not reach, checked against TFDS's writer file by file."""
  manifest = {"name": "odd set-1", "task": task, "classes": ["Normal", "Effusion", "Mass"],
              "image_stats": stats, "args": {"input_dir": "/data/films"},
              "splits": {"train": {"shards": [{"file": "train-00000-of-00002.tfrecord", "num_examples": 7},
                                              {"file": "train-00001-of-00002.tfrecord", "num_examples": 6}]},
                         "test": {"shards": [{"file": "test-00000-of-00001.tfrecord", "num_examples": 3}]}}}
  ours = {name: (json.loads(data) if name.endswith(".json") else data.decode())
          for name, data in tfds_metadata.files(manifest).items()}
  assert ours == _tfds_writer_files(manifest)


def test_tfds_loads_and_draws_it_without_xraytpu(tmp_path):
  """What a user of TFDS alone does: a fresh Python that never imports xraytpu or tfrecord_tools."""
  inp = tmp_path / "images"
  synthetic.generate(str(inp), num_images=12, size=16, seed=2, with_splits=True)
  out = tmp_path / "out"
  m = _convert(inp, out)
  script = f"""
import json, sys
import matplotlib; matplotlib.use("Agg")
import tensorflow_datasets as tfds
builder = tfds.builder_from_directory({str(out)!r})
ds = builder.as_dataset(split="train")
n = sum(1 for _ in ds)
fig = tfds.show_examples(ds, builder.info, rows=2, cols=3)
fig.savefig({str(tmp_path / "grid.png")!r})
print(json.dumps({{"n": n, "labels": [ax.get_xlabel() for ax in fig.axes],
                  "names": builder.info.features["image/class/label"].names,
                  "ours": sorted(m for m in sys.modules if m.split(".")[0] in ("xraytpu", "tfrecord_tools"))}}))
"""
  env = dict(os.environ, PYTHONPATH="")
  r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got["ours"] == []
  assert got["n"] == m["splits"]["train"]["num_examples"]
  assert got["names"] == m["classes"]
  assert len(got["labels"]) == 6
  assert all(lab in {f"{c} ({i})" for i, c in enumerate(m["classes"])} for lab in got["labels"])
  assert Image.open(tmp_path / "grid.png").size[0] > 100


def test_multi_label_set_is_a_tfds_dataset(tmp_path):
  root = tmp_path / "nih"
  synthetic.generate_labelled(str(root), "nih", num_images=24, size=16, seed=3)
  lists = ",".join(f"{sp}={root / f}" for sp, f in synthetic.NIH_LISTS.items())
  out = tmp_path / "out"
  m = _convert(root, out, labels_csv=str(root / synthetic.NIH_CSV), split_lists=lists,
               uncertain="ignore")
  assert m["task"] == "multi_label"
  builder = _check_tfds_reads_everything(out, m)
  k = len(m["classes"])
  assert builder.info.features[records.MULTI_HOT].shape == (k,)
  assert builder.info.features[records.MASK].shape == (k,)
  assert builder.info.supervised_keys is None
  assert "multi-label" in builder.info.description
  assert sorted(n for n in os.listdir(out) if tfds_metadata.is_metadata_file(n)) == [
      "dataset_info.json", "features.json"]   # no ClassLabel, so no labels.txt


def test_rerun_and_overwrite_keep_the_metadata_in_step(tmp_path):
  """Metadata never describes other shards: a rerun's checks ignore it, --overwrite renews it."""
  a, b = tmp_path / "a", tmp_path / "b"
  synthetic.generate(str(a), num_images=12, size=16, seed=4, with_splits=True)
  synthetic.generate(str(b), num_images=18, size=16, seed=5, with_splits=True, num_classes=3)
  out = tmp_path / "out"
  _convert(a, out)
  with pytest.raises(convert_lib.ConvertError, match="already holds a converted data set"):
    _convert(a, out)
  m = _convert(b, out, overwrite=True, num_shards=1)
  builder = _check_tfds_reads_everything(out, m)
  assert builder.info.features[records.LABEL].names == m["classes"] and len(m["classes"]) == 3
  # A conversion that fails before its manifest leaves no metadata behind to mislead TFDS.
  (a / "train" / "NORMAL" / "broken.png").write_bytes(b"not a png")
  with pytest.raises(convert_lib.ConvertError, match="could not be converted"):
    _convert(a, out, overwrite=True, max_skipped_fraction=0.0)
  assert not (out / schema.MANIFEST_NAME).exists()
  assert [n for n in os.listdir(out) if tfds_metadata.is_metadata_file(n)] == []


def test_a_metadata_failure_costs_only_the_metadata(tmp_path, monkeypatch):
  inp = tmp_path / "images"
  synthetic.generate(str(inp), num_images=12, size=16, seed=6, with_splits=True)
  out = tmp_path / "out"

  def broken(*_a, **_k):
    raise ValueError("no TFDS today\nsecond line")
  monkeypatch.setattr(tfds_metadata, "write", broken)
  logs = []
  m = _convert(inp, out, log=logs.append)
  assert schema.read_manifest(str(out))["num_converted"] == m["num_converted"] == 12
  warn = [line for line in logs if "TFDS" in line]
  assert warn == ["warning: TFDS metadata not written (ValueError: no TFDS today); the converted "
                  "data set itself is complete"]


# ---------------------------------------------------------------------------
# (b) --data_dir=tfds:NAME
# ---------------------------------------------------------------------------


class TinyXrays(tfds.core.GeneratorBasedBuilder):
  """A TFDS image classifier set written by this test: 28x28 grayscale, two classes.

  PNEUMONIA images carry a bright square a small CNN learns in one epoch. Splits
  train (40), validation (12), test (12) and "unlabeled" (4, which xraytpu leaves out).
  """
  VERSION = tfds.core.Version("1.0.0")
  pkg_dir_path = pathlib.Path(__file__).parent   # pytest imports this file as a module, not a package

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(names=["Normal", "Pneumonia"]),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager   # nothing is downloaded
    return {"train": self._generate_examples(40, 0), "validation": self._generate_examples(12, 1),
            "test": self._generate_examples(12, 2), "unlabeled": self._generate_examples(4, 3)}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      label = i % 2
      img = rng.integers(0, 60, size=(28, 28, 1), dtype=np.uint8)
      if label:
        img[8:20, 8:20] = 220
      yield f"{seed}-{i}", {"image": img, "label": label}


class TinyMultiXrays(tfds.core.GeneratorBasedBuilder):
  """Findings as a Sequence of ClassLabel (as TFDS's chexpert): not read, with a pointer."""
  VERSION = tfds.core.Version("1.0.0")
  pkg_dir_path = pathlib.Path(__file__).parent

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.Sequence(tfds.features.ClassLabel(names=["neg", "pos"])),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    raise AssertionError("never prepared: the features are checked first")

  def _generate_examples(self):
    raise AssertionError("never prepared")


def test_tfds_source_is_converted_once_and_trained_on(tmp_path):
  from xraytpu.evaluation import evaluate_lib
  from xraytpu.run import rundir
  from xraytpu.training import train_lib
  from xraytpu.config import Config
  from xraytpu.data import tfds_source
  tfds_dir = tmp_path / "tensorflow_datasets"
  logs = []
  out = tfds_source.materialise("tfds:tiny_xrays", tfds_data_dir=str(tfds_dir), log=logs.append)
  assert out == str(tfds_dir / "xraytpu" / "tiny_xrays" / "1.0.0")
  m = schema.read_manifest(out)
  assert m["name"] == "tfds:tiny_xrays/1.0.0"
  assert m["classes"] == ["Normal", "Pneumonia"]          # TFDS's label order
  assert {sp: i["num_examples"] for sp, i in m["splits"].items()} == {"train": 40, "val": 12, "test": 12}
  assert m["splits"]["val"]["class_counts"] == {"Normal": 6, "Pneumonia": 6}
  assert any("'unlabeled' left out" in line for line in logs)
  # The records hold TFDS's images unchanged and its labels.
  own = _own_records(out)
  builder = tfds.builder("tiny_xrays", data_dir=str(tfds_dir))
  for split, ours in (("train", "train"), ("validation", "val")):
    for i, ex in enumerate(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))):
      ref = own[f"{split}/{['Normal', 'Pneumonia'][ex['label']]}/{split}-{i:06d}.png"]
      assert ref["split"] == ours and ref[records.LABEL] == ex["label"]
      np.testing.assert_array_equal(_pil_pixels(ref[records.ENCODED], 1), ex["image"])
  # A second use reuses the copy.
  logs.clear()
  assert tfds_source.materialise("tfds:tiny_xrays:1.0.0", tfds_data_dir=str(tfds_dir),
                                 log=logs.append) == out
  assert logs == [f"tfds:tiny_xrays:1.0.0: using the converted copy in {out}"]

  # Training names the TFDS set; the run records the converted folder, so evaluate works as usual.
  run = tmp_path / "run"
  cache = tmp_path / "cache"
  cfg = Config(data_dir="tfds:tiny_xrays", tfds_data_dir=str(tfds_dir), tfds_cache_dir=str(cache),
               model_dir=str(run), model="xray_cnn", image_size=32, batch_size=8, epochs=1,
               augment="none", seed=0).resolve_augment()
  train_lib.train_and_evaluate(cfg, verbose=0)
  saved = rundir.read_config(str(run))
  assert saved["data_dir"] == str(cache) and saved["tfds_data_dir"] == str(tfds_dir)
  assert schema.read_manifest(str(cache))["classes"] == ["Normal", "Pneumonia"]
  # A cache folder that holds another data set is refused, not trained on.
  synthetic.generate(str(tmp_path / "images"), num_images=12, size=16, seed=7, with_splits=True)
  _convert(tmp_path / "images", tmp_path / "other")
  with pytest.raises(tfds_source.TfdsError, match=r"holds another data set \(other\), not "
                     r"tfds:tiny_xrays/1.0.0: choose another --tfds_cache_dir"):
    tfds_source.materialise("tfds:tiny_xrays", tfds_data_dir=str(tfds_dir),
                            cache_dir=str(tmp_path / "other"))
  report = evaluate_lib.evaluate(str(run), split="test", n_resamples=10, write_plots=False)
  assert report["classes"] == ["Normal", "Pneumonia"] and report["num_examples"] == 12
  assert report["dataset"] == "tfds_tiny_xrays_1.0.0"


@pytest.mark.parametrize("spec,message", [
    ("tfds:", "the data set name is missing"),
    ("tfds:no_such_set_xyz", "--data_dir=tfds:no_such_set_xyz: "),
    ("tfds:tiny_xrays:9.9.9", "--data_dir=tfds:tiny_xrays:9.9.9: "),
    ("tfds:tiny_multi_xrays", r"a multi-label TFDS set \('label' is a Sequence of ClassLabel\) is not "
                              r"read: convert the publisher's files with tfrecord_tools.convert "
                              r"--labels_csv"),
])
def test_tfds_source_user_errors_are_one_line(tmp_path, spec, message):
  from xraytpu.data import tfds_source
  with pytest.raises(tfds_source.TfdsError, match=message) as e:
    tfds_source.materialise(spec, tfds_data_dir=str(tmp_path))
  assert "\n" not in str(e.value)


def test_train_cli_names_an_unknown_tfds_set_in_one_line(tmp_path):
  r = subprocess.run([sys.executable, "-m", "xraytpu.train", "--data_dir=tfds:no_such_set_xyz",
                      f"--model_dir={tmp_path / 'run'}", f"--tfds_data_dir={tmp_path / 'tfds'}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("xraytpu.train: error: --data_dir=tfds:no_such_set_xyz: ") and "not found" in last
  assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------
# Issue 24 item 8: the TFDS set docs/tfds.md names prepares as installed, offline.
# ---------------------------------------------------------------------------


def _pneumonia_mnist_npz(path: pathlib.Path) -> dict[str, int]:
  """A small stand-in for MedMNIST's pneumoniamnist.npz (the arrays TFDS's builder reads)."""
  rng = np.random.default_rng(0)
  sizes = {"train": 12, "val": 4, "test": 4}
  arrays = {}
  for split, n in sizes.items():
    labels = np.arange(n) % 2
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    images[labels == 1, 8:20, 8:20] = 220
    arrays[f"{split}_images"] = images
    arrays[f"{split}_labels"] = labels.reshape(n, 1).astype(np.uint8)
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return sizes


def test_documented_pneumonia_mnist_prepares_offline_from_a_manual_download(tmp_path, monkeypatch):
  """docs/tfds.md's `--data_dir=tfds:pneumonia_mnist` through TFDS's own packaged builder, which
  imports importlib_resources (before: "cannot prepare the TFDS data set: No module named
  'importlib_resources'" in the environment `make venv` builds). Nothing is downloaded: the
  file is put in --tfds_manual_dir, as docs/tfds.md says for a machine without network; this
  stand-in's checksum is not zenodo's, so only that check is switched off."""
  from tensorflow_datasets.core.download import download_manager
  from xraytpu.data import tfds_source
  manual = tmp_path / "manual"
  manual.mkdir()
  sizes = _pneumonia_mnist_npz(manual / "pneumoniamnist.npz")
  monkeypatch.setattr(download_manager.DownloadManager, "_register_or_validate_checksums",
                      lambda self, **kw: None)
  monkeypatch.setattr(download_manager.DownloadManager, "_download",
                      lambda self, resource: pytest.fail(f"downloaded {resource.url}"))
  logs = []
  out = tfds_source.materialise("tfds:pneumonia_mnist", tfds_data_dir=str(tmp_path / "tfds"),
                                tfds_manual_dir=str(manual), log=logs.append)
  m = schema.read_manifest(out)
  assert m["name"] == "tfds:pneumonia_mnist/1.0.0" and m["classes"] == ["Normal", "Pneumonia"]
  assert {sp: i["num_examples"] for sp, i in m["splits"].items()} == sizes
  assert m["splits"]["test"]["class_counts"] == {"Normal": 2, "Pneumonia": 2}


def test_a_failed_tfds_download_is_one_line_naming_the_file_to_fetch(tmp_path, monkeypatch):
  """No network: one line that names the file and --tfds_manual_dir (docs/tfds.md)."""
  import requests
  from tensorflow_datasets.core.download import downloader
  from xraytpu.data import tfds_source

  def offline(self, url, destination_path, verify=True):   # what requests raises without network
    raise requests.exceptions.ConnectionError(
        f"HTTPSConnectionPool(host='zenodo.org', port=443): Max retries exceeded with url: {url}")
  monkeypatch.setattr(downloader._Downloader, "_sync_download", offline)
  with pytest.raises(tfds_source.TfdsError) as e:
    tfds_source.materialise("tfds:pneumonia_mnist", tfds_data_dir=str(tmp_path / "tfds"))
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("--data_dir=tfds:pneumonia_mnist: cannot prepare")
  assert ("the download failed (no network?): download https://zenodo.org/records/10519652/files/"
          "pneumoniamnist.npz (as pneumoniamnist.npz) on a machine with network") in msg
  assert "--tfds_manual_dir=FOLDER" in msg
