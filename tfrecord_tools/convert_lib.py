"""Image folders -> sharded, validated TFRecords + dataset.json (the library).

`convert(ConvertOptions(input_dir=..., output_dir=...))` does the whole job;
`python -m tfrecord_tools.convert` is its thin command line. The steps:

  1. find      walk the input (symlinks followed, hidden files skipped) and
               list image-like files as `Source`s, sorted by path (DICOM:
               .dcm, .dicom, and files without an extension that carry the
               DICM preamble). Layouts:
                 input/<split>/<class>/**/*   splits as given (train, val or
                                              validation, test)
                 input/<class>/**/*           splits drawn by --val_fraction /
                                              --test_fraction / --seed
               or, with input_format="keras_pair", the Keras TPU example's
               `images.tfrec` + `paths.tfrec` (in input/ or input/<split>/),
               whose path's parent folder is the class; or, with --labels_csv,
               the images the label CSV rows name under input/ (NIH,
               CheXpert/MIMIC, RSNA or set by hand: `tfrecord_tools.labels`;
               section 1b below), multi-label or single-label.
  2. classes   sorted source class names, or --class_map
               ("NORMAL=Normal,PNEUMONIA=Bacterial+Viral": its order is the
               label order; unnamed source classes are dropped and counted).
               Every split must have the same classes.
  3. split     stratified by class, seeded by hashing (seed, name), and by
               patient when --group_regex or --group_by=dicom_patient_id (the
               DICOM header's PatientID) is given: a patient's images all go
               to one split.
  4. shard     each split's files are shuffled (seeded hash order) and cut
               into `split-%05d-of-%05d.tfrecord` shards.
  5. write     one task per shard (`shards.write_shard`), run by a crash-
               tolerant pool of worker processes (`pool.run`): read,
               `pixels.prepare_image` (decode = validate, normalise, resize),
               serialise a `tf.train.Example` (`records`), write. Bad files
               are skipped with a reason. A shard is written to
               `<name>.tmp-N` and renamed when complete, with its statistics
               saved beside it in `.convert-state/`, so a killed run started
               again reuses the finished shards and redoes the rest. Only
               this step is pluggable (`run_tasks`; beam_convert runs it
               with Beam, through the same `shards` writer).
  6. manifest  dataset.json (format in `schema.py`) is written last, atomically:
               its presence marks a complete output.

Same input + same arguments -> byte-identical shards (the Example is
serialised with sorted feature keys; encoders are deterministic; no times or
process ids go into shards). Workers need no TensorFlow for local output:
`records` serialises the Example and frames the TFRecords by hand.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, ClassVar, Iterable, Sequence

from tfrecord_tools import __version__, cli, dicom, errors, locks, pixels, pool, records, schema, shards, storage
from tfrecord_tools import labels as labels_lib
from tfrecord_tools import tfds_metadata
from tfrecord_tools.shards import STATE_DIR, Item, ShardTask, Source

IMAGE_EXTENSIONS = frozenset({
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".tif", ".tiff",
    ".webp", ".pgm", ".ppm", ".pnm", ".dcm", ".dicom"})
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
TARGET_SHARD_BYTES = 150 * 2**20    # ~100-200 MB per shard at scale
MIN_EXAMPLES_PER_SHARD = 256        # small sets: no more shards than this implies
MAX_MIN_SHARDS = 8                  # ... but up to 8 shards so hosts can read in parallel
INPUT_FORMATS = ("folders", "keras_pair")
GROUP_BY = ("", "dicom_patient_id")
KERAS_PAIR = ("images.tfrec", "paths.tfrec")


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
                               "name (in the relative path when it contains '/'); drawn splits then "
                               "keep each patient in one split.")
  group_by: str = cli.field("", "dicom_patient_id: the DICOM header's PatientID is the patient "
                            "(drawn splits keep each patient in one split; every file must be "
                            "DICOM with a PatientID). Default: --group_regex, if given.")
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
                                "manifest: predict and serve render DICOM the same way.")
  num_shards: int = cli.field(0, "Shards per split (at most one per image); 0: from the data size "
                              "(~150 MB per shard).")
  num_workers: int = cli.field(0, "Worker processes; 0: all cores.")
  max_skipped_fraction: float = cli.field(0.05, "Fail (no manifest) when more than this fraction of "
                                          "the files found cannot be converted.")
  on_conflict: str = cli.field("error", "A file whose contents (sha256) appear under two classes: "
                               "error (list the pairs and stop) or skip (leave every copy out, "
                               "counted as skipped).", ("error", "skip"))
  overwrite: bool = cli.field(False, "Replace a complete earlier output.")
  name: str = cli.field("", "Data set name in the manifest (default: output folder).")
  quiet: bool = cli.field(False, "No progress line.")


@dataclasses.dataclass
class Found:
  root: str                        # the input folder
  sources: list[Source]
  layout: str                      # "splits" or "classes"
  splits: list[str]                # canonical split names found ("" for the classes layout)
  ignored: list[str]               # files that are not image-like, relative paths
  # Set by `dedupe`: files skipped before conversion (content conflicts), with reasons;
  # paths that reach a file already listed (converted once); same-class identical contents.
  skipped: list[dict] = dataclasses.field(default_factory=list)
  aliases: list[dict] = dataclasses.field(default_factory=list)
  duplicates: list[list[str]] = dataclasses.field(default_factory=list)


# Files (local, gs:// through google-cloud-storage, other schemes through
# tf.io.gfile) are read and written through tfrecord_tools.storage.


# --------------------------------------------------------------------------
# 1. Find.
# --------------------------------------------------------------------------


def _walk_files(root: str) -> Iterable[str]:
  """Paths (relative to root, '/'-separated) of all non-hidden files, sorted.

  Symbolic links are followed, but no directory is entered twice (real paths are
  compared), so a link to a parent folder cannot loop or repeat the tree.
  """
  out = []
  seen_dirs: set[str] = set()
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen_dirs:
      dirnames[:] = []
      continue
    seen_dirs.add(real)
    dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                         and os.path.realpath(os.path.join(dirpath, d)) not in seen_dirs)
    rel_dir = os.path.relpath(dirpath, root)
    for name in filenames:
      if name.startswith("."):
        continue
      out.append(name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/"))
  return sorted(out)


def _is_image_name(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _is_unnamed_dicom(root: str, rel: str) -> bool:
  """A file without an (image) extension that starts like DICOM (`IM0001`, UID names)."""
  if not dicom.worth_probing(rel):
    return False
  path = storage.join(root, rel) if storage.is_remote(root) else os.path.join(root, *rel.split("/"))
  try:
    return dicom.has_preamble(storage.read_bytes(path, 0, 132))
  except OSError:
    return False


def _top_level_dirs(root: str) -> list[str]:
  return sorted(d for d in os.listdir(root)
                if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))


def _split_layout(input_dir: str, dirs: Sequence[str]) -> bool:
  """True for input/<split>/<class>/..., False for input/<class>/...; errors on a mix."""
  split_dirs = [d for d in dirs if d.lower() in SPLIT_ALIASES]
  if not split_dirs:
    return False
  others = [d for d in dirs if d.lower() not in SPLIT_ALIASES]
  if others:
    raise ConvertError(
        f"{input_dir} mixes split folders ({', '.join(split_dirs)}) with other folders "
        f"({', '.join(others)}): use input/<split>/<class>/* or input/<class>/*")
  canon = [SPLIT_ALIASES[d.lower()] for d in split_dirs]
  dup = sorted({c for c in canon if canon.count(c) > 1})
  if dup:
    same = [d for d in split_dirs if SPLIT_ALIASES[d.lower()] == dup[0]]
    raise ConvertError(f"{input_dir} has more than one folder for split {dup[0]} "
                       f"({', '.join(same)})")
  return True


def find_files(input_dir: str) -> Found:
  """Lists the image-like files under a class-per-folder input, local or gs:// (see module doc)."""
  if not storage.exists(input_dir):
    raise ConvertError(f"input folder {input_dir} does not exist")
  if not storage.isdir(input_dir):
    raise ConvertError(f"--input_dir {input_dir} is not a folder")
  listed: dict[str, tuple[int, int]] = {}
  if storage.is_remote(input_dir):
    # One prefix listing gives names, sizes and times: no request per file.
    listed = {rel: (size, mtime) for rel, size, mtime in storage.walk_files(input_dir)
              if not any(part.startswith(".") for part in rel.split("/"))}
    files = sorted(listed)
    dirs = sorted({rel.split("/")[0] for rel in files if "/" in rel})
  else:
    files, dirs = _walk_files(input_dir), _top_level_dirs(input_dir)
  with_splits = _split_layout(input_dir, dirs)
  need = 3 if with_splits else 2   # split/class/file or class/file
  ignored, wanted = [], []
  for rel in files:
    ok = rel.count("/") + 1 >= need and (_is_image_name(rel.rsplit("/", 1)[-1])
                                         or _is_unnamed_dicom(input_dir, rel))
    (wanted if ok else ignored).append(rel)
  paths = [storage.join(input_dir, rel) if storage.is_remote(input_dir) else os.path.join(input_dir, *rel.split("/"))
           for rel in wanted]

  def stat(rel, path):
    if rel in listed:
      return listed[rel]
    try:
      st = os.stat(path)
      return st.st_size, st.st_mtime_ns
    except OSError as e:
      return e
  stats = [stat(rel, path) for rel, path in zip(wanted, paths)]
  sources = []
  for rel, path, st in zip(wanted, paths, stats):
    if isinstance(st, Exception):
      ignored.append(rel)
      _log(f"warning: cannot stat {rel}: {st}")
      continue
    parts = rel.split("/")
    split = SPLIT_ALIASES[parts[0].lower()] if with_splits else ""
    cls = parts[1] if with_splits else parts[0]
    sources.append(Source(rel=rel, split=split, source_class=cls, path=path,
                          size=st[0], mtime_ns=st[1]))
  ignored.sort()
  if not sources:
    hint = ("expected input/<class>/<image> or input/<split>/<class>/<image>, e.g. "
            "input/NORMAL/1.png")
    what = "is empty" if not dirs and not ignored else "has no image files"
    raise ConvertError(f"input folder {input_dir} {what}: {hint}")
  splits = sorted({s.split for s in sources}, key=_split_order)
  return Found(root=input_dir, sources=sources, layout="splits" if with_splits else "classes",
               splits=splits, ignored=ignored)


