"""Stage 1, find: the input's image files as `Source`s, in a `Found`.

  find_files       input/<split>/<class>/**/* or input/<class>/**/* (local or
                   gs://): symlinks followed (every path listed, loops cut),
                   hidden files skipped, image-like files kept (by extension, or
                   DICOM's DICM preamble in a file without one), sorted by path;
                   what is no regular file (FIFO, device, socket) is never
                   opened: skipped with its reason. Names that are not UTF-8
                   are written escaped (storage.escape_name)
  find_keras_pair  the Keras TPU example's images.tfrec + paths.tfrec pair(s),
                   in input/ or input/<split>/; a path's parent folder is its class

Label CSVs (--labels_csv) find their images in `labelled` instead. Files
(local, gs:// through google-cloud-storage, other schemes through
tf.io.gfile) are read through tfrecord_tools.storage.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

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
  # Files skipped before conversion, with reasons: not regular files (set by `find_files`,
  # paths as found) and, set by `dedupe` (all paths as written), content conflicts;
  # paths that reach a file already listed (converted once); same-class identical contents.
  skipped: list[dict] = dataclasses.field(default_factory=list)
  aliases: list[dict] = dataclasses.field(default_factory=list)
  duplicates: list[list[str]] = dataclasses.field(default_factory=list)


# How many paths (of folder links) may reach one real folder: each is listed (`dedupe` then
# sorts out what they reach), but a link graph that multiplies the tree is refused.
MAX_FOLDER_PATHS = 16


def walk_files(root: str) -> list[str]:
  """Paths (relative to root, '/'-separated, written by `storage.escape_name`) of all
  non-hidden files, sorted; `source_path` turns one back into its file's path.

  Symbolic links are followed, to files and folders alike, and a folder reached by two
  paths is listed under both: `split.dedupe` then converts a file once (the other paths
  in `aliases`) and refuses the same file under two classes, so a link never moves a
  class's films into another class silently. Only a link back to a folder on the way down
  (an ancestor: a loop) is not entered. A folder reached through more than
  MAX_FOLDER_PATHS paths is a ConvertError (a link graph that multiplies the tree).
  """
  out = []
  reached: dict[str, list[str]] = {}   # real folder -> the paths that reached it
  # (raw relative path, path, its real path, the real paths of its ancestors)
  stack: list[tuple[str, str, str, tuple[str, ...]]] = [("", root, os.path.realpath(root), ())]
  while stack:
    rel_dir, path, real, ancestors = stack.pop()
    paths = reached.setdefault(real, [])
    paths.append(rel_dir)
    if len(paths) > MAX_FOLDER_PATHS:
      shown = ", ".join(storage.escape_name(p) for p in paths[:3])
      raise ConvertError(f"{root}: symbolic links reach the folder {storage.escape_name(real)} by "
                         f"more than {MAX_FOLDER_PATHS} paths (e.g. {shown}): remove the extra links")
    try:
      with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name)
    except OSError:
      continue   # an unreadable folder is left out (as os.walk does)
    chain = ancestors + (real,)
    for e in reversed(entries):   # popped in name order
      if e.name.startswith("."):
        continue
      rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
      try:
        is_dir = e.is_dir()   # follows links
      except OSError:
        is_dir = False
      if not is_dir:
        out.append(storage.escape_name(rel))
        continue
      sub_real = os.path.realpath(e.path)
      if sub_real not in chain:   # a link to an ancestor would loop
        stack.append((rel, e.path, sub_real, chain))
  return sorted(out)


def source_path(root: str, rel: str) -> str:
  """The file a relative path of `walk_files` (or of a remote listing) names."""
  if storage.is_remote(root):
    return storage.join(root, rel)
  return os.path.join(root, *storage.unescape_name(rel).split("/"))


def link_on_path(root: str, rel: str) -> str | None:
  """The first part of `rel` (a local relative path of `walk_files`) that is a symbolic
  link, as a relative path ('COVID/more_cases'); None when there is none."""
  if storage.is_remote(root):
    return None
  parts = rel.split("/")
  for i in range(1, len(parts) + 1):
    if os.path.islink(source_path(root, "/".join(parts[:i]))):
      return "/".join(parts[:i])
  return None


def is_image_name(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _is_unnamed_dicom(path: str) -> bool:
  """A (regular) file without an image extension that starts like DICOM (`IM0001`, UID names)."""
  try:
    return dicom.has_preamble(storage.read_input(path, 0, 132))
  except OSError:
    return False


def _top_level_dirs(root: str) -> list[str]:
  return sorted(storage.escape_name(d) for d in os.listdir(root)
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
  ignored, skipped, sources = [], [], []
  for rel in files:
    base = rel.rsplit("/", 1)[-1]
    image_name = is_image_name(base)
    if rel.count("/") + 1 < need or not (image_name or dicom.worth_probing(base)):
      ignored.append(rel)
      continue
    parts = rel.split("/")
    split = SPLIT_ALIASES[parts[0].lower()] if with_splits else ""
    path = source_path(input_dir, rel)
    # A FIFO, device or socket (itself or through a link) is never opened: an image name
    # makes it a counted skip with the reason; a name to probe for DICOM, an ignored file.
    try:
      st = listed[rel] if rel in listed else storage.stat_input(path)
    except storage.NotRegularFileError as e:
      if image_name:
        skipped.append({"path": rel, "reason": e.strerror, "split": split})
      else:
        ignored.append(rel)
      continue
    except OSError as e:
      ignored.append(rel)
      log(f"warning: cannot stat {rel}: {e.strerror or e}")
      continue
    if not image_name and not _is_unnamed_dicom(path):
      ignored.append(rel)
      continue
    cls = parts[1] if with_splits else parts[0]
    sources.append(Source(rel=rel, split=split, source_class=cls, path=path,
                          size=st[0], mtime_ns=st[1]))
  ignored.sort()
  if not sources:
    hint = ("expected input/<class>/<image> or input/<split>/<class>/<image>, e.g. "
            "input/NORMAL/1.png")
    what = "is empty" if not dirs and not ignored and not skipped else "has no image files"
    if skipped:
      what += f" ({len(skipped)} are not regular files, e.g. {skipped[0]['path']}: {skipped[0]['reason']})"
    raise ConvertError(f"input folder {input_dir} {what}: {hint}")
  splits = sorted({s.split for s in sources}, key=split_order)
  return Found(root=input_dir, sources=sources, layout="splits" if with_splits else "classes",
               splits=splits, ignored=ignored, skipped=skipped)


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
      paths = list(records.read_records(paths_path))
      with storage.open(img_path, "rb") as f:
        offsets = list(records.iter_offsets(f))
    except records.RecordFileError as e:
      raise ConvertError(str(e)) from None
    if len(paths) != len(offsets):
      raise ConvertError(f"{folder}: images.tfrec has {len(offsets)} records but paths.tfrec "
                         f"has {len(paths)}: not a matching pair")
    for i, (p, (offset, length)) in enumerate(zip(paths, offsets)):
      # Windows or POSIX separators; each part as storage.escape_name writes it.
      parts = [storage.escape_name(part) for part in p.replace(b"\\", b"/").rstrip(b"/").split(b"/")]
      if len(parts) < 2 or not parts[-2]:
        raise ConvertError(f"{paths_path} record {i}: path {storage.escape_name(p)!r} has no "
                           "parent folder to take the class from")
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
