"""One idea, one place: run-directory file names and record feature keys are
spelled (as string literals in code, docstrings aside) in exactly one module,
and only the inference module calls the model for predictions."""

from __future__ import annotations

import ast
import collections
import functools
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CODE = sorted(p for d in ("xraytpu", "tfrecord_tools", "benchmarks") for p in (ROOT / d).rglob("*.py"))


@functools.cache      # every key and file name is looked up in the same parsed modules
def _literals(path: pathlib.Path) -> list[ast.Constant]:
  """String constants of a module, without its docstrings."""
  tree = ast.parse(path.read_text())
  docstrings = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        docstrings.add(id(body[0].value))
  return [n for n in ast.walk(tree)
          if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def _spelled_in(name: str) -> set[str]:
  where = collections.defaultdict(set)
  for path in CODE:
    for node in _literals(path):
      v = node.value
      if v == name or v.startswith(name + "/") or v.endswith("/" + name):
        where[name].add(str(path.relative_to(ROOT)))
  return where[name]


RUN_FILES = ("config.json", "history.csv", "threshold.json", "model.keras", "checkpoints", "backup",
             "logs", "eval", "export", "best.weights.h5", "report.json", "report.md",
             "predictions.csv", "xraytpu.json", "MODEL_CARD.md")


@pytest.mark.parametrize("name", RUN_FILES)
def test_run_directory_names_live_in_rundir(name):
  assert _spelled_in(name) == {"xraytpu/run/rundir.py"}


def test_record_feature_keys_live_in_records():
  from tfrecord_tools import records
  keys = [f.key for f in records.FEATURES]
  assert "image/encoded" in keys and "image/class/label" in keys
  for key in keys:
    assert _spelled_in(key) == {"tfrecord_tools/records.py"}, key


def test_the_model_is_called_for_predictions_in_one_module():
  """`model(x, training=False)` outside the model definitions: only the inference
  module (and Grad-CAM, which needs the gradient of a feature map, not a prediction)."""
  callers = set()
  for path in CODE:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.Call) and any(
          k.arg == "training" and isinstance(k.value, ast.Constant) and k.value.value is False
          for k in node.keywords):
        callers.add(str(path.relative_to(ROOT)))
  callers -= {"xraytpu/models/applications.py"}       # a frozen backbone inside the model itself
  callers -= {"xraytpu/data/input_pipeline.py"}        # _dataset(training=False): not a model call
  assert callers == {"xraytpu/inference/model_call.py", "xraytpu/inference/gradcam.py"}
