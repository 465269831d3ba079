"""Prediction web app and JSON API for a trained run (`python -m xraytpu.serve`).

  GET  /                 the page (xraytpu/static/: plain HTML + JS + CSS, no build step, no CDN)
  GET  /healthz          {"status": "ok", "model": ..., "requests": n, "images": n, "batches": n}
  GET  /v1/model         the model card (see `xraytpu.model_card`)
  POST /v1/predict[?gradcam=1][&window=auto|lung|...|CENTER,WIDTH]
                         body: multipart/form-data with one or more file parts
                         (curl -F file=@a.png -F file=@b.jpeg), or the raw bytes of one
                         image (curl --data-binary @a.png)
       200 -> {"model": "xray_cnn", "classes": ["NORMAL", "PNEUMONIA"],
               "positive_class": "PNEUMONIA", "threshold": 0.41, "threshold_policy": "youden",
               "threshold_source_split": "val", "disclaimer": "...",
               "predictions": [{"index": 0, "filename": "a.png", "label": "PNEUMONIA",
                                "label_index": 1, "probability": 0.93,
                                "probabilities": {"NORMAL": 0.07, "PNEUMONIA": 0.93},
                                "threshold": 0.41, "summary": "PNEUMONIA 0.93 (threshold 0.41)",
                                "gradcam_png_base64": "iVBOR..."   (only with ?gradcam=1)}, ...]}
       4xx -> {"error": "one line for a person", "status": 413, "file": "a.png", "index": 0}
              400 corrupt/truncated image, malformed multipart, bad query parameter, empty body
              411 no Content-Length      413 body over --max_upload_mb (checked before
              reading), more than --max_files files, an image over --max_pixels (checked from
              the file header, before decoding)      415 not an image (or DICOM without pydicom)
              404 unknown path    405 wrong method    408 body not sent in time
              503 the model did not answer within request_timeout_s (busy)

A request is all or nothing: every file is checked before any reaches the model.

This module is the HTTP layer only. What a request does is `xraytpu.serve_app`
(the same run, pixel contract and InferenceModule as `xraytpu.predict` and the
exported SavedModel); batching is `xraytpu.serve_batching`; the card is
`xraytpu.model_card`.

Threads: `ThreadingHTTPServer` reads and decodes each request in its own
thread; one worker thread owns the model and runs it on batches gathered from
concurrent requests (`Batcher`: up to `max_batch` images, waiting at most
`batch_timeout_ms` after the first). Nothing a request sends is ever used as a
file system path: the page's three files are read from the package at start-up.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import http
import http.server
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from importlib import resources
from typing import Any


from tfrecord_tools import storage
from xraytpu import __version__, predict_lib, rundir
from xraytpu.config import ServeError, ServeOptions  # noqa: F401 - defined with the other options
from xraytpu.serve_app import App, RequestError

MB = 1 << 20

# URL path -> (file in xraytpu/static, Content-Type). Read once at start-up.
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_FILE_FIELDS = ("file", "files", "image", "images")
_QUERY_PARAMS = ("gradcam", "window")
_MAX_FILENAME = 200







def load_static() -> dict[str, tuple[bytes, str]]:
  """URL path -> (bytes, Content-Type) for the page, from the installed package."""
  root = resources.files("xraytpu") / "static"
  out = {}
  for path, (name, ctype) in STATIC_FILES.items():
    try:
      out[path] = ((root / name).read_bytes(), ctype)
    except OSError as e:
      raise ServeError(f"the web page's {name} is missing from the installed package ({e}); "
                       "reinstall xraytpu (setup.cfg [options.package_data] lists static/*)") from e
  return out


# --------------------------------------------------------------------------
# HTTP.
# --------------------------------------------------------------------------


def _content_type(value: str) -> tuple[str, dict[str, str]]:
  msg = email.message.Message()
  msg["content-type"] = value or "application/octet-stream"
  params = {k.lower(): v for k, v in msg.get_params()[1:]} if msg.get_params() else {}
  return msg.get_content_type(), params


def parse_multipart(body: bytes, boundary: str, max_files: int) -> list[tuple[str, bytes]]:
  """multipart/form-data -> [(filename, bytes)] of its file parts, in order.

  Parts with a filename, or named file/files/image/images, are files; any
  other field is a 400 (the options are query parameters). Raises
  RequestError 400 (malformed / truncated: no closing boundary) or 413
  (more than max_files).
  """
  if not boundary or len(boundary) > 200:
    raise RequestError(400, "multipart/form-data needs a boundary parameter (1-200 characters)")
  delim = b"--" + boundary.encode("latin-1", "replace")
  if body.startswith(delim):
    pos = len(delim)
  else:
    i = body.find(b"\r\n" + delim)
    if i < 0:
      raise RequestError(400, "malformed multipart body: the boundary never appears")
    pos = i + 2 + len(delim)
  files: list[tuple[str, bytes]] = []
  parser = email.parser.BytesHeaderParser(policy=email.policy.HTTP)
  while True:
    if body.startswith(b"--", pos):  # the closing delimiter
      return files
    eol = body.find(b"\r\n", pos)
    end = body.find(b"\r\n" + delim, pos)
    if eol < 0 or end < 0:
      raise RequestError(400, "malformed multipart body: it ends without its closing boundary "
                              "(truncated upload?)")
    part = body[eol + 2:end]
    if part.startswith(b"\r\n"):
      head, data = b"", part[2:]
    else:
      head, sep, data = part.partition(b"\r\n\r\n")
      if not sep:
        raise RequestError(400, "malformed multipart body: a part has no blank line after its headers")
    headers = parser.parsebytes(head + b"\r\n\r\n")
    name = headers.get_param("name", header="content-disposition") or ""
    filename = headers.get_filename()
    if filename is None and str(name).lower() not in _FILE_FIELDS:
      raise RequestError(400, f"form field {str(name)[:50]!r} is not a file; send images as file parts "
                              "(curl -F file=@x.png) and options as query parameters (?gradcam=1)")
    if len(files) >= max_files:
      raise RequestError(413, f"more than {max_files} files in one request (--max_files)")
    filename = os.path.basename(str(filename or name).replace("\\", "/"))[:_MAX_FILENAME]
    files.append((filename, data))
    pos = end + 2 + len(delim)


def _parse_query(query: str) -> tuple[bool, str | None]:
  params = urllib.parse.parse_qs(query, keep_blank_values=True)
  unknown = sorted(set(params) - set(_QUERY_PARAMS))
  if unknown:
    raise RequestError(400, f"unknown query parameter {unknown[0]!r}; known: {', '.join(_QUERY_PARAMS)}")
  gradcam = (params.get("gradcam") or ["0"])[-1].lower()
  if gradcam not in ("", "0", "1", "true", "false", "yes", "no"):
    raise RequestError(400, f"gradcam={gradcam[:20]!r}: use 1 or 0")
  try:
    window = predict_lib.parse_window((params.get("window") or ["auto"])[-1])
  except predict_lib.PredictError as e:
    raise RequestError(400, str(e).replace("--window", "window")) from None
  return gradcam in ("", "1", "true", "yes"), window


class _Handler(http.server.BaseHTTPRequestHandler):
  """Routes requests to the server's App. Every response is JSON except the page."""

  server: "Server"
  protocol_version = "HTTP/1.1"  # keep-alive: every response carries Content-Length
  server_version = f"xraytpu-serve/{__version__}"
  sys_version = ""

  def setup(self):
    self.timeout = self.server.app.opts.request_timeout_s
    super().setup()

  # -- responses ------------------------------------------------------------

  def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None):
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    self.send_header("X-Content-Type-Options", "nosniff")
    self.send_header("Referrer-Policy", "no-referrer")
    for k, v in (extra or {}).items():
      self.send_header(k, v)
    if self.close_connection:
      self.send_header("Connection", "close")
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _json(self, status: int, obj: Any, extra: dict[str, str] | None = None):
    body = (json.dumps(obj, allow_nan=False) + "\n").encode()
    self._send(status, body, "application/json", extra)

  def _error(self, status: int, message: str, **extra: Any):
    self._json(status, {"error": message, "status": status, **extra})

  def send_error(self, code, message=None, explain=None):
    """http.server's own errors (bad request line, 501 method) as JSON too."""
    self.close_connection = True
    try:
      phrase = http.HTTPStatus(code).phrase
    except ValueError:
      phrase = "error"
    self._error(code, message or phrase)

  def log_message(self, format, *args):  # noqa: A002 - http.server's signature
    if self.server.app.opts.access_log:
      super().log_message(format, *args)

  # -- routes ---------------------------------------------------------------

  def do_GET(self):
    self._discard_unexpected_body()
    app = self.server.app
    path = urllib.parse.urlsplit(self.path).path
    if path in app.static:
      body, ctype = app.static[path]
      extra = {"Content-Security-Policy": PAGE_CSP, "X-Frame-Options": "DENY"}
      return self._send(200, body, ctype, extra if ctype.startswith("text/html") else None)
    if path == "/healthz":
      return self._json(200, app.health())
    if path == "/v1/model":
      return self._json(200, app.card)
    if path == "/v1/predict":
      return self._error(405, "use POST for /v1/predict", allow="POST")
    return self._error(404, f"no such page: {path[:100]}")

  do_HEAD = do_GET

  def _method_not_allowed(self):
    self.close_connection = True
    self._error(405, f"{self.command} is not supported here; use GET, or POST /v1/predict")

  do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _method_not_allowed

  def do_POST(self):
    app = self.server.app
    url = urllib.parse.urlsplit(self.path)
    if url.path != "/v1/predict":
      self.close_connection = True
      return self._error(404, f"no such endpoint: POST {url.path[:100]}; use POST /v1/predict")
    app.count_request()
    self._body_read = False
    acquired = app.inflight.acquire(timeout=app.opts.request_timeout_s)
    if not acquired:
      self.close_connection = True
      return self._error(503, "the server is busy; try again")
    try:
      try:
        gradcam, window = _parse_query(url.query)
        files = self._read_files()
        self._json(200, app.predict(files, gradcam=gradcam, window=window))
      except RequestError as e:
        if not self._body_read:  # the rest of the request is still on the socket
          self.close_connection = True
        self._error(e.status, e.message, **e.extra)
      except (ConnectionError, TimeoutError):
        self.close_connection = True
      except Exception as e:  # noqa: BLE001 - a bug, not the client's fault: 500, logged
        traceback.print_exc()
        self.close_connection = True
        self._error(500, f"internal error ({type(e).__name__}); see the server's log")
    finally:
      app.inflight.release()

  # -- request bodies -------------------------------------------------------

  def _content_length(self) -> int:
    if self.headers.get("Transfer-Encoding"):
      self.close_connection = True
      raise RequestError(411, "chunked uploads are not accepted; send a Content-Length")
    value = self.headers.get("Content-Length")
    if value is None:
      self.close_connection = True
      raise RequestError(411, "Content-Length is required")
    try:
      n = int(value)
      if n < 0:
        raise ValueError
    except ValueError:
      self.close_connection = True
      raise RequestError(400, f"bad Content-Length {value[:30]!r}") from None
    return n

  def _read_files(self) -> list[tuple[str, bytes]]:
    app = self.server.app
    n = self._content_length()
    limit = app.opts.max_upload_bytes
    if n > limit:  # refused before reading a byte of it
      self.close_connection = True
      self._drain_after_refusal(n)
      raise RequestError(413, f"upload of {n / MB:.1f} MiB is over the server's limit of "
                              f"{app.opts.max_upload_mb:g} MiB (--max_upload_mb)")
    try:
      body = self.rfile.read(n)
    except (TimeoutError, socket.timeout):
      self.close_connection = True
      raise RequestError(408, f"the body did not arrive within {app.opts.request_timeout_s:g} s") from None
    self._body_read = True
    if len(body) < n:
      self.close_connection = True
      raise RequestError(400, f"the body ended after {len(body)} of {n} bytes (truncated upload)")
    ctype, params = _content_type(self.headers.get("Content-Type", ""))
    if ctype == "multipart/form-data":
      files = parse_multipart(body, params.get("boundary", ""), app.opts.max_files)
      if not files:
        raise RequestError(400, "the form holds no files")
      return files
    if ctype.startswith("multipart/"):
      raise RequestError(415, f"{ctype} is not accepted: use multipart/form-data or raw image bytes")
    if not body:
      raise RequestError(400, "empty body: send an image (raw bytes or multipart/form-data)")
    return [("", body)]

  def _drain_after_refusal(self, n: int) -> None:
    """Reads (and drops) a little of a refused body so the client sees our 413, not a reset."""
    left, deadline = min(n, 8 * MB), time.monotonic() + 1.0
    try:
      self.connection.settimeout(0.2)
      while left > 0 and time.monotonic() < deadline:
        chunk = self.rfile.read1(min(left, 64 * 1024)) if hasattr(self.rfile, "read1") else b""
        if not chunk:
          break
        left -= len(chunk)
    except OSError:
      pass
    finally:
      self.connection.settimeout(self.timeout)

  def _discard_unexpected_body(self) -> None:
    if self.headers.get("Content-Length", "0") not in ("", "0") or self.headers.get("Transfer-Encoding"):
      self.close_connection = True


