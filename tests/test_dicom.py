"""DICOM through every door (issue 13): tfrecord_tools.dicom against pydicom's own LUT
pipeline, the converter (found, rendered, skipped with reasons, split by PatientID),
predict and serve (the same film scores the same as PNG or as any DICOM variant)."""

from __future__ import annotations

import glob
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom import uid  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: E402

from tfrecord_tools import convert as convert_lib, dicom, pixels, records, schema, synthetic  # noqa: E402

WINDOWS = ("viewer", "full", "file", "none", "1800,2400")


# -- building DICOM files --------------------------------------------------------


def _dataset(stored: np.ndarray | None, photometric: str = "MONOCHROME2", bits: int = 12,
             sop_class=uid.SecondaryCaptureImageStorage, **attrs) -> Dataset:
  """A Part 10 data set holding `stored` (None: no pixel data) and the given attributes."""
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
  ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid.generate_uid(entropy_srcs=["t"])
  ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
  ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
  ds.PatientID = "patient-1"
  if stored is not None:
    ds.set_pixel_data(stored, photometric, bits)
  for k, v in attrs.items():
    setattr(ds, k, v)
  return ds


def _bytes(ds: Dataset, **encoding) -> bytes:
  buf = io.BytesIO()
  ds.save_as(buf, enforce_file_format=True, **encoding)
  return buf.getvalue()


def _headerless(ds: Dataset) -> bytes:
  """The data set alone, implicit VR little endian: no preamble, no DICM, no file meta."""
  bare = Dataset(ds)            # a plain data set: no preamble, no file meta
  if hasattr(bare, "file_meta"):
    del bare.file_meta
  buf = io.BytesIO()
  bare.save_as(buf, implicit_vr=True, little_endian=True)
  assert buf.getvalue()[128:132] != b"DICM"
  return buf.getvalue()


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def _decode(png: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(png)))


def _film(seed: int = 0, height: int = 48, width: int = 40) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return synthetic.render(height, width, 1, synthetic._anatomy(rng), rng)


def _ramp(bits: int = 12, shape=(16, 16)) -> np.ndarray:
  n = shape[0] * shape[1]
  return np.linspace(0, 2 ** bits - 1, n).round().astype(np.uint16).reshape(shape)


# -- the reference: pydicom's own pipeline, the output range from the standard --------


