"""One file API for local paths, gs:// and TensorFlow's other file systems.

Every file the project reads or writes itself goes through here: images found
by the converter, shards and dataset.json, inspect's grid, and everything in a
run directory (config.json, history.csv, checkpoints, TensorBoard logs,
model.keras, evaluation reports, exports).

  path                  backend
  ------------------    ---------------------------------------------------
  /local or relative    the os module (atomic writes: temp file + os.replace)
  gs://bucket/key       google-cloud-storage: Application Default Credentials,
                        anonymous access for public buckets when there are
                        none, and STORAGE_EMULATOR_HOST (a local emulator)
  other scheme://       tf.io.gfile (ram://, hdfs://, s3:// with a plugin);
                        TensorFlow is imported only for these

What still reads gs:// through TensorFlow's own file system: tf.data reading
TFRecord shards for training and evaluation (TFRecordDataset) and the
`--cache` file. TensorFlow 2.21's gs:// client has no endpoint setting, which
is why the project's own files do not go through it: with google-cloud-storage
the same code runs against a local emulator in the tests and against GCS in
production.

Keras and TensorFlow write checkpoints, SavedModels and event files to local
paths; for a gs:// folder they write to a local copy:

  `local_copy(path)`     a file or folder downloaded to a temp dir (read only)
  `staged_output(path)`  a temp folder uploaded to `path` when the block succeeds
  `Mirror(path)`         a local folder kept in step with a gs:// run directory:
                         pull() once at start, push() after every epoch

GCS objects appear only when their upload completes, so a write is atomic there
without a rename; a failed write uploads nothing.

Why one module of about 800 lines: every byte the project reads or writes itself
passes here, with the two rules that must hold at every door: what an input may be
(regular files only, reads bounded by their size: `open_input`) and how a file name is
written in every output (`escape_name`); split up, a new reader could bypass either.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fnmatch
import glob as glob_lib
import io
import os
import posixpath
import re
import shutil
import stat as stat_lib
import tempfile
import threading
from typing import IO, Iterator

from tfrecord_tools import errors

GCS_PREFIX = "gs://"


class StorageError(errors.UserError):
  """A storage problem the user can fix (credentials, missing bucket, access)."""


# --------------------------------------------------------------------------
# Path helpers.
# --------------------------------------------------------------------------


def is_remote(path: str) -> bool:
  """True for any "scheme://" path (gs://, ram://, ...)."""
  return "://" in path


def is_gcs(path: str) -> bool:
  return path.startswith(GCS_PREFIX)


def join(*parts: str) -> str:
  """Joins with '/' for remote paths (a trailing '/' on the root is not doubled)."""
  if is_remote(parts[0]):
    return posixpath.join(parts[0].rstrip("/"), *parts[1:])
  return os.path.join(*parts)


def dirname(path: str) -> str:
  return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(path)


def split_gcs(path: str) -> tuple[str, str]:
  """'gs://bucket/a/b' -> ('bucket', 'a/b'); the key has no leading or trailing '/'."""
  if not is_gcs(path):
    raise StorageError(f"{path} is not a gs:// path")
  bucket, _, key = path[len(GCS_PREFIX):].partition("/")
  if not bucket:
    raise StorageError(f"{path}: no bucket name (expected gs://BUCKET/PATH)")
  return bucket, key.strip("/")


# --------------------------------------------------------------------------
# File names as every output writes them.
# --------------------------------------------------------------------------

# A backslash that starts what reads as an escape (`\xHH`) in a name: escaped itself.
_LITERAL_ESCAPE = re.compile(rb"\\(?=x[0-9a-fA-F]{2})")
_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")


def escape_name(name: str | bytes) -> str:
  r"""A file name (or '/'-separated path) as text that every output can hold: records
  (image/filename, image/class/text), dataset.json, skipped lists, predict's CSV/JSON,
  serve's answers and log lines. The one rule (docs/faults.md, "File names"):

  - a name that is valid UTF-8 is written unchanged;
  - each byte that is not part of valid UTF-8 is written as `\xHH` (two lowercase hex
    digits: Python's "backslashreplace"). Linux gives such names to Python as str with
    surrogate escapes (os.fsencode's bytes); bytes are taken as they are;
  - so that this reverses, a backslash in the name itself that is followed by `x` and two
    hex digits is written as `\x5c` (only then: other backslashes are unchanged).

  `unescape_name` is the inverse: unescape_name(escape_name(n)) == n for every name.
  """
  raw = name if isinstance(name, bytes) else _name_bytes_raw(name)
  return _LITERAL_ESCAPE.sub(rb"\\x5c", raw).decode("utf-8", "backslashreplace")


def as_text(text: str) -> str:
  """Text that may hold a path as the os module gives it (argv, os.walk): unchanged when it
  is valid UTF-8, else `escape_name`'s text (for text that need not read back as a path)."""
  try:
    text.encode("utf-8")
    return text
  except UnicodeEncodeError:
    return escape_name(text)


def unescape_name(text: str) -> str:
  """The file name that `escape_name` wrote as `text`, as the os module takes it (bytes that
  are not UTF-8 as surrogate escapes)."""
  return name_bytes(text).decode("utf-8", "surrogateescape")


def name_bytes(text: str) -> bytes:
  r"""The file system's bytes of a name that `escape_name` wrote as `text` (each `\xHH`
  back to its byte). Hashes of names are taken of these bytes, so they do not depend on
  how a name is written."""
  return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), _name_bytes_raw(text))


