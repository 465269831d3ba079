"""The OpenAPI 3.1 document of `python -m xraytpu.serve` (GET /openapi.json), kept by hand
beside the routes of xraytpu.serving.http_api; tests/test_serve.py checks it lists every
route. With --auth_token_file it names the bearer scheme, marks the open routes and adds
each locked route's 401.
"""

from __future__ import annotations

from typing import Any

from tfrecord_tools import __version__
from xraytpu.serving import tf_serving

_ERROR_SCHEMA = {"type": "object", "required": ["error", "status"],
                 "properties": {"error": {"type": "string"}, "status": {"type": "integer"},
                                "file": {"type": "string"}, "index": {"type": "integer"}}}
_TF_ERROR_SCHEMA = {"type": "object", "required": ["error"], "additionalProperties": False,
                    "properties": {"error": {"type": "string"}}}


def _op(summary: str, *, ok: str, body: dict | None = None, errors: tuple[int, ...] = (),
        params: list | None = None, media: str = "application/json", tf: bool = False) -> dict[str, Any]:
  op: dict[str, Any] = {"summary": summary, "responses": {"200": {
      "description": ok, "content": {media: {"schema": {"type": "object"} if media.endswith("json")
                                             else {"type": "string"}}}}}}
  for status in errors:
    op["responses"][str(status)] = {"description": "error", "content": {
        "application/json": {"schema": _TF_ERROR_SCHEMA if tf else _ERROR_SCHEMA}}}
  if body:
    op["requestBody"] = {"required": True, "content": body}
  if params:
    op["parameters"] = params
  return op


_PREDICT_ERRORS = (400, 408, 411, 413, 415, 422, 503)
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "the run's model name (--model_name) or 'default'"}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "integer"},
            "description": "the served version (the run's latest export, else 1); others answer 404"}


def openapi(web) -> dict[str, Any]:
  """The OpenAPI 3.1 document of every route (tests/test_serve.py checks none is missing)."""
  image_body = {
      "multipart/form-data": {"schema": {"type": "object", "properties": {
          "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
      "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
  }
  tf_body = {"application/json": {"schema": tf_serving.REQUEST_SCHEMA}}
  tf_ok = {"description": "TF Serving answer", "content": {"application/json": {"schema": tf_serving.ANSWER_SCHEMA}}}
  paths: dict[str, dict[str, Any]] = {}
  for path, (_, media) in web.app.static.items():
    paths[path] = {"get": _op("the prediction page", ok="the page", media=media)}
  paths["/healthz"] = {"get": _op("liveness and counters", ok="status")}
  paths["/v1/model"] = {"get": _op("the model card (xraytpu.run.model_card)", ok="the card")}
  paths["/v1/model_card.md"] = {"get": _op("the model card as Markdown (MODEL_CARD.md)",
                                           ok="the card's text")}
  paths["/openapi.json"] = {"get": _op("this document", ok="OpenAPI 3.1")}
  paths["/v1/predict"] = {"post": _op(
      "predict one or more images (multipart file parts, or one image as the raw body)",
      ok="predictions (see xraytpu.serving.http_api)", body=image_body, errors=_PREDICT_ERRORS, params=[
          {"name": "gradcam", "in": "query", "schema": {"type": "string", "enum": ["0", "1"]}},
          {"name": "dicom_window", "in": "query", "schema": {"type": "string"},
           "description": "DICOM rendering: auto (the run's), viewer, full, file, none, lung, ... or CENTER,WIDTH"},
          {"name": "window", "in": "query", "schema": {"type": "string"}, "deprecated": True,
           "description": "the old name of dicom_window"}])}
  classify_body = {"application/json": {"schema": {"type": "object", "properties": {
      "examples": {"type": "array"}, "signature_name": {"type": "string"}}}}}
  for prefix, params in (("/v1/models/{name}", [_NAME]), ("/v1/models/{name}/versions/{version}",
                                                          [_NAME, _VERSION])):
    tf_predict = _op("TensorFlow Serving predict (serving_default)", ok="TF Serving answer", body=tf_body,
                     errors=_PREDICT_ERRORS + (404,), params=params, tf=True)
    tf_predict["responses"]["200"] = tf_ok
    paths[prefix + ":predict"] = {"post": tf_predict}
    for method in ("classify", "regress"):
      paths[f"{prefix}:{method}"] = {"post": _op(
          f"TensorFlow Serving {method}: 400, as TF Serving answers for this export (it has "
          f"predict signatures only)", ok="never", body=classify_body, errors=(400, 404), params=params,
          tf=True)}
    paths[prefix] = {"get": _op("TensorFlow Serving model status", ok="model_version_status",
                                errors=(400, 404), params=params, tf=True)}
    paths[prefix + "/metadata"] = {"get": _op(
        "TensorFlow Serving model metadata: the export's signature_def map", ok="metadata",
        errors=(400, 404), params=params, tf=True)}
  if web.extra_routes.get("health"):
    paths[web.extra_routes["health"]] = {"get": _op("Vertex AI health route (AIP_HEALTH_ROUTE)", ok="status")}
  if web.extra_routes.get("predict"):
    vp = _op("Vertex AI predict route (AIP_PREDICT_ROUTE): TF Serving instances",
             ok="TF Serving answer", body=tf_body, errors=_PREDICT_ERRORS, tf=True)
    vp["responses"]["200"] = tf_ok
    paths[web.extra_routes["predict"]] = {"post": vp}
  doc: dict[str, Any] = {
      "openapi": "3.1.0",
      "info": {"title": "xraytpu.serve", "version": __version__,
               "description": f"Predictions of the run's model ({web.model_name}). "
                              "Not a diagnostic device."},
      "paths": paths}
  if web.tokens is not None:   # --auth_token_file: every operation but the open ones needs the token
    doc["components"] = {"securitySchemes": {"bearer": {
        "type": "http", "scheme": "bearer", "description": "a token of the server's --auth_token_file"}}}
    doc["security"] = [{"bearer": []}]
    for path, ops in paths.items():
      for op in ops.values():
        if path in web.open_paths:
          op["security"] = []
        else:
          op["responses"]["401"] = {"description": "no accepted bearer token", "content": {
              "application/json": {"schema": _TF_ERROR_SCHEMA if web._is_tf_path(path) else _ERROR_SCHEMA}}}
  return doc
