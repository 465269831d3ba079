"""Conversion throughput: tfrecord_tools.convert (1 worker, all cores) vs a naive loop.

  python -m benchmarks.convert --image_dir=../shared/data/chest_xray_400x300 [--max_side=0]
      [--image_format=keep --channels=keep --num_shards=0 --workers=0 --json=PATH]

The baseline is the way the classic ImageNet-to-GCS script works: one
process reads each file in turn, decodes it with TensorFlow to validate it
(resizing and re-encoding with TensorFlow when --max_side asks for it), builds
the tf.train.Example and appends it to a TFRecordWriter. The converter runs
the same files with the same arguments through `tfrecord_tools.convert.convert`, once
with one worker process and once with one per core (--workers, default all
cores). Files are read once beforehand so every run sees a warm page cache.
Prints a table with images/sec, the ratio to the baseline and the speed-up
of N workers over 1 (--worker_counts); --json saves it.

--rss_scales=1,10 also measures the converter's peak RSS (a fresh process
per run, its process tree sampled from /proc every 50 ms: all processes
together, the main one, the largest other one; the same shard count) on the folder and on a
folder with 10x the images (each file plus copies that differ only in
trailing bytes after the image data, so none is a duplicate and each is the
same work). A streaming converter's peak stays flat as the images grow.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from absl import app, flags

from tfrecord_tools import convert as convert_lib, pixels, records, storage


def define_flags() -> None:
  """The command's flags, defined when it runs: importing this module defines none (tests
  call its functions in-process beside other modules that define the same names)."""
  flags.DEFINE_string("image_dir", None, "Class-per-folder images to convert.")
  flags.DEFINE_integer("max_side", 0, "Resize at conversion (both methods).")
  flags.DEFINE_enum("image_format", "keep", list(pixels.IMAGE_FORMATS),
                    "Output format (both methods).")
  flags.DEFINE_enum("channels", "keep", list(pixels.CHANNELS), "Output channels.")
  flags.DEFINE_integer("num_shards", 0, "Shards per split for the converter "
                       "(0: 4 per core, so every worker has work).")
  flags.DEFINE_integer("workers", 0, "Workers of the parallel run (0: all cores).")
  flags.DEFINE_list("worker_counts", [], "Worker counts to time (default: 1 and "
                    "--workers); the speed-up is to 1 worker.")
  flags.DEFINE_list("rss_scales", [], "Also measure the converter's peak RSS on the "
                    "images repeated this many times, e.g. 1,10 (empty: skip).")
  flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
  flags.DEFINE_string("work_dir", None, "Scratch folder for the outputs "
                      "(default: a temporary folder, removed afterwards).")
  flags.mark_flag_as_required("image_dir")


def naive_convert(sources: Sequence[convert_lib.Source], classes: list[str],
                  mapping: dict[str, str], out_path: str, max_side: int,
                  image_format: str) -> tuple[int, int]:
  """The baseline: read, decode (TF), maybe resize + re-encode, write; one file at a time.

  Returns (converted, failed).
  """
  import tensorflow as tf
  converted = failed = 0
  with tf.io.TFRecordWriter(out_path) as writer:
    for s in sources:
      if s.source_class not in mapping:
        continue
      data = tf.io.gfile.GFile(s.path, "rb").read()
      try:
        img = tf.io.decode_image(data, expand_animations=False)
      except tf.errors.InvalidArgumentError:
        failed += 1
        continue
      is_jpeg = data[:2] == b"\xff\xd8"
      fmt = image_format if image_format != "keep" else ("jpeg" if is_jpeg else "png")
      h, w, c = img.shape
      encoded = data
      if max_side and max(h, w) > max_side:
        scale = max_side / max(h, w)
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
        img = tf.cast(tf.clip_by_value(tf.round(
            tf.image.resize(img, [h, w], antialias=True)), 0, 255), tf.uint8)
        encoded = None
      if encoded is None or (fmt == "png") == is_jpeg:
        encoded = (tf.io.encode_jpeg(img, quality=95) if fmt == "jpeg"
                   else tf.io.encode_png(img)).numpy()
      label = classes.index(mapping[s.source_class])
      ex = records.make_example(encoded=encoded, image_format=fmt, height=h, width=w,
                               channels=c, bit_depth=8, label=label, text=classes[label],
                               filename=s.rel)
      writer.write(ex.SerializeToString())
      converted += 1
  return converted, failed


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def scaled_folder(found, classes_dir: str, scale: int) -> int:
  """Links/copies every source `scale` times into classes_dir/<class>/ (copies get trailing bytes).

  Returns the number of images written.
  """
  n = 0
  for s in found.sources:
    folder = os.path.join(classes_dir, s.source_class)
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(s.path))
    with open(s.path, "rb") as f:
      data = f.read()
    for k in range(scale):
      # Decoders stop at the image's end marker: the pixels are the same, the sha256 differs.
      with open(os.path.join(folder, f"{stem}_x{k}{ext}"), "wb") as f:
        f.write(data + (b"\0" * k))
      n += 1
  return n


_RSS_SCRIPT = """
import json, os, sys, threading, time
from tfrecord_tools import convert as convert_lib
PAGE = os.sysconf("SC_PAGE_SIZE")

