"""xraytpu.data.input_pipeline and xraytpu.data.stats on tiny hand-made TFRecords.

`tiny_data` writes shards with `tfrecord_tools.records.make_example` and a
hand-written dataset.json: non-square images in three encodings (8-bit PNG,
16-bit PNG, JPEG), each image's pixels telling its index, so tests can follow
single examples through the pipeline. The real converter's output is covered
through the `demo_data_dir` fixture.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfrecord_tools import records, schema
from xraytpu.config import Config
from xraytpu.data import DataError, augment, input_pipeline, stats

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 16
CLASSES = ["NORMAL", "PNEUMONIA"]
# split -> (number of examples, number of shards)
LAYOUT = {"train": (24, 3), "val": (10, 2), "test": (7, 1)}


def _label(split: str, i: int) -> int:
  return 1 if i % 3 == 0 else 0  # imbalanced: a third positive


def _encode(i: int, kind: int) -> tuple[bytes, str, int]:
  """A 24x40 image whose mean brightness encodes i; PNG 8-bit, PNG 16-bit or JPEG."""
  y, x = np.mgrid[0:24, 0:40]
  base = (10 + 9 * i + (x % 5)).astype(np.float64)
  buf = io.BytesIO()
  if kind == 1:
    Image.fromarray((base * 257).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue(), "png", 16
  if kind == 2:
    Image.fromarray(base.astype(np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue(), "jpeg", 8
  Image.fromarray(base.astype(np.uint8)).save(buf, format="PNG")
  return buf.getvalue(), "png", 8


def write_tiny_dataset(root: pathlib.Path, layout=LAYOUT, classes=CLASSES) -> pathlib.Path:
  root.mkdir(parents=True, exist_ok=True)
  splits = {}
  for split, (n, num_shards) in layout.items():
    per_shard = [list(range(n))[k::num_shards] for k in range(num_shards)]
    shards, counts = [], collections.Counter()
    for k, indices in enumerate(per_shard):
      name = schema.shard_name(split, k, num_shards)
      with tf.io.TFRecordWriter(str(root / name)) as w:
        for i in indices:
          encoded, fmt, depth = _encode(i, i % 3)
          label = _label(split, i) % len(classes)
          counts[classes[label]] += 1
          w.write(records.make_example(
              encoded=encoded, image_format=fmt, height=24, width=40, channels=1,
              bit_depth=depth, label=label, text=classes[label],
              filename=f"{split}/{classes[label]}/img{i:03d}.{fmt}").SerializeToString())
      shards.append({"file": name, "num_examples": len(indices)})
    splits[split] = {"num_examples": n, "class_counts": {c: counts[c] for c in classes},
                     "num_groups": None, "shards": shards}
  manifest = {"manifest_version": 1, "name": "tiny", "classes": classes, "splits": splits,
              "image_stats": {"channels": {"1": sum(v[0] for v in layout.values())}}}
  (root / schema.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
  return root


def manifest_order(data_dir) -> list[str]:
  """Filenames of a split in manifest order (shard by shard, record by record)."""
  m = schema.read_manifest(str(data_dir))
  out = {}
  for split in m["splits"]:
    names = []
    for path in schema.shard_paths(str(data_dir), m, split):
      for rec in tf.data.TFRecordDataset(path):
        ex = tf.io.parse_single_example(rec, records.feature_spec())
        names.append(ex[records.FILENAME].numpy().decode())
    out[split] = names
  return out


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> pathlib.Path:
  return write_tiny_dataset(tmp_path_factory.mktemp("tiny") / "tfrecords")


def _cfg(**kw) -> Config:
  base = dict(image_size=SIZE, batch_size=4, cache="memory", shuffle_buffer=64, seed=1,
              augment="none")
  base.update(kw)
  return Config(**base).resolve_augment()


def _spec(**kw) -> input_pipeline.InputSpec:
  return input_pipeline.InputSpec.from_config(_cfg(**kw))


def _names(ds) -> list[str]:
  return [n.decode() for batch in ds for n in batch[-1].numpy()]


# ---------------------------------------------------------------------------
# Shapes, dtypes, label modes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_shapes_and_dtypes_per_split(tiny_data, split):
  n = LAYOUT[split][0]
  for training in (True, False):
    if training:
      ds = input_pipeline.train_dataset(str(tiny_data), _spec(), global_batch=4, split=split)
    else:
      ds = input_pipeline.eval_dataset(str(tiny_data), split, _spec(), batch_size=4)
    image_spec, label_spec = ds.element_spec
    assert image_spec.dtype == tf.uint8 and label_spec.dtype == tf.int32
    if training:  # fixed shapes: drop_remainder
      assert image_spec.shape.as_list() == [4, SIZE, SIZE, 1]
      images, labels = next(iter(ds))
      assert images.shape == (4, SIZE, SIZE, 1) and labels.shape == (4,)
    else:
      sizes = [int(b[0].shape[0]) for b in ds]
      assert sizes == [4] * (n // 4) + ([n % 4] if n % 4 else [])


def test_label_modes_and_filenames(tiny_data):
  spec = _spec(channels=3)
  ds = input_pipeline.eval_dataset(str(tiny_data), "val", spec, batch_size=4, label_mode="binary",
                                   with_filenames=True)
  images, labels, names = next(iter(ds))
  assert images.shape == (4, SIZE, SIZE, 3) and images.dtype == tf.uint8
  assert labels.dtype == tf.float32 and labels.shape == (4, 1)
  assert names.dtype == tf.string
  want = [float("PNEUMONIA" in n.decode()) for n in names.numpy()]
  np.testing.assert_array_equal(labels.numpy()[:, 0], want)
  ds = input_pipeline.eval_dataset(str(tiny_data), "val", spec, batch_size=4, label_mode="one_hot")
  _, onehot = next(iter(ds))
  assert onehot.dtype == tf.float32 and onehot.shape == (4, 2)
  np.testing.assert_array_equal(onehot.numpy().sum(1), 1.0)
  with pytest.raises(ValueError):
    input_pipeline.eval_dataset(str(tiny_data), "val", spec, batch_size=4, label_mode="sparse")


def test_pixels_match_the_source_images(tiny_data):
  """16-bit PNG, 8-bit PNG and JPEG records all decode to the same brightness scale."""
  ds = input_pipeline.eval_dataset(str(tiny_data), "train", _spec(aspect="pad"), batch_size=4,
                                   with_filenames=True)
  for images, _, names in ds:
    for img, name in zip(images.numpy(), names.numpy()):
      i = int(name.decode().split("img")[1][:3])
      # pad: 24x40 -> 10x16 band in rows 3..12, black bars above and below.
      assert (img[:3] == 0).all() and (img[13:] == 0).all()
      assert abs(img[3:13].mean() - (10 + 9 * i + 2)) < 1.5, name


def test_decode_follows_the_manifests_image_stats(tiny_data):
  """With image_stats naming the record forms (PNG 8/16-bit and JPEG here) the
  pipeline builds only those decode branches: the same pixels as without
  statistics; a manifest that leaves out a form its records have fails loudly."""
  m = schema.read_manifest(str(tiny_data))
  stats_true = {**m["image_stats"], "format": {"png": 16, "jpeg": 8}, "bit_depth": {"8": 16, "16": 8},
                "height": {"min": 24, "max": 24, "mean": 24.0},
                "width": {"min": 40, "max": 40, "mean": 40.0}}

  def images(image_stats):
    ds = input_pipeline.eval_dataset(str(tiny_data), "train", _spec(aspect="pad"), batch_size=8,
                                     manifest={**m, "image_stats": image_stats})
    return np.concatenate([x.numpy() for x, _ in ds])

  np.testing.assert_array_equal(images(stats_true), images(m["image_stats"]))
  with pytest.raises(tf.errors.InvalidArgumentError, match="manifest"):
    images({**stats_true, "bit_depth": {"8": 24}})


# ---------------------------------------------------------------------------
# Evaluation: order kept, every example once; training: one permutation per epoch
# ---------------------------------------------------------------------------

def test_eval_every_example_exactly_once_in_manifest_order(tiny_data):
  want = manifest_order(tiny_data)
  for split in LAYOUT:
    ds = input_pipeline.eval_dataset(str(tiny_data), split, _spec(), batch_size=4,
                                     with_filenames=True)
    first, second = _names(ds), _names(ds)
    assert first == want[split]  # order kept, no drop, no duplicates
    assert second == first       # a second pass (from the cache) is the same


def test_training_epoch_is_a_permutation_and_repeats(tiny_data):
  n = LAYOUT["train"][0]
  ds = input_pipeline.train_dataset(str(tiny_data), _spec(), global_batch=4, with_filenames=True)
  names = [x.decode() for batch in ds.take(3 * n // 4) for x in batch[2].numpy()]
  epochs = [names[k * n:(k + 1) * n] for k in range(3)]
  for e in epochs:
    assert sorted(e) == sorted(manifest_order(tiny_data)["train"])
  assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_cached_training_streams_epoch_one_then_replays_the_cache(tiny_data, tmp_path):
  """Epoch 1 fills the cache through a one-batch buffer; epochs 2+ are read from the
  cache (the shard files are gone by then), each a fresh permutation."""
  import shutil
  data = tmp_path / "data"
  shutil.copytree(tiny_data, data)
  n, batch = LAYOUT["train"][0], 4
  assert input_pipeline._first_epoch_buffer(batch, n) == batch < n
  ds = input_pipeline.train_dataset(str(data), _spec(cache="memory"), global_batch=batch,
                                    with_filenames=True)
  it = iter(ds)
  take = lambda: [x.decode() for _ in range(n // batch) for x in next(it)[2].numpy()]  # noqa: E731
  epoch1 = take()
  m = schema.read_manifest(str(data))
  for path in schema.shard_paths(str(data), m, "train"):
    os.remove(path)
  epochs = [epoch1, take(), take(), take()]
  want = sorted(manifest_order(tiny_data)["train"])
  for e in epochs:
    assert sorted(e) == want
  assert len({tuple(e) for e in epochs[1:]}) > 1  # the full buffer reshuffles each epoch


def test_cache_does_not_freeze_augmentation(tiny_data):
  """Two epochs: identical un-augmented batches (cached), different augmented ones."""
  ds = input_pipeline.eval_dataset(str(tiny_data), "val", _spec(cache="memory"), batch_size=4)
  epoch1 = [b[0].numpy() for b in ds]
  epoch2 = [b[0].numpy() for b in ds]
  for a, b in zip(epoch1, epoch2):
    np.testing.assert_array_equal(a, b)
  aug = augment.build_augmentation(_cfg(augment="tutorial"))
  out1 = aug(tf.cast(epoch1[0], tf.float32), training=True).numpy()
  out2 = aug(tf.cast(epoch2[0], tf.float32), training=True).numpy()
  assert np.abs(out1 - out2).max() > 1.0
  # The training stream replays the same cached pixels each epoch.
  n = LAYOUT["train"][0]
  train = input_pipeline.train_dataset(str(tiny_data), _spec(), global_batch=4)
  pixels = np.concatenate([b[0].numpy() for b in train.take(2 * n // 4)])
  key = lambda arr: sorted(x.tobytes() for x in arr)  # noqa: E731
  assert key(pixels[:n]) == key(pixels[n:])


def test_a_finished_file_cache_is_shuffled_from_epoch_one(tiny_data, tmp_path):
  """Epoch 1 of a run that finds a file cache an earlier run finished reads the
  cache through the full buffer: it is not the earlier run's epoch 1 again
  (the order the cache was written in)."""
  n, batch = LAYOUT["train"][0], 4
  spec = _spec(cache=str(tmp_path / "cache" / "c"), seed=3)

  def epoch_one():
    ds = input_pipeline.train_dataset(str(tiny_data), spec, global_batch=batch, with_filenames=True)
    it = iter(ds)
    names = [x.decode() for _ in range(n // batch) for x in next(it)[2].numpy()]
    [next(it) for _ in range(n // batch)]  # epoch 2 from the cache: epoch 1 was all written
    return names

  written = epoch_one()
  assert any(f.endswith(".index") for f in os.listdir(tmp_path / "cache"))
  again = epoch_one()
  assert sorted(again) == sorted(written) == sorted(manifest_order(tiny_data)["train"])
  assert again != written
  # With deterministic input a rerun repeats the first run, cache or not.
  spec = _spec(cache=str(tmp_path / "det" / "c"), seed=3, deterministic=True)
  assert epoch_one() == epoch_one()


def test_training_sharded_by_element_partitions_every_epoch(tmp_path):
  """Fewer files than input pipelines: every pipeline must draw the same file
  order and read it in order before taking every n-th record, also unseeded."""
  data = write_tiny_dataset(tmp_path / "data", layout={"train": (12, 2)})
  want = sorted(manifest_order(data)["train"])
  spec = input_pipeline.InputSpec(image_size=SIZE, channels=1, aspect="squash", seed=None)
  streams = []
  for i in range(3):
    ds = input_pipeline.train_dataset(str(data), spec, global_batch=6, input_context=_ctx(i, 3),
                                      with_filenames=True)
    streams.append([x.decode() for b in ds.take(12) for x in b[2].numpy()])  # 6 epochs of 2 x 2
  for e in range(6):
    epoch = [n for s in streams for n in s[4 * e:4 * e + 4]]
    assert sorted(epoch) == want, e


def test_file_cache_is_keyed_and_read_back(tmp_path):
  data = write_tiny_dataset(tmp_path / "data", layout={"val": (6, 2)})
  prefix = tmp_path / "cache" / "c"
  spec = _spec(cache=str(prefix))
  first = [b[0].numpy() for b in input_pipeline.eval_dataset(str(data), "val", spec, batch_size=4)]
  written = os.listdir(tmp_path / "cache")
  assert any(f.startswith("c-val-16px-squash-c1") for f in written), written
  for f in os.listdir(data):  # the shards are gone: a second run must read the cache
    if f.endswith(".tfrecord"):
      os.remove(data / f)
  again = [b[0].numpy() for b in input_pipeline.eval_dataset(str(data), "val", spec, batch_size=4)]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  # Other settings use another cache file (and so read the (missing) shards).
  with pytest.raises(tf.errors.NotFoundError):
    list(input_pipeline.eval_dataset(str(data), "val", _spec(cache=str(prefix), image_size=8),
                                     batch_size=4))


# ---------------------------------------------------------------------------
# Sharding per input pipeline and per-replica batches
# ---------------------------------------------------------------------------

def _ctx(i: int, n: int = 2):
  return tf.distribute.InputContext(num_input_pipelines=n, input_pipeline_id=i,
                                    num_replicas_in_sync=n)


def test_shard_by_file_and_by_element(tiny_data, caplog):
  spec = _spec()
  want = manifest_order(tiny_data)
  # train: 3 shards >= 2 pipelines -> by file; test: 1 shard -> by element + a warning.
  for split in ("train", "test"):
    parts = []
    with caplog.at_level(logging.WARNING):
      caplog.clear()
      for i in range(2):
        ds = input_pipeline.eval_dataset(str(tiny_data), split, spec, batch_size=4,
                                         input_context=_ctx(i), with_filenames=True)
        assert ds.element_spec[0].shape.as_list() == [None, SIZE, SIZE, 1]
        assert max(int(b[0].shape[0]) for b in ds) == 2  # per-replica batch = 4 // 2
        parts.append(_names(ds))
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(want[split])
    warned = any("sharding by element" in r.getMessage() for r in caplog.records)
    assert warned == (split == "test")
  names = parts  # test split by element: alternate examples
  assert names[0] == want["test"][0::2] and names[1] == want["test"][1::2]


_MIRRORED_SCRIPT = r"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
from xraytpu.config import Config
from xraytpu.data import input_pipeline
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
cfg = Config(image_size=16, batch_size=8, cache="memory", augment="none").resolve_augment()
dist = strategy.distribute_datasets_from_function(
    lambda ctx: input_pipeline.train_dataset(sys.argv[1], input_pipeline.InputSpec.from_config(cfg),
                                             global_batch=cfg.batch_size, input_context=ctx,
                                             label_mode="binary"))
images, labels = next(iter(dist))
local = strategy.experimental_local_results(images)

@tf.function
def step(it):
  def replica_fn(x, y):
    return tf.cast(tf.shape(x)[0], tf.float32) + 0.0 * tf.reduce_sum(y)
  return strategy.reduce("SUM", strategy.run(replica_fn, args=next(it)), axis=None)

print(json.dumps({"replicas": strategy.num_replicas_in_sync,
                  "shapes": [t.shape.as_list() for t in local],
                  "dtypes": [t.dtype.name for t in local],
                  "devices": [t.device for t in local],
                  "label_shape": strategy.experimental_local_results(labels)[0].shape.as_list(),
                  "global_per_step": float(step(iter(dist)))}))
"""


