"""tfrecord_tools.pixels.prepare_image: the converter's half of the pixel contract."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tfrecord_tools.pixels import ImageError, prepare_image


def _encode(arr_or_img, fmt="PNG", **kw) -> bytes:
  im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
  buf = io.BytesIO()
  im.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)))


def _rng_image(shape, dtype=np.uint8, seed=0):
  hi = 65535 if dtype == np.uint16 else 255
  return np.random.default_rng(seed).integers(0, hi + 1, shape).astype(dtype)


def test_gray_png_keeps_pixels_and_bytes_without_metadata():
  a = _rng_image((20, 30))
  src = _encode(a, "PNG", icc_profile=b"\0" * 64)
  p = prepare_image(src)
  assert (p.image_format, p.height, p.width, p.channels, p.bit_depth) == ("png", 20, 30, 1, 8)
  np.testing.assert_array_equal(_decode(p.encoded), a)
  assert b"iCCP" in src and b"iCCP" not in p.encoded     # metadata chunks stripped
  assert len(p.encoded) < len(src)


def test_rgba_becomes_rgb_by_dropping_alpha():
  a = _rng_image((16, 12, 4))
  p = prepare_image(_encode(a))
  assert p.channels == 3 and p.source_mode == "RGBA"
  np.testing.assert_array_equal(_decode(p.encoded), a[..., :3])


def test_palette_gray_becomes_l_and_palette_color_becomes_rgb():
  gray = Image.fromarray(_rng_image((10, 10))).convert("P")   # gray palette
  p = prepare_image(_encode(gray))
  assert p.channels == 1
  np.testing.assert_array_equal(_decode(p.encoded), np.asarray(gray.convert("L")))
  color = Image.fromarray(_rng_image((10, 10, 3))).quantize(16)
  p = prepare_image(_encode(color))
  assert p.channels == 3
  np.testing.assert_array_equal(_decode(p.encoded), np.asarray(color.convert("RGB")))


def test_la_and_1bit():
  a = _rng_image((8, 8, 2))
  p = prepare_image(_encode(Image.fromarray(a, mode="LA")))
  assert p.channels == 1
  np.testing.assert_array_equal(_decode(p.encoded), a[..., 0])
  bw = Image.fromarray(_rng_image((8, 8)) > 127)
  p = prepare_image(_encode(bw))
  assert p.channels == 1 and set(np.unique(_decode(p.encoded))) <= {0, 255}


def test_16bit_gray_stays_16bit_and_maps_to_8bit_when_needed():
  a = _rng_image((12, 9), np.uint16)
  src = _encode(a)
  p = prepare_image(src)
  assert (p.bit_depth, p.channels, p.image_format) == (16, 1, "png")
  np.testing.assert_array_equal(_decode(p.encoded), a)
  expect8 = np.round(a / 257.0).astype(np.uint8)
  p3 = prepare_image(src, channels="3")
  assert (p3.bit_depth, p3.channels) == (8, 3)
  np.testing.assert_array_equal(_decode(p3.encoded), np.stack([expect8] * 3, -1))
  pj = prepare_image(src, image_format="jpeg")
  assert (pj.bit_depth, pj.image_format) == (8, "jpeg")
  assert np.abs(_decode(pj.encoded).astype(int) - expect8).mean() < 40  # lossy but close


def test_16bit_resize_stays_16bit():
  a = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (40, 1))
  p = prepare_image(_encode(a), max_side=32)
  out = _decode(p.encoded)
  assert (p.bit_depth, p.height, p.width) == (16, 20, 32) and out.dtype == np.uint16
  assert out.max() > 60000  # range kept, not squashed to 8 bits


def test_channels_conversion():
  rgb = _rng_image((10, 14, 3))
  p = prepare_image(_encode(rgb), channels="1")
  assert p.channels == 1
  np.testing.assert_array_equal(_decode(p.encoded), np.asarray(Image.fromarray(rgb).convert("L")))
  gray = _rng_image((10, 14))
  p = prepare_image(_encode(gray), channels=3)
  assert p.channels == 3
  np.testing.assert_array_equal(_decode(p.encoded), np.stack([gray] * 3, -1))


def test_jpeg_keep_is_byte_identical_and_png_output_is_lossless():
  src = _encode(_rng_image((32, 48, 3)), "JPEG", quality=80)
  p = prepare_image(src)
  assert p.encoded == src and p.image_format == "jpeg"
  p = prepare_image(src, image_format="png")
  assert p.image_format == "png"
  np.testing.assert_array_equal(_decode(p.encoded), _decode(src))


def test_max_side_preserves_aspect_and_never_enlarges():
  src = _encode(_rng_image((200, 300)))
  p = prepare_image(src, max_side=150)
  assert (p.height, p.width) == (100, 150) and (p.source_height, p.source_width) == (200, 300)
  assert _decode(p.encoded).shape == (100, 150)
  p = prepare_image(src, max_side=1000)
  assert (p.height, p.width) == (200, 300)
  # JPEG draft decoding (the fast path) still lands exactly on the target size.
  j = prepare_image(_encode(_rng_image((1000, 800, 3)), "JPEG"), max_side=128)
  assert (j.height, j.width) == (128, 102) and _decode(j.encoded).shape == (128, 102, 3)


def test_exif_orientation_is_applied():
  a = np.zeros((20, 40), np.uint8)
  a[:, :10] = 255                       # bright band on the left
  exif = Image.Exif()
  exif[0x0112] = 6                      # rotate 90 degrees clockwise when displayed
  src = _encode(Image.fromarray(a), "JPEG", exif=exif.tobytes(), quality=100)
  p = prepare_image(src)
  out = _decode(p.encoded)
  assert (p.height, p.width) == (40, 20) and p.encoded != src
  assert out[:10].mean() > 200 and out[-10:].mean() < 50   # band now on top


def test_cmyk_jpeg_becomes_rgb():
  src = _encode(Image.fromarray(_rng_image((8, 8, 3))).convert("CMYK"), "JPEG")
  p = prepare_image(src)
  assert p.channels == 3 and p.source_mode == "CMYK" and _decode(p.encoded).shape == (8, 8, 3)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"this is a text file, not a png\n" * 3, "not an image"),
])
def test_bad_bytes_raise_image_error(data, reason):
  with pytest.raises(ImageError, match=reason):
    prepare_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_raise_image_error(fmt):
  src = _encode(_rng_image((64, 64)), fmt)
  with pytest.raises(ImageError) as e:
    prepare_image(src[:len(src) // 2])
  assert "truncated" in e.value.reason or "corrupt" in e.value.reason


def test_deterministic_output():
  src = _encode(_rng_image((50, 70, 4)))
  a = prepare_image(src, max_side=33)
  b = prepare_image(src, max_side=33)
  assert a == b


def test_tensorflow_decodes_what_pil_decodes():
  import tensorflow as tf
  for arr, kw in ((_rng_image((9, 7), np.uint16), {}),
                  (_rng_image((9, 7, 4)), {}),
                  (_rng_image((30, 20)), {"max_side": 10})):
    p = prepare_image(_encode(arr), **kw)
    dtype = tf.uint16 if p.bit_depth == 16 else tf.uint8
    t = tf.io.decode_png(p.encoded, channels=p.channels, dtype=dtype).numpy()
    np.testing.assert_array_equal(t.reshape(_decode(p.encoded).shape), _decode(p.encoded))


def test_invalid_arguments():
  with pytest.raises(ValueError):
    prepare_image(b"x", channels="2")
  with pytest.raises(ValueError):
    prepare_image(b"x", image_format="gif")