def tree_rss():
  # RSS of this process and all its descendants (the forkserver and its workers), from /proc.
  parent, rss = {}, {}
  for d in os.listdir("/proc"):
    if d.isdigit():
      try:
        with open(f"/proc/{d}/stat") as f:
          parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{d}/statm") as f:
          rss[int(d)] = int(f.read().split()[1]) * PAGE
      except (OSError, IndexError, ValueError):
        pass
  tree, todo = set(), [os.getpid()]
  while todo:
    p = todo.pop()
    tree.add(p)
    todo += [c for c, q in parent.items() if q == p and c not in tree]
  others = [rss.get(p, 0) for p in tree if p != os.getpid()]
  return sum(rss.get(p, 0) for p in tree), rss.get(os.getpid(), 0), max(others, default=0)

peak = [0, 0, 0]
done = threading.Event()
def watch():
  while not done.is_set():
    peak[:] = [max(a, b) for a, b in zip(peak, tree_rss())]
    time.sleep(0.05)
t = threading.Thread(target=watch, daemon=True)
t.start()
opts = convert_lib.ConvertOptions(**json.loads(sys.argv[1]))
m = convert_lib.convert(opts)
done.set()
t.join()
# Not ru_maxrss: Linux keeps it across exec, so it would hold the benchmark's own peak.
print(json.dumps({"converted": m["num_converted"], "tree_peak": peak[0], "main_peak": peak[1],
                  "worker_peak": peak[2]}))
"""


def peak_rss(found, work_dir: str, scales: Sequence[int], workers: int, **convert_args) -> list[dict]:
  """The converter's peak RSS (MiB) per scale of the image set, each in a fresh process."""
  out = []
  for scale in scales:
    src = os.path.join(work_dir, f"rss_x{scale}")
    n = scaled_folder(found, src, scale)
    args = dict(input_dir=src, output_dir=os.path.join(work_dir, f"rss_out_x{scale}"),
                num_workers=workers, quiet=True, max_skipped_fraction=1.0, val_fraction=0.0,
                test_fraction=0.0, **convert_args)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, json.dumps(args)], check=True,
                          capture_output=True, text=True)
    secs = time.perf_counter() - t
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    out.append({"scale": scale, "images": n, "converted": r["converted"], "workers": workers,
                "seconds": secs, "main_peak_mib": r["main_peak"] / 2**20,
                "worker_peak_mib": r["worker_peak"] / 2**20,
                "total_peak_mib": r["tree_peak"] / 2**20})
    shutil.rmtree(src, ignore_errors=True)
  return out