@pytest.mark.slow
def test_per_replica_batch_under_mirrored_strategy_on_two_cpus(tiny_data):
  """Runs in a subprocess: logical devices must be set before TF initialises them."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT, str(tiny_data)],
                        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["replicas"] == 2
  assert out["shapes"] == [[4, SIZE, SIZE, 1], [4, SIZE, SIZE, 1]]
  assert out["dtypes"] == ["uint8", "uint8"]
  assert out["label_shape"] == [4, 1]
  assert out["devices"][0] != out["devices"][1]
  assert out["global_per_step"] == 8.0


# ---------------------------------------------------------------------------
# tf.data service, options, errors
# ---------------------------------------------------------------------------

def test_tf_data_service(tiny_data):
  service = tf.data.experimental.service
  dispatcher = service.DispatchServer()
  worker = service.WorkerServer(service.WorkerConfig(
      dispatcher_address=dispatcher.target.split("://")[1]))
  spec = _spec(data_service_address=dispatcher.target)
  ds = input_pipeline.train_dataset(str(tiny_data), spec, global_batch=4, with_filenames=True)
  n = LAYOUT["train"][0]
  batches = list(ds.take(2 * n // 4))
  assert all(b[0].shape == (4, SIZE, SIZE, 1) and b[0].dtype == tf.uint8 for b in batches)
  names = [x.decode() for b in batches for x in b[2].numpy()]
  # distributed_epoch: each epoch holds every example exactly once, and it repeats.
  assert sorted(names[:n]) == sorted(names[n:]) == sorted(manifest_order(tiny_data)["train"])
  del worker, dispatcher


def test_options_applied(tiny_data):
  spec = _spec(private_threads=3, ram_budget_mb=64, deterministic=True)
  ds = input_pipeline.train_dataset(str(tiny_data), spec, global_batch=4)
  opts = ds.options()
  assert opts.threading.private_threadpool_size == 3
  assert opts.autotune.ram_budget == 64 << 20
  assert opts.deterministic is True
  assert input_pipeline.train_dataset(str(tiny_data), _spec(),
                                      global_batch=4).options().deterministic is False


def test_input_spec_from_config(tiny_data):
  """Every pipeline setting comes from the Config; channels=0 is resolved with the manifest."""
  m = schema.read_manifest(str(tiny_data))
  cfg = _cfg(channels=0, aspect="pad", cache="off", shuffle_buffer=7, deterministic=True,
             private_threads=2, ram_budget_mb=5, data_service_address="grpc://h:1", seed=9)
  spec = input_pipeline.InputSpec.from_config(cfg, m)
  assert spec == input_pipeline.InputSpec(
      image_size=SIZE, channels=1, aspect="pad", cache="off", shuffle_buffer=7, deterministic=True,
      private_threads=2, ram_budget_mb=5, data_service_address="grpc://h:1", seed=9)
  assert input_pipeline.InputSpec.from_config(cfg).channels == 0  # the pipeline resolves it
  config_fields = {f.name for f in dataclasses.fields(Config)}
  assert {f.name for f in dataclasses.fields(input_pipeline.InputSpec)} <= config_fields


def test_eval_ignores_the_training_only_settings(tiny_data):
  """A training spec (shuffle, seed, tf.data service) evaluates in order, in-process, and
  gives the pixels of a plain spec built without a Config."""
  spec = _spec(data_service_address="grpc://127.0.0.1:1", shuffle_buffer=64, seed=3)
  ds = input_pipeline.eval_dataset(str(tiny_data), "val", spec, batch_size=4, with_filenames=True)
  assert ds.options().deterministic is True
  assert _names(ds) == manifest_order(tiny_data)["val"]
  plain = input_pipeline.InputSpec(image_size=SIZE, channels=1, aspect="squash")
  assert plain.cache == "off" and not plain.data_service_address
  a = [b[0].numpy() for b in ds]
  b = [b[0].numpy() for b in input_pipeline.eval_dataset(str(tiny_data), "val", plain, batch_size=4)]
  assert len(a) == len(b) == 3
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_errors_are_clear(tiny_data, tmp_path):
  with pytest.raises(schema.ManifestError, match="no manifest"):
    input_pipeline.train_dataset(str(tmp_path), _spec(), global_batch=4)
  with pytest.raises(schema.ManifestError, match="not in the data set"):
    input_pipeline.eval_dataset(str(tiny_data), "validation", _spec(), batch_size=4)
  three = write_tiny_dataset(tmp_path / "three", layout={"train": (6, 1)},
                             classes=["A", "B", "C"])
  with pytest.raises(DataError, match="2 classes"):
    input_pipeline.train_dataset(str(three), _spec(), global_batch=4, label_mode="binary")


def test_real_converter_output(demo_data_dir):
  """The converter's shards (demo_data_dir) go through the same pipeline."""
  m = schema.read_manifest(demo_data_dir)
  cfg = _cfg(image_size=32, batch_size=8)
  assert stats.input_channels(m, cfg) == 1
  spec = input_pipeline.InputSpec.from_config(cfg, m)
  ds = input_pipeline.eval_dataset(demo_data_dir, "val", spec, batch_size=8, with_filenames=True,
                                   manifest=m)
  n = sum(int(b[0].shape[0]) for b in ds)
  assert n == m["splits"]["val"]["num_examples"]
  images, labels = next(iter(input_pipeline.train_dataset(demo_data_dir, spec, global_batch=8)))
  assert images.shape == (8, 32, 32, 1) and images.dtype == tf.uint8
  assert set(labels.numpy()) <= {0, 1}


