"""Issue 24, items 4 and 5a: patients found in file names by default, the input's own split
overlap recorded, and label sanity at conversion (a typo in --findings, a label with no
positive or no negative in a split).

Everything converts tiny synthetic sets in-process (16 px films, one worker); one command
line run checks the one-line error of a --findings typo.
"""

from __future__ import annotations

import csv
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT
from tfrecord_tools import convert as convert_lib, errors, pseudonym, synthetic
from tfrecord_tools.convert import split as split_lib
from tests._records import record_rows


def _convert(inp, out, log=None, **kw) -> dict:
  args = dict(input_dir=str(inp), output_dir=str(out), num_workers=1, quiet=True)
  args.update(kw)
  return convert_lib.convert(convert_lib.ConvertOptions(**args), log=log)


_records = record_rows


def _splits_per_patient(rows: list[dict]) -> dict[str, set]:
  out: dict[str, set] = {}
  for r in rows:
    out.setdefault(r["patient"], set()).add(r["split"])
  return out


def _write_csv(path: pathlib.Path, header, rows) -> str:
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return str(path)


@pytest.fixture(scope="module")
def patients_set(tmp_path_factory) -> pathlib.Path:
  """60 films of 20 patients (3 each, p00012_0.png ...), two classes, as the generator writes them."""
  root = tmp_path_factory.mktemp("patients") / "images"
  synthetic.generate(str(root), num_images=60, size=16, images_per_patient=3, seed=11)
  return root


# --------------------------------------------------------------------------
# Item 4: patients grouped by default when the file names show them.
# --------------------------------------------------------------------------


def test_synthetic_json_regex_groups_patients_by_default(tmp_path, patients_set):
  """Before: 60 films of 20 patients split by image (patients in several splits, no word)."""
  logs = []
  m = _convert(patients_set, tmp_path / "out", log=logs.append)
  spp = _splits_per_patient(_records(tmp_path / "out"))
  assert len(spp) == 20 and all(pseudonym.is_pseudonym(p) for p in spp)
  assert all(len(s) == 1 for s in spp.values()), spp
  assert {sp for s in spp.values() for sp in s} == {"train", "val", "test"}
  assert sum(info["num_groups"] for info in m["splits"].values()) == 20
  assert m["args"]["patient_grouping"] == {
      "source": "synthetic.json", "regex": r"^(p\d+)_", "files_matched": 60, "num_files": 60,
      "num_ids": 20, "ids_repeated": 20}
  assert any(line.startswith("patients: the generator's group_regex in synthetic.json "
                             r"(regex '^(p\\d+)_': 60 of 60 files, 20 ids") for line in logs), logs


def test_id_n_file_names_group_patients_without_synthetic_json(tmp_path, patients_set):
  inp = tmp_path / "images"
  shutil.copytree(patients_set, inp)
  (inp / synthetic.MARKER).unlink()
  shutil.copy(inp / "NORMAL" / "p00000_0.png", inp / "NORMAL" / "extra scan.png")   # no <id>_<n>
  logs = []
  m = _convert(inp, tmp_path / "out", log=logs.append)
  grouping = m["args"]["patient_grouping"]
  assert grouping["source"] == "file names" and grouping["regex"] == split_lib.ID_N_REGEX
  assert (grouping["files_matched"], grouping["num_files"]) == (60, 61)
  rows = _records(tmp_path / "out")
  spp = _splits_per_patient([r for r in rows if r["patient"]])
  assert len(spp) == 20 and all(len(s) == 1 for s in spp.values())
  assert any("the 1 other files are each their own group" in line for line in logs)


def test_group_regex_wins_and_group_by_none_turns_grouping_off(tmp_path, patients_set):
  m = _convert(patients_set, tmp_path / "regex", group_regex=r"^(p\d{4})")   # 10 ids a group
  assert m["args"]["patient_grouping"] == {"source": "--group_regex", "regex": r"^(p\d{4})"}
  assert sum(info["num_groups"] for info in m["splits"].values()) == 2
  assert len(_splits_per_patient(_records(tmp_path / "regex"))) == 2
  logs = []
  m = _convert(patients_set, tmp_path / "none", log=logs.append, group_by="none")
  assert m["args"]["patient_grouping"] == {"source": "--group_by=none"}
  assert all(info["num_groups"] is None for info in m["splits"].values())
  rows = _records(tmp_path / "none")
  assert {r["patient"] for r in rows} == {""} and m["privacy"]["patient_ids"] == "none"
  assert {r["name"].split("/")[-1] for r in rows} >= {"p00000_0.png", "p00000_1.png"}
  assert not any(line.startswith("patients:") or "not grouped" in line for line in logs)
  with pytest.raises(convert_lib.ConvertError, match="--group_by=none .* and --group_regex .* contradict"):
    _convert(patients_set, tmp_path / "x", group_by="none", group_regex=r"^(p\d+)_")
  with pytest.raises(convert_lib.ConvertError, match="--group_by=bogus: must be dicom_patient_id or none"):
    _convert(patients_set, tmp_path / "x", group_by="bogus")


