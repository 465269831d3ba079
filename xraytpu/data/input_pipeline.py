"""dataset.json + TFRecord shards -> tf.data batches of (uint8 image, label).

Multi-label data sets (manifest "task": "multi_label", `classes` = the K
findings) with label_mode "multi_label" yield (image, y), y = float32
[b, 2K] = concat([multi_hot, mask]): one tensor, so Keras and TPUs see one
static label shape; `split_multi_label(y)` gives (multi_hot, mask) back.

Two builders, one chain:

  train_dataset(data_dir, spec, global_batch=...)    shuffled, repeated, fixed-shape batches
  eval_dataset(data_dir, split, spec, batch_size=...) manifest order, every example exactly
                                                     once, last batch kept

`spec` is an `InputSpec`: what the model sees (image_size, channels, aspect)
and how the pipeline runs (cache, shuffle buffer, determinism, threads, RAM
budget, tf.data service, seed). `InputSpec.from_config(cfg, manifest)` takes
them from a training `Config`; evaluation and previews build one directly.

The chain (`_dataset`), top to bottom:

  list shards from the manifest
  -> shard per input pipeline (by file when enough shards, else by element)
  -> interleave the shards' records (parallel, non-deterministic when training)
  -> parse (records.feature_spec; multi-label: multi_hot, mask as [K]) -> decode
     -> resize -> uint8 [S, S, C]
  -> cache (memory | file | off)          decoded pixels only; never augmentation
  -> shuffle (seeded) -> repeat           training only, after the cache
  -> batch (per-replica batch; drop_remainder when training)
  -> labels in the loss's form -> prefetch(AUTOTUNE)

With spec.data_service_address (training only), the tf.data service's workers
run one epoch of the chain (files in manifest order, no cache, shuffle,
batch) as a "distributed_epoch" job: the dispatcher hands each shard file to
one worker, so an epoch holds every example once across all workers and
trainers. The trainer unbatches, repeats (each repetition is a new job
iteration, i.e. a new epoch) and batches again: full batches, same size.

Augmentation is not here: it runs inside the model, on the device
(`xraytpu.data.augment`), so the cache never freezes it and the host only
replays cached uint8 pixels after the first epoch.

Usage with a strategy:
  spec = InputSpec.from_config(cfg, manifest)
  ds = strategy.distribute_datasets_from_function(
      lambda ctx: train_dataset(data_dir, spec, global_batch=cfg.batch_size, input_context=ctx))
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import tensorflow as tf
from absl import logging

from tfrecord_tools import pixels
from tfrecord_tools import records
from tfrecord_tools import schema
from xraytpu.data import DataError, stats

AUTOTUNE = tf.data.AUTOTUNE
LABEL_MODES = ("int", "binary", "one_hot", "multi_label")
# Read-ahead per shard file: large sequential reads matter on gs://.
_READ_BUFFER_BYTES = 8 << 20
# At most this many shards are read at once when training.
_MAX_CYCLE_LENGTH = 16
# tf.data service: the dispatcher hands shard files to workers one by one
# ("distributed_epoch"), so an epoch holds every example at most once across
# all workers, and a lost worker costs only its in-flight elements.
_SERVICE_SHARDING = tf.data.experimental.service.ShardingPolicy.DYNAMIC


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What the model sees, and how the pipeline runs.

  The first three fields define the pixels: S x S x C uint8 images
  (`pixels.load_image`). The rest only change speed, memory and order,
  never the pixels; their defaults are the plain choice (no cache, shared
  thread pool, TensorFlow's RAM budget, in-process, unseeded), which is what
  evaluation wants. Training takes every field from its Config (`from_config`).
  """
  image_size: int           # S, the side of the square image
  channels: int             # C: 1 or 3; 0 = from the data set (stats.input_channels)
  aspect: str               # non-square -> square: squash | pad | center_crop
  cache: str = "off"        # decoded pixels: "memory", "off", or a file path prefix
  shuffle_buffer: int = 0   # training: the after-cache shuffle buffer, in examples (capped at the
                            # split size; 0 or 1 = none, only the file order is shuffled)
  deterministic: bool = False   # training: keep the input order (evaluation always does)
  private_threads: int = 0  # > 0: a private tf.data thread pool of this size
  ram_budget_mb: int = 0    # > 0: tf.data autotune's RAM budget, MiB
  data_service_address: str = ""  # training: grpc://host:port of a tf.data service dispatcher
  seed: int | None = None   # training: file and example shuffling

  @classmethod
  def from_config(cls, cfg, manifest: dict | None = None) -> InputSpec:
    """The spec of an `xraytpu.config.Config`; with the manifest, channels=0 is resolved."""
    channels = stats.input_channels(manifest, cfg) if manifest is not None else int(cfg.channels)
    return cls(image_size=int(cfg.image_size), channels=channels, aspect=cfg.aspect,
               cache=cfg.cache, shuffle_buffer=int(cfg.shuffle_buffer),
               deterministic=bool(cfg.deterministic), private_threads=int(cfg.private_threads),
               ram_budget_mb=int(cfg.ram_budget_mb), data_service_address=cfg.data_service_address,
               seed=cfg.seed)