def _reference(ds: Dataset, window: str) -> np.ndarray:
  """PS3.4 N.2 with pydicom's functions: modality LUT -> VOI LUT -> MONOCHROME1 inverted.

  full/none scale the modality output of the stored range (BitsStored,
  PixelRepresentation) to 0..65535 / 0..255; a window's output range is that same
  modality range (PS3.3 C.11.2.1.2), scaled to 0..255. viewer: the file's VOI
  (as file), else this image's modality min..max -> 0..255.
  """
  if window == "viewer":
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
      window = "file"
    else:
      m = np.asarray(apply_modality_lut(ds.pixel_array, ds), float)
      out = np.rint(np.clip((m - m.min()) / (m.max() - m.min()), 0, 1) * 255).astype(np.uint8)
      return 255 - out if ds.PhotometricInterpretation == "MONOCHROME1" else out
  bits = int(ds.BitsStored)
  stored = ([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if ds.PixelRepresentation
            else [0, 2 ** bits - 1])
  lo, hi = sorted(np.asarray(apply_modality_lut(np.array(stored), ds), float))
  m = np.asarray(apply_modality_lut(ds.pixel_array, ds), float)
  if window == "full":
    out = np.rint((m - lo) / (hi - lo) * 65535).astype(np.uint16)
  else:
    if window == "none":
      y = m
    else:
      w = ds
      if window != "file":
        w = _dataset(None, BitsStored=ds.BitsStored, PixelRepresentation=ds.PixelRepresentation,
                     PhotometricInterpretation="MONOCHROME2")
        for k in ("RescaleSlope", "RescaleIntercept"):
          if k in ds:
            setattr(w, k, ds.get(k))
        w.WindowCenter, w.WindowWidth = (float(v) for v in window.split(","))
      y = np.asarray(apply_voi_lut(m, w), float)
    out = np.rint(np.clip((y - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
  if ds.PhotometricInterpretation == "MONOCHROME1":
    out = np.iinfo(out.dtype).max - out
  return out


# -- the window and recognising DICOM ------------------------------------------------


def test_parse_window_and_its_errors():
  assert dicom.parse_window("viewer") == dicom.Window("viewer") and dicom.DEFAULT_WINDOW == "viewer"
  assert dicom.parse_window("full") == dicom.Window("full")
  assert dicom.parse_window(" FILE ") == dicom.Window("file")
  assert dicom.parse_window("-600,1500") == dicom.Window("linear", -600.0, 1500.0)
  assert dicom.parse_window("lung") == dicom.Window("linear", -600.0, 1500.0)
  for bad in ("auto", "wide", "40", "40,0", "40,-1", "a,b", "nan,10"):
    with pytest.raises(ValueError, match="expected|width"):
      dicom.parse_window(bad)


def test_is_dicom_by_preamble_or_name_and_which_names_are_probed():
  ds = _dataset(_ramp())
  data = _bytes(ds)
  assert dicom.is_dicom(data) and dicom.is_dicom(data, "IM0001")
  bare = _headerless(_dataset(_ramp()))
  assert not dicom.is_dicom(bare) and dicom.is_dicom(bare, "x/scan.DCM")
  assert dicom.is_dicom(bare, "scan.dicom")
  assert not dicom.is_dicom(_png(_ramp(8).astype(np.uint8)), "mislabelled.dcm")   # a PNG is a PNG
  assert [dicom.worth_probing(n) for n in ("IM0001", "a/DICOMDIR", "1.2.840.10008.5",
                                           "x.png", "notes.txt", ".hidden")] == \
      [True, True, True, False, False, False]


# -- pixels: against pydicom's own LUT pipeline ---------------------------------------


@pytest.mark.parametrize("variant", synthetic.DICOM_VARIANTS)
@pytest.mark.parametrize("window", WINDOWS)
def test_synthetic_variants_render_as_pydicoms_pipeline(variant, window):
  data = synthetic.encode_dicom(_film(), variant, patient_id="p1", uid_seed="s")
  ds = pydicom.dcmread(io.BytesIO(data))
  got = dicom.pixels_of(ds, window)
  want = _reference(pydicom.dcmread(io.BytesIO(data)), window)
  assert got.dtype == want.dtype and got.shape == (48, 40)
  np.testing.assert_array_equal(got, want)
  # render() writes exactly these pixels as a PNG.
  np.testing.assert_array_equal(_decode(dicom.render(data, window).png), want)


@pytest.mark.parametrize("variant", synthetic.DICOM_VARIANTS)
def test_every_variant_is_the_same_film(variant):
  """Each variant (MONOCHROME1, rescaled, windowed, RLE, 16-bit) renders to the film within one
  8-bit grey level: through its window in the file (viewer, the default; file) and through the
  stored range (full). `windowed`'s first window spans the stored range; the second, narrow
  one is not used."""
  film = _film()
  want = np.round(film * 255)
  data = synthetic.encode_dicom(film, variant)
  full = _decode(dicom.render(data, "full").png).astype(np.int64)
  assert np.abs((full + 128) // 257 - want).max() <= 1
  for window in ("viewer", "file"):
    eight = _decode(dicom.render(data, window).png).astype(np.int64)
    assert np.abs(eight - want).max() <= 1, window


def test_voi_functions_luts_and_multiple_windows_follow_pydicom():
  ramp = _ramp()
  s = ramp.astype(float)
  cases = {
      # SIGMOID (PS3.3 C.11.2.1.3.1): output range 0..4095 -> 0..255
      "sigmoid": (dict(WindowCenter=2048, WindowWidth=1000, VOILUTFunction="SIGMOID"),
                  255 / (1 + np.exp(-4 * (s - 2048) / 1000))),
      # LINEAR_EXACT: exactly c -/+ w/2
      "linear_exact": (dict(WindowCenter=1000, WindowWidth=500, VOILUTFunction="LINEAR_EXACT"),
                       np.clip((s - 750) / 500, 0, 1) * 255),
      # several windows: the first is the one used
      "multiple": (dict(WindowCenter=[1000, 3000], WindowWidth=[500, 200]),
                   np.clip(((s - 999.5) / 499 + 0.5), 0, 1) * 255),
  }
  for name, (attrs, expected) in cases.items():
    data = _bytes(_dataset(ramp, **attrs))
    got = dicom.pixels_of(pydicom.dcmread(io.BytesIO(data)), "file").astype(float)
    ref = _reference(pydicom.dcmread(io.BytesIO(data)), "file")
    np.testing.assert_array_equal(got, ref, err_msg=name)
    assert np.abs(got - expected).max() <= 0.5 + 1e-6, name


def test_modality_and_voi_lut_sequences():
  ramp = _ramp()
  # Modality LUT Sequence: 4096 entries, a curve into 16 bits; full maps its own range.
  curve = np.round(((np.arange(4096) / 4095.0) ** 2) * 60000 + 1000).astype(np.uint16)
  item = Dataset()
  item.LUTDescriptor, item.ModalityLUTType = [4096, 0, 16], "US"
  item.add_new("LUTData", "US", curve.tolist())
  ds = pydicom.dcmread(io.BytesIO(_bytes(_dataset(ramp, ModalityLUTSequence=[item]))))
  got = dicom.pixels_of(ds, "full")
  np.testing.assert_array_equal(got, np.rint((curve[ramp] - 1000.0) / 60000 * 65535).astype(np.uint16))
  # VOI LUT Sequence (preferred over a window in the same file), scaled by its own range:
  # 16-bit entries exactly as pydicom applies them ...
  voi = np.round(np.sqrt(np.arange(4096) / 4095.0) * 50000 + 5000).astype(np.uint16)
  item = Dataset()
  item.LUTDescriptor = [4096, 0, 16]
  item.add_new("LUTData", "US", voi.tolist())
  ds = pydicom.dcmread(io.BytesIO(_bytes(_dataset(ramp, VOILUTSequence=[item], WindowCenter=10,
                                                  WindowWidth=5))))
  got = dicom.pixels_of(ds, "file")
  y = np.asarray(apply_voi_lut(ramp, ds), float)       # pydicom applies the LUT (prefer_lut)
  np.testing.assert_array_equal(got, np.rint((y - 5000) / 50000 * 255).astype(np.uint8))
  # ... and 8-bit entries over 4096 inputs (where pydicom's own uint8 index would wrap past 255)
  voi8 = np.round(np.sqrt(np.arange(4096) / 4095.0) * 200 + 20).astype(np.uint16)
  item = Dataset()
  item.LUTDescriptor = [4096, 0, 8]
  item.add_new("LUTData", "US", voi8.tolist())
  ds = pydicom.dcmread(io.BytesIO(_bytes(_dataset(ramp, VOILUTSequence=[item]))))
  np.testing.assert_array_equal(dicom.pixels_of(ds, "file"),
                                np.rint((voi8[ramp] - 20.0) / 200 * 255).astype(np.uint8))


def test_ct_rescale_then_window_in_hounsfield_units():
  """The modality LUT comes first: a C,W window is in rescaled units (HU), as the standard orders it."""
  raw = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
  ds = pydicom.dcmread(io.BytesIO(_bytes(_dataset(raw, RescaleSlope=1, RescaleIntercept=-1024))))
  got = dicom.pixels_of(ds, "lung")                     # (-600, 1500) HU, LINEAR
  hu = raw.astype(float) - 1024
  expected = np.clip((hu - (-600 - 0.5)) / 1499 + 0.5, 0, 1) * 255
  np.testing.assert_array_equal(got, np.rint(expected).astype(np.uint8))
  # full: the stored range 0..4095 through the rescale, not this image's min/max
  full = dicom.pixels_of(ds, "full")
  np.testing.assert_array_equal(full, np.rint(raw / 4095.0 * 65535).astype(np.uint16))


def test_monochrome1_file_window_and_colour():
  ramp = _ramp()
  ds = pydicom.dcmread(io.BytesIO(_bytes(_dataset(ramp, "MONOCHROME1", WindowCenter=2048,
                                                  WindowWidth=4096))))
  for window in ("full", "file", "none"):
    got = dicom.pixels_of(ds, window)
    np.testing.assert_array_equal(got, _reference(ds, window))
  assert dicom.pixels_of(ds, "full")[0, 0] == 65535 and dicom.pixels_of(ds, "full")[-1, -1] == 0
  rgb = np.stack([_ramp(8).astype(np.uint8), 255 - _ramp(8).astype(np.uint8),
                  np.full((16, 16), 7, np.uint8)], -1)
  ds = pydicom.dcmread(io.BytesIO(_bytes(_dataset(rgb, "RGB", 8))))
  for window in WINDOWS:
    np.testing.assert_array_equal(dicom.pixels_of(ds, window), rgb)


def test_non_images_multiframe_and_unsupported_syntaxes_are_image_errors():
  sr = _bytes(_dataset(None, sop_class=uid.BasicTextSRStorage, Modality="SR"))
  plan = _bytes(_dataset(None, sop_class=uid.RTPlanStorage, Modality="RTPLAN"))
  frames = _bytes(_dataset(np.stack([_ramp()] * 3)))
  private = _dataset(_ramp())
  private.file_meta.TransferSyntaxUID = "1.2.3.4.5"
  jpegls = _dataset(_ramp())
  jpegls.file_meta.TransferSyntaxUID = uid.JPEGLSLossless
  jpegls.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 not really jpeg-ls \xff\xd9"])
  with pytest.raises(pixels.ImageError, match=r"not an image: DICOM Basic Text SR Storage without pixel data"):
    dicom.render(sr)
  with pytest.raises(pixels.ImageError, match=r"not an image: DICOM RT Plan Storage"):
    dicom.render(plan)
  with pytest.raises(pixels.ImageError, match=r"multi-frame DICOM \(3 frames\)"):
    dicom.render(frames)
  with pytest.raises(pixels.ImageError, match=r"unsupported DICOM transfer syntax .*1\.2\.3\.4\.5"):
    dicom.render(_bytes(private, implicit_vr=False, little_endian=True))
  try:
    import pylibjpeg  # noqa: F401
    plugins = True
  except ImportError:
    plugins = False
  with pytest.raises(pixels.ImageError,
                     match="cannot decode the DICOM pixel data" if plugins
                     else r"JPEG-LS.*xraytpu\[dicom-jpeg\]"):
    dicom.render(_bytes(jpegls))
  with pytest.raises(pixels.ImageError, match="unreadable DICOM"):
    dicom.render(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
  with pytest.raises(pixels.ImageError, match="unreadable DICOM"):
    pixels.prepare_image(b"some text in a file named like DICOM", name="x.dcm")


def test_the_pixel_contract_renders_dicom_with_its_window():
  film = _film()
  data = synthetic.encode_dicom(film, "monochrome1")
  p = pixels.prepare_image(data, dicom_window="full")
  assert (p.image_format, p.bit_depth, p.channels) == ("png", 16, 1)
  assert (p.source_format, p.source_mode) == ("DICOM", "DICOM MONOCHROME1 12-bit")
  np.testing.assert_array_equal(_decode(p.encoded),
                                dicom.pixels_of(pydicom.dcmread(io.BytesIO(data)), "full"))
  # the default: as a viewer shows it (the file's window), 8-bit
  v = pixels.prepare_image(data)
  assert (v.bit_depth, v.source_mode) == (8, "DICOM MONOCHROME1 12-bit")
  np.testing.assert_array_equal(_decode(v.encoded), dicom.pixels_of(pydicom.dcmread(io.BytesIO(data))))
  # the same bytes as rendering to PNG first (the path before the image went straight to PIL)
  assert v.encoded == dicom.render(data, png_compress_level=pixels.PNG_COMPRESS_LEVEL).png
  p8 = pixels.prepare_image(data, dicom_window="none", max_side=24)
  assert p8.bit_depth == 8 and (p8.height, p8.width) == (24, 20)
  # without the preamble: DICOM by its name only
  bare = _headerless(pydicom.dcmread(io.BytesIO(data)))
  assert pixels.prepare_image(bare, name="a/b.dcm").source_format == "DICOM"
  with pytest.raises(pixels.ImageError, match="not an image"):
    pixels.prepare_image(bare)
  # graph_input: the bytes the graph takes
  assert pixels.graph_input(data) == v.encoded
  assert pixels.graph_input(data, dicom_window="full") == p.encoded
  assert pixels.conversion_args({"dicom_window": "file"})["dicom_window"] == "file"
  assert pixels.conversion_args({})["dicom_window"] == "full"          # manifests from before


# -- the converter ------------------------------------------------------------------------


def _dicom_folder(root, film_seed: int = 0) -> dict[str, bytes]:
  """class-per-folder input: each variant + a preamble-only file + PNGs, an SR, a multi-frame."""
  files: dict[str, bytes] = {}
  for k, cls in enumerate(("NORMAL", "PNEUMONIA")):
    for i, variant in enumerate(synthetic.DICOM_VARIANTS):
      film = _film(film_seed + 10 * k + i)
      files[f"{cls}/{variant}.dcm"] = synthetic.encode_dicom(film, variant, patient_id=f"{cls}{i}")
      files[f"{cls}/{variant}.png"] = _png(np.round(film * 255).astype(np.uint8))
    files[f"{cls}/IM{k:04d}"] = synthetic.encode_dicom(_film(99 + k), "16bit")   # no extension
  files["NORMAL/report.dcm"] = _bytes(_dataset(None, sop_class=uid.BasicTextSRStorage, Modality="SR"))
  files["PNEUMONIA/cine.dicom"] = _bytes(_dataset(np.stack([_ramp()] * 2)))
  files["PNEUMONIA/notes"] = b"not dicom, no extension"
  for rel, data in files.items():
    path = os.path.join(root, *rel.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)
  return files


def _records(out_dir: str) -> dict[str, dict]:
  """filename -> {"encoded", "format", "bit_depth", "patient_id", "split"} of every record (TF's parser)."""
  import tensorflow as tf
  m = schema.read_manifest(out_dir)
  got = {}
  for split, info in m["splits"].items():
    for shard in info["shards"]:
      for raw in tf.data.TFRecordDataset(os.path.join(out_dir, shard["file"])):
        f = tf.train.Example.FromString(raw.numpy()).features.feature
        got[f[records.FILENAME].bytes_list.value[0].decode()] = {
            "encoded": f[records.ENCODED].bytes_list.value[0],
            "format": f[records.FORMAT].bytes_list.value[0].decode(),
            "bit_depth": f[records.BIT_DEPTH].int64_list.value[0],
            "patient_id": f[records.PATIENT_ID].bytes_list.value[0].decode(),
            "split": split}
  return got


def test_converter_finds_renders_and_skips_dicom_with_reasons(tmp_path):
  inp, out = tmp_path / "in", tmp_path / "out"
  _dicom_folder(str(inp))
  m = convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=str(inp), output_dir=str(out), num_workers=1, quiet=True,
      max_skipped_fraction=0.5, val_fraction=0, test_fraction=0))
  # 2 x (5 variants + 5 PNGs + 1 extension-less DICOM) + SR + multi-frame; "notes" is not found
  assert m["num_found"] == 24 and m["num_ignored"] == 1
  assert m["num_converted"] + m["num_skipped"] == m["num_found"]
  reasons = {s["path"]: s["reason"] for s in m["skipped"]}
  assert set(reasons) == {"NORMAL/report.dcm", "PNEUMONIA/cine.dicom"}
  assert reasons["NORMAL/report.dcm"].startswith("not an image: DICOM Basic Text SR Storage")
  assert reasons["PNEUMONIA/cine.dicom"].startswith("multi-frame DICOM (2 frames)")
  assert m["args"]["dicom_window"] == "viewer" and m["args"]["group_by"] == ""
  modes = m["image_stats"]["source_mode"]
  assert modes["DICOM MONOCHROME1 12-bit"] == 2 and modes["DICOM MONOCHROME2 16-bit RLE Lossless"] == 2
  assert modes["DICOM MONOCHROME2 16-bit"] == 4      # the 16bit variants and the extension-less files
  recs = _records(str(out))
  assert "NORMAL/IM0000" in recs and "PNEUMONIA/IM0001" in recs
  for cls in ("NORMAL", "PNEUMONIA"):
    for variant in synthetic.DICOM_VARIANTS:
      d, p = recs[f"{cls}/{variant}.dcm"], recs[f"{cls}/{variant}.png"]
      assert (d["format"], d["bit_depth"]) == ("png", 8)
      d8 = _decode(d["encoded"]).astype(np.int64)
      assert np.abs(d8 - _decode(p["encoded"])).max() <= 1, (cls, variant)
  # --dicom_window=file: 8-bit records, recorded in the manifest (and a new shard fingerprint)
  out2 = tmp_path / "out2"
  m2 = convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=str(inp), output_dir=str(out2), num_workers=1, quiet=True,
      max_skipped_fraction=0.5, val_fraction=0, test_fraction=0, dicom_window="file"))
  assert m2["args"]["dicom_window"] == "file"
  assert pixels.conversion_args(m2["args"])["dicom_window"] == "file"
  assert _records(str(out2))["NORMAL/windowed.dcm"]["bit_depth"] == 8
  with pytest.raises(convert_lib.ConvertError, match="--dicom_window='wide': expected"):
    convert_lib.convert(convert_lib.ConvertOptions(input_dir=str(inp), output_dir=str(tmp_path / "x"),
                                                   dicom_window="wide"))


def test_group_by_dicom_patient_id_keeps_each_patient_in_one_split(tmp_path):
  gen = tmp_path / "gen"
  synthetic.generate(str(gen), num_images=60, size=32, images_per_patient=3, image_format="dicom",
                     seed=1)
  files = sorted(glob.glob(str(gen / "*" / "*.dcm")))
  assert len(files) == 60
  # Anonymous file names: only the header links a film to its patient.
  inp = tmp_path / "in"
  order = np.random.default_rng(0).permutation(len(files))
  truth = {}
  for n, i in enumerate(order):
    cls = os.path.basename(os.path.dirname(files[i]))
    os.makedirs(inp / cls, exist_ok=True)
    shutil.copy(files[i], inp / cls / f"img{n:03d}.dcm")
    truth[f"{cls}/img{n:03d}.dcm"] = os.path.basename(files[i]).split("_")[0]
  m = convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=str(inp), output_dir=str(tmp_path / "out"), group_by="dicom_patient_id",
      val_fraction=0.2, test_fraction=0.2, num_workers=1, quiet=True))
  assert m["args"]["group_by"] == "dicom_patient_id" and m["num_converted"] == 60
  assert sum(s["num_groups"] for s in m["splits"].values()) == 20
  assert m["args"]["patients_in_several_splits"] == 0
  split_of: dict[str, set] = {}
  from tfrecord_tools import pseudonym
  key = pseudonym.load_key()   # the tests' key (tests/conftest.py): records hold pseudonyms only
  for name, rec in _records(str(tmp_path / "out")).items():
    assert rec["patient_id"] == key.patient(truth[name])
    split_of.setdefault(rec["patient_id"], set()).add(rec["split"])
  assert len(split_of) == 20 and all(len(s) == 1 for s in split_of.values())
  assert {sp for s in split_of.values() for sp in s} == {"train", "val", "test"}
  # Mistakes: a file that is no DICOM; both ways of naming the patient.
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(inp / "NORMAL" / "x.png")
  with pytest.raises(convert_lib.ConvertError, match="1 files are not DICOM or have no PatientID.*x.png"):
    convert_lib.convert(convert_lib.ConvertOptions(input_dir=str(inp), output_dir=str(tmp_path / "o2"),
                                                   group_by="dicom_patient_id", quiet=True))
  with pytest.raises(convert_lib.ConvertError, match="give one"):
    convert_lib.convert(convert_lib.ConvertOptions(input_dir=str(inp), output_dir=str(tmp_path / "o3"),
                                                   group_by="dicom_patient_id", group_regex="^(p)"))
  with pytest.raises(convert_lib.ConvertError, match="--group_by=patient"):
    convert_lib.convert(convert_lib.ConvertOptions(input_dir=str(inp), output_dir=str(tmp_path / "o4"),
                                                   group_by="patient"))


