"""The same film as JPEG and as DICOM: does a JPEG-trained model score it the same?

  python -m benchmarks.dicom_presentation [--image_dir=../shared/data/chest_xray_400x300 \
      --films=80 --image_size=128 --epochs=4 --model_dir=RUN --json=PATH]

  1. convert --image_dir (JPEG films; originals kept, a seeded 70/15/15 split) and train a
     model on them (or take --model_dir, a run trained on JPEG films);
  2. the first --films test films, each shown from its darkest to its brightest value (what
     a JPEG release of a film holds), stored as JPEG (quality 95) and as every storage kind
     of `tfrecord_tools.synthetic.STORAGE_KINDS` (12- to 16-bit, intercepts, a slope,
     MONOCHROME1, RLE), each with and without a window in the file (`store_dicom`);
  3. each DICOM rendered by `--dicom_window=full` (the default before `viewer`: the stored
     bit depth's whole range) and `viewer` (the default since: the file's VOI, else the
     film's own range), scored by the model beside its JPEG: the mean and largest
     |P(DICOM) - P(JPEG)| of the positive class, per kind; and beside a PNG of the same
     film (|P(DICOM) - P(PNG)|: the rendering alone, no JPEG loss). |P(PNG) - P(JPEG)| is
     the floor any lossless copy of a JPEG film meets: JPEG's own loss and the contract's
     reduced-scale JPEG decode (docs/benchmarks.md, decode scale).

tests/test_dicom_viewer.py checks the `viewer` column on the demo films (<= 0.02).
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from tfrecord_tools import synthetic

RENDERINGS = ("full", "viewer")
# Every storage kind, with and without a window in the file.
KINDS = tuple((kind, window) for kind in synthetic.STORAGE_KINDS for window in (True, False))


def define_flags() -> None:
  """The command's flags, defined when it runs (tests import this module's functions)."""
  flags.DEFINE_string("image_dir", "../shared/data/chest_xray_400x300",
                      "Class-per-folder JPEG films.")
  flags.DEFINE_string(
      "class_map", "NORMAL=Normal,PNEUMONIA=BacterialPneumonia+ViralPneumonia",
      "Converter --class_map (the default is chest_xray_400x300's binary view; '' = folders).")
  flags.DEFINE_string("model_dir", "", "A run trained on JPEG films (default: train one here).")
  flags.DEFINE_integer("films", 80, "Test films scored.")
  flags.DEFINE_integer("image_size", 128, "Model input side, pixels (when training).")
  flags.DEFINE_integer("epochs", 4, "Training epochs (when training).")
  flags.DEFINE_string("model", "xray_cnn", "Model name (when training).")
  flags.DEFINE_integer("seed", 0, "Seed of the split and of the training.")
  flags.DEFINE_string("work_dir", "", "Scratch folder (default: a temporary one, kept).")
  flags.DEFINE_string("json", "", "Also write the results here.")


def kind_name(kind: str, window: bool) -> str:
  return f"{kind}, {'window' if window else 'no window'}"


def shown(values: np.ndarray, window: bool) -> np.ndarray:
  """What a viewer shows of `store_dicom(values, ..., window=window)`, 0..255: the window
  clips to 0..1; without one, the film's own lowest to highest value."""
  unit = (np.clip(values, 0.0, 1.0) if window else
          (values - values.min()) / max(float(values.max() - values.min()), 1e-12))
  return np.rint(unit * 255.0)


def jpeg(image: np.ndarray, quality: int = 95) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def png(image: np.ndarray) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def gaps(run, films, dicom_window: str = "auto", against: str = "jpeg", kinds=KINDS
         ) -> dict[tuple[str, bool], list[float]]:
  """(kind, window) -> [|P(positive) of the DICOM - P(positive) of the JPEG| per film]
  (against="png": of a PNG of the same film; "floor": PNG against JPEG, no DICOM).

  films: float [H, W] arrays, what a viewer shows (0 black, 1 white; values past them are
  stored, and clipped by the window). dicom_window: as predict's flag (auto: the run's)."""
  from tfrecord_tools import pixels
  from xraytpu.inference import model_call, predict_lib
  module = model_call.module_of(run)
  window = pixels.dicom_window_of(run.conversion, predict_lib.parse_window(dicom_window))
  positive = len(run.classes) - 1
  out: dict[tuple[str, bool], list[float]] = {}
  for n, values in enumerate(films):
    for kind, with_window in kinds:
      image = shown(values, with_window)
      reference = png(image) if against == "png" else jpeg(image)
      other = (png(image) if against == "floor" else
               synthetic.store_dicom(values, kind, window=with_window, uid_seed=str(n)))
      images = np.stack([predict_lib.file_pixels(module, predict_lib.graph_bytes(b, window))
                         for b in (reference, other)])
      p = module.predict_batches(images)["probabilities"][:, positive]
      out.setdefault((kind, with_window), []).append(abs(float(p[1]) - float(p[0])))
  return out


