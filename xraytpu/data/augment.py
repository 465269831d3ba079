"""Augmentation as Keras layers inside the model: on the device, in training only.

`build_augmentation(cfg)` returns a `keras.Sequential` named "augmentation"
(or None when every setting is off) that takes float pixels [B, H, W, C] in
[0, 255] and returns the same shape and range:

  RandomAffine     rotation, width/height shift, zoom, shear and both flips in
                   ONE resampling pass per batch, with ImageDataGenerator's
                   semantics (see the class); pure TF gathers, so it compiles
                   with XLA and runs on TPU (tf.raw_ops.ImageProjectiveTransformV3,
                   behind keras' RandomRotation/RandomZoom, has no XLA kernel)
  RandomIntensity  brightness (+- fraction of 255) and contrast (+- fraction)
  RandomLowResolution  (--low_resolution_range, not in any preset) half the
                   images down to a random side (area) and back up (the input
                   resize), as films that arrive at 28-64 px look to the model;
                   one [S, S] matrix per image, so shapes never change (XLA)

Flag names and units follow `ImageDataGenerator`, so tutorial settings carry
over: rotation_range in degrees, shifts as fractions of the side (pixels when
>= 1), zoom_range z -> independent x and y zoom in [1 - z, 1 + z], shear in
degrees. Only training=True (what `fit` passes) augments: with
training=False or unspecified (`model(x)`, evaluate, predict, the exported
model) every layer is the identity. The layers are registered as Keras serializables
(package "xraytpu"), so a saved model.keras reloads once this module is
imported.
"""

from __future__ import annotations

import math

import tensorflow as tf

from xraytpu._keras import keras

FILL_MODES = ("nearest", "constant", "reflect", "wrap")
INTERPOLATIONS = ("bilinear", "nearest")


def _is_off(training) -> bool:
  return training is False or training is None or (isinstance(training, int) and training == 0)


def _dims(images):
  """(batch, height, width) of [B, H, W, C]: H and W static where known (XLA), B dynamic."""
  shape = tf.shape(images)
  height = images.shape[1] if images.shape[1] is not None else shape[1]
  width = images.shape[2] if images.shape[2] is not None else shape[2]
  return shape[0], height, width


def _maybe_apply(training, fn, inputs):
  """fn(inputs) only when training is True (python bool or tensor); else identity.

  Unlike keras' own augmentation layers (call default training=True), an
  unspecified training flag means inference: `model(x)` never augments; fit
  passes training=True explicitly.
  """
  if isinstance(training, (bool, int)) or training is None:
    return inputs if _is_off(training) else fn(inputs)
  return tf.cond(tf.cast(training, tf.bool), lambda: fn(inputs), lambda: tf.identity(inputs))


class _TrainingOnly(keras.__internal__.layers.BaseRandomLayer):
  """The augmentation layers' shared frame: their own seeded generator (force_generator:
  replica-safe under MirroredStrategy and XLA), identity unless training (`_maybe_apply`),
  the shape kept. A subclass defines `_augment` and adds its settings to get_config."""

  def __init__(self, seed: int | None = None, **kwargs):
    kwargs.pop("force_generator", None)
    super().__init__(seed=seed, force_generator=True, **kwargs)
    self.seed = seed

  def call(self, inputs, training=None):
    return _maybe_apply(training, self._augment, inputs)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="xraytpu")
