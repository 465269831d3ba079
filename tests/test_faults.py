"""Faults a real workstation or cluster produces: no silent corruption, one line each.

symlink loops, conflicting and duplicate contents, resuming on other data, two
processes on one output, truncated shards, a full disk, a pure resume.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tfrecord_tools import convert as convert_lib, locks, records, schema, shards, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(tmp_path, n=20, size=32, name="images"):
  out = tmp_path / name
  synthetic.generate(str(out), num_images=n, size=size, num_classes=2, seed=1)
  return out


def _convert(src, out, **kw):
  kw.setdefault("val_fraction", 0.25)
  kw.setdefault("test_fraction", 0.0)
  return convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=str(src), output_dir=str(out), num_workers=1, quiet=True, **kw))


def _records_of(data_dir):
  m = schema.read_manifest(str(data_dir))
  out = []
  for split in m["splits"]:
    for path in schema.shard_paths(str(data_dir), m, split):
      import tensorflow as tf
      for raw in records.read_records(path):
        ex = tf.io.parse_single_example(raw, records.feature_spec())
        out.append((split, ex[records.FILENAME].numpy().decode(), ex[records.TEXT].numpy().decode()))
  return out


def _cli(module, *args, timeout=300, **kw):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, **kw)


def _error_line(proc) -> str:
  lines = [ln for ln in proc.stderr.strip().splitlines() if ": error: " in ln]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return lines[0]


# ---- input walking -----------------------------------------------------------------


def test_a_symlink_loop_converts_every_file_once(tmp_path):
  src = _images(tmp_path)
  os.symlink("..", src / "NORMAL" / "up")                 # NORMAL/up/PNEUMONIA/... would relabel
  m = _convert(src, tmp_path / "out")
  assert m["num_found"] == m["num_converted"] == 20
  recs = _records_of(tmp_path / "out")
  names = [r[1] for r in recs]
  assert len(names) == len(set(names)) == 20
  assert all(name.split("/")[0] == text for _, name, text in recs)   # no film under another class


def test_a_file_reached_twice_is_converted_once(tmp_path):
  src = _images(tmp_path)
  first = sorted(os.listdir(src / "NORMAL"))[0]
  (src / "NORMAL" / "sub").mkdir()
  os.symlink(os.path.join("..", first), src / "NORMAL" / "sub" / "again.png")
  m = _convert(src, tmp_path / "out")
  assert m["num_converted"] == 20 and m["num_found"] == 20
  assert m["aliases"] == [{"path": "NORMAL/sub/again.png", "same_file_as": f"NORMAL/{first}"}]


def test_same_contents_under_two_classes_is_a_conflict(tmp_path):
  src = _images(tmp_path)
  film = sorted(os.listdir(src / "NORMAL"))[0]
  shutil.copy(src / "NORMAL" / film, src / "PNEUMONIA" / "copy.png")
  with pytest.raises(convert_lib.ConvertError, match=r"same contents under different classes: "
                     rf"NORMAL/{film} \(NORMAL\) = PNEUMONIA/copy.png \(PNEUMONIA\)"):
    _convert(src, tmp_path / "out")
  m = _convert(src, tmp_path / "out2", on_conflict="skip", max_skipped_fraction=0.2)
  assert m["num_converted"] + m["num_skipped"] == m["num_found"] == 21
  assert {s["path"] for s in m["skipped"]} == {f"NORMAL/{film}", "PNEUMONIA/copy.png"}
  names = [r[1] for r in _records_of(tmp_path / "out2")]
  assert f"NORMAL/{film}" not in names and "PNEUMONIA/copy.png" not in names


def test_identical_files_within_a_class_stay_in_one_split(tmp_path):
  src = _images(tmp_path, n=40)
  films = sorted(os.listdir(src / "PNEUMONIA"))[:6]
  for i, f in enumerate(films):
    shutil.copy(src / "PNEUMONIA" / f, src / "PNEUMONIA" / f"dup{i}.png")
  m = _convert(src, tmp_path / "out", val_fraction=0.3, test_fraction=0.3)
  assert m["num_converted"] == 46 and m["num_duplicates"] == 12
  assert sorted(sorted(d) for d in m["duplicates"]) == sorted(
      sorted([f"PNEUMONIA/{f}", f"PNEUMONIA/dup{i}.png"]) for i, f in enumerate(films))
  split_of = {name: split for split, name, _ in _records_of(tmp_path / "out")}
  for group in m["duplicates"]:
    assert len({split_of[name] for name in group}) == 1, group


# ---- runs -----------------------------------------------------------------------------


def _train_cfg(data, run, **kw):
  from xraytpu.config import Config
  kw = {**dict(model="xray_cnn", image_size=32, batch_size=8, epochs=1, augment="none",
               cache="off", seed=0), **kw}
  return Config(data_dir=str(data), model_dir=str(run), **kw).resolve_augment()


def _interrupt(run):
  """Marks a finished run as interrupted (what a kill after epoch 1 leaves behind)."""
  from xraytpu.run import rundir
  doc = rundir.read_config(str(run))
  doc["status"] = "running"
  rundir.write_config(str(run), doc)


def test_resume_on_other_data_is_refused_and_on_a_copy_allowed(tmp_path):
  from xraytpu.run import rundir
  from xraytpu.training import train_lib
  src = _images(tmp_path, n=40)
  a, b = tmp_path / "a", tmp_path / "b"
  _convert(src, a, seed=0)
  _convert(src, b, seed=7)                                 # same images, another split
  run = tmp_path / "run"
  train_lib.train_and_evaluate(_train_cfg(a, run), verbose=0)
  _interrupt(run)
  with pytest.raises(train_lib.TrainError, match=r"unfinished run.*data: same classes and split "
                     r"sizes but other images or another split"):
    train_lib.train_and_evaluate(_train_cfg(b, run), verbose=0)
  copy = tmp_path / "copy_of_a"
  shutil.copytree(a, copy)
  result = train_lib.train_and_evaluate(_train_cfg(copy, run), verbose=0)   # resumes
  assert result.run_dir == str(run) and rundir.read_config(str(run))["status"] == "finished"
  assert rundir.read_config(str(run))["run"]["data"] == schema.data_fingerprint(
      schema.read_manifest(str(a)))


_HOLD = """
import sys, time
from tfrecord_tools import locks
with locks.exclusive(sys.argv[1], "the test's holder"):
  print("held", flush=True)
  time.sleep(600)