def find_keras_pair(input_dir: str) -> Found:
  """Lists the records of the Keras TPU example's images.tfrec + paths.tfrec pair(s).

  Accepts input/images.tfrec + input/paths.tfrec (no split) or
  input/<split>/{images,paths}.tfrec. Record i of images.tfrec is the encoded
  image whose path is record i of paths.tfrec; the path's parent folder is the
  class. `Source.rel` is "<split>/<class>/<file name>" ("<class>/<file name>").
  """
  if not storage.exists(input_dir):
    raise ConvertError(f"input folder {input_dir} does not exist")
  names = set(storage.listdir(input_dir))
  if set(KERAS_PAIR) <= names:
    pairs = [("", input_dir)]
  else:
    pairs = []
    for d in sorted(names):
      sub = storage.join(input_dir, d)
      if d.lower() in SPLIT_ALIASES and storage.isdir(sub) and set(KERAS_PAIR) <= set(storage.listdir(sub)):
        pairs.append((SPLIT_ALIASES[d.lower()], sub))
    if not pairs:
      raise ConvertError(f"no images.tfrec + paths.tfrec in {input_dir} or its "
                         "train/val/test folders (--input_format=keras_pair)")
  sources = []
  for split, folder in pairs:
    img_path, paths_path = (storage.join(folder, n) for n in KERAS_PAIR)
    try:
      paths = [p.decode("utf-8", "replace") for p in records.read_records(paths_path)]
      with storage.open(img_path, "rb") as f:
        offsets = list(records.iter_offsets(f))
    except records.RecordFileError as e:
      raise ConvertError(str(e)) from None
    if len(paths) != len(offsets):
      raise ConvertError(f"{folder}: images.tfrec has {len(offsets)} records but paths.tfrec "
                         f"has {len(paths)}: not a matching pair")
    for i, (p, (offset, length)) in enumerate(zip(paths, offsets)):
      parts = p.replace("\\", "/").rstrip("/").split("/")
      if len(parts) < 2 or not parts[-2]:
        raise ConvertError(f"{paths_path} record {i}: path {p!r} has no parent folder "
                           "to take the class from")
      cls, base = parts[-2], parts[-1]
      rel = f"{split}/{cls}/{base}" if split else f"{cls}/{base}"
      sources.append(Source(rel=rel, split=split, source_class=cls, path=img_path,
                            size=length, offset=offset))
  if not sources:
    raise ConvertError(f"the images.tfrec files under {input_dir} hold no records")
  sources.sort(key=lambda s: (s.rel, s.path, s.offset))
  splits = sorted({s.split for s in sources}, key=_split_order)
  return Found(root=input_dir, sources=sources,
               layout="splits" if splits != [""] else "classes",
               splits=splits, ignored=[])


def _split_order(split: str) -> int:
  return schema.SPLITS.index(split) if split in schema.SPLITS else -1


# --------------------------------------------------------------------------
# 1b. Label CSVs (--labels_csv): the rows name the images and their labels.
#
# "Found", with a CSV, means the images the rows name: num_found = the
# distinct images named by the label rows. Each is converted or skipped with a
# reason (its file is missing, it is in no --split_lists file, it does not
# decode), so converted + skipped == found as for folders. Image files under
# the root that no row names are not found but counted apart (num_unlabelled,
# with examples); other files are ignored (num_ignored). An image named by two
# rows is an error that lists the names.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Labelled:
  """What the label CSVs add to a conversion, for the items and the manifest."""
  labels: labels_lib.LabelSet
  states: dict[str, str]           # source rel -> the row's finding states (multi-label)
  skipped_rows: list[dict]         # {"path", "reason", "split"} of rows that name no usable image
  skipped_reasons: dict[str, int]  # reason kind -> rows
  unlabelled: list[str]            # image files under the root that no row names
  split_lists: list[str]

  @property
  def multi_label(self) -> bool:
    return self.labels.task == labels_lib.MULTI_LABEL


def _list_root(root: str) -> tuple[list[str], dict[str, tuple[int, int]]]:
  """Every non-hidden file under the image root (relative, sorted); sizes/times when listed remotely."""
  if not storage.exists(root):
    raise ConvertError(f"input folder {root} does not exist")
  if not storage.isdir(root):
    raise ConvertError(f"--input_dir {root} is not a folder")
  if storage.is_remote(root):
    listed = {rel: (size, mtime) for rel, size, mtime in storage.walk_files(root)
              if not any(part.startswith(".") for part in rel.split("/"))}
    return sorted(listed), listed
  return list(_walk_files(root)), {}


