"""Architectures by name: `MODELS[name](cfg, num_classes=, channels=, output_bias=, task=)`.

`MODELS` is a plain dict (no registration by import side effect): adding an
architecture means adding a module with a `build` function and one line here.
Every model takes uint8 [B, S, S, C] pixels and returns float32 probabilities
([B, 1] sigmoid for two classes, [B, K] softmax otherwise; with
task="multi_label", [B, K] sigmoids, one per finding); see
`xraytpu.models.common` for the stem/head/output contract.

Importing this package registers the custom layers a saved model.keras needs
(xraytpu.models.common, xraytpu.data.augment), so
`import xraytpu.models; keras.models.load_model(path)` works, as does
`xraytpu.models.load_model(path)`.
"""

from __future__ import annotations

from typing import Callable

from xraytpu._keras import keras
from xraytpu.config import Config
from xraytpu.models import applications, common, keras_tpu_cnn, xray_cnn
from xraytpu.models.common import ModelError

MODELS: dict[str, Callable[..., keras.Model]] = {
    "keras_tpu_cnn": keras_tpu_cnn.build,
    "xray_cnn": xray_cnn.build,
    "inception_v3": applications.builder("inception_v3"),
    "xception": applications.builder("xception"),
    "densenet121": applications.builder("densenet121"),
    "resnet50": applications.builder("resnet50"),
    "efficientnet_b0": applications.builder("efficientnet_b0"),
}


def build_model(cfg: Config, *, num_classes: int, channels: int, output_bias=None,
                task: str = "single_label") -> keras.Model:
  """Builds `cfg.model` (call inside `strategy.scope()` when distributing).

  Args:
    cfg: the run's Config (model, image_size, weights, head, dropout, augmentation).
    num_classes: classes in the manifest (2 -> one sigmoid unit); multi-label: the K findings.
    channels: 1 or 3, the channels of the uint8 input.
    output_bias: [1] or [K] initial output bias (xraytpu.data.stats.initial_bias), or None.
    task: the manifest's task (xraytpu.data.stats.task): "single_label" or
      "multi_label" (K sigmoids, float32 [B, K]).
  Raises ModelError (a ValueError with a one-line message) for bad settings.
  """
  if cfg.model not in MODELS:
    raise ModelError(f"--model={cfg.model}: unknown model (choose one of {', '.join(MODELS)})")
  return MODELS[cfg.model](cfg, num_classes=num_classes, channels=channels, output_bias=output_bias,
                           task=task)


def load_model(path: str, compile: bool = False) -> keras.Model:  # noqa: A002 - keras' name
  """Loads a model.keras written by xraytpu.train (custom layers are registered above)."""
  return keras.models.load_model(path, compile=compile)


__all__ = ["MODELS", "build_model", "load_model", "ModelError", "applications", "common"]
