"""Label CSVs (tfrecord_tools.labels + convert --labels_csv): NIH, CheXpert, RSNA, by hand."""

from __future__ import annotations

import csv
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT
from tfrecord_tools import convert as convert_lib, errors, labels, records, synthetic
from tfrecord_tools import inspect as tfr_inspect

NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age"]
CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Cardiomegaly",
                   "Edema", "Pleural Effusion"]
# The chest_xray_400x300 folders as findings: (Pneumonia, Bacterial, Viral, COVID-19).
from benchmarks.real_data_views import CHEST_XRAY_FINDINGS, CHEST_XRAY_FOLDERS  # noqa: E402


def _write_csv(path: pathlib.Path, header, rows) -> str:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return str(path)


def _png(path: pathlib.Path, value: int = 100) -> None:
  from PIL import Image
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def _convert(tmp_path, name="out", **kw) -> dict:
  args = dict(output_dir=str(tmp_path / name), num_workers=1, quiet=True)
  args.update(kw)
  return convert_lib.convert(convert_lib.ConvertOptions(**args))


def _pt(patient: str) -> str:
  """The pseudonym the converter writes for a patient id (the tests' key, tests/conftest.py)."""
  from tfrecord_tools import pseudonym
  return pseudonym.load_key().patient(patient)


def _read(out) -> dict[str, dict]:
  """filename -> {"multi_hot", "mask", "text", "label", "patient_id", "split"} of every record."""
  import tensorflow as tf
  spec = records.feature_spec()
  got = {}
  for f in sorted(pathlib.Path(out).glob("*.tfrecord")):
    for raw in records.read_records(str(f)):
      ex = tf.io.parse_single_example(raw, spec)
      got[ex[records.FILENAME].numpy().decode()] = {
          "multi_hot": ex[records.MULTI_HOT].numpy().tolist(),
          "mask": ex[records.MASK].numpy().tolist(),
          "text": ex[records.TEXT].numpy().decode(), "label": int(ex[records.LABEL].numpy()),
          "patient_id": ex[records.PATIENT_ID].numpy().decode(), "split": f.name.split("-")[0]}
  return got


# --------------------------------------------------------------------------
# Layouts and policies.
# --------------------------------------------------------------------------


def test_layout_is_recognised_from_the_header():
  assert labels.recognise(NIH_HEADER) == "nih"
  assert labels.recognise(CHEXPERT_HEADER) == "chexpert"
  assert labels.recognise(["dicom_id", "subject_id", "path", "Edema"]) == "chexpert"   # MIMIC
  assert labels.recognise(["patientId", "x", "y", "width", "height", "Target"]) == "rsna"
  assert labels.recognise(["file", "dx"], image_column="file", labels_column="dx") == "columns"
  with pytest.raises(labels.LabelError, match=r"cannot tell .*\(file, dx\).*--image_column"):
    labels.recognise(["file", "dx"])


def test_uncertain_and_blank_policies():
  states = labels.POSITIVE + labels.NEGATIVE + labels.UNCERTAIN + labels.BLANK
  assert labels.encode(states) == ((1, 0, 0, 0), (1, 1, 0, 1))                      # defaults
  assert labels.encode(states, uncertain="zeros") == ((1, 0, 0, 0), (1, 1, 1, 1))
  assert labels.encode(states, uncertain="ones") == ((1, 0, 1, 0), (1, 1, 1, 1))
  assert labels.encode(states, blank="ignore") == ((1, 0, 0, 0), (1, 1, 0, 0))
  counts = labels.new_finding_counts("abcd")
  labels.count_findings(counts, "abcd", states, *labels.encode(states, uncertain="ones"))
  assert counts["c"] == {"positive": 1, "negative": 0, "uncertain": 1, "ignored": 0}
  assert labels.text_of((1.0, 0.0, 1.0), ["A", "B", "C"]) == "A|C"
  assert labels.text_of((0.0, 0.0), ["A", "B"]) == "No Finding"


