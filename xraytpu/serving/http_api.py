"""Prediction web app and JSON API for a trained run (`python -m xraytpu.serve`):
Starlette on uvicorn.

  GET  /                 the page (xraytpu/serving/static/: plain HTML + JS + CSS, no build step, no CDN)
  GET  /healthz          {"status": "ok", "model": ..., "requests": n, "images": n, "batches": n}
  GET  /v1/model         the model card (see `xraytpu.run.model_card`)
  GET  /openapi.json     the OpenAPI 3 description of every route below
  POST /v1/predict[?gradcam=1][&dicom_window=auto|viewer|full|lung|...|CENTER,WIDTH]  (window= is its old name)
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
              404 unknown path    405 wrong method    408 body not sent within --body_timeout_s
              503 no request slot (--max_inflight) or no model answer within request_timeout_s
              422 the model's output for the image is not a finite number (NaN/inf: a
              diverged or collapsed run; never a 500)

TensorFlow Serving's REST API (the same requests and answers as TF Serving serving
`xraytpu.export`'s SavedModel, whose serving_default takes image_bytes): a client
switches between the two by changing only the host. <name> is --model_name (default:
the run's model name) or "default"; [/versions/N] is optional, N the served version
(the run's latest export, else 1; others 404 as in TF Serving). Errors are exactly
{"error": "..."} here, with TF Serving's status and message where TF Serving has one.

  GET  /v1/models/<name>[/versions/N]           {"model_version_status": [{"version": "1", "state": "AVAILABLE", ...}]}
  GET  /v1/models/<name>[/versions/N]/metadata  {"model_spec": ..., "metadata": {"signature_def": ...}}
                                     (the export's signature_def map, as saved_model_cli shows it)
  POST /v1/models/<name>[/versions/N]:classify, :regress   400 as TF Serving answers for
                                     a model without classify/regress signatures
  POST /v1/models/<name>[/versions/N]:predict  {"instances": [{"b64": "..."}, ...]}      (row format; also
                                     [{"image_bytes": {"b64": "..."}}]) -> {"predictions": [
                                     {"probabilities": [...], "label": "...", "label_index": 1}, ...]}
                                     {"inputs": {"image_bytes": [{"b64": "..."}]}} (columnar; also
                                     "inputs": [{"b64": ...}]) -> {"outputs": {"probabilities":
                                     [[...]], "label": [...], "label_index": [...]}}
                                     multi-label runs answer probabilities, positive and label.

Vertex AI custom containers: the port is AIP_HTTP_PORT when set, and AIP_HEALTH_ROUTE /
AIP_PREDICT_ROUTE become extra routes (health: GET, /healthz's answer; predict: POST, the
TF Serving `instances` body and answer).

Access (xraytpu.serving.auth): with --auth_token_file, `Web.asgi` answers 401 (with
WWW-Authenticate: Bearer) before any route for a request without an accepted
`Authorization: Bearer <token>`, except GET /healthz (and AIP_HEALTH_ROUTE) and the
page's own files, which hold no data: the page then asks for the token. TLS is
uvicorn's (--ssl_certfile, --ssl_keyfile). A non-loopback --host needs a token file or
--allow_unauthenticated (ServeOptions.validate).

Why Starlette and not FastAPI: every endpoint here must see the request before its body
(413 from Content-Length, 411, the body read under a deadline, a quiet disconnect), and
answers in one JSON error shape; FastAPI's value is pydantic models validating parsed
bodies, which these image uploads do not have, and it would add pydantic as a dependency.
Starlette gives the routing, 404/405, responses and a thread pool; the OpenAPI
document is kept by hand beside the routes (xraytpu.serving.openapi), and a test checks it lists
every route. uvicorn (h11) is the HTTP server; `_Protocol` adds a deadline for a
request's line and headers, JSON answers for malformed requests, and keeps a half-closed
connection open long enough to answer it.

Memory: a request's body is at most --max_upload_mb and at most --max_inflight
requests are in the server; decoding an image holds its width x height pixels of
`App.decode_budget` (--decode_budget, across all requests) while it decodes, so the
decoders never hold more than that many pixels at once (docs/serving.md states the bound).

This module is the HTTP layer only. What a request does is `xraytpu.serving.service`
(the same run, pixel contract and InferenceModule as `xraytpu.predict` and the
exported SavedModel); TF Serving's request and answer shapes are
`xraytpu.serving.tf_serving`; batching is `xraytpu.serving.batching`; tokens are
`xraytpu.serving.auth`; the OpenAPI document is `xraytpu.serving.openapi`; the card is
`xraytpu.run.model_card`. It is over 800 lines because the routes, their limits, the
access check and the uvicorn protocol (header deadline, JSON for malformed requests)
share one state and are read together. Nothing a request sends is ever used as a file system path:
the page's three files are read from the package at start-up.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from importlib import resources
from typing import Any

from tfrecord_tools import storage
from tfrecord_tools import __version__
from xraytpu.inference import model_call, predict_lib
from xraytpu.run import ensemble, rundir
from xraytpu.config import ServeError, ServeOptions  # noqa: F401 - defined with the other options
from xraytpu.config import is_loopback  # noqa: F401 - part of this module's API
from xraytpu.serving import auth, tf_serving
from xraytpu.serving.service import App, RequestError

MB = 1 << 20
log = logging.getLogger("xraytpu.serve")

# URL path -> (file in xraytpu/serving/static, Content-Type). Read once at start-up.
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_FILE_FIELDS = ("file", "files", "image", "images")
_QUERY_PARAMS = ("gradcam", "dicom_window", "window")   # window: dicom_window's old name
_MAX_FILENAME = 200
_SECURITY_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                     "Referrer-Policy": "no-referrer"}
# A refused body (413, 411) is read and dropped for at most this long / this much, so that
# the client, still sending, reads our answer instead of a connection reset.
_DRAIN_SECONDS, _DRAIN_BYTES = 1.0, 8 * MB


# Memory: decoding an image (pixels.load_file's decode, convert and resize in TensorFlow) took
# 8-12 bytes per pixel of it at peak (measured: 16-bit gray and RGBA PNGs 8-9, 8-bit RGB PNGs
# 12); DICOM (tfrecord_tools.dicom's rendering, then the same decode) 5-12.5 (peak RSS, VmHWM,
# of a fresh process, 9-16 Mpx files: grey 5.4-8.9 at `viewer` (12-bit, RLE MONOCHROME1),
# 9.4-10.7 at `full` (16-bit output), RGB/YBR_FULL colour 11-12.4; 36-44 grey and 102 colour
# before the rendering ran in blocks of rows, issue 23). 16 is the bound used, for every
# format: tests/test_serve.py's memory test and tests/test_dicom_viewer.py (DICOM, per pixel)
# check it. A multi-frame DICOM counts rows x columns x frames. A request's body is held about
# BODY_COPIES times (the received chunks, the joined body, the multipart parts).
DECODE_BYTES_PER_PIXEL = 16
BODY_COPIES = 3
MEMORY_SLACK = 64 * MB   # thread stacks, allocator arenas, JSON answers


def memory_bound(opts: ServeOptions, idle_bytes: int) -> int:
  """The most memory the server holds (docs/serving.md): its idle peak RSS after warm-up, plus
  --decode_budget pixels being decoded, plus --max_inflight bodies of --max_upload_mb."""
  return (idle_bytes + opts.decode_budget * DECODE_BYTES_PER_PIXEL
          + opts.max_inflight * opts.max_upload_bytes * BODY_COPIES + MEMORY_SLACK)


def load_static() -> dict[str, tuple[bytes, str]]:
  """URL path -> (bytes, Content-Type) for the page, from the installed package."""
  root = resources.files("xraytpu.serving") / "static"
  out = {}
  for path, (name, ctype) in STATIC_FILES.items():
    try:
      out[path] = ((root / name).read_bytes(), ctype)
    except OSError as e:
      raise ServeError(f"the web page's {name} is missing from the installed package ({e}); "
                       "reinstall xraytpu (setup.cfg [options.package_data] lists static/*)") from e
  return out


# --------------------------------------------------------------------------
# Request bodies: multipart, query, TF Serving JSON.
# --------------------------------------------------------------------------


def parse_multipart(body: bytes, content_type: str, max_files: int) -> list[tuple[str, bytes]]:
  """multipart/form-data -> [(filename, bytes)] of its file parts, in order (python-multipart).

  Parts with a filename, or named file/files/image/images, are files; any
  other field is a 400 (the options are query parameters). Raises
  RequestError 400 (malformed / truncated: no closing boundary) or 413
  (more than max_files).
  """
  from python_multipart.exceptions import MultipartParseError
  from python_multipart.multipart import MultipartParser, parse_options_header
  _, params = parse_options_header(content_type)
  boundary = params.get(b"boundary", b"")
  if not boundary or len(boundary) > 200:
    raise RequestError(400, "multipart/form-data needs a boundary parameter (1-200 characters)")
  files: list[tuple[str, bytes]] = []
  part: dict[str, Any] = {}
  ended = []

  def on_part_begin():
    part.clear()
    part.update(headers={}, data=[], field=b"")

  def on_header_field(data, start, end):
    part["field"] += data[start:end]

  def on_header_value(data, start, end):
    key = part["field"].lower()
    part["headers"][key] = part["headers"].get(key, b"") + data[start:end]

  def on_header_end():
    part["field"] = b""

  def on_headers_finished():
    _, disp = parse_options_header(part["headers"].get(b"content-disposition", b""))
    name = disp.get(b"name", b"").decode("utf-8", "replace")
    filename = disp.get(b"filename")
    if filename is None and name.lower() not in _FILE_FIELDS:
      raise RequestError(400, f"form field {name[:50]!r} is not a file; send images as file parts "
                              "(curl -F file=@x.png) and options as query parameters (?gradcam=1)")
    if len(files) >= max_files:
      raise RequestError(413, f"more than {max_files} files in one request (--max_files)")
    # A file name's bytes that are not UTF-8: escaped (storage.escape_name), as every output writes them.
    name = filename.decode("utf-8", "surrogateescape") if filename is not None else name
    part["name"] = storage.escape_name(os.path.basename(name.replace("\\", "/"))[:_MAX_FILENAME])

  def on_part_data(data, start, end):
    part["data"].append(data[start:end])

  def on_part_end():
    files.append((part["name"], b"".join(part["data"])))

  parser = MultipartParser(boundary, callbacks={
      "on_part_begin": on_part_begin, "on_header_field": on_header_field,
      "on_header_value": on_header_value, "on_header_end": on_header_end,
      "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
      "on_part_end": on_part_end, "on_end": lambda: ended.append(True)})
  try:
    parser.write(body)
    parser.finalize()
  except MultipartParseError as e:
    raise RequestError(400, f"malformed multipart body: {e}") from None
  if not ended:
    raise RequestError(400, "malformed multipart body: it ends without its closing boundary "
                            "(truncated upload?)")
  return files


def _parse_query(query: str) -> tuple[bool, str | None]:
  params = urllib.parse.parse_qs(query, keep_blank_values=True)
  unknown = sorted(set(params) - set(_QUERY_PARAMS))
  if unknown:
    raise RequestError(400, f"unknown query parameter {unknown[0]!r}; known: {', '.join(_QUERY_PARAMS)}")
  gradcam = (params.get("gradcam") or ["0"])[-1].lower()
  if gradcam not in ("", "0", "1", "true", "false", "yes", "no"):
    raise RequestError(400, f"gradcam={gradcam[:20]!r}: use 1 or 0")
  try:
    window = predict_lib.parse_window((params.get("dicom_window") or params.get("window") or ["auto"])[-1])
  except predict_lib.PredictError as e:
    raise RequestError(400, str(e).replace("--dicom_window", "dicom_window")) from None
  return gradcam in ("", "1", "true", "yes"), window


# --------------------------------------------------------------------------
# The ASGI application.
# --------------------------------------------------------------------------


def _json_response(status: int, obj: Any, headers: dict[str, str] | None = None):
  from starlette.responses import Response
  body = (json.dumps(obj, allow_nan=False) + "\n").encode()
  return Response(body, status, headers={**_SECURITY_HEADERS, **(headers or {})},
                  media_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any):
  return _json_response(status, {"error": message, "status": status, **extra}, headers)


def _tf_error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any):
  """TF Serving's error body: exactly {"error": "..."} (the status is the HTTP status)."""
  return _json_response(status, {"error": message}, headers)


