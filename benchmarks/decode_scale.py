"""The accuracy effect of decoding JPEGs at reduced DCT scale, on real films.

  python -m benchmarks.decode_scale [--image_dir=../shared/data/chest_xray_400x300 \
      --image_size=128 --epochs=8 --json=PATH]

The pixel contract (`tfrecord_tools.pixels.load_image`) decodes a stored JPEG
whose shorter side is at least 2x the model's input size at 1/2, 1/4 or 1/8
scale in the DCT domain, then resizes. This measures what that costs in
accuracy, against a full-size decode + the same resize, on real data:

  1. convert --image_dir with the project's converter (originals kept, a
     seeded 70/15/15 split);
  2. pixels: every test film decoded both ways; how many take a reduced scale,
     and the mean / 99th percentile / largest absolute difference in grey
     levels of the model's input;
  3. models: the same model trained twice with the same seed, once on each
     decode (everything else equal), each evaluated on test under both
     decodes: test AUC with its bootstrap 95% CI, and, for each model, the
     paired AUC difference (reduced - full decode of the same films, with
     its bootstrap CI) and the mean / largest change of a film's probability.

The defaults (400x300 films, 128 px input) put every chest_xray_400x300 film
at 1/2 scale.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags


def define_flags() -> None:
  """The command's flags, defined when it runs: importing this module defines none (tests
  call its functions in-process beside other modules that define the same names)."""
  flags.DEFINE_string("image_dir", "../shared/data/chest_xray_400x300",
                      "Class-per-folder JPEG films.")
  flags.DEFINE_string(
    "class_map", "NORMAL=Normal,PNEUMONIA=BacterialPneumonia+ViralPneumonia",
    "Converter --class_map (the default is chest_xray_400x300's binary view; '' = folders).")
  flags.DEFINE_integer("image_size", 128, "Model input side, pixels.")
  flags.DEFINE_integer("epochs", 8, "Training epochs of each model.")
  flags.DEFINE_string("model", "xray_cnn", "Model name (xraytpu.models).")
  flags.DEFINE_integer("batch_size", 32, "Batch size.")
  flags.DEFINE_integer("seed", 0, "Seed of the split and of both trainings.")
  flags.DEFINE_string("work_dir", "", "Scratch folder (default: a temporary one, kept).")
  flags.DEFINE_string("json", "", "Also write the results here.")


DECODES = ("reduced", "full")


@contextlib.contextmanager
def decoding(which: str):
  """Inside, the pixel contract decodes JPEGs as `which` says: "reduced" is the
  contract itself; "full" decodes every image at full size before the same resize."""
  from tfrecord_tools import pixels
  if which == "reduced":
    yield
    return
  contract = pixels.load_image

  def full_size(encoded, *, channels, size, aspect="squash", forms=None,
                contract=pixels.CONTRACT_VERSION):
    image = pixels.decode_image(encoded, channels, min_side=0, forms=forms, contract=contract)
    return pixels.resize_image(image, size, aspect, contract)
  pixels.load_image = full_size
  try:
    yield
  finally:
    pixels.load_image = contract


def test_images(data_dir: str, size: int, channels: int, which: str) -> tuple[np.ndarray, list[str]]:
  """The test split's model inputs, uint8 [N, size, size, C], in manifest order."""
  from xraytpu.data import input_pipeline
  spec = input_pipeline.InputSpec(image_size=size, channels=channels, aspect="squash")
  with decoding(which):
    ds = input_pipeline.eval_dataset(data_dir, "test", spec, batch_size=64, with_filenames=True)
    images, names = [], []
    for x, _, f in ds:
      images.append(x.numpy())
      names += [n.decode() for n in f.numpy()]
  return np.concatenate(images), names


def scale_ratios(data_dir: str, size: int) -> dict[int, int]:
  """How many test records each JPEG DCT ratio decodes (1 = full size; PNGs count as 1)."""
  from benchmarks import stored
  from tfrecord_tools import pixels
  counts: dict[int, int] = {}
  for data in stored.encoded_images(data_dir, "test"):
    ratio = int(pixels.jpeg_dct_ratio(data, size))
    counts[ratio] = counts.get(ratio, 0) + 1
  return dict(sorted(counts.items()))