def test_chexpert_columns_patients_and_cells(tmp_path):
  path = _write_csv(tmp_path / "train.csv", CHEXPERT_HEADER, [
      ["CheX/train/patient00001/study1/view1_frontal.jpg", "Male", "68", "Frontal", "AP", "",
       "1.0", "-1.0", ""],
      ["CheX/train/patient00002/study1/view1_frontal.jpg", "Female", "87", "Frontal", "AP", "1.0",
       "0.0", "", "0"]])
  ls = labels.read_labels([("train", path)])
  assert ls.layout == "chexpert" and ls.task == labels.MULTI_LABEL
  assert ls.classes == ["Cardiomegaly", "Edema", "Pleural Effusion"]   # not Age, not No Finding
  assert [r.patient for r in ls.rows] == ["patient00001", "patient00002"]
  assert [r.states for r in ls.rows] == ["1ub", "0b0"]
  assert ls.rows[0].split == "train" and ls.rows[0].line == 2
  picked = labels.read_labels([("", path)], findings="Pleural Effusion,Cardiomegaly")
  assert picked.classes == ["Pleural Effusion", "Cardiomegaly"] and picked.rows[0].states == "b1"
  with pytest.raises(labels.LabelError, match="Fracture"):
    labels.read_labels([("", path)], findings="Fracture")
  # MIMIC-CXR-JPG: the patient is subject_id.
  mimic = _write_csv(tmp_path / "mimic.csv", ["subject_id", "study_id", "path", "Edema"],
                     [["10000032", "50414267", "files/p10/p10000032/s50414267/a.jpg", "-1.0"]])
  m = labels.read_labels([("", mimic)])
  assert m.classes == ["Edema"] and m.rows[0].patient == "10000032" and m.rows[0].states == "u"
  bad = _write_csv(tmp_path / "bad.csv", ["Path", "Edema"], [["a.png", "1"], ["b.png", "2"]])
  with pytest.raises(labels.LabelError, match="no finding columns"):
    labels.read_labels([("", bad)])
  with pytest.raises(labels.LabelError, match=r"bad.csv line 3: column 'Edema' holds '2'"):
    labels.read_labels([("", bad)], image_column="Path", label_columns="Edema")


def test_nih_no_finding_findings_option_and_blank(tmp_path):
  path = _write_csv(tmp_path / "nih.csv", NIH_HEADER, [
      ["a.png", "Cardiomegaly|Effusion", "0", "1", "50"], ["b.png", "No Finding", "0", "2", "40"],
      ["c.png", "Hernia", "0", "3", "30"], ["d.png", "", "0", "4", "30"]])
  ls = labels.read_labels([("", path)])
  assert ls.classes == ["Cardiomegaly", "Effusion", "Hernia"]
  assert [r.states for r in ls.rows] == ["110", "000", "001", "bbb"]
  assert [r.patient for r in ls.rows] == ["1", "2", "3", "4"]
  only = labels.read_labels([("", path)], findings="Effusion,Cardiomegaly")
  assert only.classes == ["Effusion", "Cardiomegaly"]
  assert [r.states for r in only.rows] == ["11", "00", "00", "bb"]
  assert only.unlisted_findings == {"Hernia": 1}


# --------------------------------------------------------------------------
# Full conversions of synthetic NIH and CheXpert sets.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nih_set(tmp_path_factory):
  root = tmp_path_factory.mktemp("nih") / "nih"
  summary = synthetic.generate_labelled(str(root), "nih", num_images=40, size=32, seed=1,
                                        images_per_patient=2)
  return root, summary


@pytest.fixture(scope="module")
def chexpert_set(tmp_path_factory):
  root = tmp_path_factory.mktemp("chexpert") / "CheXpert-v1.0-small"
  summary = synthetic.generate_labelled(str(root), "chexpert", num_images=48, size=32, seed=2,
                                        images_per_patient=2)
  return root, summary