def test_films(data_dir: str, count: int) -> list[np.ndarray]:
  """The first `count` test films of a converted data set, grey, each from 0 to 1."""
  from PIL import Image
  from benchmarks import stored
  films = []
  for data in stored.encoded_images(data_dir, "test")[:count]:
    f = np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.float64)
    films.append((f - f.min()) / max(float(f.max() - f.min()), 1.0))
  return films


def run(image_dir: str, work_dir: str, *, class_map: str, model_dir: str, films: int,
        image_size: int, epochs: int, model: str, seed: int) -> dict:
  from tfrecord_tools import convert as convert_lib
  from xraytpu.config import Config
  from xraytpu.run import rundir
  from xraytpu.training import train_lib

  data_dir = os.path.join(work_dir, "tfrecords")
  t0 = time.monotonic()
  convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=image_dir, output_dir=data_dir, class_map=class_map, val_fraction=0.15,
      test_fraction=0.15, seed=seed, overwrite=True, quiet=True))
  print(f"converted {image_dir} in {time.monotonic() - t0:.0f} s", flush=True)
  if not model_dir:
    model_dir = os.path.join(work_dir, "run")
    cfg = Config(data_dir=data_dir, model_dir=model_dir, model=model, image_size=image_size,
                 batch_size=32, epochs=epochs, learning_rate=3e-4, seed=seed,
                 overwrite=True).resolve_augment()
    t1 = time.monotonic()
    train_lib.train_and_evaluate(cfg, verbose=0)
    print(f"trained on the JPEG films in {time.monotonic() - t1:.0f} s", flush=True)
  loaded = rundir.load(model_dir)
  chosen = test_films(data_dir, films)
  rows = []
  columns = {r: gaps(loaded, chosen, r) for r in RENDERINGS}
  columns["viewer_vs_png"] = gaps(loaded, chosen, "viewer", against="png")
  floor = np.asarray(gaps(loaded, chosen, "viewer", against="floor", kinds=KINDS[:1])[KINDS[0]])
  for kind, window in KINDS:
    row = {"kind": kind_name(kind, window)}
    for c, g in columns.items():
      g = np.asarray(g[(kind, window)])
      row[c] = {"mean": float(g.mean()), "max": float(g.max()),
                "over_0.02": int((g > 0.02).sum())}
    rows.append(row)
  return {"args": dict(image_dir=image_dir, model_dir=model_dir, films=len(chosen),
                       image_size=loaded.size, seed=seed),
          "rows": rows,
          "png_vs_jpeg": {"mean": float(floor.mean()), "max": float(floor.max()),
                          "over_0.02": int((floor > 0.02).sum())}}


def format_table(report: dict) -> str:
  n = report["args"]["films"]
  lines = ["| storage kind | vs JPEG, before (full): mean / max (films > 0.02) | vs JPEG, after "
           "(viewer) | vs PNG of the film, after (viewer) |",
           "| --- | --- | --- | --- |"]

  def cell(c):
    return f"{c['mean']:.4f} / {c['max']:.4f} ({c['over_0.02']})"

  for r in report["rows"]:
    lines.append(f"| {r['kind']} | {cell(r['full'])} | {cell(r['viewer'])} | "
                 f"{cell(r['viewer_vs_png'])} |")
  lines.append("")
  lines.append(f"|P(DICOM) - P(JPEG)| (or P(PNG)) of the positive class over {n} test films "
               f"(model input {report['args']['image_size']} px, {report['args']['model_dir']}). "
               f"The floor, a PNG of each film against its JPEG: {cell(report['png_vs_jpeg'])}.")
  return "\n".join(lines)


def main(argv) -> None:
  F = flags.FLAGS
  from tfrecord_tools.convert import ConvertError
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not os.path.isdir(F.image_dir):
    print(f"error: --image_dir={F.image_dir} is not a folder", file=sys.stderr)
    sys.exit(2)
  work = F.work_dir or tempfile.mkdtemp(prefix="xraytpu_dicom_presentation_")
  try:
    report = run(F.image_dir, work, class_map=F.class_map, model_dir=F.model_dir, films=F.films,
                 image_size=F.image_size, epochs=F.epochs, model=F.model, seed=F.seed)
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
