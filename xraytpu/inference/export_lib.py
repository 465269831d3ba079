"""Export a run as a SavedModel for TensorFlow Serving / tf.saved_model.load.

Layout (TF Serving watches RUN/export/ and serves the highest integer version):

  RUN/export/<version>/saved_model.pb, variables/
  RUN/export/<version>/assets.extra/xraytpu.json   classes, threshold, input size, ...
  RUN/export/<version>/assets.extra/MODEL_CARD.md  the run's model card (xraytpu.run.model_card)

The SavedModel IS the run's `xraytpu.inference.model_call.InferenceModule` (the one way
every door calls the model), saved with its operating point:

  serving_default   image_bytes: tf.string [B], the bytes of a PNG (8/16-bit), JPEG,
                    BMP or GIF file, as a client holds it (full size, any orientation)
                    -> probabilities float32 [B, K] (binary: [P(classes[0]), P(classes[1])]),
                       label tf.string [B] (binary: P(positive) >= threshold; else argmax),
                       label_index int32 [B]
  serving_pixels    image: uint8 [B, S, S, C], already through the pixel contract
                    -> the same outputs

The pixel contract (tfrecord_tools.pixels) runs inside: the converter's
normalisation of the training data (EXIF orientation, alpha, --channels,
--max_side area downscale, re-encoding) is replayed in the graph, then the
input pipeline's decode and resize. So serving_default on a file's original
bytes answers as `xraytpu.predict` does. DICOM, TIFF and WebP are not taken
by the graph: send PNG/JPEG (xraytpu.predict and xraytpu.serve convert them;
DICOM as `tfrecord_tools.dicom` renders it with the conversion's dicom_window).
`image_bytes` ends in "_bytes", so TF Serving's REST API accepts
{"instances": [{"b64": "..."}]}.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import numpy as np
import tensorflow as tf

from tfrecord_tools import storage
from xraytpu import errors
from xraytpu.config import ExportConfig
from xraytpu.inference import model_call, predict_lib
from xraytpu.run import model_card, rundir

class ExportError(errors.UserError):
  """A user mistake (missing run, existing version); one line for the user."""


def next_version(export_root: str) -> int:
  """1 + the highest integer sub-folder of export_root (1 if none)."""
  if not storage.isdir(export_root):
    return 1
  versions = [int(n) for n in storage.listdir(export_root) if re.fullmatch(r"\d+", n)]
  return max(versions, default=0) + 1


def export(model_dir: str, *, version: int = ExportConfig.version,
           export_dir: str = ExportConfig.export_dir,
           ensemble_dir: str = ExportConfig.ensemble_dir) -> str:
  """Writes the SavedModel; returns its folder RUN/export/<version> (or export_dir/<version>).

  version 0 = the next free integer. An existing version is an error (TF
  Serving may be serving it). model_dir may name several runs, comma-separated, with
  ensemble_dir (xraytpu.run.ensemble): one SavedModel averaging them. Locally the model is written to a hidden temp
  folder and renamed, so a watcher never sees a half-written version; on gs://
  it is written locally and uploaded with saved_model.pb last.
  """
  try:
    run = predict_lib.load(predict_lib.model_dir_of(model_dir, ensemble_dir, writer="xraytpu.export"))
  except predict_lib.PredictError as e:
    raise ExportError(str(e)) from e
  model_dir = run.model_dir   # the ensemble's folder when given a list of runs
  root = export_dir or rundir.export_root(model_dir)
  version = version or next_version(root)
  if version < 0:
    raise ExportError(f"--version must be a positive integer, got {version}")
  target = storage.join(root, str(version))
  if storage.exists(target):
    raise ExportError(f"{target} already exists; pick another --version or leave it at 0 (next free)")
  op = run.operating_point or {}
  module = model_call.module_of(run)
  signatures = module.signatures()
  meta = {
      "format": "xraytpu SavedModel",
      "classes": run.classes,
      "task": run.task,
      "positive_class": run.classes[1] if run.binary else None,
      "threshold": run.threshold,
      "thresholds": dict(zip(run.classes, run.thresholds)) if run.multi_label else None,
      "threshold_policy": op.get("policy") if op else (
          "argmax" if run.task == "multiclass" else rundir.DEFAULT_POLICY),
      "threshold_source_split": op.get("source_split"),
      "temperature": run.temperature,
      "tta": run.tta,   # the test-time augmentation's views are inside the graph (model_call)
      "image_size": run.size, "channels": run.channels, "aspect": run.aspect,
      "input": "serving_default: image_bytes tf.string [B], the bytes of PNG (8/16-bit), JPEG, BMP "
               "or GIF files as stored. Not DICOM (nor TIFF or WebP): render DICOM to PNG first as "
               "tfrecord_tools.dicom does with conversion.dicom_window (xraytpu.predict and "
               "xraytpu.serve do this); serving_pixels: image uint8 [B, S, S, C] after the pixel "
               "contract",
      "pixel_contract": f"tfrecord_tools.pixels, version {run.contract}: the conversion below "
                        "replayed in the graph, then decode + resize to image_size",
      "outputs": ("probabilities float32 [B, K] (one sigmoid per finding), positive bool [B, K] (each "
                  "finding at/above its threshold), label string [B] (those findings, '|'-joined, or "
                  "'No Finding')") if run.multi_label else
                 "probabilities float32 [B, K], label string [B], label_index int32 [B]",
      "conversion": run.conversion,
      "source_run": model_dir,
      "ensemble": [m.model_dir for m in run.members] or None,   # the averaged runs
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  meta_text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
  card_text = _model_card_text(run)
  if storage.is_remote(root):
    with storage.staged_output(target, last=("saved_model.pb",)) as out:   # gs:// -> local first
      tf.saved_model.save(module, out, signatures=signatures)
      storage.write_text(storage.join(out, rundir.EXPORT_METADATA), meta_text)
      storage.write_text(storage.join(out, rundir.EXPORT_MODEL_CARD), card_text)
    return target
  os.makedirs(root, exist_ok=True)
  tmp = os.path.join(root, f".tmp-{version}-{os.getpid()}")
  os.makedirs(tmp, exist_ok=True)   # a folder that cannot be written fails here, naming it
  try:
    tf.saved_model.save(module, tmp, signatures=signatures)
    storage.write_text(os.path.join(tmp, rundir.EXPORT_METADATA), meta_text)
    storage.write_text(os.path.join(tmp, rundir.EXPORT_MODEL_CARD), card_text)
    os.replace(tmp, target)
  except BaseException:   # a full disk, an interrupt: no half-written version left behind
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return target


def _model_card_text(run) -> str:
  """RUN/MODEL_CARD.md as xraytpu.evaluate wrote it; a run never evaluated gets the card
  as it stands (saying so), so every export carries one."""
  path = rundir.path(run.model_dir, rundir.MODEL_CARD)
  if storage.exists(path):
    return storage.read_text(path)
  return model_card.model_card(run)["model_card_md"]


def signature_defs(module: model_call.InferenceModule) -> dict:
  """{name: SignatureDef proto} of the SavedModel export() writes for `module`, without writing it.

  The same code path as tf.saved_model.save (its export_meta_graph: the MetaGraphDef is
  built as save builds it, variables are not written), so the tensor names, dtypes and
  shapes are those `saved_model_cli show --all` shows for the export
  (tests/test_serve.py compares them with a real export). Takes seconds (it traces the
  signatures): serve computes it once, on the first metadata request.
  """
  import tempfile
  from tensorflow.core.protobuf import meta_graph_pb2
  from tensorflow.python.saved_model import save as save_lib   # tf.saved_model.save's own module
  with tempfile.TemporaryDirectory(prefix="xraytpu-signatures-") as tmp:
    path = os.path.join(tmp, "meta_graph.pb")
    save_lib.export_meta_graph(module, path, signatures=module.signatures())
    with open(path, "rb") as f:
      meta_graph = meta_graph_pb2.MetaGraphDef.FromString(f.read())
  return dict(meta_graph.signature_def)


def load_metadata(export_path: str) -> dict:
  return json.loads(storage.read_text(storage.join(export_path, rundir.EXPORT_METADATA)))


def serve(export_path: str, encoded_images: list[bytes]) -> np.ndarray:
  """Loads the SavedModel and returns probabilities [n, K] for encoded images (for checks)."""
  with storage.local_copy(export_path) as local:
    loaded = tf.saved_model.load(local)
    out = loaded.signatures["serving_default"](image_bytes=tf.constant(encoded_images))
  return out["probabilities"].numpy()