# ---------------------------------------------------------------------------
# stats: from the manifest's counts, checked against hand-computed values
# ---------------------------------------------------------------------------

def _manifest_from_folders(root: pathlib.Path, split_dirs: dict[str, str]) -> dict:
  """A manifest (the counts part) made by counting real class folders."""
  splits, classes = {}, None
  for split, sub in split_dirs.items():
    base = root / sub if sub else root
    names = sorted(d.name for d in base.iterdir() if d.is_dir())
    classes = classes or names
    counts = {c: sum(1 for f in (base / c).iterdir() if f.is_file()) for c in classes}
    splits[split] = {"num_examples": sum(counts.values()), "class_counts": counts, "shards": []}
  return {"classes": classes, "splits": splits}


def test_class_weights_and_bias_covid_ct(shared_data):
  m = _manifest_from_folders(shared_data / "covid_ct",
                             {"train": "train", "val": "val", "test": "test"})
  assert m["classes"] == ["COVID", "NonCOVID"]
  # The README: train COVID 191 / NonCOVID 233.
  assert m["splits"]["train"]["class_counts"] == {"COVID": 191, "NonCOVID": 233}
  w = stats.class_weights(m)
  assert w[0] == pytest.approx(424 / (2 * 191)) and w[1] == pytest.approx(424 / (2 * 233))
  from sklearn.utils.class_weight import compute_class_weight
  y = np.array([0] * 191 + [1] * 233)
  np.testing.assert_allclose([w[0], w[1]],
                             compute_class_weight("balanced", classes=np.array([0, 1]), y=y))
  np.testing.assert_allclose(stats.initial_bias(m), [math.log(233 / 191)], rtol=1e-6)
  assert stats.initial_bias(m).dtype == np.float32
  # val: COVID 60 / NonCOVID 56 -> 116 examples.
  assert stats.steps_per_epoch(m, "val", 32, drop_remainder=False) == 4
  assert stats.steps_per_epoch(m, "val", 32, drop_remainder=True) == 3