class RandomAffine(_TrainingOnly):
  """ImageDataGenerator's random affine transform and flips, vectorised over the batch.

  Per image, as `ImageDataGenerator.get_random_transform` + `apply_transform`
  (rows = height axis, cols = width axis, transform about the image center):
    theta ~ U(-rotation_range, rotation_range) degrees
    tx ~ U(-height_shift_range, height_shift_range) * H   (rows; pixels if range >= 1)
    ty ~ U(-width_shift_range, width_shift_range) * W     (cols)
    shear ~ U(-shear_range, shear_range) degrees
    zx, zy ~ U(1 - zoom_range, 1 + zoom_range) independently (or [lo, hi] given)
    output(p) = input(Rot(theta) Shift(tx, ty) Shear(shear) Zoom(zx, zy) (p - c) + c)
  then a left-right / up-down flip each with probability 1/2 when enabled
  (folded into the same matrix: one resampling pass). Sampling is bilinear
  (order=1, the generator's default) and points outside the image take
  fill_mode: nearest (default, as the generator), constant (fill_value),
  reflect or wrap.

  Input/output: float [B, H, W, C], any value range; identity when not training.
  """

  def __init__(self, rotation_range: float = 0.0, width_shift_range: float = 0.0,
               height_shift_range: float = 0.0, zoom_range=0.0, shear_range: float = 0.0,
               horizontal_flip: bool = False, vertical_flip: bool = False,
               fill_mode: str = "nearest", fill_value: float = 0.0,
               interpolation: str = "bilinear", seed: int | None = None, **kwargs):
    super().__init__(seed=seed, **kwargs)
    if fill_mode not in FILL_MODES:
      raise ValueError(f"fill_mode must be one of {FILL_MODES}, got {fill_mode!r}")
    if interpolation not in INTERPOLATIONS:
      raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if isinstance(zoom_range, (list, tuple)):
      if len(zoom_range) != 2:
        raise ValueError(f"zoom_range must be a float or [lower, upper], got {zoom_range}")
      zoom = (float(zoom_range[0]), float(zoom_range[1]))
    else:
      zoom = (1.0 - float(zoom_range), 1.0 + float(zoom_range))
    if zoom[0] <= 0 or zoom[1] < zoom[0]:
      raise ValueError(f"zoom_range must give 0 < lower <= upper, got {zoom_range}")
    self.rotation_range = float(rotation_range)
    self.width_shift_range = float(width_shift_range)
    self.height_shift_range = float(height_shift_range)
    self.zoom_range = zoom_range if not isinstance(zoom_range, tuple) else list(zoom_range)
    self._zoom = zoom
    self.shear_range = float(shear_range)
    self.horizontal_flip = bool(horizontal_flip)
    self.vertical_flip = bool(vertical_flip)
    self.fill_mode = fill_mode
    self.fill_value = float(fill_value)
    self.interpolation = interpolation

  def _uniform(self, n, lo, hi):
    return self._random_generator.random_uniform([n], minval=lo, maxval=hi, dtype=tf.float32)

  def transform_matrices(self, batch, height, width):
    """float32 [B, 2, 3]: output pixel (row, col, 1) -> input coordinates (row, col).

    Random per image; the sampling in `call` uses them. Exposed for tests.
    """
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    zeros = tf.zeros([batch], tf.float32)
    ones = tf.ones([batch], tf.float32)
    theta = self._uniform(batch, -self.rotation_range, self.rotation_range) * (math.pi / 180.0) \
        if self.rotation_range else zeros
    tx = self._uniform(batch, -self.height_shift_range, self.height_shift_range) \
        if self.height_shift_range else zeros
    ty = self._uniform(batch, -self.width_shift_range, self.width_shift_range) \
        if self.width_shift_range else zeros
    if self.height_shift_range and self.height_shift_range < 1:
      tx = tx * h
    if self.width_shift_range and self.width_shift_range < 1:
      ty = ty * w
    shear = self._uniform(batch, -self.shear_range, self.shear_range) * (math.pi / 180.0) \
        if self.shear_range else zeros
    if self._zoom != (1.0, 1.0):
      zx = self._uniform(batch, self._zoom[0], self._zoom[1])
      zy = self._uniform(batch, self._zoom[0], self._zoom[1])
    else:
      zx = zy = ones
    flip_r = tf.where(self._uniform(batch, 0.0, 1.0) < 0.5, -1.0, 1.0) if self.vertical_flip else ones
    flip_c = tf.where(self._uniform(batch, 0.0, 1.0) < 0.5, -1.0, 1.0) if self.horizontal_flip else ones
    return affine_matrices(theta, tx, ty, shear, zx, zy, flip_r, flip_c, height, width)

  def _augment(self, inputs):
    images = tf.cast(inputs, tf.float32)
    batch, height, width = _dims(images)
    m = self.transform_matrices(batch, height, width)
    out = sample(images, m, fill_mode=self.fill_mode, fill_value=self.fill_value,
                 interpolation=self.interpolation)
    out.set_shape(inputs.shape)
    return tf.cast(out, self.compute_dtype)

  def get_config(self):
    return {**super().get_config(),
            "rotation_range": self.rotation_range, "width_shift_range": self.width_shift_range,
            "height_shift_range": self.height_shift_range, "zoom_range": self.zoom_range,
            "shear_range": self.shear_range, "horizontal_flip": self.horizontal_flip,
            "vertical_flip": self.vertical_flip, "fill_mode": self.fill_mode,
            "fill_value": self.fill_value, "interpolation": self.interpolation}


