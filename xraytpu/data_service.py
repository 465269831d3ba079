r"""Run a tf.data service dispatcher or worker (TensorFlow's own servers) until stopped.

  # one dispatcher
  python -m xraytpu.data_service --role=dispatcher --port=5050 [--work_dir=gs://BUCKET/tfdata]
  # any number of workers, one per CPU machine (or several per machine, other ports)
  python -m xraytpu.data_service --role=worker --port=5051 \
      --dispatcher_address=DISPATCHER_HOST:5050 --worker_address=THIS_HOST:5051
  # trainers
  python -m xraytpu.train ... --data_service_address=grpc://DISPATCHER_HOST:5050

The workers run the training input pipeline (read shards, decode, resize,
shuffle, batch) and stream batches to the trainers; see
`xraytpu.data.data_service_lib` for what the servers do and what survives a lost
worker (restart workers at the same address: a supervisor's job). Prints one line "<role> listening on grpc://HOST:PORT" once serving,
then blocks; stop it with Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import signal
from typing import Sequence

from absl import flags

from tfrecord_tools import cli
from xraytpu import errors

_ROLE = flags.DEFINE_enum("role", None, ["dispatcher", "worker"], "Which server to run.")
_PORT = flags.DEFINE_integer("port", 5050, "TCP port to serve on (0: any free port, printed).")
_DISPATCHER = flags.DEFINE_string("dispatcher_address", "", "Worker: the dispatcher's "
                                  "host:port (or grpc://host:port).")
_WORKER_ADDRESS = flags.DEFINE_string("worker_address", "", "Worker: host:port the trainers "
                                      "reach this worker at (default localhost:<port>, right "
                                      "only when trainers run on this machine).")
_WORK_DIR = flags.DEFINE_string("work_dir", "", "Dispatcher: folder (local or gs://) for its "
                                "journal; a restarted dispatcher then resumes its jobs.")
_JOB_GC = flags.DEFINE_integer("job_gc_timeout_ms", 0, "Dispatcher: delete a job without "
                               "trainers reading it after this long (0: TensorFlow's default).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_interval_ms", 0, "Worker: report to the "
                                  "dispatcher this often (0: TensorFlow's default).")
flags.mark_flag_as_required("role")


def main(argv: Sequence[str]) -> None:
  cli.no_arguments(argv)
  if _ROLE.value == "worker" and not _DISPATCHER.value:
    raise errors.UserError("--role=worker needs --dispatcher_address=HOST:PORT")
  if _ROLE.value == "dispatcher" and (_DISPATCHER.value or _WORKER_ADDRESS.value):
    raise errors.UserError("--dispatcher_address and --worker_address are worker flags")
  # Ctrl-C / SIGTERM (docker stop, kubectl delete, kill) end the process: they are
  # blocked in every thread (the servers' threads inherit this) and taken below.
  stop_signals = {signal.SIGINT, signal.SIGTERM}
  signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
  from xraytpu.data import data_service_lib as lib  # TensorFlow: after the flags are checked
  if _ROLE.value == "dispatcher":
    server = lib.start_dispatcher(_PORT.value, work_dir=_WORK_DIR.value,
                                  job_gc_timeout_ms=_JOB_GC.value)
  else:
    server = lib.start_worker(_DISPATCHER.value, _PORT.value,
                              worker_address=_WORKER_ADDRESS.value,
                              heartbeat_interval_ms=_HEARTBEAT.value)
  print(f"{_ROLE.value} listening on grpc://{lib.server_address(server)}", flush=True)
  received = signal.sigwait(stop_signals)
  print(f"{_ROLE.value}: stopping ({signal.Signals(received).name})", flush=True)


def run() -> None:
  cli.run(main, tensorflow=True)


if __name__ == "__main__":
  run()
