"""Every command has a console script (setup.cfg), its target imports and runs, and
README shows both forms: `python -m MODULE` and `xraytpu-NAME`."""

from __future__ import annotations

import ast
import configparser
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# Modules with a `__main__` block that are not user commands.
NOT_COMMANDS = {"xraytpu.docs"}   # README's reference generator, for maintainers


def _console_scripts() -> dict[str, str]:
  """{script name: "module:function"} from setup.cfg's [options.entry_points]."""
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  out = {}
  for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines():
    name, _, target = line.partition("=")
    out[name.strip()] = target.strip()
  return out


def _command(module: str) -> str:
  """The module `python -m` runs it as: a package's `__main__` is the package."""
  return module.removesuffix(".__main__")


def _command_modules() -> set[str]:
  """Modules of both packages with an `if __name__ == "__main__":` block (a package's
  `__main__.py` counts as the package)."""
  found = set()
  for package in ("xraytpu", "tfrecord_tools"):
    for path in sorted((ROOT / package).rglob("*.py")):
      tree = ast.parse(path.read_text())
      for node in tree.body:
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"):
          found.add(_command(".".join(path.relative_to(ROOT).with_suffix("").parts)))
  return found - NOT_COMMANDS


SCRIPTS = _console_scripts()


def test_every_command_module_has_a_console_script():
  modules = _command_modules()
  assert {"xraytpu.summary", "xraytpu.data_service", "xraytpu.train", "tfrecord_tools.convert"} <= modules
  targets = {_command(t.split(":")[0]): (name, t.split(":")[1]) for name, t in SCRIPTS.items()}
  for module in sorted(modules):
    assert module in targets, f"{module} has no console script in setup.cfg"
    name, func = targets[module]
    assert func == "run" and name == "xraytpu-" + module.rsplit(".", 1)[1].replace("_", "-"), (module, name)
  assert set(targets) == modules   # and no script points at something that is not a command


def test_readme_shows_both_forms():
  readme = (ROOT / "README.md").read_text()
  for name, target in SCRIPTS.items():
    assert f"| `python -m {_command(target.split(':')[0])}` | `{name}` |" in readme, name


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_target_imports_and_runs(name):
  """What the installed script does: import the module, call the function (here with --help)."""
  module, func = SCRIPTS[name].split(":")
  code = (f"import sys, importlib; m = importlib.import_module({module!r}); f = getattr(m, {func!r}); "
          f"assert callable(f); sys.argv[0] = {name!r}; f()")
  r = subprocess.run([sys.executable, "-c", code, "--help"], cwd=ROOT, capture_output=True, text=True,
                     timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  out = r.stdout + r.stderr
  # --help exits 0 and the usage line names the script (tfrecord_tools.cli.help_text).
  assert r.returncode == 0 and "Traceback" not in out, out[-2000:]
  assert f"usage: {name}" in out, out[-2000:]
