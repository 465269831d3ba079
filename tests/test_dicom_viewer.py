"""DICOM as a viewer shows it, and sizes held against the limit before any decoding.

The default rendering (`--dicom_window=viewer`) is the standard's display pipeline: modality
LUT, the file's VOI LUT or window, else the image's own value range, then MONOCHROME1
inverted; every door (convert, predict, serve) renders alike and records what it applied.
The same film as JPEG and as DICOM (12- to 16-bit, intercepts, MONOCHROME1, RLE, with and
without a window) scores the same. Rows x Columns x frames come from the header and are held
against the pixel limit before the pixel data is touched, and decoding stays within serve's
stated bytes per pixel.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom import uid  # noqa: E402

from benchmarks.dicom_presentation import KINDS, gaps, kind_name, shown  # noqa: E402
from tests.test_dicom import _bytes, _dataset, _ramp  # noqa: E402
from tfrecord_tools import convert as convert_lib, dicom, pixels, records, schema, synthetic  # noqa: E402


def _ids(case):
  return kind_name(*case)


def _values(seed: int = 0, size: int = 64) -> np.ndarray:
  """A film's values as a viewer shows them, a little past black and white at both ends."""
  rng = np.random.default_rng(seed)
  film = synthetic.render(size, size, 1, synthetic._anatomy(rng), rng)
  return 1.1 * film - 0.05


def _decode(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data))).astype(np.int64)


# -- the rendering ----------------------------------------------------------------------


