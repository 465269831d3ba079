"""Patient identifiers never leave in clear: keyed pseudonyms, and the key the user holds.

A converted data set (records, dataset.json) goes to buckets and is shared; the
ids that group a patient's films (a DICOM PatientID, a label CSV's patient
column, the id --group_regex finds in a file name) are medical record numbers.
The converter therefore writes, in place of each id, its pseudonym:

  pt-<24 hex>   = "pt-" + HMAC-SHA256(key, "xraytpu-patient" NUL id)[:24 hex]   (96 bits)

Same patient and key -> the same pseudonym, so grouping, splitting by patient,
resumes and reruns work on pseudonyms exactly as they did on ids; without the
key nobody can test a guessed MRN against them (a plain hash could be
reversed by hashing every MRN). HMAC-SHA256 is the standard keyed hash
(RFC 2104, FIPS 198-1) and is in Python's standard library (`hmac`,
`hashlib`): no extra dependency, nothing to install on Beam workers, and the
hashing happens once, in the converter's main process.

The key, first found of:
  1. --patient_key_file=PATH (local or gs://): its contents (whitespace stripped)
  2. the environment variable XRAYTPU_PATIENT_KEY: the key itself
  3. DEFAULT: $XDG_CONFIG_HOME/xraytpu/patient.key (~/.config/xraytpu/patient.key),
     created on first use with 32 random bytes (hex) and mode 0600, in a 0700 folder.
A key is at least MIN_KEY_BYTES long. It is never written into an output: the
manifest records only its `key_id` (an HMAC of a constant string), which tells
whether two data sets were pseudonymised with the same key. Why a user-level
file rather than a random key per conversion (a rerun, a resume or another
split of the same patients would get other pseudonyms) or a key kept in the
output (whoever reads the data set could then undo the pseudonyms):
docs/privacy.md, which also says how to keep and share it.

File names: a stored path (the record's image/filename, the manifest's path
lists, the converter's log lines) has every occurrence of its patient's id
replaced by the pseudonym (`Names`); --hash_filenames stores
`h-<24 hex><ext>` (HMAC of the path) instead, for inputs whose names carry
other identifiers (names, dates, accession numbers, UIDs). `identifier_kinds`
is the heuristic `tfrecord_tools.inspect` warns with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
import secrets
import stat
from typing import Callable

from tfrecord_tools import errors, storage

ENV_KEY = "XRAYTPU_PATIENT_KEY"
KEY_FILE_NAME = "patient.key"
MIN_KEY_BYTES = 16
DIGEST_HEX = 24                      # 96 bits: collisions negligible for any real cohort
PATIENT_PREFIX = "pt-"
FILE_PREFIX = "h-"
PSEUDONYM_RE = re.compile(r"^pt-[0-9a-f]{24}$")
# A pseudonym or hashed name inside a path (inspect looks past these for identifiers).
_HASHED_TOKEN_RE = re.compile(r"(?:pt|h)-[0-9a-f]{24}")
NEW_KEY_HINT = ("python -c \"import secrets; print(secrets.token_hex(32))\" > KEYFILE && "
                "chmod 600 KEYFILE")


class PatientKeyError(errors.UserError):
  """No usable patient key (one line for the user)."""


@dataclasses.dataclass(frozen=True)
class Key:
  """The secret of the keyed hash, and where it came from (for the log; never the secret)."""
  secret: bytes = dataclasses.field(repr=False)
  source: str
  created: bool = False

  @property
  def key_id(self) -> str:
    """16 hex: tells keys apart without revealing them (an HMAC of a constant string)."""
    return hmac.new(self.secret, b"xraytpu-key-id", hashlib.sha256).hexdigest()[:16]

  def patient(self, raw: str) -> str:
    """The pseudonym of a patient id ("" stays "")."""
    raw = str(raw).strip()
    if not raw:
      return ""
    digest = hmac.new(self.secret, b"xraytpu-patient\0" + raw.encode("utf-8"), hashlib.sha256)
    return PATIENT_PREFIX + digest.hexdigest()[:DIGEST_HEX]

  def path(self, rel: str) -> str:
    """--hash_filenames: a path's keyed hash, its extension kept (h-<24 hex>.dcm)."""
    digest = hmac.new(self.secret, b"xraytpu-path\0" + rel.encode("utf-8"), hashlib.sha256)
    ext = os.path.splitext(rel.rsplit("/", 1)[-1])[1].lower()
    return FILE_PREFIX + digest.hexdigest()[:DIGEST_HEX] + (ext if re.fullmatch(r"\.\w{1,8}", ext) else "")