def _renamed_copy(src: pathlib.Path, dst: pathlib.Path, name) -> pathlib.Path:
  """The generator's films under other names: name(class, patient number, image number)."""
  for f in sorted(src.rglob("*.png")):
    p, j = f.stem[1:].split("_")
    target = dst / f.parent.name / f"{name(f.parent.name, int(p), int(j))}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(f, target)
  return dst


@pytest.mark.parametrize("kind,name,why", [
    # Kermany's chest_xray: only a leading token is an id (person12_bacteria_3.jpeg).
    ("leading token", lambda c, p, j: f"person{p}_{'bacteria' if j else 'virus'}_{j}",
     "only the names' first token"),
    # "<id>_<n>" whose id holds every file: a date or a batch, not a patient.
    ("one id", lambda c, p, j: f"20190521_{p * 3 + j}", "an id names more than a quarter of the files"),
    # Too few names of the form <id>_<n>.
    ("few match", lambda c, p, j: f"p{p}_{j}" if p % 2 else f"scan{p}x{j}", "fewer than 90%"),
])
def test_ids_that_repeat_without_a_clear_rule_are_warned_not_grouped(tmp_path, patients_set, kind,
                                                                     name, why):
  inp = _renamed_copy(patients_set, tmp_path / "images", name)
  logs = []
  m = _convert(inp, tmp_path / "out", log=logs.append)
  grouping = m["args"]["patient_grouping"]
  assert grouping["source"] == "none" and why in grouping["warning"], grouping
  warn = [line for line in logs if line.startswith("warning: patients are not grouped")]
  assert len(warn) == 1 and why in warn[0] and "--group_regex" in warn[0] and "--group_by=none" in warn[0]
  assert "person1_" not in warn[0] and "p1_" not in warn[0]   # counts and the regex, no id
  assert {r["patient"] for r in _records(tmp_path / "out")} == {""}


def test_one_image_per_patient_needs_no_grouping(tmp_path):
  inp = tmp_path / "images"
  synthetic.generate(str(inp), num_images=12, size=16, seed=12)   # p00000_0.png ... one each
  logs = []
  m = _convert(inp, tmp_path / "out", log=logs.append)
  assert m["args"]["patient_grouping"] == {"source": "none"}
  assert {r["patient"] for r in _records(tmp_path / "out")} == {""}
  assert not any(line.startswith("patients:") or "not grouped" in line for line in logs), logs


