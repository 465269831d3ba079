"""DICOM -> PNG: the one DICOM reader of every door (converter, predict, serve).

A DICOM file is rendered to PNG bytes here, before the pixel contract
(`tfrecord_tools.pixels.prepare_image`, `graph_input`) takes it like any other
image. The steps follow the standard's display pipeline (PS3.3 C.11, PS3.4 N.2),
all done by pydicom:

  1 pixel data   the first and only frame, decoded by pydicom: uncompressed
                 (implicit/explicit VR, little/big endian, deflated) and RLE
                 natively, JPEG baseline/extended/2000 through Pillow, JPEG-LS
                 and the other JPEG flavours with the optional pylibjpeg plugins
                 (pip install 'xraytpu[dicom-jpeg]').
  2 modality LUT `pydicom.pixels.apply_modality_lut`: Rescale Slope/Intercept
                 (e.g. -> Hounsfield units) or the Modality LUT Sequence.
  3 VOI LUT      by the window (`--dicom_window`):
                   full  (default) no VOI: the modality output range of the
                         stored bit depth (BitsStored and PixelRepresentation
                         through step 2: the same for every image of a kind,
                         never the image's own min/max) -> 16-bit 0..65535.
                   file  `pydicom.pixels.apply_voi_lut`: the file's VOI LUT
                         Sequence, else its Window Center/Width (the first of
                         several) with its VOILUTFunction (LINEAR, LINEAR_EXACT,
                         SIGMOID); the VOI output range -> 8-bit. A file without
                         either is rendered as `none`.
                   none  no VOI: the modality output range -> 8-bit.
                   C,W   that LINEAR window (pydicom's windowing) -> 8-bit;
                         presets: lung, mediastinum, soft_tissue, bone, brain.
  4 polarity     MONOCHROME1 (white = low) is inverted, so bright = dense as
                 in MONOCHROME2.
  Colour (RGB, YBR_*, PALETTE COLOR) -> 8-bit RGB, whatever the window.

Not rendered, with the reason as `pixels.ImageError` (the converter skips
the file with it; predict and serve report it): objects without pixel data
(structured reports, RT plans, ...), multi-frame objects (a series or a cine
loop is not one film), transfer syntaxes no installed decoder reads, and
corrupt files.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from typing import Any, BinaryIO

import numpy as np

from tfrecord_tools.errors import ImageError

EXTENSIONS = (".dcm", ".dicom")
WINDOW_KINDS = ("full", "file", "none")
DEFAULT_WINDOW = "full"
# Named CENTER,WIDTH windows in Hounsfield units (CT).
PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
WINDOW_HELP = ("How DICOM files become images: full (the whole modality range as 16-bit "
               "grey), file (the file's own VOI LUT or window, 8-bit), none (the modality "
               "range, 8-bit), or CENTER,WIDTH (that window, 8-bit; presets: "
               f"{', '.join(PRESETS)}). Colour DICOM is always 8-bit RGB.")

_PREAMBLE_END = 132                 # 128-byte preamble, then b"DICM"
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"GIF8", b"II*\x00",
                     b"MM\x00*", b"RIFF")
_INSTALL = "pip install 'xraytpu[dicom]' (or pydicom)"
_INSTALL_JPEG = "pip install 'xraytpu[dicom-jpeg]' (the pylibjpeg plugins)"


# --------------------------------------------------------------------------
# Recognising DICOM files.
# --------------------------------------------------------------------------


def has_preamble(head: bytes) -> bool:
  """True when the bytes carry the Part 10 marker: b"DICM" after the 128-byte preamble."""
  return head[128:_PREAMBLE_END] == b"DICM"


def is_dicom(data: bytes, name: str = "") -> bool:
  """A DICOM file: the DICM preamble, or a .dcm / .dicom name on bytes that are
  no other image format (files written without the preamble)."""
  if has_preamble(data):
    return True
  return name.lower().endswith(EXTENSIONS) and not data.startswith(_IMAGE_SIGNATURES)


def worth_probing(name: str) -> bool:
  """A file name that may hide a DICOM file without saying so: no extension
  (`IM0001`, `DICOMDIR`) or a numeric one (UID-named files `1.2.840...345`).
  Finders read such a file's first 132 bytes (`has_preamble`)."""
  base = name.rsplit("/", 1)[-1]
  if base.startswith("."):
    return False
  ext = base.rsplit(".", 1)[-1] if "." in base else ""
  return ext == "" or ext.isdigit()


