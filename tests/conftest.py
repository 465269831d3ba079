"""Shared test fixtures.

Real data lives in ../shared/data (read-only, never copied into the project);
tests that need it skip with a reason when it is absent (e.g. a bare clone).
"""

import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("XRAYTPU_SHARED_DATA", ROOT.parent / "shared" / "data"))

# Tests run the entry points as `python -m ...` from the repository root.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The patient pseudonyms' key (tfrecord_tools.pseudonym), for this process and the entry
# points it starts: no test creates ~/.config/xraytpu/patient.key (tests/test_privacy.py
# tests that default with its own $XDG_CONFIG_HOME).
os.environ["XRAYTPU_PATIENT_KEY"] = "xraytpu-tests-patient-key-0123456789"
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data not found at {SHARED_DATA}")
  return SHARED_DATA


# -- Demo data (Helper A): a tiny synthetic set, converted with the real converter. --

@pytest.fixture(scope="session")
def demo_images_dir(tmp_path_factory) -> str:
  """Synthetic class-per-folder images: DIR/{train,val,test}/{NORMAL,PNEUMONIA}/p00000_0.png.

  60 grayscale 8-bit PNGs of 64x64 px (train 44, val 8, test 8; classes balanced);
  PNEUMONIA images carry bright lung opacities a small CNN can learn.
  """
  from tfrecord_tools import synthetic
  out = tmp_path_factory.mktemp("demo_images") / "images"
  synthetic.generate(str(out), num_images=60, size=64, bit_depth=8, num_classes=2,
                     seed=0, with_splits=True)
  return str(out)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory, demo_images_dir) -> str:
  """`demo_images_dir` converted to TFRecords: DIR/dataset.json + shards (str path).

  classes ["NORMAL", "PNEUMONIA"]; train: 44 examples, val: 8, test: 8 (classes balanced),
  2 shards per split; records hold 64x64 1-channel 8-bit PNGs. Read-only: do not write into it.
  """
  from tfrecord_tools import convert as convert_lib
  out = tmp_path_factory.mktemp("demo_data") / "tfrecords"
  convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=demo_images_dir, output_dir=str(out), num_shards=2, num_workers=1,
      quiet=True))
  return str(out)


# -- The shared trained run: one real training, read by many tests. --

@pytest.fixture(scope="session")
def trained_run(demo_data_dir, tmp_path_factory) -> str:
  """A real run directory trained once per session on `demo_data_dir` (str path).

  `xraytpu.training.train_lib.train_and_evaluate`: xray_cnn, 32x32 px, batch 8, 1 epoch,
  no augmentation, seed 0. Read-only: tests that write into a run take a private copy
  (tests._runs.copy_run / evaluated_copy).
  """
  from tests._runs import train_shared_run
  return train_shared_run(demo_data_dir, str(tmp_path_factory.mktemp("trained") / "run"))


# -- A local GCS emulator (gcp-storage-emulator, JSON API) on 127.0.0.1. --

class GcsEmulator:
  """The running emulator: `url(name)` gives a fresh gs:// folder in its bucket."""

  def __init__(self, host: str, bucket: str):
    self.host, self.bucket = host, bucket

  def url(self, name: str) -> str:
    return f"gs://{self.bucket}/{name}"

  def env(self) -> dict:
    """Environment for a subprocess that should talk to the emulator."""
    return {**os.environ, "STORAGE_EMULATOR_HOST": self.host}


@pytest.fixture(scope="session")
def gcs_emulator():
  """Starts the emulator in this process and points google-cloud-storage at it
  (STORAGE_EMULATOR_HOST, inherited by entry points run as subprocesses)."""
  import socket  # noqa: PLC0415
  from gcp_storage_emulator.server import create_server  # noqa: PLC0415
  from tfrecord_tools import storage  # noqa: PLC0415
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  bucket = "xraytpu-test"
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.start()
  old = os.environ.get("STORAGE_EMULATOR_HOST")
  os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
  storage.reset_client()
  try:
    yield GcsEmulator(os.environ["STORAGE_EMULATOR_HOST"], bucket)
  finally:
    server.stop()
    if old is None:
      os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
      os.environ["STORAGE_EMULATOR_HOST"] = old
    storage.reset_client()
