"""Shared test fixtures.

Real data lives in ../shared/data (read-only, never copied into the project);
tests that need it skip with a reason when it is absent (e.g. a bare clone).
"""

import fcntl
import json
import os
import pathlib
import shutil
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


def built_once(tmp_path_factory, name: str, build):
  """`build(folder)`'s result (JSON-able), built once per test run even under pytest-xdist.

  Without xdist: `build` gets a fresh temp folder. Under xdist (`make test`), the first worker
  that asks builds it in the run's temp root (shared by the workers) under a file lock; the
  others wait for it and get the same result. What it builds is read-only for the tests.
  """
  if "PYTEST_XDIST_WORKER" not in os.environ:
    return json.loads(json.dumps(build(tmp_path_factory.mktemp(name))))
  root = tmp_path_factory.getbasetemp().parent   # <run>/popen-gwN -> <run>
  folder, done = root / f"shared-{name}", root / f"shared-{name}.json"
  with open(root / f"shared-{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        text = json.dumps(build(folder))
        done.with_suffix(".tmp").write_text(text)
        done.with_suffix(".tmp").replace(done)
      return json.loads(done.read_text())
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


# -- Demo data (Helper A): a tiny synthetic set, converted with the real converter. --

@pytest.fixture(scope="session")
def demo_images_dir(tmp_path_factory) -> str:
  """Synthetic class-per-folder images: DIR/{train,val,test}/{NORMAL,PNEUMONIA}/p00000_0.png.

  60 grayscale 8-bit PNGs of 64x64 px (train 44, val 8, test 8; classes balanced);
  PNEUMONIA images carry bright lung opacities a small CNN can learn. Read-only.
  """
  def build(folder):
    from tfrecord_tools import synthetic
    out = folder / "images"
    synthetic.generate(str(out), num_images=60, size=64, bit_depth=8, num_classes=2,
                       seed=0, with_splits=True)
    return str(out)
  return built_once(tmp_path_factory, "demo_images", build)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory, demo_images_dir) -> str:
  """`demo_images_dir` converted to TFRecords: DIR/dataset.json + shards (str path).

  classes ["NORMAL", "PNEUMONIA"]; train: 44 examples, val: 8, test: 8 (classes balanced),
  2 shards per split; records hold 64x64 1-channel 8-bit PNGs. Read-only: do not write into it.
  """
  def build(folder):
    from tfrecord_tools import convert as convert_lib
    out = folder / "tfrecords"
    convert_lib.convert(convert_lib.ConvertOptions(
        input_dir=demo_images_dir, output_dir=str(out), num_shards=2, num_workers=1,
        quiet=True))
    return str(out)
  return built_once(tmp_path_factory, "demo_data", build)


# -- The shared trained run: one real training, read by many tests. --

@pytest.fixture(scope="session")
def trained_run(demo_data_dir, tmp_path_factory) -> str:
  """A real run directory trained once per test run on `demo_data_dir` (str path).

  `xraytpu.training.train_lib.train_and_evaluate`: xray_cnn, 32x32 px, batch 8, 1 epoch,
  no augmentation, seed 0. Read-only: tests that write into a run take a private copy
  (tests._runs.copy_run / evaluated_copy).
  """
  def build(folder):
    from tests._runs import train_shared_run
    return train_shared_run(demo_data_dir, str(folder / "run"))
  return built_once(tmp_path_factory, "trained_run", build)


@pytest.fixture(scope="session")
def chexnet_recipe_run(tmp_path_factory) -> str:
  """configs/chexnet.flags (densenet121, the 14-finding NIH recipe) made fast as for every
  recipe (tests._runs.recipe_flags, 32 px), trained once in-process on the multi-label data of
  tests/_multilabel.py: the one training tests/test_configs.py and tests/test_multilabel_train.py
  both check. Read-only.
  """
  def build(folder):
    from tests._multilabel import write_multilabel_dataset
    from tests._runs import train_recipe
    data = folder / "tfrecords"
    write_multilabel_dataset(data)
    return train_recipe(ROOT / "configs" / "chexnet.flags", str(data), str(folder / "run"), 32)
  return built_once(tmp_path_factory, "chexnet_recipe_run", build)


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


# -- Under pytest-xdist (`make test`: -n 2 --dist loadfile): the longest files start first --

# A file goes to one worker whole (its module fixtures are built once). Longest first, as
# measured on 2 cores (a file missing here only runs later: the order, not the result, changes).
LONG_FILES = ("test_matrix.py", "test_install.py", "test_device_check.py", "test_configs.py",
              "test_gcs_e2e.py", "test_serve.py", "test_multilabel_train.py", "test_train.py",
              "test_models.py", "test_faults.py", "test_input_pipeline.py", "test_distribute.py",
              "test_pixel_contract.py", "test_inspect.py", "test_tfds.py", "test_multilabel_real.py",
              "test_serve_browser.py", "test_dicom_viewer.py", "test_pixels_graph.py",
              "test_multilabel_eval.py", "test_launch.py", "test_data_service.py",
              "test_evaluate.py", "test_installed.py", "test_one_place.py", "test_privacy.py")


def pytest_collection_modifyitems(config, items):
  if not getattr(config.option, "numprocesses", None):
    return
  rank = {name: i for i, name in enumerate(LONG_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: files stay whole
