"""The pixel contract's TensorFlow half (tfrecord_tools.pixels): decoding (PNG 8/16-bit, JPEG) and the aspect policies.

Each function is checked eagerly, inside tf.data, and inside a SavedModel
serving function (the export path), on tiny synthetic images.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfrecord_tools import pixels as preprocess


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _jpeg(array: np.ndarray, quality: int = 95) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def _smooth(h: int, w: int, channels: int = 1) -> np.ndarray:
  """A smooth uint8 gradient (JPEG keeps it nearly exact)."""
  y, x = np.mgrid[0:h, 0:w]
  img = (np.sin(x / w * 3.0) * 60 + np.cos(y / h * 2.0) * 60 + 127).astype(np.uint8)
  return img if channels == 1 else np.stack([img, img // 2, 255 - img], -1)


def test_decode_png_8bit_gray_and_rgb():
  gray = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
  out = preprocess.decode_image(_png(gray), 1)
  assert out.dtype == tf.uint8 and out.shape == (12, 10, 1)
  np.testing.assert_array_equal(out.numpy()[..., 0], gray)
  as_rgb = preprocess.decode_image(_png(gray), 3).numpy()
  assert as_rgb.shape == (12, 10, 3)
  np.testing.assert_array_equal(as_rgb[..., 2], gray)
  rgb = np.stack([gray, 255 - gray, gray // 2], -1)
  np.testing.assert_array_equal(preprocess.decode_image(_png(rgb), 3).numpy(), rgb)


def test_16bit_png_is_scaled_by_full_range_not_truncated():
  values = np.array([[0, 128, 129, 385, 32896, 65407, 65535, 257]], np.uint16)
  encoded = _png(values)
  assert Image.open(io.BytesIO(encoded)).mode.startswith("I;16")
  out = preprocess.decode_image(encoded, 1).numpy()[0, :, 0]
  # round(v / 257): 128 -> 0, 129 -> 1, 385 -> 1 (1.498), 32896 -> 128, 65407 -> 255 (254.5..)
  np.testing.assert_array_equal(out, np.round(values[0] / 257.0).astype(np.uint8))
  np.testing.assert_array_equal(out, [0, 0, 1, 1, 128, 255, 255, 1])
  # A full-range 16-bit ramp: the high byte would give 254 for 65407, round gives 255.
  ramp = (np.linspace(0, 65535, 64 * 64)).astype(np.uint16).reshape(64, 64)
  got = preprocess.decode_image(_png(ramp), 3).numpy()
  assert got.shape == (64, 64, 3)
  np.testing.assert_array_equal(got[..., 0], np.round(ramp / 257.0).astype(np.uint8))


def test_decode_jpeg_and_scaled_decode():
  img = _smooth(96, 128)
  full = preprocess.decode_image(_jpeg(img), 1).numpy()[..., 0]
  assert full.shape == (96, 128)
  assert np.abs(full.astype(int) - img).mean() < 2.0
  # min_side=20: 96 -> 1/4 scale keeps 24 >= 20 (1/8 would give 12).
  scaled = preprocess.decode_image(_jpeg(img), 1, min_side=20)
  assert scaled.shape == (24, 32, 1)
  # Never below min_side, never scaled when the image is already small.
  assert preprocess.decode_image(_jpeg(img), 1, min_side=96).shape == (96, 128, 1)
  assert preprocess.decode_image(_jpeg(img), 1, min_side=200).shape == (96, 128, 1)
  # load_image (scaled decode + resize) ~= full decode + resize.
  fast = preprocess.load_image(_jpeg(img), channels=1, size=20, aspect="squash").numpy()
  slow = preprocess.resize_image(full[..., None], 20, "squash").numpy()
  assert np.abs(fast.astype(int) - slow).mean() < 3.0


def test_decode_other_format_and_bad_channels():
  buf = io.BytesIO()
  Image.fromarray(_smooth(8, 8)).save(buf, format="BMP")
  assert preprocess.decode_image(buf.getvalue(), 1).shape == (8, 8, 1)
  with pytest.raises(ValueError):
    preprocess.decode_image(_png(_smooth(8, 8)), 2)


def test_squash():
  img = np.zeros((20, 40, 1), np.uint8)
  img[:, 20:] = 200  # right half bright
  out = preprocess.resize_image(img, 10, "squash").numpy()[..., 0]
  assert out.shape == (10, 10)
  assert (out[:, :4] == 0).all() and (out[:, 6:] == 200).all()


def test_pad_letterboxes_with_black():
  img = np.full((20, 40, 1), 255, np.uint8)  # wide: bars top and bottom
  out = preprocess.resize_image(img, 20, "pad").numpy()[..., 0]
  assert out.shape == (20, 20)
  assert (out[:5] == 0).all() and (out[15:] == 0).all() and (out[5:15] == 255).all()
  tall = np.full((40, 20, 3), 255, np.uint8)  # tall: bars left and right
  out = preprocess.resize_image(tall, 20, "pad").numpy()
  assert out.shape == (20, 20, 3)
  assert (out[:, :5] == 0).all() and (out[:, 15:] == 0).all() and (out[:, 5:15] == 255).all()


def test_center_crop_keeps_the_middle():
  img = np.zeros((20, 60, 1), np.uint8)
  img[:, 20:40] = 255  # only the central square is bright
  out = preprocess.resize_image(img, 10, "center_crop").numpy()[..., 0]
  assert out.shape == (10, 10) and (out == 255).all()
  with pytest.raises(ValueError):
    preprocess.resize_image(img, 10, "stretch")


@pytest.mark.parametrize("aspect", preprocess.ASPECTS)
def test_load_image_inside_tf_data(aspect):
  encoded = [_png(_smooth(30, 50)), _jpeg(_smooth(50, 30, 3)),
             _png((np.arange(30 * 40) * 50).astype(np.uint16).reshape(30, 40))]
  ds = tf.data.Dataset.from_tensor_slices(encoded).map(
      lambda e: preprocess.load_image(e, channels=3, size=16, aspect=aspect))
  assert ds.element_spec.shape == (16, 16, 3) and ds.element_spec.dtype == tf.uint8
  out = [x.numpy() for x in ds]
  assert len(out) == 3 and all(x.shape == (16, 16, 3) for x in out)
  eager = preprocess.load_image(encoded[0], channels=3, size=16, aspect=aspect).numpy()
  np.testing.assert_array_equal(out[0], eager)


def test_load_image_in_a_saved_model_serving_function(tmp_path):
  class Serve(tf.Module):

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def __call__(self, encoded):
      return tf.map_fn(lambda e: preprocess.load_image(e, channels=1, size=12, aspect="pad"),
                       encoded, fn_output_signature=tf.TensorSpec([12, 12, 1], tf.uint8))

  tf.saved_model.save(Serve(), str(tmp_path / "serve"))
  loaded = tf.saved_model.load(str(tmp_path / "serve"))
  batch = [_png(_smooth(30, 50)), _jpeg(_smooth(50, 30))]
  got = loaded(tf.constant(batch)).numpy()
  want = np.stack([preprocess.load_image(b, channels=1, size=12, aspect="pad").numpy() for b in batch])
  np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------
# StoredForms: only the decode branches a data set needs, the same pixels
# ---------------------------------------------------------------------------

def _stats(formats, depths, height=96, width=128):
  return {"format": {f: 1 for f in formats}, "bit_depth": {str(d): 1 for d in depths},
          "height": {"min": 1, "max": height, "mean": 1.0},
          "width": {"min": 1, "max": width, "mean": 1.0}}


def test_stored_forms_from_image_stats():
  forms = preprocess.StoredForms.from_image_stats(_stats(["png", "jpeg"], [8]))
  assert forms == preprocess.StoredForms(png8=True, png16=False, jpeg=True, max_short_side=96)
  assert preprocess.StoredForms.from_image_stats(_stats(["png"], [16])) == preprocess.StoredForms(
      png8=False, png16=True, jpeg=False, max_short_side=96)
  # Anything the converter does not write, or no statistics: decode anything.
  assert preprocess.StoredForms.from_image_stats(None) is None
  assert preprocess.StoredForms.from_image_stats({"channels": {"1": 3}}) is None
  assert preprocess.StoredForms.from_image_stats(_stats(["png", "bmp"], [8])) is None
  assert preprocess.StoredForms.from_image_stats(_stats(["png"], [8, 12])) is None
  assert preprocess.StoredForms.from_image_stats(_stats(["jpeg"], [16])) is None
  # Unknown sides: the scaled JPEG decode is kept.
  no_sides = {"format": {"jpeg": 2}, "bit_depth": {"8": 2}}
  assert preprocess.StoredForms.from_image_stats(no_sides).max_short_side == 0


def _forms_images():
  """(name, encoded, form) for every form a record can take."""
  ramp16 = (np.linspace(0, 65535, 40 * 48)).astype(np.uint16).reshape(40, 48)
  return [("png8 grey", _png(_smooth(40, 48)), "png8"),
          ("png8 rgb", _png(_smooth(40, 48, 3)), "png8"),
          ("png16", _png(ramp16), "png16"),
          ("jpeg small", _jpeg(_smooth(40, 48)), "jpeg"),
          ("jpeg rgb large", _jpeg(_smooth(96, 128, 3)), "jpeg")]


@pytest.mark.parametrize("formats,depths", [(["png"], [8]), (["png"], [16]), (["png"], [8, 16]),
                                            (["jpeg"], [8]), (["png", "jpeg"], [8]),
                                            (["png", "jpeg"], [8, 16])])
def test_stored_forms_decode_exactly_as_the_full_contract(formats, depths):
  """Every image a data set's forms admit decodes to the same pixels with and
  without them, inside tf.data (a graph, as in training), for each channel
  count, output size and aspect; max_short_side both exact and larger."""
  for height in (40, 96):
    forms = preprocess.StoredForms.from_image_stats(_stats(formats, depths, height, 128))
    allowed = {("png8" if d == 8 else "png16") for d in depths if "png" in formats}
    allowed |= {"jpeg"} if "jpeg" in formats else set()
    images = [(n, e) for n, e, form in _forms_images() if form in allowed
              and not (n == "jpeg rgb large" and height < 96)]
    assert images
    encoded = tf.constant([e for _, e in images])
    for channels, size, aspect in ((1, 20, "squash"), (3, 20, "pad"), (1, 44, "squash"),
                                   (3, 12, "center_crop")):
      def run(f):
        ds = tf.data.Dataset.from_tensor_slices(encoded).map(
            lambda b: preprocess.load_image(b, channels=channels, size=size, aspect=aspect,
                                            forms=f))
        return [x.numpy() for x in ds]
      for (name, _), want, got in zip(images, run(None), run(forms)):
        np.testing.assert_array_equal(got, want, err_msg=f"{name} {channels} {size} {aspect}")


@pytest.mark.parametrize("formats,depths,image", [
    (["png"], [8], "jpeg small"), (["png"], [8], "png16"), (["png"], [16], "png8 grey"),
    (["jpeg"], [8], "png8 grey"), (["png", "jpeg"], [8], "png16"), (["png", "jpeg"], [8, 16], "bmp")])
def test_a_record_that_contradicts_its_manifest_fails_loudly(formats, depths, image):
  forms = preprocess.StoredForms.from_image_stats(_stats(formats, depths))
  found = {n: e for n, e, _ in _forms_images()}
  buf = io.BytesIO()
  Image.fromarray(_smooth(40, 48)).save(buf, format="BMP")
  found["bmp"] = buf.getvalue()
  ds = tf.data.Dataset.from_tensors(found[image]).map(
      lambda b: preprocess.decode_image(b, 1, min_side=20, forms=forms))
  with pytest.raises(tf.errors.InvalidArgumentError, match="manifest"):
    list(ds)


def test_a_jpeg_larger_than_its_manifest_says_fails_loudly():
  """When the manifest's largest side rules out any DCT scaling, only the
  full-scale decode is built; a JPEG that could have been scaled is refused,
  not decoded differently from the full contract."""
  forms = preprocess.StoredForms.from_image_stats(_stats(["jpeg"], [8], height=40, width=48))
  small, large = _jpeg(_smooth(40, 48)), _jpeg(_smooth(96, 128, 3))
  load = lambda b: preprocess.decode_image(b, 3, min_side=24, forms=forms)  # noqa: E731
  ds = tf.data.Dataset.from_tensors(small).map(load)
  np.testing.assert_array_equal(next(iter(ds)).numpy(),
                                preprocess.decode_image(small, 3, min_side=24).numpy())
  with pytest.raises(tf.errors.InvalidArgumentError, match="shorter side <= 40"):
    list(tf.data.Dataset.from_tensors(large).map(load))