class _Resolver:
  """A row's image value -> the file under the root it names (None: missing).

  A value with '/' is a path under the root (its first segment may repeat the
  root's own name, as CheXpert's Path does); a bare file name is found anywhere
  under the root (NIH's images_0NN/images/ folders); a bare name without
  extension matches an image file's stem (RSNA's patientId -> <id>.dcm).
  """

  def __init__(self, root: str, files: Sequence[str]):
    self.files = set(files)
    self.root_name = os.path.basename(root.rstrip("/"))
    self.by_name: dict[str, list[str]] = {}
    self.by_stem: dict[str, list[str]] = {}
    for rel in files:
      base = rel.rsplit("/", 1)[-1]
      self.by_name.setdefault(base, []).append(rel)
      if _is_image_name(base):
        self.by_stem.setdefault(os.path.splitext(base)[0], []).append(rel)
    self.ambiguous: dict[str, list[str]] = {}

  def __call__(self, value: str) -> str | None:
    v = value.replace("\\", "/").lstrip("/")
    while v.startswith("./"):
      v = v[2:]
    if v in self.files:
      return v
    if "/" in v:
      first, rest = v.split("/", 1)
      return rest if first == self.root_name and rest in self.files else None
    hits = self.by_name.get(v) or ([] if os.path.splitext(v)[1] else self.by_stem.get(v, []))
    if len(hits) > 1:
      self.ambiguous[v] = hits
    return hits[0] if len(hits) == 1 else None


def _read_split_lists(spec: str) -> tuple[dict[str, str], list[str]]:
  """--split_lists -> ({image name: split}, the files); a name in two lists is an error."""
  split_of: dict[str, str] = {}
  files = []
  for split, path in labels_lib.parse_split_files(spec, "split_lists", SPLIT_ALIASES):
    if not split:
      raise ConvertError("--split_lists needs SPLIT=FILE entries, e.g. "
                         "train=train_val_list.txt,test=test_list.txt")
    try:
      text = storage.read_text(path)
    except (OSError, storage.StorageError) as e:
      raise ConvertError(f"cannot read --split_lists file {path}: {e}") from None
    files.append(path)
    for name in text.split():
      if split_of.get(name, split) != split:
        raise ConvertError(f"{name} is in the {split_of[name]} and the {split} --split_lists files")
      split_of[name] = split
  return split_of, files


def find_labelled(opts: ConvertOptions, log: Callable[[str], None]
                  ) -> tuple[Found, list[tuple[Source, labels_lib.Row]], Labelled]:
  """Reads the label CSVs, finds the image each row names; every row and file accounted for.

  Returns the Found (its sources: the named images that exist), each source
  with its row, and the rest (skipped rows, unlabelled files) for the manifest.
  Raises ConvertError (labels.LabelError) for unusable CSVs or options, an
  ambiguous file name, and images named by more than one row.
  """
  csvs = labels_lib.parse_split_files(opts.labels_csv, "labels_csv", SPLIT_ALIASES)
  lab = labels_lib.read_labels(
      csvs, image_column=opts.image_column, labels_column=opts.labels_column,
      label_separator=opts.label_separator, label_columns=opts.label_columns,
      patient_column=opts.patient_column, findings=opts.findings, log=log)
  what = "findings" if lab.task == labels_lib.MULTI_LABEL else "classes"
  log(f"labels: {lab.layout} layout in {', '.join(lab.csvs)} ({len(lab.rows)} rows; columns "
      f"{json.dumps(lab.columns)}); {len(lab.classes)} {what}: {', '.join(lab.classes)}")
  split_of, list_files = {}, []
  if opts.split_lists:
    if any(r.split for r in lab.rows):
      raise ConvertError("give the publisher's splits one way: --labels_csv=SPLIT=FILE,... or "
                         "--split_lists, not both")
    split_of, list_files = _read_split_lists(opts.split_lists)

  files, listed = _list_root(opts.input_dir)
  resolve = _Resolver(opts.input_dir, files)
  skipped_rows, reasons = [], {}
  named: dict[str, list[labels_lib.Row]] = {}

  def skip(row, kind, split):
    reasons[kind] = reasons.get(kind, 0) + 1
    skipped_rows.append({"path": row.image or f"({row.where()})", "reason": f"{kind} ({row.where()})",
                         "split": split})

  accounted = set()   # files named by a row that is skipped: neither converted nor unlabelled
  for row in lab.rows:
    split = row.split
    if not row.image:
      skip(row, "no image named", split)
      continue
    rel = resolve(row.image)
    if split_of:
      key = row.image.replace("\\", "/")
      split = split_of.get(key) or split_of.get(key.rsplit("/", 1)[-1], "")
      if not split:
        skip(row, "not in any --split_lists file", "")
        accounted.add(rel)
        continue
    if rel is None:
      if row.image not in resolve.ambiguous:
        skip(row, "missing file", split)
      continue
    named.setdefault(rel, []).append(dataclasses.replace(row, split=split))
  if resolve.ambiguous:
    ex = "; ".join(f"{v}: {', '.join(h[:3])}" for v, h in list(resolve.ambiguous.items())[:3])
    raise ConvertError(f"{len(resolve.ambiguous)} image names in the label CSVs match several "
                       f"files under {opts.input_dir} ({ex}): name them by their path")
  twice = {rel: rows for rel, rows in named.items() if len(rows) > 1}
  if twice:
    ex = "; ".join(f"{rel} ({', '.join(r.where() for r in rows)})"
                   for rel, rows in sorted(twice.items())[:5])
    raise ConvertError(f"{len(twice)} images are named by more than one label row: {ex}"
                       + (f"; and {len(twice) - 5} more" if len(twice) > 5 else ""))

  pairs, ignored = [], []
  for rel in sorted(named):
    row = named[rel][0]
    path = (storage.join(opts.input_dir, rel) if storage.is_remote(opts.input_dir)
            else os.path.join(opts.input_dir, *rel.split("/")))
    if rel in listed:
      size, mtime = listed[rel]
    else:
      try:
        st = os.stat(path)
      except OSError as e:
        skip(row, f"unreadable: {e.strerror or e}", row.split)
        continue
      size, mtime = st.st_size, st.st_mtime_ns
    pairs.append((Source(rel=rel, split=row.split, source_class=row.cls, path=path, size=size,
                         mtime_ns=mtime), row))
  unlabelled = []
  for rel in files:
    if rel not in named and rel not in accounted:
      (unlabelled if _is_image_name(rel.rsplit("/", 1)[-1]) else ignored).append(rel)
  n_missing = reasons.get("missing file", 0)
  log(f"labels: {len(pairs)} labelled images found under {opts.input_dir}"
      + (f"; {n_missing} rows name a missing file" if n_missing else "")
      + (f"; {len(skipped_rows) - n_missing} other rows skipped" if len(skipped_rows) > n_missing else "")
      + (f"; {len(unlabelled)} image files no row names (unlabelled, not converted), e.g. "
         f"{unlabelled[0]}" if unlabelled else ""))
  if not lab.rows:
    raise ConvertError(f"the label CSVs ({', '.join(lab.csvs)}) have no rows")
  if not pairs:
    why = ", ".join(f"{k}: {n}" for k, n in sorted(reasons.items()))
    raise ConvertError(f"none of the {len(lab.rows)} label rows names an image file under "
                       f"{opts.input_dir} ({why}; e.g. {lab.rows[0].image!r}): is --input_dir "
                       "the image root?")
  given = sorted({r.split for _, r in pairs if r.split}, key=_split_order)
  found = Found(root=opts.input_dir, sources=[s for s, _ in pairs], layout="labels_csv",
                splits=given, ignored=sorted(ignored))
  return found, pairs, Labelled(lab, {}, skipped_rows, reasons, unlabelled, list_files)


