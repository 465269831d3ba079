"""The layers point one way: each folder imports only the layers above it, counting imports
inside functions (the layout is drawn in xraytpu/__init__.py and README's "Layout")."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Top to bottom; a module may import its own layer and the layers above it.
LAYERS = [
    {"tfrecord_tools"},
    {"xraytpu.errors", "xraytpu._keras", "xraytpu.config", "xraytpu.flags"},
    {"xraytpu.data"},
    {"xraytpu.models"},
    {"xraytpu.run"},
    {"xraytpu.inference"},
    {"xraytpu.training", "xraytpu.evaluation"},
    {"xraytpu.serving"},
    {"xraytpu.api", "xraytpu"},   # the front door (xraytpu/__init__.py re-exports xraytpu.api)
    {"xraytpu.train", "xraytpu.evaluate", "xraytpu.predict", "xraytpu.export", "xraytpu.serve",
     "xraytpu.summary", "xraytpu.data_service", "xraytpu.docs"},   # thin entry points
]
# Peers in one layer that must not import each other either.
APART = [("xraytpu.training", "xraytpu.evaluation")]


def _unit(module: str) -> str:
  """The layer unit a dotted module belongs to: its longest prefix named in LAYERS."""
  parts = module.split(".")
  for n in range(len(parts), 0, -1):
    name = ".".join(parts[:n])
    if any(name in layer for layer in LAYERS):
      return name
  raise AssertionError(f"{module} is in no layer: add it to tests/test_layers.py's LAYERS")


def _level(unit: str) -> int:
  return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, imported module) for every import of ours, at any depth of the file."""
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from xraytpu.run import rundir` imports xraytpu.run.rundir (a module) or a name in it.
      out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
  return [(line, m) for line, m in out if m.split(".")[0] in ("xraytpu", "tfrecord_tools")]


SOURCES = sorted(p for d in ("xraytpu", "tfrecord_tools") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_up(path):
  here = _unit(_module_name(path))
  wrong = []
  for line, target in _imports(path):
    if target.startswith("xraytpu.") and target.split(".")[1] in ("__version__",):
      target = "xraytpu"
    there = _unit(target)
    if _level(there) > _level(here) or (here, there) in APART or (there, here) in APART:
      wrong.append(f"line {line}: {target} ({there}, layer {_level(there)})")
  assert not wrong, f"{_module_name(path)} (layer {_level(here)}) imports below itself: {wrong}"


def test_every_folder_is_in_a_layer():
  """A new folder must be placed: no module falls outside LAYERS."""
  for path in SOURCES:
    _unit(_module_name(path))
