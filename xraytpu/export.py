"""Export a trained run as a SavedModel for TensorFlow Serving.

  python -m xraytpu.export --model_dir=RUN [--version=N] [--export_dir=DIR]

Writes RUN/export/<N>/ (N = next free integer) whose serving signature takes
encoded PNG/JPEG bytes and returns class probabilities; see
xraytpu.inference.export_lib for the signatures and layout.
"""

from __future__ import annotations

from tfrecord_tools import cli
from xraytpu.config import ExportConfig

cli.define_flags(ExportConfig)


def main(argv):
  cli.no_arguments(argv)
  opts = cli.from_flags(ExportConfig)
  from xraytpu.inference import export_lib
  path = export_lib.export(opts.model_dir, version=opts.version, export_dir=opts.export_dir,
                           ensemble_dir=opts.ensemble_dir)
  meta = export_lib.load_metadata(path)
  print(f"SavedModel written to {path}")
  print(f"  classes {meta['classes']}, input {meta['image_size']}x{meta['image_size']}x"
        f"{meta['channels']} ({meta['aspect']}), threshold {meta['threshold']}")
  print("  load it with tf.saved_model.load(path).signatures['serving_default']"
        "(image_bytes=tf.constant([png_or_jpeg_bytes]))")


def run():
  cli.run(main, tensorflow=True)


if __name__ == "__main__":
  run()