class Server(http.server.ThreadingHTTPServer):
  """ThreadingHTTPServer with the App attached; `url` is where it listens."""

  daemon_threads = True
  request_queue_size = 256  # listen backlog: many clients may connect at once

  def __init__(self, address: tuple[str, int], app: App):
    self.app = app
    host = address[0]
    if _is_ipv6(host):
      self.address_family = socket.AF_INET6
    super().__init__(address, _Handler)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/"

  def close(self) -> None:
    """Stops serving (when serve_forever runs in another thread), closes the socket and the worker."""
    self.shutdown()
    self.server_close()
    self.app.close()


def _is_ipv6(host: str) -> bool:
  try:
    return ipaddress.ip_address(host).version == 6
  except ValueError:
    return False


def is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def load_run(opts: ServeOptions) -> rundir.LoadedRun:
  opts.validate()
  if not storage.is_remote(opts.model_dir) and not os.path.isdir(opts.model_dir):  # before importing TF
    raise ServeError(f"--model_dir={opts.model_dir}: no such run directory")
  try:
    return rundir.load(opts.model_dir)
  except rundir.RunError as e:
    raise ServeError(str(e)) from e


def make_server(opts: ServeOptions, run: rundir.LoadedRun | None = None) -> Server:
  """Loads the run (unless given), warms the model up and binds host:port (not serving yet)."""
  opts.validate()
  run = run or load_run(opts)
  app = App(run, opts, static=load_static())
  app.warm_up()
  try:
    return Server((opts.host, opts.port), app)
  except OSError as e:
    app.close()
    raise ServeError(f"cannot listen on {opts.host}:{opts.port}: {e.strerror or e}") from None