def run_benchmark(image_dir: str, work_dir: str, *, max_side: int = 0,
                  image_format: str = "keep", channels: str = "keep", num_shards: int = 0,
                  workers: int = 0, worker_counts: Sequence[int] = (),
                  rss_scales: Sequence[int] = ()) -> dict:
  """Runs the three methods; returns the results (rows with images_per_sec and ratio)."""
  import tensorflow as tf  # noqa: F401  (imported before timing the baseline)
  cores = _cores()
  workers = workers or cores
  num_shards = num_shards or 4 * cores
  os.makedirs(work_dir, exist_ok=True)
  found = convert_lib.find_files(image_dir)
  classes, mapping = convert_lib.resolve_classes(found, "")
  n_bytes = 0
  for s in found.sources:          # warm the page cache for every method alike
    with open(s.path, "rb") as f:
      n_bytes += len(f.read())
  n = len(found.sources)
  rows = []

  t = time.perf_counter()
  done, failed = naive_convert(found.sources, classes, mapping,
                               os.path.join(work_dir, "naive.tfrecord"), max_side, image_format)
  naive_s = time.perf_counter() - t
  rows.append({"method": "naive loop (1 process, TF decode)", "workers": 1,
               "seconds": naive_s, "converted": done, "skipped": failed})

  for w in sorted({1, workers, *worker_counts}):
    out = os.path.join(work_dir, f"ours_{w}")
    opts = convert_lib.ConvertOptions(
        input_dir=image_dir, output_dir=out, max_side=max_side, image_format=image_format,
        channels=channels, num_shards=num_shards, num_workers=w, quiet=True,
        max_skipped_fraction=1.0, val_fraction=0.0, test_fraction=0.0)
    t = time.perf_counter()
    m = convert_lib.convert(opts)
    secs = time.perf_counter() - t
    rows.append({"method": f"tfrecord_tools.convert, {w} worker{'s' if w > 1 else ''}",
                 "workers": w, "seconds": secs, "converted": m["num_converted"],
                 "skipped": m["num_skipped"]})
  one = next(r["seconds"] for r in rows if r["method"].startswith("tfrecord_tools") and r["workers"] == 1)
  for r in rows:
    r["images_per_sec"] = n / r["seconds"]
    r["vs_naive"] = naive_s / r["seconds"]
    if r["method"].startswith("tfrecord_tools"):
      r["speedup_vs_1"] = one / r["seconds"]
  rss = peak_rss(found, work_dir, rss_scales, workers, max_side=max_side,
                 image_format=image_format, channels=channels,
                 num_shards=num_shards) if rss_scales else []
  return {
      "image_dir": image_dir, "num_images": n, "megabytes": n_bytes / 2**20,
      "max_side": max_side, "image_format": image_format, "channels": channels,
      "num_shards_per_split": num_shards, "cores": cores,
      "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
      "rows": rows, "peak_rss": rss,
  }


def format_table(res: dict) -> str:
  head = (f"conversion of {res['num_images']} images ({res['megabytes']:.1f} MB) from "
          f"{res['image_dir']}\nmax_side={res['max_side']} image_format={res['image_format']} "
          f"channels={res['channels']} cores={res['cores']}")
  lines = [head, f"{'method':<38} {'images/s':>9} {'seconds':>8} {'vs naive':>9} {'vs 1 worker':>12}"]
  for r in res["rows"]:
    up = f"{r['speedup_vs_1']:.2f}x ({r['speedup_vs_1'] / r['workers']:.0%}/N)" if "speedup_vs_1" in r else "-"
    lines.append(f"{r['method']:<38} {r['images_per_sec']:>9.1f} {r['seconds']:>8.2f} "
                 f"{r['vs_naive']:>8.2f}x {up:>12}")
  for r in res.get("peak_rss", []):
    lines.append(f"peak RSS, {r['images']} images ({r['scale']}x), {r['workers']} worker(s): all "
                 f"processes {r['total_peak_mib']:.0f} MiB, main {r['main_peak_mib']:.0f} MiB, "
                 f"largest other process {r['worker_peak_mib']:.0f} MiB "
                 f"({r['converted']} converted in {r['seconds']:.1f} s)")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  F = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  work = F.work_dir or tempfile.mkdtemp(prefix="convert_bench_")
  os.makedirs(work, exist_ok=True)
  try:
    res = run_benchmark(F.image_dir, work, max_side=F.max_side,
                        image_format=F.image_format, channels=F.channels,
                        num_shards=F.num_shards, workers=F.workers,
                        worker_counts=[int(w) for w in F.worker_counts],
                        rss_scales=[int(k) for k in F.rss_scales])
  except convert_lib.ConvertError as e:
    print(f"benchmark: error: {e}", file=sys.stderr)
    sys.exit(2)
  finally:
    if not F.work_dir:
      shutil.rmtree(work, ignore_errors=True)
  print(format_table(res))
  if F.json:
    storage.write_bytes(F.json, (json.dumps(res, indent=2) + "\n").encode())


def run() -> None:
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
