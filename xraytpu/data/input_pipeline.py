"""dataset.json + TFRecord shards -> tf.data batches of (uint8 image, label).

Multi-label data sets (manifest "task": "multi_label", `classes` = the K
findings) with label_mode "multi_label" yield (image, y), y = float32
[b, 2K] = concat([multi_hot, mask]): one tensor, so Keras and TPUs see one
static label shape; `split_multi_label(y)` gives (multi_hot, mask) back.

Two builders, one chain:

  train_dataset(data_dir, spec, global_batch=...)    shuffled, repeated, fixed-shape batches
  eval_dataset(data_dir, split, spec, batch_size=...) manifest order, every example exactly
                                                     once, last batch kept; or, with
                                                     padded=True, equal full steps on every
                                                     replica, padding weighted 0 (`eval_plan`)

`spec` is an `InputSpec`: what the model sees (image_size, channels, aspect)
and how the pipeline runs (cache, shuffle buffer, determinism, threads, RAM
budget, tf.data service, seed). `InputSpec.from_config(cfg, manifest)` takes
them from a training `Config`; evaluation and previews build one directly.

The chain (`_dataset`), top to bottom:

  list shards from the manifest
  -> shard per input pipeline (by file when enough shards, else by element)
  -> interleave the shards' records (parallel, non-deterministic when training)
  -> [with a cache, training: shuffle the encoded records of epoch 1 through a
     buffer of FIRST_EPOCH_BATCHES batches, the epoch that fills the cache]
  -> parse (records.feature_spec; multi-label: multi_hot, mask as [K]) -> decode
     -> resize -> uint8 [S, S, C]
  -> cache (auto | memory | file | off)   decoded pixels only; never augmentation
  -> shuffle (seeded) -> repeat           training only, after the cache; with a cache,
                                          from epoch 2 (epoch 1 streams as decoded;
                                          a finished file cache: from epoch 1)
  -> [padded evaluation: a sample weight per example, then weight-0 padding up to
     `eval_plan`'s steps: every replica gets the same number of full batches]
  -> batch (per-replica batch; drop_remainder when training)
  -> labels in the loss's form
  -> [training with spec.mixup_alpha / spec.cutmix_alpha: each batch mixed with its
     reverse, images and labels (`augment.mix_batch`, Model Garden's mixup_and_cutmix)]
  -> prefetch(AUTOTUNE)

With spec.data_service_address (training only), the tf.data service's workers
run one epoch of the chain (files in manifest order, no cache, shuffle,
batch) as a "distributed_epoch" job: the dispatcher hands each shard file to
one worker, so an epoch holds every example once across all workers and
trainers. The trainer unbatches, repeats (each repetition is a new job
iteration, i.e. a new epoch) and batches again: full batches, same size.

cache="auto" (`decide_cache`) sizes the decoded split from the manifest
(examples x S x S x C bytes, this pipeline's share) and uses memory when
that fits CACHE_RAM_SHARE of the host's available RAM (less what other
splits of this process already cache there), else a local file cache when
the disk has room, else nothing; one log line says which and why.

Augmentation is not here: it runs inside the model, on the device
(`xraytpu.data.augment`), so the cache never freezes it and the host only
replays cached uint8 pixels after the first epoch. Mixup/cutmix are the one
exception: they mix the labels too, which never enter the model, so they run on
each batch after the labels (a few element-wise ops; the images stay uint8).

Usage with a strategy:
  spec = InputSpec.from_config(cfg, manifest)
  ds = strategy.distribute_datasets_from_function(
      lambda ctx: train_dataset(data_dir, spec, global_batch=cfg.batch_size, input_context=ctx))
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile

import tensorflow as tf
from absl import logging

from tfrecord_tools import pixels
from tfrecord_tools import records
from tfrecord_tools import schema
from xraytpu.data import DataError, augment, stats

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
# cache="auto": the decoded pixels go to memory when they fit this share of
# the host's available RAM (MemAvailable), and to a file cache when they fit
# this share of the cache folder's free disk; otherwise nothing is cached.
CACHE_RAM_SHARE = 0.5
CACHE_DISK_SHARE = 0.5
# Cache values that mean no cache at all.
NO_CACHE = ("", "off", "none")
# A cached pipeline's first epoch (the one that decodes and fills the cache)
# shuffles its encoded records, before the decode, through a buffer of this
# many batches instead of the full buffer of decoded images.
FIRST_EPOCH_BATCHES = 1
# Where cache="auto" writes a file cache when InputSpec.cache_dir is empty.
_DEFAULT_CACHE_DIR = os.path.join(tempfile.gettempdir(), "xraytpu-cache")
# Bytes this process already holds in in-memory caches, by cache key (train
# and val both cache): an "auto" decision leaves them out of the RAM share.
_MEMORY_CACHED: dict[str, int] = {}


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What the model sees, and how the pipeline runs.

  The first four fields define the pixels: S x S x C uint8 images
  (`pixels.load_image`, with the run's pixel contract). The rest only change
  speed, memory and order, never the pixels; their defaults are the plain
  choice (no cache, shared thread pool, TensorFlow's RAM budget, in-process,
  unseeded), which is what evaluation wants. Training takes every field from
  its Config (`from_config`).
  """
  image_size: int           # S, the side of the square image
  channels: int             # C: 1 or 3; 0 = from the data set (stats.input_channels)
  aspect: str               # non-square -> square: squash | pad | center_crop
  pixel_contract: int = pixels.CONTRACT_VERSION   # the run's (pixels.READ_CONTRACTS)
  cache: str = "off"        # decoded pixels: "auto", "memory", "off", or a file path prefix
  shuffle_buffer: int = 0   # training: the after-cache shuffle buffer, in examples (capped at the
                            # split size; 0 or 1 = none, only the file order is shuffled)
  deterministic: bool = False   # training: keep the input order (evaluation always does)
  private_threads: int = 0  # > 0: a private tf.data thread pool of this size
  ram_budget_mb: int = 0    # > 0: tf.data autotune's RAM budget, MiB
  data_service_address: str = ""  # training: grpc://host:port of a tf.data service dispatcher
  seed: int | None = None   # training: file and example shuffling
  cache_dir: str = ""       # cache="auto": folder of a file cache ("" = the system temp folder)
  mixup_alpha: float = 0.0  # training: mixup's Beta(alpha, alpha) (0 = off; changes pixels and labels)
  cutmix_alpha: float = 0.0  # training: cutmix's Beta(alpha, alpha) (0 = off)

  @classmethod
  def from_config(cls, cfg, manifest: dict | None = None) -> InputSpec:
    """The spec of an `xraytpu.config.Config`; with the manifest, channels=0 is resolved."""
    channels = stats.input_channels(manifest, cfg) if manifest is not None else int(cfg.channels)
    return cls(image_size=int(cfg.image_size), channels=channels, aspect=cfg.aspect,
               pixel_contract=int(cfg.pixel_contract), cache=cfg.cache,
               shuffle_buffer=int(cfg.shuffle_buffer),
               deterministic=bool(cfg.deterministic), private_threads=int(cfg.private_threads),
               ram_budget_mb=int(cfg.ram_budget_mb), data_service_address=cfg.data_service_address,
               seed=cfg.seed, cache_dir=cfg.cache_dir, mixup_alpha=float(cfg.mixup_alpha),
               cutmix_alpha=float(cfg.cutmix_alpha))


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
                 padded: bool = False, manifest: dict | None = None) -> tf.data.Dataset:
  """One pass over `split` in manifest order: every example exactly once.

  Args as `train_dataset`, and:
    split: "train", "val" or "test" (a key of the manifest's "splits").
    batch_size: the global batch (per-replica share with input_context).
    padded: for a distributed evaluation (Keras' `validation_data` under any
      strategy): every element gets a sample weight, and weight-0 padding
      brings this pipeline to exactly `eval_plan(...).steps` steps of full
      per-replica batches. Every replica then runs the same number of steps on
      static shapes (XLA, TPU), none gets an empty batch, and the weighted
      loss and metrics count each real example exactly once (`EvalPlan`).
      Yields (image, label, weight) or (image, label, weight, filename).

  The spec's training-only settings (shuffle, seed, tf.data service) do not
  apply: evaluation data is always read in-process, in order.
  """
  return _dataset(data_dir, split, spec, training=False, batch_size=batch_size,
                  input_context=input_context, label_mode=label_mode,
                  with_filenames=with_filenames, drop_remainder=False, manifest=manifest,
                  padded=padded)


