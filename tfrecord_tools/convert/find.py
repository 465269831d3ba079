"""Stage 1, find: the input's image files as `Source`s, in a `Found`.

  find_files       input/<split>/<class>/**/* or input/<class>/**/* (local or
                   gs://): symlinks followed (no folder entered twice), hidden
                   files skipped, image-like files kept (by extension, or
                   DICOM's DICM preamble in a file without one), sorted by path
  find_keras_pair  the Keras TPU example's images.tfrec + paths.tfrec pair(s),
                   in input/ or input/<split>/; a path's parent folder is its class

Label CSVs (--labels_csv) find their images in `labelled` instead. Files
(local, gs:// through google-cloud-storage, other schemes through
tf.io.gfile) are read through tfrecord_tools.storage.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Sequence

from tfrecord_tools import dicom, records, schema, storage
from tfrecord_tools.convert.options import SPLIT_ALIASES, ConvertError, log
from tfrecord_tools.shards import Source


IMAGE_EXTENSIONS = frozenset({
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".tif", ".tiff",
    ".webp", ".pgm", ".ppm", ".pnm", ".dcm", ".dicom"})
KERAS_PAIR = ("images.tfrec", "paths.tfrec")


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


def walk_files(root: str) -> Iterable[str]:
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


def is_image_name(name: str) -> bool:
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
    files, dirs = walk_files(input_dir), _top_level_dirs(input_dir)
  with_splits = _split_layout(input_dir, dirs)
  need = 3 if with_splits else 2   # split/class/file or class/file
  ignored, wanted = [], []
  for rel in files:
    ok = rel.count("/") + 1 >= need and (is_image_name(rel.rsplit("/", 1)[-1])
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
      log(f"warning: cannot stat {rel}: {st}")
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
  splits = sorted({s.split for s in sources}, key=split_order)
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
  splits = sorted({s.split for s in sources}, key=split_order)
  return Found(root=input_dir, sources=sources,
               layout="splits" if splits != [""] else "classes",
               splits=splits, ignored=[])


def split_order(split: str) -> int:
  return schema.SPLITS.index(split) if split in schema.SPLITS else -1
