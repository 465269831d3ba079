"""tfrecord_tools.convert: folders -> validated, deterministic, resumable TFRecord shards."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from tfrecord_tools import convert as convert_lib, pool, records, schema, shards, synthetic
from tfrecord_tools.convert import ConvertError, ConvertOptions, convert


# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------


def _records(out) -> list[dict]:
  """Every record of every shard listed in the manifest, parsed (and CRC-checked by TF)."""
  import tensorflow as tf
  m = schema.read_manifest(str(out))
  rows = []
  for split in m["splits"]:
    for shard in m["splits"][split]["shards"]:
      n = 0
      for raw in tf.data.TFRecordDataset(os.path.join(out, shard["file"])):
        f = tf.train.Example.FromString(raw.numpy()).features.feature
        row = {k: (v.bytes_list.value[0] if v.HasField("bytes_list") else v.int64_list.value[0])
               for k, v in f.items()}
        row["split"], row["shard"] = split, shard["file"]
        rows.append(row)
        n += 1
      assert n == shard["num_examples"]
  return rows


# TFDS's metadata beside dataset.json (tfrecord_tools.convert.tfds_metadata; a single-label set).
TFDS_FILES = ["dataset_info.json", "features.json", "image.class.label.labels.txt"]


def _shard_bytes(out) -> dict[str, str]:
  return {n: hashlib.sha256(open(os.path.join(out, n), "rb").read()).hexdigest()
          for n in sorted(os.listdir(out)) if n.endswith(".tfrecord")}


def _opts(inp, out, **kw) -> ConvertOptions:
  kw.setdefault("num_workers", 1)
  kw.setdefault("quiet", True)
  kw.setdefault("val_fraction", 0.0)    # these tests draw no split unless they say so
  kw.setdefault("test_fraction", 0.0)
  return ConvertOptions(input_dir=str(inp), output_dir=str(out), **kw)


def _cli(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "tfrecord_tools.convert", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def _source_pixels(path) -> np.ndarray:
  im = Image.open(path)
  if im.mode == "RGBA":
    im = im.convert("RGB")
  a = np.asarray(im)
  if a.ndim == 3 and (a == a[..., :1]).all():
    return a[..., 0]     # R=G=B: a grey film, recorded grey (pixels.py, step 4)
  return a


@pytest.fixture(scope="module")
def covid_subset(tmp_path_factory, shared_data):
  """Real covid_ct files (symlinks; RGBA/RGB/L PNG and JPEG) plus three bad files.

  Per split and class the 3 smallest files, plus in train the smallest RGBA
  and grayscale PNGs of each class; bad files in train/NonCOVID.
  """
  root = tmp_path_factory.mktemp("covid") / "in"
  src_root = shared_data / "covid_ct"
  for split in ("train", "val", "test"):
    for cls in ("COVID", "NonCOVID"):
      files = sorted((src_root / split / cls).iterdir(), key=lambda p: (p.stat().st_size, p.name))
      pick = files[:3]
      if split == "train":
        for mode in ("RGBA", "L"):
          pick += [p for p in files if p.suffix == ".png" and Image.open(p).mode == mode][:1]
      (root / split / cls).mkdir(parents=True)
      for p in pick:
        dst = root / split / cls / p.name
        if not dst.exists():
          dst.symlink_to(p)
  bad = root / "train" / "NonCOVID"
  (bad / "zero.png").write_bytes(b"")
  jpg = next(p for p in sorted((src_root / "train" / "NonCOVID").iterdir()) if p.suffix == ".jpg")
  data = jpg.read_bytes()
  (bad / "truncated.jpg").write_bytes(data[:len(data) // 3])
  (bad / "notes.png").write_text("this is not an image\n")
  (bad / "README.txt").write_text("ignored: not an image extension\n")
  return root


@pytest.fixture(scope="module")
def covid_converted(tmp_path_factory, covid_subset):
  out = tmp_path_factory.mktemp("covid_out") / "tfr"
  m = convert(_opts(covid_subset, out, max_skipped_fraction=0.2, num_shards=2))
  return out, m


# --------------------------------------------------------------------------
# Record format.
# --------------------------------------------------------------------------


def test_hand_serialised_example_equals_schema_make_example():
  kw = dict(encoded=bytes(range(256)) * 3, image_format="jpeg", height=1234, width=7,
            channels=3, bit_depth=8, label=2, text="Bacterial Pneumonie é", filename="a/b é.jpg",
            patient_id="p1", sha256="0" * 64)
  assert (records.serialize_example(**kw)
          == records.make_example(**kw).SerializeToString(deterministic=True))
  kw.update(label=0, patient_id="", height=0)
  assert (records.serialize_example(**kw)
          == records.make_example(**kw).SerializeToString(deterministic=True))


def test_tfrecord_framing_reads_back(tmp_path):
  import tensorflow as tf
  path = tmp_path / "x.tfrecord"
  recs = [b"", b"a", os.urandom(70000)]
  path.write_bytes(b"".join(records.frame(r) for r in recs))
  assert [r.numpy() for r in tf.data.TFRecordDataset(str(path))] == recs
  assert list(records.read_records(str(path))) == recs
  data = bytearray(path.read_bytes())
  data[-10] ^= 1
  path.write_bytes(bytes(data))
  with pytest.raises(records.RecordFileError, match="checksum"):
    list(records.read_records(str(path)))


def test_default_num_shards():
  assert convert_lib.default_num_shards(60, 10**6) == 1
  assert convert_lib.default_num_shards(1400, 30 * 2**20) == 8
  assert convert_lib.default_num_shards(300, 2**20) == 2
  assert convert_lib.default_num_shards(100_000, 100 * 2**30) == 683
  assert convert_lib.default_num_shards(3, 10 * 2**30) == 3   # never more shards than images


# --------------------------------------------------------------------------
# Real data + bad files.
# --------------------------------------------------------------------------


def test_counts_reconcile_and_bad_files_are_listed(covid_subset, covid_converted):
  out, m = covid_converted
  assert m == schema.read_manifest(str(out))
  assert m["classes"] == ["NonCOVID", "COVID"]   # the negative class is label 0
  assert m["num_converted"] + m["num_skipped"] + m["num_dropped"] == m["num_found"]
  assert m["num_skipped"] == 3 and m["num_dropped"] == 0 and m["num_ignored"] == 1
  reasons = {s["path"]: s["reason"] for s in m["skipped"]}
  assert set(reasons) == {"train/NonCOVID/zero.png", "train/NonCOVID/truncated.jpg",
                          "train/NonCOVID/notes.png"}
  assert "empty" in reasons["train/NonCOVID/zero.png"]
  assert "truncated" in reasons["train/NonCOVID/truncated.jpg"]
  assert "not an image" in reasons["train/NonCOVID/notes.png"]
  found = sum(1 for _, _, fs in os.walk(covid_subset, followlinks=True)
              for f in fs if not f.endswith(".txt"))
  assert m["num_found"] == found
  total = 0
  for split, info in m["splits"].items():
    assert sum(info["class_counts"].values()) == info["num_examples"]
    assert sum(s["num_examples"] for s in info["shards"]) == info["num_examples"]
    assert info["num_groups"] is None
    total += info["num_examples"]
  assert total == m["num_converted"] == len(_records(out))
  st = m["image_stats"]
  assert st["channels"].keys() <= {"1", "3"} and st["height"]["min"] <= st["height"]["max"]
  assert st["source_mode"].get("RGBA", 0) >= 2 and st["format"]["jpeg"] >= 1


def test_records_hold_exact_source_pixels(covid_subset, covid_converted):
  out, m = covid_converted
  rows = _records(out)
  assert {r[records.FORMAT] for r in rows} == {b"png", b"jpeg"}
  for r in rows:
    rel = r[records.FILENAME].decode()
    src = covid_subset / rel
    data = src.read_bytes()
    assert r[records.SHA256].decode() == hashlib.sha256(data).hexdigest()
    assert r[records.TEXT].decode() == rel.split("/")[1]
    assert m["classes"][r[records.LABEL]] == r[records.TEXT].decode()
    assert rel.split("/")[0] == r["split"]
    decoded = np.asarray(Image.open(io.BytesIO(r[records.ENCODED])))
    assert decoded.shape[:2] == (r[records.HEIGHT], r[records.WIDTH])
    if r[records.FORMAT] == b"jpeg":
      assert r[records.ENCODED] == data       # kept as is: no re-encoding loss
    else:
      np.testing.assert_array_equal(decoded, _source_pixels(src))


def test_rerun_and_parallel_run_give_identical_bytes(tmp_path, covid_subset, covid_converted):
  out, m = covid_converted
  again = tmp_path / "again"
  m2 = convert(_opts(covid_subset, again, max_skipped_fraction=0.2, num_shards=2,
                     num_workers=2))
  assert _shard_bytes(again) == _shard_bytes(out)
  assert m2["splits"] == m["splits"] and m2["image_stats"] == m["image_stats"]
  assert not [n for n in os.listdir(again) if n not in _shard_bytes(again)
              and n != "dataset.json" and n not in TFDS_FILES]   # no temp files or state left behind


def test_existing_output_is_refused_unless_overwrite(covid_subset, tmp_path):
  out = tmp_path / "o"
  convert(_opts(covid_subset, out, max_skipped_fraction=0.2, max_side=32, num_shards=3))
  with pytest.raises(ConvertError, match="--overwrite"):
    convert(_opts(covid_subset, out, max_skipped_fraction=0.2, max_side=32))
  m = convert(_opts(covid_subset, out, max_skipped_fraction=0.2, max_side=32, num_shards=1,
                    overwrite=True))
  # Old shards (3 per split) are gone; only the new ones remain.
  assert sorted(_shard_bytes(out)) == sorted(s["file"] for sp in m["splits"].values()
                                             for s in sp["shards"])
  assert m["image_stats"]["height"]["max"] <= 32 and m["image_stats"]["width"]["max"] <= 32


def test_too_many_skipped_fails_then_resumes(covid_subset, tmp_path):
  out = tmp_path / "o"
  with pytest.raises(ConvertError, match="max_skipped_fraction"):
    convert(_opts(covid_subset, out, max_side=16, num_shards=2, max_skipped_fraction=0.01))
  assert not (out / "dataset.json").exists()
  listed = json.loads((out / "skipped.json").read_text())
  assert len(listed) == 3
  logs = []
  m = convert(_opts(covid_subset, out, max_side=16, num_shards=2, max_skipped_fraction=0.5,
                    quiet=False), log=logs.append)
  assert "nothing to convert: 6 of 6 shards already complete" in logs   # issue 14
  assert m["num_skipped"] == 3 and not (out / "skipped.json").exists()
  assert not (out / shards.STATE_DIR).exists()


# --------------------------------------------------------------------------
# Kill and rerun.
# --------------------------------------------------------------------------


def _synthetic(tmp_path, name="img", **kw):
  root = tmp_path / name
  kw.setdefault("num_images", 24)
  kw.setdefault("size", 24)
  synthetic.generate(str(root), **kw)
  return root


def test_killed_run_leaves_no_partial_file_and_rerun_completes(tmp_path):
  """A converter blocked on one image is SIGKILLed mid-run, then run again."""
  inp = _synthetic(tmp_path)
  clean = tmp_path / "clean"
  convert(_opts(inp, clean, num_shards=6))
  victim = inp / "PNEUMONIA" / "p00011_0.png"
  data = victim.read_bytes()
  # Converting that image blocks the converter mid-run (a FIFO no longer does: only regular
  # files are read; one worker runs in the converter's own process).
  block = ("import sys, time\n"
           "from tfrecord_tools import shards\n"
           "convert_one = shards.convert_one\n"
           "def blocked(source, **kw):\n"
           "  if source.rel.endswith('p00011_0.png'):\n"
           "    time.sleep(3600)\n"
           "  return convert_one(source, **kw)\n"
           "shards.convert_one = blocked\n"
           "from tfrecord_tools.convert.__main__ import run\n"
           "run()\n")
  out = tmp_path / "out"
  proc = subprocess.Popen([sys.executable, "-c", block, f"--input_dir={inp}",
                           f"--output_dir={out}", "--num_shards=6", "--num_workers=1",
                           "--val_fraction=0", "--test_fraction=0"],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + 60
    while not [n for n in (os.listdir(out) if out.exists() else []) if ".tmp-" in n]:
      assert proc.poll() is None, proc.stderr.read()
      assert time.monotonic() < deadline, "converter never started writing"
      time.sleep(0.05)
    time.sleep(0.2)   # let it reach the pipe
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.stderr.close()
  assert not (out / "dataset.json").exists()
  assert [n for n in os.listdir(out) if ".tmp-" in n]      # killed mid-shard
  victim.unlink()
  victim.write_bytes(data)
  os.utime(victim, ns=(1, 1))   # any mtime: the fingerprint notices the new file
  r = _cli(f"--input_dir={inp}", f"--output_dir={out}", "--num_shards=6", "--num_workers=1",
           "--val_fraction=0", "--test_fraction=0")
  assert r.returncode == 0, r.stderr
  assert _shard_bytes(out) == _shard_bytes(clean)
  assert sorted(os.listdir(out)) == sorted(list(_shard_bytes(clean)) + ["dataset.json"] + TFDS_FILES)


def test_leftover_temp_and_stale_shards_are_replaced(tmp_path):
  inp = _synthetic(tmp_path)
  clean = tmp_path / "clean"
  convert(_opts(inp, clean, num_shards=2))
  out = tmp_path / "out"
  convert(_opts(inp, out, num_shards=2))
  os.remove(out / "dataset.json")
  # A finished shard from a run over *different* content, a temp file, a stray old shard.
  state = out / shards.STATE_DIR
  state.mkdir()
  name = "train-00000-of-00002.tfrecord"
  (out / name).write_bytes(b"garbage from another run")
  (state / (name + ".json")).write_text(json.dumps({"fingerprint": "other"}))
  (out / "train-00001-of-00002.tfrecord.tmp-12345").write_bytes(b"partial")
  (out / "train-00000-of-00005.tfrecord").write_bytes(b"stale")
  m = convert(_opts(inp, out, num_shards=2))
  assert _shard_bytes(out) == _shard_bytes(clean)
  assert sorted(os.listdir(out)) == sorted(list(_shard_bytes(clean)) + ["dataset.json"] + TFDS_FILES)
  assert m["num_converted"] == 24


# --------------------------------------------------------------------------
# Splits, classes, groups.
# --------------------------------------------------------------------------


def test_drawn_split_is_stratified_seeded_and_deterministic(tmp_path):
  inp = _synthetic(tmp_path, num_images=40)
  m = convert(_opts(inp, tmp_path / "a", val_fraction=0.2, test_fraction=0.1, seed=1))
  assert m["layout"] == "classes"
  counts = {sp: m["splits"][sp]["class_counts"] for sp in m["splits"]}
  assert counts == {"train": {"NORMAL": 14, "PNEUMONIA": 14}, "val": {"NORMAL": 4, "PNEUMONIA": 4},
                    "test": {"NORMAL": 2, "PNEUMONIA": 2}}
  def files(out):
    rows = _records(out)
    return {sp: sorted(r[records.FILENAME] for r in rows if r["split"] == sp)
            for sp in ("train", "val", "test")}
  a = files(tmp_path / "a")
  convert(_opts(inp, tmp_path / "b", val_fraction=0.2, test_fraction=0.1, seed=1))
  convert(_opts(inp, tmp_path / "c", val_fraction=0.2, test_fraction=0.1, seed=2))
  assert files(tmp_path / "b") == a
  assert files(tmp_path / "c") != a
  assert not set(a["train"]) & set(a["val"]) and not set(a["val"]) & set(a["test"])


def test_group_regex_keeps_each_patient_in_one_split(tmp_path):
  inp = _synthetic(tmp_path, num_images=60, images_per_patient=3, num_classes=3, size=16)
  m = convert(_opts(inp, tmp_path / "o", val_fraction=0.2, test_fraction=0.2,
                    group_regex=r"^(p\d+)_", seed=5))
  rows = _records(tmp_path / "o")
  split_of = {}
  for r in rows:
    pid = r[records.PATIENT_ID].decode()
    assert pid and r[records.FILENAME].decode().split("/")[-1].startswith(pid + "_")
    split_of.setdefault(pid, set()).add(r["split"])
  assert len(split_of) == 20 and all(len(s) == 1 for s in split_of.values())
  assert sum(m["splits"][sp]["num_groups"] for sp in m["splits"]) == 20
  assert all(m["splits"][sp]["num_examples"] > 0 for sp in ("train", "val", "test"))
  assert m["args"]["patients_in_several_splits"] == 0
  with pytest.raises(ConvertError, match="no patient id"):
    convert(_opts(inp, tmp_path / "x", val_fraction=0.2, group_regex=r"^(q\d+)_"))


def test_assign_splits_unit():
  keys = [f"f{i}" for i in range(100)]
  labels = [i % 2 for i in range(100)]
  groups = [f"g{i // 4}" for i in range(100)]
  out = convert_lib.assign_splits(keys, labels, groups, {"test": 0.2, "val": 0.1}, seed=0)
  by_group = {}
  for g, s in zip(groups, out):
    by_group.setdefault(g, set()).add(s)
  assert all(len(s) == 1 for s in by_group.values())
  assert 16 <= out.count("test") <= 24 and 8 <= out.count("val") <= 14


def test_class_map_merges_renames_and_drops(tmp_path):
  inp = _synthetic(tmp_path, num_images=30, num_classes=3, size=16)   # NORMAL PNEUMONIA COVID
  m = convert(_opts(inp, tmp_path / "o", class_map="Sick=PNEUMONIA+COVID,Healthy=NORMAL"))
  assert m["classes"] == ["Sick", "Healthy"]
  assert m["splits"]["train"]["class_counts"] == {"Sick": 20, "Healthy": 10}
  assert {(r[records.LABEL], r[records.TEXT]) for r in _records(tmp_path / "o")} == {
      (0, b"Sick"), (1, b"Healthy")}
  m = convert(_opts(inp, tmp_path / "d", class_map="NORMAL,PNEUMONIA"))
  assert m["classes"] == ["NORMAL", "PNEUMONIA"]
  assert m["dropped"] == {"COVID": 10} and m["num_dropped"] == 10
  assert m["num_converted"] + m["num_skipped"] + m["num_dropped"] == m["num_found"] == 30
  for bad, msg in (("Healthy=NORMAL,Healthy=COVID", "twice"), ("A=NORMAL,B=NORMAL", "twice"),
                   ("A=NORMAL,B=Typo", "Typo"), ("NORMAL", "only one class")):
    with pytest.raises(ConvertError, match=msg):
      convert(_opts(inp, tmp_path / "x", class_map=bad))


def test_given_splits_and_val_drawn_from_train(tmp_path):
  inp = _synthetic(tmp_path, num_images=40, with_splits=True, size=16)
  shutil.rmtree(inp / "val")
  m = convert(_opts(inp, tmp_path / "o", val_fraction=0.25))
  assert set(m["splits"]) == {"train", "val", "test"}
  assert m["splits"]["test"]["num_examples"] == 6
  assert m["splits"]["val"]["num_examples"] == 8
  with pytest.raises(ConvertError, match="already has a test folder"):
    convert(_opts(inp, tmp_path / "x", test_fraction=0.2))


def test_16bit_png_records_stay_16bit(tmp_path):
  import tensorflow as tf
  inp = _synthetic(tmp_path, num_images=4, bit_depth=16, size=20)
  m = convert(_opts(inp, tmp_path / "o"))
  assert m["image_stats"]["bit_depth"] == {"16": 4}
  for r in _records(tmp_path / "o"):
    assert r[records.BIT_DEPTH] == 16
    t = tf.io.decode_png(r[records.ENCODED], dtype=tf.uint16).numpy()[..., 0]
    np.testing.assert_array_equal(t, np.asarray(Image.open(inp / r[records.FILENAME].decode())))


def test_keras_pair_input(tmp_path):
  inp = _synthetic(tmp_path, num_images=12, image_format="jpeg", size=16)
  pair = tmp_path / "pair"
  for split, names in (("train", range(0, 8)), ("test", range(8, 12))):
    (pair / split).mkdir(parents=True)
    imgs, paths = [], []
    for i in names:
      cls = "NORMAL" if i % 2 == 0 else "PNEUMONIA"
      p = inp / cls / f"p{i:05d}_0.jpeg"
      imgs.append(records.frame(p.read_bytes()))
      paths.append(records.frame(
          f"gs://bucket/chest_xray/{split}/{cls}/p{i:05d}_0.jpeg".encode()))
    (pair / split / "images.tfrec").write_bytes(b"".join(imgs))
    (pair / split / "paths.tfrec").write_bytes(b"".join(paths))
  m = convert(_opts(pair, tmp_path / "o", input_format="keras_pair"))
  assert m["classes"] == ["NORMAL", "PNEUMONIA"]
  assert {sp: i["num_examples"] for sp, i in m["splits"].items()} == {"train": 8, "test": 4}
  for r in _records(tmp_path / "o"):
    split, cls, name = r[records.FILENAME].decode().split("/")
    assert (split, cls) == (r["split"], r[records.TEXT].decode())
    assert r[records.ENCODED] == (inp / cls / name).read_bytes()
  (pair / "test" / "paths.tfrec").write_bytes(b"".join(paths[:-1]))
  with pytest.raises(ConvertError, match="not a matching pair"):
    convert(_opts(pair, tmp_path / "x", input_format="keras_pair"))


# --------------------------------------------------------------------------
# User mistakes: one line, no traceback.
# --------------------------------------------------------------------------


def test_cli_errors_are_one_line(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  single = _synthetic(tmp_path, "single", num_images=4, size=8)
  shutil.rmtree(single / "PNEUMONIA")
  mismatch = _synthetic(tmp_path, "mismatch", num_images=24, size=8, with_splits=True)
  shutil.rmtree(mismatch / "val" / "PNEUMONIA")
  (mismatch / "test" / "EXTRA").mkdir()
  shutil.copy(mismatch / "test" / "NORMAL" / os.listdir(mismatch / "test" / "NORMAL")[0],
              mismatch / "test" / "EXTRA" / "x.png")
  cases = [(empty, "is empty"), (tmp_path / "missing", "does not exist"),
           (single, "only one class (NORMAL)"),
           (mismatch, "classes differ across splits: train has no EXTRA; val has no "
                      "EXTRA, PNEUMONIA")]
  for inp, msg in cases:
    r = _cli(f"--input_dir={inp}", f"--output_dir={tmp_path / 'out'}")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert msg in r.stderr
    assert len([line for line in r.stderr.splitlines() if "error" in line]) == 1


def test_cli_success_prints_summary(tmp_path):
  inp = _synthetic(tmp_path, num_images=6, size=8)
  r = _cli(f"--input_dir={inp}", f"--output_dir={tmp_path / 'o'}", "--test_fraction=0.34")
  assert r.returncode == 0, r.stderr
  assert "converted 6 of 6 files" in r.stdout and "test" in r.stdout


def test_negative_class_gets_label_zero(tmp_path):
  """Label 1 is the positive class of sensitivity/PPV/ROC: the finding, not 'NonCOVID'."""
  from tfrecord_tools.convert import default_class_order
  assert default_class_order(["NonCOVID", "COVID"]) == ["NonCOVID", "COVID"]
  assert default_class_order(["COVID", "NonCOVID"]) == ["NonCOVID", "COVID"]
  assert default_class_order(["PNEUMONIA", "NORMAL"]) == ["NORMAL", "PNEUMONIA"]
  assert default_class_order(["Nodule", "Normal"]) == ["Normal", "Nodule"]
  assert default_class_order(["pneumonia", "no_pneumonia"]) == ["no_pneumonia", "pneumonia"]
  assert default_class_order(["Nodule", "Mass"]) == ["Mass", "Nodule"]          # no negative: sorted
  assert default_class_order(["Normal", "Healthy", "X"]) == ["Healthy", "Normal", "X"]  # two: sorted
  inp = _synthetic(tmp_path, num_images=8, size=8)
  (inp / "NORMAL").rename(inp / "NonCOVID")
  (inp / "PNEUMONIA").rename(inp / "COVID")
  r = _cli(f"--input_dir={inp}", f"--output_dir={tmp_path / 'o'}", "--val_fraction=0",
           "--test_fraction=0")
  assert r.returncode == 0, r.stderr
  assert schema.read_manifest(str(tmp_path / "o"))["classes"] == ["NonCOVID", "COVID"]
  assert "positive class (label 1: sensitivity, PPV, ROC): COVID" in r.stderr
  r = _cli(f"--input_dir={inp}", f"--output_dir={tmp_path / 'p'}", "--val_fraction=0",
           "--test_fraction=0", "--class_map=COVID,NonCOVID")
  assert schema.read_manifest(str(tmp_path / "p"))["classes"] == ["COVID", "NonCOVID"]


def test_cli_default_fractions_yield_to_the_inputs_split_folders(tmp_path):
  """The Kaggle layout (train/ val/ test/) converts with no split flags; a flat folder
  gets 15 % val and test drawn; an explicit fraction that clashes with a folder is an error."""
  with_splits = _synthetic(tmp_path, "kaggle", num_images=24, size=8, with_splits=True)
  r = _cli(f"--input_dir={with_splits}", f"--output_dir={tmp_path / 'a'}")
  assert r.returncode == 0, r.stderr
  m = schema.read_manifest(str(tmp_path / "a"))
  own = {sp: len(list((with_splits / sp).glob("*/*.png"))) for sp in ("train", "val", "test")}
  assert {sp: i["num_examples"] for sp, i in m["splits"].items()} == own
  assert m["args"]["val_fraction"] == 0.0 and m["args"]["test_fraction"] == 0.0
  flat = _synthetic(tmp_path, "flat", num_images=40, size=8)
  r = _cli(f"--input_dir={flat}", f"--output_dir={tmp_path / 'b'}")
  assert r.returncode == 0, r.stderr
  m = schema.read_manifest(str(tmp_path / "b"))
  assert sorted(m["splits"]) == ["test", "train", "val"] and m["args"]["val_fraction"] == 0.15
  r = _cli(f"--input_dir={with_splits}", f"--output_dir={tmp_path / 'c'}", "--test_fraction=0.2")
  assert r.returncode == 2 and "already has a test folder" in r.stderr


# --------------------------------------------------------------------------
# The shared demo fixture others build on.
# --------------------------------------------------------------------------


def test_demo_data_dir_fixture(demo_data_dir):
  m = schema.read_manifest(demo_data_dir)
  assert m["classes"] == ["NORMAL", "PNEUMONIA"]
  assert {sp: i["num_examples"] for sp, i in m["splits"].items()} == {
      "train": 44, "val": 8, "test": 8}
  assert len(schema.shard_paths(demo_data_dir, m, "train")) == 2
  assert m["image_stats"]["height"] == {"min": 64, "max": 64, "mean": 64.0}
  assert m["image_stats"]["channels"] == {"1": 60}


def test_remote_filesystem_output_and_keras_pair_input(tmp_path):
  """gs:// goes through tf.io.gfile; TF's in-memory ram:// file system stands in for it."""
  import tensorflow as tf
  inp = _synthetic(tmp_path, num_images=8, size=16, image_format="jpeg")
  out = f"ram://bucket/{tmp_path.name}/out"
  m = convert(_opts(inp, out, num_shards=2, test_fraction=0.25))
  assert schema.read_manifest(out)["splits"] == m["splits"]
  assert sorted(tf.io.gfile.listdir(out)) == sorted(
      ["dataset.json"] + TFDS_FILES + [s["file"] for sp in m["splits"].values() for s in sp["shards"]])
  with pytest.raises(ConvertError, match="--overwrite"):
    convert(_opts(inp, out))
  # The Keras example's pair read from the remote file system.
  pair = f"ram://bucket/{tmp_path.name}/pair"
  tf.io.gfile.makedirs(pair)
  files = sorted(p for p in inp.rglob("*.jpeg"))
  with tf.io.gfile.GFile(pair + "/images.tfrec", "wb") as f:
    f.write(b"".join(records.frame(p.read_bytes()) for p in files))
  with tf.io.gfile.GFile(pair + "/paths.tfrec", "wb") as f:
    f.write(b"".join(records.frame(str(p).encode()) for p in files))
  m = convert(_opts(pair, tmp_path / "from_pair", input_format="keras_pair", val_fraction=0.25))
  assert m["num_converted"] == 8 and m["splits"]["val"]["class_counts"] == {
      "NORMAL": 1, "PNEUMONIA": 1}


