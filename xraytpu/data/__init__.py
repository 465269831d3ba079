"""From dataset.json + TFRecord shards to device-ready batches.

  (pixels)       the pixel contract lives in tfrecord_tools.pixels: encoded bytes -> uint8
                 [S, S, C], shared by the converter, tf.data, predict, serve and the export
  input_pipeline InputSpec (what the model sees + pipeline settings, from_config(cfg, manifest));
                 train_dataset(data_dir, spec, ...) / eval_dataset(data_dir, split, spec, ...)
                 -> tf.data.Dataset of (uint8 [b, S, S, C], label): the one commented tf.data chain
  stats          class weights, initial output bias, steps per epoch, input channels,
                 all from the manifest's counts (records are never scanned)
  augment        keras layers that augment inside the model, on the device, in training only
  preview        a PNG grid of one batch before/after augmentation

Importing this package is cheap: the submodules import TensorFlow themselves.
"""

from __future__ import annotations

from xraytpu import errors


class DataError(errors.UserError):
  """The data set cannot serve the request (e.g. fewer examples than one batch).

  A user mistake, not a bug: entry points print the message and exit non-zero.
  """
