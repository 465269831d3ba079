"""tfrecord_tools.records: one feature table -> Example, parse spec and hand-serialised bytes."""

from __future__ import annotations

import pathlib
import re

import pytest
import tensorflow as tf

from tfrecord_tools import records, schema

ROOT = pathlib.Path(__file__).resolve().parents[1]

_IMAGE = dict(encoded=b"\x89PNG...", image_format="png", height=3, width=4, channels=1,
              bit_depth=8, label=1, text="PNEUMONIA", filename="train/PNEUMONIA/a.png")

# The table with a multi-hot label vector added: one row.
_WITH_MULTI_HOT = records.FEATURES   # the multi-label rows are part of the table
# The table as it was before the multi-label rows: records written then must still parse.
_BEFORE_MULTI_HOT = tuple(f for f in records.FEATURES if f.key not in (records.MULTI_HOT, records.MASK))


def test_table_is_complete_and_drives_the_spec():
  keys = [f.key for f in records.FEATURES]
  assert len(set(keys)) == len(keys) and len({f.arg for f in records.FEATURES}) == len(keys)
  assert all(f.kind in records.KINDS and f.meaning for f in records.FEATURES)
  spec = records.feature_spec()
  assert list(spec) == keys
  assert spec[records.LABEL] == tf.io.FixedLenFeature([], tf.int64, default_value=0)
  assert spec[records.ENCODED] == tf.io.FixedLenFeature([], tf.string, default_value="")
  # One place: the manifest module (schema) does not carry the record format.
  for name in ("ENCODED", "FORMAT", "HEIGHT", "WIDTH", "CHANNELS", "BIT_DEPTH", "LABEL", "TEXT",
               "FILENAME", "PATIENT_ID", "SHA256", "MULTI_HOT", "MASK"):
    assert getattr(records, name) in keys and not hasattr(schema, name)
  assert not hasattr(schema, "feature_spec") and not hasattr(schema, "make_example")


def test_optional_features_default_and_parse_back():
  raw = records.serialize_example(**_IMAGE)
  assert raw == records.make_example(**_IMAGE).SerializeToString(deterministic=True)
  ex = tf.io.parse_single_example(raw, records.feature_spec())
  assert ex[records.PATIENT_ID].numpy() == b"" and ex[records.SHA256].numpy() == b""
  assert ex[records.TEXT].numpy() == b"PNEUMONIA" and int(ex[records.WIDTH]) == 4


def test_writer_arguments_are_checked():
  with pytest.raises(TypeError, match="missing required keyword arguments: label"):
    records.serialize_example(**{k: v for k, v in _IMAGE.items() if k != "label"})
  with pytest.raises(TypeError, match="unexpected keyword arguments: lable"):
    records.make_example(lable=1, **_IMAGE)
  with pytest.raises(ValueError, match="negative"):
    records.serialize_example(**{**_IMAGE, "label": -1})


@pytest.mark.parametrize("multi_hot", [[], [0.0], [1.0, 0.0, 1.0], [0.5, -2.25, 1e-8, 3.4e38]])
def test_float_list_feature_is_one_row(multi_hot):
  kw = dict(_IMAGE, multi_hot=multi_hot)
  raw = records.serialize_example(features=_WITH_MULTI_HOT, **kw)
  assert raw == records.make_example(features=_WITH_MULTI_HOT, **kw).SerializeToString(
      deterministic=True)
  ex = tf.io.parse_single_example(raw, records.feature_spec(_WITH_MULTI_HOT))
  got = ex["image/class/multi_hot"].numpy()
  assert got.dtype == "float32" and got.tolist() == tf.constant(multi_hot, tf.float32).numpy().tolist()
  assert int(ex[records.LABEL]) == 1
  # A batch of records with vectors of one length parses to a dense [batch, n] matrix.
  batch = tf.io.parse_example([raw, raw], records.feature_spec(_WITH_MULTI_HOT))
  assert batch["image/class/multi_hot"].shape == (2, len(multi_hot))


def test_a_record_without_a_list_feature_parses_to_its_default():
  raw = records.serialize_example(features=_BEFORE_MULTI_HOT, **_IMAGE)   # written before the rows
  ex = tf.io.parse_single_example(raw, records.feature_spec(_WITH_MULTI_HOT))
  assert ex["image/class/multi_hot"].numpy().tolist() == []
  omitted = records.serialize_example(features=_WITH_MULTI_HOT, **_IMAGE)  # default (): not written
  assert omitted == raw
  assert tf.io.parse_single_example(omitted, records.feature_spec(_WITH_MULTI_HOT))[
      "image/class/multi_hot"].numpy().tolist() == []


def test_hand_serialisation_sorts_keys_whatever_the_table_order():
  shuffled = tuple(reversed(records.FEATURES))
  assert (records.serialize_example(features=shuffled, **_IMAGE)
          == records.serialize_example(**_IMAGE))


def test_framing_checks_both_checksums(tmp_path):
  path = tmp_path / "x.tfrecord"
  data = records.frame(b"abc") + records.frame(b"")
  path.write_bytes(data)
  assert list(records.read_records(str(path))) == [b"abc", b""]
  bad = bytearray(data)
  bad[9] ^= 1                               # the length's checksum
  path.write_bytes(bytes(bad))
  with pytest.raises(records.RecordFileError, match="bad length checksum at byte 0"):
    list(records.read_records(str(path)))
  path.write_bytes(data[:-2])
  with pytest.raises(records.RecordFileError, match="truncated"):
    list(records.read_records(str(path)))


def test_each_feature_key_is_spelled_in_one_module():
  pattern = re.compile(r"[\"']image/[a-z0-9_/]+[\"']")
  where: dict[str, set[str]] = {}
  for folder in ("tfrecord_tools", "xraytpu", "benchmarks"):
    for path in (ROOT / folder).rglob("*.py"):
      for key in pattern.findall(path.read_text(encoding="utf-8")):
        where.setdefault(key.strip("\"'"), set()).add(str(path.relative_to(ROOT)))
  table = {f.key for f in records.FEATURES}
  spelled = {k: sorted(m) for k, m in where.items() if k in table}
  assert set(spelled) == table
  assert all(m == ["tfrecord_tools/records.py"] for m in spelled.values()), spelled
