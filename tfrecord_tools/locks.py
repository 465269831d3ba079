"""One process owns an output: a run directory or a conversion's output folder.

`with locks.exclusive(folder, what="training"):` holds the folder's lock file
(LOCK_NAME) for the duration, or fails at once with one line naming the
holder (host, PID, start time, command).

  local folders  an OS lock (fcntl.flock) on FOLDER/.xraytpu.lock, which also
                 holds the holder's description, removed on release. The kernel
                 drops the lock when its process dies, so after kill -9 the next
                 run takes it over: that is a resume.
  gs://          a lock object FOLDER/.xraytpu.lock created with the generation
                 precondition if_generation_match=0 (google-cloud-storage), so
                 exactly one creator wins; it is deleted, with the generation
                 it was written at, on release. A lock left by a dead process
                 on THIS host is taken over (the PID is checked); one left on
                 another host needs `gsutil rm` after checking that its
                 holder is gone, as the message says.

A folder where the lock cannot be created (read-only, a full disk, a quota) raises
the OSError, which the entry-point runner prints as one line naming the lock file
(tfrecord_tools.errors.os_error_line).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
from typing import Iterator

from tfrecord_tools import errors, storage

LOCK_NAME = ".xraytpu.lock"


class LockHeld(errors.UserError):
  """Another process owns the folder."""


def _holder(what: str) -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(), "what": what,
          "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
          "command": " ".join(sys.argv)[:300]}


def describe(holder: dict | None) -> str:
  if not holder:
    return "another process (no description in the lock)"
  return (f"{holder.get('what', 'a job')} on host {holder.get('host')}, PID {holder.get('pid')}, "
          f"started {holder.get('started')}")


def _parse(data: bytes) -> dict | None:
  try:
    d = json.loads(data.decode("utf-8"))
    return d if isinstance(d, dict) else None
  except (UnicodeDecodeError, ValueError):
    return None


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, TypeError):
    return True
  return True


@contextlib.contextmanager
def exclusive(folder: str, what: str) -> Iterator[None]:
  """Holds FOLDER's lock while the block runs; LockHeld (one line) if another process has it."""
  if storage.is_gcs(folder):
    with _gcs_lock(folder, what):
      yield
  elif storage.is_remote(folder):   # other TF file systems: no atomic create; best effort
    yield
  else:
    with _local_lock(folder, what):
      yield


def _acquire_local(path: str, folder: str) -> int:
  """An fd holding the flock on the lock file now at `path` (retrying if the file was
  replaced between open and lock); LockHeld when another process holds it."""
  import fcntl  # noqa: PLC0415 - POSIX
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _parse(os.pread(fd, 4096, 0))
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      raise LockHeld(f"{folder} is in use by {describe(holder)}: wait for it to finish, or "
                     "stop it (a killed process releases the lock)") from None
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      return fd
    os.close(fd)   # the holder removed it on release while we opened it: try the new one


@contextlib.contextmanager
def _local_lock(folder: str, what: str) -> Iterator[None]:
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, LOCK_NAME)
  fd = _acquire_local(path, folder)
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder(what)).encode(), 0)
    yield
  finally:
    # Removed while still held, so a waiting process never locks a file on its way out.
    try:
      os.remove(path)
    except OSError:   # gone, or the folder became read-only: the kernel drops the lock anyway
      pass
    os.close(fd)


@contextlib.contextmanager
def _gcs_lock(folder: str, what: str) -> Iterator[None]:
  path = storage.join(folder, LOCK_NAME)
  me = _holder(what)
  data = json.dumps(me).encode()
  generation = storage.create_exclusive(path, data)
  if generation is None:
    current = storage.read_with_generation(path)
    holder = _parse(current[0]) if current else None
    here = holder and holder.get("host") == me["host"] and not _pid_alive(holder.get("pid"))
    if current is None or (here and storage.delete_if_generation(path, current[1])):
      generation = storage.create_exclusive(path, data)   # the dead holder's lock is taken over
    if generation is None:
      raise LockHeld(f"{folder} is in use by {describe(holder)}: wait for it to finish; if that "
                     f"process is gone, delete {path} and run again")
  try:
    yield
  finally:
    storage.delete_if_generation(path, generation)
