"""tfrecord_tools.pool: a process pool that survives its workers dying (SIGKILL, crashes)."""

from __future__ import annotations

import os
import signal

import pytest

from tfrecord_tools import pool


def _square(x: int) -> int:
  pool.tick(x)
  return x * x


def _fail(x: int) -> int:
  if x == 2:
    raise KeyError("task 2 failed")
  return x


def _killed(x: int) -> int:
  """Task 0 is always killed as the out-of-memory killer does; the others finish."""
  if x == 0:
    os.kill(os.getpid(), signal.SIGKILL)
  return x


def test_one_worker_runs_in_process_with_progress():
  seen = []
  assert pool.run(_square, [1, 2, 3], 1, progress=seen.append) == [1, 4, 9]
  assert seen == [1, 3, 6]
  pool.tick(5)   # outside a run: nothing to add to, no error


def test_workers_run_every_task_and_report_progress():
  seen = []
  out = pool.run(_square, range(1, 6), 2, progress=seen.append)
  assert sorted(out) == [1, 4, 9, 16, 25]
  assert seen[-1] == 15


def test_a_task_error_is_raised_as_itself():
  with pytest.raises(KeyError, match="task 2 failed"):
    pool.run(_fail, [0, 1, 2, 3], 2)


def test_a_worker_killed_twice_raises_workers_died_with_the_cause():
  logs = []
  with pytest.raises(pool.WorkersDied) as e:
    pool.run(_killed, [0, 1, 2], 2, log=logs.append, noun="shard")
  assert e.value.cause == "was killed by SIGKILL (the out-of-memory killer?)"
  assert e.value.num_tasks == 3 and 0 <= e.value.num_finished <= 2
  assert len(logs) == 1 and logs[0].startswith(
      "a worker process was killed by SIGKILL (the out-of-memory killer?); trying the ")
  assert logs[0].endswith(" again") and "unfinished shard" in logs[0]


def test_a_lost_task_that_finished_anyway_is_recovered():
  out = pool.run(_killed, [0, 1, 2], 2, recover=lambda t: -1 if t == 0 else None)
  assert sorted(out) == [-1, 1, 2]