class _EarlyAnswer(Exception):
  """The body could not be read; `response` is the answer."""

  def __init__(self, response):
    super().__init__()
    self.response = response


class Web:
  """The Starlette application around an App: routes, body reading, TF Serving, Vertex AI."""

  def __init__(self, app: App, *, model_name: str, extra_routes: dict[str, str] | None = None,
               tokens: auth.Tokens | None = None, version: int = 1):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route
    import anyio
    self.app, self.opts = app, app.opts
    self.model_names = {model_name, "default"}
    self.model_name = model_name
    self.version = int(version)   # TF Serving's model version (tf_serving.served_version)
    self.extra_routes = dict(extra_routes or {})   # Vertex AI: {"health": route, "predict": route}
    self.tokens = tokens
    self.threads = anyio.CapacityLimiter(max(8, self.opts.max_inflight))
    self._slots: asyncio.Semaphore | None = None
    self._signature_defs: dict | None = None
    self._signature_lock = threading.Lock()
    routes = [Route(path, self._static, methods=["GET"]) for path in app.static]
    routes += [
        Route("/healthz", self._health, methods=["GET"]),
        Route("/v1/model", self._card, methods=["GET"]),
        Route("/v1/model_card.md", self._card_md, methods=["GET"]),
        Route("/openapi.json", self._openapi, methods=["GET"]),
        Route("/v1/predict", self._predict, methods=["POST"]),
    ]
    for prefix in ("/v1/models/{name}", "/v1/models/{name}/versions/{version:int}"):
      routes += [Route(prefix + ":predict", self._tf_predict, methods=["POST"]),
                 Route(prefix + ":classify", self._tf_classify, methods=["POST"]),
                 Route(prefix + ":regress", self._tf_classify, methods=["POST"]),
                 Route(prefix, self._tf_status, methods=["GET"]),
                 Route(prefix + "/metadata", self._tf_metadata, methods=["GET"])]
    if self.extra_routes.get("health"):
      routes.insert(0, Route(self.extra_routes["health"], self._health, methods=["GET"]))
    if self.extra_routes.get("predict"):
      routes.insert(0, Route(self.extra_routes["predict"], self._vertex_predict, methods=["POST"]))
    self.routes = routes
    # Anything else under /v1/models, any method: TF Serving's 400 "Malformed request" (last:
    # a route above that matches the path but not the method loses to this one).
    self.fallback = Route("/v1/models{rest:path}", self._tf_malformed,
                          methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    self.starlette = Starlette(routes=[*routes, self.fallback],
                               exception_handlers={HTTPException: self._http_error,
                                                   Exception: self._internal_error})
    # Open without a token: the health check and the page's files (no data; the page asks for one).
    self.open_paths = {"/healthz", *app.static, *([self.extra_routes["health"]]
                                                  if self.extra_routes.get("health") else [])}
    self.asgi = self._guarded if tokens is not None else self.starlette

  # -- access -------------------------------------------------------------------

  async def _guarded(self, scope, receive, send):
    """The ASGI application with --auth_token_file: 401 before any route (but the open ones)
    for a request without an accepted bearer token."""
    if scope["type"] == "http" and scope["path"] not in self.open_paths:
      header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
      why = self.tokens.check(header)
      if why:
        await self._refuse(scope, receive, send, why)
        return
    await self.starlette(scope, receive, send)

  async def _refuse(self, scope, receive, send, why: str) -> None:
    from starlette.requests import Request
    request = Request(scope, receive)
    challenge = 'Bearer realm="xraytpu"'
    if why == "invalid":
      challenge += ', error="invalid_token", error_description="the token was refused"'
      message = "the access token was refused: it is not one of the server's (--auth_token_file)"
    else:
      message = ("this server needs an access token: send the header 'Authorization: Bearer "
                 "<token>' (a token of the server's --auth_token_file)")
    headers = {"WWW-Authenticate": challenge}
    if request.headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in request.headers:
      headers["Connection"] = "close"   # the body stays unread: this connection ends here
      try:
        n = int(request.headers.get("content-length", _DRAIN_BYTES))
      except ValueError:
        n = _DRAIN_BYTES
      await self._drain(request, n)
    error = _tf_error if self._is_tf_path(scope["path"]) else _error
    await error(401, message, headers)(scope, receive, send)

  def _is_tf_path(self, path: str) -> bool:
    """Whether `path` is TF Serving's (or Vertex AI's predict route, TF Serving's body): its
    errors are exactly {"error": "..."}."""
    return path.startswith("/v1/models") or path == self.extra_routes.get("predict")

  # -- errors ---------------------------------------------------------------

  async def _http_error(self, request, exc):
    method, path = request.method, request.url.path[:100]
    # A body we did not read is still on the socket: that connection ends with this answer.
    unread = request.headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in request.headers
    headers = {"Connection": "close"} if unread else {}
    error = _tf_error if self._is_tf_path(request.url.path) else _error
    if exc.status_code == 405:
      allowed = (exc.headers or {}).get("Allow", "")
      if allowed:
        headers["Allow"] = allowed
      return error(405, f"{method} is not supported for {path}; use {allowed or 'another method'}", headers)
    if exc.status_code == 404:
      return error(404, f"no such endpoint: {method} {path}", headers)
    return error(exc.status_code, str(exc.detail), headers)

  async def _internal_error(self, request, exc):
    log.error("internal error on %s %s", request.method, request.url.path[:100], exc_info=exc)
    error = _tf_error if self._is_tf_path(request.url.path) else _error
    return error(500, f"internal error ({type(exc).__name__}); see the server's log", {"Connection": "close"})

  # -- simple routes ----------------------------------------------------------

  async def _static(self, request):
    from starlette.responses import Response
    body, ctype = self.app.static[request.url.path]
    headers = dict(_SECURITY_HEADERS)
    if ctype.startswith("text/html"):
      headers.update({"Content-Security-Policy": PAGE_CSP, "X-Frame-Options": "DENY"})
    return Response(body, 200, headers=headers, media_type=ctype)

  async def _health(self, request):
    return _json_response(200, self.app.health())

  async def _card(self, request):
    return _json_response(200, self.app.card)

  async def _card_md(self, request):
    """MODEL_CARD.md as text (the same text evaluate writes into the run)."""
    from starlette.responses import Response
    return Response(self.app.card.get("model_card_md") or "", media_type="text/markdown; charset=utf-8")

  async def _openapi(self, request):
    from xraytpu.serving import openapi
    return _json_response(200, openapi.openapi(self))

  # -- TensorFlow Serving ---------------------------------------------------------

  def _model_spec(self, request) -> tuple[str, int | None]:
    """(name, version or None) of a TF Serving path; RequestError 400 where TF Serving's own
    routes would not match (a ':' in the name) or the version is not an int64."""
    name, version = request.path_params["name"], request.path_params.get("version")
    if ":" in name:
      raise RequestError(400, tf_serving.malformed(request.method, request.url.path))
    tf_serving.check_version(version)
    return name, version

  def _servable(self, request) -> tuple[str, int | None]:
    """_model_spec, and TF Serving's 404 when that model and version are not the one served."""
    name, version = self._model_spec(request)
    if name not in self.model_names or version not in (None, self.version):
      raise RequestError(404, tf_serving.servable_not_found(name, version))
    return name, version

  async def _tf_status(self, request):
    try:
      name, version = self._model_spec(request)
      if name not in self.model_names or version not in (None, self.version):
        raise RequestError(404, tf_serving.not_found(name, version))
    except RequestError as e:
      return _tf_error(e.status, e.message)
    return _json_response(200, tf_serving.status(self.version))

  async def _tf_metadata(self, request):
    try:
      name, _ = self._servable(request)
    except RequestError as e:
      return _tf_error(e.status, e.message)
    return _json_response(200, tf_serving.metadata(await self.signature_defs(), name, self.version))

  async def _tf_classify(self, request):
    """:classify and :regress: TF Serving's answer for this export's predict signatures."""
    method = request.url.path.rsplit(":", 1)[-1]

    async def handle(body: bytes) -> dict[str, Any]:
      signature = tf_serving.parse_classify_request(body, method)
      raise RequestError(400, tf_serving.unsupported(method, await self.signature_defs(), signature))
    return await self._with_body(request, handle, check_first=lambda: self._servable(request), tf=True)

  async def _tf_malformed(self, request):
    unread = request.headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in request.headers
    headers = {"Connection": "close"} if unread else {}
    if request.url.path == "/v1/models" and request.method == "GET":
      return _tf_error(400, "Missing model name in request.", headers)
    return _tf_error(400, tf_serving.malformed(request.method, request.url.path[:200]), headers)

  async def signature_defs(self) -> dict:
    """The export's {name: SignatureDef} (export_lib.signature_defs), built on first use."""
    if self._signature_defs is None:
      import anyio.to_thread

      def build():
        with self._signature_lock:
          if self._signature_defs is None:
            from xraytpu.inference import export_lib
            self._signature_defs = export_lib.signature_defs(self.app.module)
        return self._signature_defs
      return await anyio.to_thread.run_sync(build, limiter=self.threads)
    return self._signature_defs

  # -- predictions --------------------------------------------------------------

  async def _predict(self, request):
    async def handle(body: bytes) -> dict[str, Any]:
      gradcam, window = _parse_query(request.url.query)
      files = self._files(request, body)
      return await self._run(files, gradcam=gradcam, window=window)
    return await self._with_body(request, handle, check_first=lambda: _parse_query(request.url.query))

  async def _tf_predict(self, request):
    return await self._with_body(request, self._tf_handle, check_first=lambda: self._servable(request),
                                 tf=True)

  async def _vertex_predict(self, request):
    return await self._with_body(request, self._tf_handle, tf=True)

  async def _tf_handle(self, body: bytes) -> dict[str, Any]:
    fmt, files = tf_serving.parse_request(body, self.opts.max_files)
    return tf_serving.answer(fmt, await self._run(files))

  async def _run(self, files, **kw) -> dict[str, Any]:
    import anyio.to_thread
    return await anyio.to_thread.run_sync(lambda: self.app.predict(files, **kw), limiter=self.threads)

  def _files(self, request, body: bytes) -> list[tuple[str, bytes]]:
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
      files = parse_multipart(body, ctype, self.opts.max_files)
      if not files:
        raise RequestError(400, "the form holds no files")
      return files
    if media.startswith("multipart/"):
      raise RequestError(415, f"{media} is not accepted: use multipart/form-data or raw image bytes")
    if not body:
      raise RequestError(400, "empty body: send an image (raw bytes or multipart/form-data)")
    return [("", body)]

  async def _with_body(self, request, handle, check_first=None, tf: bool = False):
    """Takes a request slot, reads the body under its limits, answers handle(body)'s JSON.

    Every check that needs no body (the query, the model name, Content-Length) is made
    first, so a refused request is answered without reading its body. tf: errors in TF
    Serving's shape, exactly {"error": "..."}."""
    error = _tf_error if tf else _error
    self.app.count_request()
    if self._slots is None:
      self._slots = asyncio.Semaphore(self.opts.max_inflight)
    try:
      await asyncio.wait_for(self._slots.acquire(), self.opts.request_timeout_s)
    except asyncio.TimeoutError:
      return error(503, "the server is busy; try again", {"Connection": "close"})
    body_read = False
    try:
      try:
        if check_first:
          check_first()
        n = self._content_length(request)
        if n > self.opts.max_upload_bytes:
          await self._drain(request, n)
          raise RequestError(413, f"upload of {n / MB:.1f} MiB is over the server's limit of "
                                  f"{self.opts.max_upload_mb:g} MiB (--max_upload_mb)")
        body = await self._read_body(request, n, error)
        body_read = True
        return _json_response(200, await handle(body))
      except RequestError as e:
        # The rest of an unread request is still on the socket: this connection ends here.
        return error(e.status, e.message, None if body_read else {"Connection": "close"}, **e.extra)
      except _EarlyAnswer as e:
        return e.response
    finally:
      self._slots.release()

  def _content_length(self, request) -> int:
    if request.headers.get("transfer-encoding"):
      raise RequestError(411, "chunked uploads are not accepted; send a Content-Length")
    value = request.headers.get("content-length")
    if value is None:
      raise RequestError(411, "Content-Length is required")
    try:
      n = int(value)
      if n < 0:
        raise ValueError
    except ValueError:
      raise RequestError(400, f"bad Content-Length {value[:30]!r}") from None
    return n

  async def _read_body(self, request, n: int, error=_error) -> bytes:
    """The whole body within --body_timeout_s: 408 when late, 400 when it ends short,
    nothing (one log line) when the client disconnects."""
    receive = request.receive
    chunks, got = [], 0
    deadline = time.monotonic() + self.opts.body_timeout_s
    where = f"{request.method} {request.url.path[:100]} from {_client(request)}"
    while True:
      left = deadline - time.monotonic()
      try:
        if left <= 0:
          raise asyncio.TimeoutError
        message = await asyncio.wait_for(receive(), left)
      except asyncio.TimeoutError:
        log.warning("%s: the body did not arrive within %g s (%d of %d bytes); answered 408",
                    where, self.opts.body_timeout_s, got, n)
        raise _EarlyAnswer(error(408, f"the body did not arrive within {self.opts.body_timeout_s:g} s "
                                     f"({got} of {n} bytes; --body_timeout_s)", {"Connection": "close"}))
      if message["type"] == "http.disconnect":
        log.warning("%s: the client disconnected after %d of %d bytes", where, got, n)
        # Nobody reads this answer: uvicorn drops what is sent on a closed connection.
        raise _EarlyAnswer(error(400, "the client disconnected", {"Connection": "close"}))
      chunk = message.get("body", b"")
      got += len(chunk)
      if got > n:  # h11 enforces Content-Length; kept as a guard
        raise RequestError(400, "the body is longer than its Content-Length")
      chunks.append(chunk)
      if not message.get("more_body", False):
        break
    if got < n:
      log.warning("%s: the body ended after %d of %d bytes", where, got, n)
      raise RequestError(400, f"the body ended after {got} of {n} bytes (truncated upload)")
    return b"".join(chunks)

  async def _drain(self, request, n: int) -> None:
    """Reads (and drops) a little of a refused body so the client sees our answer, not a reset."""
    left, deadline = min(n, _DRAIN_BYTES), time.monotonic() + _DRAIN_SECONDS
    while left > 0:
      wait = min(0.2, deadline - time.monotonic())
      if wait <= 0:
        return
      try:
        message = await asyncio.wait_for(request.receive(), wait)
      except asyncio.TimeoutError:
        return
      if message["type"] != "http.request" or not message.get("more_body", False):
        return
      left -= len(message.get("body", b""))


def _client(request) -> str:
  c = request.client
  return f"{c.host}:{c.port}" if c else "?"


# --------------------------------------------------------------------------
# uvicorn: the protocol (header deadline, JSON for malformed requests) and the server.
# --------------------------------------------------------------------------


def _protocol_class(header_timeout_s: float):
  """uvicorn's h11 protocol plus: a deadline for each request's line and headers (a
  connection that trickles them is answered 408 and closed), JSON 400s for requests h11
  refuses, and a half-closed connection (the client's FIN) kept open to answer it."""
  import h11
  from uvicorn.protocols.http.h11_impl import H11Protocol

  class _Protocol(H11Protocol):
    _header_timer = None
    _bad_request = ""

    def connection_made(self, transport):
      super().connection_made(transport)
      next_event = self.conn.next_event

      def remembering_next_event():   # uvicorn drops h11's reason; keep it for the 400
        try:
          return next_event()
        except h11.RemoteProtocolError as e:
          self._bad_request = str(e)
          raise
      self.conn.next_event = remembering_next_event
      self._arm_header_timer()

    def _arm_header_timer(self):
      if self._header_timer is None:
        self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self):
      if self._header_timer is not None:
        self._header_timer.cancel()
        self._header_timer = None

    def _header_timeout(self):
      self._header_timer = None
      if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
        return
      log.warning("%s: no complete request line and headers within %g s; connection closed",
                  _peer(self.client), header_timeout_s)
      self._answer_and_close(408, "Request Timeout",
                             f"the request headers did not arrive within {header_timeout_s:g} s")

    def _answer_and_close(self, status: int, phrase: str, message: str):
      body = json.dumps({"error": message, "status": status}).encode() + b"\n"
      self.transport.write(f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n"
                           f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
      self.transport.close()

    def data_received(self, data):
      idle = self.cycle is None or self.cycle.response_complete
      before = self.cycle
      if idle:
        self._arm_header_timer()
      super().data_received(data)
      if self.cycle is not before:   # a request's headers are complete
        self._disarm_header_timer()

    def on_response_complete(self):
      super().on_response_complete()
      self._disarm_header_timer()   # the idle connection is uvicorn's keep-alive timeout's

    def connection_lost(self, exc):
      self._disarm_header_timer()
      super().connection_lost(exc)

    def eof_received(self):
      # The client has sent all it will: a body still expected ends short (the app answers 400);
      # the transport stays open so that answer can be written.
      if self.cycle is not None and not self.cycle.response_complete and self.cycle.more_body:
        self.cycle.more_body = False
        self.cycle.message_event.set()
        return True
      return None

    def send_400_response(self, msg):
      self._answer_and_close(400, "Bad Request", f"bad request: {self._bad_request or msg}")

  return _Protocol


def _peer(client) -> str:
  return f"{client[0]}:{client[1]}" if client else "?"


class Server:
  """The bound socket, the App, its Starlette application and uvicorn; `url` is where it listens."""

  def __init__(self, sock: socket.socket, app: App, web: Web):
    import uvicorn
    self.socket, self.app, self.web = sock, app, web
    self.server_address = sock.getsockname()
    opts = app.opts
    self.tls = bool(opts.ssl_certfile)
    config = uvicorn.Config(web.asgi, http=_protocol_class(opts.header_timeout_s), lifespan="off",
                            interface="asgi3",
                            log_config=None, access_log=opts.access_log, server_header=False,
                            date_header=True, timeout_keep_alive=5, backlog=256,
                            headers=[("server", f"xraytpu-serve/{__version__}")],
                            h11_max_incomplete_event_size=64 * 1024, timeout_graceful_shutdown=5,
                            ssl_certfile=opts.ssl_certfile or None, ssl_keyfile=opts.ssl_keyfile or None)
    self.uvicorn = uvicorn.Server(config)
    self._thread: threading.Thread | None = None
    # Tokens never reach a log line (a client may put one in a URL): removed again by close().
    self._log_filter = auth.install_log_filter(web.tokens) if web.tokens is not None else None

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if self.tls else 'http'}://{host}:{port}/"

  def serve_forever(self) -> None:
    """Serves in this thread until close() (from another thread)."""
    asyncio.run(self.uvicorn.serve(sockets=[self.socket]))

  def close(self) -> None:
    """Stops serving, closes the socket and the model's worker."""
    self.uvicorn.should_exit = True
    if self._thread is not None:
      self._thread.join(timeout=30)
    self.socket.close()
    self.app.close()
    if self._log_filter is not None:
      auth.remove_log_filter(self._log_filter)
      self._log_filter = None