@pytest.mark.parametrize("case", KINDS, ids=_ids)
def test_viewer_shows_every_storage_kind_as_the_film(case):
  """Default rendering = what a viewer shows: within one grey level, for every bit depth,
  intercept, slope, polarity and compression, with the file's window or the film's range.
  `full` (the default before) scales the stored bit depth's whole range: tens of levels off."""
  kind, window = case
  values = _values()
  data = synthetic.store_dicom(values, kind, window=window)
  want = shown(values, window)
  p = pixels.prepare_image(data)
  assert (p.source_format, p.bit_depth, p.image_format) == ("DICOM", 8, "png")
  assert np.abs(_decode(p.encoded) - want).max() <= 1
  r = json.loads(p.rendering)
  k = synthetic.STORAGE_KINDS[kind]
  assert r["window"] == "viewer" and r["bit_depth"] == 8
  assert r["inverted"] == (k.photometric == "MONOCHROME1")
  if window:
    assert (r["voi"], r["function"]) == ("file window", "LINEAR")
    assert (r["center"], r["width"]) == (k.low + k.span / 2 + 0.5, k.span + 1)
    assert p.rendering_summary == "file window LINEAR"
  else:   # the film's own modality range, as the LINEAR_EXACT window it amounts to
    m = np.asarray(pydicom.pixels.apply_modality_lut(pydicom.dcmread(io.BytesIO(data)).pixel_array,
                                                     pydicom.dcmread(io.BytesIO(data))), float)
    assert (r["voi"], r["function"]) == ("data range", "LINEAR_EXACT")
    assert r["center"] == pytest.approx((m.min() + m.max()) / 2) and r["width"] == pytest.approx(np.ptp(m))
  full = pixels.prepare_image(data, dicom_window="full")
  assert full.bit_depth == 16 and json.loads(full.rendering)["voi"] == "modality range"
  assert np.abs((_decode(full.encoded) + 128) // 257 - want).max() > 20


def test_viewer_takes_the_files_voi_lut_first_and_leaves_padding_out_of_the_range():
  ramp = _ramp()
  voi = np.round(np.sqrt(np.arange(4096) / 4095.0) * 50000 + 5000).astype(np.uint16)
  item = pydicom.Dataset()
  item.LUTDescriptor = [4096, 0, 16]
  item.add_new("LUTData", "US", voi.tolist())
  ds = pydicom.dcmread(io.BytesIO(_bytes(_dataset(ramp, VOILUTSequence=[item], WindowCenter=10,
                                                  WindowWidth=5))))
  np.testing.assert_array_equal(dicom.pixels_of(ds), dicom.pixels_of(ds, "file"))
  # Pixel Padding Value: the area outside the detector does not widen the film's range.
  film = np.linspace(1000, 3000, 16 * 16).round().reshape(16, 16).astype(np.uint16)
  film[:, :3] = 0
  ds = pydicom.dcmread(io.BytesIO(_bytes(_dataset(film, PixelPaddingValue=0))))
  out = dicom.pixels_of(ds).astype(np.int64)
  inside = film[:, 3:].astype(float)
  want = np.rint((inside - inside.min()) / (inside.max() - inside.min()) * 255)
  np.testing.assert_array_equal(out[:, 3:], want)
  assert (out[:, :3] == 0).all()
  ds = pydicom.dcmread(io.BytesIO(_bytes(_dataset(film))))      # no padding declared: 0 is the film's
  assert dicom.pixels_of(ds)[:, 3:].min() == round(film[:, 3:].min() / film.max() * 255)


@pytest.mark.parametrize("attrs,windows,reason", [
    (dict(RescaleSlope=0, RescaleIntercept=0), ("viewer", "full", "file", "none", "lung"),
     "RescaleSlope 0"),
    (dict(WindowCenter=100, WindowWidth=0), ("viewer", "file"), "WindowWidth 0"),
    (dict(WindowCenter=100, WindowWidth=-5), ("viewer", "file"), "WindowWidth -5"),
    (dict(WindowCenter=100, WindowWidth=0.5, VOILUTFunction="LINEAR"), ("viewer",), "WindowWidth 0.5"),
    (dict(WindowCenter=100, WindowWidth=0, VOILUTFunction="SIGMOID"), ("viewer",), "WindowWidth 0"),
    (dict(WindowCenter=100, WindowWidth=50, VOILUTFunction="GAMMA"), ("viewer",), "VOILUTFunction"),
    (dict(BitsStored=17), ("viewer", "full"), "BitsStored 17"),
], ids=["slope 0", "width 0", "width < 0", "LINEAR width < 1", "SIGMOID width 0", "unknown function",
        "BitsStored > BitsAllocated"])
def test_invalid_headers_are_refused_with_a_reason_not_rendered_blank(attrs, windows, reason):
  data = _bytes(_dataset(_ramp(), **attrs))
  for window in windows:
    with pytest.raises(pixels.ImageError, match=f"invalid DICOM header: {reason}"):
      pixels.prepare_image(data, dicom_window=window)
  if "WindowWidth" in attrs:   # a window the rendering does not use is no reason to refuse
    assert pixels.prepare_image(data, dicom_window="full").bit_depth == 16


# -- the same film as JPEG and as DICOM scores the same -------------------------------------


@pytest.fixture(scope="module")
def loaded(trained_run):
  from xraytpu.inference import predict_lib
  return predict_lib.load(trained_run)


def test_the_same_film_as_jpeg_and_as_dicom_scores_within_0_02(loaded, demo_data_dir):
  """The demo's test films, each as JPEG and as every storage kind: the run renders DICOM as
  its data was converted (viewer, the converter's default) and scores both alike.
  benchmarks/dicom_presentation.py prints the table per kind, before (full) and after."""
  assert loaded.conversion["dicom_window"] == "viewer"
  import glob
  root = schema.read_manifest(demo_data_dir)["args"]["input_dir"]
  pngs = sorted(glob.glob(os.path.join(root, "test", "*", "*.png")))[:4]
  films = [1.1 * np.asarray(Image.open(p).convert("L"), np.float64) / 255.0 - 0.05 for p in pngs]
  worst = {kind_name(*k): round(max(g), 4) for k, g in gaps(loaded, films).items()}
  assert max(worst.values()) <= 0.02, worst


# -- one rendering at every door -----------------------------------------------------------


def _write_kinds(root) -> dict[str, bytes]:
  files = {}
  for i, (kind, window) in enumerate(KINDS):
    cls = ("NORMAL", "PNEUMONIA")[i % 2]
    name = f"{cls}/f{i:02d}.dcm"
    files[name] = synthetic.store_dicom(_values(i, 48), kind, window=window, uid_seed=str(i))
    path = os.path.join(root, *name.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(files[name])
  return files


def test_a_dicom_trained_run_renders_identically_at_convert_predict_and_serve(loaded, tmp_path):
  """Converted records, predict's pixels and serve's pixels of the same DICOM files are equal
  (the run's manifest says viewer); each record says what it was rendered with."""
  import tensorflow as tf
  from xraytpu.inference import predict_lib
  from xraytpu.serving import service
  inp, out = tmp_path / "in", tmp_path / "out"
  files = _write_kinds(str(inp))
  m = convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=str(inp), output_dir=str(out), num_workers=1, quiet=True, val_fraction=0,
      test_fraction=0))
  assert m["args"]["dicom_window"] == "viewer" and m["num_converted"] == len(files)
  assert m["image_stats"]["dicom_rendering"] == {"data range": len(files) // 2,
                                                 "file window LINEAR": len(files) // 2}
  run = dataclasses.replace(loaded, conversion=pixels.conversion_args(m["args"]), module_cache=None)
  rendered = {}
  for shard in m["splits"]["train"]["shards"]:
    for raw in tf.data.TFRecordDataset(str(out / shard["file"])):
      ex = tf.io.parse_single_example(raw, records.feature_spec())
      name = ex[records.FILENAME].numpy().decode()
      rendered[name] = json.loads(ex[records.DICOM_RENDERING].numpy())
      from_record = pixels.load_image(ex[records.ENCODED], channels=run.channels, size=run.size,
                                      aspect=run.aspect).numpy()
      path = str(inp / name)
      (r,) = predict_lib.predict_files(run, [path])
      assert r.error is None
      from xraytpu.inference import model_call
      from_predict = predict_lib.file_pixels(model_call.module_of(run), predict_lib.file_bytes(path))
      from_serve = service.prepare_upload(run, files[name], max_pixels=10_000, name=name)
      np.testing.assert_array_equal(from_predict, from_record)
      np.testing.assert_array_equal(from_serve, from_record)
  assert set(rendered) == set(files)
  assert {r["voi"] for r in rendered.values()} == {"file window", "data range"}
  assert all(r["window"] == "viewer" and r["bit_depth"] == 8 for r in rendered.values())
  # A run converted before viewer existed (its manifest says full) renders as it always did.
  old = dataclasses.replace(run, conversion={**run.conversion, "dicom_window": "full"})
  data = files["NORMAL/f00.dcm"]
  assert pixels.dicom_window_of(old.conversion) == "full"
  assert service.prepare_upload(old, data, max_pixels=10_000).tolist() != \
      service.prepare_upload(run, data, max_pixels=10_000).tolist()


# -- limits before decoding ------------------------------------------------------------------


def _lying_header(rows: int, columns: int, frames: int = 1, compressed: bool = False) -> bytes:
  """A DICOM file whose header promises rows x columns x frames pixels and whose pixel data
  holds a few bytes: decoding it would fail (or, were it real, take gigabytes)."""
  ds = _dataset(_ramp())
  ds.Rows, ds.Columns = rows, columns
  if frames > 1:
    ds.NumberOfFrames = frames
  if compressed:
    ds.file_meta.TransferSyntaxUID = uid.RLELossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\0" * 64])
  return _bytes(ds)


@pytest.fixture
def no_decoding(monkeypatch):
  """Any attempt to decode DICOM pixel data fails the test."""
  def refuse(*args, **kwargs):
    raise AssertionError("the pixel data was decoded")
  monkeypatch.setattr(dicom, "_pixel_array", refuse, raising=False)
  monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(refuse))