def test_synthetic_writes_dicom_variants_in_turn(tmp_path):
  summary = synthetic.generate(str(tmp_path / "d"), num_images=10, size=16, image_format="dicom")
  assert summary["dicom_variants"] == list(synthetic.DICOM_VARIANTS)
  files = sorted(glob.glob(str(tmp_path / "d" / "*" / "*.dcm")))
  assert len(files) == 10
  kinds = set()
  for f in files:
    ds = pydicom.dcmread(f)
    assert ds.PatientID == os.path.basename(f).split("_")[0]
    kinds.add((ds.PhotometricInterpretation, int(ds.BitsStored), ds.file_meta.TransferSyntaxUID.name,
               "RescaleSlope" in ds, "WindowCenter" in ds))
  assert len(kinds) == 5
  again = synthetic.generate(str(tmp_path / "e"), num_images=10, size=16, image_format="dicom")
  assert again["counts"] == summary["counts"]
  assert open(files[0], "rb").read() == open(files[0].replace("/d/", "/e/"), "rb").read()
  with pytest.raises(synthetic.SyntheticError, match="dicom_variants"):
    synthetic.generate(str(tmp_path / "f"), image_format="dicom", dicom_variants=["jpeg2000"])


# -- predict and serve: the same film, the same score -------------------------------------


