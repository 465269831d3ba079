"""Subgroups (issue 25 item 4): the converter keeps sex / age / view (and --metadata_columns) in
the records, and evaluate reports AUC, sensitivity and specificity per subgroup with CIs in
report.json, report.md and the model card; subgroups too small for a CI say so.

The report test evaluates the shared `trained_run` (trained on folders, no attributes) on the
same demo films converted from a label CSV that has the attributes: no training of its own.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests._runs import copy_run
from tests.conftest import ROOT
from tfrecord_tools import convert as convert_lib
from tfrecord_tools import errors, metadata, records, synthetic


def _convert(tmp_path, name="out", **kw) -> dict:
  args = dict(output_dir=str(tmp_path / name), num_workers=1, quiet=True)
  args.update(kw)
  return convert_lib.convert(convert_lib.ConvertOptions(**args))


def _attributes(out) -> dict[str, dict[str, str]]:
  """filename -> the record's attributes (metadata.from_record) of every record under `out`."""
  import tensorflow as tf
  spec = records.feature_spec()
  arg_of = {f.key: f.arg for f in records.FEATURES}
  got = {}
  for f in sorted(pathlib.Path(out).glob("*.tfrecord")):
    for raw in records.read_records(str(f)):
      ex = tf.io.parse_single_example(raw, spec)
      got[ex[records.FILENAME].numpy().decode()] = metadata.from_record(
          {arg_of[k]: ex[k].numpy() for k in (records.META_SEX, records.META_AGE,
                                              records.META_VIEW, records.META_COLUMNS)})
  return got


def _write_csv(path, header, rows) -> str:
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return str(path)


# --------------------------------------------------------------------------
# The rules (tfrecord_tools.metadata).
# --------------------------------------------------------------------------


@pytest.mark.parametrize("given,want", [
    ("058Y", "58"), ("58", "58"), ("58.0", "58"), ("003M", "0"), ("010W", "0"), ("005D", "0"),
    ("", ""), ("Unknown", ""), ("nan", ""), ("-3", ""), ("414", ""), ("95", "90"), ("89.9", "89"),
    (None, "")])
def test_age_whole_years_90_and_older_aggregated_implausible_unknown(given, want):
  assert metadata.age(given) == want


def test_sex_view_and_identifier_rules():
  assert [metadata.sex(v) for v in ("M", "Male", "f", "Female", "Unknown", "O", "", None)] == \
      ["M", "M", "F", "F", "", "", "", ""]
  assert metadata.view("ll") == metadata.view("", "Lateral") == metadata.view("LATERAL") == "LATERAL"
  assert metadata.view("AP", "Frontal") == "AP" and metadata.view("", "Frontal") == "FRONTAL"
  assert metadata.view(" pa ") == "PA" and metadata.view("Unknown") == "" and metadata.view("x" * 40) == ""
  for name in ("Patient ID", "PatientID", "subject_id", "StudyDate", "PatientBirthDate",
               "Accession Number", "dicom_id"):
    assert metadata.identifier_like(name), name
  for name in ("Scanner", "Site", "Valid", "Manufacturer"):
    assert not metadata.identifier_like(name), name
  assert metadata.identifier_like("Acquired", ["2020-01-02", "2021-03-04"]) == "its values look like dates"


# --------------------------------------------------------------------------
# Conversion keeps the columns.
# --------------------------------------------------------------------------