"""


def _holder(folder):
  proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_held_lock_names_its_holder_and_a_dead_holder_is_taken_over(tmp_path):
  proc = _holder(tmp_path)
  try:
    with pytest.raises(locks.LockHeld, match=rf"in use by the test's holder on host .*, PID {proc.pid}, "
                       r"started \d{4}-\d\d-\d\d"):
      with locks.exclusive(str(tmp_path), "second"):
        pass
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  with locks.exclusive(str(tmp_path), "after kill -9"):   # the kernel released it: taken over
    pass


def test_a_second_trainer_is_refused_at_once(demo_data_dir, tmp_path):
  run = tmp_path / "run"
  first = subprocess.Popen(
      [sys.executable, "-m", "xraytpu.train", f"--data_dir={demo_data_dir}", f"--model_dir={run}",
       "--model=xray_cnn", "--image_size=32", "--batch_size=8", "--epochs=500", "--augment=none"],
      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  try:
    deadline = time.time() + 240
    while not (run / "history.csv").exists():             # the first is training
      assert first.poll() is None and time.time() < deadline
      time.sleep(0.5)
    t = time.time()
    second = _cli("xraytpu.train", f"--data_dir={demo_data_dir}", f"--model_dir={run}",
                  "--model=xray_cnn", "--image_size=32", "--batch_size=8", "--epochs=500",
                  "--augment=none")
    assert second.returncode == 2
    line = _error_line(second)
    assert f"{run} is in use by xraytpu.train on host" in line and f"PID {first.pid}" in line
    assert time.time() - t < 60
  finally:
    first.kill()
    first.wait()
  # kill -9 left the lock file; the next trainer takes it over and resumes.
  with locks.exclusive(str(run), "resume"):
    pass


def test_a_second_converter_is_refused(tmp_path):
  src = _images(tmp_path)
  out = tmp_path / "out"
  with locks.exclusive(str(out), "tfrecord_tools.convert"):
    proc = _cli("tfrecord_tools.convert", f"--input_dir={src}", f"--output_dir={out}")
  assert proc.returncode == 2
  assert f"{out} is in use by tfrecord_tools.convert on host" in _error_line(proc)
  assert not (out / schema.MANIFEST_NAME).exists()


# ---- corrupt data -------------------------------------------------------------------------


@pytest.fixture()
def truncated_data(demo_data_dir, tmp_path):
  data = tmp_path / "data"
  shutil.copytree(demo_data_dir, data)
  m = schema.read_manifest(str(data))
  for split in ("train", "test"):
    shard = schema.shard_paths(str(data), m, split)[0]
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
      f.truncate(size // 2)
  return data, m


def test_a_truncated_shard_in_train_is_one_line_and_marks_the_run_failed(truncated_data, tmp_path):
  from xraytpu.run import rundir
  data, m = truncated_data
  run = tmp_path / "run"
  proc = _cli("xraytpu.train", f"--data_dir={data}", f"--model_dir={run}", "--model=xray_cnn",
              "--image_size=32", "--batch_size=8", "--epochs=1", "--augment=none")
  assert proc.returncode == 2
  line = _error_line(proc)
  bad = schema.shard_paths(str(data), m, "train")[0]
  assert bad in line and "truncated" in line and "tfrecord_tools.inspect" in line
  assert rundir.read_config(str(run))["status"] == "failed"
  assert "truncated" in rundir.read_config(str(run))["run"]["failure"]


def test_a_truncated_shard_in_evaluate_is_one_line(truncated_data, trained_run, tmp_path):
  from tests._runs import copy_run
  data, m = truncated_data
  run = copy_run(trained_run, tmp_path)
  proc = _cli("xraytpu.evaluate", f"--model_dir={run}", f"--data_dir={data}", "--split=test",
              "--threshold_policy=fixed:0.5", "--noplots")
  assert proc.returncode == 2
  line = _error_line(proc)
  assert schema.shard_paths(str(data), m, "test")[0] in line and "tfrecord_tools.inspect" in line


# ---- the disk fills up --------------------------------------------------------------------


def _small_tmpfs(path) -> bool:
  if os.geteuid() != 0:
    return False
  os.makedirs(path, exist_ok=True)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(path)],
                        capture_output=True).returncode == 0


def test_disk_full_is_one_line_leaves_no_temp_files_and_resumes(tmp_path, monkeypatch):
  src = _images(tmp_path, n=60, size=64)
  out = tmp_path / "small"
  mounted = _small_tmpfs(out)
  try:
    if not mounted:   # not root, or no mount permission: a write that fails the same way
      real_open, calls = shards.storage.open, []

      def full_after_one_shard(path, mode="rb"):
        if "w" in mode and ".tmp-" in str(path):
          calls.append(path)
          if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode)
      monkeypatch.setattr(shards.storage, "open", full_after_one_shard)
    with pytest.raises(convert_lib.ConvertError, match=r"No space left on device \(ENOSPC\); \d+ of "
                       r"\d+ shards are finished and kept"):
      _convert(src, out, num_shards=4, image_format="png")
    names = os.listdir(out)
    assert not [n for n in names if ".tmp-" in n], names          # no temp shards left
    assert not (out / schema.MANIFEST_NAME).exists()
    finished = [n for n in names if n.endswith(".tfrecord")]
    assert finished                                             # kept for the resume
  finally:
    monkeypatch.undo()
    if mounted:
      moved = tmp_path / "moved"
      shutil.copytree(out, moved)
      subprocess.run(["umount", str(out)], check=True)
      shutil.rmtree(out)
      shutil.move(str(moved), str(out))
  m = _convert(src, out, num_shards=4, image_format="png")        # room again: resumes
  assert m["num_converted"] == 60


def test_a_pure_resume_says_nothing_to_convert(tmp_path, monkeypatch, capsys):
  src = _images(tmp_path)
  out = tmp_path / "out"
  real = convert_lib.pipeline.storage.write_bytes

  def no_room_for_the_manifest(path, data):
    if path.endswith(schema.MANIFEST_NAME):
      raise OSError(errno.ENOSPC, "No space left on device", path)
    return real(path, data)
  monkeypatch.setattr(convert_lib.pipeline.storage, "write_bytes", no_room_for_the_manifest)
  with pytest.raises(convert_lib.ConvertError, match="every shard is finished"):
    _convert(src, out)
  monkeypatch.undo()
  lines = []
  m = convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=str(src), output_dir=str(out), num_workers=1, val_fraction=0.25,
      test_fraction=0.0), log=lines.append)
  assert m["num_converted"] == 20
  n = sum(len(s["shards"]) for s in m["splits"].values())
  assert f"nothing to convert: {n} of {n} shards already complete" in lines
  assert not any("converting:" in ln for ln in lines)


# ---- the table of faults in docs/faults.md ---------------------------------------------------


def test_every_test_the_fault_table_names_exists():
  """docs/faults.md's table names a test for each class of fault: each must exist."""
  import re
  text = open(os.path.join(ROOT, "docs", "faults.md"), encoding="utf-8").read()
  named = re.findall(r"`(test_[a-z_]+\.py)::(test_[a-z0-9_]+)`", text)
  assert len(named) >= 30, named
  for file, test in named:
    source = open(os.path.join(ROOT, "tests", file), encoding="utf-8").read()
    assert re.search(rf"^def {test}\(", source, re.M), f"docs/faults.md names {file}::{test}"