def _labelled_items(opts: ConvertOptions, log: Callable[[str], None]
                    ) -> tuple[Found, list[str], list[Item], Labelled, dict]:
  """Label CSVs -> (found, classes, items, labelled, split info): labels, patients, splits.

  Drawn splits (from everything, or from the publisher's train) reuse
  `assign_splits`, by patient whenever the rows carry one (or --group_regex
  finds one in the path). Multi-label sets are stratified by each image's
  rarest present finding ("No Finding" its own stratum), so rare findings
  reach every split; a patient's stratum is that of most of their images.
  """
  found, pairs, lab = find_labelled(opts, log)
  regex = _compile_group_regex(opts.group_regex)
  classes = lab.labels.classes
  multi = lab.multi_label
  if not multi:
    classes = default_class_order(sorted({r.cls for _, r in pairs}))
    if len(classes) < 2:
      raise ConvertError(f"the labelled images have one class only ({classes[0]}): a classifier "
                         "needs at least two")
  pids, unmatched = [], []
  for s, r in pairs:
    pid = r.patient
    if not pid and regex is not None:
      pid = patient_id(s.rel, regex)
      if pid is None:
        unmatched.append(s.rel)
    pids.append(pid or "")
  if unmatched:
    raise ConvertError(f"--group_regex {opts.group_regex!r} found no patient id in "
                       f"{len(unmatched)} paths, e.g. {unmatched[0]!r}")
  encoded = [labels_lib.encode(r.states, opts.uncertain, opts.blank) if multi else ((), ())
             for _, r in pairs]
  if multi:
    prevalence = [sum(h[k] for h, _ in encoded) for k in range(len(classes))]
    rarest = sorted(range(len(classes)), key=lambda k: (prevalence[k], k))
    strata = [next((k for k in rarest if h[k] == 1.0), len(classes)) for h, _ in encoded]
  else:
    strata = [classes.index(r.cls) for _, r in pairs]
  splits = [r.split or "train" for _, r in pairs]
  info: dict[str, Any] = {}
  fractions = _drawn_fractions(opts, found.splits, what="split in the label files")
  if fractions:
    idx = [i for i, sp in enumerate(splits) if sp == "train"]
    drawn = assign_splits([pairs[i][0].rel for i in idx], [strata[i] for i in idx],
                          [pids[i] for i in idx], fractions, opts.seed)
    for i, sp in zip(idx, drawn):
      splits[i] = sp
    info["drawn_splits"] = dict(fractions)
  items = []
  for (s, r), sp, pid, (hot, mask) in zip(pairs, splits, pids, encoded):
    if multi:
      items.append(Item(source=s, split=sp, label=0, text=labels_lib.text_of(hot, classes),
                        patient_id=pid, multi_hot=hot, mask=mask))
      lab.states[s.rel] = r.states
    else:
      items.append(Item(source=s, split=sp, label=classes.index(r.cls), text=r.cls,
                        patient_id=pid))
  if any(pids):
    info["patients_in_several_splits"] = _patient_leaks(items, log)
  return found, classes, items, lab, info


def _add_labels_manifest(manifest: dict, lab: Labelled, items: Sequence[Item],
                         opts: ConvertOptions) -> None:
  """The label-CSV parts of dataset.json (see schema.py): task, finding counts, skipped rows."""
  failed = {s["path"] for s in manifest["skipped"]}
  classes = manifest["classes"]
  for split, info in manifest["splits"].items():
    done = [it for it in items if it.split == split and it.source.rel not in failed]
    patients = {it.patient_id for it in done if it.patient_id}
    info["num_groups"] = len(patients) if patients else info.get("num_groups")
    if lab.multi_label:
      counts = labels_lib.new_finding_counts(classes)
      for it in done:
        labels_lib.count_findings(counts, classes, lab.states[it.source.rel], it.multi_hot, it.mask)
      info["finding_counts"] = counts
  skipped = sorted(manifest["skipped"] + lab.skipped_rows, key=lambda s: s["path"])
  manifest["num_unlabelled"] = len(lab.unlabelled)
  manifest["unlabelled_examples"] = lab.unlabelled[:20]
  kinds: dict[str, int] = dict(lab.skipped_reasons)
  for s in manifest["skipped"]:   # the images that did not convert
    kinds[s["reason"]] = kinds.get(s["reason"], 0) + 1
  manifest["num_found"] += len(lab.skipped_rows)
  manifest["num_skipped"] = len(skipped)
  manifest["skipped"] = skipped
  ls = lab.labels
  manifest["labels"] = {
      "layout": ls.layout, "csv": ls.csvs, "split_lists": lab.split_lists,
      "columns": ls.columns, "uncertain": opts.uncertain if lab.multi_label else None,
      "blank": opts.blank if lab.multi_label else None, "num_rows": len(ls.rows),
      "merged_rows": ls.merged_rows, "skipped_reasons": dict(sorted(kinds.items())),
      "unlisted_findings": ls.unlisted_findings,
  }
  if lab.multi_label:   # "task" beside "classes" (absent = single_label, as for folders)
    out = {}
    for k, v in manifest.items():
      if k == "classes":
        out["task"] = labels_lib.MULTI_LABEL
      out[k] = v
    manifest.clear()
    manifest.update(out)


# --------------------------------------------------------------------------
# 2. Classes.
# --------------------------------------------------------------------------


def parse_class_map(spec: str) -> list[tuple[str, list[str]]]:
  """"NORMAL=Normal,PNEUMONIA=Bacterial+Viral,COVID" -> [(target, [sources])].

  A bare name keeps that class under its own name. Order is label order.
  """
  out: list[tuple[str, list[str]]] = []
  seen_targets, seen_sources = set(), {}
  for part in [p.strip() for p in spec.split(",") if p.strip()]:
    target, _, rhs = part.partition("=")
    target = target.strip()
    srcs = [s.strip() for s in (rhs.split("+") if rhs else [target])]
    if not target or not all(srcs):
      raise ConvertError(f"--class_map entry {part!r} is not NEW=OLD[+OLD...] or NAME")
    if target in seen_targets:
      raise ConvertError(f"--class_map names class {target!r} twice")
    for s in srcs:
      if s in seen_sources:
        raise ConvertError(f"--class_map maps source class {s!r} twice "
                           f"(to {seen_sources[s]!r} and {target!r})")
      seen_sources[s] = target
    seen_targets.add(target)
    out.append((target, srcs))
  if not out:
    raise ConvertError("--class_map is empty")
  return out


_NEGATIVE_NAMES = {"normal", "healthy", "negative", "benign", "control", "nofinding", "none"}


def _is_negative_name(name: str, others: Sequence[str]) -> bool:
  """Normal, Healthy, No_Finding, ...; or NonX / Non-X / No_X beside a class X."""
  key = re.sub(r"[-_ ]", "", name.lower())
  if key in _NEGATIVE_NAMES:
    return True
  others_keys = {re.sub(r"[-_ ]", "", o.lower()) for o in others if o != name}
  return any(key == prefix + o for o in others_keys for prefix in ("non", "no", "not"))


def default_class_order(names: Sequence[str]) -> list[str]:
  """Label order without --class_map: sorted, but a normal/negative class first.

  With two classes label 1 is the positive class of every clinical number
  (sensitivity, PPV, ROC), so it must be the finding: NonCOVID/COVID gives
  COVID = 1 although "COVID" sorts first. Only one class may look negative;
  otherwise the order stays alphabetical.
  """
  names = sorted(names)
  negative = [n for n in names if _is_negative_name(n, names)]
  if len(negative) != 1:
    return names
  return negative + [n for n in names if n != negative[0]]


def resolve_classes(found: Found, class_map: str) -> tuple[list[str], dict[str, str]]:
  """(class names in label order, source class -> class name; unmapped sources absent).

  Without --class_map the order is `default_class_order` (a normal/negative
  class first); --class_map's order is the label order.

  Raises ConvertError for a single class, for --class_map names that match no
  folder, and for splits whose classes differ.
  """
  source_classes = sorted({s.source_class for s in found.sources})
  if class_map:
    spec = parse_class_map(class_map)
    missing = [s for _, srcs in spec for s in srcs if s not in source_classes]
    if missing:
      raise ConvertError(f"--class_map names {', '.join(repr(m) for m in missing)} but the "
                         f"input's classes are {', '.join(source_classes)}")
    classes = [t for t, _ in spec]
    mapping = {s: t for t, srcs in spec for s in srcs}
  else:
    classes = default_class_order(source_classes)
    mapping = {s: s for s in source_classes}
  if len(classes) < 2:
    if class_map:
      raise ConvertError(f"--class_map leaves only one class ({classes[0]}): need at least two")
    raise ConvertError(f"only one class ({classes[0]}) in {found.root}: a classifier needs at "
                       "least two class folders (input/<class>/* or input/<split>/<class>/*)")
  if found.layout == "splits":
    per_split = {sp: sorted({mapping[s.source_class] for s in found.sources
                             if s.split == sp and s.source_class in mapping})
                 for sp in found.splits}
    all_classes = set(classes)
    problems = []
    for sp, have in per_split.items():
      lacks = sorted(all_classes - set(have), key=classes.index)
      if lacks:
        problems.append(f"{sp} has no {', '.join(lacks)}")
    if problems:
      raise ConvertError("classes differ across splits: " + "; ".join(problems)
                         + " (every split needs the same class folders)")
  return classes, mapping


