"""TensorFlow Serving's REST protocol, as `python -m xraytpu.serve` speaks it for the run.

  POST /v1/models/NAME:predict   parse_request (row "instances" or columnar "inputs" of
                                 {"b64": image bytes}) -> App.predict -> answer
                                 (the exported serving_default's outputs per image)
  GET  /v1/models/NAME/metadata  metadata (serving_default's signature_def)

The HTTP layer (routes, limits, errors) is xraytpu.serving.http_api; what a
prediction is, xraytpu.serving.service.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from xraytpu.serving.service import App, RequestError

# TF Serving's model version: one model per server.
MODEL_VERSION = "1"
SERVING_INPUT = "image_bytes"   # the exported serving_default's one input (xraytpu.inference.model_call)

REQUEST_SCHEMA = {"type": "object", "description": "TF Serving predict body: instances (row) or inputs (columnar)",
               "properties": {
                   "signature_name": {"type": "string", "enum": ["serving_default"]},
                   "instances": {"type": "array", "items": {"type": "object", "properties": {
                       "b64": {"type": "string", "format": "byte"},
                       SERVING_INPUT: {"type": "object", "properties": {"b64": {"type": "string"}}}}}},
                   "inputs": {"oneOf": [{"type": "array"}, {"type": "object"}]}}}
ANSWER_SCHEMA = {"type": "object", "properties": {
    "predictions": {"type": "array", "items": {"type": "object", "properties": {
        "probabilities": {"type": "array", "items": {"type": "number"}}, "label": {"type": "string"},
        "label_index": {"type": "integer"}, "positive": {"type": "array", "items": {"type": "boolean"}}}}},
    "outputs": {"type": "object"}}}


def _b64(value: Any, where: str) -> bytes:
  """TF Serving's binary value {"b64": "..."} (or {"image_bytes": {"b64": ...}}) -> bytes."""
  if isinstance(value, dict) and set(value) == {SERVING_INPUT}:
    value = value[SERVING_INPUT]
  if not (isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str)):
    raise RequestError(400, f"{where}: expected {{\"b64\": \"<base64 of an image file>\"}} (or "
                            f"{{\"{SERVING_INPUT}\": {{\"b64\": ...}}}}): the model's input is image bytes")
  try:
    return base64.b64decode(value["b64"], validate=True)
  except (binascii.Error, ValueError):
    raise RequestError(400, f"{where}: b64 is not valid base64") from None


def parse_request(body: bytes, max_files: int) -> tuple[str, list[tuple[str, bytes]]]:
  """A TF Serving predict body -> ("instances" | "inputs", [(name, image bytes)]).

  Row format {"instances": [{"b64": ...} | {"image_bytes": {"b64": ...}}, ...]} or
  columnar {"inputs": {"image_bytes": [{"b64": ...}, ...]}} / {"inputs": [{"b64": ...}]}
  (`signature_name`, when given, must be serving_default). Raises RequestError 400 / 413.
  """
  try:
    req = json.loads(body)
  except (ValueError, UnicodeDecodeError) as e:
    raise RequestError(400, f"the body is not JSON ({e})") from None
  if not isinstance(req, dict) or ("instances" in req) == ("inputs" in req):
    raise RequestError(400, 'the body must be a JSON object with "instances" or "inputs" (not both), '
                            "as for TensorFlow Serving's predict API")
  if req.get("signature_name", "serving_default") != "serving_default":
    raise RequestError(400, f"signature_name={str(req['signature_name'])[:50]!r}: only serving_default "
                            "is served")
  fmt = "instances" if "instances" in req else "inputs"
  values = req[fmt]
  if fmt == "inputs" and isinstance(values, dict):
    if set(values) != {SERVING_INPUT}:
      raise RequestError(400, f'"inputs" must name the one input, {SERVING_INPUT!r}')
    values = values[SERVING_INPUT]
  if not isinstance(values, list) or not values:
    raise RequestError(400, f'"{fmt}" must be a non-empty list of images')
  if len(values) > max_files:
    raise RequestError(413, f"more than {max_files} images in one request (--max_files)")
  return fmt, [("", _b64(v, f"{fmt}[{i}]")) for i, v in enumerate(values)]


def answer(fmt: str, result: dict[str, Any]) -> dict[str, Any]:
  """App.predict's answer -> TF Serving's: the exported serving_default's outputs per image.

  Single-label: probabilities [K], label, label_index; multi-label: probabilities [K],
  positive [K], label. Row format -> {"predictions": [{...}, ...]}; columnar ->
  {"outputs": {name: [per image]}}.
  """
  classes = result["classes"]
  rows = []
  for p in result["predictions"]:
    row: dict[str, Any] = {"probabilities": [p["probabilities"][c] for c in classes]}
    if "findings" in p:
      row["positive"] = [c in p["findings"] for c in classes]
      row["label"] = p["label"]
    else:
      row["label"] = p["label"]
      row["label_index"] = p["label_index"]
    rows.append(row)
  if fmt == "instances":
    return {"predictions": rows}
  return {"outputs": {k: [r[k] for r in rows] for k in rows[0]}}


def _tensor(dtype: str, dims: list[int], name: str) -> dict[str, Any]:
  return {"dtype": dtype, "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in dims],
                                           "unknown_rank": False}, "name": name}


def metadata(app: App, name: str) -> dict[str, Any]:
  """GET /v1/models/<name>/metadata: serving_default's signature as TF Serving describes the export."""
  k = len(app.run.classes)
  outputs = {"probabilities": _tensor("DT_FLOAT", [-1, k], "StatefulPartitionedCall:1"),
             "label": _tensor("DT_STRING", [-1], "StatefulPartitionedCall:0")}
  if app.run.multi_label:
    outputs["positive"] = _tensor("DT_BOOL", [-1, k], "StatefulPartitionedCall:2")
  else:
    outputs["label_index"] = _tensor("DT_INT32", [-1], "StatefulPartitionedCall:2")
  sig = {"inputs": {SERVING_INPUT: _tensor("DT_STRING", [-1], f"serving_default_{SERVING_INPUT}:0")},
         "outputs": outputs, "method_name": "tensorflow/serving/predict", "defaults": {}}
  return {"model_spec": {"name": name, "signature_name": "", "version": MODEL_VERSION},
          "metadata": {"signature_def": {"signature_def": {"serving_default": sig}}}}
