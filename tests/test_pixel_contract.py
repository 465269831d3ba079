"""The pixel contract and the one inference path (issue 12).

A film must get the same answer through every door: the converter's numpy/PIL
half and the graph half agree within one grey level; the exported SavedModel
fed a film's ORIGINAL bytes answers as `xraytpu.predict` and `xraytpu.serve`
do; evaluation (which reads the converted record) sees the same pixels.
"""

from __future__ import annotations

import glob
import io
import os

import numpy as np
import pytest
from PIL import Image

from tfrecord_tools import pixels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _decode(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data))).astype(np.int64)


def _large_real_films(shared_data, n_png: int = 5, n_jpeg: int = 3) -> list[str]:
  """covid_ct's largest PNGs (up to ~1.7k px, RGB/RGBA) and JPEGs."""
  files = sorted(glob.glob(str(shared_data / "covid_ct" / "*" / "*" / "*")))
  by_width = sorted(files, key=lambda f: (-Image.open(f).size[0], f))
  pngs = [f for f in by_width if f.lower().endswith(".png")][:n_png]
  jpegs = [f for f in by_width if f.lower().endswith((".jpg", ".jpeg"))][:n_jpeg]
  return pngs + jpegs


def _variants() -> list[tuple[str, bytes]]:
  """Full-size films in the shapes users hold: EXIF-rotated RGB-stored-grey JPEGs,
  RGBA / LA / palette / 16-bit PNGs."""
  yy, xx = np.mgrid[0:1100, 0:900]
  grey = ((np.sin(yy / 37.0) + np.cos(xx / 23.0)) * 60 + 128).astype(np.uint8)
  rgb = Image.fromarray(np.stack([grey] * 3, -1))
  out = []
  for orientation in (1, 3, 6, 8, 5):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=92, exif=exif.tobytes())
    out.append((f"jpeg-exif{orientation}", buf.getvalue()))
  for mode in ("RGBA", "LA", "P"):
    buf = io.BytesIO()
    (rgb.convert(mode) if mode != "P" else rgb.convert("L").convert("P")).save(buf, format="PNG")
    out.append((f"png-{mode}", buf.getvalue()))
  buf = io.BytesIO()
  Image.fromarray(grey.astype(np.uint16) * 257).save(buf, format="PNG")
  out.append(("png-16bit", buf.getvalue()))
  return out


def test_area_resize_numpy_equals_tensorflow_on_real_films(shared_data):
  import tensorflow as tf
  for path in _large_real_films(shared_data, 3, 2):
    a = np.asarray(Image.open(path).convert("L"))
    for side in (512, 299, 97):
      h, w = a.shape
      s = side / max(h, w)
      th, tw = max(1, round(h * s)), max(1, round(w * s))
      ours = np.rint(pixels.area_resize(a, th, tw))
      theirs = tf.round(tf.image.resize(a[..., None].astype(np.float32), [th, tw],
                                        method="area")).numpy()[..., 0]
      assert np.abs(ours - theirs).max() <= 1, (path, side)
      assert (ours != theirs).mean() < 0.01, (path, side)


@pytest.mark.parametrize("args", [
    dict(max_side=512, image_format="png"),
    dict(max_side=256, channels="1", image_format="png"),
    dict(max_side=300, channels="3", image_format="png"),
    dict(max_side=0),
])
def test_graph_replays_the_converter_within_one_grey_level(shared_data, args):
  """prepare_in_graph (TF ops) = prepare_image (PIL/numpy) on real and awkward films."""
  import tensorflow as tf
  fn = tf.function(lambda e: pixels.prepare_in_graph(e, **args))
  cases = [(os.path.basename(p), open(p, "rb").read()) for p in _large_real_films(shared_data)]
  cases += _variants()
  for name, data in cases:
    ref = pixels.prepare_image(data, **args)
    got = fn(tf.constant(data)).numpy()
    a, g = _decode(ref.encoded), _decode(got)
    assert a.shape == g.shape, (name, a.shape, g.shape)
    tolerance = 257 if ref.bit_depth == 16 else 1   # one 8-bit grey level
    assert np.abs(a - g).max() <= tolerance, (name, np.abs(a - g).max())
    if ref.encoded == data:   # kept byte for byte by the converter: by the graph too
      assert got == data, name


def test_exif_orientation_in_the_graph():
  import tensorflow as tf
  for name, data in _variants()[:5]:
    want = _decode(pixels.prepare_image(data, image_format="png").encoded)
    got = _decode(pixels.prepare_in_graph(tf.constant(data), image_format="png").numpy())
    assert want.shape == got.shape, name
    assert np.abs(want - got).max() == 0, name   # no resampling: exactly PIL's exif_transpose


