"""No patient identifier in clear (docs/privacy.md): the key of the pseudonyms, the names
written for paths, inspect's warnings, and identifiers planted in DICOM headers and file
names followed through convert -> train -> evaluate -> predict -> export -> serve -> card."""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import uuid

import numpy as np
import pytest

from tests.conftest import ROOT
from tfrecord_tools import convert as convert_lib, pseudonym, records, schema, synthetic
from tfrecord_tools import inspect as tfr_inspect
from tests._records import record_rows

KEY = "xraytpu-tests-patient-key-0123456789"   # tests/conftest.py's


# -- the key -------------------------------------------------------------------------------


def test_the_default_key_is_made_once_readable_by_its_owner_only(tmp_path, monkeypatch):
  monkeypatch.delenv(pseudonym.ENV_KEY, raising=False)
  monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
  logs = []
  key = pseudonym.load_key(log=logs.append)
  path = tmp_path / "config" / "xraytpu" / "patient.key"
  assert key.created and key.source == str(path) and path.is_file()
  assert stat.S_IMODE(path.stat().st_mode) == 0o600
  assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
  assert len(bytes.fromhex(path.read_text().strip())) == 32
  again = pseudonym.load_key()
  assert not again.created and again.secret == key.secret and again.key_id == key.key_id
  assert key.patient("MRN0042") == again.patient("MRN0042") and not logs
  # Names loads it on first need and says where it is; the id tells keys apart, not the secret.
  names = pseudonym.Names({"a/MRN0042_0.png": "MRN0042"}, log=logs.append)
  assert names.patient("MRN0042") == key.patient("MRN0042")
  assert any(f"key id {key.key_id}" in line and str(path) in line for line in logs)
  assert key.key_id not in path.read_text() and path.read_text().strip() not in repr(key)