@keras.saving.register_keras_serializable(package="xraytpu")
class RandomIntensity(_TrainingOnly):
  """Random brightness then contrast, per image, for pixels in [0, 255].

    brightness: x + U(-brightness, brightness) * 255, clipped to [0, 255]
                (keras' RandomBrightness with value_range (0, 255))
    contrast:   (x - mean) * U(1 - contrast, 1 + contrast) + mean, per channel,
                clipped to [0, 255] (keras' RandomContrast)
  Input/output: float [B, H, W, C]; identity when not training.
  """

  def __init__(self, brightness: float = 0.0, contrast: float = 0.0, seed: int | None = None,
               **kwargs):
    super().__init__(seed=seed, **kwargs)
    if not 0.0 <= brightness <= 1.0 or not 0.0 <= contrast <= 1.0:
      raise ValueError(f"brightness and contrast must be in [0, 1], got {brightness}, {contrast}")
    self.brightness = float(brightness)
    self.contrast = float(contrast)

  def _augment(self, inputs):
    x = tf.cast(inputs, tf.float32)
    batch = tf.shape(x)[0]
    if self.brightness:
      delta = self._random_generator.random_uniform(
          [batch, 1, 1, 1], -self.brightness, self.brightness, dtype=tf.float32)
      x = tf.clip_by_value(x + 255.0 * delta, 0.0, 255.0)
    if self.contrast:
      factor = self._random_generator.random_uniform(
          [batch, 1, 1, 1], 1.0 - self.contrast, 1.0 + self.contrast, dtype=tf.float32)
      mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
      x = tf.clip_by_value((x - mean) * factor + mean, 0.0, 255.0)
    return tf.cast(x, self.compute_dtype)

  def get_config(self):
    return {**super().get_config(), "brightness": self.brightness,
            "contrast": self.contrast}


LOW_RESOLUTION_PROB = 0.5   # the share of training films made low-resolution


@keras.saving.register_keras_serializable(package="xraytpu")
class RandomLowResolution(_TrainingOnly):
  """Films that arrived at low resolution: per image, down to a random side and back up.

  Each image, with probability `probability`, gets a fraction f ~ U(low, 1) and
  becomes, for each of its sides N (rows, cols), N -> n = round(f N) -> N:
    down  AREA resampling (each low-resolution pixel the covered-area-weighted
          mean), as the converter's --max_side downscale (tfrecord_tools.pixels
          step 5, `tf.image.resize(method="area")`);
    up    the pixel contract's step 8 (`pixels.resize_image`:
          `tf.image.resize(method="bilinear", antialias=True)`), which enlarging
          is bilinear with half-pixel centres and edge clamping.
  That function cannot be called here: tf.image.resize needs one static size per
  call, the sizes differ per image, and XLA wants static shapes. Both resizes
  are separable linear maps, so `low_resolution_matrices` writes the pair as one
  [N, N] matrix per image (the resize's weights, computed from n in the graph)
  and the image becomes M_rows @ x @ M_cols^T: static shapes, exact per-image
  sizes, a few batched matmuls (tests check it against tf.image.resize).
  Other images pass unchanged (bit for bit), as does everything at inference.

  Input/output: float [B, H, W, C]; identity when not training. Random draws
  from the layer's own seeded generator, like RandomAffine and RandomIntensity.
  """

  def __init__(self, low: float = 0.0, probability: float = LOW_RESOLUTION_PROB,
               seed: int | None = None, **kwargs):
    super().__init__(seed=seed, **kwargs)
    if not 0.0 < low < 1.0:
      raise ValueError(f"low (the smallest side's fraction) must be in (0, 1), got {low}")
    if not 0.0 <= probability <= 1.0:
      raise ValueError(f"probability must be in [0, 1], got {probability}")
    self.low = float(low)
    self.probability = float(probability)

  def _augment(self, inputs):
    images = tf.cast(inputs, tf.float32)
    batch, height, width = _dims(images)
    chosen = self._random_generator.random_uniform([batch], 0.0, 1.0, dtype=tf.float32) \
        < self.probability
    fraction = self._random_generator.random_uniform([batch], self.low, 1.0, dtype=tf.float32)
    rows = low_resolution_matrices(_side(fraction, height), height)      # [B, H, H]
    cols = low_resolution_matrices(_side(fraction, width), width)        # [B, W, W]
    out = tf.einsum("bij,bjwc->biwc", rows, images)
    out = tf.einsum("bkw,biwc->bikc", cols, out)
    out = tf.where(chosen[:, None, None, None], out, images)
    out.set_shape(inputs.shape)
    return tf.cast(out, self.compute_dtype)

  def get_config(self):
    return {**super().get_config(), "low": self.low, "probability": self.probability}