def test_labelled_sets_take_the_csv_patient_else_the_file_names(tmp_path, patients_set):
  """--labels_csv: the patient column wins; without one, the same file-name rule as folders."""
  films = tmp_path / "films"
  files = sorted(p.relative_to(patients_set).as_posix() for p in patients_set.rglob("*.png"))
  for rel in files:
    (films / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(patients_set / rel, films / rel)
  rows = [[rel, rel.split("/")[0]] for rel in files]
  csv_path = _write_csv(tmp_path / "labels.csv", ["file", "dx"], rows)
  common = dict(labels_csv=csv_path, image_column="file", labels_column="dx", label_separator="")
  m = _convert(films, tmp_path / "out", **common)
  assert m["args"]["patient_grouping"]["source"] == "file names"
  spp = _splits_per_patient(_records(tmp_path / "out"))
  assert len(spp) == 20 and all(len(s) == 1 for s in spp.values())
  with_col = _write_csv(tmp_path / "labels2.csv", ["file", "dx", "who"],
                        [r + [f"P{i % 5}"] for i, r in enumerate(rows)])
  m = _convert(films, tmp_path / "out2", **dict(common, labels_csv=with_col, patient_column="who"))
  assert m["args"]["patient_grouping"] == {"source": "label CSV", "column": "who"}
  assert len(_splits_per_patient(_records(tmp_path / "out2"))) == 5
  with pytest.raises(convert_lib.ConvertError, match="--group_by=dicom_patient_id reads folders"):
    _convert(films, tmp_path / "x", group_by="dicom_patient_id", **common)


# --------------------------------------------------------------------------
# Item 4b: the input's own splits sharing a patient: recorded, by pseudonym.
# --------------------------------------------------------------------------


def test_nih_lists_sharing_a_patient_are_recorded_in_dataset_json(tmp_path):
  root = tmp_path / "nih"
  synthetic.generate_labelled(str(root), "nih", num_images=24, size=16, seed=5, images_per_patient=2)
  train = (root / "train_val_list.txt").read_text().split()
  test = (root / "test_list.txt").read_text().split()
  moved = next(n for n in train if n.endswith("_001.png") and int(n[:8]) >= 10)   # _000 stays
  (root / "train_val_list.txt").write_text("".join(n + "\n" for n in train if n != moved))
  (root / "test_list.txt").write_text("".join(n + "\n" for n in test + [moved]))
  lists = ",".join(f"{sp}={root / f}" for sp, f in synthetic.NIH_LISTS.items())
  logs = []
  m = _convert(root, tmp_path / "out", log=logs.append, labels_csv=str(root / synthetic.NIH_CSV),
               split_lists=lists)
  raw = str(int(moved[:8]))
  pt = pseudonym.load_key().patient(raw)
  assert m["args"]["patient_grouping"] == {"source": "label CSV", "column": "Patient ID"}
  assert m["args"]["patients_in_several_splits"] == 1
  [ex] = m["args"]["patients_in_several_splits_examples"]
  assert ex["patient"] == pt and ex["images"]["test"] == 1 and sum(ex["images"].values()) == 2
  assert any(line.startswith("warning: 1 patients appear in more than one of the input's own splits")
             and pt in line for line in logs)
  assert f'"{raw}"' not in (tmp_path / "out" / "dataset.json").read_text()


def test_chexpert_train_and_valid_sharing_a_patient_are_recorded(tmp_path):
  root = tmp_path / "CheXpert-v1.0-small"
  synthetic.generate_labelled(str(root), "chexpert", num_images=24, size=16, seed=6,
                              images_per_patient=2)
  text = (root / "train.csv").read_text().splitlines()
  first = next(csv.reader([text[1]]))             # a train film of patient00000
  patient = first[0].split("/")[2]
  extra = root / "valid" / patient / "study9" / "view1_frontal.png"
  extra.parent.mkdir(parents=True)
  from PIL import Image
  film = np.array(Image.open(root / "/".join(first[0].split("/")[1:])))
  film[0, 0] ^= 1                                  # another film of the same patient
  Image.fromarray(film).save(extra)
  with open(root / "valid.csv", "a", newline="", encoding="utf-8") as f:
    csv.writer(f, lineterminator="\n").writerow(
        [f"{root.name}/valid/{patient}/study9/view1_frontal.png"] + first[1:5] + [""]
        + ["1.0" if c == "1.0" else "0.0" for c in first[6:]])
  m = _convert(root, tmp_path / "out", labels_csv=f"train={root / 'train.csv'},valid={root / 'valid.csv'}",
               test_fraction=0.0)
  assert m["args"]["patients_in_several_splits"] == 1
  [ex] = m["args"]["patients_in_several_splits_examples"]
  assert ex == {"patient": pseudonym.load_key().patient(patient), "images": {"train": 2, "val": 1}}
  assert patient not in (tmp_path / "out" / "dataset.json").read_text()


# --------------------------------------------------------------------------
# Item 5a: label sanity at conversion.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nih_set(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("nih") / "nih"
  synthetic.generate_labelled(str(root), "nih", num_images=16, size=16, seed=7)
  return root


def test_a_findings_typo_is_one_line_naming_the_closest_names(tmp_path, nih_set):
  """Before: --findings=Effusion,Efusion made an all-zero finding 'Efusion', rc 0, no word."""
  csv_path = str(nih_set / synthetic.NIH_CSV)
  with pytest.raises(errors.UserError) as e:
    _convert(nih_set, tmp_path / "a", labels_csv=csv_path, findings="Effusion,Efusion")
  msg = str(e.value)
  assert "'Efusion'" in msg and "did you mean 'Effusion' for 'Efusion'?" in msg and "\n" not in msg
  with pytest.raises(errors.UserError, match="did you mean 'Effusion' for 'effusion'"):
    _convert(nih_set, tmp_path / "b", labels_csv=csv_path, findings="effusion")
  with pytest.raises(errors.UserError, match="'No Finding', which in column 'Finding Labels' "
                                                     "means none of the findings"):
    _convert(nih_set, tmp_path / "c", labels_csv=csv_path, findings="Nodule,No Finding")
  assert not (tmp_path / "a" / "dataset.json").exists()
  # The command line: one line on stderr, exit code 2, no traceback.
  r = subprocess.run([sys.executable, "-m", "tfrecord_tools.convert", f"--input_dir={nih_set}",
                      f"--output_dir={tmp_path / 'cli'}", f"--labels_csv={csv_path}",
                      "--findings=Effusion,Efusion"], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert "did you mean 'Effusion'" in lines[-1] and "Traceback" not in r.stderr


def test_a_missing_finding_column_names_the_closest_columns(tmp_path):
  root = tmp_path / "CheXpert-v1.0-small"
  synthetic.generate_labelled(str(root), "chexpert", num_images=8, size=16, seed=8)
  with pytest.raises(errors.UserError,
                     match=r"--findings names 'Pleural Efusion', which the label CSV .* has no "
                           r"column for \(did you mean 'Pleural Effusion' for 'Pleural Efusion'\?\)"):
    _convert(root, tmp_path / "out", labels_csv=f"train={root / 'train.csv'}",
             findings="Cardiomegaly,Pleural Efusion")


def test_class_map_typo_names_the_closest_class(tmp_path, patients_set):
  with pytest.raises(convert_lib.ConvertError, match="did you mean 'PNEUMONIA' for 'PNEUMONA'"):
    _convert(patients_set, tmp_path / "out", class_map="NORMAL,PNEUMONA")


def test_a_finding_with_no_positive_or_no_negative_in_a_split_is_warned_and_recorded(tmp_path):
  from PIL import Image
  films = tmp_path / "films"
  films.mkdir()
  rows = []
  for n in range(8):
    Image.fromarray(np.full((8, 8), 20 * n, np.uint8)).save(films / f"f{n}.png")
    rows.append([f"f{n}.png", str(n % 2), "0", "1"])   # Mass half, Hernia never, Support always
  csv_path = _write_csv(tmp_path / "labels.csv", ["file", "Mass", "Hernia", "Support"], rows)
  logs = []
  m = _convert(films, tmp_path / "out", log=logs.append, labels_csv=csv_path, image_column="file",
               label_columns="Mass,Hernia,Support", val_fraction=0.0, test_fraction=0.0)
  assert m["args"]["label_warnings"] == [
      {"split": "train", "label": "Hernia", "positives": 0, "negatives": 8},
      {"split": "train", "label": "Support", "positives": 8, "negatives": 0}]
  assert m["splits"]["train"]["finding_counts"]["Hernia"]["positive"] == 0
  assert "warning: findings with no positive in a split: 'Hernia' (train): that split cannot score it " \
         "(counts in dataset.json)" in logs
  assert "warning: findings with no negative in a split: 'Support' (train): that split cannot score " \
         "it (counts in dataset.json)" in logs


def test_a_class_missing_from_a_drawn_split_is_warned_and_recorded(tmp_path):
  inp = tmp_path / "images"
  synthetic.generate(str(inp), num_images=22, size=16, seed=9, num_classes=3)
  covid = sorted((inp / "COVID").glob("*.png"))
  for f in covid[2:]:
    f.unlink()                                         # 2 COVID films: none drawn into val/test
  logs = []
  m = _convert(inp, tmp_path / "out", log=logs.append)
  assert [w for w in m["args"]["label_warnings"] if w["label"] == "COVID"] == [
      {"split": "val", "label": "COVID", "positives": 0, "negatives": m["splits"]["val"]["num_examples"]},
      {"split": "test", "label": "COVID", "positives": 0, "negatives": m["splits"]["test"]["num_examples"]}]
  assert m["splits"]["test"]["class_counts"]["COVID"] == 0
  assert any(line.startswith("warning: classes with no image in a split: 'COVID' (val, test)")
             for line in logs), logs
  ok = _convert(inp, tmp_path / "ok", class_map="NORMAL,PNEUMONIA")
  assert ok["args"]["label_warnings"] == []
