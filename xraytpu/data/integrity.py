"""Turns TensorFlow's errors about unreadable records into one line naming the file.

tf.data reports a truncated or corrupt shard as a long DataLossError that names
no file. `named_data_errors(data_dir, manifest, splits)` wraps a loop over the
data set: on such an error it scans the splits' shards (tfrecord_tools.records)
to find the culprit and raises DataError("FILE: truncated TFRecord file (...);
check the data set: python -m tfrecord_tools.inspect DATA_DIR").
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import tensorflow as tf

from tfrecord_tools import records, schema
from xraytpu.data import DataError


def _message(data_dir: str, where: str) -> str:
  return (f"{where}; check the data set: python -m tfrecord_tools.inspect {data_dir} "
          "(then re-convert it)")


@contextlib.contextmanager
def named_data_errors(data_dir: str, manifest: dict, splits: Iterable[str]) -> Iterator[None]:
  try:
    yield
  except (tf.errors.DataLossError, tf.errors.NotFoundError) as e:
    paths = [p for s in splits if s in manifest["splits"] for p in schema.shard_paths(data_dir, manifest, s)]
    bad = records.first_corrupt(paths)
    where = (f"{bad[0]}: {bad[1]}" if bad else
             f"unreadable data in {data_dir} ({(e.message or str(e)).splitlines()[0][:200]})")
    raise DataError(_message(data_dir, where)) from None
  except tf.errors.InvalidArgumentError as e:
    text = (e.message or str(e)).splitlines()[0]
    if "parse" not in text.lower() and "feature" not in text.lower() and "decode" not in text.lower():
      raise
    raise DataError(_message(data_dir, f"a record of {data_dir} does not match dataset.json or "
                                       f"cannot be decoded ({text[:200]})")) from None


def check_count(data_dir: str, split: str, seen: int, expected: int) -> None:
  """The records read from a split must be as many as the manifest says."""
  if seen != expected:
    raise DataError(_message(data_dir, f"split '{split}' of {data_dir} holds {seen} records, "
                                       f"dataset.json says {expected}"))