@pytest.fixture(scope="module")
def loaded(trained_run):
  from xraytpu.inference import predict_lib
  return predict_lib.load(trained_run)


@pytest.fixture(scope="module")
def films(demo_data_dir, tmp_path_factory):
  """Test PNGs of the demo set and, beside each, its DICOM variants (+ an extension-less one)."""
  root = schema.read_manifest(demo_data_dir)["args"]["input_dir"]
  pngs = sorted(glob.glob(os.path.join(root, "test", "*", "*.png")))[::2]
  out = tmp_path_factory.mktemp("dicom_films")
  sets = []
  for n, png in enumerate(pngs):
    film = np.asarray(Image.open(png).convert("L")).astype(np.float64) / 255.0
    paths = {"png": png}
    for variant in synthetic.DICOM_VARIANTS:
      paths[variant] = str(out / f"f{n}-{variant}.dcm")
      with open(paths[variant], "wb") as f:
        f.write(synthetic.encode_dicom(film, variant, patient_id=f"f{n}"))
    paths["bare"] = str(out / f"F{n}")
    shutil.copy(paths["rle"], paths["bare"])
    sets.append(paths)
  return sets


def test_the_same_film_scores_the_same_as_png_or_any_dicom_variant(loaded, films):
  from xraytpu.inference import predict_lib
  assert loaded.conversion["dicom_window"] == "viewer"    # recorded by the converter
  for paths in films:
    results = predict_lib.predict_files(loaded, list(paths.values()))
    assert all(r.error is None for r in results), [r.error for r in results]
    png = results[0].probabilities["PNEUMONIA"]
    for name, r in zip(paths, results):
      assert abs(r.probabilities["PNEUMONIA"] - png) <= 0.02, (name, r.probabilities, png)
    # the windowed variant rendered with its own window (8-bit) is that film too
    (r,) = predict_lib.predict_files(loaded, [paths["windowed"]], dicom_window="file")
    assert abs(r.probabilities["PNEUMONIA"] - png) <= 0.02
  # --window overrides the run's rendering: a narrow window is another image
  narrow = predict_lib.predict_files(loaded, [films[0]["windowed"]], dicom_window="2048,300")[0]
  default = predict_lib.predict_files(loaded, [films[0]["windowed"]])[0]
  assert narrow.error is None and narrow.probabilities != default.probabilities
  # folders: extension-less DICOM files are found by their preamble
  folder = os.path.dirname(films[0]["rle"])
  found = [os.path.basename(p) for p, e in predict_lib.expand_inputs([folder]) if e is None]
  assert "F0" in found and "f0-rle.dcm" in found


