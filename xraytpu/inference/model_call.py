"""The one way of calling a trained model: bytes or pixels -> calibrated
probabilities -> the label at the frozen operating point.

  image bytes [B] ──pixels (tfrecord_tools.pixels.load_file: the pixel contract,
        │                  conversion replayed in the graph)──▶ uint8 [B, S, S, C]
        ▼
  model(x, training=False) ──▶ raw [B, 1] (binary: P(positive)) or [B, K] (softmax)
        │   with test-time augmentation (threshold.json's "tta", chosen by evaluate --tta):
        │   the mean of model(view(x)) over the views (xraytpu.inference.tta), one batch of V x B
        ▼
  calibrate: temperature (fitted on val by xraytpu.evaluate, logit space),
             binary [1 - p, p]; label = p >= threshold (binary) or argmax;
             multi-label: K sigmoids, each finding against its own threshold
        ▼
  {"probabilities": float32 [B, K], "label": string [B], "label_index": int32 [B]}
  multi-label: {"probabilities": float32 [B, K], "positive": bool [B, K],
                "label": string [B] (the findings above their thresholds, "|"-joined, or "No Finding")}

`InferenceModule` is a tf.Module: evaluate (records -> predict_pixels), predict
and serve (files -> pixels -> predict_pixels) call it, and xraytpu.export saves
it as the SavedModel (serving_default = predict_bytes). Threshold and
temperature are variables, saved with it. Numpy temperature code remains only
where the temperature is fitted (xraytpu.evaluation.metrics.fit_temperature).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from tfrecord_tools import pixels
from tfrecord_tools import schema
from xraytpu import config, errors
from xraytpu.inference import tta as tta_lib
from xraytpu.run import rundir

# Probabilities are clipped this far from 0 and 1 before the logit.
_EPS = rundir.PROB_CLIP
# The label of a multi-label prediction with no finding above its threshold.
NO_FINDING = schema.NO_FINDING
# The SavedModel's signatures (InferenceModule.signatures): file bytes, and pixels after the contract.
SERVING_DEFAULT, SERVING_PIXELS = "serving_default", "serving_pixels"


class NonFiniteOutput(errors.UserError):
  """The model answered NaN or inf: no probability can be given (one line for the user)."""


def check_finite(outputs: np.ndarray, what: str = "") -> None:
  """Raises NonFiniteOutput when `outputs` (the model's, [n, K]) hold a NaN or an inf.

  rundir.load refuses a run whose weights are not finite; finite weights can still
  overflow on some input (a collapsed run's huge weights), and a NaN must never become a
  label ("NORMAL nan") or a probability in a report or an HTTP answer."""
  outputs = np.asarray(outputs)
  bad = ~np.isfinite(outputs).all(axis=tuple(range(1, outputs.ndim))) if outputs.ndim > 1 \
      else ~np.isfinite(outputs)
  if bad.any():
    where = f" for {what}" if what else ""
    raise NonFiniteOutput(
        f"the model's output is not a finite number (NaN or inf){where}: {int(bad.sum())} of "
        f"{len(outputs)} image(s); its weights are unusable for these inputs (a diverged or "
        "collapsed training): retrain with a lower --learning_rate")


def module_of(run: rundir.LoadedRun, tta: str | None = None) -> "InferenceModule":
  """The run's InferenceModule, built on first use and kept on the run: the one way to call it.

  tta: build it (again) with this test-time augmentation instead of the run's: evaluate,
  choosing a new operating point with --tta before threshold.json records it."""
  if run.module_cache is None or (tta is not None and run.module_cache.tta != tta):
    run.module_cache = InferenceModule.from_run(run, tta=tta)
  return run.module_cache


class InferenceModule(tf.Module):
  """The model, the pixel contract and the operating point, as tf.functions."""

  def __init__(self, model, *, classes: Sequence[str], size: int, channels: int, aspect: str,
               conversion: dict, contract: int = pixels.CONTRACT_VERSION,
               threshold: float | None = None, temperature: float | None = None, multi_label: bool = False, thresholds: Sequence[float] | None = None,
               tta: str = config.DEFAULT_TTA):
    super().__init__(name="xraytpu_inference")
    self.model = model
    # Test-time augmentation: the views whose outputs _raw averages (fixed in the graph).
    self.tta, self.views = tta, tta_lib.views_of(tta)
    self.classes = list(classes)
    self.multi_label = bool(multi_label)
    self.binary = len(self.classes) == 2 and not self.multi_label
    self.size, self.channels, self.aspect = int(size), int(channels), aspect
    self.conversion, self.contract = dict(conversion), int(contract)
    self._class_names = tf.constant(self.classes)
    self.threshold = tf.Variable(rundir.DEFAULT_THRESHOLD if threshold is None else float(threshold),
                                 trainable=False, dtype=tf.float32, name="threshold")
    self.temperature = tf.Variable(1.0 if temperature is None else float(temperature),
                                   trainable=False, dtype=tf.float32, name="temperature")
    self.calibrated = tf.Variable(temperature is not None, trainable=False, name="calibrated")
    k = len(self.classes)
    self.thresholds = tf.Variable(
        np.full(k, rundir.DEFAULT_THRESHOLD, np.float32) if thresholds is None
        else np.asarray(thresholds, np.float32), trainable=False, name="thresholds")
    bytes_spec = tf.TensorSpec([None], tf.string, name="image_bytes")
    pixels_spec = tf.TensorSpec([None, self.size, self.size, self.channels], tf.uint8, name="image")
    raw_width = 1 if self.binary else k
    self.pixels = tf.function(self._pixels, input_signature=[bytes_spec])
    self.raw = tf.function(self._raw, input_signature=[pixels_spec])
    self.decide = tf.function(self._decide, input_signature=[tf.TensorSpec([None, raw_width],
                                                                           tf.float32, name="raw")])
    self.predict_pixels = tf.function(self._predict_pixels, input_signature=[pixels_spec])
    self.predict_bytes = tf.function(self._predict_bytes, input_signature=[bytes_spec])

  @classmethod
  def from_run(cls, run: rundir.LoadedRun, tta: str | None = None) -> "InferenceModule":
    """The run's module, with the run's test-time augmentation (`tta` None) or `tta`."""
    return cls(run.model, classes=run.classes, size=run.size, channels=run.channels,
               aspect=run.aspect, conversion=run.conversion, contract=run.contract,
               threshold=run.threshold, temperature=run.temperature, multi_label=run.multi_label, thresholds=run.thresholds,
               tta=run.tta if tta is None else tta)

  def signatures(self) -> dict:
    """The SavedModel's signatures (what xraytpu.export saves, and serve describes as TF
    Serving's metadata): serving_default = predict_bytes, serving_pixels = predict_pixels."""
    return {SERVING_DEFAULT: self.predict_bytes.get_concrete_function(),
            SERVING_PIXELS: self.predict_pixels.get_concrete_function()}

  # ---- the graph -------------------------------------------------------------

  def _pixels(self, image_bytes):
    return tf.map_fn(
        lambda b: pixels.load_file(b, conversion=self.conversion, channels=self.channels,
                                   size=self.size, aspect=self.aspect, contract=self.contract),
        image_bytes,
        fn_output_signature=tf.TensorSpec([self.size, self.size, self.channels], tf.uint8))

  def _raw(self, images):
    if len(self.views) == 1:   # no TTA ("none": the identity): the model as is
      return tf.cast(self.model(tta_lib.view(images, self.views[0], self.size), training=False),
                     tf.float32)
    # One model call on the V views stacked as V x B images, then the mean over the views.
    stacked = tf.concat([tta_lib.view(images, v, self.size) for v in self.views], axis=0)
    out = tf.cast(self.model(stacked, training=False), tf.float32)
    return tf.reduce_mean(tf.reshape(out, [len(self.views), -1, out.shape[-1]]), axis=0)

  def _decide(self, raw):
    if self.multi_label:
      probs = tf.cond(self.calibrated, lambda: _scaled_sigmoid(raw, self.temperature), lambda: raw)
      positive = probs >= self.thresholds[None, :]
      names = tf.where(positive, self._class_names[None, :], "")
      joined = tf.strings.reduce_join(names, axis=1, separator="|")
      # reduce_join keeps the empty strings' separators: squeeze them out.
      joined = tf.strings.regex_replace(tf.strings.regex_replace(joined, r"\|+", "|"), r"^\||\|$", "")
      label = tf.where(tf.strings.length(joined) > 0, joined, NO_FINDING)
      return {"probabilities": probs, "positive": positive, "label": label}
    if self.binary:
      p = raw[:, 0]
      p = tf.cond(self.calibrated, lambda: _scaled_sigmoid(p, self.temperature), lambda: p)
      probs = tf.stack([1.0 - p, p], axis=1)
      index = tf.cast(p >= self.threshold, tf.int32)
    else:
      probs = tf.cond(self.calibrated,
                      lambda: tf.nn.softmax(tf.math.log(tf.clip_by_value(raw, _EPS, 1.0)) / self.temperature),
                      lambda: raw)
      index = tf.cast(tf.argmax(probs, axis=1), tf.int32)
    return {"probabilities": probs, "label": tf.gather(self._class_names, index),
            "label_index": index}

  def _predict_pixels(self, image):
    return self._decide(self._raw(image))

  def _predict_bytes(self, image_bytes):
    return self._predict_pixels(self._pixels(image_bytes))

  # ---- eager helpers for the Python doors ---------------------------------------

  def set_operating_point(self, threshold: float | None, temperature: float | None,
                          thresholds: Sequence[float] | None = None) -> None:
    self.threshold.assign(rundir.DEFAULT_THRESHOLD if threshold is None else float(threshold))
    self.temperature.assign(1.0 if temperature is None else float(temperature))
    self.calibrated.assign(temperature is not None)
    if thresholds is not None:
      self.thresholds.assign(np.asarray(thresholds, np.float32))

  def file_pixels(self, data: bytes, max_pixels: int = pixels.MAX_PIXELS) -> np.ndarray:
    """One file's bytes (any format `pixels.graph_input` takes) -> uint8 [S, S, C].

    max_pixels: the door's limit on width x height (x frames), read from the header
    before decoding (`pixels.graph_input`). Raises pixels.ImageError with the
    converter's reason when the bytes are not a usable image or too large.
    """
    data = pixels.graph_input(data, dicom_window=pixels.dicom_window_of(self.conversion),
                              max_pixels=max_pixels)
    try:
      return self.pixels(tf.constant([data]))[0].numpy()
    except tf.errors.OpError:
      pixels.prepare_image(data, **self.conversion, max_pixels=max_pixels)   # the converter's ImageError
      raise pixels.ImageError("cannot decode (TensorFlow refused the image)") from None

  def predict_batches(self, images: np.ndarray, batch_size: int = 64,
                      check: bool = True) -> dict[str, np.ndarray]:
    """uint8 [n, S, S, C] -> {"probabilities": float32 [n, K], "raw": ..., and "label_index"
    int [n] (single-label) or "positive" bool [n, K] (multi-label)}.

    check: raise NonFiniteOutput when a probability is NaN/inf (`check_finite`); a caller
    that answers per image (serve) passes False and checks each image's row itself."""
    decision = "positive" if self.multi_label else "label_index"
    outs: dict[str, list] = {"probabilities": [], decision: [], "raw": []}
    for start in range(0, len(images), batch_size):
      raw = self.raw(tf.constant(images[start:start + batch_size]))
      out = self.decide(raw)
      outs["raw"].append(raw.numpy())
      outs["probabilities"].append(out["probabilities"].numpy())
      outs[decision].append(out[decision].numpy())
    k = len(self.classes)
    width = 1 if self.binary else k
    empty = {"probabilities": np.zeros((0, k), np.float32), "label_index": np.zeros(0, np.int32),
             "positive": np.zeros((0, k), bool), "raw": np.zeros((0, width), np.float32)}
    result = {k: (np.concatenate(v) if v else empty[k]) for k, v in outs.items()}
    if check:
      check_finite(result["probabilities"])
    return result


def _scaled_sigmoid(p, temperature):
  q = tf.clip_by_value(p, _EPS, 1.0 - _EPS)
  return tf.sigmoid((tf.math.log(q) - tf.math.log1p(-q)) / temperature)
