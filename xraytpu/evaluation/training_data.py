"""The data a run was trained on, against what an evaluation reads.

`training_data(run)` compares the run's training data now with the fingerprint
training recorded in config.json (schema.fingerprint_differences: the one
comparison, also the resume's); `TrainingData.check` refuses to read it when it
changed (DataChangedError, one line) unless the user allowed the change, which
the report then names (`change()`). `training_overlap` counts the evaluated
films the run trained on, by content hash (xraytpu.run.films).
"""

from __future__ import annotations

import dataclasses

from absl import logging

from tfrecord_tools import schema
from xraytpu import errors
from xraytpu.run import ensemble, films, rundir


class DataChangedError(errors.UserError):
  """The run's training data changed since training, and the evaluation would read it."""


@dataclasses.dataclass
class TrainingData:
  """The run's training data now, against what training recorded.

  recorded: config.json's run.data (schema.data_fingerprint at training; None for runs
  from before it was recorded); manifest: its dataset.json now (None when gone or
  unreadable); differences: schema.fingerprint_differences(recorded, now), [] when the
  same data; used: the evaluation read it although it changed (allow_data_change)."""
  data_dir: str
  recorded: dict | None
  manifest: dict | None
  differences: list[str]
  allow_change: bool = False
  used: bool = False

  def check(self, what: str) -> dict | None:
    """Before reading `what` of the training data: None when it is unchanged (read it with
    the run's manifest copy); when it changed, EvaluateError, or with allow_change its
    manifest now (the change is then in `change()`)."""
    if not self.differences:
      return None
    if not self.allow_change:
      raise DataChangedError(
          f"the run's training data {self.data_dir} changed since the run was trained on it "
          f"({'; '.join(self.differences[:4])}): its {what} may now hold films the model trained "
          "on. Evaluate the run on other data (--data_dir), train again on this data, or pass "
          "--allow_data_change to evaluate anyway (the change is then named in the report and "
          "the model card)")
    if not self.used:
      logging.warning("--allow_data_change: evaluating on %s although it changed since training "
                      "(%s)", self.data_dir, "; ".join(self.differences))
    self.used = True
    return self.manifest

  def change(self) -> dict | None:
    """report.json's data_change (None unless a changed training data set was read)."""
    if not self.used:
      return None
    return {"data_dir": self.data_dir, "differences": list(self.differences),
            "trained_digest": (self.recorded or {}).get("digest"),
            "digest": schema.data_fingerprint(self.manifest)["digest"]}


def training_data(run: rundir.LoadedRun, allow_change: bool = False) -> TrainingData:
  """The run's training data checked against config.json's fingerprint (the resume check's
  schema.fingerprint_differences: one comparison for both)."""
  data_dir = run.cfg.data_dir or ""
  # An ensemble's data is its runs' (xraytpu.run.ensemble): the first run's, and any run trained
  # on other data is a change the evaluation must allow.
  sources = _sources(run)
  recorded = ((rundir.read_config(sources[0]) or {}).get("run") or {}).get("data")
  try:
    manifest = schema.read_manifest(data_dir) if data_dir else None
  except (schema.ManifestError, OSError, ValueError):
    manifest = None
  differences = ensemble.data_differences(sources) if len(sources) > 1 else []
  if recorded and manifest is not None:
    differences += schema.fingerprint_differences(recorded, schema.data_fingerprint(manifest))
  return TrainingData(data_dir, recorded, manifest, differences, allow_change)


def _sources(run: rundir.LoadedRun) -> list[str]:
  """The run directories that trained the model: the run's, or an ensemble's runs."""
  return [m.model_dir for m in run.members] or [run.model_dir]


def training_overlap(run: rundir.LoadedRun, trained: TrainingData, data_dir: str, manifest: dict,
                     split: str) -> dict:
  """report.json's training_overlap: the films of `split` the run trained on (by content hash;
  an ensemble: those any of its runs trained on)."""
  merged: dict = {"splits": {}}
  for source in _sources(run):
    listing, why = films.training_films(source, trained.data_dir, trained.manifest,
                                        trained.differences if trained.recorded else None)
    if listing is None:
      return {"checked": False, "num_films": None, "without_hash": None, "in_train": None,
              "in_val": None, "reason": why}
    for s, hashes in (listing.get("splits") or {}).items():
      merged["splits"].setdefault(s, set()).update(hashes)
  return films.overlap(merged, films.split_hashes(data_dir, manifest, split))
