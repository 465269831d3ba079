"""TensorFlow's tf.data service: start its dispatcher and workers.

The service moves the input pipeline's work (read shards, decode, resize) off
the training hosts onto any number of CPU machines. One dispatcher hands out
work; each worker runs the pipeline's graph and streams finished batches to
the trainers over gRPC. The trainer side is `train_dataset(...)` with
`Config.data_service_address = "grpc://DISPATCHER_HOST:PORT"`
(`xraytpu.data.input_pipeline`).

  dispatcher:  python -m xraytpu.data_service --role=dispatcher --port=5050
  workers:     python -m xraytpu.data_service --role=worker --port=5051 \
                   --dispatcher_address=DISPATCHER_HOST:5050 --worker_address=THIS_HOST:5051

Workers need TensorFlow (the pipeline's graph is shipped to them, not the
code; xraytpu itself is not needed) and read access to the data (local path
or gs://).

Lost workers, as measured with TensorFlow 2.21: the trainers read
`processing_mode="distributed_epoch"` jobs, one job iteration per epoch. A
worker killed mid-epoch loses the elements it had in flight (an epoch never
repeats an example); the other workers go on, and the epoch ends once the
lost worker's task is done, i.e. once a worker is running again at the same
address (the dispatcher keeps the task of an address that stopped
heartbeating; it does not hand it to another worker). So run each worker
under a supervisor that restarts it at a stable address: a Kubernetes
StatefulSet with a headless service (worker-N.NAME:5051), a managed instance
group with static IPs, or systemd's Restart=always. A restarted worker picks
up its task within one heartbeat.
"""

from __future__ import annotations

import re

import tensorflow as tf

from xraytpu import errors

ROLES = ("dispatcher", "worker")
PROTOCOL = "grpc"
_HOST_PORT = re.compile(r"^(?:grpc://)?([^/:\s]+|\[[0-9a-fA-F:]+\]):(\d{1,5})$")


class ServiceError(errors.UserError):
  """A bad address or setting for the tf.data service: one clear line."""


def split_address(address: str) -> tuple[str, int]:
  """"grpc://host:port" or "host:port" -> (host, port); ServiceError otherwise."""
  m = _HOST_PORT.match(address.strip())
  if not m or not 0 < int(m.group(2)) < 65536:
    raise ServiceError(f"dispatcher address {address!r} is not host:port or grpc://host:port")
  return m.group(1), int(m.group(2))


def start_dispatcher(port: int, *, work_dir: str = "",
                     job_gc_timeout_ms: int = 0) -> tf.data.experimental.service.DispatchServer:
  """Starts a dispatcher on `port` (0: any free port) and returns the running server.

  Args:
    port: TCP port to listen on.
    work_dir: local or gs:// folder for the dispatcher's journal; when given,
      the dispatcher runs in fault-tolerant mode and a restarted dispatcher
      recovers its registered datasets and jobs.
    job_gc_timeout_ms: a job without consumers this long is deleted (0:
      TensorFlow's default).
  """
  _check_port(port)
  config = tf.data.experimental.service.DispatcherConfig(
      port=port, protocol=PROTOCOL, work_dir=work_dir or None,
      fault_tolerant_mode=bool(work_dir),
      job_gc_timeout_ms=job_gc_timeout_ms or None)
  return tf.data.experimental.service.DispatchServer(config)


def start_worker(dispatcher_address: str, port: int, *, worker_address: str = "",
                 heartbeat_interval_ms: int = 0) -> tf.data.experimental.service.WorkerServer:
  """Starts a worker that registers with the dispatcher; returns the running server.

  Args:
    dispatcher_address: "host:port" or "grpc://host:port" of the dispatcher.
    port: TCP port to serve data on (0: any free port).
    worker_address: "host:port" the trainers use to reach this worker (what
      the dispatcher hands them). Default "localhost:<port>", right only when
      trainers run on this machine: set it on a cluster.
    heartbeat_interval_ms: how often to report to the dispatcher; a (re)started
      worker gets its tasks with the next heartbeat (0: TensorFlow's default).
  """
  _check_port(port)
  host, dport = split_address(dispatcher_address)
  if worker_address:
    whost, wport = split_address(worker_address)
    worker_address = f"{whost}:{wport}"
  config = tf.data.experimental.service.WorkerConfig(
      dispatcher_address=f"{host}:{dport}", worker_address=worker_address or None,
      port=port, protocol=PROTOCOL, heartbeat_interval_ms=heartbeat_interval_ms or None)
  return tf.data.experimental.service.WorkerServer(config)


def _check_port(port: int) -> None:
  if not 0 <= port < 65536:
    raise ServiceError(f"--port must be in 0..65535, got {port}")



def server_address(server) -> str:
  """"localhost:PORT" a started DispatchServer or WorkerServer serves on (the real
  port when started with port 0)."""
  if isinstance(server, tf.data.experimental.service.DispatchServer):
    return server.target.split("://", 1)[1]
  return server._address  # noqa: SLF001  (TF 2.21 has no public accessor for workers)