# --------------------------------------------------------------------------
# The window.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Window:
  """A parsed --dicom_window: kind "full" | "file" | "none" | "linear" (center, width)."""
  kind: str
  center: float = 0.0
  width: float = 0.0


def parse_window(text: str) -> Window:
  """full | file | none | CENTER,WIDTH | a preset name -> Window.

  Raises ValueError with a one-line reason (callers prefix their flag's name).
  """
  w = str(text or "").strip().lower()
  if w in WINDOW_KINDS:
    return Window(w)
  if w in PRESETS:
    return Window("linear", *PRESETS[w])
  try:
    center, width = (float(v) for v in w.split(","))
  except ValueError:
    raise ValueError(f"{text!r}: expected {', '.join(WINDOW_KINDS)}, CENTER,WIDTH or one of "
                     f"{', '.join(PRESETS)}") from None
  if not (np.isfinite(center) and np.isfinite(width)) or width < 1:
    raise ValueError(f"{text!r}: the window width must be >= 1 (a LINEAR window)")
  return Window("linear", center, width)


# --------------------------------------------------------------------------
# Reading.
# --------------------------------------------------------------------------


def _why(e: Exception) -> str:
  """An exception as one short line (pydicom's messages span several)."""
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:240] + '...' if len(text) > 240 else text}"


def _pydicom():
  try:
    import pydicom  # noqa: PLC0415
  except ImportError:
    raise ImageError(f"DICOM input needs pydicom: {_INSTALL}") from None
  return pydicom


def read(data: bytes | BinaryIO, *, pixels: bool = True) -> Any:
  """The pydicom Dataset of a DICOM file's bytes (or open binary file); the
  header only when pixels=False. Raises ImageError for unreadable files."""
  pydicom = _pydicom()
  f = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")   # pydicom warns about many small deviations
      ds = pydicom.dcmread(f, force=True, stop_before_pixels=not pixels)
  except Exception as e:  # noqa: BLE001 - pydicom raises many types for corrupt files
    raise ImageError(f"unreadable DICOM ({_why(e)})") from None
  if not pixels:
    return ds
  if "TransferSyntaxUID" not in ds.file_meta:
    # A data set without the Part 10 header: its encoding was detected on reading.
    implicit, little = ds.original_encoding
    if implicit is None:
      raise ImageError("unreadable DICOM (no transfer syntax and no recognisable data elements)")
    uid = pydicom.uid
    ds.file_meta.TransferSyntaxUID = (uid.ImplicitVRLittleEndian if implicit else
                                      uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
  return ds


def patient_id(f: BinaryIO | bytes) -> str | None:
  """The header's PatientID (stripped), None when absent or empty. ImageError when unreadable."""
  ds = read(f, pixels=False)
  value = str(ds.get("PatientID", "") or "").strip()
  return value or None


def image_size(data: bytes) -> tuple[int, int]:
  """(width, height) from the header (Columns, Rows); ImageError when absent."""
  ds = read(data, pixels=False)
  try:
    return int(ds.Columns), int(ds.Rows)
  except (AttributeError, TypeError, ValueError):
    if "SOPClassUID" in ds:   # a readable header without image attributes (SR, RT plan)
      raise ImageError(_no_pixels_reason(ds)) from None
    raise ImageError("unreadable DICOM header (no Rows/Columns)") from None


def _no_pixels_reason(ds) -> str:
  sop = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")   # DICOMDIR: the latter
  if sop is None and "Modality" not in ds and "PixelData" not in ds:
    return "unreadable DICOM (no image and no object class found)"
  what = getattr(sop, "name", "") or str(ds.get("Modality", "") or "") or "object"
  if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
    return f"DICOM {what} with float pixel data: not supported"
  return (f"not an image: DICOM {what} without pixel data "
          "(structured reports, RT plans and other non-image objects are skipped)")


def _plugins() -> bool:
  """True when the optional pylibjpeg decoders are installed."""
  try:
    import pylibjpeg  # noqa: F401, PLC0415
  except ImportError:
    return False
  return True


def _check(ds) -> None:
  """ImageError for what cannot be one film: no pixels, several frames, no decoder."""
  if "PixelData" not in ds:
    raise ImageError(_no_pixels_reason(ds))
  try:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
  except (TypeError, ValueError):
    raise ImageError(f"unreadable DICOM (NumberOfFrames {ds.get('NumberOfFrames')!r})") from None
  if frames > 1:
    raise ImageError(f"multi-frame DICOM ({frames} frames): a series or cine loop, not one film; "
                     "export single frames")
  from pydicom.pixels import get_decoder  # noqa: PLC0415
  uid = ds.file_meta.TransferSyntaxUID
  try:
    decoder = get_decoder(uid)
  except NotImplementedError:
    raise ImageError(f"unsupported DICOM transfer syntax {uid.name} ({uid})") from None
  if not decoder.is_available:
    raise ImageError(f"DICOM transfer syntax {uid.name} ({uid}) needs a decoder: {_INSTALL_JPEG}")


# --------------------------------------------------------------------------
# Rendering.
# --------------------------------------------------------------------------


def _stored_range(ds) -> np.ndarray:
  """The lowest and highest stored value BitsStored and PixelRepresentation allow."""
  bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
  if int(ds.get("PixelRepresentation", 0) or 0) == 1:
    return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], np.int64)
  return np.array([0, 2 ** bits - 1], np.int64)