def test_synthetic_nih_converts_with_the_publishers_split_lists(tmp_path, nih_set):
  root, summary = nih_set
  lists = ",".join(f"{sp}={root / f}" for sp, f in synthetic.NIH_LISTS.items())
  m = _convert(tmp_path, input_dir=str(root), labels_csv=str(root / synthetic.NIH_CSV),
               split_lists=lists)
  findings = sorted(summary["findings"])
  assert m["task"] == "multi_label" and m["classes"] == findings
  assert m["labels"]["layout"] == "nih" and m["labels"]["columns"]["patient"] == "Patient ID"
  assert m["num_found"] == m["num_converted"] == 40 and m["num_skipped"] == 0
  assert m["num_unlabelled"] == 0 and m["num_ignored"] == 4   # the CSV, two lists, synthetic.json
  got = _read(tmp_path / "out")
  assert len(got) == 40
  test_names = set((root / "test_list.txt").read_text().split())
  for rel, truth in summary["truth"].items():
    r = got[rel]
    assert r["multi_hot"] == [float(f in truth) for f in findings]
    assert r["mask"] == [1.0] * len(findings)
    assert r["text"] == ("|".join(f for f in findings if f in truth) or "No Finding")
    assert r["label"] == 0
    assert (r["split"] == "test") == (rel.rsplit("/", 1)[-1] in test_names)
    assert r["patient_id"] == _pt(str(int(rel.rsplit("/", 1)[-1][:8])))
  # val is drawn from train_val_list by patient: each patient in one split.
  split_of = {}
  for r in got.values():
    assert split_of.setdefault(r["patient_id"], r["split"]) == r["split"]
  assert {r["split"] for r in got.values()} == {"train", "val", "test"}
  for split, info in m["splits"].items():
    recs = [r for r in got.values() if r["split"] == split]
    for k, f in enumerate(findings):
      pos = sum(r["multi_hot"][k] for r in recs)
      assert info["class_counts"][f] == pos
      assert info["finding_counts"][f] == {"positive": pos, "negative": len(recs) - pos,
                                           "uncertain": 0, "ignored": 0}
  assert tfr_inspect.inspect_dataset(str(tmp_path / "out"), log=lambda _: None)["ok"]


def test_synthetic_chexpert_converts_with_uncertain_and_blank_policies(tmp_path, chexpert_set):
  root, summary = chexpert_set
  csvs = f"train={root / 'train.csv'},valid={root / 'valid.csv'}"
  findings = summary["findings"]
  cells = {}   # rel -> per finding cell, from the CSVs as written
  for name in ("train.csv", "valid.csv"):
    with open(root / name, newline="") as f:
      for row in csv.DictReader(f):
        cells[row["Path"].split("/", 1)[1]] = [row[c] for c in findings]
  policies = [("ignore", "negative", {"1.0": (1, 1), "0.0": (0, 1), "-1.0": (0, 0), "": (0, 1)}),
              ("ones", "ignore", {"1.0": (1, 1), "0.0": (0, 1), "-1.0": (1, 1), "": (0, 0)}),
              ("zeros", "negative", {"1.0": (1, 1), "0.0": (0, 1), "-1.0": (0, 1), "": (0, 1)})]
  for uncertain, blank, want in policies:
    out = f"out_{uncertain}_{blank}"
    m = _convert(tmp_path, out, input_dir=str(root), labels_csv=csvs, uncertain=uncertain,
                 blank=blank)
    assert m["classes"] == findings and m["labels"]["layout"] == "chexpert"
    assert (m["labels"]["uncertain"], m["labels"]["blank"]) == (uncertain, blank)
    assert m["num_converted"] == 48 and m["num_found"] == 48
    got = _read(tmp_path / out)
    # The patient folder (patient00012) is an id: written as its pseudonym.
    named = {rel: rel.replace(rel.split("/")[1], _pt(rel.split("/")[1])) for rel in cells}
    assert set(got) == set(named.values())
    for rel, row in cells.items():
      r = got[named[rel]]
      assert r["multi_hot"] == [float(want[c][0]) for c in row], (rel, row)
      assert r["mask"] == [float(want[c][1]) for c in row], (rel, row)
      assert (r["split"] == "val") == rel.startswith("valid/")
      assert r["patient_id"] == _pt(rel.split("/")[1])
    for split, info in m["splits"].items():
      recs = {rel: r for rel, r in ((rel, got[named[rel]]) for rel in cells)
              if r["split"] == split}
      for k, f in enumerate(findings):
        fc = info["finding_counts"][f]
        assert fc["uncertain"] == sum(cells[rel][k] == "-1.0" for rel in recs)
        assert fc["ignored"] == sum(r["mask"][k] == 0.0 for r in recs.values())
        assert fc["positive"] == info["class_counts"][f] == sum(r["multi_hot"][k] for r in recs.values())
        assert fc["positive"] + fc["negative"] + fc["ignored"] == info["num_examples"]
    # valid.csv is the publisher's val; test is drawn from train by patient.
    assert m["args"]["drawn_splits"] == {"test": 0.15}
    report = tfr_inspect.inspect_dataset(str(tmp_path / out), log=lambda _: None)
    assert report["ok"], report["problems"]
  # The policies matter on this set: uncertain and blank cells occur in train.
  flat = [c for row in cells.values() for c in row]
  assert "-1.0" in flat and "" in flat