def test_accurate_idct_matches_pil(shared_data):
  """TF's default JPEG IDCT differs from PIL's by several grey levels; the contract's does not."""
  import tensorflow as tf
  for path in _large_real_films(shared_data, 0, 3):
    data = open(path, "rb").read()
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    got = pixels.decode_image(tf.constant(data), 3).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def full_size_run(shared_data, tmp_path_factory):
  """Real full-size films + 2048-px synthetic films, converted with --max_side, a 1-epoch run."""
  from tfrecord_tools import convert as convert_lib, synthetic
  from xraytpu.training import train_lib
  from xraytpu.config import Config
  root = tmp_path_factory.mktemp("contract")
  src = root / "images"                       # class-per-folder: NORMAL/, PNEUMONIA/
  synthetic.generate(str(root / "synthetic"), num_images=8, size=2048, num_classes=2, seed=3,
                     image_format="jpeg", size_jitter=0.2)
  films = [(p, os.path.basename(os.path.dirname(p)))
           for p in sorted(glob.glob(str(root / "synthetic" / "*" / "*.jp*g")))]
  films += [(p, ("NORMAL", "PNEUMONIA")[i % 2]) for i, p in enumerate(_large_real_films(shared_data, 4, 3))]
  originals = {}
  for i, (path, cls) in enumerate(films):
    originals[f"{cls}/f{i}{os.path.splitext(path)[1].lower()}"] = open(path, "rb").read()
  for name, data in _variants():
    cls = "PNEUMONIA" if "exif" in name else "NORMAL"
    originals[f"{cls}/{name}{'.jpg' if name.startswith('jpeg') else '.png'}"] = data
  for rel, data in originals.items():
    (src / rel).parent.mkdir(parents=True, exist_ok=True)
    (src / rel).write_bytes(data)
  originals = {rel: str(src / rel) for rel in originals}
  data_dir = str(root / "data")
  convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=str(src), output_dir=data_dir, max_side=256, val_fraction=0.25, test_fraction=0.0,
      num_workers=1, quiet=True, seed=0))
  run_dir = str(root / "run")
  cfg = Config(data_dir=data_dir, model_dir=run_dir, model="xray_cnn", image_size=64, batch_size=4,
               epochs=1, augment="none", cache="off", seed=0, channels=3).resolve_augment()
  train_lib.train_and_evaluate(cfg, verbose=0)
  return data_dir, run_dir, originals


@pytest.mark.slow
def test_export_serve_and_evaluate_answer_as_predict_on_original_bytes(full_size_run, tmp_path):
  import tensorflow as tf
  from tfrecord_tools import records, schema
  from xraytpu.inference import export_lib, model_call, predict_lib
  from xraytpu.run import rundir
  from xraytpu.serving import service, http_api
  data_dir, run_dir, originals = full_size_run
  rundir.write_operating_point(run_dir, {"threshold": 0.5, "policy": "fixed:0.5", "temperature": 1.3})
  files = sorted(originals.values())

  # predict: the CLI's library path on the original files.
  loaded = predict_lib.load(run_dir)
  want = predict_lib.predict_files(loaded, files)
  assert all(r.error is None for r in want), [r.error for r in want]
  expected = np.array([[r.probabilities[c] for c in loaded.classes] for r in want])

  # export: serving_default fed the ORIGINAL bytes, as TF Serving / Vertex AI clients send them.
  path = export_lib.export(run_dir)
  served = tf.saved_model.load(path)
  out = served.signatures["serving_default"](
      image_bytes=tf.constant([open(f, "rb").read() for f in files]))
  np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-3)
  assert [s.decode() for s in out["label"].numpy()] == [r.label for r in want]

  # serve: the web API's application layer on the same bytes.
  app = service.App(loaded, http_api.ServeOptions(model_dir=run_dir))
  try:
    answer = app.predict([(os.path.basename(f), open(f, "rb").read()) for f in files])
  finally:
    app.close()
  got = np.array([[p["probabilities"][c] for c in loaded.classes] for p in answer["predictions"]])
  np.testing.assert_allclose(got, expected, atol=1e-6)
  assert [p["label"] for p in answer["predictions"]] == [r.label for r in want]

  # evaluation reads the converted record: the same pixels within one grey level, so
  # (nearly) the same probabilities.
  manifest = schema.read_manifest(data_dir)
  stored = {}
  for split in manifest["splits"]:
    for shard in schema.shard_paths(data_dir, manifest, split):
      for raw in tf.data.TFRecordDataset(shard):
        ex = tf.io.parse_single_example(raw, records.feature_spec())
        stored[ex[records.FILENAME].numpy().decode()] = ex[records.ENCODED]
  module = model_call.module_of(loaded)
  worst_pixel, worst_prob = 0, 0.0
  for rel, path in originals.items():
    from_file = module.pixels(tf.constant([open(path, "rb").read()]))[0].numpy().astype(int)
    from_record = pixels.load_image(stored[rel], channels=loaded.channels, size=loaded.size,
                                    aspect=loaded.aspect).numpy().astype(int)
    worst_pixel = max(worst_pixel, int(np.abs(from_file - from_record).max()))
    p_file = module.predict_batches(from_file[None].astype(np.uint8))["probabilities"]
    p_record = module.predict_batches(from_record[None].astype(np.uint8))["probabilities"]
    worst_prob = max(worst_prob, float(np.abs(p_file - p_record).max()))
  print(f"record vs original bytes: max pixel difference {worst_pixel}, max probability "
        f"difference {worst_prob:.2e} over {len(originals)} films")
  assert worst_pixel <= 1
  assert worst_prob <= 1e-3
