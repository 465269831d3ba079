"""Patient and acquisition attributes kept with each record, for subgroup results.

A label CSV's demographic and view columns become record fields (the fields
themselves are rows of `tfrecord_tools.records.FEATURES`; their keyword
arguments are `ARGS` here), each normalised by one rule:

  image/meta/sex      "M" | "F" | "" (unknown: blank, "Unknown", "O", anything else)
  image/meta/age      whole years as text, "0".."90"; "90" means 90 or older (ages above 89
                      are aggregated, as HIPAA's Safe Harbor rule asks); "" unknown. Read from
                      58 / 58.0 / "058Y" (NIH's older files, DICOM's Age String) / "003M",
                      "010W", "005D" (under a year: 0); implausible ages (below 0, above
                      MAX_AGE: NIH's file has a few hundred-year-olds) are unknown. Never a
                      date: a birth date is not read, and no age is computed from dates.
  image/meta/view     "PA" | "AP" | "LATERAL" (LL, RL, LAT and CheXpert's Frontal/Lateral
                      "Lateral") | "FRONTAL" (CheXpert frontal without AP/PA) | another
                      projection as written, upper case ("AP AXIAL", "LAO"); "" unknown
  image/meta/columns  --metadata_columns: JSON {column: value as written}; "" when none

Recognised columns, from the header of any layout (case ignored):

  sex    NIH "Patient Gender", CheXpert "Sex", also "Gender", "PatientSex"
  age    NIH "Patient Age", CheXpert "Age", also "PatientAge"
  view   NIH "View Position", MIMIC-CXR "ViewPosition" (its metadata CSV's column, joined
         into the label CSV), CheXpert "Frontal/Lateral" + "AP/PA"

`--metadata_columns=COL,COL` keeps other columns as written (a scanner, a site, a
sex column under another name is better renamed). Columns that look like
identifiers or dates (ID, name, date, birth, MRN, accession, UID, address,
phone, e-mail in the name; values that look like dates) are refused: records are
shared (docs/privacy.md). A DICOM file's PatientSex, PatientAge and
ViewPosition are read by `tfrecord_tools.dicom` with the same rules (a CSV's
values win).

No TensorFlow here.
"""

from __future__ import annotations

import json
import math
import re
from typing import Sequence

from tfrecord_tools import errors

# The records' keyword arguments (tfrecord_tools.records.FEATURES) of the attributes.
SEX, AGE, VIEW, COLUMNS = "meta_sex", "meta_age", "meta_view", "meta_columns"
ARGS = (SEX, AGE, VIEW, COLUMNS)
# The attributes' names in manifests and reports.
NAMES = {SEX: "sex", AGE: "age", VIEW: "view"}
MAX_AGE = 120            # older is a typo in the source (unknown)
TOP_AGE = 90             # 90 and older are written as 90 ("90+")
LATERAL, FRONTAL = "LATERAL", "FRONTAL"

_RECOGNISED = {
    SEX: ("patient gender", "sex", "gender", "patientsex", "patient sex"),
    AGE: ("patient age", "age", "patientage"),
    VIEW: ("view position", "viewposition", "ap/pa"),
}
_FRONTAL_LATERAL = "frontal/lateral"
_LATERALS = {"LL", "RL", "LAT", "LATERAL", "LEFT LATERAL", "RIGHT LATERAL"}
_IDENTIFIER_WORDS = {"id", "ids", "name", "names", "date", "dates", "dob", "mrn", "accession",
                     "uid", "uids", "address", "phone", "email", "mail", "ssn", "birth",
                     "birthdate", "birthday", "time", "datetime", "zip", "postcode"}
_DATE_VALUE = re.compile(r"^\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|^\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}$|"
                         r"^(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])$")
_AGE_STRING = re.compile(r"^(\d{1,3})\s*([YMWD])$", re.I)   # DICOM AS: 058Y, 003M, 010W, 005D


class MetadataError(errors.UserError):
  """An unusable --metadata_columns (one line for the user)."""


def sex(value) -> str:
  v = str(value or "").strip().lower()
  if v in ("m", "male", "man"):
    return "M"
  if v in ("f", "female", "woman"):
    return "F"
  return ""


def age(value) -> str:
  """Whole years as text ("" unknown); 90 and older -> "90"."""
  v = str(value or "").strip()
  if not v:
    return ""
  m = _AGE_STRING.match(v)
  if m:
    years = int(m.group(1)) if m.group(2).upper() == "Y" else 0
  else:
    try:
      x = float(v)
    except ValueError:
      return ""
    if not math.isfinite(x):
      return ""
    years = x
  if years < 0 or years > MAX_AGE:
    return ""
  return str(min(int(years), TOP_AGE))


def view(value, frontal_lateral: str = "") -> str:
  """The projection, upper case (see the module doc); "" unknown."""
  v = " ".join(str(value or "").upper().split())
  fl = str(frontal_lateral or "").strip().lower()
  if fl == "lateral" or v in _LATERALS:
    return LATERAL
  if not v or v in ("UNKNOWN", "NAN", "NONE", "-"):
    return FRONTAL if fl == "frontal" else ""
  if len(v) > 32 or not re.fullmatch(r"[A-Z0-9 _\-]+", v):
    return ""
  return v


