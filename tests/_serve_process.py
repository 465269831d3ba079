"""Test harness: the real `python -m xraytpu.serve` as a child process on 127.0.0.1.

Used by tests/test_serve.py, tests/test_serve_browser.py and benchmarks/serve_load.py.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
from typing import Sequence

from xraytpu.serving.http_api import ServeError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `-m xraytpu.serve` resolves


class ServeProcess:
  """The real entry point, `python -m xraytpu.serve`, as a child process on 127.0.0.1 (tests, benchmarks).

  Runs it with `--model_dir=model_dir --host=127.0.0.1 --port=0 --noaccess_log` plus
  `extra_flags` (e.g. ["--max_batch=8"]) and waits up to `timeout` seconds (TensorFlow
  import, model load, warm-up) for the "Serving on URL ..." line `serve` prints; `url`
  is then that URL, "http://127.0.0.1:PORT/". If the process exits or stays silent
  instead, it is stopped and ServeError carries the last lines of its output.
  Its stdout+stderr keep being read, so it never blocks on a full pipe; `output`
  holds the last 50 lines; `env` is added to its environment (e.g. Vertex AI's AIP_*);
  `pid` is its process id (/proc/PID/status). stop() ends it (SIGTERM, then SIGKILL); a context manager.
  """

  def __init__(self, model_dir: str, extra_flags: Sequence[str] = (), *, timeout: float = 300.0,
               env: dict[str, str] | None = None):
    cmd = [sys.executable, "-m", "xraytpu.serve", f"--model_dir={model_dir}", "--host=127.0.0.1",
           "--port=0", "--noaccess_log", *extra_flags]
    self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, env={**os.environ, **(env or {})})
    self.pid = self.proc.pid
    self.output: collections.deque[str] = collections.deque(maxlen=50)
    self.url = ""
    ready, ended = threading.Event(), threading.Event()

    def read() -> None:
      for line in self.proc.stdout:
        self.output.append(line)
        if not self.url and line.startswith("Serving on "):
          self.url = line.split()[2]
          ready.set()
      ended.set()  # end of output: the process is exiting
      ready.set()

    threading.Thread(target=read, name="xraytpu-serve-output", daemon=True).start()
    ready.wait(timeout)
    if not self.url:
      why = f"not serving after {timeout:g} s"
      if ended.is_set():
        try:
          why = f"exit code {self.proc.wait(timeout=30)}"
        except subprocess.TimeoutExpired:
          pass
      self.stop()
      raise ServeError(f"the server did not start ({why}):\n" + "".join(self.output))

  def stop(self) -> None:
    self.proc.terminate()
    try:
      self.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait(timeout=30)

  def __enter__(self) -> ServeProcess:
    return self

  def __exit__(self, *exc) -> None:
    self.stop()

