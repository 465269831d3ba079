"""The one per-image normalisation: source file bytes -> the bytes a record holds.

`prepare_image(data, max_side=, channels=, image_format=)` is used by the
converter, by the Beam launcher and by `xraytpu.predict`, so a prediction sees
exactly the pixels training saw. It decodes the file once (validating it), and:

  * applies the EXIF orientation (phone photos of films, some scanners);
  * maps every mode to grayscale "L" (1 channel), RGB (3 channels) or 16-bit
    grayscale: alpha is dropped (RGBA -> RGB, LA -> L, not composited),
    palette images become RGB (or L when the palette is gray), CMYK/YCbCr/LAB
    -> RGB, 1-bit -> L, 16/32-bit integer grayscale -> 16-bit when the values
    fit in [0, 65535];
  * `channels="keep"` keeps 1 or 3 channels as found; "1" converts RGB to
    luma (ITU-R 601-2, PIL's "L"); "3" replicates grayscale;
  * 16-bit grayscale stays a 16-bit PNG unless the output needs 8 bits
    (`image_format="jpeg"` or `channels="3"`): then round(v / 257), the same
    full-range mapping the input pipeline uses;
  * `max_side=N` shrinks (never enlarges) so the longer side is N, aspect kept,
    with an antialiasing filter. JPEGs are first decoded at a reduced DCT scale
    (`Image.draft`), which is what makes conversion of 2000-px X-rays fast;
  * `image_format="keep"` writes JPEG sources as JPEG and everything else as
    PNG. When nothing about the pixels changes, the source bytes are kept
    (no re-encoding loss, no encoding time; PNGs lose only their metadata
    chunks: ICC profile, gamma, text, EXIF).

Output PNGs are encoded with zlib level `PNG_COMPRESS_LEVEL`; JPEGs with
`jpeg_quality` (default 95). Encoding is deterministic: the same input bytes
and arguments always give the same output bytes.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tfrecord_tools import errors

PNG_COMPRESS_LEVEL = 3    # ~3x faster than PIL's default 6, a few % larger
JPEG_QUALITY = 95
CHANNELS = ("keep", "1", "3")
IMAGE_FORMATS = ("keep", "png", "jpeg")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(errors.UserError):
  """The bytes are not a usable image; `reason` is a short human-readable cause."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


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


def _to_8bit(im16: Image.Image) -> Image.Image:
  a = np.asarray(im16).astype(np.uint32)
  return Image.fromarray(((a + 128) // 257).astype(np.uint8), mode="L")  # round(v / 257)


def _resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
  if im.mode == "I;16":
    f = Image.fromarray(np.asarray(im).astype(np.float32), mode="F")
    f = f.resize(size, Image.Resampling.LANCZOS)
    a = np.clip(np.rint(np.asarray(f)), 0, 65535).astype(np.uint16)
    return Image.fromarray(a)
  return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


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


def prepare_image(data: bytes, *, max_side: int = 0, channels: str = "keep",
                  image_format: str = "keep", jpeg_quality: int = JPEG_QUALITY) -> PreparedImage:
  """Decodes, validates and normalises one image file's bytes (see module doc).

  Args:
    data: the whole source file.
    max_side: shrink so that max(height, width) <= max_side; 0 keeps the size.
    channels: "keep", "1" or "3" (ints 1 and 3 are accepted too).
    image_format: "keep" (JPEG stays JPEG, others become PNG), "png" or "jpeg".
    jpeg_quality: quality for JPEGs this function encodes.

  Returns:
    PreparedImage with the encoded bytes and their height, width, channels
    (1 or 3) and bit depth (8 or 16).

  Raises:
    ImageError: empty, truncated or corrupt file, not an image, an
      unsupported mode; `e.reason` says which.
  """
  channels = _normalise_channels(channels)
  if image_format not in IMAGE_FORMATS:
    raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
  if max_side < 0:
    raise ValueError("max_side must be >= 0")
  if not data:
    raise ImageError("empty file (0 bytes)")

  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data", palette transparency notes
      im = Image.open(io.BytesIO(data))
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
  except UnidentifiedImageError:
    if data[128:132] == b"DICM":
      raise ImageError("DICOM is not supported by the converter: export to PNG first "
                       "(16-bit PNG keeps the full range)") from None
    raise ImageError("not an image (unrecognised format)") from None
  except Image.DecompressionBombError as e:
    raise ImageError(f"image too large: {e}") from None
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    reason = str(e) or type(e).__name__
    if "truncated" in reason.lower() or isinstance(e, EOFError):
      reason = f"truncated image ({reason})"
    else:
      reason = f"corrupt image ({reason})"
    raise ImageError(reason) from None
  except Exception as e:  # noqa: BLE001  (a malformed file must not stop the conversion)
    raise ImageError(f"cannot decode ({type(e).__name__}: {e})") from None
  if im.width < 1 or im.height < 1:
    raise ImageError("image has no pixels")

  canonical = _to_canonical(im)
  changed = canonical is not im or orientation != 1
  out_format = image_format
  if out_format == "keep":
    out_format = "jpeg" if source_format == "JPEG" else "png"

  if channels == "1" and canonical.mode == "RGB":
    canonical, changed = canonical.convert("L"), True
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
      bit_depth=16 if canonical.mode == "I;16" else 8, source_format=source_format,
      source_mode=source_mode, source_height=size0[1], source_width=size0[0])
