"""Stage 1b, labelled (--labels_csv): the label CSV rows name the images and their labels.

"Found", with a CSV, means the images the rows name: num_found = the
distinct images named by the label rows. Each is converted or skipped with a
reason (its file is missing, it is in no --split_lists file, it does not
decode), so converted + skipped == found as for folders. Image files under
the root that no row names are not found but counted apart (num_unlabelled,
with examples); other files are ignored (num_ignored). An image named by two
rows is an error that lists the names.

The CSV layouts (NIH, CheXpert/MIMIC, RSNA, by hand) are read by
`tfrecord_tools.labels`; here the rows become items (`labelled_items`: the
classes, the patients, the drawn splits through `split`) and the label parts
of the manifest (`add_labels_manifest`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

from tfrecord_tools import labels as labels_lib
from tfrecord_tools import metadata, pseudonym, storage
from tfrecord_tools.convert.classes import default_class_order
from tfrecord_tools.convert.find import Found, is_image_name, source_path, split_order, walk_files
from tfrecord_tools.convert.options import GROUP_NONE, SPLIT_ALIASES, ConvertError, ConvertOptions
from tfrecord_tools.convert.split import (assign_splits, compile_group_regex, detect_grouping,
                                          drawn_fractions, label_warnings, patient_id,
                                          patient_leaks)
from tfrecord_tools.shards import Item, Source


@dataclasses.dataclass
class Labelled:
  """What the label CSVs add to a conversion, for the items and the manifest."""
  labels: labels_lib.LabelSet
  states: dict[str, str]           # source rel -> the row's finding states (multi-label)
  skipped_rows: list[dict]         # {"path", "reason", "split"} of rows that name no usable image
  skipped_reasons: dict[str, int]  # reason kind -> rows
  unlabelled: list[str]            # image files under the root that no row names
  split_lists: list[str]
  # The patient pseudonyms and the written paths (set by `labelled_items`).
  names: pseudonym.Names = dataclasses.field(default_factory=pseudonym.Names)

  @property
  def multi_label(self) -> bool:
    return self.labels.task == labels_lib.MULTI_LABEL


def _list_root(root: str) -> tuple[list[str], dict[str, tuple[int, int]]]:
  """Every non-hidden file under the image root (relative, sorted); sizes/times when listed remotely."""
  if not storage.exists(root):
    raise ConvertError(f"input folder {root} does not exist")
  if not storage.isdir(root):
    raise ConvertError(f"--input_dir {root} is not a folder")
  if storage.is_remote(root):
    listed = {rel: (size, mtime) for rel, size, mtime in storage.walk_files(root)
              if not any(part.startswith(".") for part in rel.split("/"))}
    return sorted(listed), listed
  return list(walk_files(root)), {}


class _Resolver:
  """A row's image value -> the file under the root it names (None: missing).

  A value with '/' is a path under the root (its first segment may repeat the
  root's own name, as CheXpert's Path does); a bare file name is found anywhere
  under the root (NIH's images_0NN/images/ folders); a bare name without
  extension matches an image file's stem (RSNA's patientId -> <id>.dcm).
  """

  def __init__(self, root: str, files: Sequence[str]):
    self.root = root
    self.files = set(files)
    self.root_name = os.path.basename(root.rstrip("/"))
    self.by_name: dict[str, list[str]] = {}
    self.by_stem: dict[str, list[str]] = {}
    for rel in files:
      base = rel.rsplit("/", 1)[-1]
      self.by_name.setdefault(base, []).append(rel)
      if is_image_name(base):
        self.by_stem.setdefault(os.path.splitext(base)[0], []).append(rel)
    self.ambiguous: dict[str, list[str]] = {}

  def __call__(self, value: str) -> str | None:
    v = value.replace("\\", "/").lstrip("/")
    while v.startswith("./"):
      v = v[2:]
    if v in self.files:
      return v
    if "/" in v:
      first, rest = v.split("/", 1)
      return rest if first == self.root_name and rest in self.files else None
    hits = self.by_name.get(v) or ([] if os.path.splitext(v)[1] else self.by_stem.get(v, []))
    if len(hits) > 1:
      hits = self._one_file(hits)
    if len(hits) > 1:
      self.ambiguous[v] = hits
    return hits[0] if len(hits) == 1 else None

  def _one_file(self, hits: list[str]) -> list[str]:
    """Paths that are one local file reached through folder links (find lists every path a
    link reaches): its path without a link; otherwise `hits` (really different files)."""
    if storage.is_remote(self.root):
      return hits
    paths = {h: os.path.join(self.root, *h.split("/")) for h in hits}
    if len({os.path.realpath(p) for p in paths.values()}) > 1:
      return hits
    direct = [h for h, p in paths.items() if os.path.realpath(p) == os.path.abspath(p)]
    return [(direct or sorted(hits))[0]]


def _read_split_lists(spec: str) -> tuple[dict[str, str], list[str]]:
  """--split_lists -> ({image name: split}, the files); a name in two lists is an error."""
  split_of: dict[str, str] = {}
  files = []
  for split, path in labels_lib.parse_split_files(spec, "split_lists", SPLIT_ALIASES):
    if not split:
      raise ConvertError("--split_lists needs SPLIT=FILE entries, e.g. "
                         "train=train_val_list.txt,test=test_list.txt")
    try:
      text = storage.read_text(path)
    except (OSError, storage.StorageError) as e:
      raise ConvertError(f"cannot read --split_lists file {path}: {e}") from None
    files.append(path)
    for name in text.split():
      if split_of.get(name, split) != split:
        raise ConvertError(f"{name} is in the {split_of[name]} and the {split} --split_lists files")
      split_of[name] = split
  return split_of, files


def find_labelled(opts: ConvertOptions, log: Callable[[str], None]
                  ) -> tuple[Found, list[tuple[Source, labels_lib.Row]], Labelled]:
  """Reads the label CSVs, finds the image each row names; every row and file accounted for.

  Returns the Found (its sources: the named images that exist), each source
  with its row, and the rest (skipped rows, unlabelled files) for the manifest.
  Raises ConvertError (labels.LabelError) for unusable CSVs or options, an
  ambiguous file name, and images named by more than one row.
  """
  csvs = labels_lib.parse_split_files(opts.labels_csv, "labels_csv", SPLIT_ALIASES)
  lab = labels_lib.read_labels(
      csvs, image_column=opts.image_column, labels_column=opts.labels_column,
      label_separator=opts.label_separator, label_columns=opts.label_columns,
      patient_column=opts.patient_column, findings=opts.findings,
      metadata_columns=opts.metadata_columns, log=log)
  what = "findings" if lab.task == labels_lib.MULTI_LABEL else "classes"
  log(f"labels: {lab.layout} layout in {', '.join(lab.csvs)} ({len(lab.rows)} rows; columns "
      f"{json.dumps(lab.columns)}); {len(lab.classes)} {what}: {', '.join(lab.classes)}")
  split_of, list_files = {}, []
  if opts.split_lists:
    if any(r.split for r in lab.rows):
      raise ConvertError("give the publisher's splits one way: --labels_csv=SPLIT=FILE,... or "
                         "--split_lists, not both")
    split_of, list_files = _read_split_lists(opts.split_lists)

  files, listed = _list_root(opts.input_dir)
  resolve = _Resolver(opts.input_dir, files)
  skipped_rows, reasons = [], {}
  named: dict[str, list[labels_lib.Row]] = {}

  def skip(row, kind, split):
    reasons[kind] = reasons.get(kind, 0) + 1
    # "patient": the row's id, for `labelled_items` to write the path with its pseudonym
    skipped_rows.append({"path": row.image or f"({row.where()})", "reason": f"{kind} ({row.where()})",
                         "split": split, "patient": row.patient})

  accounted = set()   # files named by a row that is skipped: neither converted nor unlabelled
  for row in lab.rows:
    split = row.split
    if not row.image:
      skip(row, "no image named", split)
      continue
    rel = resolve(row.image)
    if split_of:
      key = row.image.replace("\\", "/")
      split = split_of.get(key) or split_of.get(key.rsplit("/", 1)[-1], "")
      if not split:
        skip(row, "not in any --split_lists file", "")
        accounted.add(rel)
        continue
    if rel is None:
      if row.image not in resolve.ambiguous:
        skip(row, "missing file", split)
      continue
    named.setdefault(rel, []).append(dataclasses.replace(row, split=split))
  if resolve.ambiguous:
    ex = "; ".join(f"{v}: {', '.join(h[:3])}" for v, h in list(resolve.ambiguous.items())[:3])
    raise ConvertError(f"{len(resolve.ambiguous)} image names in the label CSVs match several "
                       f"files under {opts.input_dir} ({ex}): name them by their path")
  twice = {rel: rows for rel, rows in named.items() if len(rows) > 1}
  if twice:
    ex = "; ".join(f"{rel} ({', '.join(r.where() for r in rows)})"
                   for rel, rows in sorted(twice.items())[:5])
    raise ConvertError(f"{len(twice)} images are named by more than one label row: {ex}"
                       + (f"; and {len(twice) - 5} more" if len(twice) > 5 else ""))

  pairs, ignored = [], []
  for rel in sorted(named):
    row = named[rel][0]
    path = source_path(opts.input_dir, rel)   # rel as find.walk_files writes it
    if rel in listed:
      size, mtime = listed[rel]
    else:
      try:   # a FIFO, device or socket is never opened (storage.stat_input)
        size, mtime = storage.stat_input(path)
      except OSError as e:
        skip(row, f"unreadable: {e.strerror or e}", row.split)
        continue
    pairs.append((Source(rel=rel, split=row.split, source_class=row.cls, path=path, size=size,
                         mtime_ns=mtime), row))
  unlabelled = []
  for rel in files:
    if rel not in named and rel not in accounted:
      (unlabelled if is_image_name(rel.rsplit("/", 1)[-1]) else ignored).append(rel)
  n_missing = reasons.get("missing file", 0)
  log(f"labels: {len(pairs)} labelled images found under {opts.input_dir}"
      + (f"; {n_missing} rows name a missing file" if n_missing else "")
      + (f"; {len(skipped_rows) - n_missing} other rows skipped" if len(skipped_rows) > n_missing else "")
      + (f"; {len(unlabelled)} image files no row names (unlabelled, not converted), e.g. "
         f"{unlabelled[0]}" if unlabelled else ""))
  if not lab.rows:
    raise ConvertError(f"the label CSVs ({', '.join(lab.csvs)}) have no rows")
  if not pairs:
    why = ", ".join(f"{k}: {n}" for k, n in sorted(reasons.items()))
    raise ConvertError(f"none of the {len(lab.rows)} label rows names an image file under "
                       f"{opts.input_dir} ({why}; e.g. {lab.rows[0].image!r}): is --input_dir "
                       "the image root?")
  given = sorted({r.split for _, r in pairs if r.split}, key=split_order)
  found = Found(root=opts.input_dir, sources=[s for s, _ in pairs], layout="labels_csv",
                splits=given, ignored=sorted(ignored))
  return found, pairs, Labelled(lab, {}, skipped_rows, reasons, unlabelled, list_files)


def labelled_items(opts: ConvertOptions, log: Callable[[str], None]
                    ) -> tuple[Found, list[str], list[Item], Labelled, dict]:
  """Label CSVs -> (found, classes, items, labelled, split info): labels, patients, splits.

  Drawn splits (from everything, or from the publisher's train) reuse
  `assign_splits`, by patient whenever the rows carry one (or --group_regex
  finds one in the path). Multi-label sets are stratified by each image's
  rarest present finding ("No Finding" its own stratum), so rare findings
  reach every split; a patient's stratum is that of most of their images.
  """
  found, pairs, lab = find_labelled(opts, log)
  classes = lab.labels.classes
  multi = lab.multi_label
  if not multi:
    classes = default_class_order(sorted({r.cls for _, r in pairs}))
    if len(classes) < 2:
      raise ConvertError(f"the labelled images have one class only ({classes[0]}): a classifier "
                         "needs at least two")
  regex, grouping = _grouping(opts, pairs, lab, log)
  raw, unmatched = {}, []
  for s, r in pairs:
    pid = r.patient if opts.group_by != GROUP_NONE else ""
    if not pid and regex is not None:
      pid = patient_id(s.rel, regex)
      if pid is None and grouping["source"] == "--group_regex":
        unmatched.append(s.rel)
    raw[s.rel] = pid or ""
  if unmatched:
    raise ConvertError(f"--group_regex {opts.group_regex!r} found no patient id in "
                       f"{len(unmatched)} paths, e.g. {unmatched[0]!r}")
  # From here on only pseudonyms: in the records, the manifest, the split order.
  names = lab.names = pseudonym.Names(raw, regex=regex, hash_all=opts.hash_filenames,
                                      key_file=opts.patient_key_file, log=log)
  pids = [names.patient(raw[s.rel]) for s, _ in pairs]
  for row in lab.skipped_rows:
    row["path"] = names(row["path"], raw=row.pop("patient", ""))
  lab.unlabelled = [names(rel) for rel in lab.unlabelled]
  encoded = [labels_lib.encode(r.states, opts.uncertain, opts.blank) if multi else ((), ())
             for _, r in pairs]
  if multi:
    prevalence = [sum(h[k] for h, _ in encoded) for k in range(len(classes))]
    rarest = sorted(range(len(classes)), key=lambda k: (prevalence[k], k))
    strata = [next((k for k in rarest if h[k] == 1.0), len(classes)) for h, _ in encoded]
  else:
    strata = [classes.index(r.cls) for _, r in pairs]
  splits = [r.split or "train" for _, r in pairs]
  info: dict[str, Any] = {"patient_grouping": grouping}
  fractions = drawn_fractions(opts, found.splits, what="split in the label files")
  if fractions:
    idx = [i for i, sp in enumerate(splits) if sp == "train"]
    drawn = assign_splits([pairs[i][0].rel for i in idx], [strata[i] for i in idx],
                          [pids[i] for i in idx], fractions, opts.seed)
    for i, sp in zip(idx, drawn):
      splits[i] = sp
    info["drawn_splits"] = dict(fractions)
  items = []
  for (s, r), sp, pid, (hot, mask) in zip(pairs, splits, pids, encoded):
    name = names(s.rel)
    name = "" if name == s.rel else name
    if multi:
      items.append(Item(source=s, split=sp, label=0, text=labels_lib.text_of(hot, classes),
                        patient_id=pid, multi_hot=hot, mask=mask, name=name, meta=r.meta))
      lab.states[s.rel] = r.states
    else:
      items.append(Item(source=s, split=sp, label=classes.index(r.cls), text=r.cls,
                        patient_id=pid, name=name, meta=r.meta))
  if any(pids):
    info.update(patient_leaks(items, log))
  # A finding with no positive anywhere may be a typo of a name the rows use but --findings left out.
  info["label_warnings"] = label_warnings(
      items, classes, log, closest=lambda name: labels_lib.closest(name, lab.labels.unlisted_findings))
  return found, classes, items, lab, info


def _grouping(opts: ConvertOptions, pairs, lab: Labelled, log: Callable[[str], None]
              ) -> tuple[Any, dict]:
  """(the regex that finds a patient id in a path, or None; dataset.json's
  args.patient_grouping): the rows' patient column wins; --group_regex covers rows
  without one; without either, the file names' own id (`split.detect_grouping`, as for
  folders); --group_by=none: no patients."""
  column = lab.labels.columns.get("patient")
  have = any(r.patient for _, r in pairs)
  if opts.group_by == GROUP_NONE:
    return None, {"source": "--group_by=none"}
  if opts.group_regex:
    return compile_group_regex(opts.group_regex), {
        "source": "--group_regex", "regex": opts.group_regex, **({"column": column} if have else {})}
  if have:
    return None, {"source": "label CSV", "column": column}
  return detect_grouping([s.rel for s, _ in pairs], opts.input_dir, log)


def metadata_summary(columns: dict, items: Sequence[Item], failed: set) -> dict:
  """dataset.json's "metadata": {"columns": {attribute: CSV column(s)}, "known":
  {attribute: converted images whose value is known}, "age": the rule}."""
  known: dict[str, int] = {}
  for it in items:
    if it.record_name in failed:
      continue
    for arg, _ in it.meta:
      name = metadata.NAMES.get(arg, "columns")
      known[name] = known.get(name, 0) + 1
  out = {"columns": columns, "known": {a: known.get(a, 0) for a in columns}}
  if "age" in columns:
    out["age"] = (f"whole years; {metadata.TOP_AGE} = {metadata.TOP_AGE} or older; above "
                  f"{metadata.MAX_AGE} unknown")
  return out


def add_labels_manifest(manifest: dict, lab: Labelled, items: Sequence[Item],
                         opts: ConvertOptions) -> None:
  """The label-CSV parts of dataset.json (see schema.py): task, finding counts, skipped rows."""
  failed = {s["path"] for s in manifest["skipped"]}
  classes = manifest["classes"]
  for split, info in manifest["splits"].items():
    done = [it for it in items if it.split == split and it.record_name not in failed]
    patients = {it.patient_id for it in done if it.patient_id}
    info["num_groups"] = len(patients) if patients else info.get("num_groups")
    if lab.multi_label:
      counts = labels_lib.new_finding_counts(classes)
      for it in done:
        labels_lib.count_findings(counts, classes, lab.states[it.source.rel], it.multi_hot, it.mask)
      info["finding_counts"] = counts
  skipped = sorted(manifest["skipped"] + lab.skipped_rows, key=lambda s: s["path"])
  manifest["num_unlabelled"] = len(lab.unlabelled)
  manifest["unlabelled_examples"] = lab.unlabelled[:20]
  kinds: dict[str, int] = dict(lab.skipped_reasons)
  for s in manifest["skipped"]:   # the images that did not convert
    kinds[s["reason"]] = kinds.get(s["reason"], 0) + 1
  manifest["num_found"] += len(lab.skipped_rows)
  manifest["num_skipped"] = len(skipped)
  manifest["skipped"] = skipped
  ls = lab.labels
  manifest["labels"] = {
      "layout": ls.layout, "csv": ls.csvs, "split_lists": lab.split_lists,
      "columns": ls.columns, "uncertain": opts.uncertain if lab.multi_label else None,
      "blank": opts.blank if lab.multi_label else None, "num_rows": len(ls.rows),
      "merged_rows": ls.merged_rows, "skipped_reasons": dict(sorted(kinds.items())),
      "unlisted_findings": ls.unlisted_findings,
  }
  if ls.metadata:   # the attribute columns kept in the records (tfrecord_tools.metadata)
    manifest["metadata"] = metadata_summary(ls.metadata, items, failed)
  if lab.multi_label:   # "task" beside "classes" (absent = single_label, as for folders)
    out = {}
    for k, v in manifest.items():
      if k == "classes":
        out["task"] = labels_lib.MULTI_LABEL
      out[k] = v
    manifest.clear()
    manifest.update(out)