def _side(fraction, n):
  """round(fraction * n) as float32, at least 1 and at most n."""
  n = tf.cast(n, tf.float32)
  return tf.clip_by_value(tf.round(fraction * n), 1.0, n)


def low_resolution_matrices(sides, size):
  """float32 [B, size, size]: per image, `size` -> sides[b] (area) -> `size` (bilinear, antialias
  as tf.image.resize enlarges) along one axis, as a matrix acting on that axis.

  sides: [B] (float or int, 1 <= side <= size). A side equal to `size` gives the identity.
  Built from the resizes' definitions (tf.image.resize area: ResizeArea's covered
  fractions; bilinear antialias: scale_and_translate's triangle kernel, weights
  renormalised over the pixels inside the image); tests compare it with tf.image.resize.
  """
  s = tf.cast(sides, tf.float32)[:, None, None]                # [B, 1, 1] low-resolution side
  n = tf.cast(size, tf.float32)
  scale = n / s                                                 # input pixels per low-res pixel
  idx = tf.cast(tf.range(size), tf.float32)
  rows, cols = idx[None, :, None], idx[None, None, :]
  # down [B, size, size]: row i < s (a low-res pixel) averages input cells [i scale, (i+1) scale).
  lo = rows * scale
  covered = tf.clip_by_value(tf.minimum(cols + 1.0, lo + scale) - tf.maximum(cols, lo), 0.0, 1.0)
  down = tf.where(rows < s, covered / scale, 0.0)
  # up [B, size, size]: output row o samples the low-res grid at (o + 0.5) / scale - 0.5.
  centre = (rows + 0.5) / scale
  weight = tf.where(cols < s, tf.maximum(0.0, 1.0 - tf.abs(centre - (cols + 0.5))), 0.0)
  up = weight / tf.reduce_sum(weight, axis=-1, keepdims=True)
  return tf.matmul(up, down)


def affine_matrices(theta, tx, ty, shear, zx, zy, flip_r, flip_c, height, width):
  """ImageDataGenerator's transform as float32 [B, 2, 3] maps, output (row, col, 1) -> input.

  All arguments but height/width are float32 [B]: theta and shear in radians,
  tx/ty shifts in pixels along rows/cols, zx/zy zooms, flip_r/flip_c = -1 to
  mirror rows (up-down) / cols (left-right) after the transform, else 1.
  Same matrix as `ImageDataGenerator.apply_transform`:
  Rot(theta) @ Shift(tx, ty) @ Shear(shear) @ Zoom(zx, zy), about the center.
  """
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  c, s = tf.cos(theta), tf.sin(theta)
  ss, cs = tf.sin(shear), tf.cos(shear)
  # Rot @ Shift @ Shear @ Zoom, written out.
  a00, a01 = c * zx, (-c * ss - s * cs) * zy
  a10, a11 = s * zx, (-s * ss + c * cs) * zy
  t0, t1 = c * tx - s * ty, s * tx + c * ty
  # Flips after the transform = mirror the output coordinates first.
  a00, a10 = a00 * flip_r, a10 * flip_r
  a01, a11 = a01 * flip_c, a11 * flip_c
  # About the center: in = A (out - center) + t + center.
  cr, cc = (h - 1.0) / 2.0, (w - 1.0) / 2.0
  b0 = t0 + cr - a00 * cr - a01 * cc
  b1 = t1 + cc - a10 * cr - a11 * cc
  return tf.stack([tf.stack([a00, a01, b0], -1), tf.stack([a10, a11, b1], -1)], -2)