def test_class_weights_and_bias_chest_xray_four_classes(shared_data):
  m = _manifest_from_folders(shared_data / "chest_xray_400x300", {"train": ""})
  counts = {"BacterialPneumonia": 639, "COVID-19": 60, "Normal": 879, "ViralPneumonia": 409}
  assert m["splits"]["train"]["class_counts"] == counts  # the README's numbers
  n = sum(counts.values())  # 1987
  w = stats.class_weights(m)
  for k, c in enumerate(m["classes"]):
    assert w[k] == pytest.approx(n / (4 * counts[c]))
  assert w[1] == pytest.approx(1987 / 240)  # COVID-19, the rare class
  bias = stats.initial_bias(m)
  np.testing.assert_allclose(bias, np.log(np.array([counts[c] for c in m["classes"]]) / n),
                             rtol=1e-5)
  np.testing.assert_allclose(np.exp(bias).sum(), 1.0, rtol=1e-5)  # softmax(bias) = priors


def test_stats_edge_cases(tiny_data):
  m = schema.read_manifest(str(tiny_data))
  # train: 24 examples, i % 3 == 0 positive -> 8 PNEUMONIA, 16 NORMAL.
  assert stats.class_weights(m) == {0: pytest.approx(24 / 32), 1: pytest.approx(24 / 16)}
  assert stats.steps_per_epoch(m, "train", 5, True) == 4
  assert stats.steps_per_epoch(m, "test", 5, False) == 2
  with pytest.raises(DataError, match="fewer than one batch"):
    stats.steps_per_epoch(m, "test", 8, True)
  # A class absent from the split: weight 1.0 (Keras needs every index), finite bias.
  absent = {"classes": ["A", "B", "C"],
            "splits": {"train": {"num_examples": 4, "class_counts": {"A": 3, "B": 1, "C": 0}}}}
  assert stats.class_weights(absent) == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0), 2: 1.0}
  assert np.isfinite(stats.initial_bias(absent)).all()
  # Channels: explicit beats the data; 0 = 1 when every image is grayscale.
  assert stats.input_channels(m, Config(channels=0)) == 1
  assert stats.input_channels(m, Config(channels=3)) == 3
  mixed = dict(m, image_stats={"channels": {"1": 5, "3": 1}})
  assert stats.input_channels(mixed, Config(channels=0)) == 3
  with pytest.raises(DataError):
    stats.input_channels(m, Config(channels=2))
  assert dataclasses.replace(Config(), channels=1).channels == 1