def _is_ipv6(host: str) -> bool:
  try:
    return ipaddress.ip_address(host).version == 6
  except ValueError:
    return False


def vertex_settings(opts: ServeOptions, environ=os.environ) -> tuple[int, dict[str, str]]:
  """Vertex AI custom-container conventions: (port, {"health": route, "predict": route}).

  AIP_HTTP_PORT replaces --port; AIP_HEALTH_ROUTE and AIP_PREDICT_ROUTE add routes."""
  port = opts.port
  if environ.get("AIP_HTTP_PORT"):
    try:
      port = int(environ["AIP_HTTP_PORT"])
      if not 0 <= port <= 65535:
        raise ValueError
    except ValueError:
      raise ServeError(f"AIP_HTTP_PORT={environ['AIP_HTTP_PORT']!r}: not a port number") from None
  routes = {}
  for key, env in (("health", "AIP_HEALTH_ROUTE"), ("predict", "AIP_PREDICT_ROUTE")):
    route = environ.get(env, "")
    if route:
      if not route.startswith("/") or "{" in route:
        raise ServeError(f"{env}={route!r}: must be a path starting with /")
      routes[key] = route
  return port, routes


def load_run(opts: ServeOptions) -> rundir.LoadedRun:
  opts.validate()
  for d in ensemble.split_dirs(opts.model_dir):   # before importing TF
    if not storage.is_remote(d) and not os.path.isdir(d):
      raise ServeError(f"--model_dir={d}: no such run directory")
  try:
    return ensemble.load_model_dir(ensemble.resolve(opts.model_dir, opts.ensemble_dir))
  except rundir.RunError as e:
    raise ServeError(str(e)) from e


