"""Clinical evaluation of a trained run.

  python -m xraytpu.evaluate --model_dir=RUN [--data_dir=DIR] [--split=test]
      [--threshold_policy=youden|sensitivity:0.95|specificity:0.9|fixed:0.5|sensitivity:0.95:lower]
      [--temperature_scaling] [--tta=none|zoom|shift]
      [--allow_data_change]

The operating threshold is chosen on the VAL split of the run's training data,
stored in RUN/threshold.json, and applied unchanged to --split. Writes
RUN/eval/<dataset>-<split>/ (predictions.csv, report.json, report.md, plots);
see xraytpu.evaluation.evaluate_lib for the report's keys.

The run's training data must still be the data it was trained on (the digest in
RUN/config.json): converted again, e.g. with another --seed, it is refused in one
line naming the change, unless --allow_data_change (the change is then named in
the report and the model card). Any other --data_dir is evaluated as it is, and
the report counts its films that the run trained on (by content hash).
"""

from __future__ import annotations

from absl import logging

from tfrecord_tools import cli
from xraytpu.config import EvalConfig

cli.define_flags(EvalConfig)


def main(argv):
  cli.no_arguments(argv)
  opts = cli.from_flags(EvalConfig)
  from xraytpu.evaluation import evaluate_lib
  from xraytpu.run import reports
  if opts.bootstrap_resamples < 1000:
    logging.warning("--bootstrap_resamples=%d: fewer than 1000 resamples give unstable intervals",
                    opts.bootstrap_resamples)
  report = evaluate_lib.evaluate(
      opts.model_dir, data_dir=opts.data_dir, split=opts.split,
      threshold_policy=opts.threshold_policy, temperature_scaling=opts.temperature_scaling,
      n_resamples=opts.bootstrap_resamples, seed=opts.bootstrap_seed, batch_size=opts.batch_size,
      out_dir=opts.out_dir, write_plots=opts.plots, allow_data_change=opts.allow_data_change,
      tta=opts.tta, ensemble_dir=opts.ensemble_dir)
  print(reports.headline(report))
  for note in report["notes"]:
    print(f"note: {note}")
  files = report["files"]
  print(f"report: {report['report_dir']}/{files['report_md']} (numbers in {files['report_json']}, "
        "plots beside it)")


def run():
  cli.run(main, tensorflow=True)


if __name__ == "__main__":
  run()
