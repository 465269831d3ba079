"""`python -m benchmarks.device_check` runs on this CPU with tiny settings: every part reports
(devices, training speed in float32 and mixed precision with XLA, the steps_per_execution sweep,
input against the decode bound, the convert -> train -> evaluate -> export -> serve smoke).
No timing is asserted: only that each number exists and each stage worked."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_device_check_runs_every_part_on_cpu(tmp_path):
  out = tmp_path / "check.json"
  r = subprocess.run(
      [sys.executable, "-m", "benchmarks.device_check", "--models=xray_cnn", "--image_size=32",
       "--batch_size=8", "--steps=4", "--steps_per_execution=1,2", "--films=24",
       "--film_side=256", "--smoke_epochs=1", f"--json={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["devices"]["accelerator"] == "cpu" and report["devices"]["replicas"] == 1
  training = report["training"]
  assert [(t["model"], t["precision"]) for t in training] == [("xray_cnn", "float32"),
                                                             ("xray_cnn", "mixed_bfloat16")]
  assert all(t["jit"] and t["images_per_sec"] > 0 for t in training + report["sweep"])
  assert [s["steps_per_execution"] for s in report["sweep"]] == [1, 2]
  # The sweep's point 1 is the mixed-precision training row (the same step), not run twice.
  assert report["sweep"][0] == training[1]
  i = report["input"]
  assert i["input_images_per_sec"] > 0 and i["bound_images_per_sec"] > 0
  assert isinstance(i["step_waits_on_input"], bool)
  assert set(report["smoke"]) == {"train", "evaluate", "export_savedmodel", "serve"}
  assert all(s["ok"] for s in report["smoke"].values()), report["smoke"]
  table = r.stdout[r.stdout.index("devices:"):]
  for part in ("| training |", "| sweep |", "| input |", "| smoke | serve |"):
    assert part in table, table
