"""`--data_dir=tfds:NAME[/CONFIG][:VERSION]`: train from a TensorFlow Datasets image classifier set.

Design: a `tfds:` data_dir is materialised ONCE into the project's own format
(shards + dataset.json), and the run then names that folder as its data_dir.
Everything after that (the manifest-driven input pipeline, class weights,
evaluate, predict, export, inspect) works as for any converted folder, and
config.json records the folder, so `xraytpu.evaluate RUN` needs no TFDS.

Why not read TFDS's own shards? Their Example keys are TFDS's ("image",
"label", ...) and its DatasetInfo is not a manifest (no class counts, no pixel
contract, no shard checksums): a second record format and a second manifest
would have to be supported everywhere. Converting costs one pass over the data
and reuses the converter as is, so the records follow the one pixel contract
(tfrecord_tools.pixels) and the manifest is the converter's:

  1. `tfds.builder(NAME[/CONFIG][:VERSION], data_dir=--tfds_data_dir)`, then
     `download_and_prepare` with `--tfds_manual_dir` as the manual download
     folder (data sets such as chexpert need one; a prepared set is not
     downloaded again). A failure is one line: a missing package named, a failed
     download (no network) with the files to fetch by hand into --tfds_manual_dir,
     where TFDS finds them by name (`_prepare_hint`; docs/tfds.md).
  2. The set must be an image classifier: an Image feature and a ClassLabel
     feature (its supervised_keys, else "image" and "label"). A multi-label
     TFDS set (a Sequence of ClassLabel, e.g. chexpert) is refused with a
     pointer to `tfrecord_tools.convert --labels_csv` on the publisher's files:
     TFDS's copy does not name its findings.
  3. Its splits are written, with the images' encoded bytes unchanged (no
     decode: TFDS's SkipDecoding), to a temporary class-per-folder tree
     SPLIT/CLASS/SPLIT-NNNNNN.png; TFDS's split names go through the
     converter's own split aliases (train, validation -> val, test; other
     splits are left out, with a log line). A missing val/test split is drawn
     by the converter as for any folder.
  4. tfrecord_tools.convert.convert turns that tree into shards in the
     cache folder, with --class_map set to the ClassLabel's names in order (so
     the labels keep TFDS's numbering) and on_conflict=skip (an image that
     appears under two classes is left out and counted, not an error).

The cache folder is `--tfds_cache_dir`, or TFDS's data dir + "xraytpu/" + the
data set's full name (e.g. ~/tensorflow_datasets/xraytpu/pneumonia_mnist/1.0.0);
a complete one (dataset.json present) is reused. The temporary tree needs as
much local disk as the encoded images. In a multi-worker job, materialise the
set once first (e.g. a short single-process run, or xraytpu.train on one
worker): the converter's output lock lets only one process convert.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import tempfile
import urllib.error
from typing import Callable

from absl import logging

from xraytpu import errors
from tfrecord_tools import schema, storage
from tfrecord_tools.convert import SPLIT_ALIASES, ConvertOptions, convert

PREFIX = "tfds:"
_SAFE_CLASS = re.compile(r"^[\w][\w .()\-]*$")   # a folder name and a --class_map entry


class TfdsError(errors.UserError):
  """A `tfds:` data set that cannot be used: one line for the user."""


def is_tfds(data_dir: str) -> bool:
  return data_dir.startswith(PREFIX)


def materialise(data_dir: str, *, tfds_data_dir: str = "", tfds_manual_dir: str = "",
                cache_dir: str = "", log: Callable[[str], None] = logging.info) -> str:
  """The converted folder for `data_dir` = "tfds:NAME[/CONFIG][:VERSION]" (see the module docstring).

  Raises TfdsError for an unknown, undownloadable or non-classifier data set.
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise TfdsError(f"--data_dir={data_dir} needs tensorflow-datasets ({e})") from None
  name = data_dir[len(PREFIX):].strip()
  if not name:
    raise TfdsError("--data_dir=tfds:NAME[/CONFIG][:VERSION]: the data set name is missing")
  try:
    builder = tfds.builder(name, data_dir=tfds_data_dir or None)
  except Exception as e:  # noqa: BLE001 - DatasetNotFoundError, a bad version, ...: one line
    raise TfdsError(f"--data_dir={data_dir}: {_first_line(e)}") from None
  image_key, label_key, classes = _classifier_keys(builder, data_dir)
  out = cache_dir or os.path.join(_data_dir_root(builder), "xraytpu", builder.info.full_name)
  source = f"tfds:{builder.info.full_name}"   # the manifest's name: what the copy was made from
  if storage.exists(schema.manifest_path(out)):
    found = schema.read_manifest(out).get("name")
    if found != source:
      raise TfdsError(f"--data_dir={data_dir}: {out} holds another data set ({found}), not "
                      f"{source}: choose another --tfds_cache_dir")
    log(f"{data_dir}: using the converted copy in {out}")
    return out
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=tfds_manual_dir or None))
  except Exception as e:  # noqa: BLE001 - a missing manual download, no network, ...: one line
    raise TfdsError(f"--data_dir={data_dir}: cannot prepare the TFDS data set: "
                    f"{_first_line(e)}{_prepare_hint(builder, e)}") from None
  log(f"{data_dir}: converting TFDS {builder.info.full_name} ({', '.join(classes)}) once into {out}")
  with tempfile.TemporaryDirectory(prefix="xraytpu-tfds-") as tmp:
    _export(builder, image_key, label_key, classes, tmp, log)
    convert(ConvertOptions(
        input_dir=tmp, output_dir=out, class_map=",".join(classes), on_conflict="skip",
        name=source, quiet=True), log=log)
  return out


