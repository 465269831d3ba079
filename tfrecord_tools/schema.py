"""The one definition of the record format and of the manifest file.

A shard holds one `tf.train.Example` per image. Feature names follow
TensorFlow's own image tools so other readers understand the files:

  image/encoded       bytes   PNG or JPEG, exactly as written by the converter
  image/format        bytes   b"png" or b"jpeg"
  image/height        int64   pixels of the encoded image
  image/width         int64
  image/channels      int64   1 (grayscale) or 3 (RGB)
  image/bit_depth     int64   8, or 16 (16-bit grayscale PNG)
  image/class/label   int64   index into the manifest's `classes`
  image/class/text    bytes   class name (utf-8)
  image/filename      bytes   path relative to the input root (utf-8, '/' separated)
  image/patient_id    bytes   first group of --group_regex, or b"" when not grouped
  image/sha256        bytes   hex sha256 of the *source* file, for dedup and audit

Shards are named `<split>-%05d-of-%05d.tfrecord` and listed, with their record
counts, in `dataset.json` (see `MANIFEST_NAME` and the manifest helpers below).
This module imports TensorFlow lazily so the converter's workers and the
manifest readers stay light.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tfrecord_tools import errors, storage

MANIFEST_NAME = "dataset.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "val", "test")

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


def shard_name(split: str, index: int, num_shards: int) -> str:
  """`train-00003-of-00016.tfrecord`."""
  return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def make_example(*, encoded: bytes, image_format: str, height: int, width: int,
                 channels: int, bit_depth: int, label: int, text: str,
                 filename: str, patient_id: str = "", sha256: str = ""):
  """Builds the `tf.train.Example` for one image (serialise with .SerializeToString())."""
  import tensorflow as tf  # lazy: keep `import tfrecord_tools.schema` cheap

  def _b(v: bytes):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

  def _i(v: int):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))

  return tf.train.Example(features=tf.train.Features(feature={
      ENCODED: _b(encoded),
      FORMAT: _b(image_format.encode()),
      HEIGHT: _i(height),
      WIDTH: _i(width),
      CHANNELS: _i(channels),
      BIT_DEPTH: _i(bit_depth),
      LABEL: _i(label),
      TEXT: _b(text.encode("utf-8")),
      FILENAME: _b(filename.encode("utf-8")),
      PATIENT_ID: _b(patient_id.encode("utf-8")),
      SHA256: _b(sha256.encode()),
  }))


def feature_spec() -> dict:
  """The parsing spec for `tf.io.parse_single_example` / `parse_example`."""
  import tensorflow as tf
  s = tf.io.FixedLenFeature([], tf.string, default_value="")
  i = tf.io.FixedLenFeature([], tf.int64, default_value=0)
  return {ENCODED: s, FORMAT: s, HEIGHT: i, WIDTH: i, CHANNELS: i,
          BIT_DEPTH: i, LABEL: i, TEXT: s, FILENAME: s, PATIENT_ID: s,
          SHA256: s}


# --------------------------------------------------------------------------
# The manifest, dataset.json: the contract between conversion and training.
#
# {
#   "manifest_version": 1,
#   "name": "chest_xray",                  # dataset name (output folder name by default)
#   "tool": "tfrecord_tools.convert", "tool_version": "0.1.0",
#   "created": "2026-11-23T18:00:00Z",
#   "args": {...},                         # the converter's resolved arguments
#   "classes": ["NORMAL", "PNEUMONIA"],    # label order; identical for every split
#   "num_found": 1234,                     # image-like files found under the input
#   "num_converted": 1200, "num_skipped": 4, "num_dropped": 30,  # converted+skipped+dropped == found
#   "skipped": [{"path": "train/NORMAL/x.jpeg", "reason": "truncated image"}],
#   "dropped": {"COVID-19": 30},           # source classes not named by --class_map
#   "splits": {
#     "train": {
#       "num_examples": 900,
#       "class_counts": {"NORMAL": 300, "PNEUMONIA": 600},   # every class present, 0 allowed
#       "num_groups": 310,                 # patients, when --group_regex was given, else null
#       "shards": [{"file": "train-00000-of-00002.tfrecord", "num_examples": 450}, ...]
#     },
#     "val": {...}, "test": {...}           # a split may be absent
#   },
#   "image_stats": {"height": {"min":..,"max":..,"mean":..}, "width": {...},
#                   "channels": {"1": 1190, "3": 10}, "bit_depth": {"8": 1200},
#                   "format": {"png": 1200}}
# }
# --------------------------------------------------------------------------


class ManifestError(errors.UserError):
  """dataset.json is missing or does not describe the requested data."""


def manifest_path(data_dir: str) -> str:
  return os.path.join(data_dir, MANIFEST_NAME)


def read_manifest(data_dir: str) -> dict[str, Any]:
  """Reads `data_dir/dataset.json` (local or gs://) and checks its shape."""
  path = manifest_path(data_dir)
  text = _read_text(path)
  try:
    m = json.loads(text)
  except json.JSONDecodeError as e:
    raise ManifestError(f"{path} is not valid JSON: {e}") from e
  for key in ("classes", "splits"):
    if key not in m:
      raise ManifestError(f"{path} has no '{key}': not written by tfrecord_tools.convert?")
  return m


def split_info(manifest: dict, split: str) -> dict:
  """The manifest's entry for one split, with a clear error when absent."""
  if split not in manifest["splits"]:
    have = ", ".join(sorted(manifest["splits"])) or "none"
    raise ManifestError(f"split '{split}' is not in the data set (splits: {have})")
  return manifest["splits"][split]


def shard_paths(data_dir: str, manifest: dict, split: str) -> list[str]:
  return [os.path.join(data_dir, s["file"]) for s in split_info(manifest, split)["shards"]]


def _read_text(path: str) -> str:
  try:
    return storage.read_text(path)
  except FileNotFoundError:
    raise ManifestError(f"no manifest at {path}: convert the images first "
                        "(python -m tfrecord_tools.convert)") from None
  except storage.StorageError as e:
    raise ManifestError(str(e)) from None


