"""Odd inputs of conversion, predict and serve (issue 24, items 1, 6, 7): the input side.

  case                                              expected
  ------------------------------------------------  ---------------------------------------------
  class folder linked into another class            both paths listed: the same file under two
  (COVID/more_cases -> ../PNEUMONIA), either layout  classes is a conflict naming the link (one
                                                    line), or --on_conflict=skip counted skips
  folder linked within its class                    converted once, the link's paths in `aliases`
  a link graph that multiplies the tree             one line (more than MAX_FOLDER_PATHS paths)
  FIFO `pipe.png`, x.png -> /dev/zero,              never opened: skipped with the reason in
  y.png -> /dev/urandom, a socket                   dataset.json (converted + skipped == found);
                                                    predict: a per-file error; folders and CSVs
  FIFO named like a DICOM to probe (`IM0001`)       ignored, never opened
  a file name that is not UTF-8                     converted, written escaped (storage.escape_name)
                                                    in records, dataset.json, skipped lists,
                                                    predict's lines and CSV, serve's answer
  the escaping                                      valid UTF-8 unchanged, reversible, documented;
                                                    split hashes taken of the raw bytes

Every test that could hang on a regression runs under an alarm (`_no_hang`): it fails instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import resource
import signal
import socket

import pytest

from tfrecord_tools import convert as convert_lib, records, schema, storage, synthetic
from tfrecord_tools.convert import find, split as split_lib

ALARM_S = 120


MEMORY_CAP = 1 << 30   # bytes of address space a test may add


class Hung(Exception):
  """Raised by the alarm (not an OSError: code under test may catch those)."""


def _address_space() -> int:
  with open("/proc/self/status") as f:
    kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
  return kb * 1024


@pytest.fixture(autouse=True)
def _no_hang():
  """A read that waits (a FIFO) fails the test instead of hanging it: an alarm."""
  def expire(signum, frame):
    raise Hung(f"still running after {ALARM_S} s: an input was read without a bound")
  old = signal.signal(signal.SIGALRM, expire)
  signal.alarm(ALARM_S)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def _bounded_memory():
  """A read that never ends (/dev/zero, /dev/urandom) fails with MemoryError instead of filling
  the machine's memory: a cap on the address space the block may add."""
  soft, hard = resource.getrlimit(resource.RLIMIT_AS)
  cap = _address_space() + MEMORY_CAP
  resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _images(tmp_path, n=12, name="images", **kw):
  """Tiny synthetic films, renamed film<i>.png: names without patient ids (no grouping)."""
  out = tmp_path / name
  synthetic.generate(str(out), num_images=n, size=32, num_classes=2, seed=1, **kw)
  os.remove(out / "synthetic.json")
  i = 0
  for folder, _, files in sorted(os.walk(out)):
    for f in sorted(files):
      os.rename(os.path.join(folder, f), os.path.join(folder, f"film{i}.png"))
      i += 1
  return out


def _convert(src, out, **kw):
  kw.setdefault("val_fraction", 0.25)
  kw.setdefault("test_fraction", 0.0)
  with _bounded_memory():
    return convert_lib.convert(convert_lib.ConvertOptions(
        input_dir=str(src), output_dir=str(out), num_workers=1, quiet=True, **kw))


def _record_names(out) -> list[bytes]:
  """image/filename of every record (read from the serialised bytes: no TensorFlow)."""
  m = schema.read_manifest(str(out))
  names = []
  for sp in m["splits"]:
    for path in schema.shard_paths(str(out), m, sp):
      for raw in records.read_records(path):
        names.append(raw)
  return names


def _counts_add_up(m):
  assert m["num_converted"] + m["num_skipped"] + m["num_dropped"] == m["num_found"]
  assert m["num_skipped"] == len(m["skipped"])


# ---- 1. class folders reached twice through links -------------------------------------


def test_a_class_folder_linked_into_another_class_is_a_conflict_naming_the_link(tmp_path):
  src = _images(tmp_path)
  os.symlink(os.path.join("..", "PNEUMONIA"), src / "NORMAL" / "more_cases")
  # Before: PNEUMONIA's films were walked as NORMAL and the real folder skipped: the class
  # vanished ("only one class"), with no word of the link.
  with pytest.raises(convert_lib.ConvertError) as e:
    _convert(src, tmp_path / "out")
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("6 file(s) have the same contents under different classes (the same files, "
                        "reached through the symbolic link NORMAL/more_cases): NORMAL/more_cases/")
  assert "(NORMAL) = PNEUMONIA/" in msg and "(and 4 more)" in msg
  assert "only one class" not in msg


