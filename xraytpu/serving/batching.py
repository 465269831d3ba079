"""Batching concurrent requests: one worker thread owns the model and runs it on
jobs gathered from many requests (up to max_batch images, waiting at most
timeout_s after the first)."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

import numpy as np


class BatchTimeout(TimeoutError):
  """The model did not answer in time (the server answers 503)."""


class Job:
  """One request's images waiting for the model: pixels uint8 [n, S, S, C]."""

  def __init__(self, pixels: np.ndarray, gradcam: bool = False):
    self.pixels, self.gradcam = pixels, gradcam
    self.result: Any = None
    self.error: BaseException | None = None
    self._done = threading.Event()

  def finish(self, result: Any = None, error: BaseException | None = None) -> None:
    self.result, self.error = result, error
    self._done.set()

  def wait(self, timeout: float | None = None) -> Any:
    if not self._done.wait(timeout):
      raise BatchTimeout(f"the model did not answer within {timeout:g} s; try again")
    if self.error is not None:
      raise self.error
    return self.result


class Batcher:
  """A queue and one worker thread that runs `fn(jobs)` on gathered jobs.

  The worker takes the first waiting job, then keeps taking jobs until they
  hold `max_batch` images or `timeout_s` has passed since the first, and calls
  fn(jobs), which must call job.finish(...) on each. An exception from fn
  fails every job of that batch. Counters: batches, images.
  """

  def __init__(self, fn: Callable[[list[Job]], None], *, max_batch: int, timeout_s: float):
    self._fn, self._max_batch, self._timeout_s = fn, max(1, int(max_batch)), max(0.0, timeout_s)
    self._queue: queue.Queue[Job | None] = queue.Queue()
    self.batches = self.images = 0
    self.batch_sizes: list[int] = []
    self._thread = threading.Thread(target=self._loop, name="xraytpu-batcher", daemon=True)
    self._thread.start()

  def submit(self, job: Job) -> Job:
    self._queue.put(job)
    return job

  def stop(self) -> None:
    self._queue.put(None)
    self._thread.join(timeout=30)

  def _loop(self) -> None:
    while True:
      first = self._queue.get()
      if first is None:
        return
      jobs, n, stop = [first], len(first.pixels), False
      deadline = time.monotonic() + self._timeout_s
      while n < self._max_batch:
        try:
          left = deadline - time.monotonic()
          job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
        except queue.Empty:
          break
        if job is None:
          stop = True
          break
        jobs.append(job)
        n += len(job.pixels)
      try:
        self._fn(jobs)
      except BaseException as e:  # noqa: BLE001 - fail the waiting requests, keep serving
        for job in jobs:
          if not job._done.is_set():
            job.finish(error=e)
      self.batches += 1
      self.images += n
      if len(self.batch_sizes) < 100_000:
        self.batch_sizes.append(n)
      if stop:
        return
