"""Verify converted TFRecords and look at them before training.

  python -m tfrecord_tools.inspect DATA_DIR [--grid=samples.png --grid_per_class=6
                                            --grid_split=train --max_per_shard=0]

Reads every record of every shard listed in DATA_DIR/dataset.json with
TensorFlow's own reader (`tf.data.TFRecordDataset`, so framing and CRC errors
surface, and a bug in the converter's hand-written framing or serialisation
cannot hide behind the code that wrote it), parses it with
`tf.io.parse_single_example` and the record table's `records.feature_spec()`,
decodes the image the way the input pipeline does and
checks it against the record's height/width/channels/bit depth and the label
against the class list. Then it reconciles record counts with the manifest
(per shard, per split and class), flags images whose sha256 or patient id
occurs in more than one split (leakage), prints a split x class table and,
with --grid, writes a labelled grid of sample images (rows: classes).

Identifiers (docs/privacy.md): it warns, without failing, when the data set
holds fields that look like identifiers: patient ids that are not keyed
pseudonyms (pt-<24 hex>; a set converted before pseudonyms, or by another
tool), file names with a date, a DICOM UID, a run of 6+ digits or a DICOM
person name (Family^Given), and a manifest without its "privacy" entry. The
warnings name where (shard and record), never the value.

A multi-label set (manifest "task": "multi_label", `classes` = the K
findings): each record's multi_hot and mask must hold K values of 0.0 / 1.0,
no finding may be present where it is masked out, and the text must be the
present findings ("A|B", or "No Finding"). The counts reconciled are, per
split and finding, the positives (`class_counts`) and the positive /
negative / ignored counts (`finding_counts`); the tables show positives per
finding, then positive/negative/uncertain/ignored per finding and split;
the grid has a row per finding (and one for "No Finding").

TensorFlow's gs:// file system cannot reach a GCS emulator (it has no endpoint
setting), so a gs:// shard is first downloaded, one at a time, to a temp file
through tfrecord_tools.storage.

Exit status: 0 when everything checks out, 1 when problems were found (each
printed on its own line), 2 for a usage error (e.g. no dataset.json).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, Iterator, Sequence

import numpy as np

from tfrecord_tools import _entry, errors, pixels, pseudonym, records, schema, storage
from tfrecord_tools.labels import MULTI_LABEL, NO_FINDING


class InspectError(errors.UserError):
  """Unusable arguments (one line, no traceback)."""


def _decode(tf, encoded: bytes, fmt: str, bit_depth: int) -> np.ndarray:
  if fmt == "jpeg":
    return tf.io.decode_jpeg(encoded).numpy()
  if fmt == "png":
    return tf.io.decode_png(encoded, dtype=tf.uint16 if bit_depth == 16 else tf.uint8).numpy()
  raise ValueError(f"unknown image/format {fmt!r}")


def _read_shard(tf, path: str, limit: int = 0) -> Iterator[bytes]:
  """The records of one shard (the first `limit`; 0: all), read by TensorFlow.

  `tf.data.TFRecordDataset` checks the framing and both CRCs itself and
  raises `tf.errors.DataLossError` on a corrupt or truncated record.
  """
  with storage.local_copy(path) as local:   # gs://: a temp copy (see the module doc)
    dataset = tf.data.TFRecordDataset(local)
    if limit:
      dataset = dataset.take(limit)
    yield from dataset.as_numpy_iterator()


def _first_line(e: Exception) -> str:
  """An error's message, one line, without TensorFlow's op decorations."""
  text = getattr(e, "message", None) or str(e)
  text = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", text.splitlines()[0] if text else "")
  return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text) or type(e).__name__


def inspect_dataset(data_dir: str, *, grid_path: str | None = None, grid_per_class: int = 6,
                    grid_split: str | None = None, max_per_shard: int = 0,
                    log: Callable[[str], None] = print) -> dict:
  """Checks every record; returns {"ok", "problems", "counts", "num_records", "grid"}.

  Args:
    data_dir: folder (local or gs://) with dataset.json and the shards.
    grid_path: where to write the sample grid PNG; None for no grid.
    grid_per_class: images per class (grid columns).
    grid_split: split to sample from (default: train, else the first split).
    max_per_shard: read at most this many records per shard (0: all); counts
      are then not reconciled.
  Raises:
    schema.ManifestError: no or unreadable dataset.json.
  """
  manifest = schema.read_manifest(data_dir)   # fails fast, before importing TensorFlow
  import tensorflow as tf
  classes = manifest["classes"]
  multi = manifest.get("task") == MULTI_LABEL
  spec = records.feature_spec()
  problems: list[str] = []
  counts: dict[str, dict[str, int]] = {}
  sha_splits: dict[str, set] = {}
  pid_splits: dict[str, set] = {}
  splits = list(manifest["splits"])
  if grid_split is None:
    grid_split = "train" if "train" in splits else (splits[0] if splits else None)
  elif grid_split not in splits:
    raise InspectError(f"--grid_split={grid_split} is not in the data set "
                       f"(splits: {', '.join(splits)})")
  samples: dict[str, list[tuple[np.ndarray, str]]] = {
      c: [] for c in classes + ([NO_FINDING] if multi else [])}
  total = 0
  num_records: dict[str, int] = {}
  finding_counts: dict[str, dict] = {}
  clear_ids = _Tally()      # patient ids that are not pseudonyms
  name_kinds: dict[str, _Tally] = {}   # identifier kind -> file names that may carry one

  for split in splits:
    info = manifest["splits"][split]
    split_counts = {c: 0 for c in classes}
    split_findings = {c: {"positive": 0, "negative": 0, "ignored": 0} for c in classes}
    good = 0
    for shard in info["shards"]:
      path = storage.join(data_dir, shard["file"])
      if not storage.exists(path):
        problems.append(f"{shard['file']}: missing")
        continue
      n = 0
      try:
        for raw in _read_shard(tf, path, max_per_shard):
          n += 1
          where = f"{shard['file']} record {n - 1}"
          try:
            ex = tf.io.parse_single_example(raw, spec)
          except tf.errors.InvalidArgumentError as e:
            problems.append(f"{where}: does not parse as an Example ({e.message.splitlines()[0]})")
            continue
          ex = {k: v.numpy() for k, v in ex.items()}
          label, text = int(ex[records.LABEL]), ex[records.TEXT].decode("utf-8", "replace")
          fmt = ex[records.FORMAT].decode()
          name = ex[records.FILENAME].decode("utf-8", "replace")
          where += f" ({name})"
          if multi:
            bad = _multi_label_problem(ex[records.MULTI_HOT], ex[records.MASK], text, classes)
            if bad:
              problems.append(f"{where}: {bad}")
              continue
          elif not 0 <= label < len(classes) or classes[label] != text:
            problems.append(f"{where}: label {label} / text {text!r} do not match the classes "
                            f"{classes}")
            continue
          try:
            img = _decode(tf, ex[records.ENCODED], fmt, int(ex[records.BIT_DEPTH]))
          except (tf.errors.InvalidArgumentError, ValueError) as e:
            problems.append(f"{where}: image does not decode ({str(e).splitlines()[0]})")
            continue
          want = (int(ex[records.HEIGHT]), int(ex[records.WIDTH]), int(ex[records.CHANNELS]))
          if want[2] == 1 and img.ndim == 3 and img.shape[2] == 3 and pixels.is_grey(img):
            # The pixel contract's step 4: a grey film stored as RGB (a JPEG kept
            # byte for byte) is recorded as 1 channel; decoded grey, it is.
            img = img[..., :1]
          if img.shape != want:
            problems.append(f"{where}: decoded shape {img.shape} but the record says {want}")
          if ex[records.SHA256]:
            sha_splits.setdefault(ex[records.SHA256].decode(), set()).add(split)
          if ex[records.PATIENT_ID]:
            pid = ex[records.PATIENT_ID].decode("utf-8", "replace")
            pid_splits.setdefault(pid, set()).add(split)
            if not pseudonym.is_pseudonym(pid):
              clear_ids.add(f"{shard['file']} record {n - 1}")
          for kind in pseudonym.identifier_kinds(name):
            name_kinds.setdefault(kind, _Tally()).add(f"{shard['file']} record {n - 1}")
          good += 1
          rows = [text]
          if multi:
            rows = []
            for c, h, m in zip(classes, ex[records.MULTI_HOT], ex[records.MASK]):
              kind = "ignored" if m == 0.0 else ("positive" if h == 1.0 else "negative")
              split_findings[c][kind] += 1
              if kind == "positive":
                split_counts[c] += 1
                rows.append(c)
            rows = rows or [NO_FINDING]
          else:
            split_counts[text] += 1
          for row in rows:
            if grid_path and split == grid_split and len(samples[row]) < grid_per_class:
              samples[row].append((img, name))
      except tf.errors.DataLossError as e:   # framing or checksum
        problems.append(f"{shard['file']}: corrupt after {n} records ({_first_line(e)})")
      except (OSError, storage.StorageError, tf.errors.OpError) as e:
        problems.append(f"{shard['file']}: cannot be read ({_first_line(e)})")
      if not max_per_shard and n != shard["num_examples"]:
        problems.append(f"{shard['file']}: {n} records but the manifest says "
                        f"{shard['num_examples']}")
      total += n
    counts[split] = split_counts
    num_records[split] = good
    if multi:
      finding_counts[split] = split_findings
    if not max_per_shard:
      if split_counts != info["class_counts"]:
        problems.append(f"{split}: class counts {split_counts} but the manifest says "
                        f"{info['class_counts']}")
      if good != info["num_examples"]:
        problems.append(f"{split}: {good} records but num_examples is {info['num_examples']}")
      if multi:
        said = {c: {k: e[k] for k in ("positive", "negative", "ignored")}
                for c, e in info.get("finding_counts", {}).items()}
        if said != split_findings:
          problems.append(f"{split}: finding counts {split_findings} but the manifest says {said}")

  dup = [s for s, sps in sha_splits.items() if len(sps) > 1]
  if dup:
    problems.append(f"{len(dup)} identical source files are in more than one split "
                    "(same sha256): leakage between splits")
  leak = sorted(p for p, sps in pid_splits.items() if len(sps) > 1)
  if leak:
    example = next((p for p in leak if pseudonym.is_pseudonym(p)), None)
    problems.append(f"{len(leak)} patient ids are in more than one split"
                    + (f" (e.g. {example!r})" if example else ""))
  warnings = _identifier_warnings(manifest, clear_ids, name_kinds)
  n_conv = manifest.get("num_converted")
  if not max_per_shard and n_conv is not None and n_conv != total:
    problems.append(f"read {total} records but the manifest says num_converted={n_conv}")
  keys = ("num_converted", "num_skipped", "num_dropped")
  if "num_found" in manifest and all(k in manifest for k in keys):
    if sum(manifest[k] for k in keys) != manifest["num_found"]:
      problems.append("manifest: converted + skipped + dropped != found")

  log(_table(classes, counts, manifest, num_records))
  if multi:
    log(_finding_table(classes, finding_counts, manifest))
  grid_written = None
  if grid_path:
    if any(samples.values()):
      write_grid(samples, grid_path, title=f"{manifest.get('name', '')} {grid_split}")
      grid_written = grid_path
      log(f"sample grid ({grid_split}, up to {grid_per_class} per class) -> {grid_path}")
    else:
      problems.append("no images to draw in the grid")
  log(f"read {total} records from {data_dir}: "
      + ("OK" if not problems else f"{len(problems)} problems")
      + (f", {len(warnings)} warnings" if warnings else ""))
  for p in problems:
    log(f"  problem: {p}")
  for w in warnings:
    log(f"  warning: {w}")
  return {"ok": not problems, "problems": problems, "warnings": warnings, "counts": counts,
          "num_records": total, "finding_counts": finding_counts, "grid": grid_written}


class _Tally:
  """How many records, and where the first one is (never the value itself)."""

  def __init__(self):
    self.count, self.first = 0, ""

  def add(self, where: str) -> None:
    self.count += 1
    self.first = self.first or where


def _identifier_warnings(manifest: dict, clear_ids: _Tally, name_kinds: dict[str, _Tally]
                         ) -> list[str]:
  """Fields that look like identifiers (docs/privacy.md); each warning says where, not what."""
  out = []
  privacy = manifest.get("privacy")
  if clear_ids.count:
    out.append(f"{clear_ids.count} records hold a patient id in clear, not a keyed pseudonym "
               f"(e.g. {clear_ids.first})"
               + (": this data set was converted before patient ids were pseudonymised"
                  if privacy is None else "")
               + "; convert it again with this version (docs/privacy.md)")
  elif privacy is None:
    out.append("dataset.json has no \"privacy\" entry: converted before patient ids and file "
               "names were pseudonymised (or by another tool); convert it again with this "
               "version to be sure (docs/privacy.md)")
  paths = [s.get("path", "") for s in manifest.get("skipped") or []]
  paths += [p for d in manifest.get("duplicates") or [] for p in d]
  paths += list(manifest.get("ignored_examples") or []) + list(manifest.get("unlabelled_examples") or [])
  for i, p in enumerate(paths):
    for kind in pseudonym.identifier_kinds(str(p)):
      name_kinds.setdefault(kind, _Tally()).add(f"{schema.MANIFEST_NAME} path list entry {i}")
  for kind, t in sorted(name_kinds.items()):
    out.append(f"{t.count} file names may carry {kind} (e.g. {t.first}): if they identify a "
               "patient or a study, convert again with --hash_filenames")
  return out


def _multi_label_problem(hot: np.ndarray, mask: np.ndarray, text: str,
                         classes: list[str]) -> str | None:
  """What is wrong with a multi-label record's multi_hot / mask / text (None: nothing)."""
  k = len(classes)
  if len(hot) != k or len(mask) != k:
    return (f"multi_hot has {len(hot)} and mask {len(mask)} values, expected {k} "
            f"(one per finding)")
  if not (set(hot.tolist()) <= {0.0, 1.0} and set(mask.tolist()) <= {0.0, 1.0}):
    return "multi_hot / mask hold values other than 0.0 and 1.0"
  if np.any((hot == 1.0) & (mask == 0.0)):
    return "a finding is present (multi_hot 1) where the mask ignores it"
  want = "|".join(c for c, h in zip(classes, hot) if h == 1.0) or NO_FINDING
  if text != want:
    return f"text {text!r} but multi_hot says {want!r}"
  return None


def _table(classes, counts, manifest, num_records) -> str:
  w = max([6] + [len(c) for c in classes])
  lines = [f"{'split':<6} {'shards':>6} {'records':>8}  " + "  ".join(f"{c:>{w}}" for c in classes)]
  for split, c in counts.items():
    n_shards = len(manifest["splits"][split]["shards"])
    lines.append(f"{split:<6} {n_shards:>6} {num_records[split]:>8}  "
                 + "  ".join(f"{c[k]:>{w}}" for k in classes))
  return "\n".join(lines)


def _finding_table(classes, finding_counts, manifest) -> str:
  """Per finding and split: positive/negative/uncertain/ignored (uncertain: the manifest's)."""
  w = max([7] + [len(c) for c in classes])
  splits = list(finding_counts)
  lines = [f"{'finding':<{w}}  " + "  ".join(f"{sp + ' pos/neg/unc/ign':>24}" for sp in splits)]
  for c in classes:
    cells = []
    for sp in splits:
      e = finding_counts[sp][c]
      unc = manifest["splits"][sp].get("finding_counts", {}).get(c, {}).get("uncertain", "?")
      cells.append(f"{e['positive']}/{e['negative']}/{unc}/{e['ignored']}")
    lines.append(f"{c:<{w}}  " + "  ".join(f"{x:>24}" for x in cells))
  return "\n".join(lines)


def _to_display(img: np.ndarray) -> np.ndarray:
  """uint8 [H, W] or [H, W, 3] for display (16-bit by the full range, like training)."""
  if img.dtype == np.uint16:
    img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
  if img.ndim == 3 and img.shape[-1] == 1:
    img = img[..., 0]
  return img


def write_grid(samples: dict[str, list[tuple[np.ndarray, str]]], path: str,
               title: str = "") -> None:
  """A rows=classes x columns=samples PNG, each image titled with class and file name."""
  rows = [c for c, s in samples.items() if s]
  cols = max(len(s) for s in samples.values())
  data = None
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.4 * len(rows)),
                             squeeze=False)
    for r, cls in enumerate(rows):
      for c in range(cols):
        ax = axes[r][c]
        ax.axis("off")
        if c < len(samples[cls]):
          img, name = samples[cls][c]
          img = _to_display(img)
          ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
          ax.set_title(f"{cls}\n{os.path.basename(name)[:24]}", fontsize=8)
    if title:
      fig.suptitle(title.strip(), fontsize=10)
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    data = buf.getvalue()
  except ImportError:
    data = _grid_pil(samples, rows, cols)
  storage.write_bytes(path, data)


