"""Which films a run learned from, by content, so an evaluation can tell new films from seen ones.

Every record carries the sha256 of its *source* file (`image/sha256`,
tfrecord_tools.records), whatever its name, split or conversion: the same film
converted again (another --seed, another folder, another data set that copied
it) has the same hash. Training lists the hashes of its train and val splits in
the run directory (`record`, RUN/training_films.json; name in rundir); an
evaluation reads its split's hashes (`split_hashes`) and counts those the model
trained on (`overlap`).

Why recorded at training, not read from the training data when evaluating: the
case that matters is the one where that data has changed or is gone (converted
again with another seed, moved): then only a list made at training still says
what the model saw. The cost is one read of the train and val shards (no
decoding) when a run starts, a small part of one epoch; the list holds the
first 16 hex digits (64 bits) of each hash: about 20 bytes per film; the
chance that an unseen film matches a seen one by accident is about
(films evaluated x films trained on) / 2^64: about 5e-8 for a million of
each. A run trained before this list existed gets it from its training data
at its first evaluation, while that data still has the digest recorded at
training (`training_films`).

Layout of training_films.json:
  {"format": 1, "data_digest": "<schema.data_fingerprint digest>",
   "hash": "sha256 of the source file, first 16 hex digits",
   "splits": {"train": ["0a1b...", ...], "val": [...]},   # sorted, unique
   "without_hash": {"train": 0, "val": 0}}                 # records with no image/sha256
"""

from __future__ import annotations

import json
from typing import Iterable

from tfrecord_tools import records, schema, storage
from xraytpu.run import rundir

FORMAT = 1
PREFIX = 16                    # hex digits kept of each sha256 (64 bits)
TRAINING_SPLITS = ("train", "val")   # what the weights were fitted and selected on


def _hash_of(record: bytes) -> str:
  """A serialised tf.train.Example's image/sha256 ("" when absent), by TensorFlow's own
  protobuf class: no hand-written parser."""
  import tensorflow as tf  # noqa: PLC0415
  value = tf.train.Example.FromString(record).features.feature[records.SHA256].bytes_list.value
  return value[0].decode("ascii", "replace")[:PREFIX] if value and value[0] else ""


def split_hashes(data_dir: str, manifest: dict, split: str) -> list[str]:
  """The content hash prefix of every record of `split`, in record order ("" = none)."""
  out: list[str] = []
  for path in schema.shard_paths(data_dir, manifest, split):
    out.extend(_hash_of(r) for r in records.read_records(path))
  return out


def _listing(data_dir: str, manifest: dict) -> dict:
  splits, without = {}, {}
  for split in TRAINING_SPLITS:
    if split not in manifest.get("splits", {}):
      continue
    hashes = split_hashes(data_dir, manifest, split)
    splits[split] = sorted({h for h in hashes if h})
    without[split] = sum(1 for h in hashes if not h)
  return {"format": FORMAT, "data_digest": schema.data_fingerprint(manifest)["digest"],
          "hash": f"sha256 of the source file, first {PREFIX} hex digits",
          "splits": splits, "without_hash": without}


def record(run_dir: str, data_dir: str, manifest: dict) -> dict | None:
  """Lists the train and val films of `data_dir` in RUN/training_films.json; returns the
  listing. None, with a warning, when a shard cannot be read: the caller's own reading of
  the data reports that (training names the shard and marks the run failed)."""
  try:
    listing = _listing(data_dir, manifest)
  except (records.RecordFileError, FileNotFoundError) as e:
    from absl import logging  # noqa: PLC0415
    logging.warning("the training films are not listed (%s): evaluate cannot check which "
                    "films the run trained on", e)
    return None
  storage.write_text(rundir.path(run_dir, rundir.TRAINING_FILMS), json.dumps(listing) + "\n")
  return listing


def read(run_dir: str) -> dict | None:
  """RUN/training_films.json, or None when absent or unreadable."""
  try:
    doc = json.loads(storage.read_text(rundir.path(run_dir, rundir.TRAINING_FILMS)))
  except (OSError, ValueError, storage.StorageError):
    return None
  return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else None


def training_films(run_dir: str, data_dir: str, manifest: dict | None,
                   differences: list[str] | None) -> tuple[dict | None, str | None]:
  """(the run's listing, None) or (None, why there is none).

  The run's own list first; else the training data's records when that data is unchanged
  since training: `differences` is schema.fingerprint_differences(recorded at training, now)
  ([] = unchanged; None = the run recorded no fingerprint). The list is then saved in the
  run for next time."""
  listing = read(run_dir)
  if listing is not None:
    return listing, None
  if manifest is None:
    return None, f"the run lists no training films and its training data ({data_dir}) is gone"
  if differences is None:
    return None, "the run records neither its training films nor its training data's digest"
  if differences:
    return None, (f"the run lists no training films and its training data ({data_dir}) has "
                  "changed since training")
  try:
    listing = record(run_dir, data_dir, manifest)
  except OSError:   # a read-only run directory: the listing is still good for this evaluation
    listing = _listing(data_dir, manifest)
  return (listing, None) if listing is not None else (
      None, f"the records of the training data ({data_dir}) cannot be read")


def overlap(listing: dict, hashes: Iterable[str]) -> dict:
  """How many of `hashes` (an evaluated split's, record order) the run trained on:
  {"checked": True, "num_films", "without_hash", "in_train", "in_val"}."""
  hashes = list(hashes)
  sets = {s: set(v) for s, v in (listing.get("splits") or {}).items()}
  with_hash = [h for h in hashes if h]
  return {"checked": True, "num_films": len(hashes), "without_hash": len(hashes) - len(with_hash),
          **{f"in_{s}": sum(1 for h in with_hash if h in sets.get(s, ())) for s in TRAINING_SPLITS},
          "reason": None}
