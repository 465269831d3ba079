"""Input at scale (issue 16): cache="auto" and grey films decoded as grey.

The cache decision is a pure function of sizes, RAM and disk
(`input_pipeline.decide_cache`), tested branch by branch; the pipeline with
cache="auto" picks memory for the tiny test data and says so in one log line.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfrecord_tools import pixels
from xraytpu.config import Config
from xraytpu.data import input_pipeline
from tests.test_input_pipeline import SIZE, write_tiny_dataset

GB = 10 ** 9


# ---- cache="auto": the decision ---------------------------------------------

def test_decoded_bytes():
  # examples x S x S x C
  assert input_pipeline.decoded_bytes(112_000, 320, 1) == 112_000 * 320 * 320
  assert input_pipeline.decoded_bytes(10, 224, 3) == 10 * 224 * 224 * 3


def test_decide_memory_when_it_fits_the_ram_share():
  d = input_pipeline.decide_cache(4 * GB, ram_available=10 * GB, disk_free=100 * GB)
  assert d.choice == "memory"
  assert (d.needed, d.ram_available, d.ram_share) == (4 * GB, 10 * GB, input_pipeline.CACHE_RAM_SHARE)


def test_decide_share_boundary():
  assert input_pipeline.decide_cache(5 * GB, ram_available=10 * GB, ram_share=0.5).choice == "memory"
  assert input_pipeline.decide_cache(5 * GB + 1, ram_available=10 * GB, ram_share=0.5,
                                     disk_free=0).choice == "off"


def test_decide_other_splits_take_their_part():
  # train already holds 3 GB of the 5 GB share: 3 GB more of val no longer fits in RAM.
  d = input_pipeline.decide_cache(3 * GB, ram_available=10 * GB, ram_taken=3 * GB,
                                  disk_free=100 * GB)
  assert d.choice == "file"
  assert input_pipeline.decide_cache(2 * GB, ram_available=10 * GB,
                                     ram_taken=3 * GB).choice == "memory"


def test_decide_file_when_ram_is_short_and_disk_has_room():
  # NIH ChestX-ray14 at 320 px, one channel: 11.5 GB on a 16 GB host.
  needed = input_pipeline.decoded_bytes(112_120, 320, 1)
  d = input_pipeline.decide_cache(needed, ram_available=16 * GB, disk_free=64 * GB)
  assert d.choice == "file"


def test_decide_off_when_neither_fits():
  needed = input_pipeline.decoded_bytes(377_000, 320, 1)   # MIMIC-CXR-JPG: 39 GB
  assert input_pipeline.decide_cache(needed, ram_available=16 * GB, disk_free=60 * GB).choice == "off"
  # Unknown disk (e.g. a gs:// cache folder): off rather than a guess.
  assert input_pipeline.decide_cache(needed, ram_available=16 * GB, disk_free=-1).choice == "off"


def test_decision_line_has_the_numbers():
  d = input_pipeline.decide_cache(3 * GB, ram_available=10 * GB, ram_taken=3 * GB,
                                  disk_free=100 * GB)
  line = d.describe()
  assert "\n" not in line
  for part in ("cache=auto -> file", "needs 3.0 GB", "50% of 10.0 GB available",
               "3.0 GB already cached", "disk 100.0 GB free"):
    assert part in line, (part, line)


def test_available_ram_reads_meminfo():
  ram = input_pipeline.available_ram()
  with open("/proc/meminfo") as f:
    kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
  # MemAvailable moves while we read it; same order of magnitude.
  assert 0.5 * kb * 1024 < ram < 2 * kb * 1024


# ---- cache="auto": the pipeline -----------------------------------------------

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  return str(write_tiny_dataset(tmp_path_factory.mktemp("scale") / "data"))


def test_config_default_is_auto():
  assert Config().cache == "auto"


def test_pipeline_auto_picks_memory_for_tiny_data(tiny_data, caplog, tmp_path, monkeypatch):
  monkeypatch.setattr(input_pipeline, "_MEMORY_CACHED", {})
  spec = input_pipeline.InputSpec(image_size=SIZE, channels=1, aspect="squash", cache="auto",
                                  cache_dir=str(tmp_path / "c"))
  with caplog.at_level(logging.INFO, logger="absl"):
    ds = input_pipeline.eval_dataset(tiny_data, "val", spec, batch_size=4)
    first = np.concatenate([x.numpy() for x, _ in ds])
    again = np.concatenate([x.numpy() for x, _ in ds])
  lines = [r.getMessage() for r in caplog.records if "cache=auto ->" in r.getMessage()]
  assert len(lines) == 1, lines
  assert "cache=auto -> memory" in lines[0]
  assert f"val (10 examples x {SIZE}x{SIZE}x1 B)" in lines[0]
  assert "needs 2.6 KB" in lines[0] and "available" in lines[0] and "disk" in lines[0]
  assert not (tmp_path / "c").exists()            # nothing written to disk
  np.testing.assert_array_equal(first, again)
  assert first.shape == (10, SIZE, SIZE, 1)
  # This split is now counted against the RAM share of the next one.
  assert sum(input_pipeline._MEMORY_CACHED.values()) == 10 * SIZE * SIZE


def test_pipeline_auto_falls_back_to_a_file(tiny_data, caplog, tmp_path, monkeypatch):
  monkeypatch.setattr(input_pipeline, "_MEMORY_CACHED", {})
  monkeypatch.setattr(input_pipeline, "available_ram", lambda: 100)   # no room in RAM
  spec = input_pipeline.InputSpec(image_size=SIZE, channels=1, aspect="squash", cache="auto",
                                  cache_dir=str(tmp_path / "c"))
  with caplog.at_level(logging.INFO, logger="absl"):
    ds = input_pipeline.eval_dataset(tiny_data, "val", spec, batch_size=4)
    n = sum(int(x.shape[0]) for x, _ in ds)
  assert n == 10
  assert any("cache=auto -> file" in r.getMessage() for r in caplog.records)
  assert list((tmp_path / "c").glob("cache-val-*")), "the file cache was not written"


def test_pipeline_auto_off_when_nothing_fits(tiny_data, caplog, tmp_path, monkeypatch):
  monkeypatch.setattr(input_pipeline, "_MEMORY_CACHED", {})
  monkeypatch.setattr(input_pipeline, "available_ram", lambda: 100)
  monkeypatch.setattr(input_pipeline, "_disk_free", lambda folder: 100)
  spec = input_pipeline.InputSpec(image_size=SIZE, channels=1, aspect="squash", cache="auto",
                                  cache_dir=str(tmp_path / "c"))
  with caplog.at_level(logging.INFO, logger="absl"):
    ds = input_pipeline.eval_dataset(tiny_data, "val", spec, batch_size=4)
    assert sum(int(x.shape[0]) for x, _ in ds) == 10
  assert any("cache=auto -> off" in r.getMessage() for r in caplog.records)
  assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("cache", ["memory", "off", "path"])
def test_explicit_caches_keep_working(tiny_data, tmp_path, cache, caplog):
  value = str(tmp_path / "explicit" / "c") if cache == "path" else cache
  spec = input_pipeline.InputSpec(image_size=SIZE, channels=1, aspect="squash", cache=value)
  with caplog.at_level(logging.INFO, logger="absl"):
    ds = input_pipeline.eval_dataset(tiny_data, "val", spec, batch_size=4)
    assert sum(int(x.shape[0]) for x, _ in ds) == 10
  assert not any("cache=auto" in r.getMessage() for r in caplog.records)
  if cache == "path":
    assert list((tmp_path / "explicit").glob("c-val-*"))


# ---- grey films decoded as grey ------------------------------------------------

def _film(h=90, w=70, seed=0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  return np.clip(40 + 2 * y + x + rng.integers(0, 30, (h, w)), 0, 255).astype(np.uint8)


def _encode(a: np.ndarray, fmt: str, quality: int = 95) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
  return buf.getvalue()


def _grey_as_rgb(fmt: str, **kw) -> tuple[np.ndarray, bytes]:
  g = _film(**kw)
  return g, _encode(np.stack([g] * 3, -1), fmt)


def test_grey_png_stored_as_rgb_becomes_grey():
  g, data = _grey_as_rgb("PNG")
  p = pixels.prepare_image(data)
  assert p.channels == 1 and p.image_format == "png"
  stored = Image.open(io.BytesIO(p.encoded))
  assert stored.mode == "L"                         # re-encoded grey: a third of the bytes
  np.testing.assert_array_equal(np.asarray(stored), g)


def test_grey_jpeg_stored_as_rgb_keeps_its_bytes_as_one_channel():
  _, data = _grey_as_rgb("JPEG")
  p = pixels.prepare_image(data)
  assert p.encoded == data                          # no second lossy encode
  assert p.channels == 1
  # What makes that safe: libjpeg's grey output is its RGB output's every channel.
  rgb = tf.io.decode_jpeg(data, 3, dct_method="INTEGER_ACCURATE").numpy()
  grey = tf.io.decode_jpeg(data, 1, dct_method="INTEGER_ACCURATE").numpy()
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 1])
  np.testing.assert_array_equal(grey[..., 0], rgb[..., 0])


def test_grey_jpeg_reencoded_when_resized_is_grey():
  _, data = _grey_as_rgb("JPEG", h=400, w=300)
  p = pixels.prepare_image(data, max_side=100)
  assert p.channels == 1 and Image.open(io.BytesIO(p.encoded)).mode == "L"
  assert max(p.height, p.width) == 100


def test_colour_and_explicit_channels_are_untouched():
  g = _film()
  colour = np.stack([g, g, np.roll(g, 1, axis=0)], -1)     # one channel differs
  assert pixels.prepare_image(_encode(colour, "PNG")).channels == 3
  _, grey_rgb = _grey_as_rgb("PNG")
  assert pixels.prepare_image(grey_rgb, channels="3").channels == 3
  assert pixels.prepare_image(grey_rgb, channels="1").channels == 1


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_graph_half_follows_the_grey_rule(fmt):
  _, data = _grey_as_rgb(fmt)
  want = pixels.prepare_image(data)
  got = pixels.prepare_in_graph(tf.constant(data)).numpy()
  if fmt == "JPEG":
    assert got == want.encoded == data               # kept byte for byte on both sides
  else:
    assert Image.open(io.BytesIO(got)).mode == "L"    # re-encoded grey on both sides
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(got))),
                                  np.asarray(Image.open(io.BytesIO(want.encoded))))


def test_converter_records_grey_rgb_films_as_one_channel(tmp_path):
  from tfrecord_tools import convert as convert_lib, schema
  from xraytpu.data import stats
  for c, cls in enumerate(("NORMAL", "PNEUMONIA")):
    (tmp_path / "in" / cls).mkdir(parents=True)
    for i in range(3):
      _, data = _grey_as_rgb("JPEG" if i % 2 else "PNG", seed=10 * c + i)
      (tmp_path / "in" / cls / f"{i}.{'jpg' if i % 2 else 'png'}").write_bytes(data)
  out = tmp_path / "out"
  convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=str(tmp_path / "in"), output_dir=str(out), num_shards=1, num_workers=1,
      quiet=True, val_fraction=0.0, test_fraction=0.0))
  manifest = schema.read_manifest(str(out))
  assert manifest["pixel_contract"] == pixels.CONTRACT_VERSION == 5
  assert {str(k): v for k, v in manifest["image_stats"]["channels"].items() if v} == {"1": 6}
  assert stats.input_channels(manifest, Config()) == 1
  # inspect reads every record back: a kept grey-as-RGB JPEG recorded as 1
  # channel is consistent (its three channels are equal) ...
  from tfrecord_tools import inspect as tfr_inspect
  from tfrecord_tools import records
  report = tfr_inspect.inspect_dataset(str(out), log=lambda line: None)
  assert report["ok"], report["problems"]
  # ... and a real colour JPEG recorded as 1 channel is not.
  shard = out / manifest["splits"]["train"]["shards"][0]["file"]
  examples = [tf.train.Example.FromString(r) for r in tf.data.TFRecordDataset(str(shard)).as_numpy_iterator()]
  fmt = examples[0].features.feature[records.FORMAT].bytes_list.value[0]
  h = examples[0].features.feature[records.HEIGHT].int64_list.value[0]
  w = examples[0].features.feature[records.WIDTH].int64_list.value[0]
  colour = np.zeros((h, w, 3), np.uint8)
  colour[..., 0] = 200
  buf = io.BytesIO()
  Image.fromarray(colour).save(buf, format="JPEG" if fmt == b"jpeg" else "PNG")
  examples[0].features.feature[records.ENCODED].bytes_list.value[0] = buf.getvalue()
  with tf.io.TFRecordWriter(str(shard)) as writer:
    for ex in examples:
      writer.write(ex.SerializeToString())
  report = tfr_inspect.inspect_dataset(str(out), log=lambda line: None)
  assert not report["ok"] and any("but the record says" in p for p in report["problems"])


# ---- decode scale: the coarsest JPEG DCT scale that still covers the input ------

@pytest.mark.parametrize("height, width, want", [
    (1000, 1400, 4),   # ceil(1000 / 4) = 250 >= 224, ceil(1000 / 8) = 125 < 224
    (2000, 1800, 8),   # ceil(1800 / 8) = 225
    (1792, 2000, 8),   # ceil(1792 / 8) = 224, exactly the input size
    (1785, 2000, 8),   # ceil(1785 / 8) = 224 too: libjpeg rounds up
    (1784, 2000, 4),   # ceil(1784 / 8) = 223 < 224
    (447, 600, 2),     # ceil(447 / 2) = 224
    (446, 600, 1),     # ceil(446 / 2) = 223 < 224: full size
])
def test_jpeg_decoded_at_the_coarsest_scale_covering_the_input(height, width, want):
  data = tf.io.encode_jpeg(tf.zeros([height, width, 1], tf.uint8)).numpy()
  assert int(pixels.jpeg_dct_ratio(data, 224)) == want
  image = pixels.decode_image(data, 1, min_side=224)
  assert tuple(image.shape[:2]) == (-(-height // want), -(-width // want))
  assert min(image.shape[:2]) >= 224
  assert tuple(pixels.load_image(data, channels=1, size=224).shape) == (224, 224, 1)


def test_png_reduces_as_a_jpeg_would_and_small_jpeg_decodes_at_full_size():
  png = tf.io.encode_png(tf.zeros([900, 900, 1], tf.uint8)).numpy()
  assert int(pixels.jpeg_dct_ratio(png, 224)) == 1   # no DCT: block means (contract 5)
  assert tuple(pixels.decode_image(png, 1, min_side=224).shape[:2]) == (225, 225)
  assert tuple(pixels.decode_image(png, 1, min_side=224, contract=4).shape[:2]) == (900, 900)
  jpeg = tf.io.encode_jpeg(tf.zeros([900, 900, 1], tf.uint8)).numpy()
  assert tuple(pixels.decode_image(jpeg, 1, min_side=0).shape[:2]) == (900, 900)  # 0: always full


# ---- benchmarks: the new cases run and report (no timing assertions) -------------

def _row(name, rate, ratio):
  return {"name": name, "label": name, "images_per_sec": rate, "ratio_to_idg": ratio,
          "median_wait_ms": 1.0}


def test_input_benchmark_bound_and_fractions(tiny_data):
  # In-process: the benchmarks define their flags only when run as commands (define_flags).
  from benchmarks import input_pipeline as bench
  bound = bench.run_bound(tiny_data, SIZE, 8, 1, passes=2)
  alone = bench.run_rounds([bench.XraytpuContender(tiny_data, SIZE, 8, 2, 1, 0, {}, cache=cache,
                                                   alone=True, contract=contract)
                            for cache, contract in (("memory", 0), ("off", 0), ("off", 4))], 2)
  table = bench.format_table({"contenders": [
      _row("step_alone", 600.0, 60.0),
      _row("idg_flow_from_directory", 10.0, 1.0), _row("xraytpu_first_epoch", 90.0, 9.0),
      _row("xraytpu_steady", 500.0, 50.0), _row("xraytpu_no_cache_first_epoch", 40.0, 4.0),
      _row("xraytpu_no_cache", 70.0, 7.0), _row("bound", 100.0, 10.0), _row("bound_step", 80.0, 8.0),
      _row("xraytpu_input_first_epoch", 85.0, 8.5), _row("xraytpu_input_steady", 2000.0, 200.0),
      _row("xraytpu_input_no_cache", 75.0, 7.5), _row("bound_independent", 100.0, 10.0),
      _row("xraytpu_input_contract4_no_cache", 60.0, 6.0)]})
  r = json.loads(json.dumps({"name": bound.name, "images": bound.images, "epochs": bound.epochs,
                             "rate": bound.images_per_sec, "table": table,
                             "alone": [[a.name, a.label, a.images, a.epochs, a.images_per_sec]
                                       for a in alone]}))
  # Two passes over the 24 training records, both counted.
  assert r["name"] == "bound" and r["images"] == 48 and r["epochs"] == 2 and r["rate"] > 0
  table = r["table"]
  assert "first epoch >= 80% of the bound (B): 90% (no target: the step shares the cores" in table
  assert "target first epoch >= 80% of the bound (BS): 112% met" in table
  assert "target no cache, epochs 2+ >= 80% of the bound (B)" not in table
  assert "target no cache, epochs 2+ >= 80% of the bound (BS): 88% met" in table
  assert "no cache, epoch 1 >= 80% of the bound (BS): 50% (no target)" in table
  assert "target steady >= 40x (1): 50.0x met" in table
  assert "ceiling: the step alone (S) is 60.0x (1) on this host; the steady state reaches 83% of it" in table
  # The input alone, like with like against (B).
  assert "target first epoch (input alone) >= 80% of the bound (B): 85% met" in table
  assert "target no cache, epochs 2+ (input alone) >= 80% of the bound (B): 75% NOT met" in table
  assert "input alone, steady: 200.0x (1)" in table
  assert "(input alone) >= 80% of the bound (BS)" not in table
  assert "target no cache, epochs 2+ (input alone) >= 90% of the independent bound (Bj): 75% NOT met" in table
  assert "pixel contract 4 (runs trained before 5), no cache, epochs 2+ (input alone): 60% of (Bj)" in table
  # (4a) and (4na) ran: 2 rounds of 2 epochs, 3 full batches of 8 of the 24 records each.
  assert [(a[0], a[2], a[3]) for a in r["alone"]] == [
      ("xraytpu_input_first_epoch", 48, 2), ("xraytpu_input_steady", 48, 2),
      ("xraytpu_input_no_cache_first_epoch", 48, 2), ("xraytpu_input_no_cache", 48, 2),
      ("xraytpu_input_contract4_no_cache_first_epoch", 48, 2), ("xraytpu_input_contract4_no_cache", 48, 2)]
  assert all(a[4] > 0 for a in r["alone"]) and r["alone"][0][1].startswith("(4a) xraytpu input alone")


def test_convert_benchmark_speedup_and_peak_rss(tmp_path):
  from benchmarks import convert as bench
  from tfrecord_tools import synthetic
  inp = tmp_path / "in"
  synthetic.generate(str(inp), num_images=6, size=64, image_format="jpeg", rgb=True)
  res = bench.run_benchmark(str(inp), str(tmp_path / "work"), max_side=32, workers=1,
                            worker_counts=[1, 2], num_shards=2, rss_scales=[1, 3])
  ours = [r for r in res["rows"] if "speedup_vs_1" in r]
  assert [r["workers"] for r in ours] == [1, 2] and ours[0]["speedup_vs_1"] == 1.0
  assert [(r["scale"], r["images"], r["converted"]) for r in res["peak_rss"]] == [(1, 6, 6), (3, 18, 18)]
  assert all(r["total_peak_mib"] > 0 and r["main_peak_mib"] > 0 for r in res["peak_rss"])
  table = bench.format_table(res)
  assert "vs 1 worker" in table and "peak RSS, 18 images (3x)" in table


def test_decode_scale_benchmark_trains_and_evaluates_both_decodes(tmp_path):
  # In-process: the benchmarks define their flags only when run as commands (define_flags).
  from benchmarks import decode_scale as bench
  from tfrecord_tools import synthetic
  synthetic.generate(str(tmp_path / "films"), num_images=60, size=128, image_format="jpeg")
  report = bench.run(str(tmp_path / "films"), str(tmp_path / "work"), class_map="", image_size=32,
                     epochs=1, model="xray_cnn", batch_size=8, seed=0)
  r = json.loads(json.dumps({"report": report, "table": bench.format_table(report)}))   # as --json
  report = r["report"]
  n = report["test_films"]
  # 128 px films at a 32 px input: every one decoded at 1/4 scale, and the inputs differ.
  assert n > 0 and report["dct_ratios"] == {"4": n}
  assert report["pixels"]["mean"] > 0 and report["pixels"]["films_identical"] < n
  rows = report["rows"]
  assert [(x["trained_on"], x["evaluated_on"]) for x in rows] == [
      ("reduced", "reduced"), ("reduced", "full"), ("full", "reduced"), ("full", "full")]
  assert all(0.0 <= x["auc"] <= 1.0 for x in rows)
  for x in (rows[1], rows[3]):  # each model: the paired comparison of its two evaluations
    assert x["mean_abs_probability_change"] > 0
    assert x["max_abs_probability_change"] >= x["mean_abs_probability_change"]
  assert "paired AUC difference" in r["table"] and f"{n} test films" in r["table"]

