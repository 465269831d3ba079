"""--low_resolution_range (issue 25's shift check: pneumoniamnist28, the same films at 28 px,
lost its operating point): half the training films go down to a random side and back up inside
the model, as a low-resolution film reaches it. The layer is called directly on small batches."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from tfrecord_tools import pixels
from xraytpu import flags as xflags
from xraytpu.config import Config
from xraytpu.data import augment
from xraytpu.training import train_lib


def _noise(b=16, s=32, c=1, seed=0) -> np.ndarray:
  return np.random.RandomState(seed).uniform(0, 255, (b, s, s, c)).astype(np.float32)


def _high_frequency(x: np.ndarray) -> np.ndarray:
  """Per image: mean |difference| of neighbouring pixels (what blurring removes)."""
  return np.abs(np.diff(x, axis=1)).mean((1, 2, 3)) + np.abs(np.diff(x, axis=2)).mean((1, 2, 3))


def _layer(low=0.2, seed=7, **kw):
  return augment.RandomLowResolution(low=low, seed=seed, **kw)


def test_off_by_default_the_augmentation_is_what_it_was():
  cfg = Config().resolve_augment()
  assert cfg.low_resolution_range == 0.0
  assert Config(augment="none").resolve_augment().low_resolution_range == 0.0
  assert augment.build_augmentation(Config(augment="none").resolve_augment()) is None
  built = augment.build_augmentation(cfg)
  assert [l.name for l in built.layers] == ["random_affine", "random_intensity"]
  # Bit for bit the block the light preset built before the flag existed.
  before = [augment.RandomAffine(rotation_range=cfg.rotation_range,
                                 width_shift_range=cfg.width_shift_range,
                                 height_shift_range=cfg.height_shift_range, zoom_range=cfg.zoom_range,
                                 seed=cfg.seed),
            augment.RandomIntensity(brightness=cfg.brightness_range, contrast=cfg.contrast_range,
                                    seed=cfg.seed + 1)]
  x = tf.constant(_noise(b=4))
  want = x
  for layer in before:
    want = layer(want, training=True)
  np.testing.assert_array_equal(built(x, training=True).numpy(), want.numpy())
  # With the flag, the new layer comes last; the others keep their seeds.
  on = augment.build_augmentation(Config(low_resolution_range=0.3).resolve_augment())
  assert [l.name for l in on.layers] == ["random_affine", "random_intensity", "random_low_resolution"]
  assert on.layers[-1].low == 0.3 and on.layers[-1].seed == cfg.seed + 2


@pytest.mark.parametrize("side", [1, 7, 16, 26, 31, 32])
def test_down_and_up_is_area_then_the_input_resize(side):
  x = _noise(b=1, s=32)
  m = augment.low_resolution_matrices(tf.constant([side]), 32)
  got = tf.einsum("bkw,biwc->bikc", m, tf.einsum("bij,bjwc->biwc", m, x)).numpy()
  low = tf.image.resize(x, [side, side], method="area")
  want = tf.image.resize(low, [32, 32], method="bilinear", antialias=True).numpy()
  np.testing.assert_allclose(got, want, atol=2e-3)
  # The same film through the pixel contract (a uint8 film of `side` px, step 8's resize):
  # within the two roundings to uint8.
  film = np.round(low.numpy()[0]).astype(np.uint8)
  contract = pixels.resize_image(film, 32).numpy().astype(np.float32)
  assert np.abs(got[0] - contract).max() <= 1.5


def test_half_the_films_are_blurred_the_rest_untouched_shape_and_dtype_kept():
  x = _noise(b=32)
  block = augment.build_augmentation(
      Config(augment="none", low_resolution_range=0.2, seed=3).resolve_augment())
  assert [l.name for l in block.layers] == ["random_low_resolution"]
  out = block(tf.constant(x), training=True)
  assert out.shape == x.shape and out.dtype == tf.float32
  out = out.numpy()
  same = np.array([np.array_equal(o, i) for o, i in zip(out, x)])
  hf_in, hf_out = _high_frequency(x), _high_frequency(out)
  assert (hf_out[~same] < 0.8 * hf_in[~same]).all()         # every changed film lost detail
  assert 6 <= same.sum() <= 26                              # about half of 32 each way
  assert out.min() >= 0.0 and out.max() <= 255.0            # a mean of pixels stays in range
  # Inference never changes a film.
  layer = _layer()
  np.testing.assert_array_equal(layer(tf.constant(x)).numpy(), x)
  np.testing.assert_array_equal(layer(tf.constant(x), training=False).numpy(), x)


def test_never_flips():
  img = np.zeros((32, 32, 32, 1), np.float32)
  img[:, :12, :10] = 255.0                                   # bright top-left corner
  out = _layer(low=0.1, probability=1.0)(tf.constant(img), training=True).numpy()[..., 0]
  assert (out[:, :, :16].mean((1, 2)) > out[:, :, 16:].mean((1, 2))).all()
  assert (out[:, :16].mean((1, 2)) > out[:, 16:].mean((1, 2))).all()


def test_seeded_and_compiles_with_xla():
  x = tf.constant(_noise(b=8))
  a, b = _layer(seed=11), _layer(seed=11)
  np.testing.assert_array_equal(a(x, training=True).numpy(), b(x, training=True).numpy())
  assert not np.array_equal(_layer(seed=12)(x, training=True).numpy(),
                            _layer(seed=11)(x, training=True).numpy())
  # Static shapes throughout: the XLA (TPU, --jit_compile) path compiles.
  fn = tf.function(lambda t: a(t, training=True), jit_compile=True)
  out = fn(x).numpy()
  assert out.shape == (8, 32, 32, 1) and np.isfinite(out).all()
  # Reloads from its config (model.keras).
  again = augment.RandomLowResolution.from_config(a.get_config())
  assert (again.low, again.probability, again.seed) == (0.2, augment.LOW_RESOLUTION_PROB, 11)


def test_the_flag_round_trips_and_bad_values_are_one_line():
  fv = flags.FlagValues()
  xflags.define_config_flags(flag_values=fv)
  fv(["train", "--low_resolution_range=0.25"])
  cfg = xflags.config_from_flags(flag_values=fv)
  assert cfg.low_resolution_range == 0.25
  assert cfg.rotation_range == Config().resolve_augment().rotation_range   # the preset untouched
  assert Config.from_dict(cfg.to_dict()).low_resolution_range == 0.25      # config.json
  assert Config.from_dict({}).low_resolution_range == 0.0                  # a run from before
  train_lib.validate_config(Config(data_dir="d", model_dir="m", low_resolution_range=0.5))
  for bad in (-0.1, 1.0, 1.5):
    with pytest.raises(train_lib.TrainError, match="--low_resolution_range must be in") as e:
      train_lib.validate_config(Config(data_dir="d", model_dir="m", low_resolution_range=bad))
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError):
    augment.RandomLowResolution(low=1.0)
