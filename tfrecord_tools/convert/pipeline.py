"""The whole conversion, stage after stage (`convert`), and stage 6, the manifest.

`convert` checks the options, takes the output folder's lock, runs find ->
classes -> dedupe/split -> plan, resumes finished shards, has the unfinished
ones written (`run_tasks`: the local pool by default, Beam from `beam`), applies
the skip policy and writes dataset.json last, atomically (its presence marks a
complete output), then TFDS's metadata beside it. `summary_table` is the
command line's per-split, per-class table.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import time
from typing import Callable

from tfrecord_tools import __version__, errors, locks, pixels, pool, schema, shards, storage
from tfrecord_tools.convert import options, tfds_metadata
from tfrecord_tools.convert.classes import resolve_classes
from tfrecord_tools.convert.find import find_files, find_keras_pair
from tfrecord_tools.convert.labelled import add_labels_manifest, labelled_items
from tfrecord_tools.convert.options import (AUTO_FRACTION, DEFAULT_FRACTION, ConvertError, ConvertOptions,
                                            check_options)
from tfrecord_tools.convert.plan import plan_shards, run_locally
from tfrecord_tools.convert.split import dedupe, make_items, read_patients
from tfrecord_tools.shards import STATE_DIR


def _check_output(opts: ConvertOptions) -> None:
  """Refuses a complete earlier output unless --overwrite, and foreign shards."""
  out = opts.output_dir
  if storage.is_remote(out) and not storage.exists(out):
    return
  if not storage.is_remote(out) and os.path.exists(out) and not os.path.isdir(out):
    raise ConvertError(f"--output_dir {out} exists and is not a folder")
  if not storage.exists(out):
    return
  if storage.exists(schema.manifest_path(out)) and not opts.overwrite:
    raise ConvertError(f"{out} already holds a converted data set ({schema.MANIFEST_NAME}): "
                       "pass --overwrite to replace it")
  names = storage.listdir(out)
  shards = [n for n in names if _SHARD_RE.match(n)]
  if (shards and STATE_DIR not in names and schema.MANIFEST_NAME not in names
      and not opts.overwrite):
    raise ConvertError(f"{out} holds TFRecord shards not written by this tool "
                       f"(e.g. {shards[0]}): pass --overwrite or choose another --output_dir")


_SHARD_RE = re.compile(r"^(train|val|test)-\d{5}-of-\d{5}\.tfrecord(\.tmp-\d+)?$")
_TMP_RE = re.compile(r"\.tmp-\d+$")


def _clean_output(out: str, keep: set[str]) -> None:
  """Removes temp files and shards not in `keep` (left by killed or earlier runs)."""
  for name in storage.listdir(out):
    if _SHARD_RE.match(name) and name not in keep:
      storage.remove(storage.join(out, name))
    elif _TMP_RE.search(name) and name.startswith(schema.MANIFEST_NAME):
      storage.remove(storage.join(out, name))
  state = storage.join(out, STATE_DIR)
  if storage.exists(state):
    for name in storage.listdir(state):
      if name[:-len(".json")] not in keep or _TMP_RE.search(name):
        storage.remove(storage.join(state, name))


def convert(opts: ConvertOptions, log: Callable[[str], None] | None = None,
            run_tasks: Callable | None = None) -> dict:
  """Runs the conversion; returns the manifest (also written to dataset.json).

  Finding, splitting, planning, resuming, the manifest and the skip policy are
  here, once; only the writing of the unfinished shards is pluggable:
  `run_tasks(todo, opts, log) -> (results, images_per_sec, num_workers, extra_args)`
  (default: a local process pool, `plan.run_locally`; `tfrecord_tools.convert.beam`
  passes a Beam runner).

  Raises:
    ConvertError: bad arguments or input (missing/empty folder, one class,
      classes differing across splits, ...), an existing complete output
      without overwrite, or more skipped files than max_skipped_fraction
      (then the shards are kept for a rerun but no manifest is written),
      a worker process that died twice, or a main script without
      `if __name__ == "__main__":` that the workers re-ran.
  """
  pool.exit_if_starting_worker()
  log = log or (lambda m: None if opts.quiet else options.log(m))
  check_options(opts)
  # One process owns the output folder (a second converter fails at once, naming the holder).
  with locks.exclusive(opts.output_dir, "tfrecord_tools.convert"):
    return _convert_owned(opts, log, run_tasks)


def _convert_owned(opts: ConvertOptions, log: Callable[[str], None], run_tasks) -> dict:
  """convert() with the output folder's lock held."""
  _check_output(opts)
  t0 = time.monotonic()

  labelled = None
  if opts.labels_csv:
    found, classes, items, labelled, split_info = labelled_items(opts, log)
    names = labelled.names
    mapping, dropped = {}, {}
  else:
    found = (find_keras_pair(opts.input_dir) if opts.input_format == "keras_pair"
             else find_files(opts.input_dir))
    classes, mapping = resolve_classes(found, opts.class_map)
    names = read_patients(found, mapping, opts, log)   # ids in memory; pseudonyms written
    if opts.input_format != "keras_pair":
      found = dedupe(found, mapping, opts.on_conflict, log, names)
    items, dropped, split_info = make_items(found, classes, mapping, opts, log, names)
  if not items:
    raise ConvertError("--class_map drops every image")
  plan = plan_shards(items, opts)
  tasks = [t for ts in plan.values() for t in ts]
  log(f"found {len(found.sources)} images in {opts.input_dir} ({found.layout} layout); "
      f"classes {classes}; "
      + ", ".join(f"{sp}: {sum(len(t.items) for t in ts)} in {len(ts)} shards"
                  for sp, ts in plan.items())
      + (f"; dropped by --class_map: {dropped}" if dropped else ""))
  if len(classes) == 2 and not (labelled and labelled.multi_label):
    log(f"positive class (label 1: sensitivity, PPV, ROC): {classes[1]}; negative: {classes[0]}"
        + ("" if opts.class_map else " (another order: --class_map="
           f"{classes[1]},{classes[0]})"))
  if "train" not in {it.split for it in items}:
    log("warning: no train split (the input has only "
        f"{', '.join(sorted({it.split for it in items}))} folders): this data set can be "
        "evaluated on, not trained on")

  out = opts.output_dir
  storage.makedirs(out)
  if storage.exists(schema.manifest_path(out)):   # --overwrite: no longer complete from here on
    storage.remove(schema.manifest_path(out))
  tfds_metadata.remove(out)                      # it would describe the earlier shards
  storage.makedirs(storage.join(out, STATE_DIR))
  keep = {t.file for t in tasks}
  _clean_output(out, keep)

  results, todo = [], []
  for t in tasks:
    r = shards.load_finished(t)
    (results.append(r) if r is not None else todo.append(t))
  if not todo:
    log(f"nothing to convert: {len(results)} of {len(tasks)} shards already complete")
  elif results:
    log(f"resuming: {len(results)} of {len(tasks)} shards were finished by an earlier run")
  try:
    new_results, rate, num_workers, extra_args = (run_tasks or run_locally)(todo, opts, log)
  except (OSError, shards.ShardWriteError) as e:
    # Disk full, a read-only or vanished folder: no traceback, no temp files left behind;
    # the finished shards stay for the resume.
    try:
      _clean_output(out, keep)
    except OSError:
      pass
    finished = sum(1 for t in tasks if storage.exists(storage.join(out, t.file)))
    raise ConvertError(f"{_io_error_text(e)}; {finished} of {len(tasks)} shards are finished and "
                       "kept: fix the cause (e.g. free disk space) and run the same command again "
                       "to resume") from None
  results += new_results

  manifest = _build_manifest(opts, found, classes, mapping, dropped, plan, results,
                             split_info, num_workers, names)
  manifest["args"].update(extra_args)
  if labelled is not None:
    add_labels_manifest(manifest, labelled, items, opts)
  n_skip, n_found = manifest["num_skipped"], manifest["num_found"]
  if n_skip:
    log(f"skipped {n_skip} files:")
    for s in manifest["skipped"][:20]:
      log(f"  {s['path']}: {s['reason']}")
    if n_skip > 20:
      log(f"  ... and {n_skip - 20} more (all listed in {schema.MANIFEST_NAME})")
  if n_skip > opts.max_skipped_fraction * n_found:
    report = storage.join(out, "skipped.json")
    storage.write_bytes(report, json.dumps(manifest["skipped"], indent=1).encode())
    raise ConvertError(
        f"{n_skip} of {n_found} files could not be converted ({n_skip / n_found:.1%} > "
        f"--max_skipped_fraction={opts.max_skipped_fraction:g}); they are listed in {report}. "
        "Fix or remove them, or raise --max_skipped_fraction, and run again "
        "(finished shards are reused)")
  manifest["elapsed_s"] = round(time.monotonic() - t0, 2)
  manifest["images_per_sec"] = round(rate, 1)
  try:
    storage.write_bytes(schema.manifest_path(out), (json.dumps(manifest, indent=2) + "\n").encode())
  except OSError as e:
    raise ConvertError(f"{_io_error_text(e)}; every shard is finished: fix the cause and run the "
                       "same command again to write the manifest") from None
  _clean_output(out, keep)
  for name in (STATE_DIR, "skipped.json"):
    p = storage.join(out, name)
    if storage.exists(p):
      (storage.remove(p) if name.endswith(".json") else storage.rmtree(p))
  _write_tfds_metadata(out, manifest, log)
  return manifest


