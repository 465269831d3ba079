"""Test-time augmentation: the views of a batch whose model outputs InferenceModule averages.

The views and their sets are data in xraytpu.config (TTA_VIEWS, TTA_PRESETS: what
`evaluate --tta` offers); this module turns a view into pixels. A view is a square crop
box inside the S x S model input, resized back to S x S by the pixel contract's own resize
(tfrecord_tools.pixels.resize_image; an enlargement, so bilinear under every contract
version, rounded to uint8), so the model sees a film as the contract would have rendered it
zoomed or shifted: no flip, no border, no randomness (evaluate, predict, serve and the
exported graph agree exactly).
"""

from __future__ import annotations

import tensorflow as tf

from tfrecord_tools import pixels
from xraytpu import config, errors


class TTAError(errors.UserError):
  """An unknown test-time augmentation (a hand-edited threshold.json); one line for the user."""


def views_of(name: str) -> tuple[str, ...]:
  """The view names of the TTA set `name` (config.TTA_PRESETS); TTAError when unknown."""
  try:
    return config.TTA_PRESETS[name]
  except KeyError:
    raise TTAError(f"unknown test-time augmentation {name!r}: choose one of "
                   f"{', '.join(config.TTA_PRESETS)} (evaluate --tta)") from None


def crop_box(view: str, size: int) -> tuple[int, int, int]:
  """(top, left, side) in pixels of `view`'s crop box in an S x S image (side == S: the identity)."""
  fraction, dy, dx = config.TTA_VIEWS[view]
  side = min(size, max(1, int(round(fraction * size))))
  margin = size - side
  return int(round(margin * (1 + dy) / 2)), int(round(margin * (1 + dx) / 2)), side


def view(images, name: str, size: int):
  """uint8 [B, S, S, C] -> the view `name` of each image, uint8 [B, S, S, C]."""
  top, left, side = crop_box(name, size)
  if side == size:
    return images
  crop = images[:, top:top + side, left:left + side, :]
  # The contract's resize takes one image [H, W, C] and resizes each channel alike: the batch
  # goes through it at once as the channels of one image (no per-image loop in the graph).
  channels = images.shape[-1]
  stacked = tf.reshape(tf.transpose(crop, [1, 2, 0, 3]), [side, side, -1])
  out = tf.reshape(pixels.resize_image(stacked, size), [size, size, -1, channels])
  return tf.transpose(out, [2, 0, 1, 3])