# --------------------------------------------------------------------------
# 3. Split (and patient groups).
# --------------------------------------------------------------------------


def _hash_key(seed: int, *parts: str) -> bytes:
  return hashlib.sha256("\0".join([str(seed), *parts]).encode("utf-8")).digest()


def patient_id(rel: str, regex: re.Pattern | None) -> str | None:
  """First group of the regex searched in the file name (in the relative path
  when the regex contains '/'); None when it does not match."""
  if regex is None:
    return ""
  target = rel if "/" in regex.pattern else rel.rsplit("/", 1)[-1]
  m = regex.search(target)
  if not m:
    return None
  return m.group(1) if m.groups() else m.group(0)


def dicom_patient_id(s: Source) -> str | None:
  """The PatientID of a DICOM file's header (--group_by=dicom_patient_id); None when the
  file is no DICOM or has none. A header that cannot be read at all gives "" (the file
  is its own group, and the conversion skips it with the reason)."""
  try:
    with storage.open(s.path, "rb") as f:
      if s.offset >= 0 or not dicom.is_dicom(f.read(132), s.rel):
        return None
      f.seek(0)
      return dicom.patient_id(f)
  except (OSError, pixels.ImageError):
    return ""


def assign_splits(keys: Sequence[str], labels: Sequence[int], groups: Sequence[str],
                  fractions: dict[str, float], seed: int, rest: str = "train") -> list[str]:
  """Seeded, class-stratified, group-aware split of items.

  Items sharing a group (patient) always get the same split; a group's stratum
  is its most common label. Within a stratum, groups are ordered by
  sha256(seed, group) and taken for each split in `fractions` order until that
  split holds round(fraction * stratum size) images; the rest go to `rest`.
  Hash order makes the result independent of file-system order and stable
  when unrelated files are added.

  Args:
    keys: a unique name per item (its relative path).
    labels: class index per item.
    groups: group (patient) per item; "" = the item is its own group.
    fractions: e.g. {"test": 0.15, "val": 0.15}.
  Returns:
    The split name per item.
  """
  members: dict[str, list[int]] = {}
  for i, (k, g) in enumerate(zip(keys, groups)):
    members.setdefault(g if g else "\0file\0" + k, []).append(i)
  strata: dict[int, list[str]] = {}
  for g, idx in members.items():
    counts: dict[int, int] = {}
    for i in idx:
      counts[labels[i]] = counts.get(labels[i], 0) + 1
    label = min(counts, key=lambda lab: (-counts[lab], lab))
    strata.setdefault(label, []).append(g)
  out = [rest] * len(keys)
  for label in sorted(strata):
    ordered = sorted(strata[label], key=lambda g: _hash_key(seed, g))
    total = sum(len(members[g]) for g in ordered)
    targets = {s: round(f * total) for s, f in fractions.items() if f > 0}
    filled = {s: 0 for s in targets}
    for g in ordered:
      for s in targets:
        if filled[s] < targets[s]:
          filled[s] += len(members[g])
          for i in members[g]:
            out[i] = s
          break
  return out


# --------------------------------------------------------------------------
# 4. Shard plan.
# --------------------------------------------------------------------------


def default_num_shards(num_examples: int, estimated_bytes: int) -> int:
  """About TARGET_SHARD_BYTES per shard; small sets get a power of two, one
  shard per MIN_EXAMPLES_PER_SHARD examples, at most MAX_MIN_SHARDS."""
  if num_examples <= 0:
    return 1
  by_size = math.ceil(estimated_bytes / TARGET_SHARD_BYTES)
  by_count = min(MAX_MIN_SHARDS, math.ceil(num_examples / MIN_EXAMPLES_PER_SHARD))
  n = max(1, by_size, by_count)
  if n <= 64:
    n = 1 << (n - 1).bit_length()
  return max(1, min(n, num_examples))


def _estimated_bytes(src: Source, max_side: int) -> int:
  if not max_side:
    return src.size
  return min(src.size, max_side * max_side)  # ~1 byte/pixel at most once resized


def plan_shards(items: Sequence[Item], opts: ConvertOptions) -> dict[str, list[ShardTask]]:
  """Per split: items in seeded hash order, cut into contiguous shards."""
  by_split: dict[str, list[Item]] = {}
  for it in items:
    by_split.setdefault(it.split, []).append(it)
  plan = {}
  for split in sorted(by_split, key=_split_order):
    its = sorted(by_split[split], key=lambda it: _hash_key(opts.seed, "order", it.source.rel))
    n = len(its)
    if opts.num_shards:
      k = max(1, min(opts.num_shards, n))
    else:
      k = default_num_shards(n, sum(_estimated_bytes(it.source, opts.max_side) for it in its))
    tasks = []
    for i in range(k):
      part = its[i * n // k:(i + 1) * n // k]
      tasks.append(ShardTask(
          split=split, index=i, num_shards=k, file=schema.shard_name(split, i, k),
          output_dir=opts.output_dir, items=part, max_side=opts.max_side,
          channels=opts.channels, image_format=opts.image_format,
          jpeg_quality=opts.jpeg_quality, dicom_window=opts.dicom_window))
    plan[split] = tasks
  for tasks in plan.values():
    for t in tasks:
      t.fingerprint = _fingerprint(t)
  return plan


def _fingerprint(task: ShardTask) -> str:
  """Identifies a shard's exact content: arguments + each source's identity."""
  h = hashlib.sha256()
  h.update(json.dumps([__version__, task.file, task.max_side, task.channels,
                       task.image_format, task.jpeg_quality,
                       task.dicom_window, pixels.PNG_COMPRESS_LEVEL,
                       pixels.CONTRACT_VERSION]).encode())
  for it in task.items:
    s = it.source
    h.update(json.dumps([s.rel, s.path, s.size, s.mtime_ns, s.offset, it.label,
                         it.text, it.patient_id]
                        + ([it.multi_hot, it.mask] if it.multi_hot else [])).encode())
  return h.hexdigest()


# --------------------------------------------------------------------------
# 5. Write: each shard by tfrecord_tools.shards.write_shard, on a crash-
#    tolerant process pool (tfrecord_tools.pool), with a progress line.
# --------------------------------------------------------------------------


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


class Progress:
  """A one-line progress display with images/sec (a new line every 10 s when not a tty)."""

  def __init__(self, total: int, quiet: bool = False, what: str = "images"):
    self.total, self.quiet, self.what = total, quiet, what
    self.start = self.last = time.monotonic()
    self.done = 0
    self.tty = sys.stderr.isatty()

  def update(self, done: int, force: bool = False) -> None:
    self.done = done
    now = time.monotonic()
    if self.quiet or (not force and now - self.last < (0.5 if self.tty else 10.0)):
      return
    self.last = now
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else 0
    pct = 100.0 * done / max(self.total, 1)
    line = (f"converting: {done}/{self.total} {self.what} ({pct:5.1f}%) "
            f"{rate:7.1f} img/s  eta {int(eta) // 60}:{int(eta) % 60:02d}")
    if self.tty:
      print("\r" + line, end="", file=sys.stderr, flush=True)
    else:
      _log(line)

  def close(self) -> float:
    """Prints the final line; returns images/sec."""
    elapsed = max(time.monotonic() - self.start, 1e-9)
    if not self.quiet:
      self.update(self.done, force=True)
      if self.tty:
        print(file=sys.stderr)
    return self.done / elapsed


def _run_tasks(tasks: list[ShardTask], num_workers: int, progress: Progress,
               log: Callable[[str], None] = _log) -> list[dict]:
  """Writes the shards, each by one worker; the largest shards start first.

  Several workers: a `pool.run` process pool. A worker that dies (the
  out-of-memory killer, a crash in an image decoder) breaks the pool: the
  unfinished shards are tried once more on a new pool, then ConvertError
  names the cause (finished shards are kept; a rerun reuses them). Workers
  that re-ran a main script calling convert() without a `__main__` guard ->
  ConvertError saying so.
  """
  tasks = sorted(tasks, key=lambda t: -sum(it.source.size for it in t.items))
  try:
    return pool.run(shards.write_shard, tasks, num_workers, progress=progress.update,
                    size=lambda t: len(t.items), recover=shards.load_finished, log=log,
                    noun="shard")
  except pool.UnguardedMain as e:
    raise ConvertError(
        f"the worker processes re-ran {e.main}, which called convert() again: put the code "
        "that calls convert() under `if __name__ == \"__main__\":` (or use num_workers=1)"
    ) from None
  except pool.WorkersDied as e:
    raise ConvertError(
        f"a worker process {e.cause}, also when the unfinished shards were tried again; "
        f"{e.num_finished} of {e.num_tasks} shards are finished and kept: run the same "
        "command again to resume (with fewer --num_workers or a smaller --max_side if "
        "memory ran out)") from None


# --------------------------------------------------------------------------
# 6. The whole conversion.
# --------------------------------------------------------------------------


def _check_options(o: ConvertOptions) -> None:
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
  try:
    dicom.parse_window(o.dicom_window)
  except ValueError as e:
    raise ConvertError(f"--dicom_window={e}") from None
  if o.group_by not in GROUP_BY:
    raise ConvertError(f"--group_by={o.group_by}: must be dicom_patient_id (or empty)")
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
                         "patient_column", "findings") if getattr(o, n)]
    if given:
      raise ConvertError(f"--{given[0]} needs --labels_csv")
    return
  if o.input_format != "folders":
    raise ConvertError("--labels_csv reads image files: drop --input_format")
  if o.class_map:
    raise ConvertError("--class_map maps class folders; with --labels_csv choose the findings "
                       "with --findings")