def test_missing_files_unlabelled_files_and_split_list_rows_are_accounted_for(tmp_path, nih_set):
  src, summary = nih_set
  root = tmp_path / "nih"
  shutil.copytree(src, root)
  gone = sorted(summary["truth"])[:3]
  for rel in gone:
    (root / rel).unlink()
  _png(root / "extra" / "stray1.png")
  _png(root / "images_001" / "images" / "zz_unlisted.png")
  train_list = root / "train_val_list.txt"
  names = train_list.read_text().split()        # the gone files come first
  train_list.write_text("\n".join(names[:-1]) + "\n")   # the last row is now in no list
  bad = root / next(rel for rel in summary["truth"] if rel.endswith(names[-2]))
  bad.write_bytes(b"not a png")
  lists = f"train={train_list},test={root / 'test_list.txt'}"
  m = _convert(tmp_path, input_dir=str(root), labels_csv=str(root / synthetic.NIH_CSV),
               split_lists=lists, max_skipped_fraction=0.5)
  reasons = m["labels"]["skipped_reasons"]
  assert reasons["missing file"] == 3
  assert reasons["not in any --split_lists file"] == 1
  assert m["num_found"] == 40 == m["num_converted"] + m["num_skipped"] + m["num_dropped"]
  skipped = {s["path"]: s["reason"] for s in m["skipped"]}
  for rel in gone:
    name = rel.rsplit("/", 1)[-1]
    assert skipped[name].startswith("missing file (") and "Data_Entry_2017.csv line" in skipped[name]
  assert skipped[names[-1]].startswith("not in any --split_lists file")
  assert skipped[bad.relative_to(root).as_posix()] == reasons_of_bad(m)
  assert m["num_skipped"] == 5
  assert m["num_unlabelled"] == 2
  assert m["unlabelled_examples"] == ["extra/stray1.png", "images_001/images/zz_unlisted.png"]
  assert m["num_converted"] == len(_read(tmp_path / "out"))
  assert tfr_inspect.inspect_dataset(str(tmp_path / "out"), log=lambda _: None)["ok"]


def reasons_of_bad(m: dict) -> str:
  """The one decode failure's reason (the kind the manifest counts besides the row kinds)."""
  kinds = [k for k in m["labels"]["skipped_reasons"]
           if k not in ("missing file", "not in any --split_lists file")]
  assert len(kinds) == 1 and m["labels"]["skipped_reasons"][kinds[0]] == 1
  return kinds[0]


def test_an_image_named_twice_is_an_error_listing_the_names(tmp_path):
  root = tmp_path / "root"
  for n in ("a", "b", "c"):
    _png(root / "img" / f"{n}.png")
  csv1 = _write_csv(tmp_path / "train.csv", ["Path", "Edema"], [["img/a.png", "1"], ["img/b.png", "0"]])
  csv2 = _write_csv(tmp_path / "valid.csv", ["Path", "Edema"], [["img/a.png", "0"], ["img/c.png", "1"]])
  with pytest.raises(convert_lib.ConvertError,
                     match=r"1 images are named by more than one label row: img/a\.png "
                           r"\(.*train\.csv line 2, .*valid\.csv line 2\)"):
    _convert(tmp_path, input_dir=str(root), labels_csv=f"train={csv1},val={csv2}")
  # A bare name found in two folders is ambiguous.
  _png(root / "other" / "a.png")
  one = _write_csv(tmp_path / "one.csv", NIH_HEADER, [["a.png", "Edema", "0", "1", "1"],
                                                      ["b.png", "No Finding", "0", "2", "1"]])
  with pytest.raises(convert_lib.ConvertError, match=r"match several files .*a\.png: img/a\.png, other/a\.png"):
    _convert(tmp_path, "o2", input_dir=str(root), labels_csv=one)


def test_single_csv_gets_drawn_splits_by_patient(tmp_path, nih_set):
  root, summary = nih_set
  kw = dict(input_dir=str(root), labels_csv=str(root / synthetic.NIH_CSV), seed=5,
            val_fraction=0.2, test_fraction=0.2)
  m = _convert(tmp_path, "a", **kw)
  assert m["args"]["drawn_splits"] == {"test": 0.2, "val": 0.2}
  got = _read(tmp_path / "a")
  split_of = {}
  for r in got.values():
    assert split_of.setdefault(r["patient_id"], r["split"]) == r["split"]
  assert {r["split"] for r in got.values()} == {"train", "val", "test"}
  assert sum(info["num_groups"] for info in m["splits"].values()) == 20
  _convert(tmp_path, "b", **kw)
  for f in sorted((tmp_path / "a").glob("*.tfrecord")):
    assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


