"""A small CNN trained from scratch (the pneumonia-detection article's design).

Five 3x3 convolution + 2x2 max-pool stages (32, 64, 128, 128, 256 filters,
'same' padding so small images work), then flatten, dense 128, dense 64
(the `xray_cnn` head). Pixels scaled to [0, 1]. Needs image_size >= 32.

Convolutions start He-normal (Keras' glorot default shrank the activations
~50x over the five ReLU stages, conv1 alone ~6x), and the head's dropout is
0.2 rather than the article's 0.5 (see `common.xray_cnn_head`): together they
took the model off a ~10-epoch plateau at loss ln 2 on small data sets.
"""

from __future__ import annotations

from xraytpu._keras import keras
from xraytpu.config import Config
from xraytpu.models import common

layers = keras.layers
MIN_SIZE = 32
FILTERS = (32, 64, 128, 128, 256)


def build(cfg: Config, *, num_classes: int, channels: int, output_bias=None, task: str = "single_label") -> keras.Model:
  """uint8 [B, S, S, C] -> probabilities (see xraytpu.models.common)."""
  if cfg.image_size < MIN_SIZE:
    raise common.ModelError(f"--model=xray_cnn needs --image_size >= {MIN_SIZE}, got {cfg.image_size}")
  inputs, x = common.stem(cfg, channels=channels)
  x = common.ImagePreprocess("unit", name="preprocess")(x)
  for i, filters in enumerate(FILTERS, start=1):
    x = layers.Conv2D(filters, 3, activation="relu", padding="same", kernel_initializer="he_normal",
                      name=f"conv{i}")(x)
    x = layers.MaxPool2D(name=f"pool{i}")(x)
  return common.finish(inputs, x, cfg, default_head="xray_cnn", num_classes=num_classes,
                       output_bias=output_bias, name="xray_cnn", task=task)
