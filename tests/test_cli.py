"""tfrecord_tools.cli: flags from dataclasses, one default per option, one runner for user errors."""

from __future__ import annotations

import dataclasses
import importlib
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from absl import flags

from tfrecord_tools import cli, convert as convert_lib, errors
from xraytpu import config

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("tfrecord_tools.convert", "tfrecord_tools.inspect", "tfrecord_tools.synthetic",
                "xraytpu.train", "xraytpu.evaluate", "xraytpu.predict", "xraytpu.export",
                "xraytpu.serve", "xraytpu.summary", "xraytpu.data_service")


@dataclasses.dataclass
class _Options:
  path: str = cli.field(help="Required: no default.")
  size: int = cli.field(3, "An integer.")
  rate: float = cli.field(0.5, "A number.")
  loud: bool = cli.field(False, "A switch.")
  mode: str = cli.field("a", "An enum.", ("a", "b"))
  policy: str | None = cli.field(None, "Optional string.")
  internal: int = 7   # no help: not a flag


def _parse(cls, argv):
  fv = flags.FlagValues()
  cli.define_flags(cls, flag_values=fv)
  fv(["prog", *argv])
  return fv


def test_flags_come_from_the_dataclass_fields():
  fv = _parse(_Options, ["--path=x", "--size=5", "--loud", "--mode=b"])
  assert set(fv) == {"path", "size", "rate", "loud", "mode", "policy"}
  assert fv["size"].help == "An integer." and fv["mode"].flag_type() == "string enum"
  opts = cli.from_flags(_Options, flag_values=fv)
  assert opts == _Options(path="x", size=5, rate=0.5, loud=True, mode="b", policy=None)
  assert cli.explicit(["size", "rate"], flag_values=fv) == {"size"}
  with pytest.raises(flags.IllegalFlagValueError):   # the required field
    _parse(_Options, ["--size=1"])
  with pytest.raises(flags.IllegalFlagValueError):
    _parse(_Options, ["--path=x", "--mode=c"])


@pytest.mark.parametrize("cls", [convert_lib.ConvertOptions, config.Config, config.EvalConfig,
                                 config.PredictConfig, config.ExportConfig, config.ServeOptions])
def test_a_flag_left_alone_gives_the_library_default(cls):
  """One default per option: the flag's default is the dataclass field's, for every command."""
  required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
  fv = _parse(cls, [f"--{n}=x" for n in required])
  built = cli.from_flags(cls, flag_values=fv)
  assert built == cls(**{n: "x" for n in required})


def test_convert_fraction_default_is_auto_and_yields_to_split_folders():
  """The library and the command line share one default: 0.15 drawn unless the input has the folder."""
  opts = convert_lib.ConvertOptions(input_dir="i", output_dir="o")
  assert opts.val_fraction == opts.test_fraction == convert_lib.AUTO_FRACTION
  assert convert_lib.DEFAULT_FRACTION == 0.15


def test_augmentation_defaults_are_the_default_preset():
  preset = config.AUGMENT_PRESETS[config.DEFAULT_AUGMENT]
  cfg = config.Config()
  assert cfg.augment == config.DEFAULT_AUGMENT
  assert {k: getattr(cfg, k) for k in preset} == preset


def test_every_user_error_class_is_a_user_error():
  from xraytpu import errors as xerrors
  import pkgutil
  import tfrecord_tools
  import xraytpu
  # Every library module of both packages, found by walking them (the entry points define
  # their flags on import; their errors are the libraries').
  entry_points = {"convert", "convert.__main__", "data_service", "evaluate", "export", "predict",
                  "serve", "train"}
  modules = {pkg.__name__: [m.name.split(".", 1)[1]
                            for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
                            if m.name.split(".", 1)[1] not in entry_points]
             for pkg in (tfrecord_tools, xraytpu)}
  seen = set()
  for package, names in modules.items():
    base = errors.UserError if package == "tfrecord_tools" else xerrors.UserError
    for name in names:
      module = importlib.import_module(f"{package}.{name}")
      for attr, value in vars(module).items():
        if (isinstance(value, type) and issubclass(value, Exception) and attr.endswith("Error")
            and value.__module__ == module.__name__ and attr != "RequestError"):
          assert issubclass(value, base), f"{package}.{name}.{attr}"
          seen.add(attr)
  assert len(seen) >= 16, seen
  from xraytpu.serving import http_api
  from xraytpu.training import train_lib
  assert http_api.ServeOptions is config.ServeOptions and http_api.ServeError is config.ServeError
  assert train_lib.TrainingDiverged.exit_code == 3