def sample(images, matrices, *, fill_mode: str = "nearest", fill_value: float = 0.0,
           interpolation: str = "bilinear"):
  """Resamples images [B, H, W, C] (float32) through per-image affine maps.

  matrices: float32 [B, 2, 3] mapping output (row, col, 1) to input (row, col),
  pixel centers at integer coordinates. Pure gathers and arithmetic, so it
  compiles with XLA (TPU, jit_compile). Matches scipy.ndimage.affine_transform
  (what ImageDataGenerator calls) with order=1 (bilinear) or 0 (nearest) and
  mode nearest | reflect | constant, and mode="grid-wrap" for "wrap".
  Returns float32 [B, H, W, C].
  """
  shape = tf.shape(images)
  b, h, w, c = shape[0], shape[1], shape[2], shape[3]
  rows = tf.cast(tf.range(h), tf.float32)[None, :, None]      # [1, H, 1]
  cols = tf.cast(tf.range(w), tf.float32)[None, None, :]      # [1, 1, W]
  m = matrices[:, :, :, None, None]                           # [B, 2, 3, 1, 1]
  src_r = m[:, 0, 0] * rows + m[:, 0, 1] * cols + m[:, 0, 2]  # [B, H, W] input row
  src_c = m[:, 1, 0] * rows + m[:, 1, 1] * cols + m[:, 1, 2]  # [B, H, W] input col
  flat = tf.reshape(images, [-1, c])
  base = (tf.range(b) * h * w)[:, None, None]
  outside = None
  if fill_mode == "constant":
    # scipy's "constant": a point outside [0, n-1] takes fill_value; a point
    # inside interpolates between (edge-clamped) pixels.
    hf, wf = tf.cast(h, tf.float32) - 1.0, tf.cast(w, tf.float32) - 1.0
    outside = (src_r < 0.0) | (src_r > hf) | (src_c < 0.0) | (src_c > wf)

  def fetch(ri, ci):
    """Pixels at integer coordinates [B, H, W] -> [B, H, W, C]."""
    if fill_mode == "wrap":
      ri, ci = tf.math.floormod(ri, h), tf.math.floormod(ci, w)
    elif fill_mode == "reflect":  # d c b a | a b c d | d c b a
      ri, ci = _reflect(ri, h), _reflect(ci, w)
    else:  # nearest, and constant's in-image points: clamp to the edge
      ri, ci = tf.clip_by_value(ri, 0, h - 1), tf.clip_by_value(ci, 0, w - 1)
    return tf.gather(flat, base + ri * w + ci)

  if interpolation == "nearest":
    out = fetch(tf.cast(tf.round(src_r), tf.int32), tf.cast(tf.round(src_c), tf.int32))
  else:
    r0f, c0f = tf.floor(src_r), tf.floor(src_c)
    dr, dc = (src_r - r0f)[..., None], (src_c - c0f)[..., None]
    r0, c0 = tf.cast(r0f, tf.int32), tf.cast(c0f, tf.int32)
    v00, v01 = fetch(r0, c0), fetch(r0, c0 + 1)
    v10, v11 = fetch(r0 + 1, c0), fetch(r0 + 1, c0 + 1)
    top = v00 + (v01 - v00) * dc
    bottom = v10 + (v11 - v10) * dc
    out = top + (bottom - top) * dr
  if outside is not None:
    out = tf.where(outside[..., None], tf.cast(fill_value, out.dtype), out)
  return out


