"""Strategies: names, errors, batch arithmetic; MirroredStrategy over 2 logical CPUs and
MultiWorkerMirroredStrategy over 2 local worker processes, both training for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests import _net
import tensorflow as tf

from xraytpu.training import distribute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
# Real training under MirroredStrategy / MultiWorkerMirroredStrategy (subprocesses:
# devices and clusters must be set up before TensorFlow initialises).
# ---------------------------------------------------------------------------

_TRAIN = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    if {split_cpu}:
      cpu = tf.config.list_physical_devices("CPU")[0]
      tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from xraytpu.training import train_lib
    from xraytpu.config import Config
    out = {{}}
    for strategy in {strategies}:
      cfg = Config(data_dir={data!r}, model_dir={run!r} + "/" + strategy, strategy=strategy,
                   model="xray_cnn", image_size=32, batch_size=8, epochs=1, steps_per_epoch=4,
                   steps_per_execution={spe}, augment="light", seed=0).resolve_augment()
      r = train_lib.train_and_evaluate(cfg, verbose=0)
      p = r.model.predict(np.zeros((3, 32, 32, 1), np.uint8), verbose=0)
      out[strategy] = dict(replicas=r.strategy.replicas, devices=list(r.strategy.devices),
                           is_chief=r.strategy.is_chief, shape=list(p.shape),
                           history=[sorted(h) for h in r.history])
      np.savez({weights!r} + "/" + strategy + ".npz", *r.model.get_weights())
    print("RESULT " + json.dumps(out))
""")


def _run(code: str, env: dict, timeout: int) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _result(proc: subprocess.Popen, timeout: int) -> dict:
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate(timeout=30)
    pytest.fail(f"worker timed out after {timeout}s:\n{out[-3000:]}")
  assert proc.returncode == 0, out[-3000:]
  return _parse(out)


def _parse(out: str) -> dict:
  line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def _env(**extra) -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT, **extra)
  env.pop("TF_CONFIG", None)
  env.update(extra)
  return env


@pytest.mark.slow
def test_multi_worker_two_processes_agree_on_weights(demo_data_dir, tmp_path):
  workers = [f"127.0.0.1:{p}" for p in _net.free_ports(2)]
  procs = []
  try:
    for i in range(2):
      tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
      wdir = tmp_path / f"w{i}"
      wdir.mkdir()
      code = _TRAIN.format(split_cpu=False, strategies=["multi_worker"], data=demo_data_dir,
                           run=str(tmp_path / "shared"), weights=str(wdir), spe=2)
      procs.append(_run(code, _env(TF_CONFIG=tf_config), 300))
    outs = []
    for p in procs:  # collect both logs before judging, so a failure shows the culprit
      try:
        outs.append(p.communicate(timeout=300)[0])
      except subprocess.TimeoutExpired:
        p.kill()
        outs.append(p.communicate(timeout=30)[0] + "\n[timed out after 300 s]")
    for i, (p, out) in enumerate(zip(procs, outs)):
      assert p.returncode == 0, f"worker {i} failed:\n{out[-2500:]}\n--- other worker:\n{outs[1 - i][-1500:]}"
    results = [_parse(out) for out in outs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate(timeout=30)
  for i, r in enumerate(results):
    assert r["multi_worker"]["replicas"] == 2
    assert r["multi_worker"]["is_chief"] == (i == 0)
  assert results[0]["multi_worker"]["history"]  # the chief read its history.csv back
  w0 = np.load(tmp_path / "w0" / "multi_worker.npz")
  w1 = np.load(tmp_path / "w1" / "multi_worker.npz")
  assert len(w0.files) == len(w1.files) > 0
  for k in w0.files:
    np.testing.assert_allclose(w0[k], w1[k], rtol=1e-5, atol=1e-6)
  run = tmp_path / "shared" / "multi_worker"
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