def test_rsna_is_an_ordinary_single_label_task(tmp_path):
  ids = [f"id{k:02d}" for k in range(12)]
  for k, i in enumerate(ids):
    _png(tmp_path / "stage_2_train_images" / f"{i}.png", 50 + k)
  rows = []
  for k, i in enumerate(ids):
    target = k % 3 == 0
    rows.append([i, "1" if target else "", "", "", "", "1" if target else "0"])
    if target:   # a second bounding box of the same image
      rows.append([i, "5", "5", "9", "9", "1"])
  path = _write_csv(tmp_path / "stage_2_train_labels.csv",
                    ["patientId", "x", "y", "width", "height", "Target"], rows)
  m = _convert(tmp_path, input_dir=str(tmp_path / "stage_2_train_images"), labels_csv=path,
               val_fraction=0.25, test_fraction=0.25)
  assert "task" not in m and m["classes"] == ["No Pneumonia", "Pneumonia"]
  assert m["labels"]["layout"] == "rsna" and m["labels"]["merged_rows"] == 4
  assert m["num_converted"] == 12
  total = {c: sum(info["class_counts"][c] for info in m["splits"].values()) for c in m["classes"]}
  assert total == {"No Pneumonia": 8, "Pneumonia": 4}
  got = _read(tmp_path / "out")
  # RSNA names each image by its patientId: written as the pseudonym.
  assert set(got) == {_pt(i) + ".png" for i in ids}
  for i in ids:
    r = got[_pt(i) + ".png"]
    assert r["patient_id"] == _pt(i)
    positive = int(i[2:4]) % 3 == 0
    assert (r["label"], r["text"]) == ((1, "Pneumonia") if positive else (0, "No Pneumonia"))
    assert r["multi_hot"] == [] and r["mask"] == []
  assert tfr_inspect.inspect_dataset(str(tmp_path / "out"), log=lambda _: None)["ok"]


def test_columns_set_by_hand(tmp_path):
  for n in range(6):
    _png(tmp_path / "films" / f"f{n}.png", 20 * n)
  path = _write_csv(tmp_path / "labels.csv", ["file", "dx", "who", "Mass", "Nodule"], [
      [f"f{n}.png", ["mass;nodule", "none", "nodule", "", "mass", "nodule"][n], f"P{n // 2}",
       str(n % 2), "-1" if n == 3 else "0"] for n in range(6)])
  common = dict(input_dir=str(tmp_path / "films"), labels_csv=path, image_column="file",
                val_fraction=0.0, test_fraction=0.0)
  m = _convert(tmp_path, "joined", labels_column="dx", label_separator=";",
               findings="nodule,mass", patient_column="who", **common)
  assert m["labels"]["layout"] == "columns" and m["classes"] == ["nodule", "mass"]
  assert m["labels"]["unlisted_findings"] == {"none": 1}
  got = _read(tmp_path / "joined")
  assert got["f0.png"]["multi_hot"] == [1.0, 1.0] and got["f1.png"]["multi_hot"] == [0.0, 0.0]
  assert got["f3.png"]["mask"] == [1.0, 1.0]   # a blank cell: negative by default
  assert got["f2.png"]["patient_id"] == _pt("P1") and m["splits"]["train"]["num_groups"] == 3
  m = _convert(tmp_path, "cols", label_columns="Mass,Nodule", **common)
  got = _read(tmp_path / "cols")
  assert m["classes"] == ["Mass", "Nodule"]
  assert got["f3.png"]["multi_hot"] == [1.0, 0.0] and got["f3.png"]["mask"] == [1.0, 0.0]
  m = _convert(tmp_path, "single", labels_column="who", label_separator="", **common)
  assert "task" not in m and m["classes"] == ["P0", "P1", "P2"]
  assert _read(tmp_path / "single")["f5.png"]["text"] == "P2"


