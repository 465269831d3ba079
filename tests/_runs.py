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


# -- configs/*.flags, made fast on a CPU (tests/test_configs.py, tests/test_multilabel_train.py) --

# No ImageNet download, one step of one epoch, no fine-tuning phase, the default strategy; the
# image side is the smallest the recipe's model accepts (recipe_flags' image_size).
RECIPE_OVERRIDES = ("--weights=none", "--epochs=1", "--steps_per_epoch=1", "--batch_size=4",
                    "--strategy=default", "--steps_per_execution=1", "--early_stopping_patience=0",
                    "--fine_tune_at=-1", "--fine_tune_epochs=0")


def recipe_flags(data_dir: str, run_dir: str, image_size: int) -> list[str]:
  """The flags given after a recipe's --flagfile to make it fast."""
  return [f"--data_dir={data_dir}", f"--model_dir={run_dir}", f"--image_size={image_size}",
          *RECIPE_OVERRIDES]


def recipe_config(path, extra: list[str]):
  """The Config `python -m xraytpu.train --flagfile=PATH EXTRA...` trains (its flag definitions)."""
  from absl import flags
  from xraytpu import flags as xflags
  fv = flags.FlagValues()
  xflags.define_config_flags(flag_values=fv)
  fv(["train", f"--flagfile={path}", *extra])
  return xflags.config_from_flags(flag_values=fv)


def train_recipe(path, data_dir: str, run_dir: str, image_size: int) -> str:
  """Trains the recipe at `path`, made fast, in this process; returns the run directory."""
  from xraytpu.training import train_lib
  train_lib.train_and_evaluate(recipe_config(path, recipe_flags(data_dir, run_dir, image_size)),
                               verbose=0)
  return run_dir
