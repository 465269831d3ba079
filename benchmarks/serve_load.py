"""Throughput and latency of `python -m xraytpu.serve` under concurrent clients.

  python -m benchmarks.serve_load --model_dir=RUN --images=DIR_OR_FILES \
      [--clients=50 --requests=2000 --max_seconds=60 --max_batch=8,32 --batch_timeout_ms=5
       --gradcam --json=PATH]
  python -m benchmarks.serve_load --url=http://127.0.0.1:8080/ --images=...   (a server you started)

Starts the real entry point (`python -m xraytpu.serve --port=0`, one process
per setting) on 127.0.0.1, then `--clients` threads, each with its own
keep-alive connection, POST one image per request (raw bytes, cycling through
--images, read once into memory) until --requests have been sent or
--max_seconds have passed, whichever comes first. The first request of each
client is a warm-up and is not counted. Settings, side by side:

  (1)    no batching: --max_batch=1 (every request is its own model call)
  (2)... batching:    each --max_batch value, with --batch_timeout_ms

Reports, per setting: requests ok / failed, throughput (requests/s = images/s),
latency p50 / p95 / p99 in ms (client side, request sent -> answer read), and
the mean images per model call (from /healthz). Traffic goes to 127.0.0.1 only:
--url must be a loopback address.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import sys
import threading
import time
import urllib.parse

from absl import app, flags

from tests._serve_process import ServeProcess
from xraytpu.serving import http_api


def define_flags() -> None:
  """The command's flags, defined when it runs: importing this module defines none (tests
  call its functions in-process beside other modules that define the same names)."""
  flags.DEFINE_string("model_dir", "", "Run directory to serve (omit with --url).")
  flags.DEFINE_string("url", "", "Benchmark an already running server on 127.0.0.1 instead.")
  flags.DEFINE_list("images", [], "Image files or folders to send (PNG/JPEG).")
  flags.DEFINE_integer("max_images", 64, "At most this many images are read and cycled through.")
  flags.DEFINE_integer("clients", 50, "Concurrent clients.")
  flags.DEFINE_integer("requests", 2000, "Requests per setting (after the warm-up), at most.")
  flags.DEFINE_float("max_seconds", 60.0, "Time per setting, at most.")
  flags.DEFINE_list("max_batch", ["8", "32"],
                    "Server --max_batch of each batching setting (one server each).")
  flags.DEFINE_float("batch_timeout_ms", 5.0, "Server --batch_timeout_ms for the batching setting.")
  flags.DEFINE_bool("gradcam", False, "Ask for Grad-CAM overlays too (?gradcam=1).")
  flags.DEFINE_bool("baseline", True, "Also run the no-batching setting (--max_batch=1).")
  flags.DEFINE_string("json", "", "Also write the results here.")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
START_TIMEOUT = 300.0


class BenchmarkError(ValueError):
  """A bad argument (one line for the user)."""


@dataclasses.dataclass
class Result:
  name: str
  clients: int
  requests_ok: int
  requests_failed: int
  seconds: float
  throughput: float          # successful requests (= images) per second
  p50_ms: float | None
  p95_ms: float | None
  p99_ms: float | None
  mean_batch: float | None   # images per model call, from /healthz
  errors: list[str]


def find_images(paths, limit: int) -> list[bytes]:
  files = []
  for p in paths:
    if os.path.isdir(p):
      for root, dirs, names in os.walk(p):
        dirs.sort()
        files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_SUFFIXES)]
    elif os.path.isfile(p):
      files.append(p)
    else:
      raise BenchmarkError(f"--images: {p} is neither a file nor a folder")
  if not files:
    raise BenchmarkError("--images: no PNG/JPEG files found")
  step = max(1, len(files) // limit)  # spread over the folders, not the first class only
  out = []
  for f in files[::step][:limit]:
    with open(f, "rb") as fh:
      out.append(fh.read())
  return out


def check_loopback(url: str) -> tuple[str, int]:
  u = urllib.parse.urlsplit(url)
  if u.scheme != "http" or u.hostname not in ("127.0.0.1", "localhost", "::1"):
    raise BenchmarkError(f"--url={url}: only http://127.0.0.1:PORT/ (this machine) is allowed")
  return u.hostname, u.port or 80


def _get_json(host, port, path):
  conn = http.client.HTTPConnection(host, port, timeout=30)
  try:
    conn.request("GET", path)
    return json.loads(conn.getresponse().read())
  finally:
    conn.close()


def percentile(values, q: float) -> float | None:
  if not values:
    return None
  s = sorted(values)
  k = (len(s) - 1) * q
  lo, hi = int(k), min(int(k) + 1, len(s) - 1)
  return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run_load(name: str, url: str, images: list[bytes], *, clients: int, requests: int,
             max_seconds: float, gradcam: bool) -> Result:
  """`clients` threads POST images until `requests` are done or `max_seconds` pass."""
  host, port = check_loopback(url)
  path = "/v1/predict" + ("?gradcam=1" if gradcam else "")
  before = _get_json(host, port, "/healthz")
  lock = threading.Lock()
  budget = [requests]
  latencies: list[float] = []
  errors: list[str] = []
  failed = [0]
  start_gate = threading.Barrier(clients + 1)
  stop_at = [0.0]

  def take() -> bool:
    with lock:
      if budget[0] <= 0 or time.monotonic() >= stop_at[0]:
        return False
      budget[0] -= 1
      return True

  def client(i: int):
    conn = http.client.HTTPConnection(host, port, timeout=60)
    body = images[i % len(images)]

    def once() -> tuple[bool, str]:
      nonlocal conn
      try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
          return False, f"HTTP {resp.status}: {data[:200]!r}"
        return True, ""
      except (OSError, http.client.HTTPException) as e:
        conn.close()
        conn = http.client.HTTPConnection(host, port, timeout=60)
        return False, f"{type(e).__name__}: {e}"

    once()  # warm-up: connection set up, not counted
    try:
      start_gate.wait(timeout=START_TIMEOUT)
    except threading.BrokenBarrierError:
      conn.close()
      return
    n = i
    while take():
      body = images[n % len(images)]
      n += clients
      t0 = time.perf_counter()
      ok, err = once()
      dt = time.perf_counter() - t0
      with lock:
        if ok:
          latencies.append(dt)
        else:
          failed[0] += 1
          if len(errors) < 5:
            errors.append(err)
    conn.close()

  threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
  for t in threads:
    t.start()
  stop_at[0] = time.monotonic() + max_seconds + 600  # the gate opens below; then the real limit
  try:
    start_gate.wait(timeout=START_TIMEOUT)
  except threading.BrokenBarrierError:
    raise BenchmarkError(f"the {clients} clients did not all get a first answer within "
                         f"{START_TIMEOUT:g} s") from None
  t_start = time.monotonic()
  stop_at[0] = t_start + max_seconds
  for t in threads:
    t.join(timeout=max_seconds + 120)
  seconds = time.monotonic() - t_start
  after = _get_json(host, port, "/healthz")
  d_images, d_batches = after["images"] - before["images"], after["batches"] - before["batches"]
  ms = [x * 1000 for x in latencies]
  return Result(name=name, clients=clients, requests_ok=len(latencies), requests_failed=failed[0],
                seconds=round(seconds, 2), throughput=round(len(latencies) / seconds, 1),
                p50_ms=_r(percentile(ms, 0.50)), p95_ms=_r(percentile(ms, 0.95)),
                p99_ms=_r(percentile(ms, 0.99)),
                mean_batch=round(d_images / d_batches, 2) if d_batches else None, errors=errors)


def _r(x):
  return None if x is None else round(x, 1)


def table(results: list[Result]) -> str:
  head = (f"{'setting':<34} {'clients':>7} {'ok':>6} {'failed':>6} {'req/s':>8} {'p50 ms':>8} "
          f"{'p95 ms':>8} {'p99 ms':>8} {'img/call':>8}")
  rows = [head, "-" * len(head)]
  base = results[0].throughput if results else 0
  for r in results:
    ratio = f"  ({r.throughput / base:.1f}x)" if base and r is not results[0] else ""
    rows.append(f"{r.name:<34} {r.clients:>7} {r.requests_ok:>6} {r.requests_failed:>6} "
                f"{r.throughput:>8.1f} {_f(r.p50_ms):>8} {_f(r.p95_ms):>8} {_f(r.p99_ms):>8} "
                f"{_f(r.mean_batch):>8}{ratio}")
  return "\n".join(rows)


def _f(x):
  return "-" if x is None else f"{x:.1f}"


def benchmark(*, model_dir: str, url: str, images: list[bytes], clients: int, requests: int,
              max_seconds: float, max_batch: list[int], batch_timeout_ms: float, gradcam: bool,
              baseline: bool, out=sys.stdout) -> list[Result]:
  if clients < 1 or requests < 1 or max_seconds <= 0 or not max_batch or min(max_batch) < 1:
    raise BenchmarkError("--clients, --requests, --max_seconds and --max_batch must be positive")
  kw = dict(clients=clients, requests=requests, max_seconds=max_seconds, gradcam=gradcam)
  if url:
    check_loopback(url)
    return [run_load(f"server at {url}", url, images, **kw)]
  if not model_dir:
    raise BenchmarkError("give --model_dir=RUN (or --url of a running server)")
  settings = [("(1) no batching, max_batch=1", 1, 0.0)] if baseline else []
  for mb in max_batch:
    settings.append((f"({len(settings) + 1}) batching, max_batch={mb}, {batch_timeout_ms:g} ms", mb,
                     batch_timeout_ms))
  results = []
  for name, mb, timeout_ms in settings:
    print(f"starting the server: {name} ...", file=out, flush=True)
    with ServeProcess(model_dir, [f"--max_batch={mb}", f"--batch_timeout_ms={timeout_ms}"],
                                timeout=START_TIMEOUT) as server:
      print(f"  {clients} clients, up to {requests} requests or {max_seconds:g} s against {server.url}",
            file=out, flush=True)
      r = run_load(name, server.url, images, **kw)
    print(f"  {r.requests_ok} ok, {r.requests_failed} failed, {r.throughput} req/s, p50 {r.p50_ms} ms, "
          f"p95 {r.p95_ms} ms", file=out, flush=True)
    results.append(r)
  return results


def main(argv):
  F = flags.FLAGS
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
    sys.exit(2)
  try:
    try:
      max_batch = [int(v) for v in F.max_batch]
    except ValueError:
      raise BenchmarkError(f"--max_batch={','.join(F.max_batch)}: expected integers") from None
    images = find_images(F.images, F.max_images)
    results = benchmark(model_dir=F.model_dir, url=F.url, images=images,
                        clients=F.clients, requests=F.requests, max_seconds=F.max_seconds,
                        max_batch=max_batch, batch_timeout_ms=F.batch_timeout_ms,
                        gradcam=F.gradcam, baseline=F.baseline)
  except (BenchmarkError, http_api.ServeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print()
  print(f"xraytpu.serve under load: {len(images)} distinct images, one per request"
        f"{', with Grad-CAM' if F.gradcam else ''}; {os.cpu_count()} CPU cores")
  print(table(results))
  for r in results:
    for e in r.errors:
      print(f"  {r.name}: {e}")
  if F.json:
    tmp = f"{F.json}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump([dataclasses.asdict(r) for r in results], f, indent=2)
    os.replace(tmp, F.json)
  if any(r.requests_failed for r in results):
    sys.exit(1)


def run():
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
