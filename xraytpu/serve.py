"""Serve a trained run: a web page, a JSON API and TensorFlow Serving's REST API for predictions.

  python -m xraytpu.serve --model_dir=RUN [--host=127.0.0.1 --port=8080]
      [--max_upload_mb=32 --max_files=16 --max_pixels=50000000 --decode_budget=100000000]
      [--max_batch=8 --batch_timeout_ms=5 --max_inflight=64]
      [--header_timeout_s=10 --body_timeout_s=60 --model_name=NAME]
      [--auth_token_file=tokens.txt --ssl_certfile=cert.pem --ssl_keyfile=key.pem]

Open http://127.0.0.1:8080/ and drop X-rays on the page, or call the API:

  curl -F file=@film.png 'http://127.0.0.1:8080/v1/predict?gradcam=1'
  curl --data-binary @film.jpeg http://127.0.0.1:8080/v1/predict
  curl http://127.0.0.1:8080/v1/model
  curl -d '{"instances": [{"b64": "'$(base64 -w0 film.png)'"}]}' \
      http://127.0.0.1:8080/v1/models/default:predict          (TF Serving's REST API)
  curl http://127.0.0.1:8080/openapi.json

Predictions are those of `python -m xraytpu.predict` (same preprocessing,
same frozen RUN/threshold.json). Starlette on uvicorn; see xraytpu.serving.http_api for
the API. Vertex AI: AIP_HTTP_PORT, AIP_HEALTH_ROUTE and AIP_PREDICT_ROUTE are
honoured. Binds 127.0.0.1 unless --host says otherwise; another --host needs
--auth_token_file (bearer tokens: every route but /healthz and the page's own files
answers 401 without one) or --allow_unauthenticated. --ssl_certfile/--ssl_keyfile
serve HTTPS. docs/serving.md: the token file's format, the page, TF Serving's routes.
"""

from __future__ import annotations

from tfrecord_tools import cli
from xraytpu.config import ServeOptions

cli.define_flags(ServeOptions)


def main(argv):
  cli.no_arguments(argv)
  opts = cli.from_flags(ServeOptions)
  from xraytpu.serving import http_api
  http_api.serve(opts)


def run():
  cli.run(main, tensorflow=True)


if __name__ == "__main__":
  run()
