"""The CNN of the Keras example "Pneumonia Classification on TPU".

Two 16-filter convolutions and a pool, four separable-convolution blocks
(32, 64, 128, 256 filters; dropout 0.2 after the last two), then dense blocks
512/128/64 with dropout 0.7/0.5/0.3 (the `keras_tpu_cnn` head). Trained from
scratch; pixels scaled to [0, 1]. Needs image_size >= 32 (five 2x pools).

Two departures from the example's defaults, neither changing the architecture:
* Separable convolutions start variance-preserving (depthwise N(0, 1/9) per
  channel, pointwise He). Keras' glorot default sizes the depthwise kernel by
  9 * channels, so every separable convolution shrank activations ~5x: after
  four blocks the pre-BN variance was ~1e-10, far below BatchNorm's epsilon
  (1e-3) and its initial moving variance (1), and predictions in inference mode
  were one constant (val AUC exactly 0.5 for many epochs).
* BatchNormalization momentum 0.9 (Keras: 0.99): with ~20 steps per epoch on a
  small data set the moving statistics used at validation then follow the
  batch statistics within an epoch or two instead of ~25 epochs.
"""

from __future__ import annotations

from xraytpu._keras import keras
from xraytpu.config import Config
from xraytpu.models import common

layers = keras.layers
MIN_SIZE = 32
BN_MOMENTUM = 0.9
# Depthwise kernel [3, 3, C, 1]: Keras' "fan_out" is 3 * 3 * 1, the true fan-in
# of each depthwise filter; the layer is linear, so scale 1.
DEPTHWISE_INIT = dict(scale=1.0, mode="fan_out", distribution="truncated_normal")


def _sepconv(filters: int, name: str):
  return layers.SeparableConv2D(
      filters, 3, activation="relu", padding="same", name=name,
      depthwise_initializer=keras.initializers.VarianceScaling(**DEPTHWISE_INIT),
      pointwise_initializer="he_normal")


def _conv_block(x, filters: int, name: str):
  x = _sepconv(filters, f"{name}_sepconv1")(x)
  x = _sepconv(filters, f"{name}_sepconv2")(x)
  x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
  return layers.MaxPool2D(name=f"{name}_pool")(x)


def build(cfg: Config, *, num_classes: int, channels: int, output_bias=None, task: str = "single_label") -> keras.Model:
  """uint8 [B, S, S, C] -> probabilities (see xraytpu.models.common)."""
  if cfg.image_size < MIN_SIZE:
    raise common.ModelError(f"--model=keras_tpu_cnn needs --image_size >= {MIN_SIZE}, got {cfg.image_size}")
  inputs, x = common.stem(cfg, channels=channels)
  x = common.ImagePreprocess("unit", name="preprocess")(x)
  x = layers.Conv2D(16, 3, activation="relu", padding="same", name="conv1")(x)
  x = layers.Conv2D(16, 3, activation="relu", padding="same", name="conv2")(x)
  x = layers.MaxPool2D(name="pool1")(x)
  x = _conv_block(x, 32, "block1")
  x = _conv_block(x, 64, "block2")
  x = _conv_block(x, 128, "block3")
  x = layers.Dropout(0.2, name="block3_dropout")(x)
  x = _conv_block(x, 256, "block4")
  x = layers.Dropout(0.2, name="block4_dropout")(x)
  return common.finish(inputs, x, cfg, default_head="keras_tpu_cnn", num_classes=num_classes,
                       output_bias=output_bias, name="keras_tpu_cnn", task=task)
