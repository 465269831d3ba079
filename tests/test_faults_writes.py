"""Issue 24 (9), outside training: an output that cannot be written is one line, everywhere.

Every command is run as the user runs it (`python -m MODULE`), its output refused: a folder
that cannot be written (EACCES), a full disk (ENOSPC), a used-up quota (EDQUOT), a read-only
file system (EROFS). The answer is one line on stderr, `<command>: error: cannot write PATH:
<cause> (<ERRNO>); <what to do>`, exit code 2, no traceback, and no temp file left behind.

How a write is refused: as a user other than root, EACCES is real (the folder is made
read-only, chmod 0o500). Root writes anyway, and no test can fill a disk or a quota on
demand, so the command then runs under `_DRIVER`: Python's own file openers (open, os.open,
os.mkdir, os.replace) raise the errno for paths under the refused one, as the kernel would.
For ENOSPC / EDQUOT the file is created first and the error comes on writing it, so a temp
file really exists and must be cleaned up.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from tfrecord_tools import errors
from tests._runs import copy_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DRIVER = textwrap.dedent('''
    import builtins, errno, io, os, runpy, sys
    TARGET, CODE, MODULE = os.path.abspath(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    sys.argv = [MODULE] + sys.argv[4:]

    def refused(path):
      if isinstance(path, int):
        return False
      try:
        p = os.path.abspath(os.fsdecode(path))
      except TypeError:
        return False
      return p == TARGET or p.startswith(TARGET + os.sep) or p.startswith(TARGET + ".tmp")

    def fail(path):
      raise OSError(CODE, os.strerror(CODE), os.fsdecode(path))

    AFTER_CREATE = CODE in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)   # the file exists, then fails
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    real_replace, real_rename = os.replace, os.rename

    def fake_open(file, mode="r", *args, **kwargs):
      if any(c in mode for c in "wax+") and refused(file):
        if AFTER_CREATE:
          real_open(file, mode, *args, **kwargs).close()
        fail(file)
      return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
      if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and refused(path):
        if AFTER_CREATE:
          os.close(real_os_open(path, flags, *args, **kwargs))
        fail(path)
      return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
      if refused(path) and not AFTER_CREATE and not os.path.isdir(path):
        fail(path)
      return real_mkdir(path, *args, **kwargs)

    def fake_move(real):
      def move(src, dst, *args, **kwargs):
        if refused(dst) and not AFTER_CREATE:
          raise OSError(CODE, os.strerror(CODE), os.fsdecode(src), os.fsdecode(dst))
        return real(src, dst, *args, **kwargs)
      return move

    builtins.open = io.open = fake_open
    os.open, os.mkdir = fake_os_open, fake_mkdir
    os.replace, os.rename = fake_move(real_replace), fake_move(real_rename)
    runpy.run_module(MODULE, run_name="__main__", alter_sys=True)
''')


def _real_eacces() -> bool:
  """A read-only folder refuses this user (it is not root)."""
  return os.geteuid() != 0


def _run(module: str, args: list[str], refused: str, code: int) -> subprocess.CompletedProcess:
  """`python -m module args`, with writes under `refused` failing with `code` (module docstring)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  if code == errno.EACCES and _real_eacces():
    parent = refused if os.path.isdir(refused) else os.path.dirname(refused)
    os.makedirs(parent, exist_ok=True)
    os.chmod(parent, stat.S_IRUSR | stat.S_IXUSR)
    try:
      return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    finally:
      os.chmod(parent, stat.S_IRWXU)
  return subprocess.run([sys.executable, "-c", _DRIVER, refused, str(code), module, *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _one_line(proc, module: str) -> str:
  """The single error line of a command that failed with exit code 2 and no traceback."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  lines = [ln for ln in proc.stderr.strip().splitlines() if ": error: " in ln]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines[0] == proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]
  assert lines[0].startswith(f"{module}: error: cannot write "), lines[0]
  return lines[0]


def _cause(code: int) -> str:
  return f"{os.strerror(code)} ({errno.errorcode[code]}); {errors.WRITE_HINTS[code]}"


def _no_temp_files(folder) -> list[str]:
  return [os.path.join(d, n) for d, dirs, files in os.walk(folder) for n in files + dirs
          if ".tmp" in n]


# ---- the one line, whatever wrote ------------------------------------------------------------


def _tf_error(message: str) -> Exception:
  """An error as TensorFlow's own classes look to the runner (module tensorflow.*), without
  importing TensorFlow."""
  cls = type("ResourceExhaustedError", (Exception,), {"__module__": "tensorflow.python.framework"})
  return cls(message)


@pytest.mark.parametrize("exc, expected", [
    (PermissionError(errno.EACCES, "Permission denied", "/out/run/MODEL_CARD.md.tmp-12-34"),
     "cannot write /out/run/MODEL_CARD.md: Permission denied (EACCES); this user may not write"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/export/.tmp-3-999/variables/x"),
     "cannot write /out/export: No space left on device (ENOSPC); the disk is full"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/out/p.csv"),
     "cannot write /out/p.csv: Disk quota exceeded (EDQUOT); the disk quota is used up"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/a.tmp-1-2", "/ro/a"),
     "cannot write /ro/a: Read-only file system (EROFS); the file system is read-only"),
    (OSError("Unable to synchronously create file (unable to open file: name = '/r/b.weights.h5', "
             "errno = 28, error message = 'No space left on device')"),
     "cannot write /r/b.weights.h5: No space left on device (ENOSPC)"),
    (_tf_error("{{function_node __wrapped__SaveV2_device_/job:localhost/replica:0/task:0/device:CPU:0}}"
               " /out/e/.tmp-1-9/variables/variables_temp/part-0.tempstate12; No space left on device"),
     "cannot write /out/e: No space left on device (ENOSPC)"),
])
def test_write_failures_are_named_with_their_cause(exc, expected):
  assert errors.os_error_line(exc).startswith(expected)


@pytest.mark.parametrize("exc", [
    _tf_error("OOM when allocating tensor with shape[4096,4096]"),   # out of memory: no write
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/in/x.png"),   # a missing input
    PermissionError(errno.EACCES, "Permission denied"),                          # names no file
    OSError(errno.EIO, "Input/output error", "/in/x.png"),
    KeyError("bug"), ValueError("bug"),
])
def test_other_errors_are_left_alone(exc):
  assert errors.os_error_line(exc) is None


def test_an_unreadable_input_is_a_failed_read(tmp_path, monkeypatch):
  f = tmp_path / "x.png"
  f.write_bytes(b"x")
  f.chmod(0)
  if os.geteuid() == 0:   # root reads any file: the check sees what another user would
    monkeypatch.setattr(errors.os, "access", lambda path, mode: False)
  line = errors.os_error_line(PermissionError(errno.EACCES, "Permission denied", str(f)))
  assert line.startswith(f"cannot read {f}: Permission denied (EACCES)")


_RUNNER = textwrap.dedent('''
    import errno, sys
    from tfrecord_tools import cli

    def main(argv):
      if argv[1] == "missing":
        open("/no/such/input.png", "rb")
      raise OSError(errno.ENOSPC, "No space left on device", "/out/x.json.tmp-1-2")

    cli.run(main)
''')


@pytest.mark.parametrize("kind, code", [
    ("full", 2),
    ("missing", 1),     # a read of a missing file stays what it was (here: a traceback)
])
def test_the_runner_turns_a_refused_write_into_one_line(tmp_path, kind, code):
  script = tmp_path / "tool"
  script.write_text(_RUNNER)
  r = subprocess.run([sys.executable, str(script), kind], cwd=ROOT, capture_output=True, text=True,
                     timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))
  assert r.returncode == code, r.stderr
  if code == 2:
    assert r.stderr.strip() == "tool: error: cannot write /out/x.json: " + _cause(errno.ENOSPC)
  else:
    assert "Traceback" in r.stderr and "FileNotFoundError" in r.stderr


# ---- each command --------------------------------------------------------------------------


def test_convert_into_a_read_only_folder(demo_images_dir, tmp_path):
  out = tmp_path / "ro" / "tfrecords"
  out.mkdir(parents=True)
  proc = _run("tfrecord_tools.convert", [f"--input_dir={demo_images_dir}", f"--output_dir={out}",
                                         "--num_workers=1"], str(out), errno.EACCES)
  line = _one_line(proc, "tfrecord_tools.convert")
  assert f"cannot write {out}" in line and "Permission denied (EACCES)" in line


def test_convert_over_quota_leaves_no_temp_files(demo_images_dir, tmp_path):
  out = tmp_path / "tfrecords"
  proc = _run("tfrecord_tools.convert", [f"--input_dir={demo_images_dir}", f"--output_dir={out}",
                                         "--num_workers=1"], str(out), errno.EDQUOT)
  line = _one_line(proc, "tfrecord_tools.convert")
  assert "Disk quota exceeded (EDQUOT)" in line and str(out) in line
  assert not _no_temp_files(out)


def test_synthetic_into_a_full_disk(tmp_path):
  out = tmp_path / "images"
  proc = _run("tfrecord_tools.synthetic", [f"--output_dir={out}", "--num_images=4"], str(out),
              errno.ENOSPC)
  line = _one_line(proc, "tfrecord_tools.synthetic")
  assert line.endswith(_cause(errno.ENOSPC)) and str(out) in line


def test_inspect_grid_into_a_read_only_folder(demo_data_dir, tmp_path):
  grid = tmp_path / "ro" / "grid.png"
  proc = _run("tfrecord_tools.inspect", [str(demo_data_dir), f"--grid={grid}"], str(grid.parent),
              errno.EROFS if not _real_eacces() else errno.EACCES)
  line = _one_line(proc, "tfrecord_tools.inspect")
  assert str(grid.parent) in line
  assert not _no_temp_files(grid.parent)


def test_train_into_a_read_only_folder(demo_data_dir, tmp_path):
  run = tmp_path / "ro" / "run"
  (tmp_path / "ro").mkdir()
  proc = _run("xraytpu.train", [f"--data_dir={demo_data_dir}", f"--model_dir={run}",
                                "--image_size=32", "--epochs=1", "--batch_size=8"],
              str(tmp_path / "ro"), errno.EACCES)
  line = _one_line(proc, "xraytpu.train")
  assert f"cannot write {tmp_path / 'ro'}" in line and "Permission denied (EACCES)" in line


def test_evaluate_with_a_full_disk_for_the_model_card(trained_run, tmp_path):
  """The issue's MODEL_CARD.md.tmp traceback: one line naming MODEL_CARD.md, no temp file."""
  run = copy_run(trained_run, tmp_path)
  card = os.path.join(run, "MODEL_CARD.md")
  proc = _run("xraytpu.evaluate", [f"--model_dir={run}", "--noplots", "--bootstrap_resamples=20",
                                   "--threshold_policy=fixed:0.5"], card, errno.ENOSPC)
  line = _one_line(proc, "xraytpu.evaluate")
  assert line == f"xraytpu.evaluate: error: cannot write {card}: {_cause(errno.ENOSPC)}"
  assert not _no_temp_files(run) and not os.path.exists(card)


def test_evaluate_a_read_only_run(trained_run, tmp_path):
  run = copy_run(trained_run, tmp_path)
  proc = _run("xraytpu.evaluate", [f"--model_dir={run}", "--noplots", "--bootstrap_resamples=20",
                                   "--threshold_policy=fixed:0.5"], run, errno.EACCES)
  line = _one_line(proc, "xraytpu.evaluate")
  assert f"cannot write {run}" in line and "(EACCES)" in line


def test_predict_output_over_quota_keeps_no_partial_csv(trained_run, demo_images_dir, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "preds.csv").write_text("an earlier file\n")
  images = os.path.join(demo_images_dir, "test", "NORMAL")
  proc = _run("xraytpu.predict", [f"--model_dir={trained_run}", f"--output={out / 'preds.csv'}",
                                  images], str(out / "preds.csv"), errno.EDQUOT)
  line = _one_line(proc, "xraytpu.predict")
  assert line == (f"xraytpu.predict: error: cannot write {out / 'preds.csv'}: "
                  f"{_cause(errno.EDQUOT)}")
  assert (out / "preds.csv").read_text() == "an earlier file\n"      # the old file, whole
  assert not _no_temp_files(out)
  assert len(proc.stdout.strip().splitlines()) == len(os.listdir(images))   # printed all the same


def test_export_into_a_read_only_folder(trained_run, tmp_path):
  root = tmp_path / "ro" / "exports"
  root.mkdir(parents=True)
  proc = _run("xraytpu.export", [f"--model_dir={trained_run}", f"--export_dir={root}"], str(root),
              errno.EROFS if not _real_eacces() else errno.EACCES)
  line = _one_line(proc, "xraytpu.export")
  assert f"cannot write {root}" in line
  assert os.listdir(root) == []          # no hidden .tmp-N-PID folder left


def test_export_cleans_its_temp_folder_when_saving_fails(trained_run, tmp_path, monkeypatch):
  """A full disk in the middle of TensorFlow's SavedModel writer (C++, no Python file call)."""
  from xraytpu.inference import export_lib
  root = tmp_path / "exports"

  def full(module, path, signatures=None):   # what TensorFlow 2.21 raises on a full disk
    os.makedirs(os.path.join(path, "variables", "variables_temp"))
    part = os.path.join(path, "variables", "variables_temp",
                        "part-00000-of-00001.data-00000-of-00001.tempstate2987896255717120752")
    open(part, "wb").close()
    raise export_lib.tf.errors.ResourceExhaustedError(
        None, None, "{{function_node __wrapped__SaveV2_dtypes_21_device_/job:localhost/replica:0/"
        f"task:0/device:CPU:0}}}} {part}; No space left on device [Op:SaveV2]")
  monkeypatch.setattr(export_lib.tf.saved_model, "save", full)
  with pytest.raises(export_lib.tf.errors.ResourceExhaustedError) as e:
    export_lib.export(trained_run, export_dir=str(root))
  assert errors.os_error_line(e.value) == f"cannot write {root}: {_cause(errno.ENOSPC)}"
  assert os.listdir(root) == []


def test_summary_writes_nothing_into_a_run(trained_run, tmp_path):
  """summary only reads the run: a read-only run directory is no fault for it."""
  run = copy_run(trained_run, tmp_path)
  proc = _run("xraytpu.summary", [run], run, errno.EACCES)
  assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stdout.strip()


def test_every_command_starts_through_the_one_runner():
  """The line comes from tfrecord_tools.cli.run, so each command's run() must go through it."""
  import ast
  for module in ("tfrecord_tools/convert/__main__.py", "tfrecord_tools/inspect.py",
                 "tfrecord_tools/synthetic.py", "xraytpu/train.py", "xraytpu/evaluate.py",
                 "xraytpu/predict.py", "xraytpu/export.py", "xraytpu/serve.py", "xraytpu/summary.py",
                 "xraytpu/data_service.py"):
    tree = ast.parse(open(os.path.join(ROOT, module)).read())
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert calls & {"cli.run", "_entry.run_command", "run_command"}, module