def modality_range(ds) -> tuple[float, float]:
  """(low, high) of the modality LUT's output over the stored range (step 2 applied
  to every value the stored bit depth allows): what `full` and `none` map to
  0..max. A LUT is applied to each stored value (its extremes need not be the ends)."""
  from pydicom.pixels import apply_modality_lut  # noqa: PLC0415
  lo, hi = _stored_range(ds)
  values = np.arange(lo, hi + 1) if ds.get("ModalityLUTSequence") and hi - lo < 2 ** 17 \
      else np.array([lo, hi])
  out = np.asarray(apply_modality_lut(values, ds), np.float64)
  return float(out.min()), float(out.max())


def _voi_kind(ds) -> str | None:
  """Which VOI `apply_voi_lut` applies (its own rule, LUT preferred): "lut", "window" or None."""
  seq = ds.get("VOILUTSequence")
  if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
    return "lut"
  if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
    return "window"
  return None


def _lut_as_16bit(ds):
  """`ds`'s VOI LUT (first item) declared with 16-bit entries, same data: pydicom indexes
  a LUT of 8-bit entries with uint8, which wraps past 256 entries (a 4096-entry 8-bit
  LUT is valid, PS3.3 C.11.2.1.1)."""
  from pydicom.dataset import Dataset  # noqa: PLC0415
  item = ds.VOILUTSequence[0]
  if int(item.LUTDescriptor[2]) != 8:
    return ds
  lut = Dataset()
  lut.LUTDescriptor = [int(item.LUTDescriptor[0]), int(item.LUTDescriptor[1]), 16]
  lut.add_new("LUTData", "US", [int(v) for v in _lut_values(ds, item)])
  out = Dataset()
  out.VOILUTSequence = [lut]
  return out


def _lut_values(ds, item) -> list[int]:
  data = item["LUTData"]
  if isinstance(data.value, (bytes, bytearray)):   # OW: 16-bit words in the file's byte order
    little = ds.original_encoding[1] is not False
    return np.frombuffer(data.value, "<u2" if little else ">u2").tolist()
  return list(data.value) if not isinstance(data.value, int) else [data.value]


def _voi_range(ds, kind: str) -> tuple[float, float]:
  """(low, high) of the VOI's output: the LUT's lowest and highest entry; for a
  window, what it maps values far below and above it to (pydicom's output
  range: the modality range of the stored bit depth)."""
  from pydicom.pixels import apply_voi, apply_windowing  # noqa: PLC0415
  if kind == "lut":
    item = ds.VOILUTSequence[0]
    entries, first = int(item.LUTDescriptor[0]) or 2 ** 16, int(item.LUTDescriptor[1])
    out = apply_voi(np.arange(first, first + entries), ds)
  else:
    with np.errstate(over="ignore"):   # SIGMOID: exp overflows to its limit
      out = apply_windowing(np.array([-1e15, 1e15]), ds)
  out = np.asarray(out, np.float64)
  return float(out.min()), float(out.max())


def _window_dataset(ds, window: Window):
  """A data set holding `ds`'s modality attributes and the given LINEAR window."""
  from pydicom.dataset import Dataset  # noqa: PLC0415
  w = Dataset()
  for key in ("BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
              "ModalityLUTSequence"):
    if key in ds:
      setattr(w, key, ds.get(key))
  w.PhotometricInterpretation = "MONOCHROME2"
  w.WindowCenter, w.WindowWidth, w.VOILUTFunction = window.center, window.width, "LINEAR"
  return w


def _scale(values: np.ndarray, lo: float, hi: float, top: int) -> np.ndarray:
  """values in [lo, hi] -> round((v - lo) / (hi - lo) * top), clipped to 0..top."""
  unit = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
  dtype = np.uint16 if top > 255 else np.uint8
  return np.rint(np.clip(unit, 0.0, 1.0) * top).astype(dtype)


