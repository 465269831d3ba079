"""Image bytes -> square uint8 pixels, in pure TensorFlow.

The same functions run in three places, so training and serving see the same
pixels: inside `tf.data` (`xraytpu.data.input_pipeline`), eagerly (tests,
previews), and inside the exported SavedModel's serving function
(`xraytpu.export`). Use `load_image` there: it is exactly what the input
pipeline does to every record.

  encoded bytes (PNG 8/16-bit or JPEG; GIF/BMP via tf.io.decode_image)
      -> decode_image  -> uint8 [H, W, C]       16-bit PNG mapped by the full range
      -> resize_image  -> uint8 [S, S, C]       aspect policy: squash | pad | center_crop

Pixel semantics stay explicit: uint8 0..255 leave this module, the model
rescales. Nothing here reads flags or config objects.
"""

from __future__ import annotations

import tensorflow as tf

ASPECTS = ("squash", "pad", "center_crop")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
# A PNG starts with the 8-byte signature, then the IHDR chunk: 4 bytes length,
# b"IHDR", 4 bytes width, 4 bytes height, 1 byte bit depth -> offset 24.
_PNG_BIT_DEPTH_OFFSET = 24
# libjpeg can decode at 1/2, 1/4 and 1/8 scale in the DCT domain, which is
# several times cheaper than a full decode followed by a downscale.
_JPEG_RATIOS = (1, 2, 4, 8)


def decode_image(encoded, channels: int, *, min_side: int = 0) -> tf.Tensor:
  """Decodes one encoded image to uint8 [H, W, channels].

  Args:
    encoded: tf.string scalar, the bytes of a PNG (8- or 16-bit) or JPEG file
      (other formats tf.io.decode_image reads, e.g. BMP, also work).
    channels: 1 (grayscale) or 3 (RGB); the image is converted if needed.
    min_side: 0 decodes at full size. Otherwise a JPEG whose shorter side is
      at least 2x this many pixels is decoded at 1/2, 1/4 or 1/8 scale
      (libjpeg's scaled IDCT, an averaging downscale) while its shorter side
      stays >= min_side. `load_image` sets it to the output size.

  Returns:
    uint8 [H, W, channels]. A 16-bit PNG is mapped to 8 bits by its full
    range, round(v / 257), so 65535 -> 255 and 32896 -> 128 (not by keeping
    the high byte).
  """
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}")
  encoded = tf.convert_to_tensor(encoded, tf.string)
  is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_SIGNATURE)), _PNG_SIGNATURE)
  is_jpeg = tf.equal(tf.strings.substr(encoded, 0, len(_JPEG_SIGNATURE)), _JPEG_SIGNATURE)

  def png():
    bit_depth = tf.strings.substr(encoded, _PNG_BIT_DEPTH_OFFSET, 1)
    return tf.cond(tf.equal(bit_depth, b"\x10"),
                   lambda: _uint16_to_uint8(tf.io.decode_png(encoded, channels, dtype=tf.uint16)),
                   lambda: tf.io.decode_png(encoded, channels))

  def jpeg():
    if min_side <= 0:
      return tf.io.decode_jpeg(encoded, channels)
    return _decode_jpeg_scaled(encoded, channels, min_side)

  def other():  # BMP, GIF, WebP: decode as stored, then convert the channels
    return _to_channels(tf.io.decode_image(encoded, dtype=tf.uint8, expand_animations=False),
                        channels)

  image = tf.case([(is_png, png), (is_jpeg, jpeg)], default=other, exclusive=True)
  image.set_shape([None, None, channels])
  return image


def resize_image(image, size: int, aspect: str = "squash") -> tf.Tensor:
  """Resizes uint8 [H, W, C] to uint8 [size, size, C].

  Bilinear with antialiasing (a triangle filter when shrinking, so a 2000 px
  radiograph does not alias), rounded back to uint8.

  aspect:
    squash       plain resize to size x size; a 400x300 film is stretched.
    pad          scale the longer side to `size`, center, fill with black
                 (letterbox); nothing is cut, nothing stretched.
    center_crop  cut the central square of side min(H, W), then resize;
                 nothing stretched, the edges of the longer side are lost.
  """
  if aspect not in ASPECTS:
    raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
  image = tf.convert_to_tensor(image)
  channels = image.shape[-1]
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  if aspect == "squash":
    out = _resize_to_uint8(image, [size, size])
  elif aspect == "center_crop":
    side = tf.minimum(h, w)
    crop = tf.image.crop_to_bounding_box(image, (h - side) // 2, (w - side) // 2, side, side)
    out = _resize_to_uint8(crop, [size, size])
  else:  # pad
    longer = tf.cast(tf.maximum(h, w), tf.float32)
    scale = float(size) / longer
    new_h = tf.maximum(1, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
    new_w = tf.maximum(1, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
    scaled = _resize_to_uint8(image, tf.stack([new_h, new_w]))
    out = tf.image.pad_to_bounding_box(scaled, (size - new_h) // 2, (size - new_w) // 2, size, size)
  out.set_shape([size, size, channels])
  return out


def load_image(encoded, *, channels: int, size: int, aspect: str = "squash") -> tf.Tensor:
  """Encoded bytes -> uint8 [size, size, channels]: what the input pipeline feeds.

  The one per-record code path: `input_pipeline` maps it over every record and
  the export's serving function should call it on every request, so a served
  model sees the pixels training saw.
  """
  return resize_image(decode_image(encoded, channels, min_side=size), size, aspect)


def _to_channels(image, channels: int):
  """uint8 [H, W, 1|3|4] -> [H, W, channels] (alpha dropped, RGB -> luma, gray -> RGB)."""
  have = tf.shape(image)[-1]
  rgb = lambda: image[..., :3]  # noqa: E731
  gray = lambda: image[..., :1]  # noqa: E731
  if channels == 1:
    return tf.cond(have >= 3, lambda: tf.image.rgb_to_grayscale(rgb()), gray)
  return tf.cond(have >= 3, rgb, lambda: tf.image.grayscale_to_rgb(gray()))


def _uint16_to_uint8(image16):
  # round(v / 257) in integers: floor((v + 128) / 257) has no ties to break.
  v = tf.cast(image16, tf.int32)
  return tf.cast((v + 128) // 257, tf.uint8)


def _resize_to_uint8(image, size):
  resized = tf.image.resize(image, size, method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def _decode_jpeg_scaled(encoded, channels: int, min_side: int):
  """Decodes at the coarsest DCT scale keeping the shorter side >= min_side."""
  shape = tf.io.extract_jpeg_shape(encoded)
  shorter = tf.minimum(shape[0], shape[1])
  # libjpeg's scaled size is ceil(side / ratio); pick the largest ratio that
  # still leaves `min_side` pixels (index into _JPEG_RATIOS).
  index = tf.constant(0)
  for i, r in enumerate(_JPEG_RATIOS[1:], start=1):
    index = tf.where((shorter + r - 1) // r >= min_side, i, index)
  branches = [lambda r=r: tf.io.decode_jpeg(encoded, channels, ratio=r) for r in _JPEG_RATIOS]
  return tf.switch_case(index, branches)