def test_predict_follows_the_runs_dicom_window_and_reports_non_images(loaded, films, tmp_path):
  import dataclasses
  from xraytpu.inference import predict_lib
  film = films[0]["windowed"]
  as_file = dataclasses.replace(loaded, conversion={**loaded.conversion, "dicom_window": "2048,300"})
  a = predict_lib.predict_files(as_file, [film])[0]
  b = predict_lib.predict_files(loaded, [film], dicom_window="2048,300")[0]
  assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
  sr = tmp_path / "report.dcm"
  sr.write_bytes(_bytes(_dataset(None, sop_class=uid.BasicTextSRStorage, Modality="SR")))
  cine = tmp_path / "cine.dcm"
  cine.write_bytes(_bytes(_dataset(np.stack([_ramp()] * 4))))
  r_sr, r_cine = predict_lib.predict_files(loaded, [str(sr), str(cine)])
  assert r_sr.error.startswith("not an image: DICOM Basic Text SR Storage")
  assert r_cine.error.startswith("multi-frame DICOM (4 frames)")
  with pytest.raises(predict_lib.PredictError, match="--dicom_window='wide'"):
    predict_lib.run_predict("unused", [film], dicom_window="wide")


def test_serve_upload_of_dicom_is_predicts_answer(loaded, films):
  from xraytpu.inference import model_call, predict_lib
  from xraytpu.serving import service
  paths = films[1]
  for variant in ("monochrome1", "rle", "bare"):
    data = open(paths[variant], "rb").read()
    got = service.prepare_upload(loaded, data, max_pixels=10_000)
    want = predict_lib.file_pixels(model_call.module_of(loaded), predict_lib.file_bytes(paths[variant]))
    np.testing.assert_array_equal(got, want)
    assert service.image_size(data, os.path.basename(paths[variant])) == (64, 64)
  sr = _bytes(_dataset(None, sop_class=uid.BasicTextSRStorage, Modality="SR"))
  cine = _bytes(_dataset(np.stack([_ramp()] * 2)))
  for data, status, text in ((sr, 415, "not an image"), (cine, 415, "multi-frame"),
                             (open(paths["rle"], "rb").read(), 413, "more than")):
    with pytest.raises(service.RequestError) as e:
      service.prepare_upload(loaded, data, max_pixels=1000 if status == 413 else 10_000)
    assert e.value.status == status and text in e.value.message