def check_tls(opts: ServeOptions) -> None:
  """Loads --ssl_certfile/--ssl_keyfile once before serving, so a bad pair is one line at
  start-up (uvicorn loads them again). An encrypted key is refused (no prompt)."""
  if not opts.ssl_certfile:
    return
  try:
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
        opts.ssl_certfile, opts.ssl_keyfile or None, password=lambda: b"")
  except (OSError, ssl.SSLError) as e:
    why = getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e)
    raise ServeError(f"--ssl_certfile={opts.ssl_certfile} --ssl_keyfile={opts.ssl_keyfile or '(none)'}: "
                     f"cannot load the certificate and its private key ({why}; an unencrypted PEM key "
                     "is needed)") from None


def make_server(opts: ServeOptions, run: rundir.LoadedRun | None = None, environ=os.environ) -> Server:
  """Loads the run (unless given), warms the model up and binds host:port (not serving yet)."""
  opts.validate()
  tokens = auth.Tokens(auth.read_tokens(opts.auth_token_file)) if opts.auth_token_file else None
  check_tls(opts)
  port, extra_routes = vertex_settings(opts, environ)
  run = run or load_run(opts)
  app = App(run, opts, static=load_static())
  try:
    app.warm_up()
  except model_call.NonFiniteOutput as e:
    app.close()
    raise ServeError(f"not serving the run in {run.model_dir}: {e}") from None
  web = Web(app, model_name=opts.model_name or app.card["model"], extra_routes=extra_routes,
            tokens=tokens, version=tf_serving.served_version(run.model_dir))
  try:
    sock = socket.socket(socket.AF_INET6 if _is_ipv6(opts.host) else socket.AF_INET, socket.SOCK_STREAM)
    try:
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      sock.bind((opts.host, port))
      sock.listen(256)
    except OSError:
      sock.close()
      raise
  except OSError as e:
    app.close()
    raise ServeError(f"cannot listen on {opts.host}:{port}: {e.strerror or e}") from None
  return Server(sock, app, web)