def _name_bytes_raw(name: str) -> bytes:
  try:
    return name.encode("utf-8", "surrogateescape")   # os.fsencode's bytes on Linux
  except UnicodeEncodeError:   # a lone surrogate no file system gave: never fail
    return name.encode("utf-8", "backslashreplace")


def _tf_gfile():
  import tensorflow as tf  # noqa: PLC0415 - only for non-gs:// remote schemes
  return tf.io.gfile


# --------------------------------------------------------------------------
# The GCS client: one per process, errors turned into one-line messages.
# --------------------------------------------------------------------------

_CLIENT = None
_CLIENT_PID = -1
_CLIENT_LOCK = threading.Lock()


def _client():
  global _CLIENT, _CLIENT_PID
  with _CLIENT_LOCK:
    if _CLIENT is None or _CLIENT_PID != os.getpid():
      try:
        from google.cloud import storage as gcs  # noqa: PLC0415
      except ImportError as e:
        raise StorageError("gs:// paths need the google-cloud-storage package "
                           "(pip install google-cloud-storage)") from e
      import google.auth.exceptions  # noqa: PLC0415
      try:
        _CLIENT = gcs.Client()
      except (google.auth.exceptions.DefaultCredentialsError, OSError):
        # No credentials: public buckets still read; writes report access denied.
        _CLIENT = gcs.Client.create_anonymous_client()
      _CLIENT_PID = os.getpid()
    return _CLIENT


def reset_client() -> None:
  """Forgets the client (after STORAGE_EMULATOR_HOST or credentials change)."""
  global _CLIENT
  with _CLIENT_LOCK:
    _CLIENT = None


