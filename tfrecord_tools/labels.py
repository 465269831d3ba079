"""Label CSVs: which image has which labels, read from the publisher's files.

`read_labels(...)` reads one or more label CSVs and returns a `LabelSet`: the
recognised layout, the task, the classes (for a multi-label set: the K
findings, in order) and one `Row` per image with its labels as given. Which
file on disk a row names, the splits and the records are the converter's
business (`tfrecord_tools.convert`); how a row becomes a record's multi-hot
vector and mask under the uncertainty policies is `encode` here.

Layouts, recognised from the header (`recognise`):

  nih       NIH ChestX-ray14 (Data_Entry_2017.csv): `Image Index` (a file name,
            found anywhere under the image root), `Finding Labels` (findings
            joined by "|"; "No Finding" = every finding negative), `Patient ID`.
            Findings: every name the CSVs use, sorted (or --findings).
  chexpert  CheXpert / MIMIC-CXR-JPG: `Path` plus one column per finding holding
            1 (positive), 0 (negative), -1 (uncertain) or nothing (blank; float
            spellings 1.0 / 0.0 / -1.0 too). Finding columns are the columns whose
            every value is one of those, minus the metadata (Sex, Age, ...) and
            "No Finding" (the complement of the others; --findings can name it).
            Patient: a `subject_id` column (MIMIC), else the path segment
            `patientNNNNN` (CheXpert) or `pNNNNNNNN` (MIMIC's files/pXX/pNNNNNNNN/).
  rsna      RSNA Pneumonia Detection (stage_2_train_labels.csv): `patientId` (the
            image's file name without extension, e.g. <id>.dcm), `Target` 0/1 ->
            a single-label task, classes "No Pneumonia", "Pneumonia". The file
            has one row per bounding box: repeated rows of one image with the
            same Target are one image (counted as merged_rows).
  columns   anything else, by hand: --image_column and either --labels_column
            (findings joined by --label_separator; an empty separator makes the
            cell a single class name: a single-label task) or --label_columns
            (one 1/0/-1/blank column per finding); --patient_column optional.

Attributes: each row's sex, age and view, from the columns recognised in the
header of any layout (NIH Patient Gender / Patient Age / View Position, CheXpert
Sex / Age / Frontal/Lateral / AP/PA, MIMIC ViewPosition), and the
--metadata_columns, become its `meta` (record values, `tfrecord_tools.metadata`);
those columns are never findings.

Uncertain labels (-1) follow Irvin et al. 2019 (CheXpert), `--uncertain`:
ignore (masked out of the loss, the default), zeros (negative) or ones
(positive). A blank cell is negative (the report did not mention it) unless
`--blank=ignore` masks it out.

No TensorFlow here; CSVs are read through `tfrecord_tools.storage` (local or gs://).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import re
from typing import Callable, Iterable, Sequence

from tfrecord_tools import errors, metadata, storage

LAYOUTS = ("nih", "chexpert", "rsna", "columns")
MULTI_LABEL = "multi_label"
SINGLE_LABEL = "single_label"
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
BLANK_POLICIES = ("negative", "ignore")
NO_FINDING = "No Finding"
RSNA_CLASSES = ("No Pneumonia", "Pneumonia")

# A finding's state in the CSV (one character per finding in Row.states).
POSITIVE, NEGATIVE, UNCERTAIN, BLANK = "1", "0", "u", "b"
_CELL = {"1": POSITIVE, "1.0": POSITIVE, "0": NEGATIVE, "0.0": NEGATIVE, "-1": UNCERTAIN,
         "-1.0": UNCERTAIN, "": BLANK}
# CheXpert / MIMIC columns that are never findings, whatever they hold.
_METADATA = {"path", "sex", "age", "frontal/lateral", "ap/pa", "subject_id", "study_id",
             "dicom_id", "patient id", "patientid", "patient_id", "viewposition", "view position",
             "split", "no finding"}
_PATIENT_IN_PATH = (re.compile(r"(?:^|/)(patient\d+)(?:/|$)"),   # CheXpert
                    re.compile(r"(?:^|/)(p\d{8})(?:/|$)"))        # MIMIC-CXR-JPG


class LabelError(errors.UserError):
  """An unusable label CSV or label option (one line, no traceback)."""


@dataclasses.dataclass(frozen=True)
class Row:
  """One image as a label CSV names it."""
  image: str         # the image column's value, as written
  csv: str           # the CSV it comes from
  line: int          # its line in that CSV (the header is line 1)
  split: str         # the split of its CSV (--labels_csv=train=...), "" when none
  patient: str       # patient id, "" when the layout has none
  states: str = ""   # multi-label: one of POSITIVE/NEGATIVE/UNCERTAIN/BLANK per finding
  cls: str = ""      # single-label: the class name
  meta: tuple[tuple[str, str], ...] = ()   # sex, age, view, --metadata_columns as record values
                                           # (tfrecord_tools.metadata.Reader), known ones only

  def where(self) -> str:
    return f"{self.csv} line {self.line}"


@dataclasses.dataclass
class LabelSet:
  """What the label CSVs say (see the module doc)."""
  layout: str                 # one of LAYOUTS
  task: str                   # MULTI_LABEL or SINGLE_LABEL
  classes: list[str]          # findings (multi-label) or class names as found (single-label)
  rows: list[Row]
  csvs: list[str]
  columns: dict               # which columns were used: {"image": ..., "labels"/"findings": ..., "patient": ...}
  unlisted_findings: dict[str, int] = dataclasses.field(default_factory=dict)  # not in --findings
  merged_rows: int = 0        # RSNA: repeated box rows of one image
  metadata: dict = dataclasses.field(default_factory=dict)  # attribute -> its column(s)
                                                            # (tfrecord_tools.metadata)


# --------------------------------------------------------------------------
# Options given as strings (the converter's flags).
# --------------------------------------------------------------------------


def parse_split_files(spec: str, flag: str, split_aliases: dict[str, str]) -> list[tuple[str, str]]:
  """"FILE" -> [("", FILE)]; "train=a.csv,val=b.csv" -> [("train", "a.csv"), ("val", "b.csv")]."""
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  out, seen = [], set()
  for p in parts:
    name, eq, path = p.partition("=")
    if not eq:
      out.append(("", p))
      continue
    split = split_aliases.get(name.strip().lower())
    if split is None or not path.strip():
      raise LabelError(f"--{flag} entry {p!r} is not SPLIT=FILE with SPLIT one of train, val, test")
    if split in seen:
      raise LabelError(f"--{flag} names split {split} twice")
    seen.add(split)
    out.append((split, path.strip()))
  if not out:
    raise LabelError(f"--{flag} is empty")
  if len(out) > 1 and any(not s for s, _ in out):
    raise LabelError(f"--{flag}: give one FILE, or SPLIT=FILE for every file")
  return out


def _names(spec: str) -> list[str]:
  return [n.strip() for n in spec.split(",") if n.strip()]


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
  """The candidates a mistyped name is closest to, best first (case ignored; [] when none is
  close). difflib's similarity ratio (the standard library's, cutoff 0.6) rather than a
  hand-written edit distance: it ranks 'Efusion' -> 'Effusion' and 'effusion' -> 'Effusion'."""
  by_low: dict[str, str] = {}
  for c in candidates:
    by_low.setdefault(c.lower(), c)
  return [by_low[m] for m in difflib.get_close_matches(name.lower(), list(by_low), n=n)]


def did_you_mean(names: Sequence[str], candidates: Iterable[str]) -> str:
  """" (did you mean 'Effusion'?)" for the first of `names` with a close candidate, else ""."""
  candidates = list(candidates)
  for name in names:
    near = closest(name, candidates)
    if near:
      return f" (did you mean {' or '.join(repr(c) for c in near)} for {name!r}?)"
  return ""


# --------------------------------------------------------------------------
# Reading.
# --------------------------------------------------------------------------


def _read_csv(path: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
  """(header, [(line number, cells padded to the header)]); blank lines skipped."""
  try:
    text = storage.read_text(path)
  except FileNotFoundError:
    raise LabelError(f"label CSV {path} does not exist") from None
  except (OSError, storage.StorageError, UnicodeDecodeError) as e:
    raise LabelError(f"cannot read label CSV {path}: {e}") from None
  text = text.lstrip("\ufeff")
  reader = csv.reader(io.StringIO(text))
  try:
    header = [h.strip() for h in next(reader)]
  except StopIteration:
    raise LabelError(f"label CSV {path} is empty") from None
  except csv.Error as e:
    raise LabelError(f"label CSV {path}: {e}") from None
  rows = []
  try:
    for cells in reader:
      if not any(c.strip() for c in cells):
        continue
      cells = [c.strip() for c in cells] + [""] * (len(header) - len(cells))
      rows.append((reader.line_num, cells))
  except csv.Error as e:
    raise LabelError(f"label CSV {path} line {reader.line_num}: {e}") from None
  return header, rows


def _col(header: list[str], name: str) -> int | None:
  """Index of a column by name (exact, else case-insensitive)."""
  if name in header:
    return header.index(name)
  low = [h.lower() for h in header]
  return low.index(name.lower()) if name.lower() in low else None


def _status_columns(header: list[str], rows: list[tuple[int, list[str]]],
                    kept: Sequence[str] = ()) -> list[str]:
  """Columns whose every value is 1 / 0 / -1 / blank (and that are not metadata, nor
  --metadata_columns `kept`)."""
  out = []
  kept_low = {k.lower() for k in kept}
  for i, h in enumerate(header):
    if not h or h.lower() in _METADATA or h.lower() in kept_low:
      continue
    if all(r[i] in _CELL for _, r in rows):
      out.append(h)
  return out


def recognise(header: Sequence[str], *, image_column: str = "", labels_column: str = "",
              label_columns: str = "") -> str:
  """The layout of a CSV from its header (and the hand-set columns, which win)."""
  if image_column or labels_column or label_columns:
    return "columns"
  low = {h.strip().lower() for h in header}
  if {"image index", "finding labels"} <= low:
    return "nih"
  if "path" in low:
    return "chexpert"
  if {"patientid", "target"} <= low:
    return "rsna"
  raise LabelError(
      f"cannot tell the label CSV's layout from its header ({', '.join(header)}): expected NIH "
      "(Image Index, Finding Labels), CheXpert/MIMIC (Path + finding columns) or RSNA "
      "(patientId, Target); otherwise set --image_column and --labels_column (with "
      "--label_separator) or --label_columns")


def read_labels(csvs: Sequence[tuple[str, str]], *, image_column: str = "", labels_column: str = "",
                label_separator: str = "|", label_columns: str = "", patient_column: str = "",
                findings: str = "", metadata_columns: str = "",
                log: Callable[[str], None] = lambda m: None) -> LabelSet:
  """Reads the label CSVs ([(split or "", path)]) into one LabelSet.

  Every CSV must have the same layout (and, for column layouts, the same
  finding columns). Raises LabelError for an unknown layout, a missing column,
  a cell that is not a label, or a --findings name a column layout lacks.
  Each row's sex / age / view (recognised from the header) and `metadata_columns`
  become its `meta` (tfrecord_tools.metadata).
  """
  try:
    extra = metadata.parse_columns(metadata_columns)
  except metadata.MetadataError as e:
    raise LabelError(str(e)) from None
  try:
    out = _read_labels(csvs, image_column, labels_column, label_separator, label_columns,
                       patient_column, findings, extra, log)
  except metadata.MetadataError as e:
    raise LabelError(str(e)) from None
  return out


def _read_labels(csvs, image_column, labels_column, label_separator, label_columns,
                 patient_column, findings, extra, log) -> LabelSet:
  if label_columns and labels_column:
    raise LabelError("give --labels_column (findings in one cell) or --label_columns (a column "
                     "per finding), not both")
  if (labels_column or label_columns) and not image_column:
    raise LabelError("--labels_column / --label_columns need --image_column")
  if image_column and not (labels_column or label_columns):
    raise LabelError("--image_column needs --labels_column or --label_columns")
  wanted = _names(findings)
  if len(set(wanted)) != len(wanted):
    raise LabelError("--findings names a finding twice")
  tables = []
  layout = None
  for split, path in csvs:
    header, rows = _read_csv(path)
    lay = recognise(header, image_column=image_column, labels_column=labels_column,
                    label_columns=label_columns)
    if layout not in (None, lay):
      raise LabelError(f"label CSVs of different layouts ({layout}, and {lay} in {path})")
    layout = lay
    tables.append((split, path, header, rows))

  if layout == "nih" or (layout == "columns" and labels_column):
    return _read_joined(layout, tables, image_column or "Image Index",
                        labels_column or "Finding Labels",
                        label_separator if layout == "columns" else "|",
                        patient_column or ("" if layout == "columns" else "Patient ID"),
                        wanted, log, extra)
  if layout == "rsna":
    return _read_rsna(tables, patient_column, wanted, extra)
  return _read_state_columns(layout, tables, image_column or "Path", _names(label_columns),
                             patient_column, wanted, log, extra)


def _meta_reader(header, path, rows, extra, exclude) -> metadata.Reader:
  """The attribute columns of one CSV (tfrecord_tools.metadata.Reader)."""
  return metadata.Reader(header, extra, path, exclude=exclude, rows=[c for _, c in rows])


def _need(header: list[str], name: str, path: str, flag: str = "") -> int:
  i = _col(header, name)
  if i is None:
    how = f" (--{flag})" if flag else ""
    raise LabelError(f"label CSV {path} has no column {name!r}{how}; its columns: "
                     f"{', '.join(header)}")
  return i


def _patient_col(header: list[str], name: str, path: str, hand: bool) -> int | None:
  if not name:
    return None
  i = _col(header, name)
  if i is None and hand:
    _need(header, name, path, "patient_column")
  return i


def _read_joined(layout, tables, image_col, labels_col, sep, patient_col, wanted, log,
                 extra=()) -> LabelSet:
  """NIH, or by hand --labels_column: labels joined in one cell (sep "" = single class)."""
  single = sep == ""
  parsed = []   # (split, path, line, image, patient, [labels] or class)
  seen: dict[str, int] = {}
  metas, described = {}, {}
  for split, path, header, rows in tables:
    ii = _need(header, image_col, path, "image_column" if layout == "columns" else "")
    li = _need(header, labels_col, path, "labels_column" if layout == "columns" else "")
    pi = _patient_col(header, patient_col, path, hand=layout == "columns")
    meta = _meta_reader(header, path, rows, extra,
                        [header[ii], header[li]] + ([header[pi]] if pi is not None else []))
    described = described or meta.describe(header)
    for line, cells in rows:
      metas[(path, line)] = meta(cells)
      cell = cells[li]
      if single:
        if not cell:
          raise LabelError(f"{path} line {line}: no class in column {labels_col!r}")
        names = cell
      else:
        names = [n.strip() for n in cell.split(sep) if n.strip()]
        names = [n for n in names if n.lower() != NO_FINDING.lower()] if cell else None
        for n in names or []:
          seen[n] = seen.get(n, 0) + 1
      parsed.append((split, path, line, cells[ii], cells[pi] if pi is not None else "", names))
  if single:
    classes = sorted({p[5] for p in parsed})
    rows = [Row(image=im, csv=path, line=line, split=split, patient=pat, cls=c,
                meta=metas[(path, line)])
            for split, path, line, im, pat, c in parsed]
    return LabelSet(layout, SINGLE_LABEL, classes, rows, [t[1] for t in tables],
                    {"image": image_col, "labels": labels_col, "patient": patient_col or None},
                    metadata=described)
  if wanted:
    if any(w.lower() == NO_FINDING.lower() for w in wanted):
      raise LabelError(f"--findings names {NO_FINDING!r}, which in column {labels_col!r} means "
                       "none of the findings: name findings only")
    missing = [w for w in wanted if w not in seen]
    if missing:   # a typo would be a finding with no positive anywhere
      raise LabelError(f"--findings names {', '.join(repr(m) for m in missing)}, which no row of "
                       f"the label CSVs has in column {labels_col!r}{did_you_mean(missing, seen)}; "
                       f"the findings they name: {', '.join(sorted(seen)) or 'none'}")
  classes = wanted or sorted(seen)
  if not classes:
    raise LabelError(f"the label CSVs name no findings in column {labels_col!r} (every row is "
                     f"{NO_FINDING!r} or blank)")
  unlisted = {n: c for n, c in sorted(seen.items()) if n not in classes}
  if unlisted:
    log("labels: findings not in --findings are left out: "
        + ", ".join(f"{n} ({c} rows)" for n, c in unlisted.items()))
  index = {c: k for k, c in enumerate(classes)}
  rows = []
  for split, path, line, im, pat, names in parsed:
    if names is None:   # a blank cell: every finding blank
      states = BLANK * len(classes)
    else:
      st = [NEGATIVE] * len(classes)
      for n in names:
        if n in index:
          st[index[n]] = POSITIVE
      states = "".join(st)
    rows.append(Row(image=im, csv=path, line=line, split=split, patient=pat, states=states,
                    meta=metas[(path, line)]))
  return LabelSet(layout, MULTI_LABEL, list(classes), rows, [t[1] for t in tables],
                  {"image": image_col, "labels": labels_col, "separator": sep,
                   "patient": patient_col or None}, unlisted, metadata=described)


def _read_state_columns(layout, tables, image_col, hand_columns, patient_col, wanted, log,
                        extra=()) -> LabelSet:
  """CheXpert / MIMIC, or by hand --label_columns: one 1/0/-1/blank column per finding."""
  columns = None
  for split, path, header, rows in tables:
    if hand_columns:
      cols = [header[_need(header, c, path, "label_columns")] for c in hand_columns]
    else:
      cols = _status_columns(header, rows, extra)
    if columns is None:
      columns = cols
    elif cols != columns:
      raise LabelError(f"label CSV {path} has finding columns {cols}, but {tables[0][1]} has "
                       f"{columns}")
  assert columns is not None
  if not columns:
    raise LabelError(f"label CSV {tables[0][1]} has no finding columns (columns holding only "
                     "1, 0, -1 or blank): set them with --label_columns")
  first_header = tables[0][2]
  if wanted:
    missing = [w for w in wanted if _col(first_header, w) is None]
    if missing:
      raise LabelError(f"--findings names {', '.join(repr(m) for m in missing)}, which the label "
                       f"CSV {tables[0][1]} has no column for{did_you_mean(missing, first_header)}; "
                       f"finding columns: {', '.join(columns)}")
    classes = [first_header[_col(first_header, w)] for w in wanted]
  else:
    classes = list(columns)
  out = []
  described = {}
  for split, path, header, rows in tables:
    ii = _need(header, image_col, path, "image_column" if layout == "columns" else "")
    ci = [_col(header, c) for c in classes]
    pname = patient_col or ("" if layout == "columns" else "subject_id")
    pi = _patient_col(header, pname, path, hand=bool(patient_col))
    meta = _meta_reader(header, path, rows, extra,
                        [header[ii], *columns] + ([header[pi]] if pi is not None else []))
    described = described or meta.describe(header)
    for line, cells in rows:
      states = []
      for c, k in zip(classes, ci):
        v = cells[k]
        if v not in _CELL:
          raise LabelError(f"{path} line {line}: column {c!r} holds {v!r}, not 1, 0, -1 or blank")
        states.append(_CELL[v])
      image = cells[ii]
      if pi is not None:
        patient = cells[pi]
      elif layout == "chexpert":
        patient = next((m.group(1) for r in _PATIENT_IN_PATH
                        for m in [r.search(image.replace("\\", "/"))] if m), "")
      else:
        patient = ""
      out.append(Row(image=image, csv=path, line=line, split=split, patient=patient,
                     states="".join(states), meta=meta(cells)))
  pcol = patient_col or None
  if layout == "chexpert" and not patient_col:
    pcol = ("subject_id" if _col(first_header, "subject_id") is not None
            else "path segment patientNNNNN / pNNNNNNNN")
  return LabelSet(layout, MULTI_LABEL, classes, out, [t[1] for t in tables],
                  {"image": image_col, "findings": classes, "patient": pcol}, metadata=described)


def _read_rsna(tables, patient_col, wanted, extra=()) -> LabelSet:
  """RSNA: one row per box; an image's repeated rows must agree on Target."""
  if wanted:
    raise LabelError("--findings does not apply to the RSNA layout (a single Target column)")
  rows, merged = [], 0
  first: dict[str, Row] = {}
  described = {}
  for split, path, header, cells_rows in tables:
    ii, ti = _need(header, "patientId", path), _need(header, "Target", path)
    pi = _patient_col(header, patient_col, path, hand=True) if patient_col else ii
    meta = _meta_reader(header, path, cells_rows, extra, [header[ii], header[ti], header[pi]])
    described = described or meta.describe(header)
    for line, cells in cells_rows:
      t = cells[ti]
      if t not in ("0", "1", "0.0", "1.0"):
        raise LabelError(f"{path} line {line}: Target holds {t!r}, not 0 or 1")
      row = Row(image=cells[ii], csv=path, line=line, split=split, patient=cells[pi],
                cls=RSNA_CLASSES[int(float(t))], meta=meta(cells))
      prev = first.get((split, row.image))
      if prev is not None and prev.cls == row.cls:
        merged += 1
        continue
      if prev is None:
        first[(split, row.image)] = row
      rows.append(row)   # a conflicting repeat stays: the converter reports the image named twice
  return LabelSet("rsna", SINGLE_LABEL, list(RSNA_CLASSES), rows, [t[1] for t in tables],
                  {"image": "patientId", "labels": "Target",
                   "patient": patient_col or "patientId"}, merged_rows=merged,
                  metadata=described)


