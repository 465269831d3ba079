"""`python -m xraytpu.summary ENS` describes an ensemble as it describes a run, and the
review fixes of the ensemble/transfer doors: a user mistake is one line, never a traceback.

The ensemble's runs are two private copies of the shared `trained_run` (no new training);
ensemble.json is written by xraytpu.run.ensemble.create, as --ensemble_dir does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests._runs import copy_run
from xraytpu import summary
from xraytpu.run import ensemble, rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _runs(trained_run, tmp_path) -> list[str]:
  return [copy_run(trained_run, tmp_path / name) for name in ("a", "b")]


def test_summary_describes_an_ensemble_its_runs_and_its_evaluation(trained_run, tmp_path):
  from xraytpu.evaluation import evaluate_lib
  runs = _runs(trained_run, tmp_path)
  ens = str(tmp_path / "ens")
  ensemble.create(ens, runs)
  text = summary.summarize(ens)   # not yet evaluated
  assert text.startswith(f"ensemble: {ens}\nmodel:    ensemble of 2 runs, the mean of the members' "
                         "raw probabilities")
  for run in runs:
    assert f"run:      {os.path.abspath(run)}: xray_cnn at 32 px, 1 epochs" in text
  assert "threshold: none yet" in text and "eval:" not in text
  evaluate_lib.evaluate(ens, split="test", n_resamples=20, write_plots=False, tta="zoom")
  text = summary.summarize(ens)
  assert "none yet" not in text and "CHANGED" not in text
  assert "eval:     " in text and "chosen on val, --tta=zoom): sensitivity" in text
  assert f"report {os.path.join(ens, 'eval')}" in text
  # A run retrained (here: its weights file changed) or deleted since: said, not a traceback.
  with open(rundir.path(runs[1], rundir.BEST_WEIGHTS), "ab") as f:
    f.write(b"retrained")
  assert "CHANGED since the ensemble was made" in summary.summarize(ens)
  os.rename(runs[0], runs[0] + ".gone")
  proc = subprocess.run([sys.executable, "-m", "xraytpu.summary", ens], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
  assert f"run:      {os.path.abspath(runs[0])}: MISSING (no such folder)" in proc.stdout
  # ... and the commands refuse the ensemble in one line that says what to do.
  with pytest.raises(rundir.RunError, match=r"the run .* of the ensemble .* is not a run directory "
                                            r"\(no such folder\): the ensemble cannot be used without "
                                            r"it: restore the run, or delete") as e:
    ensemble.load_model_dir(ens)
  assert "\n" not in str(e.value)


def test_model_dir_with_an_empty_name_is_refused(tmp_path):
  """A,,B or A, (an unset shell variable?) was silently read as fewer runs."""
  for given in ("a,,b", "a,", ",a"):
    with pytest.raises(ensemble.EnsembleError, match="an empty run directory between commas"):
      ensemble.split_dirs(given)
  assert ensemble.split_dirs("a, b") == ["a", "b"]


def test_ensemble_dir_that_is_a_file_or_a_run_named_twice_is_one_line(trained_run, tmp_path):
  a, b = _runs(trained_run, tmp_path)
  (tmp_path / "afile").write_text("x")
  with pytest.raises(ensemble.EnsembleError, match="--ensemble_dir=.*afile is a file"):
    ensemble.create(str(tmp_path / "afile"), [a, b])   # was a FileExistsError traceback
  with pytest.raises(ensemble.EnsembleError, match="afile/ens: cannot make the ensemble's folder "
                                                   "there \\(Not a directory\\)"):
    ensemble.create(str(tmp_path / "afile" / "ens"), [a, b])   # was a NotADirectoryError one
  os.symlink(a, tmp_path / "link")   # the same run under another name
  with pytest.raises(ensemble.EnsembleError, match="names a run twice"):
    ensemble.create(str(tmp_path / "ens"), [a, str(tmp_path / "link")])
  assert not os.path.exists(tmp_path / "ens")


def test_init_from_an_ensemble_says_so(trained_run, tmp_path):
  from xraytpu.config import Config
  from xraytpu.training import transfer
  ens = str(tmp_path / "ens")
  ensemble.create(ens, _runs(trained_run, tmp_path))
  cfg = Config(data_dir="d", model_dir=str(tmp_path / "new"), model="xray_cnn", init_from=ens)
  with pytest.raises(transfer.TransferError, match=r"is an ensemble of runs, not a run: --init_from "
                                                   r"warm-starts from one run's weights") as e:
    transfer.check_source(cfg)
  assert "\n" not in str(e.value)


def test_summary_of_a_warm_started_run_names_its_source(trained_run, tmp_path):
  run = copy_run(trained_run, tmp_path)
  doc = json.loads(open(rundir.path(run, rundir.CONFIG)).read())
  doc["run"]["init_from"] = {"run_dir": "/runs/nih", "model": "xray_cnn", "task": "multi_label",
                             "dataset": "nih", "layers": 9}   # as transfer.Source.record writes it
  open(rundir.path(run, rundir.CONFIG), "w").write(json.dumps(doc))
  assert ("start:    backbone warm-started (--init_from) from /runs/nih (xray_cnn, multi_label, "
          "nih; 9 layers copied)") in summary.summarize(run)
