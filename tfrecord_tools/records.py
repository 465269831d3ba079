"""The record wire format: the one table of Example features, and TFRecord framing.

A shard holds one `tf.train.Example` per image. `FEATURES` below is the only
list of its fields (key, type, default, meaning); everything that writes or
reads a record is derived from it:

  make_example(...)        the `tf.train.Example` (TensorFlow), for writers that have it
  serialize_example(...)   the same bytes as `make_example(...).SerializeToString(
                           deterministic=True)`, written by hand so the converter's
                           workers need no TensorFlow (a test checks the equality)
  feature_spec()           the parse spec for `tf.io.parse_single_example` / `parse_example`

Feature names follow TensorFlow's own image tools so other readers understand
the files. A new field is one row of `FEATURES` (plus, by convention, a
constant for its key), e.g. a multi-hot label vector:

  Feature(MULTI_HOT, "multi_hot", FLOAT_LIST, (), "1.0 per finding present, in `classes` order")

Shards are TFRecord files: per record a uint64 length, the masked CRC32C of the
length, the data and the masked CRC32C of the data (`frame`, `read_records`;
the CRC is google-crc32c's). TensorFlow is imported lazily, only by
`make_example` and `feature_spec`.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, Iterable, Iterator

import google_crc32c

from tfrecord_tools import errors, storage

# Value types of a feature (the `tf.train.Feature` list each is stored in).
BYTES = "bytes"            # one bytes value; a str is written as UTF-8 (storage.escape_name's
                           # text for a name that is not UTF-8)
INT64 = "int64"            # one non-negative int
FLOAT_LIST = "float_list"  # any number of float32 values (e.g. a multi-hot label vector)
KINDS = (BYTES, INT64, FLOAT_LIST)

# Feature keys, one constant each so a typo is a NameError, not a silent miss.
ENCODED = "image/encoded"
FORMAT = "image/format"
HEIGHT = "image/height"
WIDTH = "image/width"
CHANNELS = "image/channels"
BIT_DEPTH = "image/bit_depth"
LABEL = "image/class/label"
TEXT = "image/class/text"
FILENAME = "image/filename"
PATIENT_ID = "image/patient_id"
SHA256 = "image/sha256"
MULTI_HOT = "image/class/multi_hot"
MASK = "image/class/mask"
DICOM_RENDERING = "image/dicom/rendering"
# Patient and acquisition attributes (tfrecord_tools.metadata: their rules and sources).
META_SEX = "image/meta/sex"
META_AGE = "image/meta/age"
META_VIEW = "image/meta/view"
META_COLUMNS = "image/meta/columns"


@dataclasses.dataclass(frozen=True)
class Feature:
  """One field of the Example."""
  key: str            # the feature key in the record
  arg: str            # its keyword argument in make_example / serialize_example
  kind: str           # BYTES | INT64 | FLOAT_LIST
  default: Any        # parsed when absent; written when the writer omits `arg` (None: required)
  meaning: str
  omit_empty: bool = False   # not written when empty (parses back to its default, "")


FEATURES: tuple[Feature, ...] = (
    Feature(ENCODED, "encoded", BYTES, None, "PNG or JPEG, exactly as written by the converter"),
    Feature(FORMAT, "image_format", BYTES, None, 'b"png" or b"jpeg"'),
    Feature(HEIGHT, "height", INT64, None, "pixels of the encoded image"),
    Feature(WIDTH, "width", INT64, None, "pixels of the encoded image"),
    Feature(CHANNELS, "channels", INT64, None, "1 (grayscale) or 3 (RGB)"),
    Feature(BIT_DEPTH, "bit_depth", INT64, None, "8, or 16 (16-bit grayscale PNG)"),
    Feature(LABEL, "label", INT64, None, "index into the manifest's `classes`"),
    Feature(TEXT, "text", BYTES, None, "class name (utf-8)"),
    Feature(FILENAME, "filename", BYTES, None,
            "path relative to the input root (utf-8, '/' separated; bytes that are not UTF-8 "
            "written as \\xHH, tfrecord_tools.storage.escape_name), the patient's id in it "
            "replaced by its pseudonym; h-<keyed hash>.<ext> with --hash_filenames"),
    Feature(PATIENT_ID, "patient_id", BYTES, "",
            'the patient\'s keyed pseudonym pt-<24 hex> (tfrecord_tools.pseudonym; never the id), '
            'or b"" when not grouped'),
    Feature(SHA256, "sha256", BYTES, "", "hex sha256 of the *source* file, for dedup and audit"),
    # Multi-label tasks (manifest "task": "multi_label"; `classes` are then the K findings):
    Feature(MULTI_HOT, "multi_hot", FLOAT_LIST, (),
            "K floats in `classes` order: 1.0 finding present, 0.0 absent (empty for single-label)"),
    Feature(MASK, "mask", FLOAT_LIST, (),
            "K floats: 1.0 where the label is known, 0.0 where it is ignored (uncertain / blank)"),
    # DICOM sources (tfrecord_tools.dicom.Rendering): what the image was rendered with.
    Feature(DICOM_RENDERING, "dicom_rendering", BYTES, "",
            'DICOM sources: JSON of the rendering (window asked, VOI applied: "file window", '
            '"file VOI LUT", "data range", ...; center, width, function, inverted, bit_depth); '
            'b"" for other formats'),
    # Attributes for subgroup results (tfrecord_tools.metadata); b"" = unknown, not written.
    Feature(META_SEX, "meta_sex", BYTES, "", 'b"M" or b"F"; b"" unknown', omit_empty=True),
    Feature(META_AGE, "meta_age", BYTES, "",
            'whole years as text, b"0".."90" (b"90" = 90 or older); b"" unknown', omit_empty=True),
    Feature(META_VIEW, "meta_view", BYTES, "",
            'b"PA", b"AP", b"LATERAL", b"FRONTAL" or another projection; b"" unknown',
            omit_empty=True),
    Feature(META_COLUMNS, "meta_columns", BYTES, "",
            "JSON {column: value} of the label CSV's --metadata_columns; b\"\" when none",
            omit_empty=True),
)


def _parse_default(f: Feature) -> Any:
  """The value `feature_spec` fills in for a record that lacks the feature."""
  if f.default is not None:
    return f.default
  return {BYTES: "", INT64: 0, FLOAT_LIST: ()}[f.kind]


def _values(features: tuple[Feature, ...], given: dict[str, Any], caller: str) -> list[tuple[Feature, Any]]:
  """(feature, value) for every row: the given keyword arguments, defaults for the rest."""
  names = {f.arg for f in features}
  unknown = sorted(set(given) - names)
  if unknown:
    raise TypeError(f"{caller}() got unexpected keyword arguments: {', '.join(unknown)}")
  missing = [f.arg for f in features if f.arg not in given and f.default is None]
  if missing:
    raise TypeError(f"{caller}() missing required keyword arguments: {', '.join(missing)}")
  out = [(f, given[f.arg] if f.arg in given else f.default) for f in features]
  # An empty list is not written at all (it parses back to its empty default), so
  # single-label records carry no multi-label fields.
  return [(f, v) for f, v in out
          if not (f.kind == FLOAT_LIST and len(v) == 0) and not (f.omit_empty and not v)]


def _as_bytes(value: bytes | str) -> bytes:
  if not isinstance(value, str):
    return bytes(value)
  return storage.as_text(value).encode("utf-8")   # a name that is not UTF-8: escaped


# --------------------------------------------------------------------------
# With TensorFlow: the Example and the parse spec.
# --------------------------------------------------------------------------


def make_example(*, features: tuple[Feature, ...] = FEATURES, **values):
  """Builds the `tf.train.Example` for one image (serialise with .SerializeToString()).

  Keyword arguments are the `arg` names of `FEATURES` (encoded=, image_format=,
  height=, ...); those with a default may be left out.
  """
  import tensorflow as tf  # lazy: keep `import tfrecord_tools.records` cheap

  def feature(f: Feature, v):
    if f.kind == BYTES:
      return tf.train.Feature(bytes_list=tf.train.BytesList(value=[_as_bytes(v)]))
    if f.kind == INT64:
      return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(x) for x in v]))

  return tf.train.Example(features=tf.train.Features(feature={
      f.key: feature(f, v) for f, v in _values(features, values, "make_example")}))


def feature_spec(features: tuple[Feature, ...] = FEATURES) -> dict:
  """The parsing spec for `tf.io.parse_single_example` / `parse_example`.

  BYTES and INT64 features parse to scalars, FLOAT_LIST features to a 1-D
  float32 vector (empty when absent; padded with 0.0 in a batch).
  """
  import tensorflow as tf

  def spec(f: Feature):
    if f.kind == FLOAT_LIST:
      return tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True, default_value=0.0)
    dtype = tf.string if f.kind == BYTES else tf.int64
    return tf.io.FixedLenFeature([], dtype, default_value=_parse_default(f))

  return {f.key: spec(f) for f in features}


# --------------------------------------------------------------------------
# Without TensorFlow: the Example's protobuf bytes, by hand.
# --------------------------------------------------------------------------


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field."""
  return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def _feature_bytes(f: Feature, value: Any) -> bytes:
  """A serialised `tf.train.Feature` (its oneof field: 1 bytes_list, 2 float_list, 3 int64_list)."""
  if f.kind == BYTES:
    return _field(1, _field(1, _as_bytes(value)))            # BytesList.value
  if f.kind == INT64:
    if int(value) < 0:
      raise ValueError(f"{f.key}: negative int64 features are not used by this format")
    return _field(3, _field(1, _varint(int(value))))         # packed Int64List.value
  floats = b"".join(struct.pack("<f", float(x)) for x in value)
  return _field(2, _field(1, floats) if floats else b"")     # packed FloatList.value