def identifier_like(name: str, values: Sequence[str] = ()) -> str:
  """Why a column may not be kept (it may identify a patient), or ""."""
  words = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name)   # camelCase and snake_case
  if any(w.lower() in _IDENTIFIER_WORDS for w in words) or re.search(r"birth|accession", name, re.I):
    return "its name says it is an identifier or a date"
  dates = sum(bool(_DATE_VALUE.match(v.strip())) for v in values if v.strip())
  if dates and dates >= 0.5 * sum(bool(v.strip()) for v in values):
    return "its values look like dates"
  return ""


class Reader:
  """A CSV header's attribute columns -> each row's record values (`__call__`).

  header: the CSV's columns; extra: the --metadata_columns names; exclude: the
  columns the layout already uses (image, labels, patient), never kept.
  """

  def __init__(self, header: Sequence[str], extra: Sequence[str], path: str,
               exclude: Sequence[str] = (), rows: Sequence[Sequence[str]] = ()):
    low = {h.strip().lower(): i for i, h in enumerate(header) if h.strip()}
    excluded = {e.strip().lower() for e in exclude if e}
    self.index: dict[str, int] = {}
    for arg, names in _RECOGNISED.items():
      for n in names:
        if n in low and n not in excluded:
          self.index[arg] = low[n]
          break
    self.frontal_lateral = low.get(_FRONTAL_LATERAL)
    if self.frontal_lateral is not None and VIEW not in self.index:
      self.index[VIEW] = -1   # Frontal/Lateral alone
    self.extra: list[tuple[str, int]] = []
    used = {i for i in self.index.values() if i >= 0}
    for name in extra:
      i = low.get(name.strip().lower())
      if i is None:
        raise MetadataError(f"--metadata_columns names {name!r}, which label CSV {path} has no "
                            f"column for; its columns: {', '.join(header)}")
      col = header[i]
      if col.strip().lower() in excluded:
        raise MetadataError(f"--metadata_columns names {col!r}, the label CSV's image, label or "
                            "patient column: it is not kept as an attribute")
      if i in used:
        raise MetadataError(f"--metadata_columns names {col!r}, which is already kept as the "
                            f"{NAMES[next(a for a, j in self.index.items() if j == i)]} attribute")
      why = identifier_like(col, [r[i] for r in rows[:1000] if i < len(r)])
      if why:
        raise MetadataError(f"--metadata_columns names {col!r}: {why}, and records are shared "
                            "(docs/privacy.md); keep only attributes that identify no one")
      self.extra.append((col, i))
      used.add(i)

  def describe(self, header: Sequence[str]) -> dict:
    """For the manifest: {"sex": column, "age": ..., "view": ..., "columns": [extra names]}."""
    out = {}
    for arg, i in self.index.items():
      cols = [header[i]] if i >= 0 else []
      if arg == VIEW and self.frontal_lateral is not None:
        cols.append(header[self.frontal_lateral])
      out[NAMES[arg]] = " + ".join(cols)
    if self.extra:
      out["columns"] = [c for c, _ in self.extra]
    return out

  def __bool__(self) -> bool:
    return bool(self.index or self.extra)

  def __call__(self, cells: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The row's record values: ((arg, value), ...), unknown ones left out."""
    out = []
    if SEX in self.index:
      out.append((SEX, sex(cells[self.index[SEX]])))
    if AGE in self.index:
      out.append((AGE, age(cells[self.index[AGE]])))
    if VIEW in self.index:
      i = self.index[VIEW]
      fl = cells[self.frontal_lateral] if self.frontal_lateral is not None else ""
      out.append((VIEW, view(cells[i] if i >= 0 else "", fl)))
    if self.extra:
      out.append((COLUMNS, json.dumps({c: cells[i] for c, i in self.extra}, sort_keys=True,
                                      ensure_ascii=False)))
    return tuple((a, v) for a, v in out if v)


def parse_columns(spec: str) -> list[str]:
  """--metadata_columns "A,B" -> ["A", "B"] (a name twice is an error)."""
  names = [n.strip() for n in (spec or "").split(",") if n.strip()]
  if len({n.lower() for n in names}) != len(names):
    raise MetadataError("--metadata_columns names a column twice")
  return names


def from_record(values: dict) -> dict[str, str]:
  """A record's attribute fields (feature key or arg -> bytes/str) -> {attribute: value}:
  sex, age, view (unknown: "") and each --metadata_columns column."""
  def text(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v or "")
  out = {NAMES[a]: text(values.get(a, "")) for a in (SEX, AGE, VIEW)}
  extra = text(values.get(COLUMNS, ""))
  if extra:
    try:
      out.update({str(k): str(v) for k, v in json.loads(extra).items()})
    except (ValueError, AttributeError):
      pass
  return out