def start_in_thread(server: Server) -> threading.Thread:
  """Serves in a daemon thread (tests, benchmarks, `serve`); stop with server.close()."""
  t = threading.Thread(target=server.serve_forever, name="xraytpu-serve", daemon=True)
  server._thread = t
  t.start()
  deadline = time.monotonic() + 30
  while not server.uvicorn.started and t.is_alive() and time.monotonic() < deadline:
    time.sleep(0.01)
  return t


def serve(opts: ServeOptions, out=None) -> None:
  """The serve command: loads the run and serves until Ctrl-C / SIGTERM."""
  out = sys.stdout if out is None else out
  import signal
  logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
  server = make_server(opts)
  card = server.app.card
  ev = card["evaluation"]
  if card.get("thresholds"):   # multi-label: a threshold per finding
    rule = "thresholds " + ", ".join(f"{c} {t:.3f}" for c, t in card["thresholds"].items())
  else:
    rule = f"threshold {card['threshold']}"
  print(f"xraytpu.serve: {card['model']} from {opts.model_dir} ({', '.join(card['classes'])}; "
        f"{rule} {card['threshold_policy']})", file=out)
  print(f"  evaluation: {ev['headline'] if ev and ev.get('headline') else 'none (run xraytpu.evaluate)'}",
        file=out)
  if card["threshold_note"]:
    print(f"  note: {card['threshold_note']}", file=out)
  if card.get("training_warning"):
    print(f"  WARNING: {card['training_warning']}", file=out)
  web = server.web
  if web.tokens is not None:
    print(f"  access: a bearer token of {opts.auth_token_file} ({web.tokens.count} token"
          f"{'s' if web.tokens.count > 1 else ''}) on every request but /healthz and the page's "
          "files", file=out)
    warning = auth.file_warning(opts.auth_token_file)
    if warning:
      print(f"  WARNING: {warning}", file=out)
  if server.tls:
    print(f"  TLS: {opts.ssl_certfile}", file=out)
  if not is_loopback(opts.host):
    if web.tokens is None:
      print(f"  WARNING: listening on {opts.host} with --allow_unauthenticated: anyone who can reach "
            "this port can use it", file=out)
    elif not server.tls:
      print(f"  WARNING: listening on {opts.host} without TLS: tokens and images cross the network "
            "in clear (--ssl_certfile, --ssl_keyfile, or TLS at a proxy in front)", file=out)
  print(f"  TF Serving REST: {server.url}v1/models/{web.model_name}:predict (version {web.version}); "
        f"OpenAPI: {server.url}openapi.json", file=out)
  for key, route in server.web.extra_routes.items():
    print(f"  Vertex AI {key} route: {route}", file=out)

  def _term(signum, frame):
    raise KeyboardInterrupt
  previous = signal.signal(signal.SIGTERM, _term)
  try:
    thread = start_in_thread(server)
    print(f"Serving on {server.url} (Ctrl-C to stop)", file=out, flush=True)
    while thread.is_alive():
      thread.join(0.5)
  except KeyboardInterrupt:
    pass
  finally:
    signal.signal(signal.SIGTERM, previous)
    server.close()
    print("xraytpu.serve: stopped", file=out, flush=True)