def _colour(ds, arr: np.ndarray) -> np.ndarray:
  """RGB (pydicom has converted YBR) or PALETTE COLOR -> uint8 [H, W, 3]."""
  if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
    from pydicom.pixels import apply_color_lut  # noqa: PLC0415
    arr = apply_color_lut(arr, ds)
    bits = 8 if arr.dtype == np.uint8 else 16
  else:
    bits = int(ds.get("BitsStored") or 8)
  if arr.ndim != 3 or arr.shape[-1] != 3:
    raise ImageError(f"unsupported DICOM colour pixel array of shape {arr.shape}")
  return _scale(arr.astype(np.float64), 0.0, float(2 ** bits - 1), 255)


def pixels_of(ds, window: Window | str = DEFAULT_WINDOW) -> np.ndarray:
  """A pydicom Dataset -> its image (steps 1-4 of the module doc):
  uint16 [H, W] (grey, `full`), uint8 [H, W] (grey, any other window) or
  uint8 [H, W, 3] (colour). Raises ImageError."""
  from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: PLC0415
  window = parse_window(window) if isinstance(window, str) else window
  _check(ds)
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      arr = np.asarray(ds.pixel_array)                                # step 1
  except Exception as e:  # noqa: BLE001 - decoders raise many types for corrupt data
    syntax = ds.file_meta.TransferSyntaxUID
    hint = f"; more decoders: {_INSTALL_JPEG}" if syntax.is_compressed and not _plugins() else ""
    raise ImageError(f"cannot decode the DICOM pixel data ({syntax.name}: {_why(e)}){hint}") from None
  if photometric not in ("MONOCHROME1", "MONOCHROME2"):
    return _colour(ds, arr)
  if arr.ndim != 2:
    raise ImageError(f"unsupported DICOM pixel array of shape {arr.shape}")
  try:
    values = np.asarray(apply_modality_lut(arr, ds), np.float64)     # step 2
    kind = window.kind
    if kind == "file" and _voi_kind(ds) is None:
      kind = "none"
    if kind == "full":                                                # step 3
      out = _scale(values, *modality_range(ds), 65535)
    elif kind == "none":
      out = _scale(values, *modality_range(ds), 255)
    elif kind == "file" and _voi_kind(ds) == "lut":
      lut = _lut_as_16bit(ds)      # the LUT's input: integers (rescaled values rounded)
      y = apply_voi_lut(np.rint(values).astype(np.int64), lut)
      out = _scale(np.asarray(y, np.float64), *_voi_range(lut, "lut"), 255)
    elif kind == "file":
      out = _scale(np.asarray(apply_voi_lut(values, ds), np.float64), *_voi_range(ds, "window"), 255)
    else:
      wds = _window_dataset(ds, window)
      out = _scale(np.asarray(apply_voi_lut(values, wds), np.float64),
                   *_voi_range(wds, "window"), 255)
  except ImageError:
    raise
  except Exception as e:  # noqa: BLE001 - malformed LUTs, windows, rescale values
    raise ImageError(f"unusable DICOM LUT or window ({_why(e)})") from None
  if photometric == "MONOCHROME1":                                    # step 4
    out = np.iinfo(out.dtype).max - out
  return out


@dataclasses.dataclass(frozen=True)
class Rendered:
  """A DICOM file as PNG bytes, and what it was."""
  png: bytes
  description: str     # e.g. "DICOM MONOCHROME1 12-bit RLE Lossless": the manifest's source_mode


def render(data: bytes, window: Window | str = DEFAULT_WINDOW, *, png_compress_level: int = 6) -> Rendered:
  """A DICOM file's bytes -> PNG (16-bit grey for `full`, else 8-bit grey; 8-bit
  RGB for colour) and a short description. Raises ImageError."""
  from PIL import Image  # noqa: PLC0415
  window = parse_window(window) if isinstance(window, str) else window
  ds = read(data)
  try:
    image = pixels_of(ds, window)
  except ImageError:
    raise
  except Exception as e:  # noqa: BLE001 - a malformed header must not stop a conversion
    raise ImageError(f"unreadable DICOM ({_why(e)})") from None
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", compress_level=png_compress_level)
  syntax = ds.file_meta.TransferSyntaxUID
  syntax = "" if not syntax.is_compressed else f" {syntax.name}"
  description = (f"DICOM {str(ds.get('PhotometricInterpretation', 'MONOCHROME2')).upper()} "
                 f"{int(ds.get('BitsStored') or 8)}-bit{syntax}")
  return Rendered(png=buf.getvalue(), description=description)
