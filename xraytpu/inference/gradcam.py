"""Grad-CAM heat maps (Selvaraju et al. 2017) for xraytpu models.

Which part of the film drove the score? Grad-CAM weights each channel of the
last convolutional feature map by the mean gradient of the class score and
keeps the positive part:

  cam[h, w] = relu(sum_c mean_hw(d score / d A[h, w, c]) * A[h, w, c])

  feature map A:  the layer named "features" (every xraytpu architecture marks
                  its last feature map with it, see xraytpu.models.common); for
                  other models, the last top-level layer with a 4-D output.
  score:          the pre-activation logit of the explained class, computed from
                  the input of the "probabilities" Dense layer (saturated
                  sigmoid/softmax outputs would give vanishing gradients);
                  binary models explain the positive logit z for the positive
                  class and -z for the negative class.

Input: uint8 [B, S, S, C] (the model's input). Output: float32 [B, S, S] in
[0, 1] (upsampled bilinearly), plus `overlay` to blend it onto the image.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from xraytpu._keras import keras
from xraytpu.models import common
from xraytpu.run import rundir

FEATURES_LAYER = common.FEATURES_LAYER
OUTPUT_LAYER = "probabilities"


def _feature_layer(model: keras.Model):
  try:
    return model.get_layer(FEATURES_LAYER)
  except ValueError:
    pass
  for layer in reversed(model.layers):
    shape = layer.output_shape if hasattr(layer, "output_shape") else None
    if isinstance(shape, tuple) and len(shape) == 4 and not isinstance(layer, keras.layers.InputLayer):
      return layer
  raise ValueError(f"model {model.name!r} has no 4-D feature map to explain")


class GradCam:
  """Grad-CAM for one model; build once, call on batches."""

  def __init__(self, model: keras.Model):
    feature_layer = _feature_layer(model)
    outputs = [feature_layer.output]
    self._dense = None
    try:
      out_layer = model.get_layer(OUTPUT_LAYER)
    except ValueError:
      out_layer = None
    if isinstance(out_layer, keras.layers.Dense):
      self._dense = out_layer
      outputs.append(out_layer.input)  # the pre-activation is input @ kernel + bias
    else:
      outputs.append(model.output)
    self._model = keras.Model(model.inputs, outputs)
    self._binary = int(model.output.shape[-1]) == 1

  def _logits(self, head_out):
    if self._dense is None:  # fall back to log-probabilities
      p = tf.clip_by_value(tf.cast(head_out, tf.float32), rundir.PROB_CLIP, 1 - rundir.PROB_CLIP)
      if self._binary:
        return tf.math.log(p) - tf.math.log1p(-p)
      return tf.math.log(p)
    kernel = tf.cast(self._dense.kernel, tf.float32)
    z = tf.matmul(tf.cast(head_out, tf.float32), kernel)
    if self._dense.use_bias:
      z = z + tf.cast(self._dense.bias, tf.float32)
    return z

  def __call__(self, images, class_index) -> np.ndarray:
    """images uint8 [B, S, S, C]; class_index int [B] (for binary: 1 = positive, 0 = negative).

    Returns float32 [B, S, S] heat maps in [0, 1] (all zeros where no
    positive evidence was found).
    """
    images = tf.convert_to_tensor(images)
    idx = tf.convert_to_tensor(np.asarray(class_index, dtype=np.int32).reshape(-1))
    with tf.GradientTape() as tape:
      fmap, head_out = self._model(images, training=False)
      fmap = tf.cast(fmap, tf.float32)
      tape.watch(fmap)
      z = self._logits(head_out)
      if self._binary:
        sign = tf.where(idx > 0, 1.0, -1.0)
        score = z[:, 0] * sign
      else:
        score = tf.gather(z, idx, batch_dims=1)
    grads = tape.gradient(score, fmap)  # [B, h, w, c]
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * fmap, axis=-1))  # [B, h, w]
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    cam = tf.math.divide_no_nan(cam, peak)
    size = images.shape[1:3]
    cam = tf.image.resize(cam[..., None], size, method="bilinear")[..., 0]
    return np.clip(cam.numpy(), 0.0, 1.0).astype(np.float32)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45, min_side: int = 256) -> np.ndarray:
  """Blends a heat map onto an image.

  image uint8 [H, W, 1|3]; cam float [H, W] in [0, 1] -> uint8 RGB [H', W', 3]
  (jet colours, weighted by the map so cold areas keep the film visible).
  Small model inputs are upscaled (bilinear) so the shorter side is >= min_side.
  """
  from matplotlib import colormaps  # lazy: matplotlib only when drawing
  from PIL import Image

  img = np.asarray(image)
  if img.ndim == 3 and img.shape[-1] == 1:
    img = img[..., 0]
  cam = np.clip(np.asarray(cam, dtype=np.float32), 0, 1)
  h, w = img.shape[:2]
  scale = max(1, -(-min_side // max(1, min(h, w))))
  if scale > 1:
    size = (w * scale, h * scale)
    img = np.asarray(Image.fromarray(img.astype(np.uint8)).resize(size, Image.Resampling.BILINEAR))
    cam = np.asarray(Image.fromarray(cam, mode="F").resize(size, Image.Resampling.BILINEAR))
    cam = np.clip(cam, 0, 1)
  img = img.astype(np.float32)
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  heat = colormaps["jet"](cam)[..., :3] * 255.0
  a = alpha * np.sqrt(cam)[..., None]
  return np.clip((1 - a) * img + a * heat, 0, 255).round().astype(np.uint8)
