"""tf.data service: a dispatcher and two workers on 127.0.0.1 feed train_dataset.

The workers are real `python -m xraytpu.data_service --role=worker` processes
on fixed ports (one is killed with SIGKILL mid-epoch in the last test and, as a
supervisor would, started again at its address); the dispatcher runs in this
process. Data: the demo images converted into 3 shards per split (train: 44
examples), so the two workers get unequal shares of every epoch.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import pathlib
import queue
import signal
import socket
import subprocess
import sys
import threading

import pytest
import tensorflow as tf

from tfrecord_tools import convert as convert_lib, records, schema
from xraytpu.data import data_service_lib
from xraytpu._keras import keras
from xraytpu.config import Config
from xraytpu.data import input_pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120   # two workers importing TensorFlow at once on busy cores
# Upper bound for "does not hang" (includes restarting a worker: a TensorFlow import).
HANG_TIMEOUT_S = 120
HEARTBEAT_MS = 200


def _die_with_parent() -> None:
  ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no orphan workers


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_worker(dispatcher: str, port: int) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "xraytpu.data_service", "--role=worker", f"--port={port}",
       f"--dispatcher_address={dispatcher}", f"--heartbeat_interval_ms={HEARTBEAT_MS}"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
      preexec_fn=_die_with_parent)


def _wait_ready(proc: subprocess.Popen) -> str:
  """Waits for the worker's "worker listening on grpc://localhost:PORT" line; returns the address."""
  lines: queue.Queue = queue.Queue()
  threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
  try:
    line = lines.get(timeout=START_TIMEOUT_S)
  except queue.Empty:
    pytest.fail(f"worker did not start within {START_TIMEOUT_S} s")
  assert line.startswith("worker listening on grpc://localhost:"), line
  return line.split()[-1]


@pytest.fixture(scope="module")
def data_dir(demo_images_dir, tmp_path_factory) -> str:
  out = tmp_path_factory.mktemp("service_data") / "tfrecords"
  convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=demo_images_dir, output_dir=str(out), num_shards=3, num_workers=1, quiet=True))
  return str(out)


@pytest.fixture(scope="module")
def service():
  """(dispatcher address "grpc://localhost:P", {port: worker process}); tests may replace workers."""
  dispatcher = data_service_lib.start_dispatcher(0)
  address = "grpc://" + data_service_lib.server_address(dispatcher)
  workers = {port: _start_worker(address, port) for port in (_free_port(), _free_port())}
  try:
    for port, proc in workers.items():
      assert _wait_ready(proc) == f"grpc://localhost:{port}"
    yield address, workers
  finally:
    for proc in workers.values():
      proc.kill()
      proc.wait()
    dispatcher._stop()  # noqa: SLF001


def _spec(address: str, seed: int) -> input_pipeline.InputSpec:
  # Each test its own seed: the job name includes it, so the tests share no job.
  return input_pipeline.InputSpec.from_config(dataclasses.replace(
      Config(), data_service_address=address, image_size=16, batch_size=4, seed=seed, cache="memory"))


def _recording(ds: tf.data.Dataset, seen: list) -> tf.data.Dataset:
  """Appends each example's file name to `seen` in stream order (a sequential map)."""
  def record(names):
    seen.extend(n.decode() for n in names.numpy())
    return names
  return ds.map(lambda image, label, name: (
      image, label, tf.py_function(record, [name], tf.string)))


def _train_files(data_dir: str) -> list[str]:
  return sorted(r for f in schema.shard_paths(data_dir, schema.read_manifest(data_dir), "train")
                for r in _names(f))


def _names(path: str) -> list[str]:
  feature = {records.FILENAME: records.feature_spec()[records.FILENAME]}
  return [tf.io.parse_single_example(r, feature)[records.FILENAME].numpy().decode()
          for r in tf.data.TFRecordDataset(path)]


def test_distributed_epoch_trains_on_every_example_once_per_epoch(service, data_dir):
  address, workers = service
  files = _train_files(data_dir)
  assert len(files) == 44
  seen: list[str] = []
  ds = input_pipeline.train_dataset(data_dir, _spec(address, seed=1), global_batch=4,
                                    label_mode="binary", with_filenames=True)
  ds = _recording(ds, seen).map(lambda image, label, name: (image, label))
  model = keras.Sequential([keras.layers.Input((16, 16, 1)), keras.layers.Rescaling(1 / 255),
                            keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1)])
  model.compile("sgd", keras.losses.BinaryCrossentropy(from_logits=True))
  history = model.fit(ds, steps_per_epoch=11, epochs=2, verbose=0)   # 2 x 44 examples
  assert len(history.history["loss"]) == 2
  assert all(p.poll() is None for p in workers.values())   # both workers still serving
  epoch1, epoch2 = seen[:44], seen[44:88]
  assert sorted(epoch1) == files, collections.Counter(epoch1).most_common(3)
  assert sorted(epoch2) == files, collections.Counter(epoch2).most_common(3)


def test_service_flags_are_checked_before_starting(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "xraytpu.data_service", "--role=worker"],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0
  assert "--role=worker needs --dispatcher_address=HOST:PORT" in proc.stderr
  assert "Traceback" not in proc.stderr
  with pytest.raises(data_service_lib.ServiceError, match="not host:port"):
    data_service_lib.start_worker("localhost", 0)


def test_worker_killed_mid_epoch_does_not_hang_the_trainer(service, data_dir):
  address, workers = service
  files = _train_files(data_dir)
  seen: list[str] = []
  ds = input_pipeline.train_dataset(data_dir, _spec(address, seed=2), global_batch=4,
                                    with_filenames=True)
  ds = _recording(ds, seen)
  started, done = threading.Event(), threading.Event()
  errors: list[BaseException] = []

  def train():
    try:
      it = iter(ds)
      for _ in range(2):             # 8 examples into the first epoch
        next(it)
      started.set()
      while len(seen) < 44 + 88:      # the rest of epoch 1, then two full epochs
        next(it)
    except BaseException as e:  # noqa: BLE001  (reported by the test thread)
      errors.append(e)
    finally:
      started.set()
      done.set()

  threading.Thread(target=train, daemon=True).start()
  assert started.wait(HANG_TIMEOUT_S), "no batch from the service"
  port, victim = next(iter(workers.items()))
  victim.kill()                        # SIGKILL, mid-epoch
  victim.wait()
  workers[port] = _start_worker(address, port)   # its supervisor starts it again
  _wait_ready(workers[port])
  assert done.wait(HANG_TIMEOUT_S), f"the trainer hung after a worker was killed ({len(seen)} seen)"
  assert not errors, errors
  # Epoch 1 may lose what the killed worker had in flight but never repeats an
  # example; the epochs after it hold every example exactly once.
  starts = [k for k in range(45)
            if len(set(seen[:k])) == k and sorted(seen[k:k + 44]) == files
            and sorted(seen[k + 44:k + 88]) == files]
  assert starts, collections.Counter(seen[:88]).most_common(3)
