"""TFDS metadata beside a converted data set, so TensorFlow Datasets reads it as is.

After a conversion, `write(output_dir, manifest)` adds what
`tfds.builder_from_directory` needs (dataset_info.json, features.json and the
class names' *.labels.txt) next to dataset.json and the shards:

  import tensorflow_datasets as tfds
  builder = tfds.builder_from_directory("data/tfrecords")
  ds = builder.as_dataset(split="train")           # or as_supervised=True (single-label)
  tfds.show_examples(ds, builder.info)             # images with their class names

The shards are not touched or copied: `tfds.folder_dataset.write_metadata` is
given their own names (filename template "{SPLIT}-{SHARD_X_OF_Y}.tfrecord")
and lengths (from the manifest). The split names stay the converter's
(train, val, test).

The TFDS features are derived from the one record table (tfrecord_tools.records),
and each TFDS feature key IS the Example key (records.ENCODED, ...): a flat
FeaturesDict whose keys hold "/" parses exactly those keys, and
`tfds.show_examples` finds a top-level Image and ClassLabel. So:

  ENCODED             Image: uint16 when any record is a 16-bit PNG (8-bit images are
                      then scaled by 257, TensorFlow's convert_image_dtype), else uint8;
                      3 channels when any record is RGB, else 1
  LABEL               ClassLabel(names=classes) for single-label sets (multi-label: left out,
                      it is always 0 there)
  MULTI_HOT, MASK
                      Tensor(shape=(K,), float32) for multi-label sets (left out otherwise:
                      single-label records do not hold them)
  other BYTES / INT64 rows
                      Text / Scalar(int64)

TFDS writes into a local temporary folder holding empty stand-ins named like
the shards; the files it wrote are then copied into the output with
tfrecord_tools.storage (local or gs://). TensorFlow and tensorflow_datasets
are imported here only, when `write` runs, in the converter's main process
(its workers never import this module).
"""

from __future__ import annotations

import os
import re
import tempfile
import threading

from tfrecord_tools import records, storage

TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}.tfrecord"   # the converter's shard names, in TFDS's terms
# What tfds.folder_dataset.write_metadata writes: the DatasetInfo, the features, and one
# <feature key with "/" as ".">.labels.txt per ClassLabel.
_FILES_RE = re.compile(r"^(dataset_info\.json|features\.json|[\w.]+\.labels\.txt)$")


def is_metadata_file(name: str) -> bool:
  """True for a file name TFDS's metadata uses (not the converter's own files)."""
  return bool(_FILES_RE.match(name))


def remove(output_dir: str) -> None:
  """Removes earlier TFDS metadata from `output_dir` (it would describe other shards)."""
  if not storage.exists(output_dir):
    return
  for name in storage.listdir(output_dir):
    if is_metadata_file(name):
      storage.remove(storage.join(output_dir, name))


_PRELOAD: list[threading.Thread] = []


def preload() -> None:
  """Starts importing tensorflow_datasets on a daemon thread (once): the converter calls it
  when its workers start, so `write` at the end finds the module loaded. Python's per-module
  import locks make the concurrent import safe; `write` waits for the thread first."""
  if _PRELOAD:
    return

  def load():
    try:
      import tensorflow_datasets  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001 - `write` imports again and reports the failure
      pass
  thread = threading.Thread(target=load, name="tfds-preload", daemon=True)
  _PRELOAD.append(thread)
  thread.start()


def _wait_preload() -> None:
  for thread in _PRELOAD:
    thread.join()


def dataset_name(manifest: dict) -> str:
  """The manifest's name as a TFDS data set name (a letter, then letters, digits, _)."""
  name = re.sub(r"\W+", "_", str(manifest.get("name") or "dataset")).strip("_").lower()
  return name if name[:1].isalpha() else f"xraytpu_{name}"


def features(manifest: dict):
  """The `tfds.features.FeaturesDict` of this data set's records (see the module docstring)."""
  import numpy as np
  import tensorflow_datasets as tfds

  stats = manifest.get("image_stats") or {}
  formats = set(stats.get("format") or {"png": 1})
  dtype = np.uint16 if "16" in (stats.get("bit_depth") or {}) else np.uint8
  channels = 3 if "3" in (stats.get("channels") or {}) else 1
  encoding = (None if len(formats) != 1 or (dtype == np.uint16 and formats != {"png"})
              else next(iter(formats)))
  multi_label = manifest.get("task") == "multi_label"
  k = len(manifest["classes"])
  out = {}
  for f in records.FEATURES:
    if f.key == records.ENCODED:
      out[f.key] = tfds.features.Image(shape=(None, None, channels), dtype=dtype,
                                       encoding_format=encoding)
    elif f.key == records.LABEL:
      if not multi_label:
        out[f.key] = tfds.features.ClassLabel(names=list(manifest["classes"]))
    elif f.kind == records.FLOAT_LIST:
      if multi_label:
        out[f.key] = tfds.features.Tensor(shape=(k,), dtype=np.float32)
    elif f.kind == records.BYTES:
      out[f.key] = tfds.features.Text()
    else:
      out[f.key] = tfds.features.Scalar(dtype=np.int64)
  return tfds.features.FeaturesDict(out)


def write(output_dir: str, manifest: dict) -> list[str]:
  """Writes TFDS's metadata for the converted data set in `output_dir`; returns the file names.

  Raises whatever TensorFlow / tensorflow_datasets raise (ImportError when not
  installed): the converter turns that into a one-line warning.
  """
  _wait_preload()
  import tensorflow_datasets as tfds

  remove(output_dir)
  with tempfile.TemporaryDirectory(prefix="xraytpu-tfds-") as tmp:
    shard_names = set()
    for info in manifest["splits"].values():
      for s in info["shards"]:
        shard_names.add(s["file"])
        open(os.path.join(tmp, s["file"]), "wb").close()   # a stand-in: TFDS lists the names
    template = tfds.core.ShardedFileTemplate(
        data_dir=tmp, template=TEMPLATE, dataset_name=dataset_name(manifest),
        filetype_suffix="tfrecord")
    split_infos = [
        tfds.core.SplitInfo(name=split, shard_lengths=[s["num_examples"] for s in info["shards"]],
                            num_bytes=0, filename_template=template)
        for split, info in manifest["splits"].items()]
    multi_label = manifest.get("task") == "multi_label"
    tfds.folder_dataset.write_metadata(
        data_dir=tmp, features=features(manifest), split_infos=split_infos,
        filename_template=template, check_data=False,
        description=(f"Converted by tfrecord_tools.convert from {manifest['args'].get('input_dir', '?')}"
                     f" ({'multi-label' if multi_label else 'single-label'}: "
                     f"{', '.join(manifest['classes'])}); dataset.json holds the full manifest."),
        supervised_keys=None if multi_label else (records.ENCODED, records.LABEL))
    written = sorted(n for n in os.listdir(tmp) if n not in shard_names)
    for name in written:
      with open(os.path.join(tmp, name), "rb") as f:
        storage.write_bytes(storage.join(output_dir, name), f.read())
  return written
