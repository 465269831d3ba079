"""TensorFlow Serving's REST protocol, as `python -m xraytpu.serve` speaks it for the run.

  GET  /v1/models/NAME[/versions/N]            status: the served version, AVAILABLE
  GET  /v1/models/NAME[/versions/N]/metadata   metadata: the SavedModel's signature_def map,
                                               exactly as xraytpu.export writes it
                                               (export_lib.signature_defs)
  POST /v1/models/NAME[/versions/N]:predict    parse_request (row "instances" or columnar
                                               "inputs" of {"b64": image bytes}) -> App.predict
                                               -> answer (serving_default's outputs per image)
  POST /v1/models/NAME[/versions/N]:classify   TF Serving's answer for a model without a
       .../NAME[/versions/N]:regress           classify/regress signature (unsupported)

NAME is the run's model name (--model_name) or "default"; the served version is the
run's latest export (RUN/export/N, what TF Serving serving RUN/export/ would load), or 1
(served_version). Errors are TF Serving's: a body of exactly {"error": "..."}, and for
an unknown model or version the same status and message (not_found, servable_not_found).
The HTTP layer (routes, limits) is xraytpu.serving.http_api; what a prediction is,
xraytpu.serving.service.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from xraytpu.inference.model_call import SERVING_DEFAULT, SERVING_PIXELS
from xraytpu.serving.service import RequestError

SERVING_INPUT = "image_bytes"   # the exported serving_default's one input (xraytpu.inference.model_call)
SIGNATURE_NAMES = (SERVING_DEFAULT, SERVING_PIXELS)   # the export's signatures (InferenceModule.signatures)
_INT64_MAX = 2 ** 63 - 1


def served_version(model_dir: str) -> int:
  """The version this server answers as: the highest RUN/export/N (TF Serving's default
  version policy on RUN/export/), or 1 when the run has no export."""
  from xraytpu.inference import export_lib
  from xraytpu.run import rundir
  try:
    return max(1, export_lib.next_version(rundir.export_root(model_dir)) - 1)
  except OSError:
    return 1


def status(version: int) -> dict[str, Any]:
  """GET /v1/models/NAME[/versions/N]: TF Serving's GetModelStatus answer for the served version."""
  return {"model_version_status": [{"version": str(version), "state": "AVAILABLE",
                                    "status": {"error_code": "OK", "error_message": ""}}]}


def not_found(name: str, version: int | None) -> str:
  """TF Serving's 404 message for a model status request (GetModelStatus)."""
  if version is None:
    return f"Could not find any versions of model {name}"
  return f"Could not find version {version} of model {name}"


def servable_not_found(name: str, version: int | None) -> str:
  """TF Serving's 404 message for metadata/predict/classify/regress of an unknown model or version."""
  spec = f"Latest({name})" if version is None else f"Specific({name}, {version})"
  return f"Servable not found for request: {spec}"


def malformed(method: str, path: str) -> str:
  """TF Serving's 400 message for a request under /v1/models that matches none of its routes."""
  return f"Malformed request: {method} {path}"


def check_version(version: int | None) -> None:
  if version is not None and version > _INT64_MAX:
    raise RequestError(400, f"Failed to convert version: {version} to numeric.")


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
  signature = req.get("signature_name", SERVING_DEFAULT)
  if not isinstance(signature, str):
    raise RequestError(400, "'signature_name' key must be a string value.")
  signature = signature or SERVING_DEFAULT   # "" is the default signature, as in TF Serving
  if signature not in SIGNATURE_NAMES:
    raise RequestError(400, f'Serving signature name: "{signature[:100]}" not found in signature def')
  if signature != SERVING_DEFAULT:
    raise RequestError(400, f"signature_name={signature!r}: xraytpu.serve serves {SERVING_DEFAULT} "
                            "(image files); send images, or serve the export with TF Serving")
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


def signature_defs_json(defs: dict) -> dict[str, Any]:
  """{name: SignatureDef proto} -> its JSON as TF Serving's metadata prints it (protobuf's
  JSON with the proto field names and every field, as TF Serving's ToJsonString asks)."""
  from google.protobuf import json_format
  every_field = {"always_print_fields_with_no_presence": True}
  try:
    json_format.MessageToDict(next(iter(defs.values())), **every_field)
  except TypeError:   # protobuf < 5.26 names the option including_default_value_fields
    every_field = {"including_default_value_fields": True}
  return {k: json_format.MessageToDict(v, preserving_proto_field_name=True, **every_field)
          for k, v in sorted(defs.items())}


def metadata(defs: dict, name: str, version: int) -> dict[str, Any]:
  """GET /v1/models/NAME/metadata: TF Serving's GetModelMetadata answer, from the signature_def
  map the export holds (`export_lib.signature_defs`; defs: {name: SignatureDef proto})."""
  return {"model_spec": {"name": name, "signature_name": "", "version": str(version)},
          "metadata": {"signature_def": {"signature_def": signature_defs_json(defs)}}}


def parse_classify_request(body: bytes, method: str) -> str:
  """A :classify / :regress body as TF Serving reads it -> its signature name (default
  serving_default). Raises RequestError 400 for a body TF Serving would refuse."""
  try:
    req = json.loads(body)
  except (ValueError, UnicodeDecodeError) as e:
    raise RequestError(400, f"the body is not JSON ({e})") from None
  if not isinstance(req, dict):
    raise RequestError(400, "the body must be a JSON object")
  signature = req.get("signature_name", SERVING_DEFAULT)
  if not isinstance(signature, str):
    raise RequestError(400, "'signature_name' key must be a string value.")
  examples = req.get("examples")
  if examples is None:
    raise RequestError(400, f"When method is {method}, key 'examples' is expected and was not found")
  if not isinstance(examples, list):
    raise RequestError(400, "Expecting 'examples' value to be an list/array")
  if not examples:
    raise RequestError(400, "'examples' value is an empty array")
  for e in examples:
    if not isinstance(e, dict):
      raise RequestError(400, f"Example must be JSON object but got JSON {type(e).__name__}")
  return signature or SERVING_DEFAULT


def unsupported(method: str, defs: dict, signature: str) -> str:
  """TF Serving's 400 message for :classify / :regress on `signature` of this export, whose
  signatures are predict signatures (image bytes in; probabilities, label... out). TF
  Serving (--enable_signature_method_name_check off, its default) checks the signature's
  shape: classify wants one input and one or two outputs, regress one input and one output."""
  if signature not in defs:
    return f"No signature was found with the name: {signature}"
  sig = defs[signature]
  if len(sig.inputs) != 1:
    return "Expected one input Tensor."
  if method == "classify" and len(sig.outputs) not in (1, 2):
    return f"Expected one or two output Tensors, found {len(sig.outputs)}"
  if method == "regress" and len(sig.outputs) != 1:
    return "Expected one output Tensor."
  kind = "classification" if method == "classify" else "regression"
  return f"No {kind} inputs found in SignatureDef: {signature}"
