"""Installs resolve: every extra and every launcher's install line, against the package index
(`pip install --dry-run --report`: metadata only, nothing downloaded or installed).

Supported TensorFlow is 2.20 and 2.21: Cloud TPU VMs can get at most tensorflow-tpu 2.20.0,
which must resolve with libtpu and tensorboard 2.20; tf-keras must share TensorFlow's minor.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TF_FAMILY = ("tensorflow", "tensorflow-cpu", "tensorflow-tpu", "tf-keras", "tensorboard", "libtpu")


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


_RESOLVED: dict[tuple, concurrent.futures.Future] = {}
_RESOLVED_LOCK = threading.Lock()


def resolve(*requirements: str, no_deps: bool = False) -> dict[str, str]:
  """{package: version} pip would install for `requirements` into an empty environment.

  Asked once per set of requirements: the launchers repeat some installs (tpu_vm.sh and
  multi_worker.sh --install=tpu, the --no-deps tf-keras lines), and a resolve is a pip run."""
  key = (tuple(requirements), no_deps)
  with _RESOLVED_LOCK:
    future, first = _RESOLVED.get(key), key not in _RESOLVED
    if first:
      future = _RESOLVED[key] = concurrent.futures.Future()
  if not first:
    return dict(future.result())
  try:
    future.set_result(_resolve(*requirements, no_deps=no_deps))
  except BaseException as e:
    future.set_exception(e)
  return dict(future.result())


def _resolve(*requirements: str, no_deps: bool = False) -> dict[str, str]:
  # In the temp folder, not the repository: tests/test_installed.py copies the repository,
  # maybe at the same time (pytest-xdist), and a file vanishing mid-copy fails that copy.
  report = pathlib.Path(tempfile.gettempdir()) / (f"xraytpu-pip-report-{os.getpid()}-"
                                                  f"{threading.get_ident()}.json")
  cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
         "--disable-pip-version-check", "--report", str(report),
         *(["--no-deps"] if no_deps else []), *requirements]
  try:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(requirements)} does not resolve:\n{r.stderr[-3000:]}"
    doc = json.loads(report.read_text())
  finally:
    report.unlink(missing_ok=True)
  return {_norm(i["metadata"]["name"]): i["metadata"]["version"] for i in doc["install"]}


def _minor(version: str) -> str:
  return ".".join(version.split(".")[:2])


def _check_tf_set(got: dict[str, str], tf_name: str, minor: str) -> None:
  assert _minor(got[tf_name]) == minor, got
  assert _minor(got["tensorboard"]) == minor, got
  if "tf-keras" in got:
    assert _minor(got["tf-keras"]) == minor, got
  if tf_name != "tensorflow":
    assert "tensorflow" not in got, f"the full tensorflow wheel came along: {got}"


# extra (and pins) -> (TensorFlow package, minor it must resolve to)
EXTRAS = {
    ("cpu",): ("tensorflow-cpu", "2.21"),
    ("cpu", "tensorflow-cpu==2.20.*"): ("tensorflow-cpu", "2.20"),
    ("gpu",): ("tensorflow", "2.21"),
    ("tf", "tensorflow==2.20.*"): ("tensorflow", "2.20"),
    ("tpu",): ("tensorflow-tpu", "2.20"),
}


def _pip_segments(command: str) -> list[list[str]]:
  """The `pip install` commands inside a shell command line (split at ;, && and ||)."""
  out = []
  for segment in re.split(r";|&&|\|\|", command):
    words = shlex.split(segment)
    if "pip" in words and "install" in words:
      out.append(words[words.index("install") + 1:])
  return out


def _launcher_installs() -> dict[str, list[list[str]]]:
  """Each launcher's install commands, as its --dry_run prints them (vertex: the job spec)."""
  def dry(script, *args):
    # --dry_run first: multi_worker.sh passes everything after `--` to xraytpu.train
    r = subprocess.run(["bash", str(script), "--dry_run", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cmds = []
    for line in r.stdout.splitlines():
      if line.startswith("+ ") and "pip" in line:
        for word in shlex.split(line[2:]):
          cmds += _pip_segments(word.split("=", 1)[1] if word.startswith("--command=") else word)
    return cmds
  tpu = dry(LAUNCH / "tpu_vm.sh", "--project=p", "--bucket=b", "--images=x")
  installs = {"tpu_vm.sh": tpu}
  for kind in ("cpu", "gpu", "tpu"):
    installs[f"multi_worker.sh --install={kind}"] = dry(
        LAUNCH / "multi_worker.sh", f"--install={kind}", "--", "--data_dir=x")
  # Vertex AI: TensorFlow comes with the job's image (tensorflow/tensorflow:X.Y.Z-gpu).
  image = re.search(r'IMAGE="tensorflow/tensorflow:([0-9.]+)-gpu"', (LAUNCH / "vertex_ai.sh").read_text())
  spec = (LAUNCH / "vertex_ai_job.yaml").read_text()
  args = spec[spec.index("set -e;"):spec.index("python -m xraytpu.train")]
  vertex = [["-q", f"tensorflow=={image.group(1)}"]] + _pip_segments(" ".join(args.split()))
  installs["vertex_ai.sh"] = [[".[gcs]" if "git+" in w else w for w in c] for c in vertex]
  return installs


def _check_launcher(name: str, commands: list[list[str]]) -> str:
  """All commands but the --no-deps ones resolve together (as they install in sequence); the
  --no-deps ones name a tf-keras of the same minor as the TensorFlow resolved."""
  assert commands, f"{name}: no pip install command in its dry run"
  with_deps = [w for c in commands if "--no-deps" not in c for w in c if w != "-q" and w != "-e"]
  got = resolve(*with_deps)
  tf_name = next(n for n in ("tensorflow-tpu", "tensorflow-cpu", "tensorflow") if n in got)
  minor = _minor(got[tf_name])
  assert minor in ("2.20", "2.21"), got
  for c in commands:
    if "--no-deps" in c:
      reqs = [w for w in c if not w.startswith("-")]
      keras = resolve(*reqs, no_deps=True)
      assert _minor(keras["tf-keras"]) == minor, f"{name}: tf-keras {keras} beside {tf_name} {minor}"
  if tf_name == "tensorflow":
    assert "tf-keras" in got or any("--no-deps" in c for c in commands), got
  _check_tf_set(got, tf_name, minor)
  return f"{name}: {tf_name} {got[tf_name]}"


@pytest.mark.slow
def test_extras_and_launcher_install_lines_resolve():
  jobs = {}
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    for extras in EXTRAS:
      reqs = [f".[{extras[0]}]", *extras[1:]]
      jobs[" ".join(reqs)] = (pool.submit(resolve, *reqs), EXTRAS[extras])
    launchers = {name: pool.submit(_check_launcher, name, cmds)
                 for name, cmds in _launcher_installs().items()}
    for name, (job, (tf_name, minor)) in jobs.items():
      got = job.result()
      _check_tf_set(got, tf_name, minor)
      if tf_name == "tensorflow-tpu":
        assert "libtpu" in got, got
    for job in launchers.values():
      job.result()
  assert set(launchers) >= {"tpu_vm.sh", "vertex_ai.sh", "multi_worker.sh --install=tpu"}


def test_core_dependencies_pin_no_single_tensorflow_minor():
  text = (ROOT / "setup.cfg").read_text()
  core = text[text.index("install_requires"):text.index("[options.packages.find]")]
  for line in core.splitlines():
    name = re.split(r"[<>=~! \[]", line.strip(), maxsplit=1)[0]
    if _norm(name) in TF_FAMILY:
      assert "~=" not in line and "==" not in line, line