def test_dicom_is_read_in_one_module():
  """pydicom is imported by tfrecord_tools.dicom (reading) and the synthetic generator (writing) only."""
  import ast
  import pathlib
  root = pathlib.Path(__file__).resolve().parents[1]
  users = set()
  for path in sorted(p for d in ("xraytpu", "tfrecord_tools", "benchmarks") for p in (root / d).rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      if any(n == "pydicom" or n.startswith("pydicom.") for n in names):
        users.add(str(path.relative_to(root)))
  assert users == {"tfrecord_tools/dicom.py", "tfrecord_tools/synthetic.py"}


def test_the_beam_runner_renders_dicom_with_the_same_window(tmp_path):
  """convert.beam's per-image step gets --dicom_window too (the rest of its path is shards')."""
  beam_convert = pytest.importorskip("tfrecord_tools.convert.beam")
  path = tmp_path / "w.dcm"
  path.write_bytes(synthetic.encode_dicom(_film(), "windowed"))
  line = {"rel": "NORMAL/w.dcm", "split": "train", "path": str(path), "size": path.stat().st_size,
          "offset": -1, "label": 0, "text": "NORMAL", "patient_id": "", "shard": "s", "pos": 0}
  for window, bit_depth in (("full", 16), ("file", 8)):
    step = beam_convert.PrepareImage(0, "keep", "keep", 95, window)
    ((shard, (pos, record, info)),) = list(step.process(line))
    assert record is not None and info["stats"]["bit_depth"] == {str(bit_depth): 1}
    assert info["stats"]["source_mode"] == {"DICOM MONOCHROME2 12-bit": 1}


def test_pydicoms_own_test_files_render_or_are_skipped_with_one_line_reasons():
  """Every file pydicom ships for its tests (odd encodings, colour, palette, LUTs, SR, RT,
  DICOMDIR, truncated and malformed ones) is rendered or raises ImageError, never anything else."""
  shipped = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")   # no download
  files = [f for f in sorted(glob.glob(os.path.join(shipped, "**", "*"), recursive=True))
           if os.path.isfile(f) and not f.endswith((".py", ".json", ".gz", ".bz2", ".txt"))]
  assert len(files) > 50
  rendered = 0
  for f in files:
    data = open(f, "rb").read()
    for window in ("viewer", "full", "file"):
      try:
        pixels.prepare_image(data, dicom_window=window, name=f)
        rendered += 1
      except pixels.ImageError as e:
        assert e.reason and "\n" not in e.reason, (f, e.reason)
  assert rendered > 50
