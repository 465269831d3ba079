"""A real training run on the demo data, shared by the evaluate/predict/export tests.

`trained_run(demo_data_dir, tmp_path_factory)` runs the real
`xraytpu.training.train_lib.train_and_evaluate` once per test session (1 epoch,
32x32 px, xray_cnn) and returns the run directory; tests that write into a
run (threshold.json, eval/, export/) take a private copy with `copy_run`;
`evaluated_copy` is such a copy already evaluated (the serving tests).
"""

from __future__ import annotations

import shutil

_RUNS: dict[str, str] = {}


def trained_run(demo_data_dir: str, tmp_path_factory) -> str:
  if demo_data_dir not in _RUNS:
    from xraytpu.training import train_lib
    from xraytpu.config import Config
    run_dir = str(tmp_path_factory.mktemp("trained") / "run")
    cfg = Config(data_dir=demo_data_dir, model_dir=run_dir, model="xray_cnn", image_size=32,
                 batch_size=8, epochs=1, augment="none", cache="off", seed=0).resolve_augment()
    train_lib.train_and_evaluate(cfg, verbose=0)
    _RUNS[demo_data_dir] = run_dir
  return _RUNS[demo_data_dir]


def copy_run(run_dir: str, tmp_path) -> str:
  """A private copy of the run (model, config, manifest, history), without eval/export/threshold."""
  dst = str(tmp_path / "run")
  shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("eval", "export", "threshold.json",
                                                               "logs", "backup"))
  return dst


def evaluated_copy(demo_data_dir: str, tmp_path_factory, name: str) -> tuple[str, dict]:
  """A private copy of the shared run (in a fresh tmp folder `name`), evaluated on test.

  Writes threshold.json (Youden's J on val) and eval/ into the copy (50 bootstrap
  resamples, no plots: fast); returns (run_dir, the test report dict).
  """
  from xraytpu.evaluation import evaluate_lib
  run = copy_run(trained_run(demo_data_dir, tmp_path_factory), tmp_path_factory.mktemp(name))
  report = evaluate_lib.evaluate(run, split="test", n_resamples=50, write_plots=False)
  return run, report