def test_key_file_then_environment_then_default(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
  monkeypatch.setenv(pseudonym.ENV_KEY, "from-the-environment-0123456789")
  env = pseudonym.load_key()
  assert env.source == f"${pseudonym.ENV_KEY}" and not (tmp_path / "config").exists()
  key_file = tmp_path / "team.key"
  key_file.write_text("a-team-key-kept-in-a-vault-0123456789\n")
  key_file.chmod(0o600)
  from_file = pseudonym.load_key(str(key_file))
  assert from_file.secret == b"a-team-key-kept-in-a-vault-0123456789"
  for k in (env, from_file):
    assert pseudonym.is_pseudonym(k.patient("MRN0042"))
  assert env.patient("MRN0042") != from_file.patient("MRN0042") and env.key_id != from_file.key_id
  assert env.patient("") == "" and env.patient(" MRN0042 ") == env.patient("MRN0042")
  # Mistakes: a named file that is not there, a short key, a key others can read.
  with pytest.raises(pseudonym.PatientKeyError, match="no such file; make a key with: python -c"):
    pseudonym.load_key(str(tmp_path / "missing.key"))
  monkeypatch.setenv(pseudonym.ENV_KEY, "short")
  with pytest.raises(pseudonym.PatientKeyError, match="at least 16"):
    pseudonym.load_key()
  key_file.chmod(0o644)
  logs = []
  pseudonym.load_key(str(key_file), logs.append)
  assert any("can be read by other users" in line and "chmod 600" in line for line in logs)


def test_names_replace_the_patient_id_in_paths_or_hash_them():
  key = pseudonym.Key(KEY.encode(), "test")
  pt = key.patient("MRN0042")
  ids = {"train/MRN0042/MRN0042_1.dcm": "MRN0042", "train/x/scan.dcm": "MRN0042"}
  names = pseudonym.Names(ids, key=key)
  assert names("train/MRN0042/MRN0042_1.dcm") == f"train/{pt}/{pt}_1.dcm"
  assert names("train/x/scan.dcm") == "train/x/scan.dcm"                 # no id in the name
  assert names("other.png") == "other.png"                                # no patient known
  # --group_regex: its match is replaced even inside a longer token.
  import re
  names = pseudonym.Names({"A/p12_0.png": "12"}, regex=re.compile(r"^p(\d+)_"), key=key)
  assert names("A/p12_0.png") == f"A/p{key.patient('12')}_0.png"
  assert names("A/p77_3.png") == f"A/p{key.patient('77')}_3.png"         # found by the regex itself
  # A short id inside a longer number is left alone (NIH: patient 1, file 00000001_000.png).
  assert pseudonym.Names({"00000001_000.png": "1"}, key=key)("00000001_000.png") == "00000001_000.png"
  hashed = pseudonym.Names({}, hash_all=True, key=key)
  name = hashed("train/NORMAL/DOE^JOHN_20190523.DCM")
  assert re.fullmatch(r"h-[0-9a-f]{24}\.dcm", name) and name == hashed("train/NORMAL/DOE^JOHN_20190523.DCM")
  assert hashed.manifest_entry()["filenames"] == "hashed"


def test_identifier_kinds_in_file_names():
  kinds = pseudonym.identifier_kinds
  assert kinds("train/NORMAL/p00012_0.png") == []
  assert kinds(f"train/{pseudonym.Key(KEY.encode(), 't').patient('x')}_0.png") == []
  assert kinds("scan_20190523.dcm") == ["a date"]
  assert kinds("1.2.840.113619.2.55.3.604688.dcm") == ["a DICOM UID"]
  assert kinds("00012345_000.png") == ["a number of 6 or more digits (a record or accession number?)"]
  assert kinds("DOE^JOHN.dcm") == ["a person's name in DICOM form (Family^Given)"]


# -- conversion: pseudonyms in the records, the same splits again --------------------------


_records = record_rows


def test_group_regex_splits_by_pseudonym_the_same_way_every_time(tmp_path, monkeypatch):
  inp = tmp_path / "in"
  synthetic.generate(str(inp), num_images=40, size=16, images_per_patient=2, seed=3)
  opts = dict(input_dir=str(inp), group_regex=r"^(p\d+)_", val_fraction=0.2, test_fraction=0.2,
              num_workers=1, quiet=True, seed=1)
  m = convert_lib.convert(convert_lib.ConvertOptions(output_dir=str(tmp_path / "a"), **opts))
  key = pseudonym.load_key()
  assert m["privacy"] == {"patient_ids": "hmac-sha256", "key_id": key.key_id,
                          "filenames": "patient-ids-replaced", "pseudonym_format": "pt-<24 hex>"}
  assert "patient_key_file" not in m["args"]
  got = _records(tmp_path / "a")
  split_of = {}
  for r in got:
    assert pseudonym.is_pseudonym(r["patient"]) and r["name"].split("/")[-1].startswith(r["patient"] + "_")
    split_of.setdefault(r["patient"], set()).add(r["split"])
  assert len(split_of) == 20 and all(len(s) == 1 for s in split_of.values())
  raw = {os.path.basename(p).split("_")[0] for p in map(str, inp.rglob("*.png"))}
  assert {key.patient(p) for p in raw} == set(split_of)
  blob = b"".join(p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file())
  assert not any(p.encode() in blob for p in raw)
  # A rerun with the same key: the same bytes (so the same splits); another key: other
  # pseudonyms, each patient still in one split.
  convert_lib.convert(convert_lib.ConvertOptions(output_dir=str(tmp_path / "b"), **opts))
  for f in sorted((tmp_path / "a").glob("*.tfrecord")):
    assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
  other = tmp_path / "other.key"
  other.write_text("another-key-another-site-0123456789")
  other.chmod(0o600)
  m2 = convert_lib.convert(convert_lib.ConvertOptions(output_dir=str(tmp_path / "c"),
                                                      patient_key_file=str(other), **opts))
  assert m2["privacy"]["key_id"] != key.key_id
  got2 = _records(tmp_path / "c")
  assert not {r["patient"] for r in got2} & set(split_of)
  assert all(len({r["split"] for r in got2 if r["patient"] == p}) == 1 for p in {r["patient"] for r in got2})
  # --hash_filenames: no file name survives.
  convert_lib.convert(convert_lib.ConvertOptions(output_dir=str(tmp_path / "d"), hash_filenames=True, **opts))
  assert all(r["name"].startswith("h-") and r["name"].endswith(".png") for r in _records(tmp_path / "d"))
  assert schema.read_manifest(str(tmp_path / "d"))["privacy"]["filenames"] == "hashed"


def test_inspect_warns_about_fields_that_look_like_identifiers(tmp_path):
  inp = tmp_path / "in"
  synthetic.generate(str(inp), num_images=12, size=16, seed=4)
  for i, f in enumerate(sorted(inp.rglob("*.png"))):   # names with a date and a long number
    f.rename(f.with_name(f"{f.stem}_2019052{i % 10}_00{i}123456.png"))
  out = tmp_path / "out"
  convert_lib.convert(convert_lib.ConvertOptions(input_dir=str(inp), output_dir=str(out), num_workers=1,
                                                 quiet=True, group_regex=r"^(p\d+)_"))
  lines = []
  report = tfr_inspect.inspect_dataset(str(out), log=lines.append)
  assert report["ok"]
  assert [w.split(" may carry ")[1].split(" (")[0] for w in report["warnings"]] == [
      "a date", "a number of 6 or more digits"]
  assert all("convert again with --hash_filenames" in w and "record" in w for w in report["warnings"])
  assert not any("patient id" in w for w in report["warnings"])
  text = "\n".join(lines)
  assert "2 warnings" in text and "20190520" not in text     # where, never the value
  # A data set converted before pseudonyms: clear patient ids and no "privacy" entry.
  import tensorflow as tf
  spec = records.feature_spec()
  manifest = schema.read_manifest(str(out))
  del manifest["privacy"]
  for info in manifest["splits"].values():
    for shard in info["shards"]:
      path = out / shard["file"]
      old = []
      for raw in records.read_records(str(path)):
        ex = {k: v.numpy() for k, v in tf.io.parse_single_example(raw, spec).items()}
        old.append(records.frame(records.serialize_example(
            encoded=ex[records.ENCODED], image_format=ex[records.FORMAT], height=ex[records.HEIGHT],
            width=ex[records.WIDTH], channels=ex[records.CHANNELS], bit_depth=ex[records.BIT_DEPTH],
            label=ex[records.LABEL], text=ex[records.TEXT], filename=b"old.png",
            patient_id=b"MRN0042", sha256=ex[records.SHA256])))
      path.write_bytes(b"".join(old))
      shard.pop("sha256", None)
  (out / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
  lines = []
  report = tfr_inspect.inspect_dataset(str(out), log=lines.append)
  (warning,) = report["warnings"]
  assert warning.startswith("12 records hold a patient id in clear, not a keyed pseudonym (e.g. ")
  assert "converted before patient ids were pseudonymised" in warning
  assert "MRN0042" not in "\n".join(lines)
  # 12 images of one patient in several splits: a problem, named without the id.
  assert any(p.startswith("1 patient ids are in more than one split") for p in report["problems"])


# -- identifiers planted in DICOM headers and file names, through every door -----------------

PATIENTS = 8
PLANTED_HEADER = {"PatientName": "Quuxley^Zebediah", "PatientBirthDate": "19310217",
                  "StudyDate": "20190523", "InstitutionName": "Saint Plantedwell Infirmary"}


def _mrn(k: int) -> str:
  return f"MRN7351{k:04d}"


def _accession(k: int) -> str:
  return f"ACC9{k:04d}77Q"


def _planted() -> list[str]:
  values = list(PLANTED_HEADER.values()) + ["Quuxley", "Zebediah", "1931-02-17", "2019-05-23"]
  return values + [_mrn(k) for k in range(PATIENTS)] + [_accession(k) for k in range(PATIENTS)]


def _dicom_with_identifiers(k: int, j: int, label: int) -> bytes:
  from tests.test_dicom import _bytes, _dataset, _film
  film = _film(seed=100 * k + j, height=32, width=32)
  if label:   # a bright opacity: something to learn
    film = np.clip(film + np.pad(np.full((10, 10), 0.4), ((8, 14), (8, 14))), 0, 1)
  stored = np.round(film * 4095).astype(np.uint16)
  return _bytes(_dataset(stored, bits=12, PatientID=_mrn(k), AccessionNumber=_accession(k),
                         **PLANTED_HEADER))


def _scan(blob: bytes, where: str) -> None:
  low = blob.lower()
  leaked = [v for v in _planted() if v.lower().encode() in low]
  assert not leaked, f"{where} holds {leaked}"


def _scan_tree(root: pathlib.Path) -> int:
  n = 0
  for p in sorted(root.rglob("*")):
    _scan(str(p.relative_to(root)).encode(), f"the path {p}")
    if p.is_file():
      _scan(p.read_bytes(), str(p))
      n += 1
  return n


def test_no_planted_identifier_leaves_convert_train_evaluate_predict_export_serve_or_the_card(
    tmp_path, capfd):
  pytest.importorskip("pydicom")
  inp, out = tmp_path / "in", tmp_path / "out"
  for k in range(PATIENTS):
    label = k % 2
    folder = inp / ("PNEUMONIA" if label else "NORMAL")
    folder.mkdir(parents=True, exist_ok=True)
    for j in range(2):   # PACS-style names: the patient's record number
      (folder / f"{_mrn(k)}_{j}.dcm").write_bytes(_dicom_with_identifiers(k, j, label))
  out.mkdir()
  data = out / "tfrecords"

  # convert (the command line, its output captured) and inspect
  proc = subprocess.run([sys.executable, "-m", "tfrecord_tools.convert", f"--input_dir={inp}",
                         f"--output_dir={data}", "--group_by=dicom_patient_id", "--val_fraction=0.25",
                         "--test_fraction=0.25", "--num_workers=1"],
                        cwd=ROOT, capture_output=True, timeout=300)
  assert proc.returncode == 0, proc.stderr.decode()[-2000:]
  _scan(proc.stdout + proc.stderr, "convert's output")
  assert b"keyed pseudonyms" in proc.stderr
  manifest = schema.read_manifest(str(data))
  assert manifest["privacy"]["patient_ids"] == "hmac-sha256" and manifest["num_converted"] == 2 * PATIENTS
  proc = subprocess.run([sys.executable, "-m", "tfrecord_tools.inspect", str(data)],
                        cwd=ROOT, capture_output=True, timeout=300)
  assert proc.returncode == 0, proc.stdout.decode()[-2000:]
  _scan(proc.stdout + proc.stderr, "inspect's output")
  assert b"warning" not in proc.stdout

  # train (tiny), evaluate, predict (CSV and JSONL), export, serve, the card: in this process
  from xraytpu.config import Config, ServeOptions
  from xraytpu.evaluation import evaluate_lib
  from xraytpu.inference import export_lib, predict_lib
  from xraytpu.run import model_card
  from xraytpu.serving import http_api
  from xraytpu.training import train_lib
  run = out / "run"
  train_lib.train_and_evaluate(Config(data_dir=str(data), model_dir=str(run), model="xray_cnn",
                                      image_size=32, batch_size=4, epochs=1, augment="none",
                                      cache="off", seed=0).resolve_augment(), verbose=0)
  evaluate_lib.evaluate(str(run), split="test", n_resamples=20)
  films = tmp_path / "to_predict"   # predict echoes the names it is given: neutral ones
  films.mkdir()
  for n, f in enumerate(sorted(inp.rglob("*.dcm"))[:3]):
    shutil.copy(f, films / f"film_{n}.dcm")
  for output in ("predictions.csv", "predictions.jsonl"):
    failed = predict_lib.run_predict(str(run), [str(films)], output=str(out / output))
    assert failed == 0
  assert "Brier score" in (run / "MODEL_CARD.md").read_text()
  export_lib.export(str(run))
  loaded = predict_lib.load(str(run))
  card = model_card.model_card(loaded)
  _scan(json.dumps(card).encode(), "the model card")
  srv = http_api.make_server(ServeOptions(model_dir=str(run), host="127.0.0.1", port=0, access_log=True),
                             run=loaded)
  http_api.start_in_thread(srv)
  try:
    boundary = "----xraytpu" + uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"film.dcm\"\r\n"
            "Content-Type: application/dicom\r\n\r\n").encode() + (films / "film_0.dcm").read_bytes() \
        + f"\r\n--{boundary}--\r\n".encode()
    answers = []
    for method, path, payload, headers in (
        ("POST", "/v1/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}),
        ("GET", "/v1/model", b"", {})):
      conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=120)
      conn.request(method, path, body=payload, headers=headers)
      resp = conn.getresponse()
      answers.append((resp.status, str(resp.getheaders()).encode() + resp.read()))
      conn.close()
  finally:
    srv.close()
  assert [status for status, _ in answers] == [200, 200]
  assert b"film.dcm" in answers[0][1] and b"probabilities" in answers[0][1]
  for status, raw in answers:
    _scan(raw, "a serve response")

  # Every byte written: shards, manifests, TFDS metadata, the run (config, history, TensorBoard
  # events, weights, eval/, MODEL_CARD.md, export/), predictions; and everything printed.
  assert _scan_tree(out) > 20
  captured = capfd.readouterr()
  _scan((captured.out + captured.err).encode(), "the captured stdout/stderr")
  assert "film_0.dcm" in captured.out   # predict's lines were captured
  # ... while the input held them all (the test can see its own plants).
  blob = b"".join(p.read_bytes() for p in inp.rglob("*.dcm"))
  assert all(v.encode() in blob for v in list(PLANTED_HEADER.values()) + [_mrn(0), _accession(0)])
