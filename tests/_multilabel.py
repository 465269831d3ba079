"""The tiny multi-label data set of tests/test_multilabel_train.py, written by hand.

records.serialize_example + a dataset.json following the issue-13 contract: 32x32
grayscale films where each of K=3 findings has its own visible sign (a bright block
top-left, a bright block top-right, a bright bar at the bottom), and about one label in
five is ignored (mask 0.0). The ignored entries' multi_hot values are the *opposite* of
what the film shows, so anything that does not honour the mask learns or scores the wrong
thing. Also the data of the shared chexnet recipe run (tests/conftest.py).
"""

from __future__ import annotations

import io
import json
import pathlib

import numpy as np
from PIL import Image

from tfrecord_tools import records, schema

FINDINGS = ["Left Opacity", "Right-Opacity", "Bottom_Bar"]
METRICS = ["auc_left_opacity", "auc_right_opacity", "auc_bottom_bar"]
K = len(FINDINGS)
SIZE = 32
LAYOUT = {"train": (128, 2), "val": (48, 1), "test": (16, 1)}   # split -> (examples, shards)
PREVALENCE = (0.5, 0.3, 0.4)   # per finding, before masking
MASK_RATE = 0.2


def _labels(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(present [n, K] 0/1 as the film shows it, mask [n, K] 1 known / 0 ignored), seeded per split."""
  rng = np.random.default_rng({"train": 0, "val": 1, "test": 2}[split])
  present = (rng.uniform(size=(n, K)) < np.array(PREVALENCE)).astype(np.float32)
  mask = (rng.uniform(size=(n, K)) >= MASK_RATE).astype(np.float32)
  mask[0] = 1.0   # example 0 of each split: every label known
  return present, mask


def _film(present: np.ndarray, seed: int) -> bytes:
  """A 32x32 8-bit PNG: grey noise plus the sign of every present finding."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(60, 110) + rng.normal(0, 10, (SIZE, SIZE))
  if present[0]:
    x[4:14, 3:13] += 110       # top-left block
  if present[1]:
    x[4:14, 19:29] += 110      # top-right block
  if present[2]:
    x[23:28, 4:28] += 110      # bottom bar
  buf = io.BytesIO()
  Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def write_multilabel_dataset(root: pathlib.Path) -> dict:
  """Shards + dataset.json; returns {split: (multi_hot [n, K], mask [n, K], present [n, K])} in
  manifest order (shard after shard)."""
  import tensorflow as tf  # noqa: PLC0415
  root.mkdir(parents=True, exist_ok=True)
  splits, truth = {}, {}
  for split, (n, num_shards) in LAYOUT.items():
    present, mask = _labels(split, n)
    # What the records say: the truth where known, the opposite where ignored.
    multi_hot = np.where(mask > 0, present, 1.0 - present).astype(np.float32)
    shards, order = [], []
    for s in range(num_shards):
      name = schema.shard_name(split, s, num_shards)
      indices = list(range(n))[s::num_shards]
      with tf.io.TFRecordWriter(str(root / name)) as w:
        for i in indices:
          text = "|".join(f for f, v in zip(FINDINGS, multi_hot[i]) if v) or schema.NO_FINDING
          w.write(records.serialize_example(
              encoded=_film(present[i], seed=1000 * len(split) + i), image_format="png",
              height=SIZE, width=SIZE, channels=1, bit_depth=8, label=0, text=text,
              filename=f"{split}/img{i:03d}.png", multi_hot=multi_hot[i].tolist(),
              mask=mask[i].tolist()))
      shards.append({"file": name, "num_examples": len(indices)})
      order.extend(indices)
    counts = {f: {"positive": int(((multi_hot[:, k] == 1) & (mask[:, k] == 1)).sum()),
                  "negative": int(((multi_hot[:, k] == 0) & (mask[:, k] == 1)).sum()),
                  "uncertain": int((mask[:, k] == 0).sum()),
                  "ignored": int((mask[:, k] == 0).sum())} for k, f in enumerate(FINDINGS)}
    splits[split] = {"num_examples": n, "shards": shards, "num_groups": None,
                     "class_counts": {f: c["positive"] for f, c in counts.items()},
                     "finding_counts": counts}
    truth[split] = (multi_hot[order], mask[order], present[order])
  manifest = {"manifest_version": 1, "name": "tiny_multilabel", "task": "multi_label",
              "classes": FINDINGS, "splits": splits,
              "labels": {"layout": "columns", "csv": ["labels.csv"], "uncertain": "ignore",
                         "blank": "zeros"},
              "image_stats": {"channels": {"1": sum(n for n, _ in LAYOUT.values())}}}
  (root / schema.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
  return truth
