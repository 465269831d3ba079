"""Who may use `python -m xraytpu.serve`: bearer tokens (--auth_token_file).

The token file (UTF-8 text, read once at start-up):

  # lines starting with '#' and blank lines are skipped; spaces around a token are stripped
  Zq3s0wCk2m8y1v9X4pJ7rT5bN6hL0aDfGeHiKoUwYc
  second-client-token-7f3a9c2e1b8d4f60a5e7

One token per line, each 16-512 characters of A-Z a-z 0-9 - . _ ~ + / (and = at the
end): RFC 6750's b64token, what an `Authorization: Bearer <token>` header carries.
Any line may be given to one client and removed (restart the server) to lock it out.
Make one with `python -c "import secrets; print(secrets.token_urlsafe(32))" >> tokens.txt`
and keep the file private (`chmod 600`; serve warns when others can read it).

A request's token is compared with every token of the file with `hmac.compare_digest`
(constant time, no early exit), so the answer's timing does not tell how much of a guess
was right. Tokens never reach a log: `RedactTokens` replaces them (raw or
percent-encoded, e.g. a client that put one in a URL) in every line the server logs.
The HTTP side (which routes stay open, the 401 answer) is `xraytpu.serving.http_api`.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import stat
import urllib.parse

from xraytpu.config import ServeError

TOKEN_CHARS = "A-Z a-z 0-9 - . _ ~ + / (and = at the end)"
MIN_TOKEN, MAX_TOKEN = 16, 512
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# The loggers whose lines could carry a request's URL or headers (access log, errors).
LOGGERS = ("uvicorn.access", "uvicorn.error", "xraytpu.serve")


def read_tokens(path: str) -> list[str]:
  """The tokens of --auth_token_file. Raises ServeError (one line, never quoting a token)."""
  flag = f"--auth_token_file={path}"
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ServeError(f"{flag}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
  tokens = []
  for n, line in enumerate(lines, 1):
    token = line.strip()
    if not token or token.startswith("#"):
      continue
    if not (MIN_TOKEN <= len(token) <= MAX_TOKEN and _TOKEN_RE.fullmatch(token)):
      raise ServeError(f"{flag}, line {n}: not a token ({MIN_TOKEN}-{MAX_TOKEN} characters of "
                       f"{TOKEN_CHARS}; make one with python -c \"import secrets; "
                       "print(secrets.token_urlsafe(32))\")")
    tokens.append(token)
  if not tokens:
    raise ServeError(f"{flag}: holds no token (one per line; '#' starts a comment)")
  return tokens


def file_warning(path: str) -> str | None:
  """A line for the start-up output when users other than the owner can read the token file."""
  try:
    mode = os.stat(path).st_mode
  except OSError:
    return None
  if mode & (stat.S_IRWXG | stat.S_IRWXO):
    return f"{path} can be read by other users of this machine (chmod 600 {path})"
  return None


class Tokens:
  """The accepted tokens; `check` an Authorization header's value in constant time."""

  def __init__(self, tokens: list[str]):
    if not tokens:
      raise ValueError("no tokens")
    self._tokens = [t.encode("ascii") for t in tokens]
    self.count = len(tokens)

  def check(self, authorization: bytes | None) -> str:
    """"" when the header carries an accepted bearer token; else why not: "missing" (no
    Authorization header, or another scheme) or "invalid" (a bearer token not in the file)."""
    if not authorization:
      return "missing"
    scheme, _, credentials = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
      return "missing"
    given = credentials.strip()
    ok = False
    for token in self._tokens:   # every token, no early exit: the timing says nothing
      ok |= hmac.compare_digest(given, token)
    return "" if ok else "invalid"

  def redact(self, text: str) -> str:
    for token in self._tokens:
      t = token.decode("ascii")
      for form in {t, urllib.parse.quote(t, safe=""), urllib.parse.quote_plus(t, safe="")}:
        text = text.replace(form, "[token]")
    return text


class RedactTokens(logging.Filter):
  """Replaces any accepted token in a log record by [token] (the record's message is
  formatted first, so a token in its arguments is caught too)."""

  def __init__(self, tokens: Tokens):
    super().__init__()
    self.tokens = tokens

  def filter(self, record: logging.LogRecord) -> bool:
    try:
      message = record.getMessage()
    except Exception:  # noqa: BLE001 - a broken record is logging's to report, not ours
      return True
    clean = self.tokens.redact(message)
    if clean != message:
      record.msg, record.args = clean, ()
    if record.exc_info and not record.exc_text:
      record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
      record.exc_text = self.tokens.redact(record.exc_text)
    return True


def _log_targets() -> list:
  """The server's loggers, and the root logger's handlers (which see every propagated line)."""
  return [logging.getLogger(name) for name in LOGGERS] + list(logging.getLogger().handlers)


def install_log_filter(tokens: Tokens) -> RedactTokens:
  """Adds RedactTokens to the server's loggers and the root handlers; returns it (remove_log_filter)."""
  f = RedactTokens(tokens)
  for target in _log_targets():
    target.addFilter(f)
  return f


def remove_log_filter(f: RedactTokens) -> None:
  for target in _log_targets():
    target.removeFilter(f)