@pytest.mark.parametrize("pipelines,replicas,batch", [(1, 1, 3), (1, 2, 8), (2, 1, 8), (2, 2, 3),
                                                      (3, 1, 5), (2, 4, 16)])
def test_padded_evaluation_counts_every_example_once(demo_data_dir, pipelines, replicas, batch):
  """Distributed validation: every pipeline yields the plan's steps x its replicas full batches,
  padding weighs 0, and the real examples (by file name) are the split, each exactly once."""
  manifest = schema.read_manifest(demo_data_dir)
  spec = input_pipeline.InputSpec(image_size=16, channels=0, aspect="squash")
  global_batch = batch * pipelines * replicas
  for split in ("train", "val"):   # 44 and 8 examples in 2 shards: by file and by element
    want = sorted(f.decode() for _, _, f in input_pipeline.eval_dataset(
        demo_data_dir, split, spec, batch_size=1000, with_filenames=True).unbatch().as_numpy_iterator())
    plan = input_pipeline.eval_plan(manifest, split, global_batch, pipelines)
    assert plan.examples == len(want) and plan.steps * global_batch == plan.examples + plan.padding
    assert plan.weight == pytest.approx(plan.steps * global_batch / len(want))
    got, total_weight = [], 0.0
    for pid in range(pipelines):
      ctx = tf.distribute.InputContext(pipelines, pid, pipelines * replicas)
      ds = input_pipeline.eval_dataset(demo_data_dir, split, spec, batch_size=global_batch,
                                       input_context=ctx, with_filenames=True, padded=True,
                                       manifest=manifest)
      batches = list(ds.as_numpy_iterator())
      assert len(batches) == plan.steps * replicas
      for image, label, weight, names in batches:
        assert image.shape == (batch, 16, 16, 1) and weight.shape == (batch,)
        assert np.all(np.isclose(weight, plan.weight, rtol=1e-6) | (weight == 0))
        got += [n.decode() for n, w in zip(names, weight) if w > 0]
        assert all(n == b"" for n, w in zip(names, weight) if w == 0)
        total_weight += float(weight.sum())
    assert sorted(got) == want
    assert total_weight == pytest.approx(plan.steps * global_batch)


