"""The Python front door: what the command line does, from a notebook.

  import xraytpu
  xraytpu.convert("chest_xray", "data/cxr", max_side=512)          # tfrecord_tools.convert
  xraytpu.train("data/cxr", "runs/cxr", model="xray_cnn", epochs=10)  # python -m xraytpu.train
  xraytpu.evaluate("runs/cxr", split="test")                      # python -m xraytpu.evaluate
  run = xraytpu.load("runs/cxr")
  run.predict("film.png")            # -> Prediction(label="PNEUMONIA", probabilities={...}, threshold=...)
  run.predict(["a.png", b"<bytes of b.jpeg>", np.zeros((512, 512), np.uint8)])  # -> [Prediction, ...]

Each function is a thin layer over the library behind the matching command, so
the numbers are the command's: `run.predict(path)` gives what `python -m
xraytpu.predict path` prints (the same run loading, pixel contract, model call
and operating point: xraytpu.inference). Keyword arguments are the commands'
flag names (`xraytpu.config`). TensorFlow is imported on first use, not by
`import xraytpu`.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import TYPE_CHECKING, Any, Sequence, Union

if TYPE_CHECKING:   # for the annotations only: importing them loads TensorFlow
  import numpy as np

  from xraytpu.inference.predict_lib import Prediction

# One input: a file path, a file's encoded bytes (PNG, JPEG, DICOM, ...), or decoded uint8
# pixels ([H, W] grey, [H, W, 1|3]).
Input = Union[str, os.PathLike, bytes, "np.ndarray"]


class Run:
  """A trained run directory, loaded once; `predict` as often as needed."""

  def __init__(self, loaded):
    self._run = loaded   # xraytpu.run.rundir.LoadedRun

  @property
  def model_dir(self) -> str:
    return self._run.model_dir

  @property
  def classes(self) -> list[str]:
    """Class (or, multi-label, finding) names, in the order of `probabilities`."""
    return list(self._run.classes)

  @property
  def task(self) -> str:
    """"binary", "multiclass" or "multi_label"."""
    return self._run.task

  @property
  def threshold(self) -> float | None:
    """Binary: the operating point P(positive class) is compared with (RUN/threshold.json)."""
    return self._run.threshold

  @property
  def keras_model(self):
    """The tf-keras model (uint8 pixels in, raw outputs out: no temperature, no threshold)."""
    return self._run.model

  def predict(self, x: Input | Sequence[Input], *, dicom_window: str = "auto",
              batch_size: int = 32) -> Prediction | list[Prediction]:
    """Per-class probabilities, the label and the threshold for one input or a batch.

    x: a path, encoded bytes or a uint8 array; or a list of them, or a uint8 array
       [N, H, W] / [N, H, W, C] holding N images. Arrays are taken as decoded files:
       they go through the same conversion replay and pixel contract as a PNG of them.
    dicom_window: how DICOM inputs are rendered (`python -m xraytpu.predict --dicom_window`);
       auto: as the run's training data was.
    Returns one `Prediction` for one input (and raises its error, a one-line
    `predict_lib.InputError`), or a list for a batch (an unusable item carries its
    `error`, as the command's per-file lines do).
    """
    from xraytpu.inference import model_call, predict_lib
    items, single = _as_items(x)
    from tfrecord_tools import pixels
    dicom_window = pixels.dicom_window_of(self._run.conversion, predict_lib.parse_window(dicom_window))
    module = model_call.module_of(self._run)
    named, failed = [], {}
    for i, (name, item) in enumerate(items):
      try:
        data = (predict_lib.file_bytes(os.fspath(item), dicom_window)
                if isinstance(item, (str, os.PathLike)) else
                _png(item) if not isinstance(item, bytes) else
                predict_lib.graph_bytes(item, dicom_window))
        named.append((name, predict_lib.file_pixels(module, data)))
      except predict_lib.InputError as e:
        if single:
          raise
        failed[i] = predict_lib.Prediction(path=name, error=str(e))
    done = iter(predict_lib.predict_pixels(self._run, named, batch_size=batch_size))
    results = [failed[i] if i in failed else next(done) for i in range(len(items))]
    return results[0] if single else results

  def __repr__(self) -> str:
    return f"xraytpu.Run({self.model_dir!r}, task={self.task!r}, classes={self.classes})"


def _as_items(x) -> tuple[list[tuple[str, Any]], bool]:
  """(name, input) pairs and whether x was one input. Names: the path, or <bytes i> / <array i>."""
  import numpy as np
  if isinstance(x, (str, os.PathLike, bytes)):
    items, single = [x], True
  elif isinstance(x, np.ndarray):
    one = x.ndim == 2 or (x.ndim == 3 and x.shape[-1] in (1, 3))
    items, single = ([x] if one else list(x)), one
  else:
    items, single = list(x), False
  named = []
  for i, item in enumerate(items):
    if isinstance(item, (str, os.PathLike)):
      named.append((os.fspath(item), item))
    elif isinstance(item, bytes):
      named.append((f"<bytes {i}>", item))
    else:
      named.append((f"<array {i}>", np.asarray(item)))
  return named, single


def _png(a: np.ndarray) -> bytes:
  """Decoded pixels as a lossless PNG, so they take the files' path through the pixel contract."""
  import numpy as np
  from PIL import Image

  from xraytpu.inference import predict_lib
  if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3))):
    raise predict_lib.InputError(
        f"an array input must be uint8 [H, W], [H, W, 1] or [H, W, 3], got {a.dtype} {list(a.shape)}")
  buf = io.BytesIO()
  Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a).save(buf, format="PNG")
  return buf.getvalue()


def load(model_dir: str) -> Run:
  """A trained run directory (local or gs://), ready to predict; one-line PredictError if not.
  An ensemble's directory loads the same way, and "A,B,..." averages the runs in memory
  (threshold 0.5): as --model_dir does (xraytpu.run.ensemble)."""
  from xraytpu.inference import predict_lib
  return Run(predict_lib.load(model_dir))


def convert(input_dir: str, output_dir: str, **options) -> dict:
  """`python -m tfrecord_tools.convert`: image folders (or a labels CSV) -> sharded TFRecords.

  options: the converter's flags (tfrecord_tools.convert.ConvertOptions), e.g.
  max_side=512, labels_csv=..., val_fraction=0.15. Returns the manifest (dataset.json).
  """
  from tfrecord_tools import convert as converter
  return converter.convert(converter.ConvertOptions(input_dir=input_dir, output_dir=output_dir,
                                                    **options))


def train(data_dir: str, model_dir: str, **config):
  """`python -m xraytpu.train`: trains a run; config is xraytpu.config.Config's fields
  (model="xray_cnn", image_size=224, epochs=10, strategy="mirrored", ...). Returns the TrainResult."""
  from xraytpu.config import Config
  from xraytpu.training import train_lib
  known = {f.name for f in dataclasses.fields(Config)}
  unknown = sorted(set(config) - known)
  if unknown:
    raise train_lib.TrainError(f"unknown training option(s) {unknown}; see xraytpu.config.Config")
  return train_lib.train_and_evaluate(Config(data_dir=data_dir, model_dir=model_dir, **config))


def evaluate(model_dir: str, **options) -> dict:
  """`python -m xraytpu.evaluate`: ROC/AUC with intervals, the operating point chosen on val,
  sensitivity/specificity/PPV/NPV; writes RUN/eval/... and returns report.json's contents.
  options: data_dir, split, threshold_policy, ... (xraytpu.evaluation.evaluate_lib.evaluate)."""
  from xraytpu.evaluation import evaluate_lib
  return evaluate_lib.evaluate(model_dir, **options)
