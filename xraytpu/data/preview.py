"""A visual check of the augmentation: one batch before and after, as a PNG grid.

  write_augment_preview(data_dir, cfg, "preview.png")

The grid shows the first `num_images` images of a split exactly as the model
receives them (decoded, resized, uint8) in the upper rows, and the same images
after `build_augmentation(cfg)` in training mode in the rows below, each tile
captioned with its class. `python -m xraytpu.train --augment_preview=PATH`
calls it before training.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw

from tfrecord_tools import schema, storage
from xraytpu.data import augment, input_pipeline

_MIN_TILE = 128  # small images are scaled up so the preview stays readable
_CAPTION = 14


def write_augment_preview(data_dir: str, cfg, path: str, *, split: str = "train",
                          num_images: int = 8, columns: int = 8) -> str:
  """Writes the before/after grid to `path` (local or gs://, atomically); returns path.

  cfg: an `xraytpu.config.Config` with the augment preset resolved
  (`cfg.resolve_augment()`); its image_size, channels, aspect and seed apply.
  """
  manifest = schema.read_manifest(data_dir)
  # One ordered batch, nothing cached: a preview must not fill a file cache.
  spec = dataclasses.replace(input_pipeline.InputSpec.from_config(cfg, manifest), cache="off")
  ds = input_pipeline.eval_dataset(data_dir, split, spec, batch_size=num_images, manifest=manifest)
  images, labels = next(iter(ds))
  layer = augment.build_augmentation(cfg)
  if layer is None:
    after = images.numpy()
  else:
    after = layer(tf.cast(images, tf.float32), training=True).numpy()
  after = np.clip(np.round(after), 0, 255).astype(np.uint8)
  classes = manifest["classes"]
  names = [classes[int(k)] for k in labels.numpy()]
  grid = _grid(images.numpy(), after, names, columns,
               "no augmentation" if layer is None else _describe(cfg))
  buf = io.BytesIO()
  grid.save(buf, format="PNG")
  storage.write_bytes(path, buf.getvalue())
  return path


def _describe(cfg) -> str:
  parts = []
  if cfg.rotation_range:
    parts.append(f"rot ±{cfg.rotation_range:g}°")
  if cfg.width_shift_range or cfg.height_shift_range:
    parts.append(f"shift {cfg.width_shift_range:g}/{cfg.height_shift_range:g}")
  if cfg.zoom_range:
    parts.append(f"zoom ±{cfg.zoom_range:g}")
  if cfg.shear_range:
    parts.append(f"shear ±{cfg.shear_range:g}°")
  if cfg.horizontal_flip:
    parts.append("h-flip")
  if cfg.vertical_flip:
    parts.append("v-flip")
  if cfg.brightness_range:
    parts.append(f"bright ±{cfg.brightness_range:g}")
  if cfg.contrast_range:
    parts.append(f"contrast ±{cfg.contrast_range:g}")
  if cfg.low_resolution_range:
    parts.append(f"low-res ≥{cfg.low_resolution_range:g}")
  return "after: " + ", ".join(parts)


def _tile(pixels: np.ndarray, side: int) -> Image.Image:
  img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
  return img.convert("RGB").resize((side, side), Image.NEAREST)


def _grid(before: np.ndarray, after: np.ndarray, names: list[str], columns: int,
          after_title: str) -> Image.Image:
  n = len(before)
  columns = max(1, min(columns, n))
  rows = -(-n // columns)
  side = max(_MIN_TILE, before.shape[1])
  cell = side + _CAPTION
  width = columns * side
  height = 2 * (_CAPTION + rows * cell)
  canvas = Image.new("RGB", (width, height), (40, 40, 40))
  draw = ImageDraw.Draw(canvas)
  y = 0
  for title, batch in (("before (as the model receives it)", before), (after_title, after)):
    draw.text((4, y + 1), title, fill=(255, 255, 0))
    y += _CAPTION
    for i in range(n):
      x0, y0 = (i % columns) * side, y + (i // columns) * cell
      canvas.paste(_tile(batch[i], side), (x0, y0))
      draw.text((x0 + 2, y0 + side + 1), names[i], fill=(255, 255, 255))
    y += rows * cell
  return canvas