def default_key_file() -> str:
  """$XDG_CONFIG_HOME/xraytpu/patient.key, or ~/.config/xraytpu/patient.key."""
  base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
  return os.path.join(base, "xraytpu", KEY_FILE_NAME)


def _checked(secret: bytes, where: str) -> bytes:
  if len(secret) < MIN_KEY_BYTES:
    raise PatientKeyError(f"the patient key in {where} is {len(secret)} bytes: at least "
                    f"{MIN_KEY_BYTES} are needed (a short key can be guessed); make one with: "
                    + NEW_KEY_HINT)
  return secret


def _read_key_file(path: str, log: Callable[[str], None]) -> bytes:
  try:
    secret = storage.read_bytes(path).strip()
  except FileNotFoundError:
    raise PatientKeyError(f"--patient_key_file={path}: no such file; make a key with: "
                    + NEW_KEY_HINT.replace("KEYFILE", path)) from None
  except (OSError, storage.StorageError) as e:
    raise PatientKeyError(f"--patient_key_file={path}: cannot read it ({e})") from None
  if not storage.is_remote(path):
    try:
      mode = os.stat(path).st_mode
    except OSError:
      mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
      log(f"warning: the patient key {path} can be read by other users (mode "
          f"{stat.S_IMODE(mode):o}): chmod 600 {path}")
  return _checked(secret, path)


def _create_default(path: str) -> bool:
  """Writes a new random key at `path` (0600, folder 0700) unless one exists; True if written."""
  os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
  except FileExistsError:   # another process made it first: use theirs
    return False
  with os.fdopen(fd, "w") as f:
    f.write(secrets.token_hex(32) + "\n")
  return True


def load_key(key_file: str = "", log: Callable[[str], None] = lambda m: None) -> Key:
  """The patient key: --patient_key_file, else $XRAYTPU_PATIENT_KEY, else the user's default
  file (created on first use). Raises PatientKeyError for a missing named file or a short key."""
  if key_file:
    return Key(_read_key_file(key_file, log), f"--patient_key_file={key_file}")
  env = os.environ.get(ENV_KEY, "").strip()
  if env:
    return Key(_checked(env.encode("utf-8"), f"${ENV_KEY}"), f"${ENV_KEY}")
  path = default_key_file()
  created = False
  if not os.path.exists(path):
    try:
      created = _create_default(path)
    except OSError as e:
      raise PatientKeyError(f"no patient key: cannot create {path} ({e.strerror or e}); pass "
                      f"--patient_key_file or set {ENV_KEY}") from None
  return Key(_read_key_file(path, log), path, created)


def is_pseudonym(value: str) -> bool:
  return bool(PSEUDONYM_RE.match(value))


def _replace_token(text: str, raw: str, pseudonym: str) -> str:
  """Every occurrence of `raw` not inside a longer run of letters and digits."""
  return re.sub(r"(?<![A-Za-z0-9])" + re.escape(raw) + r"(?![A-Za-z0-9])",
                lambda _: pseudonym, text)