META_KEYS = (records.META_SEX, records.META_AGE, records.META_VIEW, records.META_COLUMNS)


def record_metadata(data_dir: str, split: str, manifest: dict | None = None
                    ) -> tuple[list[str], list[dict[str, bytes]]]:
  """(filenames, attribute fields) of every record of `split`, in manifest order: the order
  `eval_dataset` yields. Parses only image/filename and the image/meta/* fields (no image is
  decoded): what evaluation's subgroups need, read apart so that training's chain never
  carries them. Records written before these fields parse to b"" (unknown)."""
  manifest = manifest if manifest is not None else schema.read_manifest(data_dir)
  files = schema.shard_paths(data_dir, manifest, split)
  spec = {k: v for k, v in records.feature_spec().items() if k in (records.FILENAME, *META_KEYS)}
  ds = tf.data.TFRecordDataset(files, buffer_size=_READ_BUFFER_BYTES).batch(1024)
  ds = ds.map(lambda s: tf.io.parse_example(s, spec))   # in order: no parallel calls
  names: list[str] = []
  values: list[dict[str, bytes]] = []
  for batch in ds:
    names.extend(f.decode("utf-8", "replace") for f in batch[records.FILENAME].numpy())
    cols = {k: batch[k].numpy() for k in META_KEYS}
    values.extend({k: cols[k][i] for k in META_KEYS} for i in range(len(cols[META_KEYS[0]])))
  return names, values


