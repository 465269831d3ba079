"""Throughput benchmarks (images/sec), each next to the baseline it replaces.

  python -m benchmarks.convert --image_dir=DIR          conversion: ours vs a naive loop
  python -m benchmarks.input_pipeline ...               tf.data input pipeline
  python -m benchmarks.train_throughput ...             training step
  python -m benchmarks.decode_scale ...                 accuracy of DCT-scaled JPEG decoding

Each module calls the same library functions users call and prints a
side-by-side table; `--json=PATH` saves the numbers.
"""