def _classifier_keys(builder, data_dir: str) -> tuple[str, str, list[str]]:
  """(image key, label key, class names) of an image classification set, or TfdsError."""
  import numpy as np
  import tensorflow_datasets as tfds
  feats = builder.info.features
  keys = builder.info.supervised_keys
  image_key, label_key = (keys if isinstance(keys, tuple) and len(keys) == 2
                          and all(isinstance(k, str) for k in keys) else ("image", "label"))
  image = feats[image_key] if image_key in feats.keys() else None
  label = feats[label_key] if label_key in feats.keys() else None
  if isinstance(label, tfds.features.Sequence) and isinstance(label.feature, tfds.features.ClassLabel):
    raise TfdsError(f"--data_dir={data_dir}: a multi-label TFDS set ({label_key!r} is a Sequence of "
                    "ClassLabel) is not read: convert the publisher's files with "
                    "tfrecord_tools.convert --labels_csv (e.g. CheXpert's train.csv)")
  if not isinstance(image, tfds.features.Image) or not isinstance(label, tfds.features.ClassLabel):
    raise TfdsError(f"--data_dir={data_dir}: not an image classification data set (needs an "
                    f"Image feature {image_key!r} and a ClassLabel feature {label_key!r})")
  if np.dtype(image.np_dtype).name not in ("uint8", "uint16") or image.shape[-1] not in (1, 3, None):
    raise TfdsError(f"--data_dir={data_dir}: image feature {image_key!r} is {np.dtype(image.np_dtype).name} with "
                    f"shape {image.shape}; need 8- or 16-bit grayscale or RGB images")
  classes = list(label.names)
  bad = [c for c in classes if not _SAFE_CLASS.match(c)]
  if bad:
    raise TfdsError(f"--data_dir={data_dir}: class name {bad[0]!r} cannot be a folder and "
                    "--class_map entry (letters, digits, _, space, . ( ) - only)")
  return image_key, label_key, classes


def _export(builder, image_key: str, label_key: str, classes: list[str], root: str,
            log: Callable[[str], None]) -> None:
  """Writes each usable split's encoded images, unchanged, as ROOT/SPLIT/CLASS/SPLIT-NNNNNN.EXT."""
  import tensorflow_datasets as tfds
  from PIL import Image
  for split in builder.info.splits:
    if split.lower() not in SPLIT_ALIASES:
      log(f"TFDS split {split!r} left out (xraytpu's splits: train, val, test)")
      continue
    for c in classes:
      os.makedirs(os.path.join(root, split, c), exist_ok=True)
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={image_key: tfds.decode.SkipDecoding()})
    for i, ex in enumerate(tfds.as_numpy(ds)):
      encoded = ex[image_key]
      with Image.open(io.BytesIO(encoded)) as im:   # the header only: which extension
        ext = {"JPEG": "jpg"}.get(im.format, (im.format or "png").lower())
      with open(os.path.join(root, split, classes[int(ex[label_key])],
                             f"{split}-{i:06d}.{ext}"), "wb") as f:
        f.write(encoded)
  for split in os.listdir(root):           # a split without any example is no split
    if not any(os.listdir(os.path.join(root, split, c)) for c in classes):
      shutil.rmtree(os.path.join(root, split))


def _data_dir_root(builder) -> str:
  """TFDS's data dir in use (the folder that holds NAME/[CONFIG/]VERSION)."""
  path = str(builder.data_dir)
  full = builder.info.full_name
  return path[:-len(full)].rstrip("/") if path.endswith(full) else os.path.dirname(path)


def _chain(e: BaseException | None):
  """The exception and its causes (the error TFDS re-raised may wrap the one that tells)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _prepare_hint(builder, e: BaseException) -> str:
  """What to do about a failed `download_and_prepare`, for the one line: a missing package
  names it; a failed download names the files to fetch by hand for --tfds_manual_dir (TFDS
  takes a file found there by name, its checksum checked, instead of downloading it)."""
  name = builder.info.full_name
  for err in _chain(e):
    if isinstance(err, ImportError) and getattr(err, "name", None):
      return (f" (TFDS's {name} builder needs the Python package {err.name!r}: pip install "
              f"{err.name}; `make venv` installs what the data sets in docs/tfds.md need)")
  for err in _chain(e):
    kind = type(err)
    if (isinstance(err, (ConnectionError, TimeoutError, socket.gaierror, urllib.error.URLError))
        or kind.__module__.split(".")[0] in ("requests", "urllib3")
        or kind.__name__ == "DownloadError"):
      try:
        files = {url: info.filename for url, info in (builder.url_infos or {}).items()}
      except Exception:  # noqa: BLE001 - the hint only
        files = {}
      by_name: dict[str, str] = {}
      for url, filename in sorted(files.items()):
        by_name.setdefault(filename or os.path.basename(url.split("?")[0]), url)
      what = (", ".join(f"{url} (as {fn})" for fn, url in sorted(by_name.items()))
              or f"the files TFDS's {name} builder downloads")
      return (f"; the download failed (no network?): download {what} on a machine with network, "
              "put it in a folder here and pass --tfds_manual_dir=FOLDER (docs/tfds.md)")
  return ""


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]