def test_output_inside_input_is_refused(tmp_path):
  inp = _synthetic(tmp_path, num_images=4, size=8)
  with pytest.raises(ConvertError, match="inside --input_dir"):
    convert(_opts(inp, inp / "tfrecords"))


def test_benchmark_runs_all_methods(tmp_path):
  from benchmarks import convert as bench
  inp = _synthetic(tmp_path, num_images=8, size=64, image_format="jpeg")
  res = bench.run_benchmark(str(inp), str(tmp_path / "work"), max_side=32, workers=2,
                            num_shards=2)
  assert [r["workers"] for r in res["rows"]] == [1, 1, 2]
  assert all(r["converted"] == 8 and r["images_per_sec"] > 0 for r in res["rows"])
  assert res["rows"][0]["vs_naive"] == 1.0
  assert "vs naive" in bench.format_table(res)


# --------------------------------------------------------------------------
# Worker processes that die, and scripts without a __main__ guard.
# --------------------------------------------------------------------------

# Run as a script: its module level also runs in every worker (spawn and
# forkserver workers re-run the main script), so the patched convert_one is
# what the workers call. argv: input output crash-mode(""|once|always) marker.
_CRASHING_SCRIPT = '''
import os, signal, sys
from tfrecord_tools import convert as convert_lib, shards

_original = shards.convert_one


def convert_one(source, **kw):
  mode, marker = sys.argv[3], sys.argv[4]
  if mode and source.rel.endswith("p00004_0.png"):
    try:
      os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
      first = True
    except FileExistsError:
      first = False
    if first or mode == "always":
      os.kill(os.getpid(), signal.SIGKILL)   # as the out-of-memory killer does
  return _original(source, **kw)


shards.convert_one = convert_one

if __name__ == "__main__":
  try:
    convert_lib.convert(convert_lib.ConvertOptions(
        input_dir=sys.argv[1], output_dir=sys.argv[2], num_shards=4, num_workers=2,
        val_fraction=0, test_fraction=0))
  except convert_lib.ConvertError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
'''