def train_dataset(data_dir: str, spec: InputSpec, *, global_batch: int, input_context=None,
                  label_mode: str = "int", with_filenames: bool = False,
                  manifest: dict | None = None, split: str = "train") -> tf.data.Dataset:
  """The training stream: shuffled, repeated forever, full batches only.

  Args:
    data_dir: folder (local or gs://) holding dataset.json and the shards.
    spec: the input spec (`InputSpec.from_config(cfg, manifest)`).
    global_batch: the batch of one step over all replicas; with input_context
      this pipeline batches its per-replica share.
    input_context: a `tf.distribute.InputContext` (from
      `strategy.distribute_datasets_from_function`): this pipeline reads its
      share of the data.
    label_mode: "int" -> int32 [b]; "binary" -> float32 [b, 1] (2 classes
      only); "one_hot" -> float32 [b, K]; "multi_label" (multi-label data
      sets only) -> float32 [b, 2K], concat([multi_hot, mask]).
    with_filenames: also yield the record's image/filename, tf.string [b].
    manifest: the parsed dataset.json, if the caller already read it.
    split: the manifest's split to train on.

  Returns:
    A dataset of (image uint8 [b, S, S, C], label) or (image, label, filename),
    b = the per-replica batch, static.
  """
  return _dataset(data_dir, split, spec, training=True, batch_size=global_batch,
                  input_context=input_context, label_mode=label_mode,
                  with_filenames=with_filenames, drop_remainder=True, manifest=manifest)


def eval_dataset(data_dir: str, split: str, spec: InputSpec, *, batch_size: int,
                 input_context=None, label_mode: str = "int", with_filenames: bool = False,
                 drop_remainder: bool = False, manifest: dict | None = None) -> tf.data.Dataset:
  """One pass over `split` in manifest order: every example exactly once.

  Args as `train_dataset`, and:
    split: "train", "val" or "test" (a key of the manifest's "splits").
    batch_size: the global batch (per-replica share with input_context).
    drop_remainder: drop the last partial batch, e.g. for evaluation on TPU
      where every batch must have the same shape.

  The spec's training-only settings (shuffle, seed, tf.data service) do not
  apply: evaluation data is always read in-process, in order.
  """
  return _dataset(data_dir, split, spec, training=False, batch_size=batch_size,
                  input_context=input_context, label_mode=label_mode,
                  with_filenames=with_filenames, drop_remainder=drop_remainder, manifest=manifest)