def _compile_group_regex(pattern: str) -> re.Pattern | None:
  if not pattern:
    return None
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ConvertError(f"--group_regex {pattern!r} is not a valid regex: {e}") from None
  return regex


def _content_digest(src: Source) -> str:
  h = hashlib.sha256()
  with storage.open(src.path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def dedupe(found: Found, mapping: dict[str, str], on_conflict: str,
           log: Callable[[str], None]) -> Found:
  """Finds files with identical contents (sha256; only files sharing a size are read).

  - the same file reached by two paths (symlinks): converted once, the other paths
    listed in `aliases`;
  - identical contents under two classes (after --class_map: `mapping` source -> class;
    files whose class it drops are left alone): a conflict. on_conflict="error" raises
    ConvertError listing the pairs; "skip" leaves every copy out (`skipped`, counted);
  - identical contents under one class: kept, listed in `duplicates`; `_make_items`
    keeps them in one split (a duplicate upload must not leak from train into test).
  """
  by_size: dict[int, list[Source]] = {}
  for src in found.sources:
    if src.source_class in mapping:
      by_size.setdefault(src.size, []).append(src)
  by_digest: dict[str, list[Source]] = {}
  for same in by_size.values():
    if len(same) > 1:
      for src in same:
        by_digest.setdefault(_content_digest(src), []).append(src)
  drop: dict[str, dict | None] = {}     # rel -> skip record (conflict) or None (alias)
  conflicts, aliases, duplicates = [], [], []
  for digest, group in sorted(by_digest.items()):
    if len(group) < 2:
      continue
    group = sorted(group, key=lambda s: s.rel)
    classes = sorted({mapping[s.source_class] for s in group})
    if len(classes) > 1:
      conflicts.append(group)
      continue
    first_real: dict[str, str] = {}
    distinct = []
    for src in group:
      real = src.path if storage.is_remote(src.path) else os.path.realpath(src.path)
      if real in first_real:
        drop[src.rel] = None
        aliases.append({"path": src.rel, "same_file_as": first_real[real]})
      else:
        first_real[real] = src.rel
        distinct.append(src.rel)
    if len(distinct) > 1:
      duplicates.append(distinct)
      if len({s.split for s in group}) > 1:
        log(f"warning: identical files in different split folders of the input: {distinct[:3]} "
            "(they leak between splits; remove the copies)")
  if conflicts:
    pairs = "; ".join(" = ".join(f"{s.rel} ({mapping[s.source_class]})" for s in g)
                      for g in conflicts[:5])
    more = f" (and {len(conflicts) - 5} more)" if len(conflicts) > 5 else ""
    if on_conflict != "skip":
      raise ConvertError(f"{len(conflicts)} file(s) have the same contents under different classes: "
                         f"{pairs}{more}. Remove the wrong copies, or pass --on_conflict=skip to leave "
                         "them all out")
    for g in conflicts:
      for s in g:
        others = ", ".join(f"{o.rel} ({mapping[o.source_class]})" for o in g if o is not s)
        drop[s.rel] = {"path": s.rel, "reason": f"same contents as {others} under another class"}
    log(f"warning: skipped {sum(len(g) for g in conflicts)} files whose contents appear under "
        f"different classes (--on_conflict=skip): {pairs}{more}")
  if aliases:
    log(f"{len(aliases)} paths reach a file already found (symbolic links): converted once")
  if duplicates:
    log(f"{sum(len(d) for d in duplicates)} files are identical copies within their class "
        f"({len(duplicates)} groups, e.g. {duplicates[0][:2]}): each group is kept in one split")
  return dataclasses.replace(
      found, sources=[s for s in found.sources if s.rel not in drop],
      skipped=sorted((r for r in drop.values() if r), key=lambda r: r["path"]),
      aliases=aliases, duplicates=duplicates)


def _split_groups(keys: Sequence[str], pids: Sequence[str], duplicates: list[list[str]]) -> list[str]:
  """assign_splits's group per item: the patient id, or the item itself (its "" / rel key),
  with each set of duplicate files (and their patients) merged into one group."""
  base = [p if p else "\0file\0" + k for k, p in zip(keys, pids)]
  parent = {b: b for b in base}

  def find(x: str) -> str:
    while parent[x] != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  index = {k: i for i, k in enumerate(keys)}
  for dup in duplicates:
    roots = sorted({find(base[index[k]]) for k in dup if k in index})
    for r in roots[1:]:
      parent[r] = roots[0]
  return [find(b) for b in base]


def _make_items(found: Found, classes: list[str], mapping: dict[str, str],
                opts: ConvertOptions, log: Callable[[str], None]
                ) -> tuple[list[Item], dict[str, int], dict]:
  """Maps classes, reads patient ids and draws the splits."""
  regex = _compile_group_regex(opts.group_regex)
  label_of = {c: i for i, c in enumerate(classes)}
  kept, dropped = [], {}
  for s in found.sources:
    if s.source_class not in mapping:
      dropped[s.source_class] = dropped.get(s.source_class, 0) + 1
      continue
    kept.append(s)
  pids = []
  unmatched = []
  for s in kept:
    pid = dicom_patient_id(s) if opts.group_by else patient_id(s.rel, regex)
    if pid is None:
      unmatched.append(s.rel)
      pid = ""
    pids.append(pid)
  if unmatched and opts.group_by:
    raise ConvertError(f"--group_by=dicom_patient_id: {len(unmatched)} files are not DICOM or "
                       f"have no PatientID, e.g. {unmatched[0]!r}")
  if unmatched:
    raise ConvertError(f"--group_regex {opts.group_regex!r} found no patient id in "
                       f"{len(unmatched)} file names, e.g. {unmatched[0]!r}")
  labels = [label_of[mapping[s.source_class]] for s in kept]
  splits = [s.split or "train" for s in kept]
  info: dict[str, Any] = {}

  # Draw the splits the layout does not give: from everything (classes layout)
  # or from train (splits layout without val/ or test/).
  fractions = _drawn_fractions(opts, found.splits)
  if fractions:
    pool = [i for i, sp in enumerate(splits) if sp == "train"]
    keys = [kept[i].rel for i in pool]
    groups = _split_groups(keys, [pids[i] for i in pool], found.duplicates)
    drawn = assign_splits(keys, [labels[i] for i in pool], groups, fractions, opts.seed)
    for i, sp in zip(pool, drawn):
      splits[i] = sp
    info["drawn_splits"] = {k: v for k, v in fractions.items()}

  items = [Item(source=s, split=sp, label=lab, text=classes[lab], patient_id=pid)
           for s, sp, lab, pid in zip(kept, splits, labels, pids)]
  if regex is not None or opts.group_by:
    info["patients_in_several_splits"] = _patient_leaks(items, log)
  return items, dropped, info


def _drawn_fractions(opts: ConvertOptions, given: Sequence[str], what: str = "folder"
                     ) -> dict[str, float]:
  """{"test": f, "val": f} to draw from train: --*_fraction, auto = none when the input gives the split."""
  fractions = {}
  for name, frac in (("test", opts.test_fraction), ("val", opts.val_fraction)):
    if frac == AUTO_FRACTION:   # the CLI default: the input's own folder wins
      frac = 0.0 if name in given else DEFAULT_FRACTION
    if frac > 0:
      if name in given:
        raise ConvertError(f"the input already has a {name} {what}: drop --{name}_fraction "
                           f"(or remove the {what} to draw the split from train)")
      fractions[name] = frac
  return fractions


def _patient_leaks(items: Sequence[Item], log: Callable[[str], None]) -> int:
  """Warns about patients whose images the input's own splits put in several splits; their number."""
  split_of: dict[str, set] = {}
  for it in items:
    split_of.setdefault(it.patient_id, set()).add(it.split)
  leaked = sorted(p for p, sps in split_of.items() if len(sps) > 1 and p)
  if leaked:
    log(f"warning: {len(leaked)} patients appear in more than one of the input's own "
        f"splits (e.g. {leaked[0]!r}): their images leak between splits")
  return len(leaked)


def _check_output(opts: ConvertOptions) -> None:
  """Refuses a complete earlier output unless --overwrite, and foreign shards."""
  out = opts.output_dir
  if storage.is_remote(out) and not storage.exists(out):
    return
  if not storage.is_remote(out) and os.path.exists(out) and not os.path.isdir(out):
    raise ConvertError(f"--output_dir {out} exists and is not a folder")
  if not storage.exists(out):
    return
  if storage.exists(schema.manifest_path(out)) and not opts.overwrite:
    raise ConvertError(f"{out} already holds a converted data set ({schema.MANIFEST_NAME}): "
                       "pass --overwrite to replace it")
  names = storage.listdir(out)
  shards = [n for n in names if _SHARD_RE.match(n)]
  if (shards and STATE_DIR not in names and schema.MANIFEST_NAME not in names
      and not opts.overwrite):
    raise ConvertError(f"{out} holds TFRecord shards not written by this tool "
                       f"(e.g. {shards[0]}): pass --overwrite or choose another --output_dir")


_SHARD_RE = re.compile(r"^(train|val|test)-\d{5}-of-\d{5}\.tfrecord(\.tmp-\d+)?$")
_TMP_RE = re.compile(r"\.tmp-\d+$")


def _clean_output(out: str, keep: set[str]) -> None:
  """Removes temp files and shards not in `keep` (left by killed or earlier runs)."""
  for name in storage.listdir(out):
    if _SHARD_RE.match(name) and name not in keep:
      storage.remove(storage.join(out, name))
    elif _TMP_RE.search(name) and name.startswith(schema.MANIFEST_NAME):
      storage.remove(storage.join(out, name))
  state = storage.join(out, STATE_DIR)
  if storage.exists(state):
    for name in storage.listdir(state):
      if name[:-len(".json")] not in keep or _TMP_RE.search(name):
        storage.remove(storage.join(state, name))


def _resolve_workers(n: int) -> int:
  if n:
    return n
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover - macOS
    return os.cpu_count() or 1


def convert(opts: ConvertOptions, log: Callable[[str], None] | None = None,
            run_tasks: Callable | None = None) -> dict:
  """Runs the conversion; returns the manifest (also written to dataset.json).

  Finding, splitting, planning, resuming, the manifest and the skip policy are
  here, once; only the writing of the unfinished shards is pluggable:
  `run_tasks(todo, opts, log) -> (results, images_per_sec, num_workers, extra_args)`
  (default: a local process pool, `run_locally`; `beam_convert` passes a Beam runner).

  Raises:
    ConvertError: bad arguments or input (missing/empty folder, one class,
      classes differing across splits, ...), an existing complete output
      without overwrite, or more skipped files than max_skipped_fraction
      (then the shards are kept for a rerun but no manifest is written),
      a worker process that died twice, or a main script without
      `if __name__ == "__main__":` that the workers re-ran.
  """
  pool.exit_if_starting_worker()
  log = log or (lambda m: None if opts.quiet else _log(m))
  _check_options(opts)
  # One process owns the output folder (a second converter fails at once, naming the holder).
  with locks.exclusive(opts.output_dir, "tfrecord_tools.convert"):
    return _convert_owned(opts, log, run_tasks)


def _convert_owned(opts: ConvertOptions, log: Callable[[str], None], run_tasks) -> dict:
  """convert() with the output folder's lock held."""
  _check_output(opts)
  t0 = time.monotonic()

  labelled = None
  if opts.labels_csv:
    found, classes, items, labelled, split_info = _labelled_items(opts, log)
    mapping, dropped = {}, {}
  else:
    found = (find_keras_pair(opts.input_dir) if opts.input_format == "keras_pair"
             else find_files(opts.input_dir))
    classes, mapping = resolve_classes(found, opts.class_map)
    if opts.input_format != "keras_pair":
      found = dedupe(found, mapping, opts.on_conflict, log)
    items, dropped, split_info = _make_items(found, classes, mapping, opts, log)
  if not items:
    raise ConvertError("--class_map drops every image")
  plan = plan_shards(items, opts)
  tasks = [t for ts in plan.values() for t in ts]
  log(f"found {len(found.sources)} images in {opts.input_dir} ({found.layout} layout); "
      f"classes {classes}; "
      + ", ".join(f"{sp}: {sum(len(t.items) for t in ts)} in {len(ts)} shards"
                  for sp, ts in plan.items())
      + (f"; dropped by --class_map: {dropped}" if dropped else ""))
  if len(classes) == 2 and not (labelled and labelled.multi_label):
    log(f"positive class (label 1: sensitivity, PPV, ROC): {classes[1]}; negative: {classes[0]}"
        + ("" if opts.class_map else " (another order: --class_map="
           f"{classes[1]},{classes[0]})"))
  if "train" not in {it.split for it in items}:
    log("warning: no train split (the input has only "
        f"{', '.join(sorted({it.split for it in items}))} folders): this data set can be "
        "evaluated on, not trained on")

  out = opts.output_dir
  storage.makedirs(out)
  if storage.exists(schema.manifest_path(out)):   # --overwrite: no longer complete from here on
    storage.remove(schema.manifest_path(out))
  tfds_metadata.remove(out)                      # it would describe the earlier shards
  storage.makedirs(storage.join(out, STATE_DIR))
  keep = {t.file for t in tasks}
  _clean_output(out, keep)

  results, todo = [], []
  for t in tasks:
    r = shards.load_finished(t)
    (results.append(r) if r is not None else todo.append(t))
  if not todo:
    log(f"nothing to convert: {len(results)} of {len(tasks)} shards already complete")
  elif results:
    log(f"resuming: {len(results)} of {len(tasks)} shards were finished by an earlier run")
  try:
    new_results, rate, num_workers, extra_args = (run_tasks or run_locally)(todo, opts, log)
  except (OSError, shards.ShardWriteError) as e:
    # Disk full, a read-only or vanished folder: no traceback, no temp files left behind;
    # the finished shards stay for the resume.
    try:
      _clean_output(out, keep)
    except OSError:
      pass
    finished = sum(1 for t in tasks if storage.exists(storage.join(out, t.file)))
    raise ConvertError(f"{_io_error_text(e)}; {finished} of {len(tasks)} shards are finished and "
                       "kept: fix the cause (e.g. free disk space) and run the same command again "
                       "to resume") from None
  results += new_results

  manifest = _build_manifest(opts, found, classes, mapping, dropped, plan, results,
                             split_info, num_workers)
  manifest["args"].update(extra_args)
  if labelled is not None:
    _add_labels_manifest(manifest, labelled, items, opts)
  n_skip, n_found = manifest["num_skipped"], manifest["num_found"]
  if n_skip:
    log(f"skipped {n_skip} files:")
    for s in manifest["skipped"][:20]:
      log(f"  {s['path']}: {s['reason']}")
    if n_skip > 20:
      log(f"  ... and {n_skip - 20} more (all listed in {schema.MANIFEST_NAME})")
  if n_skip > opts.max_skipped_fraction * n_found:
    report = storage.join(out, "skipped.json")
    storage.write_bytes(report, json.dumps(manifest["skipped"], indent=1).encode())
    raise ConvertError(
        f"{n_skip} of {n_found} files could not be converted ({n_skip / n_found:.1%} > "
        f"--max_skipped_fraction={opts.max_skipped_fraction:g}); they are listed in {report}. "
        "Fix or remove them, or raise --max_skipped_fraction, and run again "
        "(finished shards are reused)")
  manifest["elapsed_s"] = round(time.monotonic() - t0, 2)
  manifest["images_per_sec"] = round(rate, 1)
  try:
    storage.write_bytes(schema.manifest_path(out), (json.dumps(manifest, indent=2) + "\n").encode())
  except OSError as e:
    raise ConvertError(f"{_io_error_text(e)}; every shard is finished: fix the cause and run the "
                       "same command again to write the manifest") from None
  _clean_output(out, keep)
  for name in (STATE_DIR, "skipped.json"):
    p = storage.join(out, name)
    if storage.exists(p):
      (storage.remove(p) if name.endswith(".json") else storage.rmtree(p))
  _write_tfds_metadata(out, manifest, log)
  return manifest


def _write_tfds_metadata(out: str, manifest: dict, log: Callable[[str], None]) -> None:
  """TFDS metadata beside dataset.json (tfrecord_tools.tfds_metadata); a failure costs only that."""
  try:
    tfds_metadata.write(out, manifest)
  except Exception as e:  # noqa: BLE001 - the conversion itself is complete and kept
    why = (str(e).splitlines() or [""])[0]
    log(f"warning: TFDS metadata not written ({type(e).__name__}: {why}); the converted data "
        "set itself is complete")


def _io_error_text(e: BaseException) -> str:
  """One line for an I/O error at write time (shards.write_error_text's wording)."""
  if isinstance(e, shards.ShardWriteError):
    return str(e)
  return shards.write_error_text(getattr(e, "filename", None) or "", e)


def run_locally(todo: list[ShardTask], opts: ConvertOptions, log) -> tuple[list, float, int, dict]:
  """Writes the unfinished shards with a local process pool (one shard per worker)."""
  if not todo:
    return [], 0.0, 0, {}
  num_workers = _resolve_workers(opts.num_workers)
  if not opts.num_workers:   # default: no process pool for small jobs (start-up would dominate)
    num_workers = max(1, min(num_workers, sum(len(t.items) for t in todo) // 100))
  progress = Progress(sum(len(t.items) for t in todo), quiet=opts.quiet)
  results = _run_tasks(todo, num_workers, progress, log)
  return results, progress.close(), num_workers, {}


def _build_manifest(opts, found, classes, mapping, dropped, plan, results, split_info,
                    num_workers) -> dict:
  by_file = {r["file"]: r for r in results}
  stats = shards.Stats()
  splits, skipped = {}, []
  for split, tasks in plan.items():
    rs = [by_file[t.file] for t in tasks]
    counts = {c: 0 for c in classes}
    patients = set()
    for r in rs:
      for c, n in r["class_counts"].items():
        counts[c] += n
      patients.update(r["patients"])
      skipped.extend(r["skipped"])
      stats.merge(r["stats"])
    splits[split] = {
        "num_examples": sum(r["num_examples"] for r in rs),
        "class_counts": counts,
        "num_groups": len(patients) if opts.group_regex or opts.group_by else None,
        "shards": [{"file": r["file"], "num_examples": r["num_examples"],
                    **({"sha256": r["sha256"]} if r.get("sha256") else {})} for r in rs],
    }
  skipped.extend(found.skipped)
  skipped.sort(key=lambda s: s["path"])
  num_converted = sum(s["num_examples"] for s in splits.values())
  args = dataclasses.asdict(opts)
  args.pop("quiet")
  for name, split in (("val_fraction", "val"), ("test_fraction", "test")):
    if args[name] == AUTO_FRACTION:   # record what was applied
      args[name] = 0.0 if split in found.splits else DEFAULT_FRACTION
  args["num_workers"] = num_workers
  args["num_shards"] = {sp: len(ts) for sp, ts in plan.items()}
  args["class_map_resolved"] = {c: sorted(s for s, t in mapping.items() if t == c)
                                for c in classes}
  args.update(split_info)
  return {
      "manifest_version": schema.MANIFEST_VERSION,
      "name": opts.name or os.path.basename(opts.output_dir.rstrip("/")) or "dataset",
      "tool": "tfrecord_tools.convert",
      "tool_version": __version__,
      "pixel_contract": pixels.CONTRACT_VERSION,   # tfrecord_tools.pixels: what the records hold
      "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
      "args": args,
      "classes": classes,
      "num_found": len(found.sources) + len(found.skipped),
      "num_converted": num_converted,
      "num_skipped": len(skipped),
      "num_dropped": sum(dropped.values()),
      "skipped": skipped,
      "dropped": dict(sorted(dropped.items())),
      "num_ignored": len(found.ignored),
      "ignored_examples": found.ignored[:20],
      "num_duplicates": sum(len(d) for d in found.duplicates),
      "duplicates": found.duplicates,          # identical files within a class, kept in one split
      "aliases": found.aliases,                # other paths to a converted file (not converted twice)
      "layout": found.layout,
      "splits": splits,
      "image_stats": stats.summary(),
  }


def summary_table(manifest: dict) -> str:
  """Per split and class counts as a small text table."""
  classes = manifest["classes"]
  w = max([5] + [len(c) for c in classes])
  lines = [f"{'split':<6} {'total':>7}  " + "  ".join(f"{c:>{w}}" for c in classes)]
  for sp, info in manifest["splits"].items():
    lines.append(f"{sp:<6} {info['num_examples']:>7}  "
                 + "  ".join(f"{info['class_counts'][c]:>{w}}" for c in classes))
  return "\n".join(lines)