def test_a_class_folder_link_in_the_splits_layout_is_a_conflict_too(tmp_path):
  src = _images(tmp_path, with_splits=True)
  os.symlink(os.path.join("..", "PNEUMONIA"), src / "train" / "NORMAL" / "more_cases")
  with pytest.raises(convert_lib.ConvertError,
                     match=r"same contents under different classes \(the same files?, reached "
                           r"through the symbolic link train/NORMAL/more_cases\): train/NORMAL/more_cases/"):
    _convert(src, tmp_path / "out", val_fraction=-1.0, test_fraction=-1.0)


def test_on_conflict_skip_counts_the_linked_copies_and_names_the_link(tmp_path):
  src = _images(tmp_path, n=16)
  films = sorted(f for f in os.listdir(src / "PNEUMONIA") if f.endswith(".png"))[:2]
  batch = src / "PNEUMONIA" / "batch2"
  batch.mkdir()
  for f in films:
    os.replace(src / "PNEUMONIA" / f, batch / f)
  os.symlink(os.path.join("..", "PNEUMONIA", "batch2"), src / "NORMAL" / "more")
  m = _convert(src, tmp_path / "out", on_conflict="skip", max_skipped_fraction=0.5)
  _counts_add_up(m)
  assert m["num_found"] == 18 and m["num_skipped"] == 4 and m["num_converted"] == 14
  reasons = {s["path"]: s["reason"] for s in m["skipped"]}
  linked = sorted(p for p in reasons if p.startswith("NORMAL/more/"))
  assert len(linked) == 2
  assert all("through the symbolic link NORMAL/more" in reasons[p] for p in linked)
  assert m["classes"] == ["NORMAL", "PNEUMONIA"]


def test_a_folder_linked_within_its_class_is_converted_once_and_listed_in_aliases(tmp_path):
  src = _images(tmp_path)
  sub = src / "NORMAL" / "sub"
  sub.mkdir()
  first = sorted(f for f in os.listdir(src / "NORMAL") if f.endswith(".png"))[0]
  os.replace(src / "NORMAL" / first, sub / first)
  os.symlink("sub", src / "NORMAL" / "again")
  m = _convert(src, tmp_path / "out")
  _counts_add_up(m)
  assert m["num_found"] == m["num_converted"] == 12
  # The path without a link is the one converted; the link's path is the alias.
  assert m["aliases"] == [{"path": f"NORMAL/again/{first}", "same_file_as": f"NORMAL/sub/{first}"}]


def test_a_folder_linked_across_split_folders_is_an_alias_with_a_warning(tmp_path):
  src = _images(tmp_path, n=24, with_splits=True)
  os.symlink(os.path.join("..", "..", "val", "NORMAL"), src / "train" / "NORMAL" / "from_val")
  lines = []
  with _bounded_memory():
    m = convert_lib.convert(convert_lib.ConvertOptions(
        input_dir=str(src), output_dir=str(tmp_path / "out"), num_workers=1),
        log=lines.append)
  _counts_add_up(m)
  val_normal = sorted(os.listdir(src / "val" / "NORMAL"))
  assert sorted(m["aliases"], key=lambda a: a["path"]) == [
      {"path": f"train/NORMAL/from_val/{f}", "same_file_as": f"val/NORMAL/{f}"} for f in val_normal]
  assert m["splits"]["val"]["class_counts"]["NORMAL"] == len(val_normal)   # converted in val only
  assert any(ln.startswith("warning: train/NORMAL/from_val/") and "across split folders" in ln
             for ln in lines), lines


def test_a_link_graph_that_multiplies_the_tree_is_one_line(tmp_path):
  src = _images(tmp_path)
  level = src / "NORMAL" / "deep"
  level.mkdir()
  for depth in range(4):   # 5 links per level: 5**4 paths reach the last folder
    nxt = level / "next"
    nxt.mkdir()
    for k in range(5):
      os.symlink("next", level / f"l{k}")
    level = nxt
  with pytest.raises(convert_lib.ConvertError,
                     match=rf"symbolic links reach the folder .* by more than {find.MAX_FOLDER_PATHS} paths"):
    _convert(src, tmp_path / "out")


# ---- 2. only regular files are read ---------------------------------------------------


def _specials(folder) -> dict[str, str]:
  """A FIFO, links to /dev/zero and /dev/urandom and a socket named as images; their reasons."""
  os.mkfifo(folder / "pipe.png")
  os.symlink("/dev/zero", folder / "x.png")
  os.symlink("/dev/urandom", folder / "y.png")
  sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  sock.bind(str(folder / "s.png"))
  sock.close()
  os.mkfifo(folder / "IM0001")   # a name probed for DICOM: never opened, ignored
  return {"pipe.png": "not a regular file (a named pipe)",
          "x.png": "not a regular file (a character device, through a symbolic link)",
          "y.png": "not a regular file (a character device, through a symbolic link)",
          "s.png": "not a regular file (a socket)"}


