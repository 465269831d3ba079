"""Conversion on Apache Beam (DirectRunner) against the local converter, on real CT slices."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tfrecord_tools import convert as convert_lib, records, schema

from tfrecord_tools.convert import beam as beam_convert
ROOT = pathlib.Path(__file__).resolve().parents[1]
# Two Beam worker processes: the multi-process path a real runner takes.
BEAM_OPTIONS = ("--runner=DirectRunner --direct_running_mode=multi_processing "
                "--direct_num_workers=2")
# The manifest keys that may differ between two runs / runners.
VOLATILE = {"created", "elapsed_s", "images_per_sec", "name", "args"}


def _link_smallest(src: pathlib.Path, dst: pathlib.Path, n: int) -> None:
  dst.mkdir(parents=True)
  for f in sorted(src.iterdir(), key=lambda p: (p.stat().st_size, p.name))[:n]:
    (dst / f.name).symlink_to(f)


@pytest.fixture(scope="module")
def ct_images(shared_data, tmp_path_factory) -> pathlib.Path:
  """covid_ct slices (RGBA/RGB PNG and JPEG) as input/<class>/*, with two bad files
  and a third class that --class_map drops. File names start with a paper/patient
  id before '%', used as the group."""
  root = tmp_path_factory.mktemp("ct") / "images"
  ct = shared_data / "covid_ct" / "train"
  _link_smallest(ct / "COVID", root / "COVID", 12)
  _link_smallest(ct / "NonCOVID", root / "NonCOVID", 12)
  _link_smallest(shared_data / "pneumoniamnist28" / "val" / "NORMAL", root / "Other", 3)
  good = sorted((ct / "COVID").iterdir())[0].read_bytes()
  (root / "COVID" / "zz%0.png").write_bytes(good[:len(good) // 3])       # truncated
  (root / "NonCOVID" / "99%9.jpg").write_bytes(b"not an image at all")  # not an image
  return root


def _options(images: pathlib.Path, out: pathlib.Path, **kw) -> convert_lib.ConvertOptions:
  args = dict(input_dir=str(images), output_dir=str(out), val_fraction=0.2, test_fraction=0.2,
              seed=3, group_regex=r"^(.+?)%", class_map="Normal=NonCOVID,COVID", max_side=64,
              num_shards=2, num_workers=1, max_skipped_fraction=0.2, quiet=True)
  args.update(kw)
  return convert_lib.ConvertOptions(**args)


def _records(out: pathlib.Path) -> collections.Counter:
  return collections.Counter(r for f in sorted(out.glob("*.tfrecord"))
                             for r in records.read_records(str(f)))


def _named(rel: str) -> str:
  """A path as the converter writes it: --group_regex's patient id (before '%') pseudonymised."""
  from tfrecord_tools import pseudonym
  patient, rest = rel.split("/", 1)[1].split("%", 1)
  return f"{rel.split('/')[0]}/{pseudonym.load_key().patient(patient)}%{rest}"


def _stable(manifest: dict) -> dict:
  return {k: v for k, v in manifest.items() if k not in VOLATILE}


def test_beam_matches_local_converter(ct_images, tmp_path):
  local_out, beam_out = tmp_path / "local", tmp_path / "beam"
  local = convert_lib.convert(_options(ct_images, local_out))
  proc = subprocess.run(
      [sys.executable, "-m", "tfrecord_tools.convert", "--runner=beam",
       f"--beam_pipeline_options={BEAM_OPTIONS}", f"--input_dir={ct_images}",
       f"--output_dir={beam_out}", "--val_fraction=0.2", "--test_fraction=0.2", "--seed=3",
       "--group_regex=^(.+?)%", "--class_map=Normal=NonCOVID,COVID", "--max_side=64",
       "--num_shards=2", "--max_skipped_fraction=0.2"],
      cwd=ROOT, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  beam = schema.read_manifest(str(beam_out))

  # The same records (here even the same shards: the plan is the local one).
  assert sum(_records(local_out).values()) == local["num_converted"] == 24
  assert _records(beam_out) == _records(local_out)
  for f in local_out.glob("*.tfrecord"):
    assert (beam_out / f.name).read_bytes() == f.read_bytes(), f.name
  # An equivalent manifest: classes, splits, counts, shards, skipped, dropped, stats.
  assert _stable(beam) == _stable(local)
  assert beam["classes"] == ["Normal", "COVID"]
  assert beam["dropped"] == {"Other": 3}
  assert {s["path"]: s["reason"].split(" ")[0] for s in beam["skipped"]} == {
      _named("COVID/zz%0.png"): "truncated", _named("NonCOVID/99%9.jpg"): "not"}
  assert beam["args"]["runner"] == "beam"
  assert beam["args"]["beam_pipeline_options"] == BEAM_OPTIONS
  same_args = [k for k in local["args"] if k not in ("output_dir", "num_workers")]
  assert [beam["args"][k] for k in same_args] == [local["args"][k] for k in same_args]
  # Skipped files counted by Beam counters, reported at the end.
  assert "images_converted=24, images_skipped=2, shards_written=6" in proc.stderr
  # Nothing left behind but shards and the manifest.
  assert sorted(p.name for p in beam_out.iterdir()) == sorted(p.name for p in local_out.iterdir())


def test_beam_resumes_finished_shards_and_checks_skipped_fraction(ct_images, tmp_path):
  out = tmp_path / "out"
  logs = []
  with pytest.raises(convert_lib.ConvertError, match="could not be converted"):
    beam_convert.convert(_options(ct_images, out, max_skipped_fraction=0.01), "--runner=DirectRunner",
                         log=logs.append)
  assert not (out / schema.MANIFEST_NAME).exists()
  assert {s["path"] for s in json.loads((out / "skipped.json").read_text())} == {
      _named("COVID/zz%0.png"), _named("NonCOVID/99%9.jpg")}
  # Rerun with a looser limit: every shard is taken from the first run, none rewritten.
  mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tfrecord")}
  assert len(mtimes) == 6
  manifest = beam_convert.convert(_options(ct_images, out), "--runner=DirectRunner",
                                  log=logs.append)
  assert "nothing to convert: 6 of 6 shards already complete" in logs   # issue 14
  assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tfrecord")} == mtimes
  assert manifest["num_converted"] == 24 and manifest["num_skipped"] == 2
  assert sorted(os.listdir(out)) == sorted([schema.MANIFEST_NAME, *mtimes, "dataset_info.json",
                                          "features.json", "image.class.label.labels.txt"])


def test_runner_beam_without_beam_is_one_line_error(tmp_path):
  hide_beam = ("import importlib.util as u, sys; real = u.find_spec; "
               "u.find_spec = lambda n, *a: None if n == 'apache_beam' else real(n, *a); "
               "from tfrecord_tools.convert import __main__ as convert; "
               "sys.argv = ['convert'] + sys.argv[1:]; convert.run()")
  proc = subprocess.run([sys.executable, "-c", hide_beam, "--runner=beam",
                         f"--input_dir={tmp_path}", f"--output_dir={tmp_path / 'out'}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("convert: error: --runner=beam needs Apache Beam: "
                                 "pip install 'xraytpu[beam]'")


def test_dataflow_launcher_dry_run_prints_the_beam_command():
  proc = subprocess.run(
      ["bash", str(ROOT / "launch" / "dataflow_convert.sh"), "--project=p", "--bucket=b",
       "--images=gs://b/raw/cxr", "--dataset=CheX_pert", "--max_workers=8", "--dry_run", "--",
       "--val_fraction=0.1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  cmds = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
  assert len(cmds) == 2 and "pip wheel --no-deps" in cmds[0]
  convert = cmds[1].replace("\\ ", " ")
  assert "-m tfrecord_tools.convert --runner=beam --input_dir=gs://b/raw/cxr" in convert
  assert "--output_dir=gs://b/datasets/CheX_pert" in convert
  for opt in ("--runner=DataflowRunner", "--project=p", "--max_num_workers=8",
              "--job_name=xraytpu-convert-chex-pert-", "--temp_location=gs://b/tmp/dataflow",
              "-py3-none-any.whl", "dataflow_requirements.txt"):
    assert opt in convert, opt
  assert convert.endswith("--val_fraction=0.1")
  local = subprocess.run(["bash", str(ROOT / "launch" / "dataflow_convert.sh"), "--project=p",
                          "--bucket=b", "--images=./imgs", "--dry_run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert local.returncode == 2 and "--images must be a gs:// folder" in local.stderr
  assert len(local.stderr.strip().splitlines()) == 1


def test_remote_input_folder_matches_local(ct_images, tmp_path):
  """gs:// input goes through tf.io.gfile; TF's in-memory ram:// file system stands in
  for it (the in-process DirectRunner shares it)."""
  import tensorflow as tf
  remote = f"ram://bucket/{tmp_path.name}/images"
  for f in sorted(ct_images.rglob("*")):
    if f.is_file():
      tf.io.gfile.makedirs(f"{remote}/{f.parent.name}")
      tf.io.gfile.GFile(f"{remote}/{f.parent.name}/{f.name}", "wb").write(f.read_bytes())
  tf.io.gfile.GFile(f"{remote}/notes.txt", "wb").write(b"ignored: not in a class folder")
  local = convert_lib.convert(_options(ct_images, tmp_path / "local"))
  beam = beam_convert.convert(
      dataclasses.replace(_options(ct_images, tmp_path / "beam"), input_dir=remote),
      "--runner=DirectRunner")
  assert _records(tmp_path / "beam") == _records(tmp_path / "local")
  assert beam["num_ignored"] == 1 and beam["ignored_examples"] == ["notes.txt"]
  assert _stable(dict(beam, num_ignored=0, ignored_examples=[])) == _stable(local)
