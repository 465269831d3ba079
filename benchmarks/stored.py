"""What a converted data set stores, read back for benchmarks (no flags: any benchmark imports it)."""

from __future__ import annotations


def encoded_images(data_dir: str, split: str = "train") -> list[bytes]:
  """The encoded image bytes of every record of `split`, in manifest order."""
  import tensorflow as tf
  from tfrecord_tools import records, schema
  manifest = schema.read_manifest(data_dir)
  spec = {records.ENCODED: records.feature_spec()[records.ENCODED]}
  ds = tf.data.TFRecordDataset(schema.shard_paths(data_dir, manifest, split))
  ds = ds.map(lambda r: tf.io.parse_single_example(r, spec)[records.ENCODED])
  return [b.numpy() for b in ds]
