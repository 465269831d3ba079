"""The records a conversion wrote, as rows the tests compare (one reader for every test file).

Import this module one way only: `from tests._records import record_rows`.
"""

from __future__ import annotations

import pathlib


def record_rows(out_dir) -> list[dict]:
  """[{"file", "split", "name", "patient"}] of every record in out_dir's shards, in shard order."""
  import tensorflow as tf  # noqa: PLC0415
  from tfrecord_tools import records  # noqa: PLC0415
  spec = records.feature_spec()
  rows = []
  for f in sorted(pathlib.Path(out_dir).glob("*.tfrecord")):
    for raw in records.read_records(str(f)):
      ex = tf.io.parse_single_example(raw, spec)
      rows.append({"file": f.name, "split": f.name.split("-")[0],
                   "name": ex[records.FILENAME].numpy().decode(),
                   "patient": ex[records.PATIENT_ID].numpy().decode()})
  return rows
