"""Pieces every architecture shares: the stem, the heads, the output layer.

Every model built here has the same contract:

  input   "image": uint8 [B, S, S, C] raw pixels (C = 1 grayscale or 3 RGB), exactly
          what `xraytpu.data.input_pipeline`'s datasets yield;
  stem    uint8 -> float32 [0, 255] -> augmentation (training only, on the device)
          -> the architecture's pixel scaling (and 1 -> 3 channels for ImageNet
          backbones, with the backbone's own normalisation);
  body    convolutions; its last feature map passes through a layer named
          "features" (a linear Activation), the handle Grad-CAM uses;
  head    pooling/flatten + dense/dropout, chosen by --head;
  output  "probabilities": float32 even under mixed precision;
          binary task -> [B, 1] sigmoid (bias = log(pos/neg) from the manifest),
          K > 2 classes -> [B, K] softmax (bias = log class priors),
          multi-label task (K findings) -> [B, K] independent sigmoids
          (bias = logit of each finding's prevalence among labelled entries).

The stem and the output layer are built under a float32 policy so augmentation
and the final activation stay in float32 when the global policy is
mixed_bfloat16 / mixed_float16.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import tensorflow as tf

from xraytpu import errors
from xraytpu._keras import keras
from xraytpu.config import Config
from xraytpu.data import augment as augment_lib
from xraytpu.data import stats

layers = keras.layers


class ModelError(errors.UserError):
  """A model cannot be built with these settings (one line for the user)."""


# ---------------------------------------------------------------------------
# Pixel scaling
# ---------------------------------------------------------------------------

# ImageNet statistics used by the Keras applications' `preprocess_input`.
_IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
_IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="xraytpu")
class ImagePreprocess(layers.Layer):
  """Maps float pixels in [0, 255] to what an architecture was trained on.

  modes (the Keras applications' `preprocess_input` modes, plus two):
    "unit"   x / 255                      -> [0, 1]      (from-scratch CNNs)
    "tf"     x / 127.5 - 1                -> [-1, 1]     (InceptionV3, Xception)
    "torch"  (x / 255 - mean) / std, RGB                  (DenseNet)
    "caffe"  RGB -> BGR, x - mean (BGR)                   (ResNet50)
    "none"   unchanged, [0, 255]          (EfficientNet normalises inside)
  Input [B, H, W, C]; "torch"/"caffe" need C = 3.
  """

  MODES = ("unit", "tf", "torch", "caffe", "none")

  def __init__(self, mode: str = "unit", **kwargs):
    super().__init__(**kwargs)
    if mode not in self.MODES:
      raise ValueError(f"ImagePreprocess mode must be one of {self.MODES}, got {mode!r}")
    self.mode = mode

  def call(self, x):
    x = tf.cast(x, self.compute_dtype)
    if self.mode == "unit":
      return x * (1.0 / 255.0)
    if self.mode == "tf":
      return x * (1.0 / 127.5) - 1.0
    if self.mode == "torch":
      mean = tf.constant(_IMAGENET_MEAN_RGB, self.compute_dtype)
      std = tf.constant(_IMAGENET_STD_RGB, self.compute_dtype)
      return (x * (1.0 / 255.0) - mean) / std
    if self.mode == "caffe":
      return x[..., ::-1] - tf.constant(_CAFFE_MEAN_BGR, self.compute_dtype)
    return x

  def get_config(self):
    return {**super().get_config(), "mode": self.mode}


@contextlib.contextmanager
def float32_policy():
  """Builds layers with the float32 policy whatever the global policy is."""
  old = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("float32")
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(old)


# ---------------------------------------------------------------------------
# Stem
# ---------------------------------------------------------------------------

def stem(cfg: Config, *, channels: int) -> tuple[keras.KerasTensor, tf.Tensor]:
  """Input and augmented float pixels.

  Returns (inputs: uint8 [B, S, S, channels] named "image",
           x: float32 [B, S, S, channels] in [0, 255], augmented when training).
  """
  if channels not in (1, 3):
    raise ModelError(f"channels must be 1 or 3, got {channels}")
  size = cfg.image_size
  inputs = keras.Input(shape=(size, size, channels), dtype="uint8", name="image")
  with float32_policy():
    x = layers.Rescaling(1.0, name="to_float")(inputs)  # casts uint8 -> float32, values kept
    augmentation = augment_lib.build_augmentation(cfg)
    if augmentation is not None:
      x = augmentation(x)
  return inputs, x


def to_rgb(x: tf.Tensor) -> tf.Tensor:
  """[B, H, W, 1] -> [B, H, W, 3] by repeating the gray channel; RGB passes through."""
  if x.shape[-1] == 3:
    return x
  return layers.Concatenate(axis=-1, name="gray_to_rgb")([x, x, x])


FEATURES_LAYER = "features"   # the last feature map: Grad-CAM's handle, and where the backbone ends


def features(x: tf.Tensor) -> tf.Tensor:
  """Marks the last feature map (Grad-CAM reads `model.get_layer(FEATURES_LAYER)`)."""
  return layers.Activation("linear", name=FEATURES_LAYER)(x)


def body_layers(model: keras.Model) -> list:
  """The backbone: the model's layers up to and including FEATURES_LAYER (stem and body, a
  nested keras.applications backbone included). The layers after it, the head and the
  output, depend on the task; these do not (what --init_from copies, and what
  --fine_tune_at indexes in a model without a nested backbone)."""
  names = [layer.name for layer in model.layers]
  if FEATURES_LAYER not in names:
    raise ModelError(f"model {model.name!r} has no {FEATURES_LAYER!r} layer: not an xraytpu model")
  return model.layers[:names.index(FEATURES_LAYER) + 1]


def set_body_trainable(model: keras.Model, trainable: bool) -> None:
  """Freezes (False) or unfreezes the backbone (`body_layers`); the head stays trainable."""
  for layer in body_layers(model):
    layer.trainable = trainable


# ---------------------------------------------------------------------------
# Heads: feature map [B, h, w, c] -> vector [B, d]
# ---------------------------------------------------------------------------

def _rate(cfg: Config, seed_rate: float) -> float:
  return seed_rate if cfg.dropout < 0 else cfg.dropout


def _dense_bn_dropout(x, units: int, rate: float, name: str, bn_momentum: float = 0.99):
  x = layers.Dense(units, activation="relu", name=f"{name}_dense")(x)
  x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn")(x)
  return layers.Dropout(rate, name=f"{name}_dropout")(x)


def inception_head(x, cfg: Config):
  """The InceptionV3 seed: global pool, BN, dropout 0.7, dense 256, BN, dropout 0.7."""
  x = layers.GlobalAveragePooling2D(name="head_pool")(x)
  x = layers.BatchNormalization(name="head_bn0")(x)
  x = layers.Dropout(_rate(cfg, 0.7), name="head_dropout0")(x)
  return _dense_bn_dropout(x, 256, _rate(cfg, 0.7), "head1")


def xception_head(x, cfg: Config):
  """The Xception seed: dropout, flatten, dropout, dense 16."""
  x = layers.Dropout(_rate(cfg, 0.5), name="head_dropout0")(x)
  x = layers.Flatten(name="head_flatten")(x)
  x = layers.Dropout(_rate(cfg, 0.5), name="head_dropout1")(x)
  return layers.Dense(16, activation="relu", name="head_dense")(x)


def simple_head(x, cfg: Config):
  """Global average pool + dropout (the Keras applications' own top, CheXNet)."""
  x = layers.GlobalAveragePooling2D(name="head_pool")(x)
  return layers.Dropout(_rate(cfg, 0.2), name="head_dropout")(x)


def keras_tpu_cnn_head(x, cfg: Config):
  """The Keras TPU example: flatten, dense blocks 512/128/64 with dropout 0.7/0.5/0.3.

  BatchNorm momentum 0.9 as in the keras_tpu_cnn body (see its docstring): a
  from-scratch head on a small data set has few steps per epoch.
  """
  x = layers.Flatten(name="head_flatten")(x)
  for i, (units, rate) in enumerate(((512, 0.7), (128, 0.5), (64, 0.3))):
    x = _dense_bn_dropout(x, units, _rate(cfg, rate), f"head{i}", bn_momentum=0.9)
  return x


def xray_cnn_head(x, cfg: Config):
  """The pneumonia article's CNN: flatten, dense 128, dense 64, dropout after each.

  Dropout 0.2 (the article: 0.5). The ReLU features here are all positive with
  a large common part, so dropout 0.5 put noise on the logit far larger than
  the per-image signal (and acted as a strong L2 penalty): the model sat at the
  prior, loss ln 2, for ~10 epochs on small data sets. --dropout=0.5 restores it.
  """
  x = layers.Flatten(name="head_flatten")(x)
  x = layers.Dense(128, activation="relu", name="head_dense0")(x)
  x = layers.Dropout(_rate(cfg, 0.2), name="head_dropout0")(x)
  x = layers.Dense(64, activation="relu", name="head_dense1")(x)
  return layers.Dropout(_rate(cfg, 0.2), name="head_dropout1")(x)


HEADS: dict[str, Callable] = {
    "inception": inception_head,
    "xception": xception_head,
    "simple": simple_head,
    "keras_tpu_cnn": keras_tpu_cnn_head,
    "xray_cnn": xray_cnn_head,
}


def head(x, cfg: Config, default: str):
  name = default if cfg.head == "default" else cfg.head
  if name not in HEADS:
    raise ModelError(f"--head={cfg.head}: unknown head (choose default, {', '.join(HEADS)})")
  return HEADS[name](x, cfg)


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def output_layer(x, *, num_classes: int, output_bias=None, task: str = stats.SINGLE_LABEL):
  """Probabilities in float32.

  Single-label: [B, 1] sigmoid for 2 classes, [B, K] softmax for K > 2.
  Multi-label (task "multi_label", num_classes = K >= 1 findings): [B, K] sigmoids.
  `output_bias`: [1] log(pos/neg) (binary), [K] log-priors (softmax) or [K]
  logit(prevalence) (multi-label), or None for zeros. Starting from the prior
  makes the first epochs of an imbalanced task sane.
  """
  if task not in stats.TASKS:
    raise ModelError(f"task must be one of {', '.join(stats.TASKS)}, got {task!r}")
  multi_label = task == stats.MULTI_LABEL
  if num_classes < (1 if multi_label else 2):
    raise ModelError(f"need at least {1 if multi_label else 2} "
                     f"{'finding' if multi_label else 'classes'}, got {num_classes}")
  units = num_classes if multi_label or num_classes > 2 else 1
  init = "zeros"
  if output_bias is not None:
    bias = np.asarray(output_bias, dtype=np.float32).reshape(-1)
    if bias.shape != (units,):
      raise ModelError(f"output_bias has shape {bias.shape}, expected ({units},) for {num_classes} "
                       f"{'findings' if multi_label else 'classes'}")
    init = keras.initializers.Constant(bias.tolist())
  activation = "sigmoid" if multi_label or units == 1 else "softmax"
  with float32_policy():
    return layers.Dense(units, activation=activation, bias_initializer=init,
                        name="probabilities")(x)


def finish(inputs, feature_map, cfg: Config, *, default_head: str, num_classes: int,
           output_bias, name: str, task: str = stats.SINGLE_LABEL) -> keras.Model:
  """features -> head -> output; returns the keras.Model."""
  x = head(features(feature_map), cfg, default_head)
  outputs = output_layer(x, num_classes=num_classes, output_bias=output_bias, task=task)
  return keras.Model(inputs, outputs, name=name)


def count_params(model: keras.Model) -> dict[str, int]:
  """{"total", "trainable", "non_trainable"} parameter counts."""
  trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
  non_trainable = int(sum(np.prod(v.shape) for v in model.non_trainable_weights))
  return {"total": trainable + non_trainable, "trainable": trainable, "non_trainable": non_trainable}