def test_nih_csv_keeps_age_gender_view(tmp_path):
  src = tmp_path / "nih"
  synthetic.generate_labelled(str(src), "nih", num_images=12, size=16, images_per_patient=1)
  # Edge cases of real NIH files: '058Y' (the older release), blank, 'Unknown', a typo age.
  path = src / synthetic.NIH_CSV
  rows = list(csv.reader(open(path, encoding="utf-8")))
  header, body = rows[0], rows[1:]
  ai, gi, vi = (header.index(c) for c in ("Patient Age", "Patient Gender", "View Position"))
  body[0][ai], body[1][ai], body[2][ai], body[3][ai] = "058Y", "", "Unknown", "414"
  body[0][gi], body[1][gi], body[0][vi], body[1][vi] = "F", "M", "PA", "AP"
  _write_csv(path, header, body)
  m = _convert(tmp_path, input_dir=str(src), labels_csv=str(path), test_fraction=0, val_fraction=0)
  assert m["metadata"]["columns"] == {"sex": "Patient Gender", "age": "Patient Age",
                                      "view": "View Position"}
  assert m["metadata"]["known"]["age"] == 9 and "90 or older" in m["metadata"]["age"]
  got = _attributes(tmp_path / "out")
  by_name = {k.rsplit("/", 1)[-1]: v for k, v in got.items()}
  assert by_name[body[0][0]] == {"sex": "F", "age": "58", "view": "PA"}
  assert by_name[body[1][0]] == {"sex": "M", "age": "", "view": "AP"}
  assert by_name[body[2][0]]["age"] == "" and by_name[body[3][0]]["age"] == ""
  assert {v["age"] for v in got.values()} - {""} <= {str(a) for a in range(91)}


def test_chexpert_csv_keeps_sex_age_and_view_from_frontal_lateral_and_ap_pa(tmp_path):
  src = tmp_path / "chex"
  synthetic.generate_labelled(str(src), "chexpert", num_images=20, size=16, images_per_patient=1)
  csvs = {s: str(src / f) for s, f in synthetic.CHEXPERT_CSVS.items()}
  # One lateral film, as CheXpert has them (Frontal/Lateral "Lateral", AP/PA blank).
  rows = list(csv.reader(open(csvs["train"], encoding="utf-8")))
  rows[1][3], rows[1][4] = "Lateral", ""
  _write_csv(csvs["train"], rows[0], rows[1:])
  m = _convert(tmp_path, input_dir=str(src), labels_csv=",".join(f"{s}={p}" for s, p in csvs.items()))
  assert m["metadata"]["columns"] == {"sex": "Sex", "age": "Age", "view": "AP/PA + Frontal/Lateral"}
  assert "Sex" not in m["classes"] and "Age" not in m["classes"]
  got = _attributes(tmp_path / "out")
  views = [v["view"] for v in got.values()]
  assert set(views) == {"AP", "PA", "LATERAL"} and views.count("LATERAL") == 1
  assert {v["sex"] for v in got.values()} == {"F", "M", ""}        # patient 12: "Unknown"
  assert all(v["age"] for v in got.values())


