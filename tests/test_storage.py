"""tfrecord_tools.storage on local paths and on gs:// through a local GCS emulator."""

import os

import pytest

from tfrecord_tools import storage


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "root")
  return request.getfixturevalue("gcs_emulator").url(f"storage/{tmp_path.name}")


def test_files_round_trip(root):
  assert not storage.exists(root)
  storage.makedirs(root)
  storage.write_text(storage.join(root, "a.json"), '{"x": 1}')
  storage.write_bytes(storage.join(root, "sub", "b.bin"), b"\x00\x01" * 1000)
  with storage.open(storage.join(root, "sub", "c.txt"), "w") as f:
    f.write("line 1\n")
  assert storage.read_text(storage.join(root, "a.json")) == '{"x": 1}'
  assert storage.read_bytes(storage.join(root, "sub", "b.bin"), offset=2, size=3) == b"\x00\x01\x00"
  with storage.open(storage.join(root, "sub", "c.txt"), "r") as f:
    assert f.read() == "line 1\n"
  assert storage.isdir(root) and storage.isdir(storage.join(root, "sub"))
  assert not storage.isdir(storage.join(root, "a.json"))
  assert storage.listdir(root) == ["a.json", "sub"]
  assert [(r, n) for r, n, _ in storage.walk_files(root)] == [
      ("a.json", 8), ("sub/b.bin", 2000), ("sub/c.txt", 7)]
  assert storage.stat(storage.join(root, "sub", "b.bin"))[0] == 2000
  assert storage.glob(storage.join(root, "*", "*.bin")) == [storage.join(root, "sub", "b.bin")]
  storage.rename(storage.join(root, "a.json"), storage.join(root, "d.json"))
  assert not storage.exists(storage.join(root, "a.json"))
  assert storage.read_text(storage.join(root, "d.json")) == '{"x": 1}'
  with pytest.raises(FileNotFoundError):
    storage.read_bytes(storage.join(root, "missing"))
  with pytest.raises(FileNotFoundError):
    storage.open(storage.join(root, "missing"), "rb")
  storage.rmtree(storage.join(root, "sub"))
  assert storage.listdir(root) == ["d.json"]


def test_failed_write_leaves_nothing(root):
  path = storage.join(root, "partial.bin")
  storage.makedirs(root)
  with pytest.raises(RuntimeError):
    with storage.open(path, "wb") as f:
      f.write(b"half")
      raise RuntimeError("killed mid-write")
  if storage.is_gcs(path):   # GCS: nothing uploaded; local files are written in place
    assert not storage.exists(path)
  storage.write_bytes(path, b"whole")
  assert storage.read_bytes(path) == b"whole"


def test_mirror_push_and_pull(gcs_emulator, tmp_path):
  remote = gcs_emulator.url(f"mirror/{tmp_path.name}")
  storage.write_text(f"{remote}/kept_by_others.txt", "not ours")
  m = storage.Mirror(remote)
  try:
    assert m.pull() == 1
    with open(os.path.join(m.local, "new.txt"), "w") as f:
      f.write("one")
    os.makedirs(os.path.join(m.local, "ckpt"))
    with open(os.path.join(m.local, "ckpt", "w.h5"), "wb") as f:
      f.write(b"w" * 100)
    assert m.push() == (2, 0)
    assert m.push() == (0, 0)              # nothing changed: nothing uploaded
    os.remove(os.path.join(m.local, "ckpt", "w.h5"))
    os.remove(os.path.join(m.local, "kept_by_others.txt"))
    assert m.push() == (0, 2)              # deletions follow
    assert storage.listdir(remote) == ["new.txt"]
  finally:
    m.close()
  with storage.local_copy(remote) as local:
    assert os.listdir(local) == ["new.txt"]
  with storage.staged_output(f"{remote}/export") as out:
    with open(os.path.join(out, "saved_model.pb"), "wb") as f:
      f.write(b"pb")
  assert storage.read_bytes(f"{remote}/export/saved_model.pb") == b"pb"


def test_missing_bucket_is_a_clear_error(gcs_emulator):
  with pytest.raises(storage.StorageError, match="bucket does not exist"):
    storage.write_bytes("gs://no-such-bucket-here/x", b"1")


def test_local_paths_pass_through(tmp_path):
  with storage.local_copy(str(tmp_path)) as p:
    assert p == str(tmp_path)
  m = storage.Mirror(str(tmp_path))
  assert m.local == str(tmp_path) and m.pull() == 0 and m.push() == (0, 0)