def _grid_pil(samples, rows, cols, cell: int = 160) -> bytes:
  import io
  from PIL import Image, ImageDraw
  canvas = Image.new("RGB", (cols * cell, len(rows) * (cell + 24)), "white")
  draw = ImageDraw.Draw(canvas)
  for r, cls in enumerate(rows):
    for c, (img, name) in enumerate(samples[cls]):
      im = Image.fromarray(_to_display(img)).convert("RGB")
      im.thumbnail((cell - 4, cell - 4))
      x, y = c * cell, r * (cell + 24)
      canvas.paste(im, (x + 2, y + 24))
      draw.text((x + 2, y + 2), f"{cls} {os.path.basename(name)[:18]}", fill="black")
  buf = io.BytesIO()
  canvas.save(buf, format="PNG")
  return buf.getvalue()


# --------------------------------------------------------------------------
# Entry point (flags defined in run(), so importing this module defines none).
# --------------------------------------------------------------------------


def _define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("grid", None, "Write a labelled grid of sample images to this PNG.")
  flags.DEFINE_integer("grid_per_class", 6, "Sample images per class in the grid.")
  flags.DEFINE_string("grid_split", None, "Split to sample the grid from (default: train).")
  flags.DEFINE_integer("max_per_shard", 0, "Read at most this many records per shard "
                       "(0: all; counts are then not reconciled).")


def main(argv: Sequence[str]) -> None:
  from absl import flags
  if len(argv) != 2:
    raise InspectError("expected one argument, the data folder: "
                       "python -m tfrecord_tools.inspect DATA_DIR [--grid=PATH.png]")
  f = flags.FLAGS
  report = inspect_dataset(argv[1], grid_path=f.grid, grid_per_class=f.grid_per_class,
                           grid_split=f.grid_split, max_per_shard=f.max_per_shard)
  sys.exit(0 if report["ok"] else 1)


def run() -> None:
  _entry.run_command(_define_flags, main, tensorflow=True)


if __name__ == "__main__":
  run()
