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
                   viewer (default) as a DICOM viewer shows the film: the
                         file's VOI LUT Sequence, else its Window Center/Width
                         (the first of several, with its VOILUTFunction:
                         LINEAR, LINEAR_EXACT, SIGMOID), else the image's own
                         value range (`data_range`: the lowest to the highest
                         modality value, Pixel Padding Value excluded) -> 8-bit.
                   full  no VOI: the modality output range of the stored bit
                         depth (BitsStored and PixelRepresentation through step
                         2: the same for every image of a kind, never the
                         image's own min/max) -> 16-bit 0..65535. The default
                         before `viewer`: data sets converted with it (their
                         manifests say dicom_window "full") keep it.
                   file  the file's VOI LUT or window as `viewer`; a file
                         without either is rendered as `none`.
                   none  no VOI: the modality output range -> 8-bit.
                   C,W   that LINEAR window (pydicom's windowing) -> 8-bit;
                         presets: lung, mediastinum, soft_tissue, bone, brain.
                 A VOI's output range (the LUT's entries, a window's output
                 range) maps to 0..255.
  4 polarity     MONOCHROME1 (white = low) is inverted, so bright = dense as
                 in MONOCHROME2.
  Colour (RGB, YBR_*, PALETTE COLOR) -> 8-bit RGB, whatever the window.

What was applied (`Rendering`: the VOI's source, center/width, function,
inversion) travels with the image: the converter writes it into each record
(image/dicom/rendering) and counts it in the manifest (image_stats'
dicom_rendering).

Why the image's own value range where the file has no VOI: it is the one rule
that shows any linear storage of a film (any bit depth, offset, slope,
intercept or polarity) with the film's own contrast, and it is deterministic.
Robust percentiles (e.g. 0.5-99.5 %) were not taken: they clip anatomy at both
ends and depend on a percentile, while a JPEG made from such a file by a
min-max window (e.g. DCMTK's dcmj2pnm +Wm) keeps every value. Pixels equal to
the Pixel Padding Value (or in its range) are padding outside the detector,
not the film: they do not widen the range.

Not rendered, with the reason as `pixels.ImageError` (the converter skips
the file with it; predict and serve report it): objects without pixel data
(structured reports, RT plans, ...), multi-frame objects (a series or a cine
loop is not one film), transfer syntaxes no installed decoder reads, headers
no rendering can honour (`check_header`: RescaleSlope 0, a window width below
the standard's minimum, BitsStored outside 1..BitsAllocated, ...), and
corrupt files. Sizes come from the header alone (`header_size`: Rows x
Columns x NumberOfFrames, no pixel data read), so every door holds them
against its pixel limit before anything is decoded.

Memory: steps 2-4 run over blocks of rows (`_BLOCK_PIXELS`), so the float64
work arrays stay a few MB whatever the image's size; a render holds the
decoded pixels, the output and the file's pixel data (see docs/serving.md
for the measured bytes per pixel).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import warnings
from typing import Any, BinaryIO

import numpy as np

from tfrecord_tools.errors import ImageError

EXTENSIONS = (".dcm", ".dicom")
WINDOW_KINDS = ("viewer", "full", "file", "none")
DEFAULT_WINDOW = "viewer"
# What data sets converted before `viewer` existed were rendered with (their manifests say
# "full"; one without the key, from before DICOM support, is read as this too).
LEGACY_WINDOW = "full"
# Named CENTER,WIDTH windows in Hounsfield units (CT).
PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
WINDOW_HELP = ("How DICOM files become images: viewer (as a DICOM viewer shows them: the "
               "file's VOI LUT or window, else the image's own value range; 8-bit), full (the "
               "stored bit depth's whole modality range as 16-bit grey; the default before "
               "viewer), file (the file's VOI LUT or window, else the modality range; 8-bit), "
               "none (the modality range, 8-bit), or CENTER,WIDTH (that window, 8-bit; presets: "
               f"{', '.join(PRESETS)}). Colour DICOM is always 8-bit RGB.")
# Steps 2-4 run over blocks of about this many pixels (float64 work arrays of ~2 MB each).
_BLOCK_PIXELS = 1 << 18

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
  """A parsed --dicom_window: kind "viewer" | "full" | "file" | "none" | "linear" (center, width)."""
  kind: str
  center: float = 0.0
  width: float = 0.0


def parse_window(text: str) -> Window:
  """viewer | full | file | none | CENTER,WIDTH | a preset name -> Window.

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


def header_size(data: bytes | BinaryIO) -> tuple[int, int, int]:
  """(width, height, frames) from the header alone (Columns, Rows, NumberOfFrames; pydicom
  stops before the pixel data, nothing is decoded). ImageError when absent or unreadable."""
  ds = read(data, pixels=False)
  try:
    width, height = int(ds.Columns), int(ds.Rows)
  except (AttributeError, TypeError, ValueError):
    if "SOPClassUID" in ds:   # a readable header without image attributes (SR, RT plan)
      raise ImageError(_no_pixels_reason(ds)) from None
    raise ImageError("unreadable DICOM header (no Rows/Columns)") from None
  return width, height, _frames(ds)


def image_size(data: bytes) -> tuple[int, int]:
  """(width, height) from the header (Columns, Rows); ImageError when absent."""
  width, height, _ = header_size(data)
  return width, height


def _frames(ds) -> int:
  try:
    return max(1, int(ds.get("NumberOfFrames", 1) or 1))
  except (TypeError, ValueError):
    raise ImageError(f"unreadable DICOM (NumberOfFrames {ds.get('NumberOfFrames')!r})") from None


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
  frames = _frames(ds)
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


def _number(ds, key: str, index: int = 0) -> float | None:
  """A numeric attribute (the `index`-th of a multi-valued one) as a float; None when absent;
  ImageError when it is no finite number."""
  if key not in ds or ds.get(key) is None:
    return None
  value = ds.get(key)
  try:
    value = value[index] if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" \
        else value
    number = float(value)
  except (TypeError, ValueError, IndexError):
    raise ImageError(f"invalid DICOM header: {key} {ds.get(key)!r} is not a number") from None
  if not math.isfinite(number):
    raise ImageError(f"invalid DICOM header: {key} is {number}")
  return number


def check_header(ds, window: Window | str = DEFAULT_WINDOW) -> None:
  """ImageError for header values no rendering can honour (read before any decoding).

  BitsStored outside 1..BitsAllocated (PS3.3 C.7.6.3.1), a RescaleSlope of 0 (every pixel
  would map to one value: a blank film) or a non-finite rescale; and, where `window` uses
  the file's window (viewer, file), a Window Width below the standard's minimum (LINEAR:
  >= 1, LINEAR_EXACT and SIGMOID: > 0; PS3.3 C.11.2.1.2) or a non-finite center.
  """
  window = parse_window(window) if isinstance(window, str) else window
  allocated, stored = _number(ds, "BitsAllocated"), _number(ds, "BitsStored")
  if stored is not None and not (1 <= stored <= (allocated or 64)):
    raise ImageError(f"invalid DICOM header: BitsStored {stored:g} with BitsAllocated "
                     f"{allocated if allocated is None else f'{allocated:g}'} "
                     "(BitsStored must be 1..BitsAllocated)")
  slope = _number(ds, "RescaleSlope")
  if slope == 0:
    raise ImageError("invalid DICOM header: RescaleSlope 0 (every pixel would map to one value: "
                     "a blank film)")
  _number(ds, "RescaleIntercept")
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
  if window.kind in ("viewer", "file") and photometric in ("MONOCHROME1", "MONOCHROME2") \
      and _voi_kind(ds) == "window":
    _first_window(ds)


def _first_window(ds) -> tuple[float, float, str]:
  """(center, width, function) of the file's first window; ImageError when the standard
  does not allow them."""
  center, width = _number(ds, "WindowCenter"), _number(ds, "WindowWidth")
  function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
  if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
    raise ImageError(f"invalid DICOM header: VOILUTFunction {function!r} (LINEAR, LINEAR_EXACT "
                     "or SIGMOID)")
  if (width < 1) if function == "LINEAR" else (width <= 0):
    raise ImageError(f"invalid DICOM header: WindowWidth {width:g} (a {function} window needs "
                     f"a width {'>= 1' if function == 'LINEAR' else '> 0'})")
  return center, width, function


# --------------------------------------------------------------------------
# Rendering.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rendering:
  """What one DICOM image was rendered with: the converter writes it into the record
  (`to_json`, image/dicom/rendering) and counts `summary` in the manifest."""
  window: str              # the --dicom_window asked for: viewer, full, file, none, C,W, a preset
  voi: str                 # what was applied: "file VOI LUT", "file window", "data range",
                           # "modality range", "given window" or "colour" (no VOI)
  function: str = ""       # LINEAR, LINEAR_EXACT, SIGMOID or LUT; the two ranges are LINEAR_EXACT
  center: float | None = None   # of the window applied, in modality units (e.g. HU);
  width: float | None = None    # a range lo..hi is the LINEAR_EXACT window (lo+hi)/2, hi-lo
  inverted: bool = False   # MONOCHROME1, inverted after the VOI
  bit_depth: int = 8       # of the rendered image

  def to_json(self) -> str:
    d = {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "")}
    return json.dumps(d, sort_keys=True, separators=(",", ":"))

  @property
  def summary(self) -> str:
    """e.g. "file window LINEAR", "data range": the manifest's count key."""
    return f"{self.voi} {self.function}" if self.voi == "file window" else self.voi


def _range_window(lo: float, hi: float) -> tuple[float, float]:
  """The LINEAR_EXACT window that maps lo..hi to the output range: (center, width)."""
  return (lo + hi) / 2.0, hi - lo


def _row_blocks(shape) -> list[slice]:
  """Row slices of about _BLOCK_PIXELS pixels each."""
  per_row = max(1, int(np.prod(shape[1:], dtype=np.int64)))
  step = max(1, _BLOCK_PIXELS // per_row)
  return [slice(r, r + step) for r in range(0, int(shape[0]), step)]


def _padding(ds) -> tuple[int, int] | None:
  """The stored values that are padding (Pixel Padding Value, up to its Range Limit), or None."""
  value = ds.get("PixelPaddingValue")
  if value is None or isinstance(value, (bytes, bytearray)):
    return None
  try:
    a = int(value)
    b = int(ds.get("PixelPaddingRangeLimit", a))
  except (TypeError, ValueError):
    return None
  return min(a, b), max(a, b)


def data_range(ds, arr: np.ndarray) -> tuple[float, float]:
  """(low, high) of the modality values of this image: what `viewer` maps to 0..255 when
  the file has no VOI. Pixels equal to the Pixel Padding Value (or within its range) are
  left out, unless every pixel is padding. Read block by block."""
  from pydicom.pixels import apply_modality_lut  # noqa: PLC0415
  pad = _padding(ds)
  lut = bool(ds.get("ModalityLUTSequence"))
  for skip in ((pad, None) if pad else (None,)):
    lo, hi = math.inf, -math.inf
    for rows in _row_blocks(arr.shape):
      block = arr[rows]
      if skip:
        block = block[(block < skip[0]) | (block > skip[1])]
      if block.size == 0:
        continue
      if lut:    # a LUT need not be monotonic: its output's own extremes
        out = np.asarray(apply_modality_lut(block, ds), np.float64)
        lo, hi = min(lo, float(out.min())), max(hi, float(out.max()))
      else:      # the rescale is linear: the stored extremes, rescaled below
        lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    if lo <= hi:
      break
  if not lut:
    ends = np.asarray(apply_modality_lut(np.array([lo, hi]), ds), np.float64)
    lo, hi = float(ends.min()), float(ends.max())
  return lo, hi


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
  if bits == 8 and arr.dtype == np.uint8:
    return arr                  # 0..255 already: the scale below is the identity
  out = np.empty(arr.shape, np.uint8)
  for rows in _row_blocks(arr.shape):
    out[rows] = _scale(arr[rows].astype(np.float64), 0.0, float(2 ** bits - 1), 255)
  return out


def _grey(ds, arr: np.ndarray, window: Window, name: str) -> tuple[np.ndarray, Rendering]:
  """Steps 2-4 for a MONOCHROME1/2 pixel array, block by block (same values as whole)."""
  from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: PLC0415
  inverted = str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
  kind, voi = window.kind, _voi_kind(ds)
  if kind == "viewer":
    kind = "file" if voi else "data"
  if kind == "file" and voi is None:
    kind = "none"
  top, voi_of, function, center, width = 255, None, "LINEAR_EXACT", None, None
  if kind in ("full", "none"):
    lo, hi = modality_range(ds)
    top, what = (65535 if kind == "full" else 255), "modality range"
  elif kind == "data":
    lo, hi = data_range(ds, arr)
    what = "data range"
  elif kind == "file" and voi == "lut":
    lut = _lut_as_16bit(ds)      # the LUT's input: integers (rescaled values rounded)
    voi_of = lambda v: apply_voi_lut(np.rint(v).astype(np.int64), lut)  # noqa: E731
    lo, hi = _voi_range(lut, "lut")
    what, function = "file VOI LUT", "LUT"
  else:
    wds = ds if kind == "file" else _window_dataset(ds, window)
    voi_of = lambda v: apply_voi_lut(v, wds)  # noqa: E731
    lo, hi = _voi_range(wds, "window")
    what = "file window" if kind == "file" else "given window"
    center, width, function = _first_window(wds)
  if voi_of is None:
    center, width = _range_window(lo, hi)
  out = np.empty(arr.shape, np.uint16 if top > 255 else np.uint8)
  for rows in _row_blocks(arr.shape):
    values = np.asarray(apply_modality_lut(arr[rows], ds), np.float64)      # step 2
    if voi_of is not None:                                                  # step 3
      values = np.asarray(voi_of(values), np.float64)
    out[rows] = _scale(values, lo, hi, top)
  if inverted:                                                              # step 4
    np.subtract(top, out, out=out)
  return out, Rendering(window=name, voi=what, function=function,
                        center=None if center is None else float(center),
                        width=None if width is None else float(width), inverted=inverted,
                        bit_depth=16 if top > 255 else 8)


def _pixel_array(ds) -> np.ndarray:
  """`ds.pixel_array`, the same values: pydicom's decoder, its YBR_FULL -> RGB conversion
  done here block by block (pydicom's own holds a float32 copy of the whole image:
  12 bytes per pixel more)."""
  from pydicom.pixels import get_decoder  # noqa: PLC0415
  from pydicom.pixels.processing import convert_color_space  # noqa: PLC0415
  arr, properties = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, as_rgb=False)
  arr = np.asarray(arr)
  if str(properties.get("photometric_interpretation", "")) in ("YBR_FULL", "YBR_FULL_422"):
    arr = arr if arr.flags.writeable else arr.copy()
    for rows in _row_blocks(arr.shape):
      arr[rows] = convert_color_space(arr[rows], "YBR_FULL", "RGB")
  return arr


def _render(ds, window: Window, name: str) -> tuple[np.ndarray, Rendering]:
  """A pydicom Dataset -> (image, Rendering): steps 1-4 of the module doc. Raises ImageError."""
  _check(ds)
  check_header(ds, window)
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      arr = _pixel_array(ds)                                          # step 1
  except Exception as e:  # noqa: BLE001 - decoders raise many types for corrupt data
    syntax = ds.file_meta.TransferSyntaxUID
    hint = f"; more decoders: {_INSTALL_JPEG}" if syntax.is_compressed and not _plugins() else ""
    raise ImageError(f"cannot decode the DICOM pixel data ({syntax.name}: {_why(e)}){hint}") from None
  if photometric not in ("MONOCHROME1", "MONOCHROME2"):
    return _colour(ds, arr), Rendering(window=name, voi="colour")
  if arr.ndim != 2:
    raise ImageError(f"unsupported DICOM pixel array of shape {arr.shape}")
  try:
    return _grey(ds, arr, window, name)
  except ImageError:
    raise
  except Exception as e:  # noqa: BLE001 - malformed LUTs, windows, rescale values
    raise ImageError(f"unusable DICOM LUT or window ({_why(e)})") from None


def _window_name(window: Window | str) -> str:
  if isinstance(window, str):
    return window.strip().lower()
  return window.kind if window.kind != "linear" else f"{window.center:g},{window.width:g}"


def pixels_of(ds, window: Window | str = DEFAULT_WINDOW) -> np.ndarray:
  """A pydicom Dataset -> its image (steps 1-4 of the module doc):
  uint16 [H, W] (grey, `full`), uint8 [H, W] (grey, any other window) or
  uint8 [H, W, 3] (colour). Raises ImageError."""
  name = _window_name(window)
  window = parse_window(window) if isinstance(window, str) else window
  return _render(ds, window, name)[0]


@dataclasses.dataclass(frozen=True)
class Decoded:
  """A DICOM file's image, what it was and how it was rendered."""
  image: np.ndarray        # uint16 [H, W] (full), uint8 [H, W] or uint8 [H, W, 3]
  description: str         # e.g. "DICOM MONOCHROME1 12-bit RLE Lossless": the manifest's source_mode
  rendering: Rendering
  attributes: tuple[tuple[str, str], ...] = ()   # PatientSex / PatientAge / ViewPosition as
                                                 # record values (`attributes`)


def attributes(ds) -> tuple[tuple[str, str], ...]:
  """The header's PatientSex, PatientAge (Age String, e.g. 058Y) and ViewPosition as record
  values, by tfrecord_tools.metadata's rules (known ones only). No other header value: never
  a date (an age is not computed from PatientBirthDate)."""
  from tfrecord_tools import metadata  # noqa: PLC0415
  values = ((metadata.SEX, metadata.sex(ds.get("PatientSex", ""))),
            (metadata.AGE, metadata.age(ds.get("PatientAge", ""))),
            (metadata.VIEW, metadata.view(ds.get("ViewPosition", ""))))
  return tuple((a, v) for a, v in values if v)


@dataclasses.dataclass(frozen=True)
class Rendered:
  """A DICOM file as PNG bytes, and what it was."""
  png: bytes
  description: str     # e.g. "DICOM MONOCHROME1 12-bit RLE Lossless": the manifest's source_mode
  rendering: Rendering | None = None


def decode(data: bytes, window: Window | str = DEFAULT_WINDOW) -> Decoded:
  """A DICOM file's bytes -> its rendered image (steps 1-4). Raises ImageError.
  Callers hold the size against their limit first (`header_size`)."""
  name = _window_name(window)
  window = parse_window(window) if isinstance(window, str) else window
  ds = read(data)
  try:
    image, rendering = _render(ds, window, name)
  except ImageError:
    raise
  except Exception as e:  # noqa: BLE001 - a malformed header must not stop a conversion
    raise ImageError(f"unreadable DICOM ({_why(e)})") from None
  syntax = ds.file_meta.TransferSyntaxUID
  syntax = "" if not syntax.is_compressed else f" {syntax.name}"
  description = (f"DICOM {str(ds.get('PhotometricInterpretation', 'MONOCHROME2')).upper()} "
                 f"{int(ds.get('BitsStored') or 8)}-bit{syntax}")
  return Decoded(image=image, description=description, rendering=rendering,
                 attributes=attributes(ds))


def render(data: bytes, window: Window | str = DEFAULT_WINDOW, *, png_compress_level: int = 6) -> Rendered:
  """A DICOM file's bytes -> PNG (16-bit grey for `full`, else 8-bit grey; 8-bit
  RGB for colour) and a short description. Raises ImageError."""
  from PIL import Image  # noqa: PLC0415
  decoded = decode(data, window)
  buf = io.BytesIO()
  Image.fromarray(decoded.image).save(buf, format="PNG", compress_level=png_compress_level)
  return Rendered(png=buf.getvalue(), description=decoded.description, rendering=decoded.rendering)
