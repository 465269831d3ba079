r"""Train a classifier on TFRecords written by tfrecord_tools.convert.

  python -m xraytpu.train --data_dir=demo/tfrecords --model_dir=demo/run \
      --model=xray_cnn --image_size=128 --batch_size=32 --epochs=5

  # Cloud TPU VM, global batch 128 (16 per core on a v3-8):
  python -m xraytpu.train --strategy=tpu --tpu=local --data_dir=gs://b/chest \
      --model_dir=gs://b/runs/tpu_cnn --model=keras_tpu_cnn --image_size=180 \
      --batch_size=128 --steps_per_execution=32 --epochs=25

  # Settings from a file (one --flag=value per line):
  python -m xraytpu.train --flagfile=configs/chexnet.flags

Run the same command again after a crash or preemption to resume. A finished
run directory is never replaced without --overwrite. The run directory layout
is described in xraytpu/training/train_lib.py. --augment_preview=PATH writes a PNG grid
of training images before/after augmentation and exits without training.
"""

from __future__ import annotations

import sys

from absl import flags
from absl import logging

from tfrecord_tools import cli
from xraytpu import flags as xflags

xflags.define_config_flags(xflags.ALL_FIELDS)
_AUGMENT_PREVIEW = flags.DEFINE_string(
    "augment_preview", "",
    "Write a PNG grid of one training batch before/after augmentation to this path and exit "
    "(no training).")


def main(argv):
  cli.no_arguments(argv)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)
  cfg = xflags.config_from_flags(xflags.ALL_FIELDS)
  # Imported here so `--help` stays fast (TensorFlow loads in these).
  from xraytpu.training import train_lib  # noqa: PLC0415
  if _AUGMENT_PREVIEW.value:
    from xraytpu.data import preview  # noqa: PLC0415
    if not cfg.data_dir:
      raise train_lib.TrainError("--augment_preview needs --data_dir")
    path = preview.write_augment_preview(cfg.data_dir, cfg, _AUGMENT_PREVIEW.value)
    logging.info("Wrote the augmentation preview to %s", path or _AUGMENT_PREVIEW.value)
    return
  logging.debug("Config:\n%s", cfg.to_json())   # all of it is in RUN/config.json; -v=1 shows it here
  # One progress line per epoch in a log file or CI; Keras' live bar only on a terminal.
  verbose = 1 if sys.stdout.isatty() else 2
  train_lib.train_and_evaluate(cfg, verbose=verbose)   # user errors exit 2, TrainingDiverged 3 (cli)


def run():
  cli.run(main, tensorflow=True)


if __name__ == "__main__":
  run()
