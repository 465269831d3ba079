"""Predict images with a trained run.

  python -m xraytpu.predict --model_dir=RUN PATH... [--output=FILE.csv|FILE.jsonl]
      [--gradcam=DIR] [--dicom_window=auto|viewer|full|file|none|CENTER,WIDTH|lung|...]
      [--max_pixels=50000000]

PATH: PNG/JPEG files (8- or 16-bit), folders (walked), DICOM files (rendered
as the run's training data was, unless --dicom_window says otherwise). Every
file's size is read from its header and held against --max_pixels before it
is decoded. Prints one line per input, e.g. "x.png<TAB>PNEUMONIA 0.93 (threshold 0.41)",
using the threshold evaluate froze in RUN/threshold.json. Inputs that cannot
be read are reported per file on stderr; the others are still predicted. Exit
status: 0 all predicted, 1 some inputs failed, 2 a usage error.
"""

from __future__ import annotations

import sys

from tfrecord_tools import cli
from xraytpu.config import PredictConfig

cli.define_flags(PredictConfig)


def main(argv):
  opts = cli.from_flags(PredictConfig)
  from xraytpu.inference import predict_lib
  failed = predict_lib.run_predict(opts.model_dir, argv[1:], dicom_window=opts.dicom_window,
                                   output=opts.output or None, gradcam_dir=opts.gradcam or None,
                                   batch_size=opts.batch_size, max_pixels=opts.max_pixels,
                                   ensemble_dir=opts.ensemble_dir)
  sys.exit(1 if failed else 0)


def run():
  cli.run(main, tensorflow=True)


if __name__ == "__main__":
  run()
