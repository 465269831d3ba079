"""Ensembles of runs: several run directories whose raw probabilities are averaged.

An ensemble is a directory (ENS) of its own, so that its operating point, its
evaluations, its exports and its model card have a home, as a run's do:

  ENS/ensemble.json   {"format": 1, "combine": "mean of the members' raw probabilities",
                       "created": "2026-12-05T05:00:00Z",
                       "members": [{"path": "/abs/run_a", "name": "run_a", "model": "xray_cnn",
                                    "weights_sha256": "...", "config_sha256": "...",
                                    "data_digest": "..."}, ...]}
  ENS/threshold.json, MODEL_CARD.md, eval/, export/    as in a run (xraytpu.run.rundir)

`load_model_dir(ENS)` (which calls `load`) gives a LoadedRun whose model is a tf-keras
functional model, image -> the mean of the members' raw outputs (each member's weights
as `rundir.load` picks them for the run alone: best epoch, EMA), so every door calls an
ensemble as it calls a run (xraytpu.inference.model_call.InferenceModule): evaluate
chooses the ensemble's own threshold and temperature on val, predict and serve apply
them, export writes one SavedModel with the averaging inside. The members' raw
(uncalibrated) probabilities are averaged; their own operating points are not used.

Members must agree on what the model is asked and shown: task, classes (same order),
image size, channels, aspect, pixel contract version and conversion. A mismatch is refused
before any model is loaded, in one line naming the two members and the field. Members
are runs, not ensembles. ensemble.json records each member by absolute path and the
sha256 of its weights files: a member retrained (or changed) afterwards is refused.

Command lines (`resolve` then `load_model_dir`: the one place a --model_dir is resolved and
loaded, a run, an ensemble or A,B,...; `rundir.load` loads one run and refuses an ensemble):
--model_dir=A,B[,C...] with --ensemble_dir=ENS creates ENS (or reuses it when it names
the same members) and uses it as the model directory; predict and serve without
--ensemble_dir build the ensemble in memory, with no operating point (as a run never
evaluated); evaluate and export need --ensemble_dir (they write into it);
--model_dir=ENS works wherever a run does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

from tfrecord_tools import pixels, storage
from xraytpu.run import rundir

FORMAT = 1
COMBINE = "mean of the members' raw probabilities"
# What members must share: the model's question and the pixels it is shown.
CONTRACT = ("task", "classes", "image size", "channels", "aspect", "pixel contract", "conversion")


class EnsembleError(rundir.RunError):
  """An ensemble that cannot be made or used (members that disagree, a member changed); one line."""


def split_dirs(model_dir: str) -> list[str]:
  """--model_dir as a list of directories: "A,B" -> [A, B]; a folder whose own name holds a
  comma stays one. An empty name ("A,,B", "A,": a missing shell variable?) is refused, not
  skipped: the user meant a run there."""
  if "," not in model_dir or (not storage.is_remote(model_dir) and os.path.isdir(model_dir)):
    return [model_dir]
  dirs = [d.strip() for d in model_dir.split(",")]
  if not all(dirs):
    raise EnsembleError(f"--model_dir={model_dir}: an empty run directory between commas; give "
                        "the runs as A,B,... with no empty name")
  return dirs


def _absolute(path: str) -> str:
  return path if storage.is_remote(path) else os.path.abspath(path)


# --------------------------------------------------------------------------
# Members: what identifies them, what they must share.
# --------------------------------------------------------------------------


def _member_doc(run_dir: str, ens_dir: str = "") -> dict:
  """A run's config.json (a RunError line when it is no run, or an ensemble); ens_dir: the
  ensemble that names it, when there is one."""
  if ens_dir:
    return rundir.run_config(run_dir, f"the run {run_dir} of the ensemble {ens_dir}",
                             hint=f"the ensemble cannot be used without it: restore the run, or "
                                  f"delete {ens_dir} and make the ensemble again")
  return rundir.run_config(run_dir, ensemble_why="an ensemble's members must be runs")


def _data_digest(doc: dict) -> str | None:
  """The digest of the data a run was trained on (config.json's run.data), or None."""
  return ((doc.get("run") or {}).get("data") or {}).get("digest")


def identity(run_dir: str, doc: dict | None = None) -> dict:
  """ensemble.json's entry for one member run."""
  from xraytpu.config import Config  # noqa: PLC0415
  doc = doc or _member_doc(run_dir)
  weights = rundir.weights_sha256(run_dir)
  if weights is None:
    raise EnsembleError(f"{run_dir} has neither {rundir.MODEL} nor {rundir.BEST_WEIGHTS}: the run "
                        "has not finished an epoch")
  return {"path": _absolute(run_dir), "name": rundir.name_of(run_dir), "model": doc.get("model"),
          "weights_sha256": weights,
          "config_sha256": hashlib.sha256(Config.from_dict(doc).to_json().encode()).hexdigest(),
          "data_digest": _data_digest(doc)}


def contract(run_dir: str, doc: dict) -> dict:
  """What a member's model is asked and shown (CONTRACT), from config.json and the manifest
  (no model loaded)."""
  from xraytpu.config import Config  # noqa: PLC0415
  from xraytpu.data import stats  # noqa: PLC0415
  cfg = Config.from_dict(doc)
  manifest = rundir.read_manifest(run_dir, cfg.data_dir)
  classes = list(manifest.get("classes") or [])
  return {"task": rundir.task_of(manifest), "classes": classes, "image size": int(cfg.image_size),
          "channels": int(stats.input_channels(manifest, cfg)), "aspect": cfg.aspect,
          "pixel contract": int(cfg.pixel_contract),
          "conversion": pixels.conversion_args(manifest.get("args"))}


def _loaded_contract(run: rundir.LoadedRun) -> dict:
  return {"task": run.task, "classes": list(run.classes), "image size": run.size,
          "channels": run.channels, "aspect": run.aspect, "pixel contract": run.contract,
          "conversion": dict(run.conversion)}


def check_same(described: list[tuple[str, dict]]) -> None:
  """[(member, contract)]: EnsembleError naming the first two members that differ, and how."""
  first_name, first = described[0]
  for name, other in described[1:]:
    for key in CONTRACT:
      if first[key] != other[key]:
        raise EnsembleError(f"cannot average {first_name} and {name}: their {key} differ "
                            f"({_show(first[key])} vs {_show(other[key])}); an ensemble's runs must "
                            f"share {', '.join(CONTRACT)}")


def _show(value) -> str:
  return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def data_differences(member_dirs: list[str]) -> list[str]:
  """One line per member trained on other data than the first (config.json's data digest);
  [] when all were trained on the same data (or record no digest)."""
  def digest(d):
    return _data_digest(rundir.read_config(d) or {})
  first = digest(member_dirs[0])
  out = []
  for d in member_dirs[1:]:
    other = digest(d)
    if first and other and other != first:
      out.append(f"the ensemble's run {rundir.name_of(d)} was trained on other data than "
                 f"{rundir.name_of(member_dirs[0])} (data digest {other[:12]} vs {first[:12]})")
  return out


# --------------------------------------------------------------------------
# ensemble.json
# --------------------------------------------------------------------------


def read(ens_dir: str) -> dict:
  """ENS/ensemble.json (EnsembleError when unreadable)."""
  p = rundir.path(ens_dir, rundir.ENSEMBLE)
  try:
    doc = json.loads(storage.read_text(p))
  except FileNotFoundError:
    raise EnsembleError(f"{ens_dir} holds no {rundir.ENSEMBLE}: not an ensemble") from None
  except (OSError, ValueError) as e:
    raise EnsembleError(f"{p} is not readable JSON ({e}); delete {ens_dir} and make the ensemble "
                        "again") from None
  if not isinstance(doc, dict) or doc.get("format") != FORMAT or len(doc.get("members") or []) < 2:
    raise EnsembleError(f"{p} is not an ensemble file of format {FORMAT} with two or more runs")
  return doc


def create(ens_dir: str, member_dirs: list[str]) -> dict:
  """Writes ENS/ensemble.json for these runs (checked: runs, not ensembles; the same task,
  classes, size, channels, aspect and conversion); returns it. Reuses an ensemble.json that
  names the same runs; refuses one that names others, or a folder that holds something else."""
  if len(member_dirs) < 2:
    raise EnsembleError(f"--ensemble_dir={ens_dir}: --model_dir names one run; an ensemble needs two "
                        "or more, comma-separated")
  paths = [_absolute(d) for d in member_dirs]
  if any(rundir.same_dir(a, b) for i, a in enumerate(member_dirs) for b in member_dirs[i + 1:]):
    raise EnsembleError(f"--model_dir={','.join(member_dirs)} names a run twice")
  if any(rundir.same_dir(ens_dir, d) for d in member_dirs):
    raise EnsembleError(f"--ensemble_dir={ens_dir} is one of the runs; give the ensemble a folder of "
                        "its own")
  if storage.exists(ens_dir) and not storage.isdir(ens_dir):
    raise EnsembleError(f"--ensemble_dir={ens_dir} is a file; give a new or empty folder")
  if rundir.is_ensemble(ens_dir):
    doc = read(ens_dir)
    named = [m["path"] for m in doc["members"]]
    if sorted(named) != sorted(paths):
      raise EnsembleError(f"--ensemble_dir={ens_dir} is the ensemble of {', '.join(named)}, not of "
                          f"{', '.join(paths)}: give another --ensemble_dir (or --model_dir={ens_dir} "
                          "to use it)")
    return doc
  if rundir.read_config(ens_dir) is not None:
    raise EnsembleError(f"--ensemble_dir={ens_dir} is a run directory; give the ensemble a folder "
                        "of its own")
  if storage.isdir(ens_dir) and storage.listdir(ens_dir):
    raise EnsembleError(f"--ensemble_dir={ens_dir} exists and holds other files but no "
                        f"{rundir.ENSEMBLE}; give a new or empty folder")
  docs = [_member_doc(d) for d in member_dirs]
  check_same([(d, contract(d, doc)) for d, doc in zip(member_dirs, docs)])
  doc = {"format": FORMAT, "combine": COMBINE,
         "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         "members": [identity(d, m) for d, m in zip(member_dirs, docs)]}
  target = rundir.path(ens_dir, rundir.ENSEMBLE)
  try:
    with rundir.writing(target):   # a full disk, no permission: one WriteError line
      storage.write_text(target, json.dumps(doc, indent=2, sort_keys=True) + "\n")   # atomic
  except OSError as e:   # a folder that cannot be made there: under a file, in /proc, ...
    raise EnsembleError(f"--ensemble_dir={ens_dir}: cannot make the ensemble's folder there "
                        f"({e.strerror or e}); give a new folder in a writable place") from None
  return doc


# --------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------


def load(ens_dir: str, weights: str = "best") -> rundir.LoadedRun:
  """ENS as a LoadedRun (what `load_model_dir` returns for an ensemble directory): its members
  checked unchanged since ensemble.json was written, its own threshold.json."""
  doc = read(ens_dir)
  dirs = [m["path"] for m in doc["members"]]
  docs = []
  for m in doc["members"]:
    docs.append(_member_doc(m["path"], ens_dir))
    if changed(m):
      raise EnsembleError(f"the run {m['path']} changed since the ensemble {ens_dir} was made (its "
                          "weights are not those recorded: retrained?): the ensemble's operating "
                          f"point and reports describe the old weights; delete {ens_dir} and make it "
                          "again")
  return load_members(dirs, ens_dir, rundir.read_operating_point(ens_dir), weights, docs)


def changed(member: dict) -> bool:
  """Whether a run of ensemble.json (its entry) no longer has the weights recorded there."""
  return rundir.weights_sha256(member["path"]) != member.get("weights_sha256")


def load_members(member_dirs: list[str], model_dir: str, operating_point: dict | None = None,
                 weights: str = "best", docs: list[dict] | None = None) -> rundir.LoadedRun:
  """The runs as one LoadedRun whose model averages theirs; model_dir names it (the ensemble
  directory, or the --model_dir list of an in-memory ensemble). docs: their config.json, when
  the caller has read them already."""
  docs = docs or [_member_doc(d) for d in member_dirs]
  check_same([(d, contract(d, doc)) for d, doc in zip(member_dirs, docs)])   # before loading a model
  members = [rundir.load(d, weights) for d in member_dirs]
  check_same([(m.model_dir, _loaded_contract(m)) for m in members])     # their models' inputs
  first = members[0]
  return dataclasses.replace(
      first, model_dir=model_dir, cfg=dataclasses.replace(first.cfg, model_dir=model_dir),
      model=_averaging_model([m.model for m in members]), operating_point=operating_point,
      module_cache=None, members=members)


def _averaging_model(models: list):
  """image -> the mean of the models' raw outputs, one tf-keras functional model (exported
  whole: the averaging is inside the SavedModel)."""
  from xraytpu._keras import keras  # noqa: PLC0415 - TensorFlow loads here
  inputs = keras.Input(shape=models[0].inputs[0].shape[1:], dtype=models[0].inputs[0].dtype,
                       name="image")
  outputs = []
  for i, m in enumerate(models):
    m._name = f"member_{i}"   # nested models need distinct names in one functional model
    outputs.append(m(inputs))
  mean = keras.layers.Average(dtype="float32", name="mean_probabilities")(outputs)
  return keras.Model(inputs, mean, name="ensemble")


def resolve(model_dir: str, ensemble_dir: str = "", writer: str = "") -> str:
  """--model_dir with --ensemble_dir -> the model directory to load (`load_model_dir`): with a
  list of runs and ensemble_dir, ENS (created, or reused when it names the same runs); without
  ensemble_dir, model_dir as given (a list is an in-memory ensemble), unless `writer`, the
  command that writes into the model directory (evaluate, export), which needs ensemble_dir."""
  dirs = split_dirs(model_dir)
  if ensemble_dir:
    create(ensemble_dir, dirs)
    return ensemble_dir
  if len(dirs) > 1 and writer:
    raise EnsembleError(f"--model_dir names {len(dirs)} runs: {writer} writes into the ensemble's "
                        "own folder: add --ensemble_dir=DIR (created, or reused when it names "
                        "the same runs)")
  return model_dir


def load_model_dir(model_dir: str, weights: str = "best") -> rundir.LoadedRun:
  """A --model_dir loaded: one run (`rundir.load`), an ensemble directory (`load`), or
  A,B,...: the runs averaged in memory, with no operating point (as a run never evaluated).
  weights: as `rundir.load`'s, for the run or each of the ensemble's runs."""
  dirs = split_dirs(model_dir)
  if len(dirs) > 1:
    return load_members(dirs, model_dir, weights=weights)
  if rundir.is_ensemble(model_dir):
    return load(model_dir, weights)
  return rundir.load(model_dir, weights)   # a missing folder or no run: its one line


def members_of(run: rundir.LoadedRun) -> list[dict]:
  """The card's list of an ensemble's runs: name, path, architecture and the AUC of the report
  that speaks for each (xraytpu.run.reports.find); [] for a run."""
  from xraytpu.run import reports  # noqa: PLC0415
  out = []
  for m in run.members:
    report = reports.find(m.model_dir, reports.dataset_name(m.cfg.data_dir or "", m.manifest)) or {}
    out.append({"name": rundir.name_of(m.model_dir), "path": m.model_dir,
                "model": getattr(m.cfg, "model", None), "auc": report.get("auc"),
                "auc_split": (f"{report.get('dataset')}/{report.get('split')}"
                              if report.get("auc") is not None else None)})
  return out