def run(image_dir: str, work_dir: str, *, class_map: str, image_size: int, epochs: int, model: str,
        batch_size: int, seed: int) -> dict:
  from tfrecord_tools import convert as convert_lib
  from xraytpu.evaluation import evaluate_lib, metrics
  from xraytpu.run import rundir
  from xraytpu.training import train_lib
  from xraytpu.config import Config
  from xraytpu.data import stats

  data_dir = os.path.join(work_dir, "tfrecords")
  t0 = time.monotonic()
  convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=image_dir, output_dir=data_dir, class_map=class_map, val_fraction=0.15,
      test_fraction=0.15, seed=seed, overwrite=True, quiet=True))
  print(f"converted {image_dir} in {time.monotonic() - t0:.0f} s", flush=True)
  from tfrecord_tools import schema
  manifest = schema.read_manifest(data_dir)
  channels = stats.input_channels(manifest, Config())
  ratios = scale_ratios(data_dir, image_size)
  print(f"test films by JPEG DCT ratio at {image_size} px: {ratios}", flush=True)

  reduced, names = test_images(data_dir, image_size, channels, "reduced")
  full, names_full = test_images(data_dir, image_size, channels, "full")
  assert names == names_full
  diff = np.abs(reduced.astype(np.int16) - full.astype(np.int16))
  pixels = {"mean": float(diff.mean()), "p99": float(np.percentile(diff, 99)),
            "max": int(diff.max()),
            "films_identical": int(sum(not d.any() for d in diff))}
  print(f"model inputs, reduced vs full decode: mean |diff| {pixels['mean']:.3f} grey levels, "
        f"99th percentile {pixels['p99']:.0f}, max {pixels['max']}", flush=True)

  runs = {}
  for which in DECODES:
    cfg = Config(data_dir=data_dir, model_dir=os.path.join(work_dir, f"run_{which}"), model=model,
                 image_size=image_size, batch_size=batch_size, epochs=epochs, learning_rate=3e-4,
                 seed=seed, overwrite=True).resolve_augment()
    t1 = time.monotonic()
    with decoding(which):
      train_lib.train_and_evaluate(cfg, verbose=0)
    print(f"trained on the {which} decode in {time.monotonic() - t1:.0f} s", flush=True)
    runs[which] = cfg.model_dir

  rows = []
  for trained in DECODES:
    run_ = rundir.load(runs[trained])
    probs = {}
    for which in DECODES:
      with decoding(which):
        pred = evaluate_lib.predict_split(run_, data_dir, "test")
      probs[which] = pred.probs[:, -1] if pred.probs.ndim == 2 else pred.probs
      y = (np.asarray(pred.labels) == len(run_.classes) - 1).astype(int)
      auc = metrics.roc_auc(y, probs[which])
      rows.append({"trained_on": trained, "evaluated_on": which, "auc": auc.value,
                   "auc_ci": list(auc.ci) if auc.ci else None})
      print(f"trained on {trained}, evaluated on {which}: test AUC {auc.format()}", flush=True)
    both = np.stack([probs["reduced"], probs["full"]], axis=1)
    delta = float(metrics.roc_auc(y, both[:, 0], ci=False).value
                  - metrics.roc_auc(y, both[:, 1], ci=False).value)
    ci, why = metrics.bootstrap_ci(
        lambda yy, ss: metrics.roc_auc(yy, ss[:, 0], ci=False).value
        - metrics.roc_auc(yy, ss[:, 1], ci=False).value, y, both)
    dp = np.abs(both[:, 0] - both[:, 1])
    rows[-1].update(paired_auc_difference=delta, paired_auc_difference_ci=list(ci) if ci else None,
                    mean_abs_probability_change=float(dp.mean()),
                    max_abs_probability_change=float(dp.max()))
  return {"args": dict(image_dir=image_dir, image_size=image_size, epochs=epochs, model=model,
                       batch_size=batch_size, seed=seed),
          "test_films": len(names), "dct_ratios": ratios, "pixels": pixels, "rows": rows}


def format_table(report: dict) -> str:
  lines = ["| trained on | evaluated on | test AUC (95% CI) | paired AUC difference, reduced - full "
           "(95% CI) | film probability change, mean / max |",
           "| --- | --- | --- | --- | --- |"]
  for r in report["rows"]:
    ci = f" ({r['auc_ci'][0]:.3f}-{r['auc_ci'][1]:.3f})" if r["auc_ci"] else ""
    paired = change = ""
    if "paired_auc_difference" in r:
      pci = r["paired_auc_difference_ci"]
      paired = f"{r['paired_auc_difference']:+.4f}" + (f" ({pci[0]:+.4f} to {pci[1]:+.4f})" if pci else "")
      change = f"{r['mean_abs_probability_change']:.4f} / {r['max_abs_probability_change']:.4f}"
    lines.append(f"| {r['trained_on']} | {r['evaluated_on']} | {r['auc']:.3f}{ci} | {paired} | {change} |")
  p = report["pixels"]
  lines.append("")
  lines.append(f"{report['test_films']} test films; JPEG DCT ratio used: {report['dct_ratios']}; model "
               f"inputs differ by {p['mean']:.3f} grey levels on average (99th percentile {p['p99']:.0f}, "
               f"max {p['max']}); {p['films_identical']} films identical.")
  return "\n".join(lines)


def main(argv) -> None:
  F = flags.FLAGS
  from tfrecord_tools.convert import ConvertError
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not os.path.isdir(F.image_dir):
    print(f"error: --image_dir={F.image_dir} is not a folder", file=sys.stderr)
    sys.exit(2)
  work = F.work_dir or tempfile.mkdtemp(prefix="xraytpu_decode_scale_")
  try:
    report = run(F.image_dir, work, class_map=F.class_map, image_size=F.image_size,
                 epochs=F.epochs, model=F.model, batch_size=F.batch_size,
                 seed=F.seed)
  except ConvertError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print()
  print(format_table(report))
  print(f"(work folder: {work})")
  if F.json:
    from tfrecord_tools import storage
    storage.write_bytes(F.json, (json.dumps(report, indent=2) + "\n").encode())
    print(f"wrote {F.json}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