def _dataset(data_dir: str, split: str, spec: InputSpec, *, training: bool, batch_size: int,
             input_context, label_mode: str, with_filenames: bool, drop_remainder: bool,
             manifest: dict | None) -> tf.data.Dataset:
  """The one chain behind both builders (see the module docstring)."""
  if label_mode not in LABEL_MODES:
    raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
  manifest = manifest if manifest is not None else schema.read_manifest(data_dir)
  classes = manifest["classes"]
  multi_label = stats.task(manifest) == stats.MULTI_LABEL
  if (label_mode == "multi_label") != multi_label and label_mode != "int":
    raise DataError(f"label_mode={label_mode!r} does not fit the {stats.task(manifest)} data set "
                    f"{data_dir}" + (": use 'multi_label'" if multi_label else ""))
  if label_mode == "binary" and len(classes) != 2:
    raise DataError(f"label_mode='binary' needs 2 classes, the data set has {len(classes)}: {classes}")
  size, aspect = int(spec.image_size), spec.aspect
  channels = stats.input_channels(manifest, spec)
  deterministic = (not training) or bool(spec.deterministic)
  use_service = bool(spec.data_service_address) and training
  if spec.data_service_address and not training:
    logging.info("%s: evaluation data is read in-process (tf.data service only serves training)", split)

  files = schema.shard_paths(data_dir, manifest, split)
  num_examples = stats.num_examples(manifest, split)
  if not files or num_examples == 0:
    raise DataError(f"split '{split}' of {data_dir} has no examples")
  num_pipelines = input_context.num_input_pipelines if input_context else 1
  pipeline_id = input_context.input_pipeline_id if input_context else 0
  batch = (input_context.get_per_replica_batch_size(batch_size) if input_context
           else int(batch_size))
  if use_service:
    # The service shards (by file, dynamically) and every consumer reads the
    # one shared job: sharding here too would lose data.
    num_pipelines, pipeline_id = 1, 0
  shard_by_file = num_pipelines > 1 and len(files) >= num_pipelines
  shard_by_element = num_pipelines > 1 and not shard_by_file
  if shard_by_element:
    logging.warning("%s: %d shard files for %d input pipelines: sharding by element, so every "
                    "pipeline reads every file (convert with more shards to avoid this)",
                    split, len(files), num_pipelines)
  examples_here = -(-num_examples // num_pipelines)  # this pipeline's share, rounded up
  keys = [records.ENCODED, records.LABEL] + ([records.FILENAME] if with_filenames else [])
  parse_spec = {k: v for k, v in records.feature_spec().items() if k in keys}
  if label_mode == "multi_label":
    parse_spec.pop(records.LABEL)
    parse_spec.update(_multi_label_spec(len(classes)))

  def to_pixels(serialized):
    # parse -> decode -> resize -> uint8: the per-record work the cache saves.
    features = tf.io.parse_single_example(serialized, parse_spec)
    # The pixel contract: encoded bytes -> uint8 [S, S, C], the one per-record pixel call.
    image = pixels.load_image(features[records.ENCODED], channels=channels, size=size, aspect=aspect)
    if label_mode == "multi_label":
      label = multi_label_targets(features[records.MULTI_HOT], features[records.MASK])
    else:
      label = tf.cast(features[records.LABEL], tf.int32)
    if with_filenames:
      return image, label, features[records.FILENAME]
    return image, label

  # List the shards, in manifest order.
  ds = tf.data.Dataset.from_tensor_slices(files)
  # Shard per input pipeline, by file: each host reads only its own files.
  if shard_by_file:
    ds = ds.shard(num_pipelines, pipeline_id)
  if training and not use_service:
    # A new file order each epoch (matters only when nothing is cached). Not
    # with the service: its dispatcher must see the file list to split it.
    ds = ds.shuffle(len(files), seed=spec.seed, reshuffle_each_iteration=True)
  if training:
    # Interleave: read several shards at once; non-deterministic order lets a
    # slow read (gs://) not stall the others.
    ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER_BYTES),
                       cycle_length=min(len(files), _MAX_CYCLE_LENGTH), block_length=1,
                       num_parallel_calls=AUTOTUNE, deterministic=deterministic)
  else:
    # Evaluation: shard after shard, records in file order (manifest order).
    ds = ds.flat_map(lambda f: tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER_BYTES))
  # Too few files for the pipelines: shard by element (every file read everywhere).
  if shard_by_element:
    ds = ds.shard(num_pipelines, pipeline_id)
  # Parse, decode and resize in parallel, to uint8 [S, S, C].
  ds = ds.map(to_pixels, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
  # Cache the deterministic work. Augmentation is random and lives in the model.
  key = _settings_key(data_dir, files, split, size, aspect, channels, with_filenames,
                      multi_label=label_mode == "multi_label")
  if use_service:
    # Service workers: one shuffled epoch, no cache (a worker would cache only
    # its share of one epoch), batched for fewer RPCs (the last batches short).
    ds = ds.shuffle(max(1, min(int(spec.shuffle_buffer), examples_here)))
    ds = ds.batch(batch, num_parallel_calls=AUTOTUNE, deterministic=False)
    ds = ds.apply(tf.data.experimental.service.distribute(
        processing_mode=_SERVICE_SHARDING,
        # One job per (data, settings, seed): a run's hosts share it, other runs do not.
        service=spec.data_service_address, job_name=f"xraytpu-{key}-s{spec.seed}"))
    # Trainer: every example once per epoch, full batches across epoch ends.
    ds = ds.unbatch().repeat()
  else:
    ds = _cache(ds, spec.cache, f"{key}-{pipeline_id}of{num_pipelines}")
  if training and not use_service:
    # Shuffle after the cache (a fresh order each epoch), then repeat forever:
    # Keras counts epochs with steps_per_epoch (stats.steps_per_epoch).
    ds = ds.shuffle(max(1, min(int(spec.shuffle_buffer), examples_here)), seed=spec.seed,
                    reshuffle_each_iteration=True)
    ds = ds.repeat()
  # Batch the per-replica batch. drop_remainder makes the shape fully static
  # (TPU, XLA) and every training step the same size.
  ds = ds.batch(batch, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE,
                deterministic=deterministic)
  # Labels in the form the loss wants (vectorised, per batch).
  ds = ds.map(_label_fn(label_mode, len(classes)), num_parallel_calls=AUTOTUNE,
              deterministic=deterministic)
  # Overlap host work with the device step.
  ds = ds.prefetch(AUTOTUNE)
  ds = ds.with_options(_options(spec, deterministic, own_sharding=num_pipelines > 1))
  logging.info("%s: %d examples in %d shards -> batches of %d (%s), %dx%dx%d %s, cache=%s%s",
               split, num_examples, len(files), batch,
               "training: shuffled, repeated" if training else "one ordered pass",
               size, size, channels, aspect, spec.cache or "off",
               f", pipeline {pipeline_id + 1}/{num_pipelines}" if num_pipelines > 1 else "")
  return ds


def _cache(ds: tf.data.Dataset, cache: str, key: str) -> tf.data.Dataset:
  """cache: 'memory' (RAM), 'off'/'' (none), else a file prefix (local or gs://)."""
  if cache in ("", "off", "none"):
    return ds
  if cache == "memory":
    return ds.cache()
  # One file set per (data, split, size, aspect, channels, pipeline): a cache
  # written for other settings is never read back by mistake.
  path = f"{cache}-{key}"
  parent = os.path.dirname(path)
  if parent and not tf.io.gfile.exists(parent):
    tf.io.gfile.makedirs(parent)
  logging.info("caching decoded images to %s*", path)
  return ds.cache(path)


def _settings_key(data_dir, files, split, size, aspect, channels, with_filenames,
                  multi_label: bool = False) -> str:
  """`val-224px-squash-c1-<hash of the data's location and shards>`: names caches and jobs.

  The cached elements' structure is in it too ("-fn" with filenames, "-ml"
  with multi-label targets), so a cache is only read back in its own form.
  """
  where = data_dir if "://" in data_dir else os.path.abspath(data_dir)
  digest = hashlib.sha1("\n".join([where] + files).encode()).hexdigest()[:8]
  extra = ("-fn" if with_filenames else "") + ("-ml" if multi_label else "")
  return f"{split}-{size}px-{aspect}-c{channels}{extra}-{digest}"


def _multi_label_spec(num_findings: int) -> dict:
  """multi_hot and mask parsed as fixed [K] vectors (static shapes for XLA/TPU).

  A record without multi_hot fails to parse (it is not a multi-label record);
  one without a mask has every label known.
  """
  k = int(num_findings)
  return {records.MULTI_HOT: tf.io.FixedLenFeature([k], tf.float32),
          records.MASK: tf.io.FixedLenFeature([k], tf.float32, default_value=[1.0] * k)}


def multi_label_targets(multi_hot: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
  """float32 [..., 2K] = concat([multi_hot, mask]): the multi-label y, one tensor."""
  return tf.concat([tf.cast(multi_hot, tf.float32), tf.cast(mask, tf.float32)], axis=-1)


def split_multi_label(y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(multi_hot [..., K], mask [..., K]) of a `multi_label_targets` tensor (K static)."""
  k = int(y.shape[-1]) // 2
  return y[..., :k], y[..., k:]


def _label_fn(label_mode: str, num_classes: int):
  def fn(image, label, *rest):
    if label_mode == "binary":
      label = tf.cast(label, tf.float32)[:, None]
    elif label_mode == "one_hot":
      label = tf.one_hot(label, num_classes, dtype=tf.float32)
    return (image, label, *rest)
  return fn


def _options(spec, deterministic: bool, own_sharding: bool) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic
  options.autotune.enabled = True
  if spec.ram_budget_mb > 0:
    options.autotune.ram_budget = int(spec.ram_budget_mb) << 20
  if spec.private_threads > 0:
    options.threading.private_threadpool_size = int(spec.private_threads)
  if own_sharding:
    # This pipeline already reads only its share; tf.distribute must not shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
  return options