def test_option_errors_are_one_line_user_errors(tmp_path, nih_set):
  root, _ = nih_set
  csv_path = str(root / synthetic.NIH_CSV)
  cases = [
      (dict(split_lists="train=x.txt"), "--split_lists needs --labels_csv"),
      (dict(labels_csv=csv_path, class_map="A=B"), "--class_map maps class folders"),
      (dict(labels_csv=str(tmp_path / "nope.csv")), "does not exist"),
      (dict(labels_csv=f"train={csv_path}", split_lists=f"test={root / 'test_list.txt'}"),
       "one way"),
      (dict(labels_csv=csv_path, image_column="Image Index"), "--image_column needs"),
      (dict(labels_csv=csv_path, uncertain="maybe"), "--uncertain must be one of"),
      (dict(labels_csv=f"bogus={csv_path}"), "is not SPLIT=FILE"),
  ]
  for kw, msg in cases:
    with pytest.raises(errors.UserError, match=msg):
      _convert(tmp_path, input_dir=str(root), **kw)
  empty = tmp_path / "empty_root"
  empty.mkdir()
  with pytest.raises(convert_lib.ConvertError, match="none of the 40 label rows names an image"):
    _convert(tmp_path, input_dir=str(empty), labels_csv=csv_path)


def test_cli_prints_the_layout_and_synthetic_cli_writes_csv_sets(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  r = subprocess.run([sys.executable, "-m", "tfrecord_tools.synthetic",
                      f"--output_dir={tmp_path / 'chex'}", "--labels_layout=chexpert",
                      "--num_images=8", "--size=16"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert (tmp_path / "chex" / "train.csv").exists() and (tmp_path / "chex" / "valid.csv").exists()
  r = subprocess.run([sys.executable, "-m", "tfrecord_tools.convert",
                      f"--input_dir={tmp_path / 'chex'}", f"--output_dir={tmp_path / 'o'}",
                      f"--labels_csv={tmp_path / 'chex' / 'train.csv'}", "--num_workers=1",
                      "--val_fraction=0", "--test_fraction=0"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert "labels: chexpert layout in" in r.stderr and "Pleural Effusion" in r.stderr
  assert "converted" in r.stdout
  r = subprocess.run([sys.executable, "-m", "tfrecord_tools.convert",
                      f"--input_dir={tmp_path / 'chex'}", f"--output_dir={tmp_path / 'o2'}",
                      f"--labels_csv={tmp_path / 'chex' / 'synthetic.json'}"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "cannot tell the label CSV's layout" in r.stderr


# --------------------------------------------------------------------------
# Real films: a multi-label CSV view of chest_xray_400x300.
# --------------------------------------------------------------------------


def write_chest_xray_labels(image_root: pathlib.Path, path: pathlib.Path) -> str:
  """The CheXpert-layout CSV view of chest_xray_400x300 that benchmarks/real_data.py trains on."""
  from benchmarks import real_data_views
  return real_data_views.write_chest_xray_labels(str(image_root), str(path))


def test_chest_xray_multi_label_csv_view_converts(tmp_path, shared_data):
  images = shared_data / "chest_xray_400x300"
  path = write_chest_xray_labels(images, tmp_path / "chest_xray_labels.csv")
  m = _convert(tmp_path, input_dir=str(images), labels_csv=path, num_workers=0, seed=0)
  assert m["task"] == "multi_label" and m["classes"] == list(CHEST_XRAY_FINDINGS)
  n = {folder: len(os.listdir(images / folder)) for folder in CHEST_XRAY_FOLDERS}
  assert m["num_found"] == m["num_converted"] == sum(n.values()) and m["num_unlabelled"] == 0
  want = {f: sum(n[folder] for folder, flags in CHEST_XRAY_FOLDERS.items() if flags[k])
          for k, f in enumerate(CHEST_XRAY_FINDINGS)}
  got = {f: sum(info["class_counts"][f] for info in m["splits"].values())
         for f in CHEST_XRAY_FINDINGS}
  assert got == want   # Pneumonia 1108, Bacterial 639, Viral 469, COVID-19 60 on the full set
  for info in m["splits"].values():   # stratified by the rarest finding: COVID-19 in every split
    assert info["class_counts"]["COVID-19"] > 0
    for f in CHEST_XRAY_FINDINGS:
      assert info["finding_counts"][f]["ignored"] == 0
  recs = _read(tmp_path / "out")
  for rel, r in recs.items():
    assert r["multi_hot"] == [float(v) for v in CHEST_XRAY_FOLDERS[rel.split("/")[0]]]
    assert r["mask"] == [1.0] * 4
  assert {r["split"] for r in recs.values()} == {"train", "val", "test"}


def test_beam_runner_writes_the_same_multi_label_shards(tmp_path, chexpert_set):
  pytest.importorskip("apache_beam")
  from tfrecord_tools.convert import beam as beam_convert
  root, _ = chexpert_set
  kw = dict(input_dir=str(root), labels_csv=f"train={root / 'train.csv'},val={root / 'valid.csv'}",
            num_workers=1, quiet=True, num_shards=2)
  local = _convert(tmp_path, "local", **kw)
  beam = beam_convert.convert(convert_lib.ConvertOptions(output_dir=str(tmp_path / "beam"), **kw),
                              "--runner=DirectRunner")
  files = sorted(p.name for p in (tmp_path / "local").glob("*.tfrecord"))
  assert files == sorted(p.name for p in (tmp_path / "beam").glob("*.tfrecord"))
  for f in files:
    assert (tmp_path / "local" / f).read_bytes() == (tmp_path / "beam" / f).read_bytes()
  assert beam["splits"] == local["splits"] and beam["labels"] == local["labels"]


def test_each_synthetic_finding_has_its_own_sign_and_sets_are_deterministic(tmp_path):
  a = synthetic._anatomy(np.random.default_rng([0, 3, 0]))
  plain = synthetic.render(64, 64, 0, a, np.random.default_rng([0, 3, 1]))
  where = {}
  for sign in synthetic.SIGNS:
    img = synthetic.render(64, 64, 0, a, np.random.default_rng([0, 3, 1]), signs=[sign])
    diff = np.abs(img - plain)
    smooth = diff > 0.08   # the sign, not the noise (whose draws may shift)
    assert smooth.sum() >= 4, sign
    ys, xs = np.nonzero(smooth)
    where[sign] = (ys.mean() / 64, xs.mean() / 64)   # row, column in [0, 1]
  assert where["effusion"][0] > 0.55 and where["effusion"][1] < 0.5         # image-left base
  assert where["consolidation"][1] < 0.5 and 0.3 < where["consolidation"][0] < 0.6
  assert where["pneumothorax"][1] > 0.6 and where["pneumothorax"][0] < 0.5  # image-right apex
  assert where["nodule"][0] < 0.4                                            # an upper zone
  assert where["cardiomegaly"][0] > 0.5                                      # the heart shadow
  # Deterministic: the same arguments write the same bytes; the CSVs match the truth.
  s1 = synthetic.generate_labelled(str(tmp_path / "a"), "nih", num_images=6, size=16, seed=4)
  synthetic.generate_labelled(str(tmp_path / "b"), "nih", num_images=6, size=16, seed=4)
  for rel in list(s1["truth"]) + [synthetic.NIH_CSV, "test_list.txt"]:
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
  with open(tmp_path / "a" / synthetic.NIH_CSV, newline="") as f:
    for row in csv.DictReader(f):
      rel = next(r for r in s1["truth"] if r.endswith(row["Image Index"]))
      assert row["Finding Labels"] == ("|".join(s1["truth"][rel]) or "No Finding")
  with pytest.raises(synthetic.SyntheticError, match="--labels_layout"):
    synthetic.generate_labelled(str(tmp_path / "c"), "mimic")


def test_images_and_label_csvs_on_gcs(tmp_path, chexpert_set, gcs_emulator):
  """Image root and label CSVs on gs:// (a local GCS emulator): the same records as locally."""
  from tfrecord_tools import storage
  root, _ = chexpert_set
  remote = gcs_emulator.url(f"labels/{tmp_path.name}/CheXpert-v1.0-small")
  for p in sorted(root.rglob("*")):
    if p.is_file():
      storage.write_bytes(f"{remote}/{p.relative_to(root).as_posix()}", p.read_bytes())
  kw = dict(labels_csv=f"train={remote}/train.csv,val={remote}/valid.csv", num_shards=1)
  m = _convert(tmp_path, "remote", input_dir=remote, **kw)
  local = _convert(tmp_path, "local", input_dir=str(root), **kw)
  assert m["num_converted"] == 48 and m["splits"] == local["splits"]
  for f in sorted((tmp_path / "local").glob("*.tfrecord")):
    assert f.read_bytes() == (tmp_path / "remote" / f.name).read_bytes()
