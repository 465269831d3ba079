"""The pixel contract: what the model sees, from file bytes to a uint8 tensor. ONE module.

Every door applies this definition: the converter (numpy/PIL half, no
TensorFlow), the tf.data input pipeline, predict, serve, evaluate and the
exported SavedModel (TensorFlow half, the same steps as graph ops).

  file bytes (PNG 8/16-bit, JPEG incl. CMYK, BMP/GIF; TIFF/WebP via `graph_input`;
              DICOM: first rendered to an image by `tfrecord_tools.dicom` with the
              converter's --dicom_window, in `prepare_image` and `graph_input`)
   0 size         width x height (x frames) read from the header alone (PIL's lazy
                  open; DICOM: Rows, Columns, NumberOfFrames) and held against the
                  door's pixel limit (`max_pixels`, `check_size`) before anything
                  is decoded: a decompression bomb is refused unread.
   1 decode       JPEG: libjpeg's accurate integer IDCT (PIL's default; TF's
                  `dct_method="INTEGER_ACCURATE"`: the two are bit-identical; TF's
                  default fast IDCT is not, it differs by up to 5 grey levels).
                  When --max_side will shrink the image, a JPEG is decoded at the
                  coarsest DCT scale 1/2, 1/4, 1/8 that still covers the target
                  (PIL's `draft` rule: s = min(W // tw, H // th) rounded down to 8/4/2/1).
   2 orientation  the EXIF orientation tag (JPEG APP1) is applied.
   3 modes        -> grey "L", RGB or 16-bit grey: alpha dropped (not composited),
                  grey palettes -> L, other palettes -> RGB, CMYK -> RGB.
   4 channels     the converter's --channels: keep | 1 (ITU-R 601 luma,
                  (19595 R + 38470 G + 7471 B + 2^15) >> 16, PIL's "L") | 3 (replicated).
                  keep: an RGB image whose three channels are equal everywhere (a grey
                  film stored as RGB) is grey, "L" with the same values; it is stored
                  grey when re-encoded. A JPEG kept byte for byte stays as it is but
                  counts as 1 channel: libjpeg's grey output (the Y plane) equals its
                  RGB output there, since the chroma planes are flat.
                  16-bit grey becomes 8-bit, round(v / 257), only when the output
                  needs 8 bits (JPEG or 3 channels).
   5 downscale    --max_side: never enlarges; the longer side becomes max_side,
                  aspect kept; AREA resampling (each output pixel is the exact
                  overlap-weighted mean of the input pixels it covers), rounded
                  half to even: `area_resize` here, `tf.image.resize(method="area")`
                  in the graph. Equal within one grey level (float64 vs float32).
   6 storage      the record bytes: unchanged sources are kept byte for byte
                  (PNG minus metadata chunks); otherwise JPEG sources -> JPEG
                  (quality --jpeg_quality) and the rest -> PNG. TF's JPEG encoder
                  and PIL's give the same pixels (only the JFIF density differs).
  ---------------------------------------------------------------- a record ---
   7 decode       as step 1, reduced by r, the largest of 1, 2, 4, 8 that keeps the
                  shorter side >= the model's size S (ceil(side / r), libjpeg's
                  scaled size): a JPEG in the DCT domain (libjpeg's scaled IDCT);
                  since contract 5, any other image (PNG, BMP, GIF) by the mean of
                  each r x r block (a partial block at the edge: the mean of its
                  pixels), so a film gets the same reduction whether it is stored
                  lossy or lossless (a DICOM is rendered to PNG). 16-bit ->
                  round(v / 257); to the model's channels (JPEG: libjpeg's own
                  grey/RGB output; PNG: libpng's). The input pipeline builds only
                  the decode branches its data set's manifest says occur
                  (`StoredForms`): same pixels, less start-up in every fresh pipeline.
   8 resize       to S x S by the aspect policy (squash | pad | center_crop); since
                  contract 5, AREA resampling (as step 5) when neither side grows,
                  else bilinear with antialiasing; rounded half to even to uint8.
  -> uint8 [S, S, C]: what the model sees. The model rescales.

Steps 7-8 are versioned per run: a run reads records with the contract it was
trained with (`Config.pixel_contract`, in its config.json; a run trained before
contract 5 has none and reads with 4: no reduction of lossless images, bilinear
with antialiasing always). Contract 5 exists for speed and agreement: step 8's
antialiased bilinear (TensorFlow's ScaleAndTranslate kernel) cost more per film
than the DCT-scaled decode saves (docs/benchmarks.md, the independent bound), and
a JPEG film and the same film stored lossless (PNG, DICOM) read within 0.14 grey
levels on average, against 0.46 when only the JPEG was reduced
(docs/benchmarks.md#dicom-presentation-benchmarksdicom_presentationpy).

Steps 1-6 run once per file in the converter (`prepare_image`) and, for a file
that never went through the converter, inside the graph (`prepare_in_graph`),
so `load_file(original bytes)` = `load_image(converted record)` within one grey
level. Steps 7-8 (`load_image`) run on every record in tf.data and on every
request. The residual, measured in tests/test_pixel_contract.py: the area
rounding (at most 1 grey level, before step 8's averaging); PNGs' EXIF
orientation and 1/2/4-bit or 16-bit colour PNGs are normalised by PIL only
(the graph decodes them as libpng does).

Why one module of more than 800 lines: the contract's numpy half (the
converter's steps) and its TensorFlow half (the same steps as graph ops) stay
side by side, step for step, so neither can drift from the other; split in
two, a change to one half would no longer sit beside its twin.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import struct
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tfrecord_tools import dicom
from tfrecord_tools.errors import ImageError  # noqa: F401 - pixels.ImageError, what every door catches

# Bumped whenever a step above changes the pixels (2: area downscale, accurate IDCT;
# 3: R=G=B images are grey; 4: DICOM rendered as a viewer shows it by default, the
# size held against max_pixels from the header, image/dicom/rendering in each record);
# part of the converter's shard fingerprint, so a resume never mixes contracts.
# 5: steps 7-8 only (reading a record: lossless images reduced as a JPEG is, AREA when
# shrinking); the records are the same as 4's.
CONTRACT_VERSION = 5
# The versions of steps 7-8 that `load_image` applies: each run reads with its own
# (`Config.pixel_contract`); LEGACY_READ_CONTRACT is what a run that records none was trained with.
READ_CONTRACTS = (4, 5)
LEGACY_READ_CONTRACT = 4
PNG_COMPRESS_LEVEL = 3    # ~3x faster than PIL's default 6, a few % larger
# Step 0's default limit at every door (converter, predict, serve: each has --max_pixels):
# width x height (x frames) of one image. A 43 x 43 cm detector at 0.1 mm is 18.5 Mpx.
MAX_PIXELS = 50_000_000
JPEG_QUALITY = 95
CHANNELS = ("keep", "1", "3")
IMAGE_FORMATS = ("keep", "png", "jpeg")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclasses.dataclass(frozen=True)
class PreparedImage:
  """An encoded image ready for a record, and what it holds."""
  encoded: bytes         # PNG or JPEG bytes
  image_format: str      # "png" or "jpeg"
  height: int            # of the encoded image
  width: int
  channels: int          # 1 or 3
  bit_depth: int         # 8, or 16 (grayscale PNG only)
  source_format: str = ""   # PIL's name for the source format: "PNG", "JPEG", "BMP", ...
  source_mode: str = ""     # PIL mode of the source: "L", "RGBA", "I;16", ...
  source_height: int = 0    # before resizing (after EXIF orientation)
  source_width: int = 0
  rendering: str = ""       # DICOM: how it was rendered (`dicom.Rendering.to_json`); else ""
  rendering_summary: str = ""   # DICOM: `dicom.Rendering.summary` (the manifest's count key)
  attributes: tuple[tuple[str, str], ...] = ()   # DICOM: sex / age / view from the header
                                                 # (`dicom.attributes`, record values)


def _normalise_channels(value) -> str:
  value = str(value)
  if value not in CHANNELS:
    raise ValueError(f"channels must be one of {CHANNELS}, got {value!r}")
  return value


def _to_canonical(im: Image.Image) -> Image.Image:
  """Any PIL mode -> "L", "RGB" or "I;16" (16-bit grayscale)."""
  mode = im.mode
  if mode in ("L", "RGB", "I;16"):
    return im
  if mode == "1":
    return im.convert("L")
  if mode == "LA" or mode == "La":
    return im.getchannel("L")
  if mode in ("RGBA", "RGBa", "RGBX"):
    return im.convert("RGB")  # drops alpha (no compositing), like tf.io.decode_png(channels=3)
  if mode in ("P", "PA"):
    rgb = im.convert("RGB")
    a = np.asarray(rgb)
    if np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2]):
      return Image.fromarray(np.ascontiguousarray(a[..., 0]), mode="L")
    return rgb
  if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
    return im.convert("RGB")
  if mode in ("I;16B", "I;16L", "I;16N", "I"):
    a = np.asarray(im)
    if a.size and (a.min() < 0 or a.max() > 65535):
      raise ImageError(f"unsupported pixel values for mode {mode} (outside 0..65535)")
    return Image.fromarray(a.astype(np.uint16))
  raise ImageError(f"unsupported image mode {mode}")


def is_grey(rgb) -> bool:
  """True when an "RGB" image's (PIL image or [H, W, 3] array) three channels
  are equal at every pixel: step 4's grey film, recorded as 1 channel."""
  a = np.asarray(rgb)
  return bool(np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2]))


