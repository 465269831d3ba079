r"""Images/sec per worker of multi-worker training, 1 vs N local worker processes.

  python -m benchmarks.multi_worker_scaling [--data_dir=DIR] [--workers=1,2] \
      [--model=xray_cnn --image_size=64 --per_worker_batch=16 --epochs=3] [--json=PATH]

For each worker count N the benchmark runs what a user runs:
`launch/multi_worker.sh --num_workers=N -- <xraytpu.train flags>`, i.e. N
`python -m xraytpu.train --strategy=multi_worker` processes on 127.0.0.1 with
their own TF_CONFIG (MultiWorkerMirroredStrategy, gradients all-reduced every
step). Weak scaling: each worker keeps --per_worker_batch, so the global batch
is N x that. Throughput comes from the chief's history.csv (`images_per_sec`,
written by train_lib for each epoch); the first epoch (graph tracing, cache
fill) is dropped and the others averaged.

Without --data_dir a synthetic set (tfrecord_tools.synthetic, 64 px PNGs) is
generated and converted into a temporary folder. On one machine the workers
share its cores, so per-worker images/sec falls with N here by construction:
the number that matters on real hardware is per-worker images/sec on N
machines against 1 (efficiency = that ratio; 1.0 is perfect scaling).
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from absl import app, flags

from xraytpu.run import rundir

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "multi_worker.sh"


def define_flags() -> None:
  """The command's flags, defined when it runs: importing this module defines none (tests
  call its functions in-process beside other modules that define the same names)."""
  flags.DEFINE_string("data_dir", "", "Converted data set (dataset.json + shards); "
                      "default: a synthetic one in a temporary folder.")
  flags.DEFINE_integer("num_images", 600, "Synthetic set size (without --data_dir).")
  flags.DEFINE_string("workers", "1,2", "Worker counts to compare, comma-separated.")
  flags.DEFINE_string("model", "xray_cnn", "Architecture (xraytpu.models.MODELS).")
  flags.DEFINE_integer("image_size", 64, "Image side in pixels.")
  flags.DEFINE_integer("per_worker_batch", 16, "Batch per worker (global = N x this).")
  flags.DEFINE_integer("epochs", 3, "Epochs per run (the first is not measured).")
  flags.DEFINE_integer("steps_per_execution", 2, "Steps per compiled call. > 1 also makes "
                       "train_lib pass validation_steps, which tf_keras requires for a "
                       "distributed validation set under MultiWorkerMirroredStrategy.")
  flags.DEFINE_integer("timeout_s", 1200, "Give up on one run after this long.")
  flags.DEFINE_string("json", "", "Also write the results here.")


class BenchmarkError(ValueError):
  """A bad flag or a failed run: one line."""


def synthetic_data(root: str, num_images: int) -> str:
  """A small converted data set under `root`; returns its folder."""
  from tfrecord_tools import convert as convert_lib, synthetic
  images, out = os.path.join(root, "images"), os.path.join(root, "tfrecords")
  synthetic.generate(images, num_images=num_images, size=64, seed=0, with_splits=True)
  convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=images, output_dir=out, num_shards=8, num_workers=1, quiet=True))
  return out


def run_workers(n: int, data_dir: str, run_dir: str, *, model: str, image_size: int,
                per_worker_batch: int, epochs: int, steps_per_execution: int,
                timeout_s: int) -> dict:
  """Trains with N local workers; returns their throughput from the chief's history.csv."""
  train_flags = [f"--data_dir={data_dir}", f"--model_dir={run_dir}", f"--model={model}",
                 f"--image_size={image_size}", f"--batch_size={per_worker_batch * n}",
                 f"--epochs={epochs}", f"--steps_per_execution={steps_per_execution}",
                 "--augment=none", "--overwrite"]
  log_dir = run_dir + "-logs"
  t0 = time.monotonic()
  proc = subprocess.run(["bash", str(LAUNCHER), f"--num_workers={n}", f"--log_dir={log_dir}",
                         f"--python={sys.executable}", "--", *train_flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
  if proc.returncode != 0:
    raise BenchmarkError(f"{n} worker(s) failed (logs in {log_dir}): "
                         + (proc.stdout + proc.stderr).strip().splitlines()[-1])
  rows = rundir.read_history(run_dir)
  rates = [float(r["images_per_sec"]) for r in rows]
  steady = rates[1:] or rates
  total = statistics.mean(steady)
  return {"workers": n, "global_batch": per_worker_batch * n, "epochs": len(rows),
          "images_per_sec": round(total, 1), "images_per_sec_per_worker": round(total / n, 1),
          "first_epoch_images_per_sec": round(rates[0], 1),
          "wall_s": round(time.monotonic() - t0, 1)}


def format_table(results: Sequence[dict]) -> str:
  base = results[0]["images_per_sec_per_worker"]
  lines = [f"{'workers':>7} {'global batch':>12} {'img/s':>9} {'img/s/worker':>12} "
           f"{'efficiency':>10} {'wall s':>7}"]
  for r in results:
    eff = r["images_per_sec_per_worker"] / base if base else float("nan")
    lines.append(f"{r['workers']:>7} {r['global_batch']:>12} {r['images_per_sec']:>9.1f} "
                 f"{r['images_per_sec_per_worker']:>12.1f} {eff:>10.2f} {r['wall_s']:>7.1f}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  F = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    counts = [int(w) for w in F.workers.split(",") if w.strip()]
  except ValueError:
    raise app.UsageError(f"--workers takes integers, got {F.workers!r}") from None
  if not counts or min(counts) < 1:
    raise app.UsageError("--workers needs positive worker counts, e.g. 1,2")
  results = []
  with tempfile.TemporaryDirectory(prefix="xraytpu-mw-bench-") as tmp:
    data_dir = F.data_dir or synthetic_data(tmp, F.num_images)
    for n in counts:
      try:
        r = run_workers(n, data_dir, os.path.join(tmp, f"run-{n}"), model=F.model,
                        image_size=F.image_size, per_worker_batch=F.per_worker_batch,
                        epochs=F.epochs, steps_per_execution=F.steps_per_execution,
                        timeout_s=F.timeout_s)
      except (BenchmarkError, subprocess.TimeoutExpired) as e:
        print(f"multi_worker_scaling: error: {e}", file=sys.stderr)
        sys.exit(1)
      print(f"{n} worker(s): {r['images_per_sec']:.1f} img/s, "
            f"{r['images_per_sec_per_worker']:.1f} per worker", flush=True)
      results.append(r)
  print(f"\n{F.model} {F.image_size}px, {F.per_worker_batch} per worker, "
        f"{os.cpu_count()} CPU cores shared by all workers")
  print(format_table(results))
  if F.json:
    pathlib.Path(F.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
  define_flags()
  app.run(main)