def _reflect(i, n):
  j = tf.math.floormod(i, 2 * n)
  return tf.where(j >= n, 2 * n - 1 - j, j)


def build_augmentation(cfg, seed: int | None = None) -> keras.Sequential | None:
  """The model's augmentation block from a Config's augmentation fields.

  Reads rotation_range, width_shift_range, height_shift_range, zoom_range,
  shear_range, horizontal_flip, vertical_flip, brightness_range,
  contrast_range (call `cfg.resolve_augment()` first so the --augment preset
  is applied), low_resolution_range and seed. Returns None when all are off.
  Input/output: float [B, H, W, C] in [0, 255]; identity unless training.
  """
  seed = cfg.seed if seed is None else seed
  layers = []
  if (cfg.rotation_range or cfg.width_shift_range or cfg.height_shift_range or cfg.zoom_range
      or cfg.shear_range or cfg.horizontal_flip or cfg.vertical_flip):
    layers.append(RandomAffine(
        rotation_range=cfg.rotation_range, width_shift_range=cfg.width_shift_range,
        height_shift_range=cfg.height_shift_range, zoom_range=cfg.zoom_range,
        shear_range=cfg.shear_range, horizontal_flip=cfg.horizontal_flip,
        vertical_flip=cfg.vertical_flip, seed=seed, name="random_affine"))
  if cfg.brightness_range or cfg.contrast_range:
    layers.append(RandomIntensity(brightness=cfg.brightness_range, contrast=cfg.contrast_range,
                                  seed=None if seed is None else seed + 1, name="random_intensity"))
  if cfg.low_resolution_range:
    # Last, as the input resize is the last step a low-resolution film goes through.
    layers.append(RandomLowResolution(low=cfg.low_resolution_range,
                                      seed=None if seed is None else seed + 2,
                                      name="random_low_resolution"))
  if not layers:
    return None
  return keras.Sequential(layers, name="augmentation")


def rescaling_layer(scale: float = 1.0 / 255.0, offset: float = 0.0, name: str = "rescale"):
  """Raw pixels [0, 255] -> [0, 1] (default) inside the model, so exported models take raw pixels."""
  return keras.layers.Rescaling(scale, offset, name=name)


# ---- mixup / cutmix: images and labels of a batch -----------------------------
# Model Garden's `MixupAndCutmix` (official/vision/ops/augment.py), its semantics
# and defaults: each example is mixed with its partner in the reversed batch,
# with its own lambda ~ Beta(alpha, alpha); with both alphas > 0 a batch is
# cutmixed with probability MIX_SWITCH_PROB (its switch_prob), else mixed up.
# It needs the labels, which never enter the model, so unlike the layers above it
# runs in the input pipeline, on each batch (xraytpu.data.input_pipeline's chain),
# as Model Garden's does: a few element-wise ops per batch on the host.
MIX_SWITCH_PROB = 0.5


def _beta(alpha: float, shape, seed: int | None):
  """Beta(alpha, alpha) samples as g1 / (g1 + g2), g ~ Gamma(alpha) (tf has no Beta op)."""
  g1 = tf.random.gamma(shape, alpha, dtype=tf.float32, seed=seed)
  g2 = tf.random.gamma(shape, alpha, dtype=tf.float32, seed=None if seed is None else seed + 1)
  return tf.math.divide_no_nan(g1, g1 + g2)


def mix_labels(labels, lam, *, multi_label: bool = False):
  """labels [b, L] mixed with the reversed batch's: lam * y + (1 - lam) * y[::-1], lam [b].

  Single-label (binary [b, 1] or one-hot [b, K]): the soft label of the mix.
  Multi-label (`input_pipeline.multi_label_targets`, [b, 2K] = [multi_hot, mask]):
  the multi-hot vectors mix the same way; an entry stays labelled (mask 1) only
  when it is labelled in both films, so an unknown finding never enters the loss.
  """
  labels = tf.cast(labels, tf.float32)
  lam = tf.reshape(tf.cast(lam, tf.float32), [-1, 1])
  other = tf.reverse(labels, axis=[0])
  if not multi_label:
    return lam * labels + (1.0 - lam) * other
  k = int(labels.shape[-1]) // 2
  hot = lam * labels[:, :k] + (1.0 - lam) * other[:, :k]
  return tf.concat([hot, labels[:, k:] * other[:, k:]], axis=-1)


