"""The pixel contract's reading steps (tfrecord_tools.pixels, steps 7-8) are versioned per run.

Contract 5 reduces a lossless image by the power of two a JPEG's DCT-scaled decode would use
(block means) and resamples by AREA when shrinking; 4 (runs trained before 5) reduced only
JPEGs and resampled bilinear with antialiasing. A run reads with the version in its
config.json; one that records none was trained under 4.
"""

from __future__ import annotations

import glob
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests._runs import copy_run
from tfrecord_tools import pixels
from xraytpu.config import Config

SHARED_FILMS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                            "chest_xray_400x300")


def _png(a: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG")
  return buf.getvalue()


def _block_means(a: np.ndarray, r: int) -> np.ndarray:
  """The definition: each output pixel the mean of the r x r block's existing pixels."""
  h, w = a.shape
  out = np.zeros((-(-h // r), -(-w // r)))
  for i in range(out.shape[0]):
    for j in range(out.shape[1]):
      out[i, j] = a[i * r:(i + 1) * r, j * r:(j + 1) * r].mean()
  return np.round(out).astype(np.uint8)   # numpy rounds half to even, as tf.round


def test_a_lossless_image_is_reduced_by_block_means_as_a_jpeg_would_be():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (301, 450), dtype=np.uint8)   # partial blocks on both edges
  png = _png(a)
  # The shorter side 301 keeps >= 70 px at 1/4 (76) but not at 1/8 (38): r = 4, as for a JPEG.
  assert int(pixels.jpeg_dct_ratio(tf.io.encode_jpeg(a[..., None]), 70)) == 4
  want = _block_means(a, 4)
  got = pixels.decode_image(png, 1, min_side=70).numpy()[..., 0]
  np.testing.assert_array_equal(got, want)
  forms = pixels.StoredForms(png8=True, png16=False, jpeg=False, max_short_side=301)
  np.testing.assert_array_equal(pixels.decode_image(png, 1, min_side=70, forms=forms).numpy()[..., 0],
                                want)
  # Contract 4 decoded lossless images at full size.
  assert pixels.decode_image(png, 1, min_side=70, contract=4).shape[:2] == (301, 450)
  with pytest.raises(ValueError, match="pixel contract 3"):
    pixels.decode_image(png, 1, min_side=70, contract=3)


def test_step_8_is_area_when_shrinking_and_bilinear_when_growing():
  rng = np.random.default_rng(1)
  big = tf.constant(rng.integers(0, 256, (100, 80, 1), dtype=np.uint8))
  area = tf.image.resize(tf.cast(big, tf.float32), [40, 40], method="area")
  np.testing.assert_array_equal(pixels.resize_image(big, 40).numpy(),
                                tf.cast(tf.round(area), tf.uint8).numpy())
  antialiased = tf.image.resize(big, [40, 40], method="bilinear", antialias=True)
  np.testing.assert_array_equal(pixels.resize_image(big, 40, contract=4).numpy(),
                                tf.cast(tf.round(antialiased), tf.uint8).numpy())
  assert not np.array_equal(pixels.resize_image(big, 40).numpy(),
                            pixels.resize_image(big, 40, contract=4).numpy())
  # Growing on either side: the same under both versions (TTA's views, augment's round trip).
  # (30 x 100 padded shrinks both sides, to 12 x 40: area.)
  for shape, aspects in (((20, 30, 1), pixels.ASPECTS), ((30, 100, 1), ("squash", "center_crop"))):
    small = tf.constant(rng.integers(0, 256, shape, dtype=np.uint8))
    for aspect in aspects:
      np.testing.assert_array_equal(pixels.resize_image(small, 40, aspect).numpy(),
                                    pixels.resize_image(small, 40, aspect, contract=4).numpy())


def test_a_jpeg_film_and_the_same_film_lossless_read_closer_under_5():
  """The agreement contract 5 exists for: a JPEG film and a PNG (or DICOM) of its pixels."""
  films = sorted(glob.glob(os.path.join(SHARED_FILMS, "*", "*.jp*g")))[:12]
  assert films, SHARED_FILMS
  gaps = {4: [], 5: []}
  for path in films:
    with open(path, "rb") as f:
      jpeg = f.read()
    png = _png(tf.io.decode_jpeg(jpeg, 1, dct_method="INTEGER_ACCURATE").numpy()[..., 0])
    for version in gaps:
      a, b = (pixels.load_image(x, channels=1, size=128, contract=version).numpy().astype(int)
              for x in (jpeg, png))
      gaps[version].append(np.abs(a - b).mean())
  # Measured on these films: 0.46 grey levels under 4, 0.14 under 5 (docs/benchmarks.md).
  assert np.mean(gaps[5]) < 0.5 * np.mean(gaps[4]), gaps


def test_a_run_reads_with_the_contract_it_was_trained_with(trained_run, tmp_path):
  from xraytpu.inference import model_call
  from xraytpu.run import ensemble, rundir
  from xraytpu.training import train_lib
  new = rundir.load(trained_run)
  assert new.contract == pixels.CONTRACT_VERSION == 5
  old_dir = copy_run(trained_run, tmp_path)
  config_path = os.path.join(old_dir, rundir.CONFIG)
  with open(config_path) as f:
    doc = json.load(f)
  del doc["pixel_contract"]   # a config.json written before the field existed
  with open(config_path, "w") as f:
    json.dump(doc, f)
  old = rundir.load(old_dir)
  assert old.contract == 4
  # Every door calls the model through InferenceModule: its pixels are the run's version's.
  film = _png(np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8))
  got = model_call.InferenceModule.from_run(old).pixels(tf.constant([film])).numpy()[0]
  want = {v: pixels.load_file(film, conversion=old.conversion, channels=old.channels, size=old.size,
                              contract=v).numpy() for v in (4, 5)}
  np.testing.assert_array_equal(got, want[4])
  assert not np.array_equal(want[4], want[5])
  # Resuming it under today's default would change its pixels mid-run: a difference, refused.
  assert train_lib._config_differences(doc, Config.from_dict({**doc, "pixel_contract": 5})) == \
      ["pixel_contract: 4 -> 5"]
  # An ensemble's members must read alike.
  with open(os.path.join(trained_run, rundir.CONFIG)) as f:
    new_doc = json.load(f)
  with pytest.raises(ensemble.EnsembleError, match="pixel contract"):
    ensemble.check_same([("new", ensemble.contract(trained_run, new_doc)),
                         ("old", ensemble.contract(old_dir, doc))])


def test_train_refuses_a_contract_this_version_cannot_read():
  from xraytpu.training import train_lib
  with pytest.raises(train_lib.TrainError, match=r"--pixel_contract=3: this version reads 4 or 5"):
    train_lib.validate_config(Config(data_dir="d", model_dir="m", pixel_contract=3))


def test_caches_are_kept_apart_by_contract():
  from xraytpu.data import input_pipeline
  keys = {input_pipeline._settings_key("d", ["f"], "train", 32, "squash", 1, False, contract=v)
          for v in pixels.READ_CONTRACTS}
  assert len(keys) == len(pixels.READ_CONTRACTS)