def _run_script(path, *args, timeout=120):
  """Runs a Python script with the repository importable; a hang fails the test."""
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, str(path), *map(str, args)], cwd=path.parent,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def crash_setup(tmp_path):
  inp = _synthetic(tmp_path, num_images=16, size=16)
  assert (inp / "NORMAL" / "p00004_0.png").exists()
  clean = tmp_path / "clean"
  convert(_opts(inp, clean, num_shards=4, val_fraction=0, test_fraction=0))
  script = tmp_path / "crashing.py"
  script.write_text(_CRASHING_SCRIPT)
  return inp, clean, script


def test_worker_killed_once_is_retried_and_output_is_identical(tmp_path, crash_setup):
  inp, clean, script = crash_setup
  out, marker = tmp_path / "out", tmp_path / "crashed"
  r = _run_script(script, inp, out, "once", marker)
  assert r.returncode == 0, r.stderr
  assert marker.exists()   # a worker really died
  assert re.search(r"a worker process was killed by SIGKILL \(the out-of-memory killer\?\); "
                   r"trying the [1-4] unfinished shards? again", r.stderr), r.stderr
  assert _shard_bytes(out) == _shard_bytes(clean)
  # The dead worker's temp file and the state are gone.
  assert sorted(os.listdir(out)) == sorted(list(_shard_bytes(clean)) + ["dataset.json"] + TFDS_FILES)
  assert schema.read_manifest(str(out))["num_converted"] == 16


