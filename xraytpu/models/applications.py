"""ImageNet backbones from keras.applications with a classifier head.

  inception_v3     InceptionV3, inputs scaled to [-1, 1]; seed head "inception"
  xception         Xception, [-1, 1]; seed head "xception"
  densenet121      DenseNet121 (CheXNet), ImageNet mean/std; head "simple"
  resnet50         ResNet50, BGR minus ImageNet mean; head "simple"
  efficientnet_b0  EfficientNetB0 (normalises inside, takes [0, 255]); head "simple"

The backbone is a nested model named "backbone" (include_top=False), called
with training=False so its BatchNorm statistics stay frozen even while it is
fine-tuned (the Keras transfer-learning recipe). Grayscale input is repeated
to 3 channels before the backbone's own normalisation.

--weights: "imagenet" (Keras downloads and caches the no-top file; needs the
internet or a filled ~/.keras/models), "none" (random init, the whole model
trains from the start), or PATH to a local .weights.h5 / .h5 file holding the
backbone's no-top weights (e.g. keras' `*_notop.h5`, or one written by
`model.get_layer("backbone").save_weights(PATH)`).

Training phases (see xraytpu.training.train_lib): with pretrained weights the backbone
is frozen for --epochs, then `set_fine_tune(model, fine_tune_at)` unfreezes
its layers from index --fine_tune_at on for --fine_tune_epochs (any model warm-started
with --init_from, the from-scratch CNNs too, can be fine-tuned the same way).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from tfrecord_tools import storage
from xraytpu._keras import keras
from xraytpu.config import Config
from xraytpu.models import common

BACKBONE_LAYER = "backbone"


@dataclasses.dataclass(frozen=True)
class Backbone:
  constructor: Callable[..., keras.Model]
  preprocess: str      # common.ImagePreprocess mode
  min_size: int        # smallest image side keras.applications accepts
  default_head: str    # common.HEADS key


BACKBONES: dict[str, Backbone] = {
    "inception_v3": Backbone(keras.applications.InceptionV3, "tf", 75, "inception"),
    "xception": Backbone(keras.applications.Xception, "tf", 71, "xception"),
    "densenet121": Backbone(keras.applications.DenseNet121, "torch", 32, "simple"),
    "resnet50": Backbone(keras.applications.ResNet50, "caffe", 32, "simple"),
    "efficientnet_b0": Backbone(keras.applications.EfficientNetB0, "none", 32, "simple"),
}


def pretrained(cfg: Config) -> bool:
  """True when the backbone starts from given weights (so phase 1 freezes it)."""
  return cfg.weights not in ("none", "")


def _backbone(name: str, spec: Backbone, cfg: Config) -> keras.Model:
  shape = (cfg.image_size, cfg.image_size, 3)
  weights = cfg.weights or "none"
  if weights == "imagenet":
    try:
      net = spec.constructor(include_top=False, weights="imagenet", input_shape=shape)
    except Exception as e:  # noqa: BLE001 - download / cache failures have many types
      raise common.ModelError(
          f"--weights=imagenet: cannot get the ImageNet weights of {name} ({type(e).__name__}: "
          f"{' '.join(str(e).split())[:200]}); without internet, download the *_notop.h5 file "
          "elsewhere and pass --weights=PATH") from e
  else:
    net = spec.constructor(include_top=False, weights=None, input_shape=shape)
    if weights != "none":
      _load_weights(net, weights, name)
  return keras.Model(net.inputs, net.outputs, name=BACKBONE_LAYER)


def _load_weights(net: keras.Model, path: str, name: str) -> None:
  if not (path.endswith(".h5") or path.endswith(".keras")):
    raise common.ModelError(f"--weights={path}: expected 'imagenet', 'none' or a .weights.h5/.h5 file")
  if not storage.exists(path):
    raise common.ModelError(f"--weights={path}: file not found")
  try:
    with storage.local_copy(path) as local:   # gs:// weights are copied for h5py
      net.load_weights(local)
  except Exception as e:  # noqa: BLE001 - h5py/keras raise many kinds on a wrong file
    raise common.ModelError(
        f"--weights={path}: not {name} no-top backbone weights at this input size "
        f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e


def build(name: str, cfg: Config, *, num_classes: int, channels: int,
          output_bias=None, task: str = "single_label") -> keras.Model:
  """uint8 [B, S, S, C] -> probabilities, with the `name` backbone."""
  spec = BACKBONES[name]
  if cfg.image_size < spec.min_size:
    raise common.ModelError(f"--model={name} needs --image_size >= {spec.min_size}, got {cfg.image_size}")
  inputs, x = common.stem(cfg, channels=channels)
  x = common.to_rgb(x)
  x = common.ImagePreprocess(spec.preprocess, name="preprocess")(x)
  backbone = _backbone(name, spec, cfg)
  backbone.trainable = not pretrained(cfg)
  x = backbone(x, training=False)
  return common.finish(inputs, x, cfg, default_head=spec.default_head, num_classes=num_classes,
                       output_bias=output_bias, name=name, task=task)


def builder(name: str) -> Callable[..., keras.Model]:
  """`build` bound to one backbone: the registry's value for `name`."""
  fn = functools.partial(build, name)
  fn.__doc__ = f"{name}: " + (build.__doc__ or "")
  return fn


def backbone_of(model: keras.Model) -> keras.Model | None:
  """The nested backbone model, or None for from-scratch CNNs."""
  try:
    return model.get_layer(BACKBONE_LAYER)
  except ValueError:
    return None


def set_fine_tune(model: keras.Model, fine_tune_at: int) -> int:
  """Unfreezes backbone layers [fine_tune_at:] (0 = all); returns how many are trainable.

  The backbone: the nested keras.applications model's layers; in a from-scratch CNN
  (fine-tuned after --init_from), the model's own layers up to "features"
  (common.body_layers). BatchNormalization layers of a nested backbone stay in inference
  mode (it is called with training=False), so small fine-tuning batches do not wreck
  their statistics.
  """
  backbone = backbone_of(model)
  layers = backbone.layers if backbone is not None else common.body_layers(model)
  n = len(layers)
  if not 0 <= fine_tune_at < n:
    raise common.ModelError(f"--fine_tune_at={fine_tune_at}: the backbone has {n} layers (use 0..{n - 1})")
  if backbone is not None:
    backbone.trainable = True
  for i, layer in enumerate(layers):
    layer.trainable = i >= fine_tune_at
  return sum(1 for layer in layers if layer.trainable and layer.weights)