# --------------------------------------------------------------------------
# Rows -> record values.
# --------------------------------------------------------------------------


def encode(states: str, uncertain: str = "ignore", blank: str = "negative"
           ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """A row's finding states -> (multi_hot, mask), the record's two K-vectors.

  multi_hot 1.0 = present; mask 0.0 = ignored (uncertain with uncertain=ignore,
  blank with blank=ignore). Ignored entries have multi_hot 0.0.
  """
  hot, mask = [], []
  for s in states:
    if s == POSITIVE or (s == UNCERTAIN and uncertain == "ones"):
      hot.append(1.0), mask.append(1.0)
    elif (s == UNCERTAIN and uncertain == "ignore") or (s == BLANK and blank == "ignore"):
      hot.append(0.0), mask.append(0.0)
    else:
      hot.append(0.0), mask.append(1.0)
  return tuple(hot), tuple(mask)


def text_of(multi_hot: Sequence[float], classes: Sequence[str]) -> str:
  """The record's text: the present findings joined by "|", or "No Finding"."""
  present = [c for c, v in zip(classes, multi_hot) if v >= 0.5]
  return "|".join(present) if present else NO_FINDING


def new_finding_counts(classes: Sequence[str]) -> dict[str, dict[str, int]]:
  return {c: {"positive": 0, "negative": 0, "uncertain": 0, "ignored": 0} for c in classes}


def count_findings(counts: dict[str, dict[str, int]], classes: Sequence[str], states: str,
                   multi_hot: Sequence[float], mask: Sequence[float]) -> None:
  """Adds one record to per-finding counts: positive / negative as recorded (mask 1),
  ignored (mask 0), and uncertain = the CSV said -1 (whatever the policy made of it)."""
  for c, s, h, m in zip(classes, states, multi_hot, mask):
    e = counts[c]
    if m == 0.0:
      e["ignored"] += 1
    elif h == 1.0:
      e["positive"] += 1
    else:
      e["negative"] += 1
    if s == UNCERTAIN:
      e["uncertain"] += 1