@dataclasses.dataclass(frozen=True)
class EvalPlan:
  """A split evaluated in equal, full global batches (`eval_dataset(padded=True)`).

  steps: global batches that cover every input pipeline's share of the split
    (the pipeline with the most examples decides; the others pad more).
  weight: the sample weight of a real example; padding weighs 0. It is
    steps * global_batch / examples, so that Keras' loss, a mean over every
    batch element weighted by batch size, comes out as the mean over the real
    examples; accuracy, precision, recall and AUC are ratios of weighted
    counts, so a common weight leaves them exact. Multi-label targets carry
    their own mask (padding's is 0): there the weight is 1 for every element.
  """
  steps: int
  weight: float
  examples: int
  padding: int
  counts: tuple[int, ...]   # examples each input pipeline reads (`pipeline_examples`)
  per_step: int             # one pipeline's examples in a step: its replicas' batches


def pipeline_examples(manifest: dict, split: str, num_pipelines: int = 1) -> list[int]:
  """Examples each input pipeline reads of an evaluation split (`_dataset`'s sharding:
  by file, files i, i + n, ...; by element when there are fewer files than pipelines)."""
  n = stats.num_examples(manifest, split)
  if num_pipelines <= 1:
    return [n]
  shards = schema.split_info(manifest, split).get("shards") or []
  if len(shards) >= num_pipelines and all("num_examples" in s for s in shards):
    return [sum(int(s["num_examples"]) for s in shards[i::num_pipelines])
            for i in range(num_pipelines)]
  return [len(range(i, n, num_pipelines)) for i in range(num_pipelines)]