def test_padded_multi_label_evaluation_masks_the_padding(tmp_path):
  """Multi-label padding carries an all-zero label mask (the loss and AUCs skip it), weight 1."""
  from tfrecord_tools import convert as convert_lib, synthetic
  images = tmp_path / "images"
  synthetic.generate_labelled(str(images), "nih", num_images=40, size=32, seed=1)
  out = tmp_path / "rec"
  convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=str(images), output_dir=str(out), num_workers=1, quiet=True,
      labels_csv=str(images / synthetic.NIH_CSV)))
  manifest = schema.read_manifest(str(out))
  k = len(manifest["classes"])
  spec = input_pipeline.InputSpec(image_size=16, channels=0, aspect="squash")
  n = manifest["splits"]["val"]["num_examples"]
  ctx = tf.distribute.InputContext(1, 0, 2)
  ds = input_pipeline.eval_dataset(str(out), "val", spec, batch_size=8, input_context=ctx,
                                   label_mode="multi_label", padded=True, manifest=manifest)
  ys, ws = zip(*[(y, w) for _, y, w in ds.as_numpy_iterator()])
  y, w = np.concatenate(ys), np.concatenate(ws)
  plan = input_pipeline.eval_plan(manifest, "val", 8, 1, multi_label=True)
  assert len(y) == plan.steps * 8 and plan.weight == 1.0 and np.all(w == 1.0)
  assert np.all(y[n:] == 0) and np.all(y[:n, k:].sum(axis=1) > 0)   # padding: mask 0