def test_fifos_devices_and_sockets_are_counted_skips_in_convert(tmp_path):
  src = _images(tmp_path)
  if len(str(src / "NORMAL" / "s.png")) > 100:
    pytest.skip("socket path too long for AF_UNIX")
  want = _specials(src / "NORMAL")
  m = _convert(src, tmp_path / "out", max_skipped_fraction=0.5)
  _counts_add_up(m)
  assert m["num_found"] == 16 and m["num_converted"] == 12
  assert {s["path"]: s["reason"] for s in m["skipped"]} == {f"NORMAL/{k}": v for k, v in want.items()}
  assert "NORMAL/IM0001" in m["ignored_examples"]


def test_a_fifo_named_by_a_label_csv_is_a_counted_skip(tmp_path):
  films = _images(tmp_path)
  rows = ["file,dx"]
  for cls in ("NORMAL", "PNEUMONIA"):
    rows += [f"{cls}/{f},{cls}" for f in sorted(os.listdir(films / cls)) if f.endswith(".png")]
  os.mkfifo(films / "NORMAL" / "pipe.png")
  rows.append("NORMAL/pipe.png,NORMAL")
  csv_path = tmp_path / "labels.csv"
  csv_path.write_text("\n".join(rows) + "\n")
  m = _convert(films, tmp_path / "out", labels_csv=str(csv_path), image_column="file",
               labels_column="dx", label_separator="", max_skipped_fraction=0.5)
  _counts_add_up(m)
  assert m["num_converted"] == 12 and m["num_skipped"] == 1
  assert "not a regular file (a named pipe)" in m["skipped"][0]["reason"]


def test_bare_names_in_a_label_csv_reached_through_a_folder_link_are_one_file(tmp_path):
  """A folder link inside a label CSV's image root lists each film under two paths: a bare
  file name (NIH style) that reaches one file both ways names that file, by its path
  without a link; two different files with one name stay an error."""
  films = _images(tmp_path)
  os.symlink("NORMAL", films / "also_normal")
  rows = ["file,dx"]
  for cls in ("NORMAL", "PNEUMONIA"):
    rows += [f"{f},{cls}" for f in sorted(os.listdir(films / cls)) if f.endswith(".png")]
  csv_path = tmp_path / "labels.csv"
  csv_path.write_text("\n".join(rows) + "\n")
  kw = dict(labels_csv=str(csv_path), image_column="file", labels_column="dx", label_separator="")
  m = _convert(films, tmp_path / "out", **kw)
  _counts_add_up(m)
  assert m["num_converted"] == 12 and m["num_skipped"] == 0
  assert not any(b"also_normal" in raw for raw in _record_names(tmp_path / "out"))
  first = sorted(f for f in os.listdir(films / "NORMAL") if f.endswith(".png"))[0]
  (films / "PNEUMONIA" / first).write_bytes(b"another film, same name")
  with pytest.raises(convert_lib.ConvertError, match="match several"):
    _convert(films, tmp_path / "out2", **kw)


def test_read_input_refuses_what_is_no_regular_file_and_reads_within_the_size(tmp_path):
  os.mkfifo(tmp_path / "p")
  with pytest.raises(storage.NotRegularFileError, match="named pipe"):
    storage.read_input(str(tmp_path / "p"))       # no writer: would wait forever if opened
  with pytest.raises(storage.NotRegularFileError, match="character device"), _bounded_memory():
    storage.read_input("/dev/zero")
  with pytest.raises(storage.NotRegularFileError):
    storage.stat_input("/dev/urandom")
  (tmp_path / "f").write_bytes(b"0123456789")
  assert storage.read_input(str(tmp_path / "f")) == b"0123456789"
  assert storage.read_input(str(tmp_path / "f"), 8, 100) == b"89"
  assert storage.stat_input(str(tmp_path / "f"))[0] == 10


# ---- 3. any file name works -----------------------------------------------------------

NAMES = [  # raw bytes -> how every output writes them
    (b"plain.png", "plain.png"),
    ("caf\u00e9.png".encode(), "caf\u00e9.png"),                  # valid UTF-8: unchanged
    (b"latin1-\xe9.png", "latin1-\\xe9.png"),                      # an invalid byte: \xHH
    (b"\xff\xfe.png", "\\xff\\xfe.png"),
    (b"a\\x41.png", "a\\x5cx41.png"),                             # a literal \xHH: its \ escaped
    (b"back\\slash\xff.png", "back\\slash\\xff.png"),             # other backslashes unchanged
]


@pytest.mark.parametrize("raw,text", NAMES)
def test_escape_name_is_the_documented_reversible_rule(raw, text):
  name = os.fsdecode(raw)   # as os.walk / os.listdir give it on Linux
  assert storage.escape_name(name) == storage.escape_name(raw) == text
  assert storage.unescape_name(text) == name and storage.name_bytes(text) == raw
  text.encode("utf-8")