def _to_8bit(im16: Image.Image) -> Image.Image:
  a = np.asarray(im16).astype(np.uint32)
  return Image.fromarray(((a + 128) // 257).astype(np.uint8), mode="L")  # round(v / 257)


def area_resize(a: np.ndarray, height: int, width: int, *, scratch: bool = False) -> np.ndarray:
  """Step 5 in numpy: AREA resampling of [H, W] or [H, W, C] to [height, width] (float32).

  Each output pixel is the mean of the input pixels it covers, partly covered
  ones weighted by the covered fraction: the definition of TensorFlow's
  `tf.image.resize(method="area")`, and in float32 as it computes it. Done
  separably, rows then columns (`_area_rows`): each output row is the weighted
  sum of the at most ceil(scale) + 1 input rows it covers. numpy alone, on
  purpose: the scipy.sparse product it replaced was no faster inside the
  converter (3.4 against 3.2 ms a film, 512 px from 2400 px films), and
  importing scipy.sparse cost 0.1-0.2 s in every converter process. Pillow's
  BOX filter was measured and not used: it weighs whole input pixels (no
  partial coverage), up to 26 grey levels off the area definition on a
  1000 -> 512 px resize.

  scratch: the result lives in this thread's work memory (`_work_array`) and
  the next call overwrites it; `_resize` uses it, as fresh memory costs page faults.
  """
  a = np.asarray(a)
  h, w = a.shape[:2]
  rest = a.shape[2:]
  x = a.reshape(h, -1)
  if height != h:   # rows: [H, W * C] -> [height, W * C]
    last = width == w
    out = (_work_array("rows", (height, x.shape[1]), np.float32) if scratch or not last
           else np.empty((height, x.shape[1]), np.float32))
    x = _area_rows(x, height, out)
  else:
    x = x.astype(np.float32)
  if width != w:    # columns, as rows of the transpose: [W, height * C] -> [width, height * C]
    cols = x.reshape((height, w, -1)).transpose(1, 0, 2).reshape(w, -1)
    out = (_work_array("columns", (width, cols.shape[1]), np.float32) if scratch
           else np.empty((width, cols.shape[1]), np.float32))
    x = _area_rows(cols, width, out).reshape((width, height, -1)).transpose(1, 0, 2)
  return x.reshape((height, width) + rest)


_AREA_CHUNK = 1 << 22   # gathered elements per einsum (16 MiB of float32): bounds the memory


def _area_rows(x: np.ndarray, n_out: int, out: np.ndarray) -> np.ndarray:
  """AREA resampling along axis 0 of a 2-D array: [n_in, M] -> out [n_out, M] float32."""
  index, weight = _area_taps(x.shape[0], n_out)
  step = max(1, _AREA_CHUNK // (index.shape[1] * x.shape[1]))
  for i in range(0, n_out, step):
    # The input rows each output row covers, [rows, taps, M], in the input's own
    # dtype (einsum converts as it sums: cheaper than a float copy of them).
    rows = np.take(x, index[i:i + step], axis=0, mode="clip",
                   out=_work_array("taps", index[i:i + step].shape + x.shape[1:], x.dtype))
    np.einsum("rk,rkm->rm", weight[i:i + step], rows, out=out[i:i + step],
              dtype=np.float32, casting="same_kind")
  return out


_WORK = threading.local()


def _work_array(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
  """A scratch array of `shape`, reused by the next call in this thread. Fresh
  memory for the area resize's arrays costs page faults on every film, ~1 ms
  (more than the arithmetic; measured in the converter)."""
  key, n = (name, np.dtype(dtype).str), math.prod(shape)
  buf = _WORK.__dict__.get(key)
  if buf is None or buf.size < n:
    buf = _WORK.__dict__[key] = np.empty(n, dtype)
  return buf[:n].reshape(shape)


@functools.lru_cache(maxsize=64)
def _area_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
  """Output i averages input cells [i s, (i + 1) s), s = n_in / n_out, each weighted by the
  part of it the interval covers: (input indices [n_out, taps], weights / s [n_out, taps]
  float32); a tap past the input has weight 0 (cached: a data set has few sizes)."""
  scale = n_in / n_out
  lo = np.arange(n_out)[:, None] * scale
  j = np.floor(lo).astype(np.intp) + np.arange(int(np.ceil(scale)) + 1)[None, :]
  weight = np.clip(np.minimum(j + 1, lo + scale) - np.maximum(j, lo), 0, None)
  weight[j >= n_in] = 0
  taps = weight.any(axis=0)      # the last tap is often unused (scale an integer)
  return np.minimum(j[:, taps], n_in - 1), (weight[:, taps] / scale).astype(np.float32)


def _resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
  """Step 5 on a PIL image ("L", "RGB" or "I;16"): area_resize, rounded half to even
  (a mean of in-range values stays in range: no clipping)."""
  width, height = size
  out = area_resize(np.asarray(im), height, width, scratch=True)
  out = np.rint(out, out=out).astype(np.uint16 if im.mode == "I;16" else np.uint8, order="C")
  return Image.fromarray(out) if im.mode == "I;16" else Image.fromarray(out, mode=im.mode)


def _target_size(width: int, height: int, max_side: int) -> tuple[int, int] | None:
  if not max_side or max(width, height) <= max_side:
    return None
  scale = max_side / max(width, height)
  return (max(1, round(width * scale)), max(1, round(height * scale)))


def _png_keepable(data: bytes) -> bool:
  """True for 8-bit gray/RGB and 16-bit gray PNGs (decoders agree on those exactly)."""
  if len(data) < 29 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
    return False
  bit_depth, color_type = data[24], data[25]
  return (color_type == 0 and bit_depth in (8, 16)) or (color_type == 2 and bit_depth == 8)


def _strip_png_metadata(data: bytes) -> bytes:
  """The PNG with only its IHDR, IDAT and IEND chunks: same pixels, no ICC
  profile (libpng warns about many), gamma, text or EXIF. Chunks are copied
  whole, CRCs included, so nothing is re-encoded."""
  out, pos = [_PNG_SIGNATURE], len(_PNG_SIGNATURE)
  while pos + 12 <= len(data):
    (length,) = struct.unpack(">I", data[pos:pos + 4])
    kind = data[pos + 4:pos + 8]
    end = pos + 12 + length
    if kind in (b"IHDR", b"IDAT", b"IEND"):
      out.append(data[pos:end])
    pos = end
    if kind == b"IEND":
      break
  return b"".join(out)


def header_size(data: bytes, name: str = "") -> tuple[int, int, int]:
  """Step 0: (width, height, frames) from the file's header alone, nothing decoded (PIL's
  lazy open; DICOM: Columns, Rows, NumberOfFrames). Raises ImageError: not an image,
  a broken header, or past PIL's own decompression-bomb limit."""
  if dicom.is_dicom(data, name):
    return dicom.header_size(data)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")   # DecompressionBombWarning: the caller's limit decides
      with Image.open(io.BytesIO(data)) as im:   # reads the header, decodes no pixels
        return im.width, im.height, 1   # one frame is read (the first of a TIFF or GIF)
  except Exception as e:  # noqa: BLE001 - PIL raises many types for broken headers
    raise _open_error(e) from None


def check_size(width: int, height: int, frames: int = 1, max_pixels: int = MAX_PIXELS,
               flag: str = "--max_pixels") -> None:
  """ImageError "image too large: ..." when width x height x frames > max_pixels (0: no limit)."""
  n = int(width) * int(height) * max(1, int(frames))
  if max_pixels and n > max_pixels:
    size = f"{width}x{height}" + (f"x{frames} frames" if frames > 1 else "")
    raise ImageError(f"image too large: {size} = {n} pixels, more than the limit of "
                     f"{max_pixels} ({flag})")


def _open_error(e: Exception) -> ImageError:
  """PIL's exception for a file it cannot open or decode -> ImageError with the reason."""
  if isinstance(e, UnidentifiedImageError):
    return ImageError("not an image (unrecognised format)")
  if isinstance(e, Image.DecompressionBombError):
    return ImageError(f"image too large: {e}")
  if isinstance(e, (OSError, SyntaxError, ValueError, EOFError)):
    reason = str(e) or type(e).__name__
    if "truncated" in reason.lower() or isinstance(e, EOFError):
      return ImageError(f"truncated image ({reason})")
    return ImageError(f"corrupt image ({reason})")
  return ImageError(f"cannot decode ({type(e).__name__}: {e})")


def prepare_image(data: bytes, *, max_side: int = 0, channels: str = "keep",
                  image_format: str = "keep", jpeg_quality: int = JPEG_QUALITY,
                  dicom_window: str = dicom.DEFAULT_WINDOW, name: str = "",
                  max_pixels: int = MAX_PIXELS) -> PreparedImage:
  """Decodes, validates and normalises one image file's bytes (see module doc).

  Args:
    data: the whole source file.
    max_side: shrink so that max(height, width) <= max_side; 0 keeps the size.
    channels: "keep", "1" or "3" (ints 1 and 3 are accepted too).
    image_format: "keep" (JPEG stays JPEG, others become PNG), "png" or "jpeg".
    jpeg_quality: quality for JPEGs this function encodes.
    dicom_window: how a DICOM file becomes an image first (`tfrecord_tools.dicom`).
    name: the file's name; a .dcm/.dicom file without the DICM preamble is DICOM too.
    max_pixels: step 0's limit on width x height (x frames), read from the header
      before decoding; 0: none (PIL's own decompression-bomb limit still holds).

  Returns:
    PreparedImage with the encoded bytes and their height, width, channels
    (1 or 3) and bit depth (8 or 16).

  Raises:
    ImageError: empty, truncated or corrupt file, not an image, too large, an
      unsupported mode; `e.reason` says which.
  """
  channels = _normalise_channels(channels)
  if image_format not in IMAGE_FORMATS:
    raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
  if max_side < 0:
    raise ValueError("max_side must be >= 0")
  if not data:
    raise ImageError("empty file (0 bytes)")
  dicom_image = _render_dicom(data, dicom_window, name, max_pixels)
  if dicom_image is not None:
    im = Image.fromarray(dicom_image.image)
    source_format, source_mode, orientation, size0 = "DICOM", dicom_image.description, 1, im.size
  else:
    im, source_format, source_mode, orientation, size0 = _open(data, max_side, max_pixels)
  if im.width < 1 or im.height < 1:
    raise ImageError("image has no pixels")

  canonical = _to_canonical(im)
  changed = canonical is not im or orientation != 1 or dicom_image is not None
  out_format = image_format
  if out_format == "keep":
    out_format = "jpeg" if source_format == "JPEG" else "png"

  if channels == "1" and canonical.mode == "RGB":
    canonical, changed = canonical.convert("L"), True
  if channels == "keep" and canonical.mode == "RGB" and is_grey(canonical):
    # A grey film stored as RGB: "L", the same values (luma of v, v, v is v).
    # A JPEG whose bytes are kept decodes to the same grey (see step 4).
    canonical = canonical.convert("L")
    changed = changed or source_format != "JPEG"
  if canonical.mode == "I;16" and (channels == "3" or out_format == "jpeg"):
    canonical, changed = _to_8bit(canonical), True
  if channels == "3" and canonical.mode == "L":
    canonical, changed = canonical.convert("RGB"), True

  target = _target_size(canonical.width, canonical.height, max_side)
  if target:
    canonical, changed = _resize(canonical, target), True
  # A draft decode (reduced DCT scale) changes the pixels even when no resize
  # remains to be done.
  if source_format == "JPEG" and canonical.size != size0:
    changed = True

  keep_bytes = not changed and (
      (out_format == "jpeg" and source_format == "JPEG") or
      (out_format == "png" and source_format == "PNG" and _png_keepable(data)))
  if keep_bytes:
    encoded = data if out_format == "jpeg" else _strip_png_metadata(data)
  else:
    canonical.info = {}  # no ICC profile, EXIF or text chunks in what we write
    buf = io.BytesIO()
    if out_format == "jpeg":
      canonical.save(buf, format="JPEG", quality=jpeg_quality)
    else:
      canonical.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    encoded = buf.getvalue()

  return PreparedImage(
      encoded=encoded, image_format=out_format, height=canonical.height,
      width=canonical.width, channels=3 if canonical.mode == "RGB" else 1,
      bit_depth=16 if canonical.mode == "I;16" else 8,
      source_format=source_format, source_mode=source_mode, source_height=size0[1],
      source_width=size0[0],
      rendering=dicom_image.rendering.to_json() if dicom_image is not None else "",
      rendering_summary=dicom_image.rendering.summary if dicom_image is not None else "",
      attributes=dicom_image.attributes if dicom_image is not None else ())


def _open(data: bytes, max_side: int, max_pixels: int):
  """Steps 0-2 for what PIL reads: (image, format, mode, EXIF orientation, displayed size).
  The size is held against max_pixels from the header, before im.load() decodes."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data", palette transparency notes
      im = Image.open(io.BytesIO(data))
      check_size(im.width, im.height, 1, max_pixels)
      source_format, source_mode = im.format or "", im.mode
      orientation = 1
      if source_format in ("JPEG", "PNG", "TIFF", "WEBP", "MPO"):
        orientation = im.getexif().get(0x0112, 1)
        orientation = orientation if orientation in range(2, 9) else 1
      size0 = im.size if orientation in (1, 2, 3, 4) else im.size[::-1]
      target = _target_size(size0[0], size0[1], max_side)
      if target and source_format == "JPEG" and source_mode in ("L", "RGB"):
        # Decode at 1/2, 1/4 or 1/8 scale (never below the target): the fast path.
        want = target if orientation in (1, 2, 3, 4) else target[::-1]
        im.draft(source_mode, want)
      im.load()
      if orientation != 1:
        im = ImageOps.exif_transpose(im)
  except ImageError:
    raise
  except Exception as e:  # noqa: BLE001  (a malformed file must not stop the conversion)
    raise _open_error(e) from None
  return im, source_format, source_mode, orientation, size0


def _render_dicom(data: bytes, dicom_window: str, name: str, max_pixels: int = MAX_PIXELS):
  """The DICOM hook of every door: a DICOM file's `dicom.Decoded` image (its size held
  against max_pixels from the header first), None for other bytes."""
  if not dicom.is_dicom(data, name):
    return None
  try:
    window = dicom.parse_window(dicom_window)
  except ValueError as e:
    raise ValueError(f"dicom_window {e}") from None
  try:
    size = dicom.header_size(data)
  except ImageError:   # no Rows/Columns: nothing can be decoded; the full read says why
    size = None
  if size:
    check_size(*size, max_pixels)
  return dicom.decode(data, window)


# ==========================================================================
# Doors that are not the converter: bytes a client sends -> the graph's input.
# ==========================================================================

_JPEG_SIGNATURE = b"\xff\xd8\xff"
# Formats the graph decodes itself (tf.io.decode_png / decode_jpeg / decode_image).
_GRAPH_SIGNATURES = (_PNG_SIGNATURE, _JPEG_SIGNATURE, b"BM", b"GIF87a", b"GIF89a")


def graph_input(data: bytes, *, dicom_window: str = dicom.DEFAULT_WINDOW, name: str = "",
                max_pixels: int = MAX_PIXELS) -> bytes:
  """A file's bytes as the graph takes them: PNG/JPEG/BMP/GIF unchanged; DICOM
  rendered by `tfrecord_tools.dicom` with `dicom_window` (the run's, from
  `conversion_args`) and any other format PIL reads (TIFF, WebP, ...) decoded
  here (steps 1-3), both written as lossless PNGs. Every one's size is held
  against max_pixels (0: no limit) from its header first (step 0). Raises
  ImageError for bytes that are no image or too large."""
  if data.startswith(_GRAPH_SIGNATURES):
    if max_pixels:
      check_size(*header_size(data), max_pixels)
    return data
  return prepare_image(data, image_format="png", dicom_window=dicom_window, name=name,
                       max_pixels=max_pixels).encoded


def conversion_args(manifest_args: dict | None) -> dict:
  """The converter's per-image arguments recorded in dataset.json ("args"),
  as `prepare_image` / `prepare_in_graph` keyword arguments."""
  args = manifest_args or {}
  return {"max_side": int(args.get("max_side") or 0),
          "channels": _normalise_channels(args.get("channels", "keep")),
          "image_format": str(args.get("image_format") or "keep"),
          "jpeg_quality": int(args.get("jpeg_quality") or JPEG_QUALITY),
          "dicom_window": str(args.get("dicom_window") or dicom.LEGACY_WINDOW)}


def dicom_window_of(conversion: dict, choice: str | None = None) -> str:
  """How DICOM is rendered for a run whose data was converted with `conversion`: `choice`
  (an already checked window: viewer, full, file, none, CENTER,WIDTH or a preset), or, when
  None, as the converter rendered the training data (a data set converted before `viewer`
  existed says "full": it keeps it). The one rule of predict, serve, export and the Python
  API."""
  return choice or str(conversion.get("dicom_window") or dicom.LEGACY_WINDOW)


# ==========================================================================
# The TensorFlow half. TensorFlow is imported on first use, so the
# converter's workers (numpy/PIL only) never load it.
# ==========================================================================

ASPECTS = ("squash", "pad", "center_crop")
# A PNG starts with the 8-byte signature, then the IHDR chunk: 4 bytes length,
# b"IHDR", 4 bytes width, 4 bytes height, 1 byte bit depth, 1 byte colour type.
_PNG_BIT_DEPTH_OFFSET = 24
_PNG_COLOR_TYPE_OFFSET = 25
# libjpeg decodes at 1/2, 1/4 and 1/8 scale in the DCT domain, several times
# cheaper than a full decode followed by a downscale.
_JPEG_RATIOS = (1, 2, 4, 8)
# Bit-identical to PIL (libjpeg's JDCT_ISLOW); TF's default fast IDCT is not.
_DCT = "INTEGER_ACCURATE"
_EXIF_SEARCH_BYTES = 1 << 16


def _tf():
  import tensorflow as tf  # noqa: PLC0415 - lazy: the converter's workers never need it
  return tf


def _starts_with(encoded, signature: bytes):
  """bool scalar: the encoded bytes (tf.string scalar) begin with `signature`."""
  tf = _tf()
  return tf.equal(tf.strings.substr(encoded, 0, len(signature)), signature)


@dataclasses.dataclass(frozen=True)
class StoredForms:
  """What a data set's record images can be, read from its manifest's image_stats.

  Step 7 for records only builds the decode branches these need. Every branch
  is instantiated in every fresh tf.data pipeline: the full set (PNG 8/16-bit,
  JPEG at four DCT scales, BMP/GIF with their channel conversions) delays the
  first batch by about 0.1 s over a plain decode, and a data set with no cache
  pays that every epoch. The pixels are the same: only branches that cannot be
  taken are left out, and a record that contradicts its manifest fails loudly.
  """
  png8: bool
  png16: bool
  jpeg: bool
  max_short_side: int   # an upper bound of any record image's shorter side; 0: unknown

  @classmethod
  def from_image_stats(cls, image_stats: dict | None) -> StoredForms | None:
    """None (decode anything) when the statistics are missing or name a form
    the converter does not write (it writes PNG and JPEG, 8 or 16 bits)."""
    formats = set((image_stats or {}).get("format") or ())
    depths = set((image_stats or {}).get("bit_depth") or ())
    if not formats or not depths or not formats <= {"png", "jpeg"} or not depths <= {"8", "16"}:
      return None
    if "16" in depths and "png" not in formats:
      return None
    sides = [(image_stats.get(k) or {}).get("max", 0) for k in ("height", "width")]
    return cls(png8="png" in formats and "8" in depths, png16="16" in depths,
               jpeg="jpeg" in formats, max_short_side=int(min(sides)))


def decode_image(encoded, channels: int, *, min_side: int = 0,
                 forms: StoredForms | None = None, contract: int = CONTRACT_VERSION):
  """Step 7: one encoded record image -> uint8 [H, W, channels].

  Args:
    encoded: tf.string scalar, a PNG (8- or 16-bit) or JPEG (other formats
      tf.io.decode_image reads, e.g. BMP, also work).
    channels: 1 (grayscale) or 3 (RGB); converted if needed.
    min_side: 0 decodes at full size. Otherwise an image whose shorter side is
      at least 2x this many pixels is reduced to 1/2, 1/4 or 1/8 while its
      shorter side stays >= min_side: a JPEG in its DCT decode, and under
      contract 5 any other image by block means. `load_image` sets it to the
      output size.
    forms: what the images can be (`StoredForms`, from a data set's manifest):
      only those branches are built, with the same pixels. None: any image.
    contract: the pixel contract's version (READ_CONTRACTS) the reader applies.

  Returns:
    uint8 [H, W, channels]; a 16-bit PNG mapped by round(v / 257).
  """
  tf = _tf()
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}")
  _check_contract(contract)
  reduce_lossless = contract >= 5 and min_side > 0
  encoded = tf.convert_to_tensor(encoded, tf.string)
  if forms is not None:
    image = _decode_stored(encoded, channels, min_side, forms, reduce_lossless)
    image.set_shape([None, None, channels])
    return image
  is_png = _starts_with(encoded, _PNG_SIGNATURE)
  is_jpeg = _starts_with(encoded, _JPEG_SIGNATURE)

  lossless = _lossless_reduction(reduce_lossless, min_side)

  def other():  # BMP, GIF: decode as stored, then convert the channels
    return lossless(_to_channels(
        tf.io.decode_image(encoded, dtype=tf.uint8, expand_animations=False), channels))

  image = tf.case([(is_png, lambda: lossless(_decode_png(encoded, channels))),
                   (is_jpeg, lambda: _decode_jpeg(encoded, channels, min_side))],
                  default=other, exclusive=True)
  image.set_shape([None, None, channels])
  return image


def _lossless_reduction(reduce: bool, min_side: int):
  """What step 7 does to a decoded lossless image: `_block_mean` (contract 5), or nothing."""
  return (lambda image: _block_mean(image, min_side)) if reduce else (lambda image: image)


def _never_reduced(max_short_side: int, min_side: int) -> bool:
  """With the data set's largest shorter side known (> 0): no image is large enough for
  step 7 to reduce it, so the reducing branches need not be built."""
  return max_short_side > 0 and _ratio_index(max_short_side, min_side, _py_where) == 0


def _check_contract(contract: int) -> None:
  if contract not in READ_CONTRACTS:
    raise ValueError(f"pixel contract {contract!r} is not one this version reads "
                     f"({', '.join(map(str, READ_CONTRACTS))})")


def _block_mean(image, min_side: int):
  """Step 7 for a lossless image (contract 5): uint8 [H, W, C] -> [ceil(H / r), ceil(W / r), C],
  r the largest of 1, 2, 4, 8 keeping the shorter side >= min_side (a JPEG's DCT rule),
  each pixel the mean of its r x r block (at the edge: of the block's pixels that exist),
  rounded half to even. A reshape and a sum in uint16, exact (at most 64 x 255 = 16320)
  and 2 bytes a pixel: serve's decoding memory bound (DECODE_BYTES_PER_PIXEL) holds."""
  tf = _tf()
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  r = tf.gather(tf.constant(_JPEG_RATIOS), _ratio_index(tf.minimum(h, w), min_side, tf.where))

  def reduce():
    oh, ow = (h + r - 1) // r, (w + r - 1) // r
    x = tf.cast(tf.pad(image, [[0, oh * r - h], [0, ow * r - w], [0, 0]]), tf.uint16)
    x = tf.reduce_sum(tf.reshape(x, tf.stack([oh, r, ow * r, shape[2]])), axis=1)   # rows
    x = tf.reduce_sum(tf.reshape(x, tf.stack([oh, ow, r, shape[2]])), axis=2)       # columns
    rows = tf.cast(tf.minimum(r, h - tf.range(oh) * r), tf.float32)
    cols = tf.cast(tf.minimum(r, w - tf.range(ow) * r), tf.float32)
    return tf.cast(tf.round(tf.cast(x, tf.float32) / (rows[:, None, None] * cols[None, :, None])),
                   tf.uint8)

  return tf.cond(r > 1, reduce, lambda: image)


def _decode_png(encoded, channels: int, depths: tuple[int, ...] = (8, 16)):
  """A PNG of one of `depths` bits -> uint8 (16-bit: round(v / 257))."""
  tf = _tf()
  png8 = lambda: tf.io.decode_png(encoded, channels)  # noqa: E731
  png16 = lambda: _uint16_to_uint8(tf.io.decode_png(encoded, channels, dtype=tf.uint16))  # noqa: E731
  is16 = tf.equal(tf.strings.substr(encoded, _PNG_BIT_DEPTH_OFFSET, 1), b"\x10")
  if len(depths) == 2:
    return tf.cond(is16, png16, png8)
  with tf.control_dependencies([_expect(is16 if depths == (16,) else tf.logical_not(is16),
                                        f"a {depths[0]}-bit PNG")]):
    return png16() if depths == (16,) else png8()


def _decode_jpeg(encoded, channels: int, min_side: int, max_short_side: int = 0):
  """A JPEG -> uint8, at the coarsest DCT scale keeping the shorter side >= min_side.

  With `max_short_side` (> 0) known, no image can be scaled when even that
  side cannot: then the one full-scale decode is built."""
  tf = _tf()
  if min_side <= 0:
    return tf.io.decode_jpeg(encoded, channels, dct_method=_DCT)
  if _never_reduced(max_short_side, min_side):
    shape = tf.io.extract_jpeg_shape(encoded)
    fits = tf.minimum(shape[0], shape[1]) <= max_short_side
    with tf.control_dependencies([_expect(fits, f"a JPEG with a shorter side <= {max_short_side}")]):
      return tf.io.decode_jpeg(encoded, channels, dct_method=_DCT)
  return _decode_jpeg_scaled(encoded, channels, min_side)


def _decode_stored(encoded, channels: int, min_side: int, forms: StoredForms,
                   reduce_lossless: bool = False):
  """decode_image's branches for `forms` only; a record of another form fails."""
  tf = _tf()
  depths = tuple(d for d, on in ((8, forms.png8), (16, forms.png16)) if on)
  lossless = _lossless_reduction(
      reduce_lossless and not _never_reduced(forms.max_short_side, min_side), min_side)
  png = lambda: lossless(_decode_png(encoded, channels, depths))  # noqa: E731
  jpeg = lambda: _decode_jpeg(encoded, channels, min_side, forms.max_short_side)  # noqa: E731
  is_png = _starts_with(encoded, _PNG_SIGNATURE)
  is_jpeg = _starts_with(encoded, _JPEG_SIGNATURE)
  if depths and forms.jpeg:
    with tf.control_dependencies([_expect(tf.logical_or(is_png, is_jpeg), "a PNG or JPEG")]):
      return tf.cond(is_png, png, jpeg)
  with tf.control_dependencies([_expect(is_png if depths else is_jpeg,
                                        "a PNG" if depths else "a JPEG")]):
    return png() if depths else jpeg()


def _expect(condition, what: str):
  """An assertion that a record image is what its manifest's image_stats say."""
  return _tf().debugging.Assert(condition, [
      f"a record image is not {what}, as its data set's manifest (image_stats) says: the "
      "shards were changed after conversion; convert the data set again"])


def resize_image(image, size: int, aspect: str = "squash", contract: int = CONTRACT_VERSION):
  """Step 8: uint8 [H, W, C] -> uint8 [size, size, C].

  Contract 5: AREA resampling when neither side grows, else bilinear with
  antialiasing; contract 4: bilinear with antialiasing (a triangle filter
  when shrinking) always. Rounded back to uint8. aspect: squash (plain resize;
  a 400x300 film is stretched) | pad (longer side to `size`, centred, black
  letterbox) | center_crop (the central square of side min(H, W), then resize).
  An enlargement (TTA's views, augment's low-resolution round trip) is the same
  under both contracts.
  """
  tf = _tf()
  if aspect not in ASPECTS:
    raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
  _check_contract(contract)
  image = tf.convert_to_tensor(image)
  channels = image.shape[-1]
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  if aspect == "squash":
    out = _resize_to_uint8(image, [size, size], contract)
  elif aspect == "center_crop":
    side = tf.minimum(h, w)
    crop = tf.image.crop_to_bounding_box(image, (h - side) // 2, (w - side) // 2, side, side)
    out = _resize_to_uint8(crop, [size, size], contract)
  else:  # pad
    longer = tf.cast(tf.maximum(h, w), tf.float32)
    scale = float(size) / longer
    new_h = tf.maximum(1, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
    new_w = tf.maximum(1, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
    scaled = _resize_to_uint8(image, tf.stack([new_h, new_w]), contract)
    out = tf.image.pad_to_bounding_box(scaled, (size - new_h) // 2, (size - new_w) // 2, size, size)
  out.set_shape([size, size, channels])
  return out


def load_image(encoded, *, channels: int, size: int, aspect: str = "squash",
               forms: StoredForms | None = None, contract: int = CONTRACT_VERSION):
  """Steps 7-8: a record's encoded bytes -> uint8 [size, size, channels].

  What the input pipeline maps over every record (with its data set's
  `forms`) and what every request ends with (`load_file`); `contract`: the
  run's (READ_CONTRACTS).
  """
  image = decode_image(encoded, channels, min_side=size, forms=forms, contract=contract)
  return resize_image(image, size, aspect, contract)


def load_file(encoded, *, conversion: dict, channels: int, size: int, aspect: str = "squash",
              contract: int = CONTRACT_VERSION):
  """Steps 1-8: the bytes of a file that never went through the converter ->
  uint8 [size, size, channels], as if it had been converted with `conversion`
  (`conversion_args(manifest["args"])`) and then read back as a record."""
  return load_image(prepare_in_graph(encoded, **conversion), channels=channels, size=size,
                    aspect=aspect, contract=contract)


def prepare_in_graph(encoded, *, max_side: int = 0, channels: str = "keep",
                     image_format: str = "keep", jpeg_quality: int = JPEG_QUALITY,
                     dicom_window: str = dicom.DEFAULT_WINDOW):
  """Steps 1-6 as graph ops: the bytes `prepare_image(data, **same args).encoded`
  would hold (same pixels within one grey level; see the module docstring).
  DICOM never reaches the graph: `graph_input` renders it with `dicom_window` first."""
  del dicom_window
  tf = _tf()
  channels = _normalise_channels(channels)
  encoded = tf.convert_to_tensor(encoded, tf.string)
  is_png = _starts_with(encoded, _PNG_SIGNATURE)
  is_jpeg = _starts_with(encoded, _JPEG_SIGNATURE)
  out_for = lambda source: source if image_format == "keep" else image_format  # noqa: E731
  finish = dict(max_side=max_side, channels=channels, quality=jpeg_quality, original=encoded)

  def jpeg():
    shape = tf.io.extract_jpeg_shape(encoded)               # stored [H, W, C]
    orientation = _exif_orientation(encoded)
    swap = orientation >= 5                                 # 5-8 turn the image by 90 degrees
    ratio = _draft_ratio(shape[0], shape[1], swap, max_side)
    image = _switch_ratio(encoded, ratio)                   # step 1: decode (native channels)
    image = _orient(image, orientation)                     # step 2
    changed = tf.logical_or(orientation != 1, ratio > 1)
    # Bytes are kept only as a JPEG (`prepare_image`'s keep_bytes).
    return _finish_8bit(image, changed, keepable=out_for("jpeg") == "jpeg",
                        out_format=out_for("jpeg"), grey_keeps_bytes=True, **finish)

  def png():
    bit_depth = tf.strings.substr(encoded, _PNG_BIT_DEPTH_OFFSET, 1)
    color_type = tf.strings.substr(encoded, _PNG_COLOR_TYPE_OFFSET, 1)
    gray16 = tf.logical_and(tf.equal(bit_depth, b"\x10"), tf.equal(color_type, b"\x00"))
    keepable = tf.logical_or(
        tf.logical_and(tf.equal(color_type, b"\x00"), tf.equal(bit_depth, b"\x08")),
        tf.logical_and(tf.equal(color_type, b"\x02"), tf.equal(bit_depth, b"\x08")))

    def png16():
      image = tf.io.decode_png(encoded, 1, dtype=tf.uint16)
      out = out_for("png")
      if channels == "3" or out == "jpeg":
        return _finish_8bit(_uint16_to_uint8(image), tf.constant(True), keepable=False,
                            out_format=out, **finish)
      return _finish_16bit(image, **finish)

    def png8():
      image = tf.io.decode_png(encoded, 0)                  # native: 1, 2, 3 or 4 channels
      n = tf.shape(image)[-1]
      image = tf.cond(n == 2, lambda: image[..., :1],       # LA -> L (alpha dropped)
                      lambda: tf.cond(n == 4, lambda: image[..., :3], lambda: image))
      palette = tf.equal(color_type, b"\x03")
      gray = tf.logical_and(
          palette, tf.logical_and(tf.shape(image)[-1] == 3,
                                  tf.reduce_all(tf.equal(image, image[..., :1]))))
      image = tf.cond(gray, lambda: image[..., :1], lambda: image)   # grey palette -> L
      return _finish_8bit(image, tf.logical_not(keepable), keepable=True, out_format=out_for("png"),
                          **finish)

    return tf.cond(gray16, png16, png8)

  def other():   # BMP, GIF: PIL's converter writes them as PNG
    image = tf.io.decode_image(encoded, dtype=tf.uint8, expand_animations=False)
    n = tf.shape(image)[-1]
    image = tf.cond(n >= 3, lambda: image[..., :3], lambda: image[..., :1])
    return _finish_8bit(image, tf.constant(True), keepable=False, out_format=out_for("png"),
                        **finish)

  return tf.case([(is_jpeg, jpeg), (is_png, png)], default=other, exclusive=True)


def _finish_8bit(image, changed, *, keepable: bool, out_format: str, max_side: int,
                 channels: str, quality: int, original, grey_keeps_bytes: bool = False):
  """Steps 4-6 for uint8 [H, W, 1|3]: channels, downscale, the stored bytes.

  grey_keeps_bytes: a JPEG source, whose bytes may be kept when its RGB is grey.
  """
  tf = _tf()
  n = tf.shape(image)[-1]
  if channels == "keep":
    # R=G=B everywhere: grey, the same values; re-encoded grey unless a JPEG is kept.
    grey = tf.logical_and(n == 3, tf.reduce_all(tf.equal(image, image[..., :1])))
    image = tf.cond(grey, lambda: image[..., :1], lambda: image)
    if not grey_keeps_bytes:
      changed = tf.logical_or(changed, grey)
  if channels == "1":
    changed = tf.logical_or(changed, n == 3)
    image = tf.cond(n == 3, lambda: _pil_luma(image), lambda: image)
  elif channels == "3":
    changed = tf.logical_or(changed, n == 1)
    image = tf.cond(n == 1, lambda: tf.image.grayscale_to_rgb(image), lambda: image)
  image, resized = _downscale(image, max_side, 255)
  changed = tf.logical_or(changed, resized)
  if out_format == "jpeg":
    encode = lambda: tf.io.encode_jpeg(image, quality=quality)  # noqa: E731
  else:
    encode = lambda: tf.io.encode_png(image)  # noqa: E731
  keep = tf.logical_and(tf.logical_not(changed), keepable)
  return tf.cond(keep, lambda: original, encode)


def _finish_16bit(image, *, max_side: int, channels: str, quality: int, original):
  """Steps 5-6 for a 16-bit grey PNG that stays 16-bit."""
  tf = _tf()
  del channels, quality
  image, resized = _downscale(image, max_side, 65535)
  return tf.cond(resized, lambda: tf.io.encode_png(image), lambda: original)


def _downscale(image, max_side: int, top: int):
  """Step 5: area resampling so the longer side is max_side; (image, resized?)."""
  tf = _tf()
  if not max_side:
    return image, tf.constant(False)
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  longer = tf.maximum(h, w)
  resized = longer > max_side
  # Python's round(side * (max_side / longer)): float64, half to even, >= 1.
  scale = tf.constant(float(max_side), tf.float64) / tf.cast(longer, tf.float64)
  th = tf.maximum(1, tf.cast(tf.round(tf.cast(h, tf.float64) * scale), tf.int32))
  tw = tf.maximum(1, tf.cast(tf.round(tf.cast(w, tf.float64) * scale), tf.int32))

  def shrink():
    out = tf.image.resize(tf.cast(image, tf.float32), tf.stack([th, tw]), method="area")
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, float(top)), image.dtype)

  return tf.cond(resized, shrink, lambda: image), resized


def _draft_ratio(height, width, swap, max_side: int):
  """PIL's `draft` rule for the JPEG DCT scale that still covers the max_side target."""
  tf = _tf()
  if not max_side:
    return tf.constant(1)
  h0 = tf.where(swap, width, height)        # as displayed (after orientation)
  w0 = tf.where(swap, height, width)
  longer = tf.maximum(h0, w0)
  scale = tf.constant(float(max_side), tf.float64) / tf.cast(longer, tf.float64)
  th = tf.maximum(1, tf.cast(tf.round(tf.cast(h0, tf.float64) * scale), tf.int32))
  tw = tf.maximum(1, tf.cast(tf.round(tf.cast(w0, tf.float64) * scale), tf.int32))
  want_h, want_w = tf.where(swap, tw, th), tf.where(swap, th, tw)    # back to stored orientation
  s = tf.minimum(width // want_w, height // want_h)
  ratio = tf.constant(1)
  for r in _JPEG_RATIOS[1:]:
    ratio = tf.where(s >= r, r, ratio)
  return tf.where(longer > max_side, ratio, 1)


def _switch_ratio(encoded, ratio):
  """decode_jpeg at 1/ratio scale, native channels (grey stays grey)."""
  tf = _tf()
  index = tf.constant(0)
  for i, r in enumerate(_JPEG_RATIOS):
    index = tf.where(tf.equal(ratio, r), i, index)
  branches = [lambda r=r: tf.io.decode_jpeg(encoded, 0, ratio=r, dct_method=_DCT) for r in _JPEG_RATIOS]
  return tf.switch_case(index, branches)


def _exif_orientation(encoded):
  """The EXIF Orientation tag (0x0112) of a JPEG's APP1 segment, 1 when absent or invalid."""
  tf = _tf()
  head = tf.strings.substr(encoded, 0, _EXIF_SEARCH_BYTES)
  parts = tf.strings.split(head, sep="Exif\x00\x00", maxsplit=1)
  # Padding, so that reads past the end of a malformed segment stay in bounds.
  padded = tf.strings.join([head, tf.constant(b"\x00" * (_EXIF_SEARCH_BYTES + 16))])

  def read():
    tiff_start = tf.strings.length(parts[0]) + 6
    little = tf.equal(tf.strings.substr(padded, tiff_start, 2), b"II")

    def uint(offsets, nbytes):
      offsets = tf.clip_by_value(offsets, 0, _EXIF_SEARCH_BYTES)
      raw = tf.io.decode_raw(tf.strings.substr(tf.fill(tf.shape(offsets), padded),
                                               tiff_start + offsets, tf.fill(tf.shape(offsets), nbytes)),
                             tf.uint8)
      raw = tf.cast(raw, tf.int64)
      weights_le = tf.constant([256 ** i for i in range(nbytes)], tf.int64)
      weights_be = tf.constant([256 ** (nbytes - 1 - i) for i in range(nbytes)], tf.int64)
      return tf.reduce_sum(raw * tf.where(little, weights_le, weights_be), axis=-1)

    ifd = tf.cast(uint(tf.constant([4]), 4)[0], tf.int32)
    count = tf.cast(tf.minimum(uint(tf.reshape(ifd, [1]), 2)[0], 64), tf.int32)
    entries = ifd + 2 + 12 * tf.range(count)
    tags = uint(entries, 2)
    values = uint(entries + 8, 2)
    found = tf.boolean_mask(values, tf.equal(tags, 0x0112))
    value = tf.cond(tf.size(found) > 0, lambda: tf.cast(found[0], tf.int32), lambda: tf.constant(1))
    return tf.where(tf.logical_and(value >= 2, value <= 8), value, 1)

  return tf.cond(tf.size(parts) > 1, read, lambda: tf.constant(1))


def _orient(image, orientation):
  """Step 2: PIL's ImageOps.exif_transpose for orientation 1-8."""
  tf = _tf()
  transpose = lambda x: tf.transpose(x, [1, 0, 2])  # noqa: E731
  branches = [
      lambda: image,                                    # 1
      lambda: image[:, ::-1],                           # 2 mirror
      lambda: image[::-1, ::-1],                        # 3 rotate 180
      lambda: image[::-1],                              # 4 flip
      lambda: transpose(image),                         # 5 transpose
      lambda: tf.image.rot90(image, 3),                 # 6 rotate 90 clockwise (PIL ROTATE_270)
      lambda: transpose(image)[::-1, ::-1],             # 7 transverse
      lambda: tf.image.rot90(image, 1),                 # 8 rotate 90 counter-clockwise
  ]
  return tf.switch_case(orientation - 1, branches)


def _pil_luma(rgb):
  """RGB -> grey exactly as PIL's convert("L"): (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
  tf = _tf()
  x = tf.cast(rgb, tf.int32)
  y = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 32768) // 65536
  return tf.cast(y, tf.uint8)[..., None]


def _to_channels(image, channels: int):
  """uint8 [H, W, 1|3|4] -> [H, W, channels] (alpha dropped, RGB -> luma, gray -> RGB)."""
  tf = _tf()
  have = tf.shape(image)[-1]
  rgb = lambda: image[..., :3]  # noqa: E731
  gray = lambda: image[..., :1]  # noqa: E731
  if channels == 1:
    return tf.cond(have >= 3, lambda: tf.image.rgb_to_grayscale(rgb()), gray)
  return tf.cond(have >= 3, rgb, lambda: tf.image.grayscale_to_rgb(gray()))


def _uint16_to_uint8(image16):
  # round(v / 257) in integers: floor((v + 128) / 257) has no ties to break.
  tf = _tf()
  v = tf.cast(image16, tf.int32)
  return tf.cast((v + 128) // 257, tf.uint8)


def _resize_to_uint8(image, size, contract: int):
  """Step 8's resampling (see resize_image) to size [h, w], rounded half to even."""
  tf = _tf()
  bilinear = lambda: tf.image.resize(image, size, method="bilinear", antialias=True)  # noqa: E731
  if contract >= 5:
    shape = tf.shape(image)
    shrinks = tf.logical_and(shape[0] >= size[0], shape[1] >= size[1])
    resized = tf.cond(shrinks, lambda: tf.image.resize(image, size, method="area"), bilinear)
  else:
    resized = bilinear()
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def _jpeg_ratio_index(encoded, min_side: int):
  """Index into _JPEG_RATIOS of the coarsest DCT scale keeping the shorter side >= min_side."""
  tf = _tf()
  shape = tf.io.extract_jpeg_shape(encoded)
  return _ratio_index(tf.minimum(shape[0], shape[1]), min_side, tf.where)


def _ratio_index(shorter, min_side: int, where):
  """libjpeg's scaled size is ceil(side / ratio): the index of the largest ratio
  that still leaves `min_side` pixels. `where` is tf.where for a tensor side,
  `_py_where` for a Python int."""
  index = 0
  for i, r in enumerate(_JPEG_RATIOS[1:], start=1):
    index = where((shorter + r - 1) // r >= min_side, i, index)
  return index


def _py_where(condition: bool, a, b):
  return a if condition else b


def jpeg_dct_ratio(encoded, min_side: int):
  """The DCT scale (1, 2, 4 or 8) `decode_image(..., min_side=min_side)` decodes
  a record's image at: int32 scalar, 1 for anything but a JPEG."""
  tf = _tf()
  encoded = tf.convert_to_tensor(encoded, tf.string)
  is_jpeg = _starts_with(encoded, _JPEG_SIGNATURE)
  return tf.cond(is_jpeg,
                 lambda: tf.gather(tf.constant(_JPEG_RATIOS), _jpeg_ratio_index(encoded, min_side)),
                 lambda: tf.constant(1))


def _decode_jpeg_scaled(encoded, channels: int, min_side: int):
  """Decodes at the coarsest DCT scale keeping the shorter side >= min_side."""
  tf = _tf()
  branches = [lambda r=r: tf.io.decode_jpeg(encoded, channels, ratio=r, dct_method=_DCT)
              for r in _JPEG_RATIOS]
  return tf.switch_case(_jpeg_ratio_index(encoded, min_side), branches)
