"""configs/*.flags: every seed recipe's flagfile trains for one step on the demo data
(chexnet, the multi-label recipe, on multi-label data: conftest.chexnet_recipe_run; a recipe
with --init_from warm-starts from the shared run, conftest.trained_run).

The recipe's own flags come first (--flagfile), then overrides that make it
fast on a CPU (tests._runs.recipe_flags): no ImageNet download, tiny images (the applications models at
the smallest size keras.applications accepts), one step of one epoch, no
fine-tuning phase (tests/test_train.py covers it; the recipe's own fine-tuning
settings are checked by train_lib.validate_config). So a flag renamed in
xraytpu.config, a value a model rejects, or a bad combination fails here.
"""

from __future__ import annotations

import json
import pathlib

import pytest
from absl import flags

from tests import _runs
from xraytpu import flags as xflags

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.flags"))
# keras.applications' smallest input side per backbone (xraytpu.models.applications.BACKBONES).
SMALL_SIZE = {"inception_v3": 75, "xception": 71}


def _recipe(path: pathlib.Path) -> dict[str, str]:
  """--name=value lines of a flagfile (bool flags as 'true')."""
  flags = {}
  for line in path.read_text().splitlines():
    if line.startswith("--"):
      name, _, value = line[2:].partition("=")
      flags[name] = value or "true"
  return flags


def test_the_seed_recipes_have_flagfiles():
  names = {p.name for p in CONFIGS}
  assert {"keras_tpu_cnn.flags", "xray_cnn.flags", "inception_v3_ct.flags", "xception_covid.flags",
          "chexnet.flags"} <= names
  chexnet = _recipe(ROOT / "configs" / "chexnet.flags")
  assert (chexnet["model"], chexnet["image_size"], chexnet["weights"]) == ("densenet121", "224", "imagenet")
  assert _recipe(ROOT / "configs" / "keras_tpu_cnn.flags")["image_size"] == "180"
  assert _recipe(ROOT / "configs" / "xception_covid.flags")["head"] == "xception"
  for path in CONFIGS:   # a comment header with the source recipe and the run command
    text = path.read_text()
    assert text.startswith("# ") and f"--flagfile=configs/{path.name}" in text, path.name


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_flagfile_as_written_is_a_valid_config(path):
  from xraytpu.training import train_lib
  fv = flags.FlagValues()
  xflags.define_config_flags(flag_values=fv)
  fv(["train", f"--flagfile={path}", "--data_dir=d", "--model_dir=m"])
  cfg = xflags.config_from_flags(flag_values=fv)
  train_lib.validate_config(cfg)
  recipe = _recipe(path)
  assert cfg.model == recipe["model"] and cfg.image_size == int(recipe["image_size"])
  if recipe.get("augment") == "none":   # the preset, then the recipe's own augmentation flags
    assert cfg.horizontal_flip == (recipe.get("horizontal_flip") == "true") and cfg.rotation_range == 0


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_flagfile_trains_one_step(path, demo_data_dir, tmp_path, request):
  # In-process, through the train command's own flag definitions (xraytpu.flags) and the
  # library it calls; the command line itself reads a --flagfile in tests/test_train.py.
  recipe = _recipe(path)
  size = SMALL_SIZE.get(recipe["model"], 32)
  # A warm-start recipe's --init_from placeholder becomes the shared xray_cnn run (32 px).
  extra = [f"--init_from={request.getfixturevalue('trained_run')}"] if "init_from" in recipe else []
  if path.name == "chexnet.flags":
    # The 14-finding multi-label recipe trains on multi-label data: one training, shared with
    # tests/test_multilabel_train.py (conftest.chexnet_recipe_run, made fast the same way).
    run_dir = pathlib.Path(request.getfixturevalue("chexnet_recipe_run"))
  elif extra:
    from xraytpu.training import train_lib
    run_dir = tmp_path / "run"
    train_lib.train_and_evaluate(_runs.recipe_config(
        path, _runs.recipe_flags(demo_data_dir, str(run_dir), size) + extra), verbose=0)
  else:
    run_dir = pathlib.Path(_runs.train_recipe(path, demo_data_dir, str(tmp_path / "run"), size))
  fast = _runs.recipe_flags("d", "m", size) + extra
  cfg = json.loads((run_dir / "config.json").read_text())
  assert cfg["image_size"] == size and cfg["epochs"] == 1 and cfg["steps_per_epoch"] == 1
  for name, value in recipe.items():   # the recipe's settings reached the run, except the overrides
    if not any(f.startswith(f"--{name}=") for f in fast):
      assert str(cfg[name]).lower() == value.lower() or float(cfg[name]) == float(value), name
  assert (run_dir / "model.keras").exists()