@contextlib.contextmanager
def _gcs_errors(path: str):
  """google-cloud-storage exceptions -> FileNotFoundError / StorageError."""
  from google.api_core import exceptions as gexc  # noqa: PLC0415
  import google.auth.exceptions  # noqa: PLC0415
  try:
    yield
  except gexc.NotFound as e:
    if "bucket" in str(e).lower():
      raise StorageError(f"{path}: the bucket does not exist") from None
    raise FileNotFoundError(f"{path}: no such file") from None
  except (gexc.Forbidden, gexc.Unauthorized) as e:
    raise StorageError(f"{path}: access denied ({getattr(e, 'message', e)}); check the "
                       "credentials (gcloud auth application-default login or "
                       "GOOGLE_APPLICATION_CREDENTIALS)") from None
  except google.auth.exceptions.GoogleAuthError as e:
    raise StorageError(f"{path}: Google Cloud credentials problem ({e})") from None
  except gexc.GoogleAPIError as e:
    raise StorageError(f"{path}: {type(e).__name__}: {e}") from None
  except (ConnectionError, OSError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    host = os.environ.get("STORAGE_EMULATOR_HOST", "storage.googleapis.com")
    raise StorageError(f"{path}: cannot reach {host} ({type(e).__name__})") from None


def _bucket(path: str):
  name, key = split_gcs(path)
  return _client().bucket(name), key


def _blob(path: str):
  bucket, key = _bucket(path)
  if not key:
    raise StorageError(f"{path} names a bucket, not a file")
  return bucket.blob(key)


def _list(path: str, *, recursive: bool = True, max_results: int | None = None):
  """(blobs, sub-folder names) under the folder `path` on GCS."""
  bucket, key = _bucket(path)
  prefix = key + "/" if key else ""
  with _gcs_errors(path):
    it = _client().list_blobs(bucket, prefix=prefix, delimiter=None if recursive else "/",
                              max_results=max_results)
    blobs = list(it)
    folders = sorted(p[len(prefix):].rstrip("/") for p in it.prefixes)
  return [b for b in blobs if not b.name.endswith("/")], folders


def _mtime_ns(blob) -> int:
  updated = blob.updated or datetime.datetime.now(datetime.timezone.utc)
  return int(updated.timestamp() * 1e9)


# --------------------------------------------------------------------------
# Queries.
# --------------------------------------------------------------------------


def exists(path: str) -> bool:
  """A file or a folder (on GCS: an object, or a prefix with objects under it)."""
  if is_gcs(path):
    bucket, key = _bucket(path)
    with _gcs_errors(path):
      if not key:
        return bucket.exists()
      if bucket.blob(key).exists():
        return True
    return isdir(path)
  if is_remote(path):
    return _tf_gfile().exists(path)
  return os.path.exists(path)


def isdir(path: str) -> bool:
  if is_gcs(path):
    bucket, key = _bucket(path)
    if not key:
      with _gcs_errors(path):
        return bucket.exists()
    blobs, folders = _list(path, recursive=False, max_results=1)
    if blobs or folders:
      return True
    with _gcs_errors(path):   # an empty "folder" made by the console
      return bucket.blob(key + "/").exists()
  if is_remote(path):
    return _tf_gfile().isdir(path)
  return os.path.isdir(path)


def listdir(path: str) -> list[str]:
  """Names (files and folders, no trailing '/') directly in the folder `path`."""
  if is_gcs(path):
    blobs, folders = _list(path, recursive=False)
    _, key = split_gcs(path)
    cut = len(key) + 1 if key else 0
    return sorted({b.name[cut:] for b in blobs if b.name[cut:]} | set(folders))
  if is_remote(path):
    return sorted(p.rstrip("/") for p in _tf_gfile().listdir(path))
  return sorted(os.listdir(path))


def walk_files(root: str) -> list[tuple[str, int, int]]:
  """(relative '/'-separated path, size, mtime_ns) of every file under `root`.

  On GCS this is one prefix listing (pages of 1000 objects), not a request
  per folder.
  """
  out = []
  if is_gcs(root):
    blobs, _ = _list(root)
    _, key = split_gcs(root)
    cut = len(key) + 1 if key else 0
    return sorted((b.name[cut:], int(b.size or 0), _mtime_ns(b)) for b in blobs)
  if is_remote(root):
    gf = _tf_gfile()
    for folder, _, files in gf.walk(root):
      for name in files:
        full = join(folder, name)
        st = gf.stat(full)
        out.append((full[len(root.rstrip("/")) + 1:], st.length, st.mtime_nsec))
    return sorted(out)
  for folder, dirs, files in os.walk(root):
    dirs.sort()
    for name in files:
      full = os.path.join(folder, name)
      st = os.stat(full)
      out.append((os.path.relpath(full, root).replace(os.sep, "/"), st.st_size, st.st_mtime_ns))
  return sorted(out)


def stat(path: str) -> tuple[int, int]:
  """(size, mtime_ns) of a file."""
  if is_gcs(path):
    blob = _blob(path)
    with _gcs_errors(path):
      blob.reload()
    return int(blob.size or 0), _mtime_ns(blob)
  if is_remote(path):
    st = _tf_gfile().stat(path)
    return st.length, st.mtime_nsec
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns


def glob(pattern: str) -> list[str]:
  """Files matching a pattern whose wildcards are in its path segments ('*', '?', '[]').

  On GCS: one listing under the part before the first wildcard; '*' does not
  cross '/'. Folders are not returned on GCS.
  """
  if is_gcs(pattern):
    bucket, key = split_gcs(pattern)
    first = min([i for i in (key.find(c) for c in "*?[") if i >= 0], default=len(key))
    base = key[:first].rpartition("/")[0]
    blobs, _ = _list(f"{GCS_PREFIX}{bucket}/{base}" if base else f"{GCS_PREFIX}{bucket}")
    parts = key.split("/")
    return sorted(f"{GCS_PREFIX}{bucket}/{b.name}" for b in blobs
                  if len(b.name.split("/")) == len(parts)
                  and all(fnmatch.fnmatchcase(n, p) for n, p in zip(b.name.split("/"), parts)))
  if is_remote(pattern):
    return sorted(_tf_gfile().glob(pattern))
  return sorted(glob_lib.glob(pattern))


# --------------------------------------------------------------------------
# Reading and writing.
# --------------------------------------------------------------------------


class _GcsWriter(io.RawIOBase):
  """Spools writes to a local temp file and uploads it in one go on close.

  A `with` block that raises uploads nothing, so a half-written object never
  appears under its final name.
  """

  def __init__(self, path: str, content_type: str | None = None):
    super().__init__()
    self.path, self.content_type = path, content_type
    self._blob = _blob(path)
    self._tmp = tempfile.TemporaryFile(prefix="xraytpu-upload-")
    self._discard = False

  def writable(self) -> bool:
    return True

  def write(self, b) -> int:
    return self._tmp.write(b)

  def discard(self) -> None:
    self._discard = True

  def close(self) -> None:
    if self.closed:
      return
    try:
      if not self._discard:
        self._tmp.flush()
        self._tmp.seek(0)
        with _gcs_errors(self.path):
          self._blob.upload_from_file(self._tmp, rewind=True, content_type=self.content_type)
    finally:
      self._tmp.close()
      super().close()

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      self.discard()
    return super().__exit__(exc_type, exc, tb)


class _GcsTextWriter(io.TextIOWrapper):
  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      self.buffer.raw.discard()
    return super().__exit__(exc_type, exc, tb)


def open(path: str, mode: str = "rb") -> IO:  # noqa: A001 - the module's file opener
  """A file object: modes "rb", "wb", "r", "w" (text is UTF-8).

  Writing a local file is not atomic here (use write_bytes/write_text, or
  write a temp name and `rename`); on GCS it is.
  """
  if mode not in ("rb", "wb", "r", "w"):
    raise ValueError(f"storage.open: unsupported mode {mode!r}")
  if is_gcs(path):
    if "w" in mode:
      raw = _GcsWriter(path)
      return raw if mode == "wb" else _GcsTextWriter(io.BufferedWriter(raw), encoding="utf-8")
    blob = _blob(path)
    with _gcs_errors(path):
      blob.reload()     # raises FileNotFoundError now rather than at the first read
      return blob.open("rb" if mode == "rb" else "rt", **({} if mode == "rb" else {"encoding": "utf-8"}))
  if is_remote(path):
    return _tf_gfile().GFile(path, mode)
  return io.open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def read_bytes(path: str, offset: int = -1, size: int = -1) -> bytes:
  """The whole file, or `size` bytes from `offset`."""
  if is_gcs(path):
    blob = _blob(path)
    with _gcs_errors(path):
      if offset >= 0:
        return blob.download_as_bytes(start=offset, end=offset + size - 1) if size > 0 else b""
      return blob.download_as_bytes()
  with open(path, "rb") as f:
    if offset >= 0:
      f.seek(offset)
      return f.read(size)
    return f.read()


class NotRegularFileError(OSError, errors.UserError):
  """An input path that is no regular file (a named pipe, a device, a socket, a folder),
  itself or where its symbolic links lead: never opened (a FIFO would wait for a writer
  forever, /dev/zero never ends). str(e) and e.strerror: "not a regular file (...)".
  An OSError (callers that skip unreadable inputs skip it too) and a UserError (one line
  when it reaches the entry point)."""

  def __str__(self) -> str:
    return self.strerror


_KINDS = ((stat_lib.S_ISFIFO, "a named pipe"), (stat_lib.S_ISCHR, "a character device"),
          (stat_lib.S_ISBLK, "a block device"), (stat_lib.S_ISSOCK, "a socket"),
          (stat_lib.S_ISDIR, "a folder"))


def _check_regular(path: str, st: os.stat_result) -> os.stat_result:
  """The one check of an input file: a regular file, or NotRegularFileError naming its kind."""
  if stat_lib.S_ISREG(st.st_mode):
    return st
  kind = next((k for test, k in _KINDS if test(st.st_mode)), "a special file")
  via = ", through a symbolic link" if os.path.islink(path) else ""
  raise NotRegularFileError(errno.EINVAL, f"not a regular file ({kind}{via})", path)


def stat_input(path: str) -> tuple[int, int]:
  """(size, mtime_ns) of an input file (an image to convert or predict), links followed;
  NotRegularFileError for a FIFO, device, socket or folder. Remote paths: `stat`."""
  if is_remote(path):
    return stat(path)
  st = _check_regular(path, os.stat(path))
  return st.st_size, st.st_mtime_ns


def open_input(path: str) -> IO[bytes]:
  """An input file opened for reading ("rb"), checked by `stat_input`'s rule on the opened
  file itself: opened without waiting (O_NONBLOCK: a FIFO would wait for a writer), then
  refused unless it is a regular file, so a file swapped after a check is caught too."""
  if is_remote(path):
    return open(path, "rb")
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
  except OSError:   # a socket cannot be opened at all (ENXIO): say what it is
    try:
      st = os.stat(path)
    except OSError:
      st = None
    if st is not None:
      _check_regular(path, st)
    raise
  try:
    _check_regular(path, os.fstat(fd))
    if hasattr(os, "set_blocking"):
      os.set_blocking(fd, True)
    return io.open(fd, "rb")
  except BaseException:
    os.close(fd)
    raise


def read_input(path: str, offset: int = -1, size: int = -1) -> bytes:
  """An input file's bytes (`read_bytes`'s arguments), through `open_input`: never more than
  the file's size when opened, so no read waits or grows forever."""
  if is_remote(path):
    return read_bytes(path, offset, size)
  with open_input(path) as f:
    limit = os.fstat(f.fileno()).st_size
    if offset >= 0:
      f.seek(offset)
      limit = max(0, min(size if size >= 0 else limit, limit - offset))
    return f.read(limit)


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
  """Writes `path` atomically: readers see the old file or the whole new one.

  Local: a temp file in the same folder (parents created), then os.replace.
  GCS: one upload (objects appear only when complete). Other schemes: temp
  name + rename through tf.io.gfile.
  """
  if is_gcs(path):
    with _gcs_errors(path):
      _blob(path).upload_from_string(data)
    return
  tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
  if is_remote(path):
    gf = _tf_gfile()
    with gf.GFile(tmp, "wb") as f:
      f.write(data)
    gf.rename(tmp, path, overwrite=True)
    return
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  try:
    with io.open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def create_exclusive(path: str, data: bytes) -> int | None:
  """gs:// only: writes the object only if it does not exist yet (generation precondition 0).

  Returns the new object's generation, or None when the object already exists.
  """
  from google.api_core import exceptions as gexc  # noqa: PLC0415
  blob = _blob(path)
  try:
    with _gcs_errors(path):
      try:
        blob.upload_from_string(data, if_generation_match=0)
      except gexc.PreconditionFailed:
        return None
  except StorageError as e:
    if "PreconditionFailed" in str(e) or "412" in str(e):
      return None
    raise
  return int(blob.generation) if blob.generation is not None else 0


def read_with_generation(path: str) -> tuple[bytes, int] | None:
  """gs:// only: (content, generation) of an object, or None when it does not exist."""
  blob = _blob(path)
  try:
    with _gcs_errors(path):
      data = blob.download_as_bytes()
  except FileNotFoundError:
    return None
  return data, int(blob.generation or 0)


def delete_if_generation(path: str, generation: int) -> bool:
  """gs:// only: deletes the object if it is still at `generation`; False if it changed or is gone."""
  from google.api_core import exceptions as gexc  # noqa: PLC0415
  blob = _blob(path)
  try:
    with _gcs_errors(path):
      try:
        blob.delete(if_generation_match=generation)
      except (gexc.PreconditionFailed, gexc.NotFound):
        return False
  except (StorageError, FileNotFoundError):
    return False
  return True


def makedirs(path: str) -> None:
  """Creates a local folder and its parents; GCS has no folders (a no-op)."""
  if is_gcs(path):
    return
  if is_remote(path):
    _tf_gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  if is_gcs(path):
    with _gcs_errors(path):
      _blob(path).delete()
  elif is_remote(path):
    _tf_gfile().remove(path)
  else:
    os.remove(path)


def rmtree(path: str) -> None:
  """Removes a folder and everything under it (a missing folder is fine)."""
  if is_gcs(path):
    blobs, _ = _list(path)
    bucket, key = _bucket(path)
    with _gcs_errors(path):
      for b in blobs:
        b.delete()
      placeholder = bucket.blob(key + "/") if key else None
      if placeholder is not None and placeholder.exists():
        placeholder.delete()
  elif is_remote(path):
    if _tf_gfile().exists(path):
      _tf_gfile().rmtree(path)
  elif os.path.isdir(path):
    shutil.rmtree(path)


def remove_any(path: str) -> None:
  """Removes a file or a folder if it exists."""
  if isdir(path):
    rmtree(path)
  elif exists(path):
    remove(path)


def rename(src: str, dst: str) -> None:
  """Moves a file, replacing `dst` (GCS: server-side copy, then delete)."""
  if is_gcs(src) or is_gcs(dst):
    if not (is_gcs(src) and is_gcs(dst)):
      raise StorageError(f"cannot rename {src} to {dst}: use upload/download between file systems")
    blob = _blob(src)
    dst_bucket, dst_key = _bucket(dst)
    with _gcs_errors(src):
      blob.bucket.copy_blob(blob, dst_bucket, dst_key)
      blob.delete()
  elif is_remote(src):
    _tf_gfile().rename(src, dst, overwrite=True)
  else:
    os.replace(src, dst)


# --------------------------------------------------------------------------
# Moving whole files and folders between a local disk and GCS.
# --------------------------------------------------------------------------


def upload_file(local: str, path: str) -> None:
  if is_gcs(path):
    with _gcs_errors(path):
      _blob(path).upload_from_filename(local)
  else:
    with io.open(local, "rb") as f:
      write_bytes(path, f.read())


def download_file(path: str, local: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
  tmp = f"{local}.tmp-{os.getpid()}"
  if is_gcs(path):
    with _gcs_errors(path):
      _blob(path).download_to_filename(tmp)
  else:
    with io.open(tmp, "wb") as f:
      f.write(read_bytes(path))
  os.replace(tmp, local)


def _needs_copy(path: str) -> bool:
  """Keras / TensorFlow read this path through a local copy (GCS only)."""
  return is_gcs(path)


@contextlib.contextmanager
def local_copy(path: str, *, exclude: tuple[str, ...] = ()) -> Iterator[str]:
  """A local path holding `path` (a file, or a folder with everything under it).

  Local and TensorFlow-scheme paths are yielded as they are. A gs:// path is
  downloaded to a temp dir that is removed afterwards; `exclude` lists
  relative folder prefixes to skip (e.g. ("backup/", "logs/")).
  """
  if not _needs_copy(path):
    yield path
    return
  tmp = tempfile.mkdtemp(prefix="xraytpu-gcs-")
  try:
    name = posixpath.basename(path.rstrip("/")) or "root"
    local = os.path.join(tmp, name)
    if isdir(path):
      Mirror(path, local).pull(exclude=exclude)
    else:
      download_file(path, local)
    yield local
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_output(path: str, *, last: tuple[str, ...] = ()) -> Iterator[str]:
  """A local folder for a writer that needs one; uploaded to `path` on success.

  Local and TensorFlow-scheme paths are yielded as they are. For gs://, the
  files appear under `path` only after the block completed without error, and
  files named in `last` (e.g. "saved_model.pb") are uploaded after the rest,
  so a watcher that waits for them never sees a half-uploaded folder.
  """
  if not _needs_copy(path):
    yield path
    return
  tmp = tempfile.mkdtemp(prefix="xraytpu-stage-")
  try:
    local = os.path.join(tmp, posixpath.basename(path.rstrip("/")) or "out")
    os.makedirs(local)
    yield local
    Mirror(path, local).push(last=last)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


class Mirror:
  """A local folder standing in for a folder on GCS.

  pull() downloads the remote files; push() uploads local files that are new
  or changed since the last pull/push and deletes remote files this mirror
  knew and that are gone locally (files written there by others are kept).
  For local and TensorFlow-scheme paths there is nothing to mirror: `local`
  is the path itself and pull/push do nothing. `read_only = True` turns push
  into a no-op (a non-chief training worker).
  """

  def __init__(self, remote: str, local: str | None = None):
    self.remote = remote.rstrip("/")
    self.active = _needs_copy(remote)
    self.read_only = False
    self._own_tmp = None
    if not self.active:
      self.local = remote
    elif local is None:
      self._own_tmp = tempfile.mkdtemp(prefix="xraytpu-run-")
      self.local = self._own_tmp
    else:
      self.local = local
    self._synced: dict[str, tuple[int, int]] = {}   # rel -> local (size, mtime_ns) at last sync

  def _local_state(self) -> dict[str, tuple[int, int]]:
    if not os.path.isdir(self.local):
      return {}
    return {rel: (size, mtime) for rel, size, mtime in walk_files(self.local)
            if ".tmp-" not in rel.rsplit("/", 1)[-1]}

  def pull(self, exclude: tuple[str, ...] = ()) -> int:
    """Downloads every remote file (but those under `exclude` prefixes); returns the count."""
    if not self.active:
      return 0
    os.makedirs(self.local, exist_ok=True)
    n = 0
    if exists(self.remote):
      for rel, _, _ in walk_files(self.remote):
        if any(rel.startswith(p) for p in exclude):
          continue
        download_file(f"{self.remote}/{rel}", os.path.join(self.local, *rel.split("/")))
        n += 1
    self._synced = self._local_state()
    return n

  def push(self, last: tuple[str, ...] = ()) -> tuple[int, int]:
    """Uploads what changed, deletes what was removed; returns (files uploaded, deleted).

    Files whose name is in `last` are uploaded after all others.
    """
    if not self.active or self.read_only:
      return 0, 0
    now = self._local_state()
    changed = sorted((rel for rel, st in now.items() if self._synced.get(rel) != st),
                     key=lambda rel: (rel.rsplit("/", 1)[-1] in last, rel))
    gone = [rel for rel in self._synced if rel not in now]
    for rel in changed:
      upload_file(os.path.join(self.local, *rel.split("/")), f"{self.remote}/{rel}")
    for rel in gone:
      try:
        remove(f"{self.remote}/{rel}")
      except FileNotFoundError:
        pass
    self._synced = now
    return len(changed), len(gone)

  def close(self) -> None:
    if self._own_tmp:
      shutil.rmtree(self._own_tmp, ignore_errors=True)
      self._own_tmp = None
