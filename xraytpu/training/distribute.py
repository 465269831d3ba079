"""Distribution strategies by name: `--strategy=tpu|mirrored|multi_worker|one_device|default`.

`get_strategy(name, tpu=...)` returns a started `tf.distribute.Strategy` or
raises `StrategyError` (a ValueError) whose message is one line naming the
flag and the reason, e.g. "--strategy=tpu: no TPU found at 'local' (...)".
It never falls back silently to another strategy: a failed TPU connection that
quietly trains on CPU wastes a day.

  default       tf.distribute default strategy: one device, whatever TF picks.
  one_device    one replica on /gpu:0 when a GPU is visible, else /cpu:0: a
                MirroredStrategy over that one device. tf.distribute's
                OneDeviceStrategy cannot train here: tf_keras' BackupAndRestore
                (resume after preemption) refuses it ("not supported yet").
  mirrored      MirroredStrategy over every local GPU; without GPUs, over every
                logical CPU device (1 unless the process split its CPU).
  multi_worker  MultiWorkerMirroredStrategy; the cluster comes from TF_CONFIG
                (without TF_CONFIG it runs as a single worker and says so).
  tpu           TPUClusterResolver(tpu) -> connect -> initialize -> TPUStrategy.
                `tpu` is a Cloud TPU name, a grpc:// address, or 'local' on a TPU VM.

Batch sizes: `--batch_size` is the *global* batch; each replica sees
`per_replica_batch(global, strategy)` examples per step. Variables must be
created inside `strategy.scope()` (train_lib does this).
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import logging
import tensorflow as tf

from xraytpu import errors

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")


class StrategyError(errors.UserError):
  """The requested strategy cannot start (one line, shown to the user as-is)."""


@dataclasses.dataclass(frozen=True)
class StrategyInfo:
  """What the run was distributed over (logged, and written to config.json)."""
  name: str              # the --strategy value
  cls: str               # e.g. "MirroredStrategy"
  replicas: int          # num_replicas_in_sync, over all workers
  devices: tuple         # this worker's replica devices
  num_workers: int       # 1 unless multi_worker / multi-host TPU
  task_type: str | None  # from TF_CONFIG under multi_worker, else None
  task_id: int | None
  is_chief: bool         # the one worker that writes the run directory
  accelerator: str       # "tpu", "gpu" or "cpu"

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["devices"] = list(self.devices)
    return d


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return text[:300] + ("..." if len(text) > 300 else "")


def get_strategy(name: str, *, tpu: str = "local") -> tf.distribute.Strategy:
  """Builds and starts the named strategy; raises StrategyError if it cannot."""
  if name not in STRATEGIES:
    raise StrategyError(f"--strategy={name}: unknown strategy (choose one of {', '.join(STRATEGIES)})")
  if name == "tpu":
    strategy = _tpu_strategy(tpu)
  elif name == "default":
    strategy = tf.distribute.get_strategy()
  elif name == "one_device":
    gpus = tf.config.list_logical_devices("GPU")
    device = (gpus or tf.config.list_logical_devices("CPU"))[0].name
    strategy = tf.distribute.MirroredStrategy(devices=[device])
  elif name == "mirrored":
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    try:
      strategy = tf.distribute.MirroredStrategy(devices=devices)
    except (ValueError, RuntimeError) as e:
      raise StrategyError(f"--strategy=mirrored: cannot start over {devices}: {_one_line(e)}") from e
  else:  # multi_worker
    if "TF_CONFIG" not in os.environ:
      logging.warning("--strategy=multi_worker without TF_CONFIG: running as a single worker.")
    else:
      _check_tf_config(os.environ["TF_CONFIG"])
    try:
      strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
      raise StrategyError(f"--strategy=multi_worker: cannot start: {_one_line(e)}") from e
  info = describe(strategy, name)
  logging.info("Strategy %s (%s): %d replica(s) in sync on %d worker(s); this worker's devices: %s",
               name, info.cls, info.replicas, info.num_workers, ", ".join(info.devices))
  return strategy


def check_supported(info: StrategyInfo, *, jit_compile: bool) -> None:
  """Refuses, before any work, what TensorFlow cannot run: XLA (--jit_compile)
  over more than one replica on CPUs. In one process, XLA compiles every replica
  for the first CPU device, where the other replicas' variables are not
  ("Trying to access resource .../replica_1 located in device CPU:1 from device
  CPU:0", tensorflow/tensorflow#53140); across worker processes, XLA has no CPU
  collectives ("Collectives are not yet implemented for CPU devices when
  compiling with XLA"). One replica compiles on a CPU; GPUs and TPUs compile
  any number."""
  if jit_compile and info.accelerator == "cpu" and info.replicas > 1:
    raise StrategyError(
        f"--jit_compile with --strategy={info.name} over {info.replicas} CPU replicas cannot run: "
        "TensorFlow's XLA has no multi-replica CPU support (one process compiles every replica "
        "for the first device; workers have no XLA collectives on CPU). Drop --jit_compile, or "
        "train one CPU replica (--strategy=default)")


def _check_tf_config(text: str) -> None:
  try:
    cfg = json.loads(text)
    cluster, task = cfg["cluster"], cfg["task"]
    task["type"], int(task["index"])
  except (ValueError, KeyError, TypeError) as e:
    raise StrategyError(
        f"--strategy=multi_worker: TF_CONFIG is not valid ({_one_line(e)}); expected "
        '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}') from e
  if not cluster.get("worker") and not cluster.get("chief"):
    raise StrategyError("--strategy=multi_worker: TF_CONFIG's cluster lists no workers")


def _tpu_strategy(tpu: str) -> tf.distribute.Strategy:
  where = tpu or "local"
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)
    if where != "local":
      tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    strategy = tf.distribute.TPUStrategy(resolver)
  except Exception as e:  # noqa: BLE001 - any failure means "no usable TPU"; say why, never fall back.
    raise StrategyError(f"--strategy=tpu: no TPU found at '{where}' ({type(e).__name__}: {_one_line(e)})") from e
  return strategy


def describe(strategy: tf.distribute.Strategy, name: str = "") -> StrategyInfo:
  """Replicas, devices and this worker's role, for logs and config.json."""
  resolver = getattr(strategy, "cluster_resolver", None)
  task_type = task_id = None
  num_workers, is_chief_ = 1, True
  if resolver is not None and not isinstance(
      resolver, tf.distribute.cluster_resolver.TPUClusterResolver):
    spec = resolver.cluster_spec().as_dict()
    task_type = resolver.task_type
    task_id = None if resolver.task_id is None else int(resolver.task_id)
    num_workers = max(1, len(spec.get("worker", [])) + len(spec.get("chief", [])))
    # With a "chief" task it writes; without one, worker 0 does (Keras' convention).
    if spec.get("chief"):
      is_chief_ = task_type == "chief"
    elif task_type is not None:
      is_chief_ = task_type == "worker" and task_id == 0
  return StrategyInfo(
      name=name or type(strategy).__name__,
      cls=type(strategy).__name__,
      replicas=int(strategy.num_replicas_in_sync),
      devices=_worker_devices(strategy),
      num_workers=num_workers,
      task_type=task_type,
      task_id=task_id,
      is_chief=is_chief_,
      accelerator=accelerator(strategy),
  )


def _worker_devices(strategy: tf.distribute.Strategy) -> tuple:
  try:
    return tuple(strategy.extended.worker_devices)
  except (RuntimeError, AttributeError):  # the default strategy has no device list
    gpus = tf.config.list_logical_devices("GPU")
    return ((gpus or tf.config.list_logical_devices("CPU"))[0].name,)


def accelerator(strategy: tf.distribute.Strategy) -> str:
  """'tpu', 'gpu' or 'cpu': the kind of device the replicas run on."""
  if isinstance(strategy, (tf.distribute.TPUStrategy,)):
    return "tpu"
  if any("GPU" in d.upper() for d in _worker_devices(strategy)):
    return "gpu"
  return "cpu"


def chief_from_env(name: str) -> bool:
  """Before any strategy starts: is this process the chief (the one that owns the run
  directory)? Always for single-worker strategies; under multi_worker, the TF_CONFIG task
  "chief", or worker 0 when the cluster has no chief."""
  if name != "multi_worker" or "TF_CONFIG" not in os.environ:
    return True
  try:
    conf = json.loads(os.environ["TF_CONFIG"])
    task, cluster = conf.get("task", {}), conf.get("cluster", {})
  except (ValueError, AttributeError):
    return True   # get_strategy reports the bad TF_CONFIG
  if task.get("type") == "chief":
    return True
  return "chief" not in cluster and task.get("type") == "worker" and int(task.get("index", 0)) == 0


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True for the one worker that writes shared outputs (always True single-worker)."""
  return describe(strategy).is_chief


def per_replica_batch(global_batch: int, strategy: tf.distribute.Strategy | int) -> int:
  """The batch each replica sees; the global batch must divide evenly."""
  replicas = strategy if isinstance(strategy, int) else strategy.num_replicas_in_sync
  if global_batch < replicas or global_batch % replicas:
    raise StrategyError(
        f"--batch_size={global_batch} is the global batch and must be a multiple of the "
        f"{replicas} replicas (e.g. --batch_size={max(1, global_batch // replicas) * replicas or replicas})")
  return global_batch // replicas


def mixed_precision_policy(setting: str, strategy: tf.distribute.Strategy) -> str:
  """Keras policy name for --mixed_precision: auto = bfloat16 on TPU, float16 on GPU, off on CPU."""
  if setting == "auto":
    setting = {"tpu": "bfloat16", "gpu": "float16"}.get(accelerator(strategy), "off")
  return {"off": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[setting]