class Names:
  """Patient ids -> pseudonyms, and file paths -> the names an output may show.

  ids: relative path -> the raw patient id found for it ("" none, None: looked for and
  not found); regex: --group_regex (its match is replaced even inside a longer token);
  hash_all: --hash_filenames. The key is loaded on first need: a conversion without
  patient ids or hashed names needs none.
  """

  def __init__(self, ids: dict[str, str | None] | None = None, *, regex: re.Pattern | None = None,
               hash_all: bool = False, key_file: str = "",
               log: Callable[[str], None] = lambda m: None, key: Key | None = None):
    self.ids = dict(ids or {})
    self.regex, self.hash_all = regex, hash_all
    self._key_file, self._log, self._key = key_file, log, key
    self._cache: dict[str, str] = {}

  @property
  def needs_key(self) -> bool:
    return self.hash_all or any(self.ids.values())

  @property
  def key(self) -> Key:
    if self._key is None:
      self._key = load_key(self._key_file, self._log)
      if self._key.created:
        self._log(f"created a new patient key in {self._key.source} (readable by you only): keep "
                  "it and back it up; the same key gives the same pseudonyms and splits again "
                  "(docs/privacy.md)")
      self._log(f"patient ids are written as keyed pseudonyms (HMAC-SHA256; key from "
                f"{self._key.source}, key id {self._key.key_id})")
    return self._key

  def patient(self, raw: str | None) -> str:
    """The pseudonym written for a raw patient id ("" for none)."""
    if not raw:
      return ""
    if raw not in self._cache:
      self._cache[raw] = self.key.patient(raw)
    return self._cache[raw]

  def _raw_of(self, rel: str) -> str | None:
    raw = self.ids.get(rel)
    if raw is None and self.regex is not None:
      target = rel if "/" in self.regex.pattern else rel.rsplit("/", 1)[-1]
      m = self.regex.search(target)
      raw = (m.group(1) if m.groups() else m.group(0)) if m else None
    return raw

  def __call__(self, rel: str, raw: str | None = None) -> str:
    """The name of `rel` in records, the manifest and log lines (`raw`: its patient id
    when the caller knows it better, e.g. a label row's)."""
    if self.hash_all:
      return self.key.path(rel)
    raw = raw if raw else self._raw_of(rel)
    if not raw or not raw.strip():
      return rel
    raw = raw.strip()
    pseudonym = self.patient(raw)
    if self.regex is not None:   # the span the regex matched, even inside a longer token
      head, _, base = rel.rpartition("/")
      on_path = "/" in self.regex.pattern
      target = rel if on_path else base
      m = self.regex.search(target)
      if m and (m.group(1) if m.groups() else m.group(0)) == raw:
        g = 1 if m.groups() else 0
        target = target[:m.start(g)] + pseudonym + target[m.end(g):]
        rel = target if on_path else (f"{head}/{target}" if head else target)
    return _replace_token(rel, raw, pseudonym)

  def manifest_entry(self) -> dict:
    """dataset.json's "privacy": how identifiers were written (no secret in it)."""
    keyed = self.needs_key
    return {"patient_ids": "hmac-sha256" if any(self.ids.values()) else "none",
            "key_id": self.key.key_id if keyed else None,
            "filenames": "hashed" if self.hash_all else "patient-ids-replaced",
            "pseudonym_format": PATIENT_PREFIX + "<24 hex>"}


# --------------------------------------------------------------------------
# What an identifier in a file name looks like (tfrecord_tools.inspect's warnings).
# --------------------------------------------------------------------------

_KINDS = (
    ("a date", re.compile(r"(?<!\d)(?:19|20)\d\d[-_.]?(?:0[1-9]|1[0-2])[-_.]?(?:0[1-9]|[12]\d|3[01])(?!\d)")),
    ("a DICOM UID", re.compile(r"(?<![\d.])\d+(?:\.\d+){4,}")),
    ("a number of 6 or more digits (a record or accession number?)", re.compile(r"\d{6,}")),
    ("a person's name in DICOM form (Family^Given)", re.compile(r"[A-Za-z]\^[A-Za-z]")),
)


def identifier_kinds(name: str) -> list[str]:
  """The kinds of identifier `name` may carry (pseudonyms and hashed names ignored); [] none."""
  text = _HASHED_TOKEN_RE.sub("-", name)
  found = []
  for kind, regex in _KINDS:
    if regex.search(text):
      found.append(kind)
      text = regex.sub("-", text)   # a date's or a UID's digits are not a second finding
  return found
