"""The one user-error base class of tfrecord_tools, and the one wording of a failed write.

Every error a user can cause (a bad flag, a missing folder, a corrupt file
named on the command line) is a subclass of `UserError`. The shared entry-point
runner (`tfrecord_tools.cli`) catches it once and prints one line; anything
else is a bug and keeps its traceback.

An output that cannot be written is a fault of the machine the user must fix,
not a bug: `os_error_line(e)` is its one line, `cannot write PATH: <cause>
(<ERRNO>); <what to do>`, for an `OSError` whose errno is in `WRITE_HINTS`
(permission denied, read-only file system, disk full, quota exceeded, file too
large). The runner prints it with exit code 2 for every command, whichever
library call wrote; other OSErrors (a missing input: ENOENT) keep their own
message or traceback. `write_error_text(path, e)` is the same wording for code
that catches the error itself (the converter's shards).
"""

from __future__ import annotations

import errno
import os
import re


class UserError(ValueError):
  """A mistake the user can fix; its message is one line meant for them."""


class ImageError(UserError):
  """The bytes are not a usable image; `reason` is a short human-readable cause."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


_NOT_WRITABLE = ("this user may not write there: choose another output folder, or fix the "
                 "folder's permissions")
# The errnos of a write the user's machine refused, and what to do about each.
WRITE_HINTS = {
    errno.EACCES: _NOT_WRITABLE,
    errno.EPERM: _NOT_WRITABLE,
    errno.EROFS: "the file system is read-only: write the output somewhere else",
    errno.ENOSPC: "the disk is full: free space there, or write the output somewhere else",
    errno.EDQUOT: "the disk quota is used up: free space, or write the output somewhere else",
    errno.EFBIG: "the file is larger than this file system allows: write it somewhere else",
}
# A temp file or folder of an atomic write (tfrecord_tools.storage: "PATH.tmp-PID-THREAD",
# the converter's shards "PATH.tmp-PIDTHREAD", export's "ROOT/.tmp-VERSION-PID"): the error
# names the output the user asked for instead.
_TMP_SUFFIX = re.compile(r"\.tmp-[0-9-]+$")
_TMP_FOLDER = re.compile(r"(^|[/\\])\.tmp-[0-9-]+([/\\].*)?$")


def _output_path(path) -> str:
  """The path a user asked to write, for a temp path of an atomic write."""
  text = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
  text = _TMP_FOLDER.sub("", text) or text
  return _TMP_SUFFIX.sub("", text)


def write_error_text(path, e: OSError, *, hint: bool = False) -> str:
  """'cannot write PATH: No space left on device (ENOSPC)', and with hint=True '; <what to do>'."""
  code = errno.errorcode.get(getattr(e, "errno", None) or -1)
  where = f" {_output_path(path)}" if path else ""
  text = f"cannot write{where}: {getattr(e, 'strerror', None) or e}" + (f" ({code})" if code else "")
  if hint and getattr(e, "errno", None) in WRITE_HINTS:
    text += f"; {WRITE_HINTS[e.errno]}"
  return text


def write_failure(e: BaseException, codes: tuple[int, ...] = tuple(WRITE_HINTS)) -> OSError | None:
  """The OS error behind a failed write, when its cause is one of `codes`; else None.

  Writers report it three ways: an OSError with its errno (Python's files), an OSError
  without one whose text names it (h5py: "errno = 28, error message = 'No space left on
  device'"), and a TensorFlow error whose text names it (the TensorBoard event writer,
  tf.train.Checkpoint, tf.saved_model.save: "...; No space left on device"). The second
  and third become an OSError(errno, strerror, filename), the file name taken from the
  text when the error has none."""
  if isinstance(e, OSError) and getattr(e, "errno", None) in codes:
    return e
  if not isinstance(e, OSError) and not type(e).__module__.startswith("tensorflow"):
    return None
  text = str(e)
  for code in codes:
    if os.strerror(code) in text or f"errno = {code}," in text:
      name = getattr(e, "filename", None)
      return OSError(code, os.strerror(code), name if name is not None else _path_in(text, code))
  return None


def _path_in(text: str, code: int) -> str | None:
  """The file a writer's message names: the path just before its cause (TensorFlow:
  ".../part-00000...tempstate123; No space left on device", "NewWriteableFile: /runs/x : Permission
  denied"), h5py's "name = '/runs/x/best.weights.h5'", else the first absolute or gs:// path
  that is not part of a TensorFlow device name ("/job:localhost/...")."""
  for pattern in (r"""((?:gs://|/)[^\s;'"(),{}]+?)\s*[;:]\s*""" + re.escape(os.strerror(code)),
                  r"""name = '([^']+)'""",
                  r"""(?<![\w:/])((?:gs://|/)[^\s;:'"(),{}]+)"""):
    found = re.search(pattern, text)
    if found:
      return found.group(1)
  return None


def _unreadable(path) -> bool:
  """True when `path` exists and this process may not read it (a permission error on a read)."""
  try:
    return os.path.lexists(path) and not os.access(path, os.R_OK)
  except (TypeError, ValueError, OSError):
    return False


def os_error_line(e: BaseException) -> str | None:
  """The one line for a write the machine refused (module docstring; `write_failure`), or None.

  None (the caller re-raises: a traceback) for anything else: other errnos (a missing
  input keeps its own message), or a permission error that names no file (nothing
  to tell the user). A permission error on a file that exists and cannot be read is
  a failed read: 'cannot read PATH: Permission denied (EACCES); ...'.
  """
  cause = write_failure(e)
  if cause is None:
    return None
  path = cause.filename2 if cause.filename2 is not None else cause.filename
  if cause.errno in (errno.EACCES, errno.EPERM):
    if path is None:
      return None
    if cause.filename2 is None and _unreadable(path):
      code = errno.errorcode[cause.errno]
      return (f"cannot read {os.fsdecode(path)}: {cause.strerror or cause} ({code}); this user "
              "may not read it: fix its permissions or copy it somewhere readable")
  return write_error_text(path, cause, hint=True)
