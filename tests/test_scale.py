"""Input at scale (issue 16): cache="auto" and grey films decoded as grey.

The cache decision is a pure function of sizes, RAM and disk
(`input_pipeline.decide_cache`), tested branch by branch; the pipeline with
cache="auto" picks memory for the tiny test data and says so in one log line.
"""

from __future__ import annotations

import io
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
  with caplog.at_level(logging.INFO):
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
  with caplog.at_level(logging.INFO):
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
  with caplog.at_level(logging.INFO):
    ds = input_pipeline.eval_dataset(tiny_data, "val", spec, batch_size=4)
    assert sum(int(x.shape[0]) for x, _ in ds) == 10
  assert any("cache=auto -> off" in r.getMessage() for r in caplog.records)
  assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("cache", ["memory", "off", "path"])
def test_explicit_caches_keep_working(tiny_data, tmp_path, cache, caplog):
  value = str(tmp_path / "explicit" / "c") if cache == "path" else cache
  spec = input_pipeline.InputSpec(image_size=SIZE, channels=1, aspect="squash", cache=value)
  with caplog.at_level(logging.INFO):
    ds = input_pipeline.eval_dataset(tiny_data, "val", spec, batch_size=4)
    assert sum(int(x.shape[0]) for x, _ in ds) == 10
  assert not any("cache=auto" in r.getMessage() for r in caplog.records)
  if cache == "path":
    assert list((tmp_path / "explicit").glob("c-val-*"))