def eval_plan(manifest: dict, split: str, global_batch: int, num_pipelines: int = 1,
              multi_label: bool = False) -> EvalPlan:
  """Steps and weights of a padded evaluation over `num_pipelines` input pipelines."""
  counts = pipeline_examples(manifest, split, num_pipelines)
  per_step = max(1, int(global_batch) // max(1, num_pipelines))   # one pipeline's share of a step
  steps = max(1, max(-(-c // per_step) for c in counts))
  examples = sum(counts)
  padding = steps * per_step * len(counts) - examples
  weight = 1.0 if multi_label else steps * per_step * len(counts) / max(examples, 1)
  return EvalPlan(steps=steps, weight=weight, examples=examples, padding=padding,
                  counts=tuple(counts), per_step=per_step)


def _dataset(data_dir: str, split: str, spec: InputSpec, *, training: bool, batch_size: int,
             input_context, label_mode: str, with_filenames: bool, drop_remainder: bool,
             manifest: dict | None, padded: bool = False) -> tf.data.Dataset:
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
  size, aspect, contract = int(spec.image_size), spec.aspect, int(spec.pixel_contract)
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

  # What the record images can be (PNG/JPEG, bit depths, largest side), from
  # the manifest: the contract builds only those decode branches.
  forms = pixels.StoredForms.from_image_stats(manifest.get("image_stats"))

  def to_pixels(serialized):
    # parse -> decode -> resize -> uint8: the per-record work the cache saves.
    features = tf.io.parse_single_example(serialized, parse_spec)
    # The pixel contract: encoded bytes -> uint8 [S, S, C], the one per-record pixel call.
    image = pixels.load_image(features[records.ENCODED], channels=channels, size=size,
                              aspect=aspect, forms=forms, contract=contract)
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
    # Sharding by element, every pipeline must draw the same file order.
    seed = 0 if shard_by_element and spec.seed is None else spec.seed
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  if training:
    # Interleave: read several shards at once; non-deterministic order lets a
    # slow read (gs://) not stall the others. In order when sharding by
    # element: each pipeline takes every n-th record of the same sequence.
    ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER_BYTES),
                       cycle_length=min(len(files), _MAX_CYCLE_LENGTH), block_length=1,
                       num_parallel_calls=AUTOTUNE,
                       deterministic=deterministic or shard_by_element)
  else:
    # Evaluation: shard after shard, records in file order (manifest order).
    ds = ds.flat_map(lambda f: tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER_BYTES))
  # Too few files for the pipelines: shard by element (every file read everywhere).
  if shard_by_element:
    ds = ds.shard(num_pipelines, pipeline_id)
  key = _settings_key(data_dir, files, split, size, aspect, channels, with_filenames,
                      multi_label=label_mode == "multi_label", contract=contract)
  cache_key = f"{key}-{pipeline_id}of{num_pipelines}"
  cache = spec.cache
  if cache == "auto" and not use_service:
    cache = _auto_cache(split, cache_key, examples_here, size, channels, spec.cache_dir)
  buffer = max(1, min(int(spec.shuffle_buffer), examples_here))
  first = _first_epoch_buffer(batch, buffer)
  # A file cache an earlier run finished is read, not decoded: nothing to
  # stream, so its epoch 1 is shuffled like every other; except with
  # spec.deterministic, where a rerun must repeat the first run's order.
  stream_first_epoch = (training and not use_service and cache not in NO_CACHE and first < buffer
                        and (bool(spec.deterministic)
                             or not _file_cache_written(cache, cache_key)))
  if stream_first_epoch:
    # A cached pipeline's epoch 1 (the one that decodes and fills the cache)
    # is shuffled here, as still-encoded records, through a buffer of
    # FIRST_EPOCH_BATCHES batches: the first step waits for one batch of
    # decoding, not for a buffer of decoded images. The converter stored the
    # records in shuffled order, and the files come shuffled and interleaved.
    ds = ds.shuffle(first, seed=spec.seed)
  # Parse, decode and resize in parallel, to uint8 [S, S, C].
  ds = ds.map(to_pixels, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
  # Cache the deterministic work. Augmentation is random and lives in the model.
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
    ds = _cache(ds, cache, cache_key)
  if padded and not training:
    # Distributed evaluation: a weight per example, then weight-0 padding up to
    # the plan's steps, so every replica runs the same number of full batches.
    global_batch = batch * (input_context.num_replicas_in_sync if input_context else 1)
    plan = eval_plan(manifest, split, global_batch, num_pipelines,
                     multi_label=label_mode == "multi_label")
    padding = plan.steps * plan.per_step - plan.counts[pipeline_id]   # this pipeline's share
    ds = ds.map(lambda image, label, *rest: (image, label, tf.constant(plan.weight, tf.float32), *rest))
    blank = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
    pad_weight = plan.weight if label_mode == "multi_label" else 0.0
    blank = (blank[0], blank[1], tf.constant(pad_weight, tf.float32), *blank[3:])
    ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding))
  if training and not use_service:
    # Shuffle after the cache (a fresh order each epoch), then repeat forever:
    # Keras counts epochs with steps_per_epoch (stats.steps_per_epoch).
    later = ds.shuffle(buffer, seed=spec.seed, reshuffle_each_iteration=True).repeat()
    # With a cache, epoch 1 streams as it is decoded (shuffled above, before
    # the decode); every later epoch replays the cache through the full buffer.
    ds = ds.concatenate(later) if stream_first_epoch else later
  # Batch the per-replica batch. drop_remainder makes the shape fully static
  # (TPU, XLA) and every training step the same size.
  # Always in order (here and in the label map): a batch built or passed on
  # out of order moves examples across the epoch boundary (one epoch sees an
  # example twice, the next not at all). The order within the stream stays
  # random: the shuffle makes it, the interleave and the decode map may vary it.
  ds = ds.batch(batch, drop_remainder=drop_remainder or padded, num_parallel_calls=AUTOTUNE,
                deterministic=True)
  # Labels in the form the loss wants (vectorised, per batch).
  ds = ds.map(_label_fn(label_mode, len(classes)), num_parallel_calls=AUTOTUNE,
              deterministic=True)  # batches in order, as above
  if training and (spec.mixup_alpha > 0 or spec.cutmix_alpha > 0):
    # Mixup / cutmix: each batch with its reverse, images and labels alike (soft labels).
    if label_mode == "int":
      raise ValueError("mixup/cutmix need label_mode binary, one_hot or multi_label (soft labels)")
    mix = dict(mixup_alpha=float(spec.mixup_alpha), cutmix_alpha=float(spec.cutmix_alpha),
               multi_label=label_mode == "multi_label", seed=spec.seed)
    ds = ds.map(lambda image, label, *rest: (*augment.mix_batch(image, label, **mix), *rest),
                num_parallel_calls=AUTOTUNE, deterministic=True)
  # Overlap host work with the device step.
  ds = ds.prefetch(AUTOTUNE)
  ds = ds.with_options(_options(spec, deterministic, own_sharding=num_pipelines > 1))
  logging.info("%s: %d examples in %d shards -> batches of %d (%s), %dx%dx%d %s, cache=%s%s",
               split, num_examples, len(files), batch,
               "training: shuffled, repeated" if training else "one ordered pass",
               size, size, channels, aspect,
               cache if cache == spec.cache else f"{spec.cache} ({cache})",
               f", pipeline {pipeline_id + 1}/{num_pipelines}" if num_pipelines > 1 else "")
  return ds


