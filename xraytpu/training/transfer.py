"""--init_from=RUN_DIR: a new run's backbone starts from an earlier run's weights.

The torchxrayvision way of working: pretrain on a large multi-label set (NIH, CheXpert,
MIMIC), then fine-tune on a small local task. Every xraytpu model is stem -> body ->
"features" -> head -> "probabilities" (xraytpu.models.common); the backbone is every layer
up to and including "features" (`common.body_layers`, a nested keras.applications
backbone included), and only it is copied. The head (--head, --dropout) and the output
layer are built for the new data's classes or findings, freshly initialised, so a
4-finding multi-label source can warm-start a binary or a 4-class target.

  check_source(cfg)       the source's config.json: a finished run of the same --model
                          (cheap: no model is loaded)
  load_source(cfg)        check_source, then the source's model with its best weights
                          (rundir.load: checkpoints/best.weights.h5, the averaged ones under
                          --ema_decay) and its identity (`Source.record`)
  copy_backbone(m, src)   layers matched by name, every weight shape checked before any is
                          copied (a mismatch, e.g. another --channels, is one line naming
                          the layer and the setting that differs); returns the counts

The caller (xraytpu.training.train_lib) loads the source only for a run that starts
fresh, or resumes without weights of its own: a resumed run's weights come from its
backup, never again from the source.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from tfrecord_tools import storage
from xraytpu import errors
from xraytpu._keras import keras
from xraytpu.config import Config
from xraytpu.models import common
from xraytpu.run import rundir

# Settings that change the backbone's weight shapes for some architectures (named when
# the shapes differ).
_SHAPE_SETTINGS = ("image_size", "channels")


class TransferError(errors.UserError):
  """--init_from cannot be used (one line for the user)."""


@dataclasses.dataclass
class Source:
  """The run --init_from names, loaded."""
  run_dir: str
  doc: dict                 # its config.json
  model: keras.Model        # its best weights (rundir.load)
  weights_sha256: str       # rundir.weights_sha256: the source's model card version (first 12)

  def record(self, copied: dict[str, int]) -> dict[str, Any]:
    """What config.json's "run"."init_from" keeps: the source's identity and what was copied."""
    info = self.doc.get("run") or {}
    manifest = info.get("manifest") or {}
    return {"run_dir": self.run_dir, "weights_sha256": self.weights_sha256,
            "model": self.doc.get("model"), "task": info.get("task"),
            "classes": manifest.get("classes"), "dataset": manifest.get("name"),
            "image_size": self.doc.get("image_size"), "channels": self.doc.get("channels"),
            "epochs_trained": info.get("epochs_trained"), **copied}


def check_source(cfg: Config) -> dict:
  """The source run's config.json, after the checks that need no model; TransferError else."""
  src = cfg.init_from
  try:
    doc = rundir.run_config(src, f"--init_from={src}",
                            ensemble_why="--init_from warm-starts from one run's weights")
  except (rundir.RunError, OSError, storage.StorageError) as e:
    raise TransferError(str(e) if str(e).startswith("--init_from=") else f"--init_from={src}: {e}") from None
  if doc.get("status") != "finished":
    raise TransferError(f"--init_from={src}: the run there is not finished (status "
                        f"{doc.get('status')!r}); finish it (rerun its training command) or "
                        "name a finished run")
  if doc.get("model") != cfg.model:
    raise TransferError(f"--init_from={src} is a --model={doc.get('model')} run; its weights "
                        f"do not fit --model={cfg.model} (train with --model={doc.get('model')})")
  return doc


def load_source(cfg: Config) -> Source:
  """check_source, then the source's model (best weights) and identity."""
  doc = check_source(cfg)
  try:
    run = rundir.load(cfg.init_from, weights="best")
  except rundir.RunError as e:
    raise TransferError(f"--init_from={cfg.init_from}: {e}") from None
  return Source(run_dir=cfg.init_from, doc=doc, model=run.model,
                weights_sha256=rundir.weights_sha256(cfg.init_from) or "")


def _differences(source: Source, cfg: Config) -> str:
  diffs = [f"--{k}={source.doc.get(k)} there, {getattr(cfg, k)} here" for k in _SHAPE_SETTINGS
           if source.doc.get(k) != getattr(cfg, k)]
  return f"the runs differ in {'; '.join(diffs)}" if diffs else "the layer differs"


def copy_backbone(model: keras.Model, source: Source, cfg: Config) -> dict[str, int]:
  """Copies every backbone layer's weights from `source` into `model` (same names, same shapes).

  Every shape is checked before any weight is set, so a refusal leaves `model` as built.
  Returns {"layers", "tensors", "params"} copied. cfg: the new run's (resolved channels).
  """
  theirs = {layer.name: layer for layer in common.body_layers(source.model)}
  pairs = []
  for layer in common.body_layers(model):
    if not layer.weights:
      continue
    other = theirs.get(layer.name)
    if other is None:
      raise TransferError(f"--init_from={source.run_dir}: its model has no layer {layer.name!r} "
                          f"({_differences(source, cfg)})")
    here = [tuple(w.shape) for w in layer.weights]
    there = [tuple(w.shape) for w in other.weights]
    if here != there:
      bad = next((h, t) for h, t in zip(here, there) if h != t) if len(here) == len(there) else (here, there)
      raise TransferError(f"--init_from={source.run_dir}: layer {layer.name!r} has weights of shape "
                          f"{bad[1]} there and {bad[0]} here ({_differences(source, cfg)}); train "
                          "with the source run's settings")
    pairs.append((layer, other))
  if not pairs:
    raise TransferError(f"--init_from={source.run_dir}: no backbone layer with weights to copy")
  for layer, other in pairs:
    layer.set_weights(other.get_weights())
  weights = [w for layer, _ in pairs for w in layer.weights]
  # A nested keras.applications backbone counts as its layers with weights.
  layers = sum(sum(1 for sub in layer.layers if sub.weights) if isinstance(layer, keras.Model) else 1
               for layer, _ in pairs)
  return {"layers": layers, "tensors": len(weights),
          "params": int(sum(np.prod(w.shape) for w in weights))}
