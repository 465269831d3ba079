"""From dataset.json + TFRecord shards to device-ready batches.

  preprocess     encoded bytes -> uint8 [S, S, C] (decode, 16-bit mapping, aspect policy);
                 shared by tf.data, previews and the exported serving function
  input_pipeline make_dataset(data_dir, split, cfg, training=...) -> tf.data.Dataset of
                 (uint8 [b, S, S, C], label): the one commented tf.data chain
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
