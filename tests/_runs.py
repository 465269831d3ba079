"""Helpers around the real training run shared by the evaluate/predict/export/serve tests.

The run itself is the session fixture `trained_run` (tests/conftest.py): the real
`xraytpu.training.train_lib.train_and_evaluate`, once per test session (once per
pytest-xdist worker), 1 epoch, 32x32 px, xray_cnn, on `demo_data_dir`. Tests that
write into a run (threshold.json, eval/, export/) take a private copy with `copy_run`;
`evaluated_copy` is such a copy already evaluated (the serving tests).

Import this module one way only: `from tests._runs import ...`.
"""

from __future__ import annotations

import shutil


def train_shared_run(demo_data_dir: str, run_dir: str) -> str:
  """Trains the shared tiny run into `run_dir` (what the `trained_run` fixture calls)."""
  from xraytpu.training import train_lib
  from xraytpu.config import Config
  cfg = Config(data_dir=demo_data_dir, model_dir=run_dir, model="xray_cnn", image_size=32,
               batch_size=8, epochs=1, augment="none", cache="off", seed=0).resolve_augment()
  train_lib.train_and_evaluate(cfg, verbose=0)
  return run_dir


def copy_run(run_dir: str, tmp_path) -> str:
  """A private copy of the run (model, config, manifest, history), without eval/export/threshold."""
  dst = str(tmp_path / "run")
  shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("eval", "export", "threshold.json",
                                                               "logs", "backup"))
  return dst


def evaluated_copy(run_dir: str, tmp_path_factory, name: str) -> tuple[str, dict]:
  """A private copy of `run_dir` (in a fresh tmp folder `name`), evaluated on test.

  Writes threshold.json (Youden's J on val) and eval/ into the copy (50 bootstrap
  resamples, no plots: fast); returns (run_dir, the test report dict).
  """
  from xraytpu.evaluation import evaluate_lib
  run = copy_run(run_dir, tmp_path_factory.mktemp(name))
  report = evaluate_lib.evaluate(run, split="test", n_resamples=50, write_plots=False)
  return run, report
