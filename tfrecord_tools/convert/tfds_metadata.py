"""TFDS metadata beside a converted data set, so TensorFlow Datasets reads it as is.

After a conversion, `write(output_dir, manifest)` adds what
`tfds.builder_from_directory` needs (dataset_info.json, features.json and the
class names' *.labels.txt) next to dataset.json and the shards:

  import tensorflow_datasets as tfds
  builder = tfds.builder_from_directory("data/tfrecords")
  ds = builder.as_dataset(split="train")           # or as_supervised=True (single-label)
  tfds.show_examples(ds, builder.info)             # images with their class names

The shards are not touched or copied: the DatasetInfo names them by their own
file names (filename template "{SPLIT}-{SHARD_X_OF_Y}.tfrecord") and lengths
(from the manifest). The split names stay the converter's
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

The three kinds of file are written here as JSON, without importing
tensorflow_datasets. TFDS's own writer (`tfds.folder_dataset.write_metadata`)
was used until issue 21 and measured: importing tensorflow_datasets costs
0.35 s of CPU on every conversion (20% of converting 87 full-resolution films
on 2 cores), for two small JSON files. What TFDS reads is its DatasetInfo and
FeaturesDict protos in proto-JSON form (camelCase keys, int64 as strings);
tests/test_tfds.py writes the same data set's metadata with TFDS's writer and
asserts the files are equal, so a TFDS release that changes them fails CI
rather than a user's `builder_from_directory`.
"""

from __future__ import annotations

import json
import re

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


def dataset_name(manifest: dict) -> str:
  """The manifest's name as a TFDS data set name (a letter, then letters, digits, _)."""
  name = re.sub(r"\W+", "_", str(manifest.get("name") or "dataset")).strip("_").lower()
  return name if name[:1].isalpha() else f"xraytpu_{name}"


# TFDS's feature classes, by the module path it records for each in features.json.
_TFDS = "tensorflow_datasets.core.features."
_INT64 = {"dtype": "int64", "encoding": "none", "shape": {}}


def _dims(*dims: int) -> dict:
  return {"dimensions": [str(d) for d in dims]}


def features(manifest: dict) -> dict:
  """features.json: TFDS's FeaturesDict of this data set's records (see the module docstring)."""
  stats = manifest.get("image_stats") or {}
  formats = set(stats.get("format") or {"png": 1})
  dtype = "uint16" if "16" in (stats.get("bit_depth") or {}) else "uint8"
  channels = 3 if "3" in (stats.get("channels") or {}) else 1
  encoding = (None if len(formats) != 1 or (dtype == "uint16" and formats != {"png"})
              else next(iter(formats)))
  multi_label = manifest.get("task") == "multi_label"
  k = len(manifest["classes"])
  out = {}
  for f in records.FEATURES:
    if f.omit_empty:
      # Written only when known (a patient's sex, age, view): TFDS's parser requires every
      # feature it is told of, so these stay out of its view (xraytpu reads them itself).
      continue
    if f.key == records.ENCODED:
      image = {"dtype": dtype, "shape": _dims(-1, -1, channels)}
      if encoding:
        image["encodingFormat"] = encoding
      out[f.key] = {"image": image, "pythonClassName": _TFDS + "image_feature.Image"}
    elif f.key == records.LABEL:
      if not multi_label:
        out[f.key] = {"classLabel": {"numClasses": str(k)},
                      "pythonClassName": _TFDS + "class_label_feature.ClassLabel"}
    elif f.kind == records.FLOAT_LIST:
      if multi_label:
        out[f.key] = {"pythonClassName": _TFDS + "tensor_feature.Tensor",
                      "tensor": {"dtype": "float32", "encoding": "none", "shape": _dims(k)}}
    elif f.kind == records.BYTES:
      out[f.key] = {"pythonClassName": _TFDS + "text_feature.Text", "text": {}}
    else:
      out[f.key] = {"pythonClassName": _TFDS + "scalar.Scalar", "tensor": dict(_INT64)}
  return {"featuresDict": {"features": dict(sorted(out.items()))},
          "pythonClassName": _TFDS + "features_dict.FeaturesDict"}


def dataset_info(manifest: dict) -> dict:
  """dataset_info.json: TFDS's DatasetInfo of the converted splits and shards."""
  multi_label = manifest.get("task") == "multi_label"
  info = {
      "description": (f"Converted by tfrecord_tools.convert from "
                      f"{manifest['args'].get('input_dir', '?')} "
                      f"({'multi-label' if multi_label else 'single-label'}: "
                      f"{', '.join(manifest['classes'])}); dataset.json holds the full manifest."),
      "fileFormat": "tfrecord",
      "name": dataset_name(manifest),
      "splits": [{"filepathTemplate": TEMPLATE, "name": split,
                  "shardLengths": [str(s["num_examples"]) for s in info["shards"]]}
                 for split, info in manifest["splits"].items()],
  }
  if not multi_label:
    info["supervisedKeys"] = {"tuple": {"items": [{"featureKey": records.ENCODED},
                                                  {"featureKey": records.LABEL}]}}
  info["version"] = "1.0.0"
  return info


def files(manifest: dict) -> dict[str, bytes]:
  """File name -> contents of TFDS's metadata for this data set."""
  out = {"dataset_info.json": json.dumps(dataset_info(manifest), indent=2).encode(),
         "features.json": json.dumps(features(manifest), indent=2).encode()}
  if manifest.get("task") != "multi_label":   # one ClassLabel: its names, one per line
    out[records.LABEL.replace("/", ".") + ".labels.txt"] = "".join(
        f"{c}\n" for c in manifest["classes"]).encode()
  return out


def write(output_dir: str, manifest: dict) -> list[str]:
  """Writes TFDS's metadata for the converted data set in `output_dir`; returns the file names.

  Raises what tfrecord_tools.storage raises on a failed write: the converter
  turns that into a one-line warning.
  """
  remove(output_dir)
  written = files(manifest)
  for name, data in written.items():
    storage.write_bytes(storage.join(output_dir, name), data)
  return sorted(written)