def mixup(images, labels, alpha: float, *, multi_label: bool = False, seed: int | None = None):
  """Mixup (Zhang et al. 2018): x = lam * x + (1 - lam) * x[::-1], labels alike.

  images [b, H, W, C] (uint8 or float; the result keeps the dtype, uint8 rounded),
  labels [b, L]; lam ~ Beta(alpha, alpha) per example. Returns (images, labels float32).
  """
  batch = tf.shape(images)[0]
  lam = _beta(alpha, [batch], seed)
  x = tf.cast(images, tf.float32)
  l4 = tf.reshape(lam, [-1, 1, 1, 1])
  mixed = l4 * x + (1.0 - l4) * tf.reverse(x, axis=[0])
  if images.dtype.is_integer:
    mixed = tf.clip_by_value(tf.round(mixed), images.dtype.min, images.dtype.max)
  return tf.cast(mixed, images.dtype), mix_labels(labels, lam, multi_label=multi_label)


def cutmix_boxes(batch, height, width, alpha: float, seed: int | None = None):
  """Per example a box [y0, y1) x [x0, x1) of area about (1 - lam) H W, lam ~ Beta(alpha, alpha),
  centred uniformly and clipped to the image (Yun et al. 2019). int32 [b, 4]."""
  lam = _beta(alpha, [batch], seed)
  ratio = tf.sqrt(1.0 - lam)
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  cut_h, cut_w = tf.cast(h * ratio, tf.int32), tf.cast(w * ratio, tf.int32)
  cy = tf.random.uniform([batch], 0, height, dtype=tf.int32, seed=None if seed is None else seed + 2)
  cx = tf.random.uniform([batch], 0, width, dtype=tf.int32, seed=None if seed is None else seed + 3)
  y0 = tf.clip_by_value(cy - cut_h // 2, 0, height)
  y1 = tf.clip_by_value(cy + cut_h // 2, 0, height)
  x0 = tf.clip_by_value(cx - cut_w // 2, 0, width)
  x1 = tf.clip_by_value(cx + cut_w // 2, 0, width)
  return tf.stack([y0, y1, x0, x1], axis=-1)


def cutmix(images, labels, alpha: float, *, multi_label: bool = False, seed: int | None = None):
  """CutMix: a box of the reversed batch's image pasted into each image; the labels mixed
  with lam = 1 - box area / image area (the box after clipping). Returns (images, labels)."""
  shape = tf.shape(images)
  batch, height, width = shape[0], shape[1], shape[2]
  box = cutmix_boxes(batch, height, width, alpha, seed)
  rows = tf.range(height)[None, :, None]
  cols = tf.range(width)[None, None, :]
  y0, y1, x0, x1 = (box[:, i, None, None] for i in range(4))
  inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)   # [b, H, W]
  mixed = tf.where(inside[..., None], tf.reverse(images, axis=[0]), images)
  area = tf.cast((box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2]), tf.float32)
  lam = 1.0 - area / tf.cast(height * width, tf.float32)
  return mixed, mix_labels(labels, lam, multi_label=multi_label)


def mix_batch(images, labels, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
              multi_label: bool = False, seed: int | None = None):
  """Model Garden's mixup_and_cutmix on one batch: mixup, cutmix, or (both alphas > 0) one of
  them per batch, cutmix with probability MIX_SWITCH_PROB. Returns (images, labels float32)."""
  kw = dict(multi_label=multi_label, seed=seed)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    switch = tf.random.uniform([], seed=None if seed is None else seed + 4) < MIX_SWITCH_PROB
    return tf.cond(switch, lambda: cutmix(images, labels, cutmix_alpha, **kw),
                   lambda: mixup(images, labels, mixup_alpha, **kw))
  if cutmix_alpha > 0:
    return cutmix(images, labels, cutmix_alpha, **kw)
  if mixup_alpha > 0:
    return mixup(images, labels, mixup_alpha, **kw)
  return images, tf.cast(labels, tf.float32)