def serialize_example(*, features: tuple[Feature, ...] = FEATURES, **values) -> bytes:
  """The bytes of `make_example(...).SerializeToString(deterministic=True)`.

  Written by hand so worker processes need no TensorFlow; the map entries go
  in sorted key order, as deterministic serialisation writes them, so the
  same image gives the same bytes.
  """
  entries = b"".join(_field(1, _field(1, f.key.encode()) + _field(2, _feature_bytes(f, v)))
                     for f, v in sorted(_values(features, values, "serialize_example"),
                                        key=lambda fv: fv[0].key))
  return _field(1, entries)                     # Example.features -> Features.feature map


# --------------------------------------------------------------------------
# TFRecord framing.
# --------------------------------------------------------------------------


class RecordFileError(errors.UserError):
  """A TFRecord file that is truncated or fails its checksums."""


def _masked_crc(data: bytes) -> int:
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(record: bytes) -> bytes:
  """One TFRecord: uint64 length, masked crc32c(length), data, masked crc32c(data)."""
  length = struct.pack("<Q", len(record))
  return (length + struct.pack("<I", _masked_crc(length)) + record
          + struct.pack("<I", _masked_crc(record)))


def iter_offsets(f) -> Iterator[tuple[int, int]]:
  """(data offset, data length) of each record in an open binary TFRecord file.

  Checks each length's checksum, not the data's (the data is not read).
  """
  pos = 0
  while True:
    header = f.read(12)
    if not header:
      return
    if len(header) < 12:
      raise RecordFileError(f"truncated TFRecord file (record header at byte {pos})")
    (length,) = struct.unpack("<Q", header[:8])
    if struct.unpack("<I", header[8:])[0] != _masked_crc(header[:8]):
      raise RecordFileError(f"corrupt TFRecord file (bad length checksum at byte {pos})")
    yield pos + 12, length
    pos += 12 + length + 4
    f.seek(pos)


def read_records(path: str) -> Iterable[bytes]:
  """Every record's data in a (local or gs://) TFRecord file, both checksums checked.

  Raises RecordFileError ("PATH: truncated/corrupt TFRecord file (...)").
  """
  with storage.open(path, "rb") as f:
    try:
      for offset, length in iter_offsets(f):   # header and its CRC checked there
        data = f.read(length)
        footer = f.read(4)
        if len(data) < length or len(footer) < 4:
          raise RecordFileError(f"truncated TFRecord file (record data at byte {offset})")
        if struct.unpack("<I", footer)[0] != _masked_crc(data):
          raise RecordFileError(f"corrupt TFRecord file (bad data checksum at byte {offset})")
        yield data
    except RecordFileError as e:
      raise RecordFileError(f"{path}: {e}") from None


def first_corrupt(paths: Iterable[str]) -> tuple[str, str] | None:
  """(path, reason) of the first TFRecord file that is missing, truncated or fails a checksum;
  None when all are sound. Reads every byte: call it once something already went wrong."""
  for path in paths:
    try:
      for _ in read_records(path):
        pass
    except RecordFileError as e:
      return path, str(e).split(": ", 1)[-1]
    except FileNotFoundError:
      return path, "missing (listed in the manifest)"
  return None