def test_the_size_is_read_from_the_header_and_refused_before_decoding(no_decoding, tmp_path):
  big = _lying_header(10_000, 10_000, compressed=True)        # 1e8 pixels in 1 kB
  frames = _lying_header(1000, 1000, frames=60)                # 6e7 pixels over 60 frames
  assert dicom.header_size(big) == (10_000, 10_000, 1)
  assert pixels.header_size(frames) == (1000, 1000, 60)
  for data, size in ((big, "10000x10000 = 100000000"), (frames, "1000x1000x60 frames = 60000000")):
    for door in (lambda d: pixels.prepare_image(d), lambda d: pixels.graph_input(d)):
      with pytest.raises(pixels.ImageError, match=f"image too large: {size} pixels, more than the "
                                                  "limit of 50000000"):
        door(data)
  with pytest.raises(pixels.ImageError, match="more than the limit of 1000 "):
    pixels.graph_input(_bytes(_dataset(_ramp(shape=(40, 40)))), max_pixels=1000)
  with pytest.raises(pixels.ImageError, match="image too large: 40x40"):   # PNG/JPEG too
    buf = io.BytesIO()
    Image.new("L", (40, 40)).save(buf, format="PNG")
    pixels.graph_input(buf.getvalue(), max_pixels=1000)
  # the converter: skipped with the reason, its --max_pixels honoured
  for k, cls in enumerate(("NORMAL", "PNEUMONIA")):
    (tmp_path / "in" / cls).mkdir(parents=True)
    for side in (20, 40):
      small = io.BytesIO()
      Image.new("L", (side, side), 10 * k + side).save(small, format="PNG")
      (tmp_path / "in" / cls / f"{side}.png").write_bytes(small.getvalue())
  (tmp_path / "in" / "NORMAL" / "big.dcm").write_bytes(big)
  m = convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"), num_workers=1, quiet=True,
      max_skipped_fraction=0.5, val_fraction=0, test_fraction=0))
  assert m["args"]["max_pixels"] == pixels.MAX_PIXELS
  assert [s["reason"].split(":")[0] for s in m["skipped"]] == ["image too large"]
  m = convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out2"), num_workers=1, quiet=True,
      max_skipped_fraction=1.0, val_fraction=0, test_fraction=0, max_pixels=1000))
  assert m["num_skipped"] == 3 and all("(--max_pixels)" in s["reason"] for s in m["skipped"])
  assert m["num_converted"] == 2                               # the 20 x 20 films
  with pytest.raises(convert_lib.ConvertError, match="--max_pixels=0"):
    convert_lib.convert(convert_lib.ConvertOptions(input_dir=str(tmp_path / "in"),
                                                   output_dir=str(tmp_path / "o3"), max_pixels=0))