@dataclasses.dataclass(frozen=True)
class CacheDecision:
  """What cache="auto" chose and the numbers behind it (`decide_cache`)."""
  choice: str          # "memory", "file" or "off"
  needed: int          # bytes of decoded pixels to cache
  ram_available: int   # the host's MemAvailable, bytes
  ram_taken: int       # bytes other in-memory caches of this process already hold
  ram_share: float
  disk_free: int       # free bytes on the cache folder's disk (-1: unknown)
  disk_share: float

  def describe(self) -> str:
    """The one log line: the choice, then needed bytes, RAM, share, disk."""
    room = max(0, int(self.ram_available * self.ram_share) - self.ram_taken)
    disk = _human(self.disk_free) if self.disk_free >= 0 else "unknown"
    return (f"cache=auto -> {self.choice}: needs {_human(self.needed)}; RAM {_human(room)} free for "
            f"caches ({self.ram_share:.0%} of {_human(self.ram_available)} available, less "
            f"{_human(self.ram_taken)} already cached); disk {disk} free "
            f"(uses up to {self.disk_share:.0%})")


def decide_cache(needed: int, *, ram_available: int, ram_taken: int = 0, disk_free: int = -1,
                 ram_share: float = CACHE_RAM_SHARE,
                 disk_share: float = CACHE_DISK_SHARE) -> CacheDecision:
  """cache="auto": memory when `needed` bytes fit ram_share of the available
  RAM less what other caches took, else a file when they fit disk_share of
  the free disk, else off. Pure: the caller measures RAM and disk."""
  if needed <= int(ram_available * ram_share) - ram_taken:
    choice = "memory"
  elif disk_free >= 0 and needed <= int(disk_free * disk_share):
    choice = "file"
  else:
    choice = "off"
  return CacheDecision(choice, int(needed), int(ram_available), int(ram_taken), ram_share,
                       int(disk_free), disk_share)


