"""The manifest file, and the record format's names for the rest of the code.

The record format (a `tf.train.Example` per image: its features, their types,
defaults and meanings, and the TFRecord framing) is defined once, in
`tfrecord_tools.records`; its feature-key constants, `make_example` and
`feature_spec` are importable from here too.

Shards are named `<split>-%05d-of-%05d.tfrecord` and listed, with their record
counts, in `dataset.json` (see `MANIFEST_NAME` and the manifest helpers below).
Importing this module does not import TensorFlow, so the converter's workers
and the manifest readers stay light.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from tfrecord_tools import errors, storage

MANIFEST_NAME = "dataset.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "val", "test")
# The manifest's "task": absent or SINGLE_LABEL (one class per image, `classes` in label
# order) or MULTI_LABEL (CSV-labelled findings: `classes` are the K findings; records
# carry multi_hot + mask).
SINGLE_LABEL = "single_label"
MULTI_LABEL = "multi_label"
# The text of a multi-label image with no finding (its record's class text, its predicted label).
NO_FINDING = "No Finding"


def shard_name(split: str, index: int, num_shards: int) -> str:
  """`train-00003-of-00016.tfrecord`."""
  return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


# --------------------------------------------------------------------------
# The manifest, dataset.json: the contract between conversion and training.
#
# {
#   "manifest_version": 1,
#   "name": "chest_xray",                  # dataset name (output folder name by default)
#   "tool": "tfrecord_tools.convert", "tool_version": "0.1.0",
#   "created": "2026-11-23T18:00:00Z",
#   "args": {...},                         # the converter's resolved arguments (not the key file)
#   "privacy": {"patient_ids": "hmac-sha256" | "none",   # how identifiers are written
#               "key_id": "3f09c2a1d4e5b6a7" | null,     # which key (tfrecord_tools.pseudonym)
#               "filenames": "patient-ids-replaced" | "hashed", "pseudonym_format": "pt-<24 hex>"},
#                                          # absent: converted before pseudonyms (inspect warns)
#   "classes": ["NORMAL", "PNEUMONIA"],    # label order; identical for every split
#   "num_found": 1234,                     # image-like files found under the input
#   "num_converted": 1200, "num_skipped": 4, "num_dropped": 30,  # converted+skipped+dropped == found
#   "skipped": [{"path": "train/NORMAL/x.jpeg", "reason": "truncated image"}],   # paths as written:
#                                          # a patient's id replaced by its pseudonym (or hashed)
#   "dropped": {"COVID-19": 30},           # source classes not named by --class_map
#   "splits": {
#     "train": {
#       "num_examples": 900,
#       "class_counts": {"NORMAL": 300, "PNEUMONIA": 600},   # every class present, 0 allowed
#       "num_groups": 310,                 # patients, when they are grouped, else null
#                                          # (how: args.patient_grouping, docs/guide.md#patients-and-splits)
#       "shards": [{"file": "train-00000-of-00002.tfrecord", "num_examples": 450}, ...]
#     },
#     "val": {...}, "test": {...}           # a split may be absent
#   },
#   "image_stats": {"height": {"min":..,"max":..,"mean":..}, "width": {...},
#                   "channels": {"1": 1190, "3": 10}, "bit_depth": {"8": 1200},
#                   "format": {"png": 1200}}
# }
#
# Converted from label CSVs (--labels_csv; tfrecord_tools.labels), also:
#   "layout": "labels_csv",
#   "task": "multi_label",                 # absent = "single_label" (folders; RSNA's Target)
#   "classes": ["Atelectasis", ...],       # multi-label: the K findings, the order of the
#                                          # records' multi_hot / mask
#   "num_found": 1234,                     # the distinct images the label rows name
#                                          # (converted + skipped == found, as for folders)
#   "skipped": [..., {"path": "00000013_005.png", "reason": "missing file (Data_Entry_2017.csv
#                     line 14)"}, {"path": ..., "reason": "not in any --split_lists file (...)"}],
#   "num_unlabelled": 3, "unlabelled_examples": ["extra/x.png"],  # image files no row names
#   "num_ignored": 2,                      # other files under the root (the CSVs, lists, ...)
#   "splits": {"train": {..., "class_counts": {finding: positives},   # multi_hot 1
#                        "num_groups": 310,                           # patients (from the CSV)
#                        "finding_counts": {finding: {"positive": n, "negative": n,
#                                                     "uncertain": n, "ignored": n}}}},
#       # per record: positive + negative + ignored == num_examples (ignored = mask 0:
#       # uncertain under --uncertain=ignore, blank under --blank=ignore); uncertain = the
#       # CSV said -1, whatever --uncertain made of it (so it overlaps the other three)
#   "labels": {"layout": "nih" | "chexpert" | "rsna" | "columns", "csv": ["Data_Entry_2017.csv"],
#              "split_lists": [...], "columns": {"image": ..., "labels"/"findings": ...,
#              "patient": ...}, "uncertain": "ignore", "blank": "negative", "num_rows": n,
#              "merged_rows": n (RSNA box rows), "skipped_reasons": {"missing file": n, ...},
#              "unlisted_findings": {name: rows}}   # findings left out by --findings
#   "metadata": {"columns": {"sex": "Patient Gender", "age": "Patient Age", "view": "View Position",
#                            "columns": ["Scanner"]},   # attribute -> the label CSV's column(s)
#                "known": {"sex": n, "age": n, "view": n, "columns": n},  # converted images with a value
#                "age": "whole years; 90 = 90 or older; above 120 unknown"}
#       # only when the records carry label CSV attributes (image/meta/*, tfrecord_tools.metadata;
#       # DICOM headers' PatientSex/PatientAge/ViewPosition: image_stats.dicom_attributes); what
#       # evaluate's subgroups read (xraytpu.evaluation.subgroups). Optional: older manifests
#       # and records without it read as before (no subgroups).
# --------------------------------------------------------------------------


class ManifestError(errors.UserError):
  """dataset.json is missing or does not describe the requested data."""


def data_fingerprint(manifest: dict) -> dict:
  """What identifies a converted data set, wherever it is stored (a gs:// copy has the same):
  {"digest": sha256 of the task, classes and every split's shards (name, count, content
  sha256), "classes": [...], "splits": {split: num_examples}}. Recorded in a run's config.json;
  a resume against data with another digest is refused."""
  content = {"task": manifest.get("task", SINGLE_LABEL), "classes": manifest["classes"],
             "splits": {name: [(s["file"], s.get("num_examples"), s.get("sha256"))
                               for s in info.get("shards", [])]
                        for name, info in sorted(manifest["splits"].items())}}
  if not any(s.get("sha256") for info in manifest["splits"].values() for s in info.get("shards", [])):
    # Written before shards had digests: the conversion's arguments stand in for the content.
    args = {k: v for k, v in (manifest.get("args") or {}).items()
            if k not in ("input_dir", "output_dir", "num_workers", "overwrite", "quiet")}
    content["args"] = args
  digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
  return {"digest": digest, "classes": list(manifest["classes"]),
          "splits": {name: info.get("num_examples") for name, info in sorted(manifest["splits"].items())}}


def fingerprint_differences(old: dict, new: dict) -> list[str]:
  """What differs between two data fingerprints, in words ([] when the same data)."""
  if old.get("digest") == new.get("digest"):
    return []
  out = []
  if old.get("classes") != new.get("classes"):
    out.append(f"classes {old.get('classes')} -> {new.get('classes')}")
  for split in sorted(set(old.get("splits", {})) | set(new.get("splits", {}))):
    a, b = old.get("splits", {}).get(split), new.get("splits", {}).get(split)
    if a != b:
      out.append(f"{split} examples {a} -> {b}")
  if not out:
    out.append("same classes and split sizes but other images or another split "
               f"(data digest {str(old.get('digest'))[:12]} -> {str(new.get('digest'))[:12]})")
  return out


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