def start_in_thread(server: Server) -> threading.Thread:
  """serve_forever in a daemon thread (tests, benchmarks); stop with server.close()."""
  t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                       name="xraytpu-serve", daemon=True)
  t.start()
  return t


def serve(opts: ServeOptions, out=sys.stdout) -> None:
  """The serve command: loads the run and serves until Ctrl-C / SIGTERM."""
  import signal
  server = make_server(opts)
  card = server.app.card
  ev = card["evaluation"]
  print(f"xraytpu.serve: {card['model']} from {opts.model_dir} ({', '.join(card['classes'])}; "
        f"threshold {card['threshold']} {card['threshold_policy']})", file=out)
  print(f"  evaluation: {ev['headline'] if ev and ev.get('headline') else 'none (run xraytpu.evaluate)'}",
        file=out)
  if card["threshold_note"]:
    print(f"  note: {card['threshold_note']}", file=out)
  if not is_loopback(opts.host):
    print(f"  WARNING: listening on {opts.host}: anyone who can reach this machine can use it "
          "(no authentication, no TLS)", file=out)
  print(f"Serving on {server.url} (Ctrl-C to stop)", file=out, flush=True)

  def _term(signum, frame):
    raise KeyboardInterrupt
  previous = signal.signal(signal.SIGTERM, _term)
  try:
    server.serve_forever(poll_interval=0.2)
  except KeyboardInterrupt:
    pass
  finally:
    signal.signal(signal.SIGTERM, previous)
    server.server_close()
    server.app.close()
    print("xraytpu.serve: stopped", file=out, flush=True)