def decoded_bytes(examples: int, size: int, channels: int) -> int:
  """Bytes of `examples` decoded uint8 S x S x C images (what a cache holds, labels aside)."""
  return int(examples) * int(size) * int(size) * int(channels)


def available_ram() -> int:
  """The host's MemAvailable in bytes (/proc/meminfo), else free physical pages."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return 0


def _disk_free(folder: str) -> int:
  """Free bytes on the disk holding `folder` (or its nearest existing parent); -1 if unknown."""
  path = os.path.abspath(folder)
  while path and not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return -1


def _auto_cache(split: str, key: str, examples: int, size: int, channels: int,
                cache_dir: str) -> str:
  """cache="auto" for one split's pipeline: "memory", a file prefix or "off" (logged)."""
  folder = cache_dir or _DEFAULT_CACHE_DIR
  local = "://" not in folder
  taken = sum(v for k, v in _MEMORY_CACHED.items() if k != key)
  decision = decide_cache(decoded_bytes(examples, size, channels), ram_available=available_ram(),
                          ram_taken=taken, disk_free=_disk_free(folder) if local else -1)
  logging.info("%s (%d examples x %dx%dx%d B): %s", split, examples, size, size, channels,
               decision.describe())
  if decision.choice == "memory":
    _MEMORY_CACHED[key] = decision.needed
    return "memory"
  if decision.choice == "file":
    return os.path.join(folder, "cache")
  return "off"


def _human(n: int) -> str:
  n = float(n)
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if abs(n) < 1000 or unit == "TB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1000
  return f"{n:.1f} TB"


def _cache(ds: tf.data.Dataset, cache: str, key: str) -> tf.data.Dataset:
  """cache: 'memory' (RAM), 'off'/'' (none), else a file prefix (local or gs://)."""
  if cache in NO_CACHE:
    return ds
  if cache == "memory":
    return ds.cache()
  path = _file_cache_path(cache, key)
  parent = os.path.dirname(path)
  if parent and not tf.io.gfile.exists(parent):
    tf.io.gfile.makedirs(parent)
  logging.info("caching decoded images to %s*", path)
  return ds.cache(path)


def _file_cache_path(cache: str, key: str) -> str:
  # One file set per (data, split, size, aspect, channels, contract, pipeline): a cache
  # written for other settings is never read back by mistake.
  return f"{cache}-{key}"


def _file_cache_written(cache: str, key: str) -> bool:
  """A complete file cache is there: tf.data writes its index when an epoch finishes."""
  return (cache not in NO_CACHE and cache != "memory"
          and tf.io.gfile.exists(_file_cache_path(cache, key) + ".index"))


def _first_epoch_buffer(batch: int, buffer: int) -> int:
  """The shuffle buffer of a cached pipeline's first epoch: FIRST_EPOCH_BATCHES batches."""
  return min(buffer, max(1, FIRST_EPOCH_BATCHES * int(batch)))


def _settings_key(data_dir, files, split, size, aspect, channels, with_filenames,
                  multi_label: bool = False, contract: int = pixels.CONTRACT_VERSION) -> str:
  """`val-224px-squash-c1-p5-<hash of the data's location and shards>`: names caches and jobs
  (p5: the pixel contract).

  The cached elements' structure is in it too ("-fn" with filenames, "-ml"
  with multi-label targets), so a cache is only read back in its own form.
  """
  where = data_dir if "://" in data_dir else os.path.abspath(data_dir)
  digest = hashlib.sha1("\n".join([where] + files).encode()).hexdigest()[:8]
  extra = ("-fn" if with_filenames else "") + ("-ml" if multi_label else "")
  return f"{split}-{size}px-{aspect}-c{channels}-p{contract}{extra}-{digest}"


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