def test_predict_and_serve_refuse_from_the_header(loaded, no_decoding, tmp_path):
  from xraytpu.inference import predict_lib
  from xraytpu.serving import service
  big = tmp_path / "big.dcm"
  big.write_bytes(_lying_header(10_000, 10_000, compressed=True))
  frames = _lying_header(100, 100, frames=5)
  small = tmp_path / "small.dcm"
  small.write_bytes(_bytes(_dataset(_ramp(shape=(40, 40)))))
  big_r, small_r = predict_lib.predict_files(loaded, [str(big), str(small)], max_pixels=1000)
  assert big_r.error.startswith("image too large: 10000x10000 = 100000000 pixels, more than the "
                                "limit of 1000 (--max_pixels)")
  assert small_r.error.startswith("image too large: 40x40 = 1600 pixels")
  (r,) = predict_lib.predict_files(loaded, [str(big)])         # the default limit
  assert r.error.startswith("image too large: 10000x10000") and "50000000" in r.error
  for data, size in ((big.read_bytes(), "10000x10000 = 100000000"), (frames, "100x100x5 frames = 50000")):
    with pytest.raises(service.RequestError) as e:
      service.prepare_upload(loaded, data, max_pixels=20_000)
    assert e.value.status == 413 and f"image is {size} pixels" in e.value.message
  assert service.header_size(frames) == (100, 100, 5)

  class Budget(service.PixelBudget):
    def hold(self, pixels, timeout=None):
      self.asked = pixels
      return super().hold(pixels, timeout)

  budget = Budget(100_000)
  with pytest.raises(service.RequestError):   # the multi-frame refusal comes after the budget is held
    service.prepare_upload(loaded, frames, max_pixels=100_000, budget=budget)
  assert budget.asked == 50_000


