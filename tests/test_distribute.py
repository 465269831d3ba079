"""Strategies: names, errors, batch arithmetic; MultiWorkerMirroredStrategy over 2 local worker
processes, training for real (MirroredStrategy over 2 logical CPUs: tests/test_matrix.py)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from xraytpu.training import distribute

def test_single_process_strategies():
  for name, cls in [("default", "_DefaultDistributionStrategy"), ("one_device", "MirroredStrategy"),
                    ("mirrored", "MirroredStrategy")]:
    s = distribute.get_strategy(name)
    info = distribute.describe(s, name)
    assert info.cls == cls and info.replicas == 1 and info.is_chief and info.accelerator == "cpu"
    assert info.num_workers == 1 and info.devices


def test_unknown_and_unavailable_strategies_fail_in_one_line():
  with pytest.raises(distribute.StrategyError, match="unknown strategy"):
    distribute.get_strategy("gpu_cluster")
  with pytest.raises(distribute.StrategyError) as e:
    distribute.get_strategy("tpu", tpu="local")  # this machine has no TPU
  assert str(e.value).startswith("--strategy=tpu: no TPU found at 'local'")
  assert "\n" not in str(e.value)


def test_bad_tf_config_is_a_usage_error(monkeypatch):
  monkeypatch.setenv("TF_CONFIG", "{not json")
  with pytest.raises(distribute.StrategyError, match="TF_CONFIG is not valid"):
    distribute.get_strategy("multi_worker")


def test_batch_and_precision_arithmetic():
  assert distribute.per_replica_batch(64, 8) == 8
  with pytest.raises(distribute.StrategyError, match="multiple of the 8 replicas"):
    distribute.per_replica_batch(60, 8)
  s = tf.distribute.get_strategy()
  assert distribute.mixed_precision_policy("auto", s) == "float32"  # CPU: off
  assert distribute.mixed_precision_policy("bfloat16", s) == "mixed_bfloat16"
  assert distribute.mixed_precision_policy("float16", s) == "mixed_float16"


# ---------------------------------------------------------------------------
# Real training under MultiWorkerMirroredStrategy: two local worker processes (devices and
# clusters must be set up before TensorFlow initialises). MirroredStrategy over 2 logical CPUs
# trains in tests/test_matrix.py.
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_multi_worker_two_processes_agree_on_weights(multi_worker_matrix_run):
  """The suite's one multi-worker training (conftest.multi_worker_matrix_run: tests/_matrix.py,
  bfloat16, steps_per_execution 3; tests/test_matrix.py checks its validation): both workers
  end with the same weights, the chief alone writes the run."""
  results = multi_worker_matrix_run["rows"]
  for i, r in enumerate(results):
    assert r["status"] == "trained" and r["replicas"] == 2
    assert r["chief"] == (i == 0)
  assert results[0]["logged"]["loss"] > 0   # the chief read its history.csv back
  w0, w1 = (np.load(r["weights"]) for r in results)
  assert len(w0.files) == len(w1.files) > 0
  for k in w0.files:
    np.testing.assert_allclose(w0[k], w1[k], rtol=1e-5, atol=1e-6)
  run = pathlib.Path(multi_worker_matrix_run["run_dir"])
  doc = json.load(open(run / "config.json"))
  assert doc["status"] == "finished" and doc["run"]["strategy"]["num_workers"] == 2
  assert (run / "model.keras").is_file()


@pytest.mark.parametrize("tpu,connects", [("local", False), ("my-tpu-node", True),
                                          ("grpc://10.0.0.2:8470", True), ("", False)])
def test_tpu_start_up_sequence(monkeypatch, tpu, connects):
  """What TensorFlow allows without the chip: the resolver gets --tpu (None for local/empty),
  a remote TPU is connected before initialisation, and TPUStrategy gets the resolver."""
  calls = []

  class Resolver:
    def __init__(self, tpu=None):
      calls.append(("resolver", tpu))

  monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", Resolver)
  monkeypatch.setattr(tf.config, "experimental_connect_to_cluster",
                      lambda r: calls.append(("connect", type(r).__name__)))
  monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system",
                      lambda r: calls.append(("initialize", type(r).__name__)))
  monkeypatch.setattr(tf.distribute, "TPUStrategy",
                      lambda r: calls.append(("strategy", type(r).__name__)) or "S")
  assert distribute._tpu_strategy(tpu) == "S"   # noqa: SLF001
  want = [("resolver", tpu or None)] + ([("connect", "Resolver")] if connects else []) + [
      ("initialize", "Resolver"), ("strategy", "Resolver")]
  assert calls == want


def test_tpu_initialisation_failure_is_one_line(monkeypatch):
  class Resolver:
    def __init__(self, tpu=None):
      pass

  def fail(resolver):
    raise tf.errors.NotFoundError(None, None, "no TPU\nplatform found")

  monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", Resolver)
  monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system", fail)
  with pytest.raises(distribute.StrategyError) as e:
    distribute._tpu_strategy("local")   # noqa: SLF001
  assert str(e.value) == "--strategy=tpu: no TPU found at 'local' (NotFoundError: no TPU platform found)"
