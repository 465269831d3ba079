"""The results tables of docs/results.md: convert -> train -> evaluate on the real data sets.

  python -m benchmarks.real_data --data_root=../shared/data --work_dir=/tmp/xraytpu-real [--json=PATH]
  python -m benchmarks.real_data --only=chest_xray_multilabel     # the multi-label row alone

The multi-label row is a CheXpert-layout CSV view of chest_xray_400x300 (written
into --work_dir by `write_chest_xray_labels`): findings Pneumonia, Bacterial,
Viral and COVID-19, one column each (COVID-19 films are viral pneumonias). It
is converted with --labels_csv, trained with K sigmoids and evaluated per finding,
with a threshold per finding chosen on val.

Each row runs the same library functions the entry points call (no shortcuts):
tfrecord_tools.convert.convert, xraytpu.training.train_lib.train_and_evaluate and
xraytpu.evaluation.evaluate_lib.evaluate (threshold chosen on val by Youden's J, applied
to test). Prints one markdown table: data set, model, image size, epochs,
test AUC with its bootstrap 95% CI, sensitivity, specificity, wall time.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from benchmarks.real_data_views import write_chest_xray_labels


def define_flags() -> None:
  """The command's flags, defined when it runs: importing this module defines none (tests
  call its functions in-process beside other modules that define the same names)."""
  flags.DEFINE_string("data_root", "../shared/data", "Folder holding the real data sets.")
  flags.DEFINE_string("work_dir", "/tmp/xraytpu-real", "Where TFRecords and runs are written.")
  flags.DEFINE_list("only", [], "Run only these rows (names below).")
  flags.DEFINE_string("json", "", "Also write the rows as JSON here.")


# name, folder, converter arguments, training arguments. Small images and few
# epochs: every row fits in minutes on 2 CPU cores.
ROWS = (
    ("chest_xray_binary", "chest_xray_400x300",
     dict(class_map="NORMAL=Normal,PNEUMONIA=BacterialPneumonia+ViralPneumonia",
          val_fraction=0.15, test_fraction=0.15, max_side=128),
     dict(model="xray_cnn", image_size=64, batch_size=32, epochs=10, learning_rate=3e-4)),
    ("covid_ct", "covid_ct", dict(max_side=256),
     dict(model="xray_cnn", image_size=96, batch_size=16, epochs=15, learning_rate=3e-4)),
    ("chest_xray_multilabel", "chest_xray_400x300",
     dict(labels_csv="{labels_csv}", val_fraction=0.15, test_fraction=0.15, max_side=128),
     dict(model="xray_cnn", image_size=64, batch_size=32, epochs=10, learning_rate=3e-4)),
)

def run_row(name, folder, convert_args, train_args, data_root, work_dir) -> dict:
  from tfrecord_tools import convert as convert_lib
  from xraytpu.evaluation import evaluate_lib
  from xraytpu.training import train_lib
  from xraytpu.config import Config

  t0 = time.monotonic()
  data_dir = os.path.join(work_dir, name, "tfrecords")
  if convert_args.get("labels_csv") == "{labels_csv}":
    convert_args = dict(convert_args, labels_csv=write_chest_xray_labels(
        os.path.join(data_root, folder), os.path.join(work_dir, name, "labels.csv")))
  convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=os.path.join(data_root, folder), output_dir=data_dir, overwrite=True, quiet=True,
      **convert_args))
  cfg = Config(data_dir=data_dir, model_dir=os.path.join(work_dir, name, "run"), overwrite=True,
               **train_args).resolve_augment()
  train_lib.train_and_evaluate(cfg, verbose=0)
  report = evaluate_lib.evaluate(cfg.model_dir, split="test", threshold_policy="youden", write_plots=False)
  return dict(dataset=name, model=cfg.model, image_size=cfg.image_size, epochs=cfg.epochs,
              num_test=report["num_examples"], auc=report["auc"], auc_ci=report["auc_ci"],
              sensitivity=report["sensitivity"], specificity=report["specificity"],
              threshold=report["threshold"], seconds=time.monotonic() - t0,
              per_finding=report.get("per_finding"))


def finding_table(row: dict) -> str:
  """Per-finding AUCs of a multi-label row (thresholds chosen on val, Youden)."""
  out = ["| finding | test AUC (95% CI) | threshold | sensitivity | specificity | positives / negatives |",
         "| --- | --- | --- | --- | --- | --- |"]
  for f, d in row["per_finding"].items():
    lo, hi = d["auc_ci"]
    out.append(f"| {f} | {d['auc']:.3f} ({lo:.3f}-{hi:.3f}) | {d['threshold']:.3f} | "
               f"{d['sensitivity']:.3f} | {d['specificity']:.3f} | {d['positives']} / {d['negatives']} |")
  return "\n".join(out)


def table(rows: list[dict]) -> str:
  out = ["| data set | model | image size | epochs | test images | test AUC (95% CI) | sensitivity | specificity | time (2 CPU cores) |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lo, hi = r["auc_ci"]
    out.append(f"| {r['dataset']} | {r['model']} | {r['image_size']} | {r['epochs']} | {r['num_test']} | "
               f"{r['auc']:.3f} ({lo:.3f}-{hi:.3f}) | {r['sensitivity']:.3f} | {r['specificity']:.3f} | "
               f"{r['seconds'] / 60:.1f} min |")
  return "\n".join(out)


def main(argv):
  F = flags.FLAGS
  del argv
  if not os.path.isdir(F.data_root):
    raise app.UsageError(f"--data_root={F.data_root} is not a folder")
  rows = []
  for name, folder, convert_args, train_args in ROWS:
    if F.only and name not in F.only:
      continue
    print(f"== {name}: converting, training, evaluating ...", flush=True)
    rows.append(run_row(name, folder, convert_args, train_args, F.data_root, F.work_dir))
    print(table(rows[-1:]), flush=True)
  print("\n" + table(rows))
  for r in rows:
    if r.get("per_finding"):
      print(f"\n{r['dataset']}: macro AUC over {len(r['per_finding'])} findings, per finding:")
      print(finding_table(r))
  if F.json:
    with open(F.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
