"""Stage 3, dedupe and split: identical files, patients, and each image's split.

  dedupe        files with identical contents (sha256): symlinked paths
                converted once, copies under two classes a conflict, copies
                within a class kept together in one split
  patient ids   --group_regex (a regex's first group in the file name),
                --group_by=dicom_patient_id (the DICOM header's PatientID), else
                the id the file names show (`detect_grouping`: synthetic.json's
                regex or "<id>_<n>"; --group_by=none: none), read by
                `read_patients`; from then on only their keyed pseudonyms
                (tfrecord_tools.pseudonym: records, manifest, log lines, split order)
  assign_splits stratified by class, seeded by hashing (seed, name), and by
                patient when one is known: a patient's images all go to one split
  make_items    the `Item`s (source, split, label, patient) the plan cuts into shards;
                patients the input's own splits share (`patient_leaks`) and labels a
                split cannot score (`label_warnings`) are warned and recorded
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Callable, Sequence

from tfrecord_tools import dicom, pixels, pseudonym, storage, synthetic
from tfrecord_tools.convert.find import Found, link_on_path, split_order
from tfrecord_tools.convert.options import (AUTO_FRACTION, DEFAULT_FRACTION, GROUP_NONE,
                                            ConvertError, ConvertOptions)
from tfrecord_tools.shards import Item, Source


# --------------------------------------------------------------------------
# Identical files.
# --------------------------------------------------------------------------


def _content_digest(src: Source) -> str:
  h = hashlib.sha256()
  with storage.open_input(src.path) as f:   # a regular file, read up to its end
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def dedupe(found: Found, mapping: dict[str, str], on_conflict: str,
           log: Callable[[str], None], name: Callable[[str], str] = lambda rel: rel) -> Found:
  """Finds files with identical contents (sha256; only files sharing a size are read).

  `name`: a path as messages and the skipped list show it (`pseudonym.Names`); the
  returned `aliases` and `duplicates` hold the paths themselves (named when written).

  - the same file reached by two paths (symlinks to files or folders): converted once,
    by the path without a link when there is one, the other paths listed in `aliases`;
  - identical contents under two classes (after --class_map: `mapping` source -> class;
    files whose class it drops are left alone): a conflict, whether copies or one file
    reached through a symbolic link (the message names the link). on_conflict="error"
    raises ConvertError listing the pairs; "skip" leaves every copy out (`skipped`, counted);
  - identical contents under one class: kept, listed in `duplicates`; `make_items`
    keeps them in one split (a duplicate upload must not leak from train into test).
  """
  by_size: dict[int, list[Source]] = {}
  for src in found.sources:
    if src.source_class in mapping:
      by_size.setdefault(src.size, []).append(src)
  by_digest: dict[str, list[Source]] = {}
  for same in by_size.values():
    if len(same) > 1:
      for src in same:
        by_digest.setdefault(_content_digest(src), []).append(src)
  drop: dict[str, dict | None] = {}     # rel -> skip record (conflict) or None (alias)
  conflicts, aliases, duplicates = [], [], []
  link_of: dict[str, str | None] = {}   # rel -> the symbolic link on its path (find.link_on_path)

  def real_path(src: Source) -> str:
    return src.path if storage.is_remote(src.path) else os.path.realpath(src.path)

  def link(src: Source) -> str | None:
    if src.rel not in link_of:
      link_of[src.rel] = link_on_path(found.root, src.rel)
    return link_of[src.rel]

  for digest, group in sorted(by_digest.items()):
    if len(group) < 2:
      continue
    group = sorted(group, key=lambda s: (link(s) is not None, s.rel))   # a path without links first
    classes = sorted({mapping[s.source_class] for s in group})
    if len(classes) > 1:
      conflicts.append(group)
      continue
    first_real: dict[str, Source] = {}
    distinct = []
    for src in group:
      real = real_path(src)
      if real in first_real:
        drop[src.rel] = None
        aliases.append({"path": src.rel, "same_file_as": first_real[real].rel})
        if src.split != first_real[real].split:
          log(f"warning: {name(src.rel)} reaches {name(first_real[real].rel)} (a symbolic link) "
              f"across split folders: converted once, in {first_real[real].split}")
      else:
        first_real[real] = src
        distinct.append(src.rel)
    if len(distinct) > 1:
      duplicates.append(distinct)
      if len({s.split for s in group}) > 1:
        log(f"warning: identical files in different split folders of the input: "
            f"{[name(r) for r in distinct[:3]]} "
            "(they leak between splits; remove the copies)")
  if conflicts:
    conflicts.sort(key=lambda g: min(s.rel for s in g))

    def through(g: list[Source], s: Source | None = None) -> list[str]:
      """The symbolic links by which one file (not a copy) is reached under two classes
      (the link on `s`'s path only, when given)."""
      same = [o for o in g if any(real_path(o) == real_path(p) for p in g if p is not o)]
      return sorted({link(o) for o in same if link(o) and (s is None or o is s)})
    links = sorted({lk for g in conflicts for lk in through(g)})
    # The links first (a linked folder makes every file of it a conflict), then examples.
    via = ((f" (the same file{'s' if len(conflicts) > 1 else ''}, reached through the symbolic "
            f"link{'s' if len(links) > 1 else ''} {', '.join(name(lk) for lk in links[:3])}"
            + (f" and {len(links) - 3} more" if len(links) > 3 else "") + ")") if links else "")
    shown = 2 if links else 5
    pairs = "; ".join(" = ".join(f"{name(s.rel)} ({mapping[s.source_class]})"
                                 for s in sorted(g, key=lambda s: s.rel)) for g in conflicts[:shown])
    more = f" (and {len(conflicts) - shown} more)" if len(conflicts) > shown else ""
    if on_conflict != "skip":
      raise ConvertError(f"{len(conflicts)} file(s) have the same contents under different classes"
                         f"{via}: {pairs}{more}. Remove the wrong copies"
                         + (" or links" if links else "")
                         + ", or pass --on_conflict=skip to leave them all out")
    for g in conflicts:
      for s in g:
        others = ", ".join(f"{name(o.rel)} ({mapping[o.source_class]})" for o in g if o is not s)
        own = through(g, s)
        drop[s.rel] = {"path": name(s.rel), "reason": f"same contents as {others} under another class"
                       + (f" (the same file, through the symbolic link {name(own[0])})" if own else "")}
    log(f"warning: skipped {sum(len(g) for g in conflicts)} files whose contents appear under "
        f"different classes (--on_conflict=skip): {pairs}{more}")
  if aliases:
    log(f"{len(aliases)} paths reach a file already found (symbolic links): converted once")
  if duplicates:
    log(f"{sum(len(d) for d in duplicates)} files are identical copies within their class "
        f"({len(duplicates)} groups, e.g. {[name(r) for r in duplicates[0][:2]]}): each group "
        "is kept in one split")
  return dataclasses.replace(
      found, sources=[s for s in found.sources if s.rel not in drop],
      skipped=sorted([{**r, "path": name(r["path"])} for r in found.skipped]   # find's, as written
                     + [r for r in drop.values() if r], key=lambda r: r["path"]),
      aliases=aliases, duplicates=duplicates)


# --------------------------------------------------------------------------
# Patients.
# --------------------------------------------------------------------------

# Patient ids in file names when neither --group_regex nor --group_by is given
# (`detect_grouping`; the rule is documented in docs/guide.md#patients-and-splits):
#   ID_N_REGEX  a file name "<id>_<n>" or "<id>-<n>" (extension aside), the id letters then
#               digits, or digits: p00012_0.png (tfrecord_tools.synthetic), patient7-2.dcm,
#               NIH's 00000013_005.png. Grouped by it when it is the rule of the input.
#   LEADING_ID_REGEX  only a leading id-like token (person12_bacteria_3.jpeg): a warning,
#               never grouped without being asked.
ID_N_REGEX = r"^([A-Za-z]*\d+)[_-]\d+(?:\.\w+)?$"
LEADING_ID_REGEX = r"^([A-Za-z]*\d+)[_-]"
AUTO_MIN_MATCHED = 0.9   # grouped when at least this share of the file names match,
AUTO_MAX_GROUP = 0.25    # and no id holds more than this share of the files (a date, a batch)
WARN_MIN_MATCHED = 0.5   # a warning when ids repeat in at least this share of the names


def compile_group_regex(pattern: str, flag: str = "--group_regex") -> re.Pattern | None:
  if not pattern:
    return None
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ConvertError(f"{flag} {pattern!r} is not a valid regex: {e}") from None
  return regex


def patient_id(rel: str, regex: re.Pattern | None) -> str | None:
  """First group of the regex searched in the file name (in the relative path
  when the regex contains '/'); None when it does not match."""
  if regex is None:
    return ""
  target = rel if "/" in regex.pattern else rel.rsplit("/", 1)[-1]
  m = regex.search(target)
  if not m:
    return None
  return m.group(1) if m.groups() else m.group(0)


def _synthetic_regex(root: str, log: Callable[[str], None]) -> str:
  """The group_regex tfrecord_tools.synthetic recorded in ROOT/synthetic.json ("" when none)."""
  path = storage.join(root, synthetic.MARKER)
  try:
    if not storage.exists(path):
      return ""
    info = json.loads(storage.read_text(path))
  except (OSError, ValueError, storage.StorageError) as e:
    log(f"warning: {path} cannot be read ({e}): its group_regex is not used")
    return ""
  if not isinstance(info, dict) or info.get("tool") != synthetic.TOOL:
    return ""
  regex = info.get("group_regex")
  return regex if isinstance(regex, str) else ""


def _id_counts(rels: Sequence[str], regex: re.Pattern) -> tuple[int, int, int, int]:
  """(files whose name the regex matches, distinct ids, ids naming several files, the most
  files one id names)."""
  counts: dict[str, int] = {}
  for rel in rels:
    pid = patient_id(rel, regex)
    if pid:
      counts[pid] = counts.get(pid, 0) + 1
  return (sum(counts.values()), len(counts), sum(1 for n in counts.values() if n > 1),
          max(counts.values(), default=0))


def detect_grouping(rels: Sequence[str], root: str, log: Callable[[str], None]
                    ) -> tuple[re.Pattern | None, dict]:
  """The patient id the file names show, when neither --group_regex nor --group_by is given.

  The candidate regex is synthetic.json's group_regex (the generator's own record of its
  names) when the input has one, else ID_N_REGEX ("<id>_<n>"). The images are grouped by
  it when at least AUTO_MIN_MATCHED of the file names match, some id names two files or
  more, and no id names more than AUTO_MAX_GROUP of them; a file whose name does not
  match is then its own group. When no id repeats, every patient has one image and
  nothing needs grouping. Ids that repeat in too few names (or in a leading token only,
  LEADING_ID_REGEX) give a warning instead. Returns (the regex or None, dataset.json's
  "patient_grouping"); the log says which. No id is shown: only counts and the regex.
  """
  given = _synthetic_regex(root, log)
  source = synthetic.MARKER if given else "file names"
  regex = compile_group_regex(given, f"{synthetic.MARKER}'s group_regex") if given else re.compile(ID_N_REGEX)
  total = len(rels)
  matched, num_ids, repeated, largest = _id_counts(rels, regex)
  record = {"source": source, "regex": regex.pattern, "files_matched": matched,
            "num_files": total, "num_ids": num_ids, "ids_repeated": repeated}
  how = ("the generator's group_regex in synthetic.json" if given
         else "file names of the form <id>_<n> / <id>-<n>")
  if repeated and matched >= AUTO_MIN_MATCHED * total and largest <= AUTO_MAX_GROUP * total:
    rest = total - matched
    log(f"patients: {how} (regex {regex.pattern!r}: {matched} of {total} files, {num_ids} "
        f"ids, {repeated} with several films): each patient's films stay in one split"
        + (f"; the {rest} other files are each their own group" if rest else "")
        + " (another rule: --group_regex; split by image: --group_by=none)")
    return regex, record
  leading = not repeated
  if leading:
    # No id repeats: one image per patient, grouping changes nothing. Maybe a leading token repeats.
    regex = re.compile(LEADING_ID_REGEX)
    matched, num_ids, repeated, largest = _id_counts(rels, regex)
    record.update(regex=regex.pattern, files_matched=matched, num_ids=num_ids,
                  ids_repeated=repeated)
    how = "file names that start with an id-like token"
  if repeated and matched >= WARN_MIN_MATCHED * total:
    why = ("the id is only the names' first token" if leading
           else "an id names more than a quarter of the files (a date or a batch?)"
           if largest > AUTO_MAX_GROUP * total
           else f"fewer than {AUTO_MIN_MATCHED:.0%} of the names match")
    msg = (f"{matched} of {total} {how} share ids ({repeated} ids name several files; regex "
           f"{regex.pattern!r}), but {why}: if that is a patient id, pass --group_regex (a "
           "regex every file name matches) to keep each patient's films in one split; "
           "--group_by=none says there are no patients")
    log(f"warning: patients are not grouped: {msg}")
    return None, {"source": "none", "warning": msg, **{k: v for k, v in record.items()
                                                      if k != "source"}}
  return None, {"source": "none"}


def dicom_patient_id(s: Source) -> str | None:
  """The PatientID of a DICOM file's header (--group_by=dicom_patient_id); None when the
  file is no DICOM or has none. A header that cannot be read at all gives "" (the file
  is its own group, and the conversion skips it with the reason)."""
  try:
    with storage.open(s.path, "rb") as f:
      if s.offset >= 0 or not dicom.is_dicom(f.read(132), s.rel):
        return None
      f.seek(0)
      return dicom.patient_id(f)
  except (OSError, pixels.ImageError):
    return ""


class PatientNames(pseudonym.Names):
  """`pseudonym.Names` that also says how the patients were found (`grouping`: dataset.json's
  args.patient_grouping)."""

  def __init__(self, ids, *, grouping: dict, **kw):
    super().__init__(ids, **kw)
    self.grouping = grouping


def read_patients(found: Found, mapping: dict[str, str], opts: ConvertOptions,
                  log: Callable[[str], None]) -> PatientNames:
  """Each source's patient id (--group_regex, --group_by, else `detect_grouping`; None where
  a required one is not found, "" for a file of its own), kept in memory only, in the
  `Names` that writes their pseudonyms and the paths."""
  regex = compile_group_regex(opts.group_regex)
  rels = [s.rel for s in found.sources if s.source_class in mapping]
  ids: dict[str, str | None] = {}
  if opts.group_by == GROUP_NONE:
    grouping = {"source": "--group_by=none"}
  elif opts.group_by:
    ids = {s.rel: dicom_patient_id(s) for s in found.sources if s.source_class in mapping}
    grouping = {"source": f"--group_by={opts.group_by}"}
  elif regex is not None:
    ids = {rel: patient_id(rel, regex) for rel in rels}
    grouping = {"source": "--group_regex", "regex": opts.group_regex}
  else:
    regex, grouping = detect_grouping(rels, found.root, log)
    if regex is not None:
      ids = {rel: patient_id(rel, regex) or "" for rel in rels}
  return PatientNames(ids, grouping=grouping, regex=regex,
                      hash_all=opts.hash_filenames, key_file=opts.patient_key_file, log=log)


# --------------------------------------------------------------------------
# Splits and items.
# --------------------------------------------------------------------------


def hash_key(seed: int, *parts: str) -> bytes:
  """sha256 of the seed and the parts (names), each as the file system's bytes
  (`storage.name_bytes`: a name that is not UTF-8 hashes as its raw bytes, whatever its
  escaped text; any other name as its UTF-8, so splits are as before)."""
  return hashlib.sha256(b"\0".join(storage.name_bytes(p) for p in (str(seed), *parts))).digest()


def assign_splits(keys: Sequence[str], labels: Sequence[int], groups: Sequence[str],
                  fractions: dict[str, float], seed: int, rest: str = "train") -> list[str]:
  """Seeded, class-stratified, group-aware split of items.

  Items sharing a group (patient) always get the same split; a group's stratum
  is its most common label. Within a stratum, groups are ordered by
  sha256(seed, group) and taken for each split in `fractions` order until that
  split holds round(fraction * stratum size) images; the rest go to `rest`.
  Hash order makes the result independent of file-system order and stable
  when unrelated files are added.

  Args:
    keys: a unique name per item (its relative path).
    labels: class index per item.
    groups: group (patient) per item; "" = the item is its own group.
    fractions: e.g. {"test": 0.15, "val": 0.15}.
  Returns:
    The split name per item.
  """
  members: dict[str, list[int]] = {}
  for i, (k, g) in enumerate(zip(keys, groups)):
    members.setdefault(g if g else "\0file\0" + k, []).append(i)
  strata: dict[int, list[str]] = {}
  for g, idx in members.items():
    counts: dict[int, int] = {}
    for i in idx:
      counts[labels[i]] = counts.get(labels[i], 0) + 1
    label = min(counts, key=lambda lab: (-counts[lab], lab))
    strata.setdefault(label, []).append(g)
  out = [rest] * len(keys)
  for label in sorted(strata):
    ordered = sorted(strata[label], key=lambda g: hash_key(seed, g))
    total = sum(len(members[g]) for g in ordered)
    targets = {s: round(f * total) for s, f in fractions.items() if f > 0}
    filled = {s: 0 for s in targets}
    for g in ordered:
      for s in targets:
        if filled[s] < targets[s]:
          filled[s] += len(members[g])
          for i in members[g]:
            out[i] = s
          break
  return out


def _split_groups(keys: Sequence[str], pids: Sequence[str], duplicates: list[list[str]]) -> list[str]:
  """assign_splits's group per item: the patient id, or the item itself (its "" / rel key),
  with each set of duplicate files (and their patients) merged into one group."""
  base = [p if p else "\0file\0" + k for k, p in zip(keys, pids)]
  parent = {b: b for b in base}

  def find(x: str) -> str:
    while parent[x] != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  index = {k: i for i, k in enumerate(keys)}
  for dup in duplicates:
    roots = sorted({find(base[index[k]]) for k in dup if k in index})
    for r in roots[1:]:
      parent[r] = roots[0]
  return [find(b) for b in base]


def drawn_fractions(opts: ConvertOptions, given: Sequence[str], what: str = "folder"
                     ) -> dict[str, float]:
  """{"test": f, "val": f} to draw from train: --*_fraction, auto = none when the input gives the split."""
  fractions = {}
  for name, frac in (("test", opts.test_fraction), ("val", opts.val_fraction)):
    if frac == AUTO_FRACTION:   # the CLI default: the input's own folder wins
      frac = 0.0 if name in given else DEFAULT_FRACTION
    if frac > 0:
      if name in given:
        raise ConvertError(f"the input already has a {name} {what}: drop --{name}_fraction "
                           f"(or remove the {what} to draw the split from train)")
      fractions[name] = frac
  return fractions


def make_items(found: Found, classes: list[str], mapping: dict[str, str],
                opts: ConvertOptions, log: Callable[[str], None],
                names: PatientNames | None = None) -> tuple[list[Item], dict[str, int], dict]:
  """Maps classes, pseudonymises the patient ids (`names`: `read_patients`'s) and draws
  the splits (by pseudonym: the same key gives the same splits)."""
  names = names or read_patients(found, mapping, opts, log)
  grouped = bool(names.ids)
  label_of = {c: i for i, c in enumerate(classes)}
  kept, dropped = [], {}
  for s in found.sources:
    if s.source_class not in mapping:
      dropped[s.source_class] = dropped.get(s.source_class, 0) + 1
      continue
    kept.append(s)
  pids = []
  unmatched = []
  for s in kept:
    raw = names.ids.get(s.rel) if grouped else ""
    if raw is None:
      unmatched.append(s.rel)
      raw = ""
    pids.append(names.patient(raw))
  if unmatched and opts.group_by:
    raise ConvertError(f"--group_by=dicom_patient_id: {len(unmatched)} files are not DICOM or "
                       f"have no PatientID, e.g. {unmatched[0]!r}")
  if unmatched:
    raise ConvertError(f"--group_regex {opts.group_regex!r} found no patient id in "
                       f"{len(unmatched)} file names, e.g. {unmatched[0]!r}")
  labels = [label_of[mapping[s.source_class]] for s in kept]
  splits = [s.split or "train" for s in kept]
  info: dict[str, Any] = {"patient_grouping": names.grouping}

  # Draw the splits the layout does not give: from everything (classes layout)
  # or from train (splits layout without val/ or test/).
  fractions = drawn_fractions(opts, found.splits)
  if fractions:
    pool = [i for i, sp in enumerate(splits) if sp == "train"]
    keys = [kept[i].rel for i in pool]
    groups = _split_groups(keys, [pids[i] for i in pool], found.duplicates)
    drawn = assign_splits(keys, [labels[i] for i in pool], groups, fractions, opts.seed)
    for i, sp in zip(pool, drawn):
      splits[i] = sp
    info["drawn_splits"] = {k: v for k, v in fractions.items()}

  items = [Item(source=s, split=sp, label=lab, text=classes[lab], patient_id=pid,
                name=_name_if_other(names, s.rel))
           for s, sp, lab, pid in zip(kept, splits, labels, pids)]
  if grouped:
    info.update(patient_leaks(items, log))
  info["label_warnings"] = label_warnings(items, classes, log)
  return items, dropped, info


def _name_if_other(names: pseudonym.Names, rel: str) -> str:
  """Item.name: the written path when it differs from rel ("" otherwise)."""
  name = names(rel)
  return "" if name == rel else name


LEAK_EXAMPLES = 10   # patients in several splits named (by pseudonym) in dataset.json


def patient_leaks(items: Sequence[Item], log: Callable[[str], None]) -> dict[str, Any]:
  """Patients whose images the input's own splits (split folders, the publisher's CSVs or
  lists) put in several splits: a warning, and dataset.json's args
  `patients_in_several_splits` (their number) and `patients_in_several_splits_examples`
  ({"patient": pseudonym, "images": {split: n}}, at most LEAK_EXAMPLES)."""
  per: dict[str, dict[str, int]] = {}
  for it in items:
    if it.patient_id:
      by_split = per.setdefault(it.patient_id, {})
      by_split[it.split] = by_split.get(it.split, 0) + 1
  leaked = sorted(p for p, sps in per.items() if len(sps) > 1)
  if leaked:
    pairs: dict[str, int] = {}
    for p in leaked:
      key = "+".join(sorted(per[p], key=split_order))
      pairs[key] = pairs.get(key, 0) + 1
    log(f"warning: {len(leaked)} patients appear in more than one of the input's own "
        f"splits ({', '.join(f'{k}: {n}' for k, n in sorted(pairs.items()))}; e.g. "
        f"{leaked[0]!r}): their images leak between splits (listed in dataset.json)")
  return {"patients_in_several_splits": len(leaked),
          "patients_in_several_splits_examples": [
              {"patient": p, "images": {sp: per[p][sp] for sp in sorted(per[p], key=split_order)}}
              for p in leaked[:LEAK_EXAMPLES]]}


def label_warnings(items: Sequence[Item], classes: Sequence[str], log: Callable[[str], None],
                   closest: Callable[[str], list[str]] | None = None) -> list[dict]:
  """Labels a split cannot score: a class (single-label) with no image in a split, a
  finding (multi-label: the items carry multi_hot/mask) with no positive or no negative
  in a split (its AUC there is undefined; with none in any split, the model learns
  nothing for it). One warning line per kind, naming the `closest` other names of a
  finding with no positive anywhere (a typo?). Returns dataset.json's args
  `label_warnings`: [{"split", "label", "positives", "negatives"}] (counts before
  conversion; the splits' class_counts / finding_counts hold what was written)."""
  multi = any(it.multi_hot for it in items)
  by_split: dict[str, list[Item]] = {}
  for it in items:
    by_split.setdefault(it.split, []).append(it)
  out = []
  for split in sorted(by_split, key=split_order):
    its = by_split[split]
    for k, name in enumerate(classes):
      if multi:
        pos = sum(1 for it in its if it.mask[k] == 1.0 and it.multi_hot[k] == 1.0)
        neg = sum(1 for it in its if it.mask[k] == 1.0 and it.multi_hot[k] != 1.0)
      else:
        pos = sum(1 for it in its if it.label == k)
        neg = len(its) - pos
      if pos == 0 or (multi and neg == 0):
        out.append({"split": split, "label": name, "positives": pos, "negatives": neg})
  kinds = ((("findings with no positive", "positives"), ("findings with no negative", "negatives"))
           if multi else (("classes with no image", "positives"),))
  for kind, key in kinds:
    hit: dict[str, list[str]] = {}
    for w in out:
      if w[key] == 0:
        hit.setdefault(w["label"], []).append(w["split"])
    parts = []
    for name, splits in hit.items():
      near = closest(name) if closest and key == "positives" and len(splits) == len(by_split) else []
      parts.append(f"{name!r} ({', '.join(splits)}"
                   + (f"; a typo? closest names in the labels: {', '.join(near)}" if near else "")
                   + ")")
    if parts:
      log(f"warning: {kind} in a split: {'; '.join(parts)}: that split cannot score "
          f"{'them' if len(parts) > 1 else 'it'} (counts in dataset.json)")
  return out