_SCRIPT = textwrap.dedent("""
    import sys
    from tfrecord_tools import cli, errors

    class Diverged(RuntimeError):
      exit_code = 3

    def main(argv):
      kind = argv[1]
      if kind == "user":
        raise errors.UserError("the folder is missing\\nsee above")
      if kind == "diverged":
        raise Diverged("loss became NaN")
      if kind == "bug":
        raise KeyError("bug")
      print("ok")

    cli.run(main)
""")


@pytest.mark.parametrize("kind, code, stderr", [
    ("ok", 0, ""),
    ("user", 2, "tool: error: the folder is missing see above"),
    ("diverged", 3, "tool: error: loss became NaN"),
])
def test_runner_exit_codes(tmp_path, kind, code, stderr):
  script = tmp_path / "tool"
  script.write_text(_SCRIPT)
  r = subprocess.run([sys.executable, str(script), kind], cwd=ROOT, capture_output=True, text=True,
                     timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert r.returncode == code and r.stderr.strip() == stderr, r.stderr


def test_runner_keeps_the_traceback_of_a_bug(tmp_path):
  script = tmp_path / "tool"
  script.write_text(_SCRIPT)
  r = subprocess.run([sys.executable, str(script), "bug"], cwd=ROOT, capture_output=True, text=True,
                     timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError" in r.stderr


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_reports_a_bad_flag_in_one_line(module):
  r = subprocess.run([sys.executable, "-m", module, "--no_such_flag=1"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip() == (f"{module}: error: Unknown command line flag 'no_such_flag' "
                              "(--helpfull lists the flags)")


def test_a_renamed_flag_keeps_its_old_spelling_with_a_warning(capsys):
  """predict's --window became --dicom_window (convert's name for the same idea)."""
  from absl import flags as absl_flags

  from xraytpu.config import PredictConfig
  fv = absl_flags.FlagValues()
  cli.define_flags(PredictConfig, flag_values=fv)
  fv(["predict", "--model_dir=run", "--window=file"])
  assert cli.from_flags(PredictConfig, flag_values=fv).dicom_window == "file"
  assert "warning: --window is deprecated; use --dicom_window" in capsys.readouterr().err
  fv = absl_flags.FlagValues()
  cli.define_flags(PredictConfig, flag_values=fv)
  fv(["predict", "--model_dir=run", "--dicom_window=lung"])
  assert cli.from_flags(PredictConfig, flag_values=fv).dicom_window == "lung"
  assert "deprecated" not in capsys.readouterr().err
  fv = absl_flags.FlagValues()
  cli.define_flags(PredictConfig, flag_values=fv)
  fv(["predict", "--model_dir=run", "--dicom_window=lung", "--window=file"])
  with pytest.raises(errors.UserError, match="give only --dicom_window"):
    cli.from_flags(PredictConfig, flag_values=fv)


def test_stderr_filter_drops_only_the_noise_and_keeps_order():
  """cli.filter_stderr: C-level writes to fd 2 and Python's, noise lines dropped, the rest in
  order, and an uncaught traceback still printed at exit."""
  code = textwrap.dedent("""
      import os, sys
      from tfrecord_tools import cli
      cli.filter_stderr(["oneDNN custom operations"])
      os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on\\nfirst\\n")
      print("second", file=sys.stderr)
      raise ValueError("third")
  """)
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 1
  lines = r.stderr.splitlines()
  assert lines[:2] == ["first", "second"] and lines[-1] == "ValueError: third"
  assert "oneDNN" not in r.stderr
