"""Installed as users install it: the wheel (not editable) in a clean venv, its console scripts
run from that venv's bin/: each `--help` lists its flags by topic and exits 0, and without
TensorFlow every command says in one line how to install it (CPU, GPU, TPU), no traceback.

The clean venv holds only the xraytpu wheel; its dependencies are this venv's, reached
through a path file (nothing downloaded), so a dependency missing from the wheel's own
package list would not show here: tests/test_install.py resolves those.
"""

from __future__ import annotations

import configparser
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Hides TensorFlow and tf-keras from a process that sets XRAYTPU_HIDE_TF=1, as if not installed.
_HIDE_TF = '''
import os, sys
if os.environ.get("XRAYTPU_HIDE_TF") == "1":
  class _NoTF:
    def find_spec(self, name, path=None, target=None):
      if name.split(".")[0] in ("tensorflow", "tf_keras"):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
      return None
  sys.meta_path.insert(0, _NoTF())
'''


def _scripts() -> dict[str, str]:
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
  return dict(tuple(p.strip() for p in line.split("=")) for line in lines if line.strip())


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> pathlib.Path:
  tmp = tmp_path_factory.mktemp("installed")
  wheels, src = tmp / "wheels", tmp / "src"   # built from a copy: setuptools writes build/ beside
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
      ".git", ".venv*", "build", "demo", "*.egg-info", ".pytest_cache", "__pycache__"))
  r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                      "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  venv = tmp / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
  py = venv / "bin" / "python"
  wheel = next(wheels.glob("xraytpu-*.whl"))
  r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  site = pathlib.Path(subprocess.check_output(
      [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
  (site / "zz_xraytpu_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  (site / "sitecustomize.py").write_text(_HIDE_TF)
  return venv


def _env(hide_tf: bool) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env.update(TF_CPP_MIN_LOG_LEVEL="2", XRAYTPU_HIDE_TF="1" if hide_tf else "0")
  return env


def _script(venv: pathlib.Path, name: str, *args, hide_tf: bool = False, cwd=None):
  return subprocess.run([str(venv / "bin" / name), *args], capture_output=True, text=True,
                        timeout=300, env=_env(hide_tf), cwd=cwd or venv)


def test_the_wheel_is_installed_not_editable(installed):
  py = installed / "bin" / "python"
  where = subprocess.check_output([str(py), "-c", "import xraytpu, tfrecord_tools; "
                                   "print(xraytpu.__file__, tfrecord_tools.__file__)"],
                                  text=True, env=_env(True), cwd=installed)
  assert str(ROOT) not in where and str(installed) in where


@pytest.mark.parametrize("hide_tf", [False, True], ids=["with_tf", "without_tf"])
def test_every_console_script_shows_its_flags_by_topic(installed, hide_tf):
  for name in _scripts():
    r = _script(installed, name, "--help", hide_tf=hide_tf)
    assert r.returncode == 0, f"{name}: {r.stderr[-2000:]}"
    out = r.stdout
    assert f"usage: {name}" in out and "Traceback" not in r.stderr, f"{name}:\n{out}\n{r.stderr}"
    if name == "xraytpu-summary":   # one argument, no flags of its own
      assert "RUN_DIR" in out
      continue
    flags = [l for l in out.splitlines() if l.startswith("  --")]
    assert len(flags) >= 2, f"{name} lists no flags:\n{out}"
    assert out.count(":\n  --") >= 1, f"{name}: flags not under a topic heading:\n{out}"
  train = _script(installed, "xraytpu-train", "--help", hide_tf=hide_tf).stdout
  for topic in ("data:", "augmentation:", "model:", "training:", "distribution:", "run directory:"):
    assert f"\n{topic}\n" in train, train
  assert "--strategy" in train.split("distribution:")[1].split("\n\n")[0]


ARGS = {
    "xraytpu-convert": ["--input_dir={d}", "--output_dir={o}/rec"],
    "xraytpu-inspect": ["{o}/rec"],
    "xraytpu-synthetic": ["--output_dir={o}/syn", "--num_images=4", "--size=16"],
    "xraytpu-train": ["--data_dir={o}/rec", "--model_dir={o}/run"],
    "xraytpu-evaluate": ["--model_dir={o}/run"],
    "xraytpu-predict": ["--model_dir={o}/run", "{d}"],
    "xraytpu-export": ["--model_dir={o}/run"],
    "xraytpu-serve": ["--model_dir={o}/run", "--port=0"],
    "xraytpu-summary": ["{o}/run"],
    "xraytpu-data-service": ["--role=dispatcher", "--port=0"],
}


def test_without_tensorflow_every_command_says_how_to_install_it(installed, tmp_path, demo_images_dir):
  assert set(ARGS) == set(_scripts())
  for name, args in ARGS.items():
    r = _script(installed, name, *[a.format(d=demo_images_dir, o=tmp_path) for a in args],
                hide_tf=True)
    assert "Traceback" not in r.stderr, f"{name}:\n{r.stderr[-3000:]}"
    if "not installed" in r.stderr:
      lines = [l for l in r.stderr.splitlines() if l.strip()]
      assert r.returncode != 0 and len(lines) == 1, f"{name}:\n{r.stderr}"
      for install in ("'xraytpu[cpu]'", "'xraytpu[gpu]'", "'xraytpu[tpu]'", "tf-keras~=2.20.0"):
        assert install in lines[0], lines[0]
    else:   # commands that never need TensorFlow, or that stop at a user error before it
      assert r.returncode in (0, 1, 2), f"{name}: rc {r.returncode}\n{r.stderr[-2000:]}"
  assert "tensorflow is not installed" in _script(
      installed, "xraytpu-train", f"--data_dir={tmp_path}/rec", f"--model_dir={tmp_path}/run",
      hide_tf=True).stderr


def test_installed_scripts_convert_and_inspect(installed, tmp_path, demo_images_dir):
  r = _script(installed, "xraytpu-convert", f"--input_dir={demo_images_dir}",
              f"--output_dir={tmp_path}/rec", "--quiet")
  assert r.returncode == 0, r.stderr[-3000:]
  r = _script(installed, "xraytpu-inspect", f"{tmp_path}/rec")
  assert r.returncode == 0, r.stderr[-3000:]
  assert (tmp_path / "rec" / "dataset.json").is_file()
