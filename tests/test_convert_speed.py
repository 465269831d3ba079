"""The converter's speed (issue 21, item 8): step 5's area resize in numpy, threads.

`pixels.area_resize` is held against its definition, `tf.image.resize(method="area")`,
on the shapes the converter meets (a draft-decoded film: scale < 2; integer and large
scales; one side only; colour; 16-bit), and the converter no longer imports scipy for it.
A small job (no process pool) converts its images on the cores as threads, same bytes.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from tfrecord_tools import pixels, shards
from tfrecord_tools.convert import ConvertOptions, convert, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [   # (input shape, dtype, output height, width)
    ((500, 600), np.uint8, 427, 512),       # a 2400x2000 film at DCT scale 1/4 -> 512
    ((300, 400), np.uint8, 97, 129),        # scale ~3.1
    ((256, 256), np.uint8, 64, 64),         # integer scale 4
    ((1000, 37), np.uint8, 129, 5),         # large scale, narrow
    ((120, 90), np.uint8, 120, 41),         # columns only
    ((90, 120), np.uint8, 41, 120),         # rows only
    ((90, 120), np.uint8, 1, 1),            # one pixel: the mean
    ((150, 110, 3), np.uint8, 64, 47),      # RGB
    ((150, 110), np.uint16, 64, 47),        # 16-bit grey
]


def _film(shape, dtype, seed=0):
  """Smooth structure with grain, the whole range of the dtype."""
  rng = np.random.default_rng(seed)
  top = np.iinfo(dtype).max
  yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
  x = (np.sin(yy / 7.0) * np.cos(xx / 5.0) + 1) / 2 * top
  if len(shape) == 3:
    x = np.stack([x * (c + 1) / shape[2] for c in range(shape[2])], -1)
  return np.clip(x + rng.normal(0, top / 40, shape), 0, top).astype(dtype)


def _exact(a, height, width):
  """The definition in float64, as dense matrices: output i of n averages input cells
  [i s, (i + 1) s), s = n_in / n, each weighted by the part of it the interval covers."""
  def matrix(n_in, n_out):
    s = n_in / n_out
    lo, hi = np.arange(n_out)[:, None] * s, (np.arange(n_out)[:, None] + 1) * s
    j = np.arange(n_in)[None, :]
    return np.clip(np.minimum(j + 1, hi) - np.maximum(j, lo), 0, None) / s
  rows = np.tensordot(matrix(a.shape[0], height), a.astype(np.float64), axes=(1, 0))
  return np.moveaxis(np.tensordot(matrix(a.shape[1], width), rows, axes=(1, 1)), 0, 1)


@pytest.mark.parametrize("shape,dtype,height,width", CASES)
def test_area_resize_is_the_area_definition_and_tensorflows(shape, dtype, height, width):
  import tensorflow as tf
  a = _film(shape, dtype)
  ours = pixels.area_resize(a, height, width)
  assert ours.dtype == np.float32 and ours.shape == (height, width) + shape[2:]
  grey = np.iinfo(dtype).max / 255   # one 8-bit grey level in the dtype's units
  np.testing.assert_allclose(ours, _exact(a, height, width), rtol=0, atol=0.002 * grey)
  x = a if a.ndim == 3 else a[..., None]
  theirs = tf.image.resize(x.astype(np.float32), [height, width], method="area").numpy()
  theirs = theirs if a.ndim == 3 else theirs[..., 0]
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=0.02 * grey)   # TF's float32: <= 0.007
  if dtype == np.uint8:   # the contract: within one grey level once rounded
    rounded = np.abs(np.rint(ours) - np.rint(theirs))
    assert rounded.max() <= 1 and (rounded > 0).mean() < 0.01


def test_the_chunked_product_and_the_scratch_memory_give_the_same_pixels(monkeypatch):
  a = _film((500, 600), np.uint8)
  whole = pixels.area_resize(a, 427, 512)
  monkeypatch.setattr(pixels, "_AREA_CHUNK", 5000)   # a few output rows per einsum
  np.testing.assert_array_equal(pixels.area_resize(a, 427, 512), whole)
  np.testing.assert_array_equal(pixels.area_resize(a, 427, 512, scratch=True), whole)
  # Without scratch, a result is the caller's own: a later call leaves it alone.
  kept = pixels.area_resize(a, 427, 512)
  pixels.area_resize(255 - a, 427, 512)
  pixels.area_resize(255 - a, 427, 512, scratch=True)
  np.testing.assert_array_equal(kept, whole)


def test_prepare_image_resizes_as_area_resize_rounds_it():
  a = _film((600, 500), np.uint8, seed=1)
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG")
  prepared = pixels.prepare_image(buf.getvalue(), max_side=256)
  got = np.asarray(Image.open(io.BytesIO(prepared.encoded)))
  np.testing.assert_array_equal(got, np.rint(pixels.area_resize(a, 256, 213)).astype(np.uint8))


def test_the_converter_resizes_without_importing_scipy():
  """scipy.sparse cost 0.1-0.2 s of import in every converter process."""
  code = (
      "import io, sys\n"
      "from PIL import Image\n"
      "from tfrecord_tools import pixels\n"
      "buf = io.BytesIO(); Image.new('L', (300, 200), 7).save(buf, format='JPEG')\n"
      "p = pixels.prepare_image(buf.getvalue(), max_side=97)\n"
      "assert (p.width, p.height) == (97, 65), (p.width, p.height)\n"
      "print(sorted(m for m in sys.modules if m.split('.')[0] == 'scipy'))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT)
  assert out.stdout.strip() == "[]", out.stdout


def _shards(folder: str) -> dict[str, bytes]:
  return {n: open(os.path.join(folder, n), "rb").read()
          for n in sorted(os.listdir(folder)) if n.endswith(".tfrecord")}


def test_a_small_job_converts_on_the_cores_as_threads_same_shards(demo_images_dir, tmp_path,
                                                                  monkeypatch):
  seen = []
  write_shard = shards.write_shard

  def spy(task):
    seen.append(task.threads)
    return write_shard(task)
  monkeypatch.setattr(shards, "write_shard", spy)
  monkeypatch.setattr(plan, "_resolve_workers", lambda n: n or 2)   # "2 cores" anywhere
  for name, workers in (("threads", 0), ("serial", 1)):
    convert(ConvertOptions(input_dir=demo_images_dir, output_dir=str(tmp_path / name),
                           max_side=32, num_workers=workers, quiet=True), log=lambda m: None)
  # 60 images: no process pool (< 100 a worker); the default runs each shard on 2 threads,
  # --num_workers=1 on one.
  assert seen == [2] * (len(seen) // 2) + [1] * (len(seen) // 2) and seen
  threaded, serial = _shards(str(tmp_path / "threads")), _shards(str(tmp_path / "serial"))
  assert threaded == serial and threaded


def test_ordered_map_keeps_order_stops_on_an_error_and_restores_warning_filters():
  def slow(i):
    time.sleep(0.002 * (i % 3))   # later items often finish first
    with warnings.catch_warnings():   # what pixels does per image, not thread-safe
      warnings.simplefilter("ignore")
      return i * i, threading.get_ident()

  filters = list(warnings.filters)
  out = list(shards._ordered_map(slow, range(24), 3))
  assert [v for v, _ in out] == [i * i for i in range(24)]
  assert len({t for _, t in out}) > 1          # on more than one thread
  assert warnings.filters == filters

  started = []

  def fails(i):
    started.append(i)
    if i == 4:
      raise ValueError("bad image")
    return i
  with pytest.raises(ValueError, match="bad image"):
    list(shards._ordered_map(fails, range(100), 2))
  assert max(started) < 4 + 2 * 2 + 1          # at most 2 x threads ahead: the rest never ran
  assert list(shards._ordered_map(lambda i: -i, range(5), 1)) == [0, -1, -2, -3, -4]
