"""Issue 24 (3): evaluation knows its data.

- the run's training data converted again (another --seed: films move between splits) is
  refused with one line naming what changed, or evaluated with --allow_data_change and the
  change named in report.json, report.md and the model card;
- another data set (--data_dir=OTHER) is evaluated, and the report counts its films the run
  trained on, by content hash (RUN/training_films.json, written at training).

All of it reuses the shared `trained_run` (trained on `demo_data_dir`): a private copy whose
config.json points at a private copy of that data, which the tests then convert again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tfrecord_tools import convert as convert_lib, schema
from tests._runs import copy_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(n_resamples=20, write_plots=False, threshold_policy="fixed:0.5")


def _flat_images(demo_images_dir, dst):
  """demo_images_dir's 60 films without its split folders: DST/<class>/<name>."""
  for split in ("train", "val", "test"):
    for cls in os.listdir(os.path.join(demo_images_dir, split)):
      os.makedirs(dst / cls, exist_ok=True)
      for name in os.listdir(os.path.join(demo_images_dir, split, cls)):
        shutil.copy(os.path.join(demo_images_dir, split, cls, name), dst / cls / f"{split}-{name}")
  return dst


def _reconvert(src, out, seed):
  """`src` converted as demo_data_dir is laid out (splits of 44 / 8 / 8 films, 2 shards each):
  the same split sizes and shard names, other films in each split (the issue's case)."""
  return convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=str(src), output_dir=str(out), num_workers=1, quiet=True, num_shards=2,
      val_fraction=8 / 60, test_fraction=8 / 60, seed=seed, overwrite=True))


@pytest.fixture()
def own_data_run(trained_run, demo_data_dir, tmp_path):
  """(run, data): a copy of trained_run whose training data is a private copy of demo_data_dir."""
  data = tmp_path / "data"
  shutil.copytree(demo_data_dir, data)
  run = copy_run(trained_run, tmp_path)
  cfg_path = os.path.join(run, "config.json")
  doc = json.loads(open(cfg_path).read())
  doc["data_dir"] = str(data)
  with open(cfg_path, "w") as f:
    json.dump(doc, f)
  return run, data


def _evaluate(run, **kw):
  from xraytpu.evaluation import evaluate_lib
  return evaluate_lib.evaluate(run, **{**FAST, **kw})


def test_training_lists_its_films_by_content(trained_run, demo_data_dir):
  from xraytpu.run import films
  listing = films.read(trained_run)
  m = schema.read_manifest(demo_data_dir)
  assert listing["data_digest"] == schema.data_fingerprint(m)["digest"]
  assert len(listing["splits"]["train"]) == m["splits"]["train"]["num_examples"] == 44
  assert len(listing["splits"]["val"]) == 8 and not listing["without_hash"]["train"]


def test_unchanged_data_is_evaluated_and_found_free_of_training_films(own_data_run):
  run, _ = own_data_run
  report = _evaluate(run, split="test")
  assert report["data_change"] is None
  assert report["training_overlap"] == {"checked": True, "num_films": 8, "without_hash": 0,
                                        "in_train": 0, "in_val": 0, "reason": None}
  assert not [n for n in report["notes"] if "training" in n]


