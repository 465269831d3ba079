"""Export a run as a SavedModel for TensorFlow Serving / tf.saved_model.load.

Layout (TF Serving watches RUN/export/ and serves the highest integer version):

  RUN/export/<version>/saved_model.pb, variables/
  RUN/export/<version>/assets.extra/xraytpu.json   classes, threshold, input size, ...

Signatures (the preprocessing lives inside, from xraytpu.data.preprocess):

  serving_default   image_bytes: tf.string [B], encoded PNG (8/16-bit) or JPEG
                    -> probabilities float32 [B, K] (binary: [P(classes[0]), P(classes[1])]),
                       label tf.string [B] (binary: P(positive) >= threshold; else argmax),
                       label_index int32 [B]
  serving_pixels    image: uint8 [B, S, S, C], already decoded and resized
                    -> the same outputs

`image_bytes` ends in "_bytes", so TF Serving's REST API accepts
{"instances": [{"b64": "..."}]}. Serving decodes and resizes exactly as the
input pipeline does (`preprocess.load_image`); conversion-time normalisation
(`tfrecord_tools.images.prepare_image`: EXIF rotation, alpha removal,
`--max_side` downscaling, DICOM windowing) is Python and stays outside, so
send images as the converter stored them, or use `xraytpu.predict`, which
does both. The temperature and threshold in RUN/threshold.json (written by
xraytpu.evaluate) are baked in when present.
"""

from __future__ import annotations

import json
import os
import re
import time

import numpy as np
import tensorflow as tf

from tfrecord_tools import storage
from xraytpu import errors, predict_lib

METADATA_FILE = "xraytpu.json"


class ExportError(errors.UserError):
  """A user mistake (missing run, existing version); one line for the user."""


class ServingModule(tf.Module):
  """The model plus decode/resize and the operating point, as tf.functions."""

  def __init__(self, model, *, classes, size: int, channels: int, aspect: str,
               threshold: float | None, temperature: float | None):
    super().__init__()
    self.model = model
    self._classes = list(classes)
    self._size, self._channels, self._aspect = int(size), int(channels), aspect
    self._binary = len(self._classes) == 2
    self._threshold = float(threshold) if threshold is not None else 0.5
    self._temperature = float(temperature) if temperature is not None else None
    self.serve_bytes = tf.function(
        self._serve_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    self.serve_pixels = tf.function(
        self._serve_pixels,
        input_signature=[tf.TensorSpec([None, self._size, self._size, self._channels], tf.uint8,
                                       name="image")])

  def _serve_bytes(self, image_bytes):
    from xraytpu.data import preprocess
    images = tf.map_fn(
        lambda b: preprocess.load_image(b, channels=self._channels, size=self._size,
                                        aspect=self._aspect),
        image_bytes,
        fn_output_signature=tf.TensorSpec([self._size, self._size, self._channels], tf.uint8))
    return self._outputs(images)

  def _serve_pixels(self, image):
    return self._outputs(image)

  def _outputs(self, images):
    raw = tf.cast(self.model(images, training=False), tf.float32)
    classes = tf.constant(self._classes)
    if self._binary:
      p = raw[:, 0]
      if self._temperature is not None:
        q = tf.clip_by_value(p, 1e-7, 1 - 1e-7)
        p = tf.sigmoid((tf.math.log(q) - tf.math.log1p(-q)) / self._temperature)
      probs = tf.stack([1.0 - p, p], axis=1)
      index = tf.cast(p >= self._threshold, tf.int32)
    else:
      probs = raw
      if self._temperature is not None:
        probs = tf.nn.softmax(tf.math.log(tf.clip_by_value(raw, 1e-7, 1.0)) / self._temperature)
      index = tf.cast(tf.argmax(probs, axis=1), tf.int32)
    return {"probabilities": probs, "label": tf.gather(classes, index), "label_index": index}


def next_version(export_root: str) -> int:
  """1 + the highest integer sub-folder of export_root (1 if none)."""
  if not storage.isdir(export_root):
    return 1
  versions = [int(n) for n in storage.listdir(export_root) if re.fullmatch(r"\d+", n)]
  return max(versions, default=0) + 1


def export(model_dir: str, *, version: int = 0, export_dir: str = "") -> str:
  """Writes the SavedModel; returns its folder RUN/export/<version> (or export_dir/<version>).

  version 0 = the next free integer. An existing version is an error (TF
  Serving may be serving it). Locally the model is written to a hidden temp
  folder and renamed, so a watcher never sees a half-written version; on gs://
  it is written locally and uploaded with saved_model.pb last.
  """
  try:
    run = predict_lib.load(model_dir)
  except predict_lib.PredictError as e:
    raise ExportError(str(e)) from e
  root = export_dir or storage.join(model_dir, "export")
  version = version or next_version(root)
  if version < 0:
    raise ExportError(f"--version must be a positive integer, got {version}")
  target = storage.join(root, str(version))
  if storage.exists(target):
    raise ExportError(f"{target} already exists; pick another --version or leave it at 0 (next free)")
  op = run.operating_point or {}
  module = ServingModule(run.model, classes=run.classes, size=run.size, channels=run.channels,
                         aspect=run.aspect, threshold=run.threshold, temperature=run.temperature)
  signatures = {
      "serving_default": module.serve_bytes.get_concrete_function(),
      "serving_pixels": module.serve_pixels.get_concrete_function(),
  }
  meta = {
      "format": "xraytpu SavedModel",
      "classes": run.classes,
      "positive_class": run.classes[1] if run.binary else None,
      "threshold": run.threshold,
      "threshold_policy": op.get("policy") if op else ("fixed:0.5" if run.binary else "argmax"),
      "threshold_source_split": op.get("source_split"),
      "temperature": run.temperature,
      "image_size": run.size, "channels": run.channels, "aspect": run.aspect,
      "input": "serving_default: image_bytes tf.string [B] (PNG/JPEG); "
               "serving_pixels: image uint8 [B, S, S, C]",
      "outputs": "probabilities float32 [B, K], label string [B], label_index int32 [B]",
      "prepare_args": run.prepare_args,
      "source_run": model_dir,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  meta_text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
  if storage.is_remote(root):
    with storage.staged_output(target, last=("saved_model.pb",)) as out:   # gs:// -> local first
      tf.saved_model.save(module, out, signatures=signatures)
      storage.write_text(storage.join(out, "assets.extra", METADATA_FILE), meta_text)
    return target
  os.makedirs(root, exist_ok=True)
  tmp = os.path.join(root, f".tmp-{version}-{os.getpid()}")
  tf.saved_model.save(module, tmp, signatures=signatures)
  storage.write_text(os.path.join(tmp, "assets.extra", METADATA_FILE), meta_text)
  os.replace(tmp, target)
  return target


def load_metadata(export_path: str) -> dict:
  return json.loads(storage.read_text(storage.join(export_path, "assets.extra", METADATA_FILE)))


def serve(export_path: str, encoded_images: list[bytes]) -> np.ndarray:
  """Loads the SavedModel and returns probabilities [n, K] for encoded images (for checks)."""
  with storage.local_copy(export_path) as local:
    loaded = tf.saved_model.load(local)
    out = loaded.signatures["serving_default"](image_bytes=tf.constant(encoded_images))
  return out["probabilities"].numpy()
