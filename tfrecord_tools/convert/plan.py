"""Stage 4, plan, and stage 5, write (local): shards planned, then written by a process pool.

  plan_shards   each split's items in seeded hash order, cut into
                `split-%05d-of-%05d.tfrecord` shards (`default_num_shards`:
                ~150 MB each); each `ShardTask` carries a fingerprint of its
                exact content, which the resume compares
  run_locally   one task per shard (`shards.write_shard`) on a crash-tolerant
                pool of worker processes (`pool.run`), with a progress line;
                the default `run_tasks` of `pipeline.convert` (`beam` runs the
                same shards with Apache Beam)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Callable, Sequence

from tfrecord_tools import __version__, pixels, pool, schema, shards
from tfrecord_tools.convert.find import split_order
from tfrecord_tools.convert.options import ConvertError, ConvertOptions, log
from tfrecord_tools.convert.split import hash_key
from tfrecord_tools.shards import Item, ShardTask, Source


# --------------------------------------------------------------------------
# 4. Plan: the shards of each split.
# --------------------------------------------------------------------------

TARGET_SHARD_BYTES = 150 * 2**20    # ~100-200 MB per shard at scale
MIN_EXAMPLES_PER_SHARD = 256        # small sets: no more shards than this implies
MAX_MIN_SHARDS = 8                  # ... but up to 8 shards so hosts can read in parallel


def default_num_shards(num_examples: int, estimated_bytes: int) -> int:
  """About TARGET_SHARD_BYTES per shard; small sets get a power of two, one
  shard per MIN_EXAMPLES_PER_SHARD examples, at most MAX_MIN_SHARDS."""
  if num_examples <= 0:
    return 1
  by_size = math.ceil(estimated_bytes / TARGET_SHARD_BYTES)
  by_count = min(MAX_MIN_SHARDS, math.ceil(num_examples / MIN_EXAMPLES_PER_SHARD))
  n = max(1, by_size, by_count)
  if n <= 64:
    n = 1 << (n - 1).bit_length()
  return max(1, min(n, num_examples))


def _estimated_bytes(src: Source, max_side: int) -> int:
  if not max_side:
    return src.size
  return min(src.size, max_side * max_side)  # ~1 byte/pixel at most once resized


def plan_shards(items: Sequence[Item], opts: ConvertOptions) -> dict[str, list[ShardTask]]:
  """Per split: items in seeded hash order, cut into contiguous shards."""
  by_split: dict[str, list[Item]] = {}
  for it in items:
    by_split.setdefault(it.split, []).append(it)
  plan = {}
  for split in sorted(by_split, key=split_order):
    its = sorted(by_split[split], key=lambda it: hash_key(opts.seed, "order", it.source.rel))
    n = len(its)
    if opts.num_shards:
      k = max(1, min(opts.num_shards, n))
    else:
      k = default_num_shards(n, sum(_estimated_bytes(it.source, opts.max_side) for it in its))
    tasks = []
    for i in range(k):
      part = its[i * n // k:(i + 1) * n // k]
      tasks.append(ShardTask(
          split=split, index=i, num_shards=k, file=schema.shard_name(split, i, k),
          output_dir=opts.output_dir, items=part, max_side=opts.max_side,
          channels=opts.channels, image_format=opts.image_format,
          jpeg_quality=opts.jpeg_quality, dicom_window=opts.dicom_window,
          max_pixels=opts.max_pixels))
    plan[split] = tasks
  for tasks in plan.values():
    for t in tasks:
      t.fingerprint = _fingerprint(t)
  return plan


def _fingerprint(task: ShardTask) -> str:
  """Identifies a shard's exact content: arguments + each source's identity."""
  h = hashlib.sha256()
  h.update(json.dumps([__version__, task.file, task.max_side, task.channels,
                       task.image_format, task.jpeg_quality,
                       task.dicom_window, task.max_pixels, pixels.PNG_COMPRESS_LEVEL,
                       pixels.CONTRACT_VERSION]).encode())
  for it in task.items:
    s = it.source
    h.update(json.dumps([s.rel, s.path, s.size, s.mtime_ns, s.offset, it.label,
                         it.text, it.patient_id, it.record_name]
                        + ([it.multi_hot, it.mask] if it.multi_hot else [])
                        + ([it.meta] if it.meta else [])).encode())
  return h.hexdigest()


# --------------------------------------------------------------------------
# 5. Write: each shard by tfrecord_tools.shards.write_shard, on a crash-
#    tolerant process pool (tfrecord_tools.pool), with a progress line.
# --------------------------------------------------------------------------


class Progress:
  """A one-line progress display with images/sec (a new line every 10 s when not a tty)."""

  def __init__(self, total: int, quiet: bool = False, what: str = "images"):
    self.total, self.quiet, self.what = total, quiet, what
    self.start = self.last = time.monotonic()
    self.done = 0
    self.tty = sys.stderr.isatty()

  def update(self, done: int, force: bool = False) -> None:
    self.done = done
    now = time.monotonic()
    if self.quiet or (not force and now - self.last < (0.5 if self.tty else 10.0)):
      return
    self.last = now
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else 0
    pct = 100.0 * done / max(self.total, 1)
    line = (f"converting: {done}/{self.total} {self.what} ({pct:5.1f}%) "
            f"{rate:7.1f} img/s  eta {int(eta) // 60}:{int(eta) % 60:02d}")
    if self.tty:
      print("\r" + line, end="", file=sys.stderr, flush=True)
    else:
      log(line)

  def close(self) -> float:
    """Prints the final line; returns images/sec."""
    elapsed = max(time.monotonic() - self.start, 1e-9)
    if not self.quiet:
      self.update(self.done, force=True)
      if self.tty:
        print(file=sys.stderr)
    return self.done / elapsed


def _run_tasks(tasks: list[ShardTask], num_workers: int, progress: Progress,
               log: Callable[[str], None] = log) -> list[dict]:
  """Writes the shards, each by one worker; the largest shards start first.

  Several workers: a `pool.run` process pool. A worker that dies (the
  out-of-memory killer, a crash in an image decoder) breaks the pool: the
  unfinished shards are tried once more on a new pool, then ConvertError
  names the cause (finished shards are kept; a rerun reuses them). Workers
  that re-ran a main script calling convert() without a `__main__` guard ->
  ConvertError saying so.
  """
  tasks = sorted(tasks, key=lambda t: -sum(it.source.size for it in t.items))
  try:
    return pool.run(shards.write_shard, tasks, num_workers, progress=progress.update,
                    size=lambda t: len(t.items), recover=shards.load_finished, log=log,
                    noun="shard")
  except pool.UnguardedMain as e:
    raise ConvertError(
        f"the worker processes re-ran {e.main}, which called convert() again: put the code "
        "that calls convert() under `if __name__ == \"__main__\":` (or use num_workers=1)"
    ) from None
  except pool.WorkersDied as e:
    raise ConvertError(
        f"a worker process {e.cause}, also when the unfinished shards were tried again; "
        f"{e.num_finished} of {e.num_tasks} shards are finished and kept: run the same "
        "command again to resume (with fewer --num_workers or a smaller --max_side if "
        "memory ran out)") from None


def _resolve_workers(n: int) -> int:
  if n:
    return n
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover - macOS
    return os.cpu_count() or 1


def run_locally(todo: list[ShardTask], opts: ConvertOptions, log) -> tuple[list, float, int, dict]:
  """Writes the unfinished shards with a local process pool (one shard per worker); a small
  job, in this process, converts each shard's images on the cores as threads."""
  if not todo:
    return [], 0.0, 0, {}
  cores = num_workers = _resolve_workers(opts.num_workers)
  if not opts.num_workers:   # default: no process pool for small jobs (start-up would dominate)
    num_workers = max(1, min(num_workers, sum(len(t.items) for t in todo) // 100))
    # ... but the cores as threads of the one process (shards._ordered_map)
    threads = min(cores // num_workers, shards.MAX_THREADS)
    todo = [dataclasses.replace(t, threads=threads) for t in todo]
  progress = Progress(sum(len(t.items) for t in todo), quiet=opts.quiet)
  results = _run_tasks(todo, num_workers, progress, log)
  return results, progress.close(), num_workers, {}
