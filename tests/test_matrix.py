"""Every strategy x precision x XLA x steps_per_execution the CLI accepts trains, validates,
evaluates and exports, on splits that do not divide the global batch (tests/_matrix.py).

The data (conftest.awkward_data): 120 synthetic films converted with default splits (84 / 18 /
18, 2 shards per split). Global batch 16 leaves a last val batch of 2 (1 per replica over two
replicas); global batch 32 is larger than val and test. The validation metrics `fit` logs under the
strategy are checked against one plain pass over val: padding must count nothing and
every example exactly once. TPU proxy on CPU: bfloat16 + XLA + steps_per_execution > 1 +
drop_remainder on one replica, bfloat16 + steps_per_execution > 1 over two replicas and
two workers; XLA over several CPU replicas is refused (TensorFlow cannot run it).
"""

from __future__ import annotations

import pytest

from tests import _runs

from xraytpu.training import distribute

# Each process runs its combinations in turn (devices are fixed per process).
ONE_CPU = ["default:off:0:1", "default:bfloat16:1:3", "default:float16:0:3:32",
           "one_device:off:1:1:32", "one_device:float16:1:3", "one_device:bfloat16:0:1",
           "mirrored:auto:1:3", "mirrored:bfloat16:1:1:32", "mirrored:float16:0:3",
           "mirrored:off:0:1"]
TWO_CPUS = ["mirrored:off:0:1", "mirrored:bfloat16:0:3:32", "mirrored:float16:0:3",
            "mirrored:auto:0:1", "mirrored:bfloat16:1:3"]
MULTI_WORKER = _runs.MULTI_WORKER_COMBO   # conftest.multi_worker_matrix_run trains it

_matrix = _runs.matrix_process
_rows = _runs.matrix_rows


def _check_trained(row: dict) -> None:
  """The validation `fit` logged equals one plain pass over val; nothing dropped."""
  assert row["status"] == "trained", row
  exact = row["policy"] == "float32"
  gap = row["gap"]
  assert row["plain"]["n"] == row["val_examples"] == 18
  assert gap["val_loss"] < (1e-4 if exact else 3e-3), row
  # Mixed precision: the plain pass batches differently (other kernels, other bfloat16/float16
  # roundings), and after one epoch the scores are nearly tied, so some pairs swap (one swapped
  # pair moves AUC by 1/81; seen: up to 7.5/81 on TF 2.20). The float32 rows must agree
  # exactly, and tests/test_input_pipeline.py checks the padding example by example.
  assert gap["val_accuracy"] < (1e-5 if exact else 2.5 / 18), row
  assert gap["val_auc"] < (1e-5 if exact else 0.15), row
  want = {"off": "float32", "auto": "float32", "bfloat16": "mixed_bfloat16",
          "float16": "mixed_float16"}[row["precision"]]
  assert row["policy"] == want, row
  assert row["val_steps"] * row["batch_size"] == row["val_examples"] + row["val_padding"]
  if "test_counted" in row:
    assert row["test_counted"] == row["test_examples"] == 18, row
  if "export_max_gap" in row:
    assert row["export_max_gap"] < (1e-4 if exact else 2e-2), row


@pytest.mark.slow
def test_matrix_one_and_two_cpu_devices(awkward_data, tmp_path):
  """Both device layouts at once (two processes on two cores)."""
  one = _matrix(awkward_data, str(tmp_path / "one"), ONE_CPU, extra=("--evaluate", "--export"))
  two = _matrix(awkward_data, str(tmp_path / "two"), TWO_CPUS, cpus=2, extra=("--evaluate",))
  rows_one, rows_two = _rows(one), _rows(two)
  assert [r["combo"] for r in rows_one] == ONE_CPU
  for row in rows_one:
    _check_trained(row)
    assert row["replicas"] == 1
    assert "export_max_gap" in row and "test_counted" in row
  by = {r["combo"]: r for r in rows_two}
  for combo in TWO_CPUS[:-1]:
    _check_trained(by[combo])
    assert by[combo]["replicas"] == 2
  refused = by["mirrored:bfloat16:1:3"]
  assert refused["status"] == "refused"
  assert refused["message"].startswith("--jit_compile with --strategy=mirrored over 2 CPU replicas")
  assert "\n" not in refused["message"]


@pytest.mark.slow
def test_matrix_multi_worker_mixed_precision(multi_worker_matrix_run):
  """Two worker processes, bfloat16, steps_per_execution 3, 2 shards per split (by file): the one
  multi-worker training (conftest.multi_worker_matrix_run, also read by tests/test_distribute.py)."""
  chief, other = multi_worker_matrix_run["rows"]
  assert chief["combo"] == other["combo"] == MULTI_WORKER
  assert chief["chief"] and not other["chief"]
  assert chief["replicas"] == 2 and chief["workers"] == 2
  _check_trained(chief)


def test_xla_over_several_cpu_replicas_is_refused_in_one_line():
  info = distribute.StrategyInfo(name="multi_worker", cls="MultiWorkerMirroredStrategy",
                                 replicas=2, devices=("/cpu:0",), num_workers=2,
                                 task_type="worker", task_id=0, is_chief=True, accelerator="cpu")
  with pytest.raises(distribute.StrategyError, match="over 2 CPU replicas cannot run"):
    distribute.check_supported(info, jit_compile=True)
  distribute.check_supported(info, jit_compile=False)
  gpu = distribute.StrategyInfo(**{**info.__dict__, "accelerator": "gpu"})
  distribute.check_supported(gpu, jit_compile=True)
  one = distribute.StrategyInfo(**{**info.__dict__, "replicas": 1, "num_workers": 1})
  distribute.check_supported(one, jit_compile=True)