def test_changed_training_data_is_refused_in_one_line(own_data_run, demo_images_dir, tmp_path):
  """The issue's case: converted again with another --seed (same split sizes, same shard
  names), rc 0 and a clean report before."""
  run, data = own_data_run
  _reconvert(_flat_images(demo_images_dir, tmp_path / "flat"), data, seed=7)
  proc = subprocess.run(
      [sys.executable, "-m", "xraytpu.evaluate", f"--model_dir={run}", "--noplots",
       "--bootstrap_resamples=20", "--threshold_policy=fixed:0.5"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  line = lines[0]
  assert line.startswith(f"xraytpu.evaluate: error: the run's training data {data} changed since")
  # The one fingerprint comparison the resume check makes names the same differences.
  recorded = json.loads(open(os.path.join(run, "config.json")).read())["run"]["data"]
  now = schema.data_fingerprint(schema.read_manifest(str(data)))
  assert schema.fingerprint_differences(recorded, now)[0] in line
  assert "--allow_data_change" in line
  assert not os.path.exists(os.path.join(run, "eval"))


def test_a_new_threshold_on_changed_data_is_refused_too(own_data_run, demo_images_dir, tmp_path):
  """Evaluating other data needs no training data, unless the threshold is chosen again on
  the training data's (changed) val split."""
  from xraytpu.evaluation import training_data
  run, data = own_data_run
  other = tmp_path / "other"
  shutil.copytree(data, other)
  _reconvert(_flat_images(demo_images_dir, tmp_path / "flat"), data, seed=7)
  with pytest.raises(training_data.DataChangedError, match="'val' split, on which the threshold is chosen"):
    _evaluate(run, data_dir=str(other), threshold_policy="youden")
  report = _evaluate(run, data_dir=str(other))            # fixed threshold: the val split is not read
  assert report["data_change"] is None and report["training_overlap"]["in_train"] == 0


def test_allow_data_change_names_the_change_and_the_films_seen(own_data_run, demo_images_dir,
                                                               tmp_path):
  run, data = own_data_run
  _reconvert(_flat_images(demo_images_dir, tmp_path / "flat"), data, seed=7)
  report = _evaluate(run, split="test", allow_data_change=True)
  change = report["data_change"]
  assert change["data_dir"] == str(data) and change["differences"]
  assert change["trained_digest"] != change["digest"]
  overlap = report["training_overlap"]
  assert overlap["checked"] and overlap["num_films"] == report["num_examples"]
  assert overlap["in_train"] > 0          # the new "test" split holds films trained on
  md = open(os.path.join(report["report_dir"], "report.md")).read()
  assert "--allow_data_change" in md and f"{overlap['in_train']} of {overlap['num_films']} test films" in md
  card = open(os.path.join(run, "MODEL_CARD.md")).read()
  assert "--allow_data_change" in card and "were in the run's training split" in card
  saved = json.loads(open(os.path.join(report["report_dir"], "report.json")).read())
  assert saved["data_change"] == change and saved["training_overlap"] == overlap


def test_other_data_is_evaluated_with_its_training_films_counted(own_data_run, demo_images_dir,
                                                                 tmp_path, caplog):
  run, _ = own_data_run
  other = tmp_path / "other"
  _reconvert(_flat_images(demo_images_dir, tmp_path / "flat"), other, seed=3)
  report = _evaluate(run, data_dir=str(other), split="test")
  overlap, overlap_dataset = report["training_overlap"], report["dataset"]
  assert report["data_change"] is None and overlap["checked"]
  assert 0 < overlap["in_train"] <= overlap["num_films"] == report["num_examples"]
  assert any(f"{overlap['in_train']} of {overlap['num_films']} test films were in the run's "
             "training split" in n for n in report["notes"])
  warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("were in the run's training split" in w for w in warned)   # a warning, not only a note
  # A data set of films never seen: nothing in training.
  from tfrecord_tools import synthetic
  fresh = tmp_path / "fresh"
  synthetic.generate(str(tmp_path / "fresh_images"), num_images=20, size=64, bit_depth=8,
                     num_classes=2, seed=11)
  _reconvert(tmp_path / "fresh_images", fresh, seed=0)
  report = _evaluate(run, data_dir=str(fresh), split="test")
  assert report["training_overlap"]["in_train"] == 0 and report["training_overlap"]["in_val"] == 0
  # The card quotes one report (here fresh's); the other's films seen in training are a caveat.
  card = open(os.path.join(run, "MODEL_CARD.md")).read()
  assert (f"`{overlap_dataset}` / `test`: {overlap['in_train']} of {overlap['num_films']} evaluated "
          "films were in the training split") in card


def test_a_run_without_a_film_list_gets_one_or_says_why_not(own_data_run, demo_images_dir,
                                                            tmp_path):
  from xraytpu.run import films, rundir
  run, data = own_data_run
  os.remove(rundir.path(run, rundir.TRAINING_FILMS))
  report = _evaluate(run, split="test")                  # data unchanged: listed from its records
  assert report["training_overlap"]["checked"] and films.read(run) is not None
  os.remove(rundir.path(run, rundir.TRAINING_FILMS))
  _reconvert(_flat_images(demo_images_dir, tmp_path / "flat"), data, seed=7)
  report = _evaluate(run, split="test", allow_data_change=True)
  overlap = report["training_overlap"]
  assert not overlap["checked"] and "changed since training" in overlap["reason"]
  assert any("not checked whether these films were in training" in n for n in report["notes"])