def test_split_hashes_are_of_the_raw_bytes():
  assert split_lib.hash_key(3, "NORMAL/a.png") == hashlib.sha256(b"3\0NORMAL/a.png").digest()
  assert (split_lib.hash_key(3, "N/latin1-\\xe9.png")
          == hashlib.sha256(b"3\0N/latin1-\xe9.png").digest())


def test_names_that_are_not_utf8_are_converted_and_written_escaped(tmp_path):
  src = _images(tmp_path)
  normal = os.fsencode(str(src / "NORMAL"))
  films = sorted(f for f in os.listdir(src / "NORMAL") if f.endswith(".png"))
  os.rename(os.path.join(normal, os.fsencode(films[0])), os.path.join(normal, b"latin1-\xe9.png"))
  with open(os.path.join(normal, b"broken-\xff.png"), "wb") as f:
    f.write(b"not an image")
  # A class folder whose name is not UTF-8 is a class written escaped.
  os.rename(os.fsencode(str(src / "PNEUMONIA")), os.fsencode(str(src)) + b"/PNEUMONI\xc4")
  m = _convert(src, tmp_path / "out", max_skipped_fraction=0.5)   # before: UnicodeEncodeError
  _counts_add_up(m)
  assert m["num_converted"] == 12 and m["classes"] == ["NORMAL", "PNEUMONI\\xc4"]
  assert m["skipped"][0]["path"] == "NORMAL/broken-\\xff.png"
  text = (tmp_path / "out" / schema.MANIFEST_NAME).read_bytes().decode("utf-8")   # valid UTF-8
  assert "\\udc" not in text
  raws = _record_names(tmp_path / "out")
  assert sum(b"NORMAL/latin1-\\xe9.png" in r for r in raws) == 1
  assert sum(b"PNEUMONI\\xc4/" in r for r in raws) == 6


def test_predict_reports_fifos_devices_and_sockets_per_file(trained_run, tmp_path):
  from xraytpu.inference import predict_lib
  src = _images(tmp_path, n=4)
  folder = src / "NORMAL"
  if len(str(folder / "s.png")) > 100:
    pytest.skip("socket path too long for AF_UNIX")
  want = _specials(folder)
  out, err = io.StringIO(), io.StringIO()
  fifo_direct = str(folder / "pipe.png")
  with _bounded_memory():   # before: hung on the FIFO, read /dev/zero forever
    failed = predict_lib.run_predict(trained_run, [str(folder), fifo_direct], out=out, err=err)
  assert failed == len(want) + 1 and len(out.getvalue().splitlines()) == 2
  for name, reason in want.items():
    assert f"{folder / name}\tERROR {reason}" in err.getvalue()
  assert err.getvalue().count(f"{fifo_direct}\tERROR not a regular file (a named pipe)") == 2


def test_predict_writes_names_that_are_not_utf8_escaped(trained_run, tmp_path):
  from xraytpu.inference import predict_lib
  src = _images(tmp_path, n=4)
  folder = src / "NORMAL"
  film = sorted(os.listdir(folder))[0]
  raw = os.path.join(os.fsencode(str(folder)), b"latin1-\xe9.png")
  os.rename(os.path.join(os.fsencode(str(folder)), os.fsencode(film)), raw)
  out, err = io.StringIO(), io.StringIO()
  csv_path = tmp_path / "preds.csv"
  failed = predict_lib.run_predict(trained_run, [str(src)], output=str(csv_path), out=out, err=err)
  assert failed == 0
  escaped = f"{folder}/latin1-\\xe9.png"
  assert escaped + "\t" in out.getvalue()
  rows = csv_path.read_text(encoding="utf-8").splitlines()   # before: UnicodeEncodeError, no CSV
  assert len(rows) == 1 + 4 and any(r.startswith(escaped + ",") for r in rows)
  jsonl = tmp_path / "preds.jsonl"
  results = predict_lib.predict_files(predict_lib.load(trained_run), [os.fsdecode(raw)])
  predict_lib.write_predictions(results, ["NORMAL", "PNEUMONIA"], str(jsonl))
  assert json.loads(jsonl.read_text(encoding="utf-8"))["path"] == escaped


def test_serve_writes_an_upload_name_that_is_not_utf8_escaped():
  from xraytpu.serving import http_api
  body = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\xe9.png\"\r\n"
          b"Content-Type: image/png\r\n\r\nDATA\r\n--B--\r\n")
  files = http_api.parse_multipart(body, "multipart/form-data; boundary=B", max_files=4)
  assert files == [("x\\xe9.png", b"DATA")]