# -- serve's memory bound holds for DICOM ----------------------------------------------------

_MEASURE = textwrap.dedent("""
    import io, json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf
    from tfrecord_tools import pixels

    def hwm():
      with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

    out = {}
    for path, small, window, channels in json.loads(sys.argv[1]):
      conv = pixels.conversion_args({"dicom_window": window})
      load = tf.function(lambda b: pixels.load_file(b, conversion=conv, channels=channels, size=224))
      load(tf.constant(pixels.graph_input(open(small, "rb").read(), dicom_window=window))).numpy()
      data = open(path, "rb").read()
      with open("/proc/self/clear_refs", "w") as f:   # VmHWM := VmRSS
        f.write("5")
      idle = hwm()
      load(tf.constant(pixels.graph_input(data, dicom_window=window))).numpy()
      out[os.path.basename(path)] = hwm() - idle
    print(json.dumps(out))
""")


def _big_dicom(path, side: int, photometric: str, rle: bool = False) -> None:
  """A smooth film of side x side pixels (RLE-compressible: rows repeat)."""
  y = np.linspace(0, 1, side)[:, None]
  x = np.linspace(0, 1, side)[None, :]
  v = 0.5 + 0.4 * np.sin(8 * x + 3 * y)
  if photometric == "YBR_FULL":
    a = np.stack([np.rint(v * 255).astype(np.uint8), np.full(v.shape, 120, np.uint8),
                  np.full(v.shape, 140, np.uint8)], -1)
    ds = _dataset(a, "YBR_FULL", 8)
  else:
    ds = _dataset(np.rint(300 + v * 3000).astype(np.uint16), photometric, 12,
                  RescaleSlope=1, RescaleIntercept=-1024)
  if rle:
    ds.compress(uid.RLELossless, generate_instance_uid=False)
  ds.save_as(path, enforce_file_format=True)


def test_dicom_decoding_stays_within_serves_bytes_per_pixel(tmp_path):
  """Peak RSS of rendering a 9 Mpx DICOM and decoding it in the graph (what serve does per
  image, measured as VmHWM in a fresh process) per pixel: within DECODE_BYTES_PER_PIXEL, the
  figure serve's memory bound uses (docs/serving.md). Before issue 23: 36-44 bytes per pixel
  (grey), 102 (colour)."""
  from xraytpu.serving import http_api
  jobs = []
  for name, photometric, rle, window, channels in (
      ("grey16_full", "MONOCHROME2", False, "full", 1),
      ("grey_rle_viewer", "MONOCHROME1", True, "viewer", 1),
      ("ybr_viewer", "YBR_FULL", False, "viewer", 3)):
    big, small = tmp_path / f"{name}.dcm", tmp_path / f"{name}_small.dcm"
    _big_dicom(big, 3000, photometric, rle)
    _big_dicom(small, 64, photometric, rle)
    jobs.append((str(big), str(small), window, channels))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd()] + sys.path)}
  done = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(jobs)], capture_output=True,
                        text=True, timeout=600, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert done.returncode == 0, done.stderr[-2000:]
  per_pixel = {k: v / 3000 ** 2 for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
  assert max(per_pixel.values()) <= http_api.DECODE_BYTES_PER_PIXEL, per_pixel
