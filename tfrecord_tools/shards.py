"""One shard: its planned images, how each becomes a record, how it is written and resumed.

The one shard writer of both runners. The local converter calls
`write_shard(task)` in its worker processes; the Beam runner converts each
image on any worker (`convert_item`) and hands a shard's outcomes, in plan
order, to `write_records` (the function `write_shard` is built on):

  convert_item    a planned image -> (serialised Example, its statistics),
                  or (None, why it is skipped)
  write_records   the outcomes -> TFRecord framing into `<shard>.tmp-N`, the
                  statistics to `.convert-state/<shard>.json`, then the rename
                  to `<shard>`: a shard under its final name always has them
  load_finished   those statistics of an identical shard an earlier (killed)
                  run finished, for the resume

Same plan -> the same bytes, whichever runner and however many workers.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import threading
import warnings
from concurrent import futures
from typing import Any, Iterable

from tfrecord_tools import errors, pixels, pool, records, storage

STATE_DIR = ".convert-state"   # in the output folder while a conversion runs


@dataclasses.dataclass(frozen=True)
class Source:
  """One image found in the input: a file, or a record of a keras_pair images.tfrec."""
  rel: str              # image/filename: path relative to the input root, '/'-separated
  split: str            # split given by the layout, "" when none
  source_class: str     # class folder name as found
  path: str             # absolute file path (or the images.tfrec path)
  size: int             # bytes
  mtime_ns: int = 0     # for the resume fingerprint
  offset: int = -1      # >= 0: byte offset of the record's data in `path`


@dataclasses.dataclass(frozen=True)
class Item:
  """A source with its final split, label and patient id."""
  source: Source
  split: str
  label: int
  text: str
  patient_id: str
  multi_hot: tuple[float, ...] = ()   # multi-label sets: K floats (records.MULTI_HOT), else empty
  mask: tuple[float, ...] = ()        # multi-label sets: K floats (records.MASK), else empty
  name: str = ""   # the path written (image/filename, skipped lists): the patient's id replaced
                   # by its pseudonym (tfrecord_tools.pseudonym.Names); "" = source.rel
  meta: tuple[tuple[str, str], ...] = ()   # ((records arg, value), ...): sex, age, view, columns
                                           # (tfrecord_tools.metadata), known ones only

  @property
  def record_name(self) -> str:
    return self.name or self.source.rel


@dataclasses.dataclass
class ShardTask:
  """Everything one worker needs to write one shard (picklable)."""
  split: str
  index: int
  num_shards: int
  file: str
  output_dir: str
  items: list[Item]
  max_side: int
  channels: str
  image_format: str
  jpeg_quality: int
  fingerprint: str = ""
  dicom_window: str = "full"    # how DICOM files become images (tfrecord_tools.dicom)
  max_pixels: int = pixels.MAX_PIXELS   # width x height (x frames) limit, read from the header
  threads: int = 1   # images converted at once in the shard's process (`write_shard`)


# At most this many threads per shard: each holds a decoded film and its resize's work memory
# (tens of MB at full resolution), so a small job on a many-core TPU VM stays a small process.
MAX_THREADS = 8


class Stats:
  """Image statistics that merge across images and shards (the manifest's image_stats)."""

  def __init__(self):
    self.d: dict[str, Any] = {"count": 0, "bytes": 0}

  def _minmax(self, key: str, v: int) -> None:
    e = self.d.setdefault(key, {"min": v, "max": v, "sum": 0})
    e["min"], e["max"], e["sum"] = min(e["min"], v), max(e["max"], v), e["sum"] + v

  def _inc(self, key: str, v: Any, n: int = 1) -> None:
    e = self.d.setdefault(key, {})
    e[str(v)] = e.get(str(v), 0) + n

  def add(self, p: pixels.PreparedImage) -> None:
    self.d["count"] += 1
    self.d["bytes"] += len(p.encoded)
    self._minmax("height", p.height)
    self._minmax("width", p.width)
    self._minmax("source_height", p.source_height)
    self._minmax("source_width", p.source_width)
    self._inc("channels", p.channels)
    self._inc("bit_depth", p.bit_depth)
    self._inc("format", p.image_format)
    self._inc("source_mode", p.source_mode)
    if p.rendering_summary:   # DICOM: what was applied (dicom.Rendering.summary)
      self._inc("dicom_rendering", p.rendering_summary)
    for arg, _ in p.attributes:   # DICOM header attributes (sex, age, view) written
      self._inc("dicom_attributes", arg)

  def merge(self, other: dict) -> None:
    for k, v in other.items():
      if k in ("count", "bytes"):
        self.d[k] += v
      elif isinstance(v, dict) and "sum" in v:
        self._minmax(k, v["min"])
        self._minmax(k, v["max"])
        self.d[k]["sum"] += v["sum"] - v["min"] - v["max"]
      else:
        for kk, n in v.items():
          self._inc(k, kk, n)

  def summary(self) -> dict:
    n = self.d["count"]
    out: dict[str, Any] = {}
    for k in ("height", "width", "source_height", "source_width"):
      if k in self.d:
        e = self.d[k]
        out[k] = {"min": e["min"], "max": e["max"], "mean": round(e["sum"] / max(n, 1), 1)}
    for k in ("channels", "bit_depth", "format", "source_mode", "dicom_rendering",
              "dicom_attributes"):
      if k in self.d:
        out[k] = dict(sorted(self.d[k].items()))
    out["bytes"] = self.d["bytes"]
    return out


def state_path(output_dir: str, file: str) -> str:
  """Where a finished shard's statistics are saved during the conversion."""
  return storage.join(storage.join(output_dir, STATE_DIR), file + ".json")


# --------------------------------------------------------------------------
# One image.
# --------------------------------------------------------------------------


def convert_one(source: Source, *, label: int, text: str, patient_id: str, max_side: int,
                channels: str, image_format: str, jpeg_quality: int, dicom_window: str = "full",
                max_pixels: int = pixels.MAX_PIXELS,
                multi_hot: tuple[float, ...] = (), mask: tuple[float, ...] = (),
                name: str = "", meta: tuple[tuple[str, str], ...] = ()
                ) -> tuple[bytes, pixels.PreparedImage] | str:
  """One source -> (serialised tf.train.Example, PreparedImage), or why it is skipped.

  Read the bytes, prepare_image (the size held against `max_pixels` from the header;
  DICOM rendered with `dicom_window`, how written to image/dicom/rendering; decode =
  validate, normalise, resize), serialise with the sha256 of the source: the
  one per-image code path of both runners. `patient_id` is written as given (the
  converter gives pseudonyms); `name` is the image/filename written ("" = source.rel).
  """
  s = source
  try:
    data = storage.read_input(s.path, s.offset, s.size)   # regular files only, never more than their size
    if s.offset >= 0 and len(data) != s.size:
      raise OSError("record shorter than its header says")
    prepared = pixels.prepare_image(data, max_side=max_side, channels=channels,
                                    image_format=image_format, jpeg_quality=jpeg_quality,
                                    dicom_window=dicom_window, name=s.rel, max_pixels=max_pixels)
  except pixels.ImageError as e:
    return e.reason
  except OSError as e:
    return f"unreadable: {e.strerror or e}"
  record = records.serialize_example(
      encoded=prepared.encoded, image_format=prepared.image_format,
      height=prepared.height, width=prepared.width, channels=prepared.channels,
      bit_depth=prepared.bit_depth, label=label, text=text, filename=name or s.rel,
      patient_id=patient_id, sha256=hashlib.sha256(data).hexdigest(),
      multi_hot=multi_hot, mask=mask,   # empty for single-label: not written
      dicom_rendering=prepared.rendering,
      **{**dict(prepared.attributes), **dict(meta)})   # tfrecord_tools.metadata; a CSV's win
  return record, prepared


def convert_item(item: Item, *, max_side: int, channels: str, image_format: str,
                 jpeg_quality: int, dicom_window: str = "full",
                 max_pixels: int = pixels.MAX_PIXELS) -> tuple[bytes | None, dict]:
  """A planned image -> its outcome for `write_records` (small and picklable):

  (record, {"stats": the image's Stats.d, "text": class name, "patient_id": ...,
             multi-label only: "positives": the findings present})
  or (None, {"path": rel, "reason": why it is skipped, "split": ...}).
  """
  done = convert_one(item.source, label=item.label, text=item.text,
                     patient_id=item.patient_id, max_side=max_side, channels=channels,
                     image_format=image_format, jpeg_quality=jpeg_quality, max_pixels=max_pixels,
                     dicom_window=dicom_window, multi_hot=item.multi_hot, mask=item.mask,
                     name=item.record_name, meta=item.meta)
  if isinstance(done, str):
    return None, {"path": item.record_name, "reason": done, "split": item.split}
  record, prepared = done
  stats = Stats()
  stats.add(prepared)
  info = {"stats": stats.d, "text": item.text, "patient_id": item.patient_id}
  if item.multi_hot:   # a multi-label record counts once per finding present (text "A|B")
    info["positives"] = [f for f in item.text.split("|") if f] if any(item.multi_hot) else []
  return record, info


# --------------------------------------------------------------------------
# One shard.
# --------------------------------------------------------------------------


def write_records(output_dir: str, file: str, split: str, fingerprint: str,
                  outcomes: Iterable[tuple[bytes | None, dict]]) -> dict:
  """Writes one shard atomically from its images' outcomes (`convert_item`), in order.

  Returns the shard's statistics, also saved to `state_path` before the rename
  (what `load_finished` and the manifest read):
  {"file", "split", "fingerprint", "num_examples", "class_counts", "skipped",
   "patients", "stats"}.
  """
  final = storage.join(output_dir, file)
  # A retried Beam bundle may run beside the first try: a temp name per process and thread.
  tmp = (final if storage.is_remote(final)
         else f"{final}.tmp-{os.getpid()}{threading.get_ident() % 10**6}")
  stats = Stats()
  class_counts: dict[str, int] = {}
  skipped, patients, converted = [], set(), 0
  digest = hashlib.sha256()   # of the shard's bytes: the data's identity in dataset.json
  try:
    with storage.open(tmp, "wb") as out:
      for record, info in outcomes:
        if record is None:
          skipped.append(info)
          continue
        framed = records.frame(record)
        digest.update(framed)
        out.write(framed)
        converted += 1
        stats.merge(info["stats"])
        for name in info.get("positives", [info["text"]]):   # multi-label: per finding present
          class_counts[name] = class_counts.get(name, 0) + 1
        if info["patient_id"]:
          patients.add(info["patient_id"])
  except OSError as e:
    _discard(tmp, final)
    raise ShardWriteError(errors.write_error_text(final, e)) from None
  result = {
      "file": file, "split": split, "fingerprint": fingerprint,
      "num_examples": converted, "class_counts": class_counts, "skipped": skipped,
      "patients": sorted(patients), "stats": stats.d, "sha256": digest.hexdigest(),
  }
  # Statistics first, then the shard: a shard under its final name always has them.
  try:
    storage.write_bytes(state_path(output_dir, file), json.dumps(result).encode())
    if tmp != final:
      storage.rename(tmp, final)
  except OSError as e:
    _discard(tmp, final)
    raise ShardWriteError(errors.write_error_text(final, e)) from None
  return result


class ShardWriteError(errors.UserError):
  """A shard could not be written (disk full, permissions, ...): one line; its temp file is gone."""


def _discard(tmp: str, final: str) -> None:
  """Removes a half-written temp shard (never the final file)."""
  if tmp != final:
    try:
      storage.remove(tmp)
    except OSError:
      pass


def write_shard(task: ShardTask) -> dict:
  """Converts and writes one planned shard (`write_records`); returns its statistics.

  Runs in the local converter's worker processes; each image done is a
  `pool.tick()` of progress.
  """
  args = dict(max_side=task.max_side, channels=task.channels, image_format=task.image_format,
              jpeg_quality=task.jpeg_quality, dicom_window=task.dicom_window,
              max_pixels=task.max_pixels)

  def outcomes():
    for done in _ordered_map(lambda it: convert_item(it, **args), task.items, task.threads):
      pool.tick()
      yield done
  return write_records(task.output_dir, task.file, task.split, task.fingerprint, outcomes())


def _ordered_map(fn, items, threads: int):
  """`map(fn, items)` on `threads` threads, results in order, at most 2 x threads ahead.

  Worth it because the image work releases the GIL (Pillow's decoders and encoders,
  numpy's resize): a small job's one process uses every core without a pool's
  start-up. The outer catch_warnings puts the warning filters back afterwards
  (`pixels` silences Pillow's per image; that is not thread-safe before Python 3.14).
  """
  if threads <= 1:
    yield from map(fn, items)
    return
  with warnings.catch_warnings(), futures.ThreadPoolExecutor(threads) as ex:
    ahead: collections.deque = collections.deque()
    try:
      for it in items:
        ahead.append(ex.submit(fn, it))
        if len(ahead) >= 2 * threads:
          yield ahead.popleft().result()
      while ahead:
        yield ahead.popleft().result()
    finally:   # an error or an early stop: no more new work
      for f in ahead:
        f.cancel()


def load_finished(task: ShardTask) -> dict | None:
  """The saved statistics of an identical shard finished by an earlier (killed) run."""
  state = state_path(task.output_dir, task.file)
  if not (storage.exists(state) and storage.exists(storage.join(task.output_dir, task.file))):
    return None
  try:
    with storage.open(state, "rb") as f:
      result = json.loads(f.read())
  except (OSError, ValueError):
    return None
  return result if result.get("fingerprint") == task.fingerprint else None