def test_worker_killed_twice_fails_with_cause_then_rerun_resumes(tmp_path, crash_setup):
  inp, clean, script = crash_setup
  out, marker = tmp_path / "out", tmp_path / "crashed"
  r = _run_script(script, inp, out, "always", marker)
  assert r.returncode == 2, r.stderr
  last = r.stderr.strip().splitlines()[-1]
  m = re.fullmatch(r"error: a worker process was killed by SIGKILL \(the out-of-memory "
                   r"killer\?\), also when the unfinished shards were tried again; ([0-3]) of 4 "
                   r"shards are finished and kept: run the same command again to resume "
                   r"\(with fewer --num_workers or a smaller --max_side if memory ran out\)",
                   last)
  assert m, r.stderr
  assert "Traceback" not in r.stderr
  assert not (out / "dataset.json").exists()
  finished = int(m.group(1))
  r = _run_script(script, inp, out, "", marker)
  assert r.returncode == 0, r.stderr
  assert (f"resuming: {finished} of 4 shards" in r.stderr) == (finished > 0), r.stderr
  assert _shard_bytes(out) == _shard_bytes(clean)
  assert sorted(os.listdir(out)) == sorted(list(_shard_bytes(clean)) + ["dataset.json"] + TFDS_FILES)


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_script_without_main_guard_fails_clearly(tmp_path, method):
  inp = _synthetic(tmp_path, num_images=8, size=8)
  script = tmp_path / "unguarded.py"
  script.write_text(
      "from tfrecord_tools import convert as convert_lib\n"
      + (f"import multiprocessing; multiprocessing.get_all_start_methods = lambda: [{method!r}]\n")
      + "print('top level ran', flush=True)\n"
      f"convert_lib.convert(convert_lib.ConvertOptions(input_dir={str(inp)!r}, "
      f"output_dir={str(tmp_path / 'out')!r}, num_shards=2, num_workers=2, quiet=True))\n")
  r = _run_script(script)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1] == (
      f"tfrecord_tools.convert.options.ConvertError: the worker processes re-ran {script}, which "
      "called convert() again: put the code that calls convert() under "
      "`if __name__ == \"__main__\":` (or use num_workers=1)"), r.stderr
  assert "bootstrapping" not in r.stderr and r.stderr.count("Traceback") == 1
  assert not (tmp_path / "out" / "dataset.json").exists()


def test_death_cause_names_the_signal():
  term = -signal.SIGTERM
  assert pool.death_cause([term, -signal.SIGKILL, 0]) == (
      "was killed by SIGKILL (the out-of-memory killer?)")
  assert pool.death_cause([-signal.SIGSEGV]).startswith("was killed by SIGSEGV (a crash")
  assert pool.death_cause([3, term]) == "exited with status 3"
  assert pool.death_cause([term, term]) == "was terminated (SIGTERM)"
  assert pool.death_cause([term, pool.EXIT_UNGUARDED_MAIN]) == pool.UNGUARDED_MAIN