def test_mimic_view_position_is_kept(tmp_path):
  """MIMIC-CXR-JPG: a Path + finding columns CSV with the metadata CSV's ViewPosition joined in."""
  from PIL import Image
  src = tmp_path / "mimic"
  rows = []
  for i in range(6):
    rel = f"files/p10/p1000000{i}/s5000000{i}/img{i}.jpg"
    (src / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(src / rel)
    rows.append([rel, str(10000000 + i), ["PA", "AP", "LATERAL", "LL", "", "AP"][i], str(i % 2), ""])
  path = _write_csv(tmp_path / "mimic.csv", ["Path", "subject_id", "ViewPosition", "Edema",
                                             "Pneumonia"], rows)
  m = _convert(tmp_path, input_dir=str(src), labels_csv=path, test_fraction=0, val_fraction=0)
  assert m["classes"] == ["Edema", "Pneumonia"]
  assert m["metadata"]["columns"] == {"view": "ViewPosition"} and m["metadata"]["known"] == {"view": 5}
  views = sorted(v["view"] for v in _attributes(tmp_path / "out").values())
  assert views == ["", "AP", "AP", "LATERAL", "LATERAL", "PA"]


def test_metadata_columns_flag_and_its_refusals(tmp_path):
  src = tmp_path / "img"
  from PIL import Image
  rows = []
  for i in range(8):
    (src / "x").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(src / "x" / f"{i}.png")
    rows.append([f"x/{i}.png", "A" if i % 2 else "B", f"S{i % 2}", "site-1", f"MRN{i}", "2020-01-0" + str(i + 1)])
  header = ["Image", "Label", "Scanner", "Site", "MRN", "Acquired"]
  path = _write_csv(tmp_path / "l.csv", header, rows)
  kw = dict(input_dir=str(src), labels_csv=path, image_column="Image", labels_column="Label",
            label_separator="", group_by="none", test_fraction=0, val_fraction=0)
  m = _convert(tmp_path, metadata_columns="Scanner,Site", **kw)
  assert m["metadata"]["columns"] == {"columns": ["Scanner", "Site"]}
  got = _attributes(tmp_path / "out")
  assert got["x/3.png"] == {"sex": "", "age": "", "view": "", "Scanner": "S1", "Site": "site-1"}
  for bad, why in (("MRN", "identifier or a date"), ("Acquired", "look like dates"),
                   ("Label", "image, label or patient column"), ("Nope", "has no column"),
                   ("Site,site", "twice")):
    with pytest.raises(errors.UserError, match=why):
      _convert(tmp_path, name=f"bad-{bad}", metadata_columns=bad, **kw)
  with pytest.raises(errors.UserError, match="--metadata_columns needs --labels_csv"):
    _convert(tmp_path, name="nocsv", input_dir=str(src), metadata_columns="Scanner")
  # The command line: one line on stderr, exit code 2, no traceback.
  proc = subprocess.run([sys.executable, "-m", "tfrecord_tools.convert", f"--input_dir={src}",
                         f"--output_dir={tmp_path / 'cli'}", f"--labels_csv={path}",
                         "--image_column=Image", "--labels_column=Label", "--label_separator=",
                         "--metadata_columns=MRN", "--quiet"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "MRN" in proc.stderr.strip().splitlines()[-1] and "docs/privacy.md" in proc.stderr


def test_dicom_header_sex_age_view_are_kept_and_nothing_else(tmp_path):
  import pydicom
  src = tmp_path / "dcm"
  for i in range(4):
    cls = "A" if i % 2 else "B"
    (src / cls).mkdir(parents=True, exist_ok=True)
    data = synthetic.encode_dicom(np.full((16, 16), 0.2 + 0.1 * i), "16bit", uid_seed=str(i))
    ds = pydicom.dcmread(__import__("io").BytesIO(data))
    ds.PatientSex, ds.PatientAge, ds.ViewPosition = "F" if i else "M", ["058Y", "095Y", "", "003M"][i], "PA"
    ds.PatientBirthDate = "19600101"
    ds.save_as(src / cls / f"{i}.dcm", enforce_file_format=True)
  m = _convert(tmp_path, input_dir=str(src), test_fraction=0, val_fraction=0, group_by="none")
  assert m["image_stats"]["dicom_attributes"] == {"meta_age": 3, "meta_sex": 4, "meta_view": 4}
  got = {k.rsplit("/", 1)[-1]: v for k, v in _attributes(tmp_path / "out").items()}
  assert got["0.dcm"] == {"sex": "M", "age": "58", "view": "PA"}
  assert got["1.dcm"]["age"] == "90" and got["2.dcm"]["age"] == "" and got["3.dcm"]["age"] == "0"
  blob = b"".join(p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file())
  assert b"19600101" not in blob


def test_records_without_attributes_are_unchanged():
  """Empty attributes are not written: a record of a folder conversion has the same bytes
  as before these fields existed (its shard digests, the data fingerprint, stay the same)."""
  base = dict(encoded=b"x", image_format="png", height=1, width=1, channels=1, bit_depth=8,
              label=0, text="A", filename="a.png")
  plain = records.serialize_example(**base)
  assert b"image/meta" not in plain
  assert records.serialize_example(**base, meta_sex="", meta_age="") == plain
  with_meta = records.serialize_example(**base, meta_sex="F", meta_age="58")
  assert b"image/meta/sex" in with_meta and b"image/meta/view" not in with_meta
  assert with_meta == records.make_example(**base, meta_sex="F", meta_age="58").SerializeToString(
      deterministic=True)


# --------------------------------------------------------------------------
# evaluate: report.json, report.md, the model card.
# --------------------------------------------------------------------------


def _demo_csv(demo_images_dir: str, path: pathlib.Path) -> dict[str, dict]:
  """A label CSV for every demo film (all in test): sex alternating, two NORMAL and two
  PNEUMONIA films aged 8 (the <18 band: too small for a CI), the rest 30-85 or unknown,
  a third AP. Returns {file: its row's attributes}."""
  files = sorted(os.path.relpath(p, demo_images_dir).replace(os.sep, "/")
                 for p in glob.glob(os.path.join(demo_images_dir, "*", "*", "*.png")))
  rows, seen, out = [], {}, {}
  for i, rel in enumerate(files):
    cls = rel.split("/")[1]
    seen[cls] = seen.get(cls, 0) + 1
    age = "8" if seen[cls] <= 2 else ["30", "058Y", "71", "85", "Unknown"][i % 5]
    row = [rel, cls, "MF"[i % 2], age, "AP" if i % 3 == 0 else "PA"]
    rows.append(row)
    out[rel] = row
  _write_csv(path, ["Image", "Label", "Sex", "Age", "View Position"], rows)
  return out


@pytest.fixture(scope="module")
def subgroup_report(trained_run, demo_images_dir, tmp_path_factory):
  from xraytpu.evaluation import evaluate_lib
  tmp = tmp_path_factory.mktemp("subgroups")
  csv_path = tmp / "labels.csv"
  _demo_csv(demo_images_dir, csv_path)
  data = tmp / "with_attributes"
  convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=demo_images_dir, output_dir=str(data), labels_csv=f"test={csv_path}",
      image_column="Image", labels_column="Label", label_separator="", group_by="none",
      num_workers=1, quiet=True))
  run = copy_run(trained_run, tmp)
  report = evaluate_lib.evaluate(run, data_dir=str(data), split="test", n_resamples=50,
                                 write_plots=False)
  return run, report


def test_report_json_has_subgroups_with_cis_and_states_the_small_ones(subgroup_report):
  run, report = subgroup_report
  on_disk = json.loads(pathlib.Path(report["report_dir"], "report.json").read_text())
  sub = on_disk["subgroups"]
  assert list(sub) == ["sex", "age", "view"]
  assert list(sub["sex"]) == ["F", "M"] and list(sub["view"]) == ["PA", "AP"]
  assert list(sub["age"]) == ["<18", "18-39", "40-59", "60-79", "80+", "unknown"]
  assert sum(g["num_examples"] for g in sub["sex"].values()) == on_disk["num_examples"] == 60
  for group in (sub["sex"]["F"], sub["sex"]["M"], sub["view"]["PA"]):
    assert group["auc_ci"] and group["sensitivity_ci"] and group["specificity_ci"]
    lo, hi = group["auc_ci"]
    assert lo <= group["auc"] <= hi and group["note"] is None
  small = sub["age"]["<18"]
  assert (small["positives"], small["negatives"]) == (2, 2)
  assert small["auc"] is not None and small["auc_ci"] is None and small["sensitivity_ci"] is None
  assert small["note"].startswith("too small for a CI: 2 positive, 2 negative")
  assert on_disk["subgroups_info"]["age_bands"] == ["<18", "18-39", "40-59", "60-79", "80+"]
  assert on_disk["subgroups_info"]["min_per_class"] == 5
  md = pathlib.Path(report["report_dir"], "report.md").read_text()
  assert "## Subgroups" in md and "Age bands (years): <18, 18-39, 40-59, 60-79, 80+" in md
  assert "| age | <18 | 4 | 2 pos / 2 neg |" in md and "too small for a CI" in md
  f = sub["sex"]["F"]
  assert (f"| sex | F | {f['num_examples']} | {f['positives']} pos / {f['negatives']} neg | "
          f"{f['auc']:.3f} ({f['auc_ci'][0]:.3f}-{f['auc_ci'][1]:.3f}) |") in md


def test_model_card_factors_and_quantitative_analyses_carry_the_subgroups(subgroup_report):
  run, report = subgroup_report
  card = pathlib.Path(run, "MODEL_CARD.md").read_text()
  factors = card.split("## Factors", 1)[1].split("\n## ", 1)[0]
  assert "subgroups by sex, subgroups by age, subgroups by view" in factors
  assert "no subgroup was measured" not in factors
  f = report["subgroups"]["sex"]["F"]
  assert f"| sex | F | {f['num_examples']} | {f['auc']:.3f} ({f['auc_ci'][0]:.3f}-{f['auc_ci'][1]:.3f})" in card
  assert "| age | <18 | 4 |" in card and "too small for a CI" in card


def test_data_without_attributes_reports_no_subgroups_and_says_why(subgroup_report):
  from xraytpu.evaluation import subgroups
  sub, info = subgroups.compute("binary", ["A", "B"], np.array([0, 1]), np.array([[.9, .1], [.2, .8]]),
                                None, threshold=0.5)
  assert sub == {} and "no patient or acquisition attributes" in info["left_out"]["all"]
  md = subgroups.render_markdown({"task": "binary", "subgroups": sub, "subgroups_info": info})
  assert "None measured" in "\n".join(md)


# --------------------------------------------------------------------------
# Multi-class and multi-label, on arrays (the same code evaluate calls).
# --------------------------------------------------------------------------


def test_multiclass_and_multilabel_subgroups():
  from xraytpu.evaluation import subgroups
  rng = np.random.default_rng(0)
  n = 90
  y = np.arange(n) % 3
  probs = rng.dirichlet([1, 1, 1], n)
  probs[np.arange(n), y] += 1.0
  probs /= probs.sum(1, keepdims=True)
  attrs = [{"sex": "MF"[i % 2] if i < 86 else "", "age": str(20 + i % 60), "view": "PA",
            "Scanner": f"s{i}"} for i in range(n)]
  attrs[0]["age"] = "4"
  sub, info = subgroups.compute("multiclass", ["a", "b", "c"], y, probs, attrs, n_resamples=50)
  assert list(sub) == ["sex", "age", "view"]
  assert "Scanner" in info["left_out"] and "more than 20" in info["left_out"]["Scanner"]
  f = sub["sex"]["F"]
  assert f["class_counts"] == {"a": 14, "b": 15, "c": 14} and f["auc_ci"] and f["sensitivity_ci"]
  assert sub["sex"]["unknown"]["num_examples"] == 4 and "too small" in sub["sex"]["unknown"]["note"]
  assert sub["age"]["<18"]["note"].startswith("one class only")
  # Multi-label: per finding over its labelled images, at its own threshold.
  labels = (rng.uniform(size=(n, 2)) < 0.4).astype(np.float32)
  mask = np.ones((n, 2), bool)
  mask[:10, 1] = False
  p = np.clip(labels * 0.6 + rng.uniform(0, 0.4, (n, 2)), 0, 1)
  sub, _ = subgroups.compute("multi_label", ["X", "Y"], labels, p, attrs, thresholds=[0.5, 0.5],
                             mask=mask, n_resamples=50)
  m = sub["sex"]["M"]
  assert set(m["per_finding"]) == {"X", "Y"} and m["per_finding"]["X"]["auc_ci"]
  assert m["per_finding"]["Y"]["num_examples"] == 43 - 5   # even rows below 86, 5 of the first 10 unlabelled
  assert m["auc"] == pytest.approx(np.mean([m["per_finding"][c]["auc"] for c in "XY"]))
  md = "\n".join(subgroups.render_markdown({"task": "multi_label", "subgroups": sub,
                                            "subgroups_info": info}))
  assert "Per finding:" in md and "| sex | M | X |" in md
