"""What a conversion is asked to do: `ConvertOptions` (the flags of `python -m
tfrecord_tools.convert`, with their defaults and help), their checks
(`check_options`), `ConvertError` (the converter's one user-facing error), and
the names every stage shares: the split folder aliases, the "auto" val/test
fraction, the log line on stderr.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import ClassVar

from tfrecord_tools import cli, dicom, errors, pixels, pseudonym, storage
from tfrecord_tools import labels as labels_lib


SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
INPUT_FORMATS = ("folders", "keras_pair")
GROUP_NONE = "none"      # --group_by=none: no patients, every image its own group
GROUP_BY = ("", "dicom_patient_id", GROUP_NONE)


class ConvertError(errors.UserError):
  """A user mistake or an unusable input: one clear line, no traceback."""


AUTO_FRACTION = -1.0      # val/test fraction "auto": DEFAULT_FRACTION unless the input has the folder
DEFAULT_FRACTION = 0.15


@dataclasses.dataclass
class ConvertOptions:
  """Arguments of one conversion: the flags of `python -m tfrecord_tools.convert`, defaults and help."""
  FLAG_TOPIC: ClassVar[str] = "conversion"   # --help heading (tfrecord_tools.cli.help_text)
  input_dir: str = cli.field(help="Folder of images: input/<class>/* or input/<split>/<class>/*; for "
                             "keras_pair, the folder of the images.tfrec + paths.tfrec pair (or of "
                             "train/, test/ with one); with --labels_csv, the image root.")
  output_dir: str = cli.field(help="Where shards and dataset.json go (local path or gs://bucket/path).")
  input_format: str = cli.field("folders", "folders: image files, class per folder. keras_pair: the "
                                "Keras TPU pneumonia example's images.tfrec + paths.tfrec.", INPUT_FORMATS)
  val_fraction: float = cli.field(AUTO_FRACTION, "Fraction drawn into val (stratified, seeded) from "
                                  f"train. {AUTO_FRACTION:g} (auto): {DEFAULT_FRACTION} when the input "
                                  "has no val folder, else the folder is the split. 0: no val split "
                                  "(training then has no validation AUC).")
  test_fraction: float = cli.field(AUTO_FRACTION, f"Fraction drawn into test. {AUTO_FRACTION:g} (auto): "
                                   f"{DEFAULT_FRACTION} when the input has no test folder, else the "
                                   "folder is the split. 0: no test split.")
  seed: int = cli.field(0, "Seed of the split and of the shard order.")
  group_regex: str = cli.field("", "Regex whose first group is the patient id, searched in the file "
                               "name (in the relative path when it contains '/'); every file must "
                               "match; drawn splits then keep each patient in one split. Default: "
                               "the id the file names show, if they show one (synthetic.json's "
                               "group_regex, or names <id>_<n> / <id>-<n> with ids that repeat: "
                               "docs/guide.md#patients-and-splits); the log and dataset.json say "
                               "which.")
  group_by: str = cli.field("", "dicom_patient_id: the DICOM header's PatientID is the patient "
                            "(drawn splits keep each patient in one split; every file must be "
                            "DICOM with a PatientID). none: no patients, each image on its own "
                            "(not even the id the file names show). Default: --group_regex, "
                            "else the file names' id.")
  patient_key_file: str = cli.field("", "File (local or gs://) holding the secret key of the "
                                    "patient pseudonyms: every patient id is written as "
                                    "pt-<HMAC-SHA256(key, id)>, never in clear. Default: $"
                                    f"{pseudonym.ENV_KEY} (the key itself), else "
                                    "~/.config/xraytpu/patient.key, made on first use (0600). "
                                    "The same key gives the same pseudonyms and splits again; "
                                    "see docs/privacy.md.")
  hash_filenames: bool = cli.field(False, "Store each image's path as h-<keyed hash>.<ext> "
                                   "instead of its name (for file names that carry names, "
                                   "dates, accession numbers or UIDs). Without it, the "
                                   "patient's id in a path is replaced by its pseudonym.")
  class_map: str = cli.field("", "Merge/rename/drop classes: NEW=OLD[+OLD...],NAME,...; its order is "
                             "the label order; source classes not named are dropped (and counted). "
                             "Default order: sorted, a normal/negative class (Normal, Healthy, NonX "
                             "beside X, ...) first, so with two classes label 1, the positive class "
                             "of sensitivity and PPV, is the finding.")
  # Label CSVs (tfrecord_tools.labels): --input_dir is then the image root.
  labels_csv: str = cli.field("", "Label CSV(s): FILE, or SPLIT=FILE,... for the publisher's splits "
                              "(CheXpert: train=train.csv,val=valid.csv). The layout (NIH, "
                              "CheXpert/MIMIC, RSNA) is recognised from the header; --input_dir "
                              "is the image root the rows' paths or names are found under.")
  split_lists: str = cli.field("", "With --labels_csv: SPLIT=FILE,... lists of image names per "
                               "split (NIH: train=train_val_list.txt,test=test_list.txt); rows in "
                               "no list are skipped.")
  image_column: str = cli.field("", "With --labels_csv, any other layout: the column naming the "
                                "image (a path under --input_dir, or a file name found anywhere "
                                "under it).")
  labels_column: str = cli.field("", "With --image_column: the column holding the findings joined "
                                 "by --label_separator (multi-label).")
  label_separator: str = cli.field("|", "Separator of the findings in --labels_column; empty: the "
                                   "cell is one class name (a single-label task).")
  label_columns: str = cli.field("", "With --image_column: comma-separated columns, one per "
                                 "finding, holding 1, 0, -1 (uncertain) or blank.")
  patient_column: str = cli.field("", "With --labels_csv: the column holding the patient id "
                                  "(default: the layout's own, e.g. NIH Patient ID); drawn splits "
                                  "keep each patient in one split.")
  metadata_columns: str = cli.field("", "With --labels_csv: comma-separated columns kept in "
                                    "each record as attributes for subgroup results (e.g. "
                                    "Scanner,Site), besides the sex, age and view columns "
                                    "recognised from the header (NIH Patient Gender / Patient "
                                    "Age / View Position, CheXpert Sex / Age / Frontal/Lateral / "
                                    "AP/PA, MIMIC ViewPosition). Columns that look like "
                                    "identifiers or dates are refused (docs/privacy.md).")
  uncertain: str = cli.field("ignore", "With --labels_csv: uncertain (-1) labels are ignored "
                             "(masked out), zeros (negative) or ones (positive); Irvin et al. "
                             "2019.", ("ignore", "zeros", "ones"))
  blank: str = cli.field("negative", "With --labels_csv: a blank finding cell is negative, or "
                         "ignore (masked out).", ("negative", "ignore"))
  findings: str = cli.field("", "With --labels_csv: comma-separated findings to keep, in this "
                            "order (default: all the CSV has; NIH: sorted).")
  max_side: int = cli.field(0, "Shrink so the longer side is at most this many pixels (aspect kept); "
                            "0 keeps the size. The fast path for large X-rays.")
  image_format: str = cli.field("keep", "keep: JPEG stays JPEG, other formats become PNG.",
                                pixels.IMAGE_FORMATS)
  channels: str = cli.field("keep", "keep: grayscale stays 1 channel, color 3; or force 1 or 3.",
                            pixels.CHANNELS)
  jpeg_quality: int = cli.field(pixels.JPEG_QUALITY, "Quality of JPEGs the converter encodes.")
  dicom_window: str = cli.field(dicom.DEFAULT_WINDOW, dicom.WINDOW_HELP + " Recorded in the "
                                "manifest (and how each DICOM record was rendered in the record): "
                                "predict and serve render DICOM the same way.")
  max_pixels: int = cli.field(pixels.MAX_PIXELS, "Most pixels (width x height, x frames for "
                              "DICOM) per image, read from the file header before decoding; "
                              "larger files are skipped with the reason.")
  num_shards: int = cli.field(0, "Shards per split (at most one per image); 0: from the data size "
                              "(~150 MB per shard).")
  num_workers: int = cli.field(0, "Worker processes; 0: all cores (under 100 images a core: "
                                 "one process, its images on the cores as threads).")
  max_skipped_fraction: float = cli.field(0.05, "Fail (no manifest) when more than this fraction of "
                                          "the files found cannot be converted.")
  on_conflict: str = cli.field("error", "A file whose contents (sha256) appear under two classes: "
                               "error (list the pairs and stop) or skip (leave every copy out, "
                               "counted as skipped).", ("error", "skip"))
  overwrite: bool = cli.field(False, "Replace a complete earlier output.")
  name: str = cli.field("", "Data set name in the manifest (default: output folder).")
  quiet: bool = cli.field(False, "No progress line.")


def check_options(o: ConvertOptions) -> None:
  if o.input_format not in INPUT_FORMATS:
    raise ConvertError(f"--input_format must be one of {', '.join(INPUT_FORMATS)}")
  if str(o.channels) not in pixels.CHANNELS:
    raise ConvertError("--channels must be keep, 1 or 3")
  o.channels = str(o.channels)
  if o.image_format not in pixels.IMAGE_FORMATS:
    raise ConvertError("--image_format must be keep, png or jpeg")
  if o.max_side < 0:
    raise ConvertError("--max_side must be >= 0 (0 keeps the size)")
  if not 1 <= o.jpeg_quality <= 100:
    raise ConvertError("--jpeg_quality must be in 1..100")
  if o.max_pixels < 1:
    raise ConvertError(f"--max_pixels={o.max_pixels}: must be >= 1")
  try:
    dicom.parse_window(o.dicom_window)
  except ValueError as e:
    raise ConvertError(f"--dicom_window={e}") from None
  if o.group_by not in GROUP_BY:
    raise ConvertError(f"--group_by={o.group_by}: must be dicom_patient_id or {GROUP_NONE} (or empty)")
  if o.group_by == GROUP_NONE and o.group_regex:
    raise ConvertError("--group_by=none (no patients) and --group_regex (patients by file name) "
                       "contradict each other: give one")
  if o.group_by and o.group_regex:
    raise ConvertError("--group_by and --group_regex both name the patient: give one")
  for name in ("val_fraction", "test_fraction"):
    if getattr(o, name) != AUTO_FRACTION and not 0.0 <= getattr(o, name) < 1.0:
      raise ConvertError(f"--{name} must be in [0, 1)")
  if sum(DEFAULT_FRACTION if f == AUTO_FRACTION else f for f in (o.val_fraction, o.test_fraction)) >= 1.0:
    raise ConvertError("--val_fraction + --test_fraction must be < 1 (train needs data)")
  if not 0.0 <= o.max_skipped_fraction <= 1.0:
    raise ConvertError("--max_skipped_fraction must be in [0, 1]")
  if o.num_shards < 0 or o.num_workers < 0:
    raise ConvertError("--num_shards and --num_workers must be >= 0")
  if not o.output_dir:
    raise ConvertError("--output_dir is required")
  _check_label_options(o)
  if not storage.is_remote(o.input_dir) and not storage.is_remote(o.output_dir):
    inp, out = os.path.realpath(o.input_dir), os.path.realpath(o.output_dir)
    if out == inp or out.startswith(inp.rstrip(os.sep) + os.sep):
      raise ConvertError(f"--output_dir {o.output_dir} is inside --input_dir {o.input_dir}: "
                         "choose a folder outside the images")


def _check_label_options(o: ConvertOptions) -> None:
  """The --labels_csv options: only with a label CSV, and not with folder-only ones."""
  if o.uncertain not in labels_lib.UNCERTAIN_POLICIES:
    raise ConvertError(f"--uncertain must be one of {', '.join(labels_lib.UNCERTAIN_POLICIES)}")
  if o.blank not in labels_lib.BLANK_POLICIES:
    raise ConvertError(f"--blank must be one of {', '.join(labels_lib.BLANK_POLICIES)}")
  if not o.labels_csv:
    given = [n for n in ("split_lists", "image_column", "labels_column", "label_columns",
                         "patient_column", "findings", "metadata_columns") if getattr(o, n)]
    if given:
      raise ConvertError(f"--{given[0]} needs --labels_csv")
    return
  if o.input_format != "folders":
    raise ConvertError("--labels_csv reads image files: drop --input_format")
  if o.group_by not in ("", GROUP_NONE):
    raise ConvertError(f"--group_by={o.group_by} reads folders of images; with --labels_csv the "
                       "patient is the CSV's patient column (--patient_column)")
  if o.class_map:
    raise ConvertError("--class_map maps class folders; with --labels_csv choose the findings "
                       "with --findings")


def log(msg: str) -> None:
  """The converter's default log: one line on stderr."""
  print(msg, file=sys.stderr, flush=True)