def _write_tfds_metadata(out: str, manifest: dict, log: Callable[[str], None]) -> None:
  """TFDS metadata beside dataset.json (tfrecord_tools.convert.tfds_metadata); a failure costs only that."""
  try:
    tfds_metadata.write(out, manifest)
  except Exception as e:  # noqa: BLE001 - the conversion itself is complete and kept
    why = (str(e).splitlines() or [""])[0]
    log(f"warning: TFDS metadata not written ({type(e).__name__}: {why}); the converted data "
        "set itself is complete")


def _io_error_text(e: BaseException) -> str:
  """One line for an I/O error at write time (errors.write_error_text's wording)."""
  if isinstance(e, shards.ShardWriteError):
    return str(e)
  return errors.write_error_text(getattr(e, "filename", None) or "", e)


def _build_manifest(opts, found, classes, mapping, dropped, plan, results, split_info,
                    num_workers, names) -> dict:
  """dataset.json (schema.py). Every path in it is as `names` writes it (patient ids
  replaced by their pseudonyms, or hashed); no patient id, no key."""
  by_file = {r["file"]: r for r in results}
  stats = shards.Stats()
  splits, skipped = {}, []
  for split, tasks in plan.items():
    rs = [by_file[t.file] for t in tasks]
    counts = {c: 0 for c in classes}
    patients = set()
    for r in rs:
      for c, n in r["class_counts"].items():
        counts[c] += n
      patients.update(r["patients"])
      skipped.extend(r["skipped"])
      stats.merge(r["stats"])
    splits[split] = {
        "num_examples": sum(r["num_examples"] for r in rs),
        "class_counts": counts,
        "num_groups": len(patients) if any(names.ids.values()) else None,   # patients grouped
        "shards": [{"file": r["file"], "num_examples": r["num_examples"],
                    **({"sha256": r["sha256"]} if r.get("sha256") else {})} for r in rs],
    }
  skipped.extend(found.skipped)
  skipped.sort(key=lambda s: s["path"])
  num_converted = sum(s["num_examples"] for s in splits.values())
  # Paths as given (argv may hold names that are not UTF-8): storage.escape_name's text.
  args = {k: storage.as_text(v) if isinstance(v, str) else v for k, v in dataclasses.asdict(opts).items()}
  args.pop("quiet")
  args.pop("patient_key_file")   # where the key is kept is the user's business: "privacy" has its id
  for name, split in (("val_fraction", "val"), ("test_fraction", "test")):
    if args[name] == AUTO_FRACTION:   # record what was applied
      args[name] = 0.0 if split in found.splits else DEFAULT_FRACTION
  args["num_workers"] = num_workers
  args["num_shards"] = {sp: len(ts) for sp, ts in plan.items()}
  args["class_map_resolved"] = {c: sorted(s for s, t in mapping.items() if t == c)
                                for c in classes}
  args.update(split_info)
  return {
      "manifest_version": schema.MANIFEST_VERSION,
      "name": storage.as_text(opts.name or os.path.basename(opts.output_dir.rstrip("/")) or "dataset"),
      "tool": "tfrecord_tools.convert",
      "tool_version": __version__,
      "pixel_contract": pixels.CONTRACT_VERSION,   # tfrecord_tools.pixels: what the records hold
      "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
      "args": args,
      "privacy": names.manifest_entry(),         # tfrecord_tools.pseudonym: how identifiers are written
      "classes": classes,
      "num_found": len(found.sources) + len(found.skipped),
      "num_converted": num_converted,
      "num_skipped": len(skipped),
      "num_dropped": sum(dropped.values()),
      "skipped": skipped,
      "dropped": dict(sorted(dropped.items())),
      "num_ignored": len(found.ignored),
      "ignored_examples": [names(r) for r in found.ignored[:20]],
      "num_duplicates": sum(len(d) for d in found.duplicates),
      # identical files within a class, kept in one split
      "duplicates": [[names(r) for r in d] for d in found.duplicates],
      # other paths to a converted file (not converted twice)
      "aliases": [{"path": names(a["path"]), "same_file_as": names(a["same_file_as"])}
                  for a in found.aliases],
      "layout": found.layout,
      "splits": splits,
      "image_stats": stats.summary(),
  }


def summary_table(manifest: dict) -> str:
  """Per split and class counts as a small text table."""
  classes = manifest["classes"]
  w = max([5] + [len(c) for c in classes])
  lines = [f"{'split':<6} {'total':>7}  " + "  ".join(f"{c:>{w}}" for c in classes)]
  for sp, info in manifest["splits"].items():
    lines.append(f"{sp:<6} {info['num_examples']:>7}  "
                 + "  ".join(f"{info['class_counts'][c]:>{w}}" for c in classes))
  return "\n".join(lines)
