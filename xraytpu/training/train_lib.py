"""Training: strategy + dataset.json + model -> a run directory.

`train_and_evaluate(cfg)` is what `python -m xraytpu.train` calls:

  1. check the run directory (a finished run is kept unless cfg.overwrite; an
     unfinished one with the same settings is resumed),
  2. start the strategy (xraytpu.training.distribute), set the mixed-precision policy,
  3. read dataset.json: task, classes, class weights, initial output bias, steps/epoch;
     the train and val datasets (xraytpu.training.inputs),
  4. build and compile the model inside `strategy.scope()`,
  5. fit phase 1 (backbones frozen when pretrained), then optionally phase 2
     (fine-tune from --fine_tune_at at --fine_tune_learning_rate); with --init_from the
     backbone starts from an earlier run's weights (xraytpu.training.transfer),
  6. write the final model and mark the run finished (xraytpu.run.rundir).

The run directory (`cfg.model_dir`, local or gs://): its layout, and every
read and write of it, are `xraytpu.run.rundir`'s.

Preemption: kill the process at any moment and run the same command again;
BackupAndRestore restores weights, optimizer and epoch of the last completed
epoch, the history drops rows of epochs that will be redone, and the run ends
with the configured number of epochs; EarlyStopping / ReduceLROnPlateau keep
their patience counters (callbacks.PlateauState). A gs:// run directory is trained in a
local copy that the chief pushes after every epoch (tfrecord_tools.storage.Mirror).

TensorBoard: Keras' callback on the chief writes RUN/logs (callbacks.tensorboard;
--profile_steps adds a profiler trace). On Vertex AI (`vertex_env`): $AIP_MODEL_DIR is
the run directory when --model_dir is empty, $AIP_TENSORBOARD_LOG_DIR takes the events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import gc
import hashlib
import math
import os
import platform
import sys
import tempfile
import time
from typing import Any

from absl import logging
import numpy as np
import tensorflow as tf

import tfrecord_tools
from xraytpu.training import distribute, inputs, multilabel, transfer
from xraytpu import errors
from xraytpu.run import films, rundir
from xraytpu import models as models_lib
from xraytpu._keras import keras
from xraytpu.training.callbacks import StopOnNaN, _save_and_discard, make_callbacks, parse_profile_steps
from xraytpu.training.callbacks import writing
from xraytpu.config import Config, LEGACY_VALUES
from xraytpu.data import DataError
from xraytpu.data import integrity
from xraytpu.data import stats
from xraytpu.data import tfds_source
from xraytpu.models import applications
from tfrecord_tools import errors as tools_errors
from tfrecord_tools import locks
from tfrecord_tools import pixels
from tfrecord_tools import schema
from tfrecord_tools import storage


# Config fields that may differ when an unfinished run is resumed: where and
# how it runs, not what it trains.
RESUME_MAY_CHANGE = frozenset({
    "overwrite", "strategy", "tpu", "cache", "cache_dir", "deterministic", "private_threads",
    "ram_budget_mb", "data_service_address", "data_dir", "mixed_precision",
    "jit_compile", "steps_per_execution", "shuffle_buffer", "profile_steps", "model_license",
})

# Vertex AI custom training sets these (cloud.google.com/vertex-ai/docs/training/code-requirements):
# with no --model_dir, $AIP_MODEL_DIR is the run directory; when set, TensorBoard
# events go to $AIP_TENSORBOARD_LOG_DIR instead of RUN/logs (see `vertex_env`).
AIP_MODEL_DIR = "AIP_MODEL_DIR"
AIP_TENSORBOARD_LOG_DIR = "AIP_TENSORBOARD_LOG_DIR"


class TrainError(errors.UserError):
  """A usage problem (bad flag combination, run dir state): one line for the user."""


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite; the run stops without a model.keras, marked "failed"
  with "diverged": {"epoch", "step"} in config.json (its best checkpoint, if any, is of an
  earlier epoch with finite weights)."""
  exit_code = 3   # tfrecord_tools.cli.run exits with it (docs/cli.md: exit codes)

  def __init__(self, message: str, epoch: int = 0, step: int = 0):
    super().__init__(message)
    self.epoch, self.step = epoch, step


# Errors that are the user's to fix: entry points print the one-line message
# and exit non-zero instead of showing a traceback.
USAGE_ERRORS = (TrainError, transfer.TransferError, distribute.StrategyError, models_lib.ModelError,
                schema.ManifestError, DataError, storage.StorageError)


@dataclasses.dataclass
class TrainResult:
  """What `train_and_evaluate` returns."""
  model: keras.Model          # the trained model (last epoch's weights)
  history: list[dict]         # history.csv rows (all epochs, resumed ones included)
  run_dir: str
  config: Config              # the resolved config
  strategy: distribute.StrategyInfo


# ---------------------------------------------------------------------------
# Run directory state
# ---------------------------------------------------------------------------

def _config_differences(old: dict, new: Config) -> list[str]:
  diffs = []
  old = {**LEGACY_VALUES, **old}
  for key, value in new.to_dict().items():
    if key in RESUME_MAY_CHANGE or key not in old:
      continue
    if old[key] != value:
      diffs.append(f"{key}: {old[key]!r} -> {value!r}")
  return diffs


def prepare_run_dir(cfg: Config, chief: bool = True, run_dir: str = "",
                    data: dict | None = None, before_fresh=None) -> str:
  """Decides fresh / resume / refuse. Returns "fresh" or "resume".

  run_dir: where the files are (a gs:// run's local copy), default cfg.model_dir.
  data: the training data's fingerprint (schema.data_fingerprint): an unfinished run
  trained on other data is not resumed (the same data elsewhere, e.g. a gs:// copy, is).
  before_fresh: called (no arguments) when the run will start fresh, before an old run
  is deleted: its error refuses the run and keeps the old one (--init_from's checks).
  Only the chief deletes an old run (--overwrite); other workers just go on.
  """
  run_dir = run_dir or cfg.model_dir
  before_fresh = before_fresh or (lambda: None)
  old = rundir.read_config(run_dir)
  if old is None:
    before_fresh()
    return "fresh"
  if old.get("status") == "finished":
    if not cfg.overwrite:
      raise TrainError(f"--model_dir={cfg.model_dir} holds a finished run; pass --overwrite to "
                       "replace it or choose another --model_dir")
    before_fresh()
    logging.warning("--overwrite: replacing the finished run in %s", cfg.model_dir)
    if chief:
      rundir.clear(run_dir)
    return "fresh"
  diffs = _config_differences(old, cfg)
  old_data = (old.get("run") or {}).get("data")
  if data is not None and old_data is not None:
    diffs += [f"data: {d}" for d in schema.fingerprint_differences(old_data, data)]
  if diffs:
    if not cfg.overwrite:
      raise TrainError(f"--model_dir={cfg.model_dir} holds an unfinished run with other settings "
                       f"({'; '.join(diffs[:4])}); rerun with the same flags to resume, pass "
                       "--overwrite to start over, or choose another --model_dir")
    before_fresh()
    logging.warning("--overwrite: discarding the unfinished run in %s (%s)", cfg.model_dir, "; ".join(diffs))
    if chief:
      rundir.clear(run_dir)
    return "fresh"
  logging.info("Resuming the unfinished run in %s", cfg.model_dir)
  return "resume"


# ---------------------------------------------------------------------------
# Config checks and resolution
# ---------------------------------------------------------------------------

def vertex_env(cfg: Config, environ=None) -> tuple[Config, str]:
  """Vertex AI's conventions, when its variables are set: (cfg, TensorBoard log folder).

  An empty --model_dir becomes $AIP_MODEL_DIR (an explicit --model_dir wins);
  the log folder is $AIP_TENSORBOARD_LOG_DIR, or "" = RUN/logs.
  """
  environ = os.environ if environ is None else environ
  model_dir = environ.get(AIP_MODEL_DIR, "").strip()
  if not cfg.model_dir and model_dir:
    logging.info("--model_dir not given: using $%s=%s as the run directory", AIP_MODEL_DIR, model_dir)
    cfg = dataclasses.replace(cfg, model_dir=model_dir.rstrip("/"))
  log_dir = environ.get(AIP_TENSORBOARD_LOG_DIR, "").strip()
  if log_dir:
    logging.info("TensorBoard logs go to $%s=%s", AIP_TENSORBOARD_LOG_DIR, log_dir)
  return cfg, log_dir.rstrip("/")


def validate_config(cfg: Config) -> None:
  """Flag combinations that cannot work, as one-line TrainErrors."""
  if not cfg.data_dir:
    raise TrainError("--data_dir is required (a folder written by tfrecord_tools.convert)")
  if not cfg.model_dir:
    raise TrainError("--model_dir is required (the run directory)")
  if cfg.model not in models_lib.MODELS:
    raise TrainError(f"--model={cfg.model}: unknown model (choose one of {', '.join(models_lib.MODELS)})")
  if cfg.epochs < 1:
    raise TrainError(f"--epochs must be >= 1, got {cfg.epochs}")
  if cfg.batch_size < 1:
    raise TrainError(f"--batch_size must be >= 1, got {cfg.batch_size}")
  if cfg.steps_per_epoch < 0:
    raise TrainError(f"--steps_per_epoch must be >= 0 (0 = one pass over the train split), got {cfg.steps_per_epoch}")
  if cfg.steps_per_execution < 1:
    raise TrainError(f"--steps_per_execution must be >= 1, got {cfg.steps_per_execution}")
  if cfg.pixel_contract not in pixels.READ_CONTRACTS:
    raise TrainError(f"--pixel_contract={cfg.pixel_contract}: this version reads "
                     f"{' or '.join(map(str, pixels.READ_CONTRACTS))} (leave it at its default, "
                     f"{pixels.CONTRACT_VERSION}, unless reproducing an old run)")
  if not 0.0 <= cfg.label_smoothing < 1.0:
    raise TrainError(f"--label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
  if not 0.0 <= cfg.ema_decay < 1.0:
    raise TrainError(f"--ema_decay must be in [0, 1) (0 = off), got {cfg.ema_decay}")
  if not 0.0 <= cfg.low_resolution_range < 1.0:
    raise TrainError("--low_resolution_range must be in [0, 1) (the smallest side as a fraction of "
                     f"--image_size; 0 = off), got {cfg.low_resolution_range}")
  for name in ("mixup_alpha", "cutmix_alpha"):
    if not getattr(cfg, name) >= 0.0:
      raise TrainError(f"--{name} must be >= 0 (0 = off), got {getattr(cfg, name)}")
  if cfg.learning_rate <= 0:
    raise TrainError(f"--learning_rate must be > 0, got {cfg.learning_rate}")
  is_backbone = cfg.model in applications.BACKBONES
  if not is_backbone and cfg.weights not in ("none", ""):
    raise TrainError(f"--weights={cfg.weights} applies to backbone models "
                     f"({', '.join(applications.BACKBONES)}); {cfg.model} trains from scratch")
  if cfg.init_from and cfg.weights not in ("none", ""):
    raise TrainError(f"--init_from and --weights={cfg.weights} both give the backbone its starting "
                     "weights: pass one")
  if cfg.init_from and rundir.same_dir(cfg.init_from, cfg.model_dir):
    raise TrainError(f"--init_from={cfg.init_from} is this run's own --model_dir: name an earlier run")
  if cfg.fine_tune_at >= 0 or cfg.fine_tune_epochs > 0:
    if not is_backbone and not cfg.init_from:
      raise TrainError(f"--fine_tune_at/--fine_tune_epochs apply to backbone models, not {cfg.model} "
                       "(or to a run warm-started with --init_from)")
    if cfg.fine_tune_at < 0 or cfg.fine_tune_epochs < 1:
      raise TrainError("fine-tuning needs both --fine_tune_at >= 0 and --fine_tune_epochs >= 1")
  if cfg.reduce_lr_patience > 0 and (cfg.lr_schedule != "constant" or cfg.warmup_epochs > 0):
    raise TrainError("--reduce_lr_patience needs --lr_schedule=constant and --warmup_epochs=0 "
                     "(a schedule already sets the learning rate)")
  try:
    parse_profile_steps(cfg.profile_steps)
  except ValueError as e:
    raise TrainError(str(e)) from e


def _manifest_digest(data_dir: str) -> str:
  return hashlib.sha256(storage.read_bytes(schema.manifest_path(data_dir))).hexdigest()


def _versions() -> dict[str, str]:
  import sklearn  # noqa: PLC0415 - only for the version string
  return {"xraytpu": tfrecord_tools.__version__, "python": platform.python_version(),
          "tensorflow": tf.__version__, "tf_keras": keras.__version__,
          "numpy": np.__version__, "scikit-learn": sklearn.__version__}


# ---------------------------------------------------------------------------
# Optimizer, schedule, loss, metrics
# ---------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="xraytpu")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup to `peak`, then constant / exponential / cosine, per step.

    constant     peak
    exponential  peak * 0.1 ** (epochs_after_warmup / 20)   (the Keras TPU example)
    cosine       peak * 0.5 * (1 + cos(pi * t)), t from 0 to 1 over the remaining steps
  """

  def __init__(self, peak: float, kind: str, warmup_steps: int, total_steps: int,
               steps_per_epoch: int):
    super().__init__()
    self.peak, self.kind = float(peak), kind
    self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)
    self.steps_per_epoch = int(steps_per_epoch)

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    peak = tf.constant(self.peak, tf.float32)
    warm = tf.constant(float(max(self.warmup_steps, 0)), tf.float32)
    after = tf.maximum(step - warm, 0.0)
    if self.kind == "exponential":
      lr = peak * tf.pow(0.1, after / (20.0 * max(self.steps_per_epoch, 1)))
    elif self.kind == "cosine":
      span = float(max(self.total_steps - self.warmup_steps, 1))
      t = tf.minimum(after / span, 1.0)
      lr = peak * 0.5 * (1.0 + tf.cos(math.pi * t))
    else:
      lr = peak
    if self.warmup_steps > 0:
      lr = tf.where(step < warm, peak * (step + 1.0) / warm, lr)
    return lr

  def get_config(self):
    return {"peak": self.peak, "kind": self.kind, "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch}


def make_optimizer(name: str, learning_rate, weight_decay: float = 0.0, ema_decay: float = 0.0):
  """The optimizer; ema_decay > 0 keeps an exponential moving average of the weights.

  EMA is tf-keras' own (`use_ema=True, ema_momentum=decay`: every optimizer keeps the
  averages as its variables, updated inside the train step under every strategy, saved
  by BackupAndRestore, and swapped into the model at the end of `fit` by
  `finalize_variable_values`) rather than a hand-written average; the callbacks swap
  them in for validation and the best checkpoint (`callbacks.ema_weights`, `EmaValidation`).
  """
  wd = weight_decay or None
  ema = dict(use_ema=True, ema_momentum=float(ema_decay)) if ema_decay > 0 else {}
  if name == "adam":
    return keras.optimizers.Adam(learning_rate, **ema)
  if name == "adamw":
    return keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay or 0.004, **ema)
  if name == "sgd":
    return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True, weight_decay=wd, **ema)
  if name == "rmsprop":
    return keras.optimizers.RMSprop(learning_rate, weight_decay=wd, **ema)
  raise TrainError(f"--optimizer={name}: unknown optimizer (adam, adamw, sgd, rmsprop)")


def make_learning_rate(cfg: Config, steps_per_epoch: int):
  if cfg.lr_schedule == "constant" and cfg.warmup_epochs <= 0:
    return cfg.learning_rate  # a plain float so ReduceLROnPlateau can change it
  return WarmupSchedule(cfg.learning_rate, cfg.lr_schedule,
                        warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)),
                        total_steps=cfg.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch)


def make_loss(num_classes: int, label_smoothing: float, *, task: str = stats.SINGLE_LABEL,
              pos_weight=None):
  """Binary / categorical cross-entropy; multi-label: the masked BCE with optional
  per-finding positive weights (xraytpu.training.multilabel.MaskedBinaryCrossentropy)."""
  if task == stats.MULTI_LABEL:
    return multilabel.MaskedBinaryCrossentropy(pos_weight=pos_weight, label_smoothing=label_smoothing)
  if num_classes == 2:
    return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
  return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)


def make_metrics(num_classes: int, *, task: str = stats.SINGLE_LABEL,
                 findings: list[str] | None = None) -> list:
  """accuracy, precision, recall, ROC AUC ("auc") and PR AUC ("pr_auc").

  Multi-class: one-hot labels, precision/recall/AUC micro-averaged over classes.
  Multi-label: "auc", the mean over findings of each finding's ROC AUC, and
  "auc_<finding>" per finding (xraytpu.training.multilabel.metric_names), all over
  labelled entries only.
  """
  if task == stats.MULTI_LABEL:
    return multilabel.make_metrics(list(findings or []))
  # float32 whatever the mixed-precision policy: under a strategy, metric variables are
  # sync-on-read, and the policy's AutoCastVariable wrapper cannot be read (sliced) inside
  # result() there (PR AUC's interpolation fails with "read_value() inside
  # variable_sync_on_read_context"). Counts want float32 anyway.
  f32 = dict(dtype="float32")
  acc = (keras.metrics.BinaryAccuracy(name="accuracy", **f32) if num_classes == 2
         else keras.metrics.CategoricalAccuracy(name="accuracy", **f32))
  return [acc, keras.metrics.Precision(name="precision", **f32),
          keras.metrics.Recall(name="recall", **f32), keras.metrics.AUC(name="auc", **f32),
          keras.metrics.AUC(curve="PR", name="pr_auc", **f32)]


def compile_model(model: keras.Model, cfg: Config, *, learning_rate, num_classes: int,
                  jit_compile: bool, task: str = stats.SINGLE_LABEL,
                  findings: list[str] | None = None, pos_weight=None) -> None:
  """Optimizer, loss and metrics; multi-label takes the findings and optional positive weights."""
  model.compile(optimizer=make_optimizer(cfg.optimizer, learning_rate, cfg.weight_decay,
                                         cfg.ema_decay),
                loss=make_loss(num_classes, cfg.label_smoothing, task=task, pos_weight=pos_weight),
                # Weighted: validation pads its last steps with weight-0 examples
                # (input_pipeline.eval_plan), and Keras applies sample weights only to
                # `weighted_metrics`. Training with --class_weight=balanced therefore
                # logs class-weighted training accuracy/precision (ROC AUC is unchanged
                # by per-class weights); validation carries no class weights.
                weighted_metrics=make_metrics(num_classes, task=task, findings=findings),
                steps_per_execution=cfg.steps_per_execution,
                jit_compile=jit_compile)


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------

def _log_lines(text: str, level: int = logging.INFO) -> None:
  for line in text.rstrip().splitlines():
    logging.log(level, "%s", line)


def _summary(model: keras.Model) -> str:
  lines: list[str] = []
  model.summary(print_fn=lambda s, **_: lines.append(s), expand_nested=False)
  return "\n".join(lines)


def train_and_evaluate(cfg: Config, *, strategy: tf.distribute.Strategy | None = None,
                       verbose: int | str = 1) -> TrainResult:
  """Trains `cfg.model` on `cfg.data_dir` into `cfg.model_dir` (see the module docstring).

  A gs:// run directory is trained in a local copy (storage.Mirror): pulled
  first (a resume needs the backup), pushed by the chief after every epoch and
  at the end, so Keras and TensorFlow only ever write local files.

  Args:
    cfg: the run's Config (augmentation preset already resolved by the caller).
    strategy: a started strategy; None builds `cfg.strategy` via xraytpu.training.distribute.
    verbose: Keras fit verbosity for the chief (progress bar = 1).
  Raises:
    TrainError / StrategyError / ModelError / ManifestError / StorageError
    (ValueErrors): usage problems.
    TrainingDiverged: the loss became NaN/inf.
  """
  t_start = time.perf_counter()
  cfg, log_dir = vertex_env(cfg)
  validate_config(cfg)
  if tfds_source.is_tfds(cfg.data_dir):   # tfds:NAME -> its converted copy, made once
    cfg = dataclasses.replace(cfg, data_dir=tfds_source.materialise(
        cfg.data_dir, tfds_data_dir=cfg.tfds_data_dir, tfds_manual_dir=cfg.tfds_manual_dir,
        cache_dir=cfg.tfds_cache_dir))
  # One process owns the run directory: the chief holds its lock until the run ends
  # (a second trainer fails at once naming the holder; a killed holder's lock is taken over).
  chief = distribute.chief_from_env(cfg.strategy)
  with contextlib.ExitStack() as owned:
    if chief:   # a --model_dir that cannot be created or written: one line naming it
      with rundir.writing(cfg.model_dir, "choose a --model_dir this user can write"):
        owned.enter_context(locks.exclusive(cfg.model_dir, "xraytpu.train"))
    return _train_owned(cfg, strategy=strategy, verbose=verbose, t_start=t_start, log_dir=log_dir)


def _train_owned(cfg: Config, *, strategy, verbose, t_start: float, log_dir: str = "") -> TrainResult:
  """train_and_evaluate with the run directory's lock held (by the chief)."""
  old = rundir.read_config(cfg.model_dir)
  if old is not None and old.get("status") == "finished" and not cfg.overwrite:
    prepare_run_dir(cfg, chief=False)  # raises the "finished run" error before any slow setup
  mirror = storage.Mirror(cfg.model_dir)
  if mirror.active:
    t = time.perf_counter()
    n = mirror.pull(exclude=(locks.LOCK_NAME,))
    logging.info("Run directory %s: training in the local copy %s (%d file(s) pulled in %.1f s); "
                 "changes are pushed after every epoch", cfg.model_dir, mirror.local, n,
                 time.perf_counter() - t)
  # $AIP_TENSORBOARD_LOG_DIR (usually gs://): written locally, pushed by the chief after every epoch.
  log_mirror = storage.Mirror(log_dir) if log_dir else None
  finished = False
  try:
    try:
      result = _train(cfg, strategy=strategy, verbose=verbose, mirror=mirror, t_start=t_start,
                      log_mirror=log_mirror)
    except Exception as e:  # noqa: BLE001 - only a full disk is turned into a line here
      # A full disk or quota met by a writer no wrapper names (e.g. Keras' own, inside fit):
      # one line naming the run directory. Everything else passes unchanged.
      cause = None if isinstance(e, errors.UserError) else tools_errors.write_failure(e, _DISK_FULL)
      if cause is None:
        raise
      with writing(cause.filename or cfg.model_dir):
        raise   # as WriteError, one line
    finished = True
  except errors.UserError as e:
    # Bad data (a corrupt shard, ...), a write that failed (a full disk): the run directory
    # records the failure instead of staying "running" (a rerun after the fix resumes). A
    # crash or a preemption leaves "running", as a kill would.
    _mark_failed(mirror.local, str(e))
    raise
  except TrainingDiverged as e:
    _mark_failed(mirror.local, str(e), diverged={"epoch": e.epoch, "step": e.step})
    raise
  finally:
    for m in (mirror, log_mirror):
      if m is None:
        continue
      try:
        m.push()   # the chief's last files; a no-op elsewhere
      except (OSError, storage.StorageError):
        if finished:
          raise
        logging.exception("Could not push the run directory to %s", m.remote)
      m.close()
  return result


# A full disk or quota: whichever writer meets it, it is one line (the others name their file).
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _mark_failed(run_dir: str, message: str, **details) -> None:
  """Marks the run failed with the error's first line; says so when even that cannot be written."""
  gc.collect()   # a failed writer's open files (h5py's on a full disk) are closed, their space freed
  if not rundir.mark_failed(run_dir, message.splitlines()[0][:500], **details):
    if (rundir.read_config(run_dir) or {}).get("status") == "running":
      logging.warning("Could not mark the run in %s failed (its config.json cannot be written): "
                      "it still says \"running\"", run_dir)


def _train(cfg: Config, *, strategy: tf.distribute.Strategy | None, verbose: int | str,
           mirror: storage.Mirror, t_start: float,
           log_mirror: storage.Mirror | None = None) -> TrainResult:
  """train_and_evaluate's body; files go to `mirror.local` (the run dir itself unless gs://),
  TensorBoard events to `log_mirror.local` when given (else RUN/logs)."""
  manifest = schema.read_manifest(cfg.data_dir)
  schema.split_info(manifest, "train")
  has_val = "val" in manifest["splits"] and manifest["splits"]["val"].get("num_examples", 0) > 0
  if strategy is None:
    strategy = distribute.get_strategy(cfg.strategy, tpu=cfg.tpu)
  info = distribute.describe(strategy, cfg.strategy)
  distribute.check_supported(info, jit_compile=cfg.jit_compile)
  per_replica = distribute.per_replica_batch(cfg.batch_size, strategy)
  global_batch = cfg.batch_size

  # ---- resolve what "auto"/0 mean for this data and hardware --------------
  task = stats.task(manifest)
  multi_label = task == stats.MULTI_LABEL
  classes = list(manifest["classes"])
  num_classes = len(classes)
  if multi_label and num_classes < 1:
    raise TrainError(f"{cfg.data_dir}: the multi-label data set names no findings")
  if not multi_label and num_classes < 2:
    raise TrainError(f"{cfg.data_dir}: the data set has {num_classes} class(es); need at least 2")
  channels = stats.input_channels(manifest, cfg)
  steps_per_epoch = cfg.steps_per_epoch or stats.steps_per_epoch(manifest, "train", global_batch, True)
  policy = distribute.mixed_precision_policy(cfg.mixed_precision, strategy)
  jit = bool(cfg.jit_compile or info.accelerator == "tpu")
  cfg = dataclasses.replace(cfg, channels=channels, steps_per_epoch=steps_per_epoch, jit_compile=jit)
  mirror.read_only = not info.is_chief
  if log_mirror is not None:
    log_mirror.read_only = not info.is_chief
  data = schema.data_fingerprint(manifest)
  source: list[transfer.Source] = []   # --init_from's run, loaded when this run needs its weights

  def load_source() -> None:   # before an old run is deleted: a bad --init_from keeps it
    source.append(transfer.load_source(cfg))

  mode = prepare_run_dir(cfg, info.is_chief, run_dir=mirror.local, data=data,
                         before_fresh=load_source if cfg.init_from else None)
  transfer_record = None
  if cfg.init_from and mode == "resume":
    if _has_saved_weights(mirror.local):   # the backup's weights win: the source is not read again
      transfer_record = ((rundir.read_config(mirror.local) or {}).get("run") or {}).get("init_from")
      logging.info("Resuming: the weights come from the run's own backup; --init_from=%s is not "
                   "applied again", cfg.init_from)
    else:   # stopped before its first epoch ended: nothing of its own to resume from
      load_source()

  logging.info("Batch: global %d = %d replica(s) x %d per replica; %d steps/epoch; policy %s; jit %s",
               global_batch, info.replicas, per_replica, steps_per_epoch, policy, jit)
  keras.mixed_precision.set_global_policy(policy)
  keras.utils.set_random_seed(cfg.seed)

  balanced = cfg.class_weight == "balanced"
  if multi_label:
    # K sigmoids on targets [multi_hot, mask]; weights per finding, inside the masked loss.
    label_mode, class_weights = "multi_label", None
    pos_weight = stats.positive_weights(manifest, "train") if balanced else None
    logging.info("Multi-label: %d findings; prevalence among labelled train entries: %s", num_classes,
                 ", ".join(f"{c} {p:.3f}" for c, p in zip(classes, stats.prevalence(manifest))))
  else:
    label_mode = "binary" if num_classes == 2 else "one_hot"
    class_weights = stats.class_weights(manifest, "train") if balanced else None
    pos_weight = None
  output_bias = np.asarray(stats.initial_bias(manifest), np.float32).reshape(-1)
  loss_kw = dict(task=task, findings=classes, pos_weight=pos_weight)
  train_ds, val_ds, val_steps = inputs.make_datasets(cfg, strategy, manifest, label_mode=label_mode,
                                                     class_weights=class_weights, has_val=has_val)
  monitor = "val_auc" if has_val else "auc"
  if not has_val:
    logging.warning("The data set has no 'val' split: the best checkpoint is chosen by training AUC.")

  with strategy.scope():
    model = models_lib.build_model(cfg, num_classes=num_classes, channels=channels,
                                   output_bias=output_bias, task=task)
    copied = transfer.copy_backbone(model, source[0], cfg) if source else None
    if cfg.init_from and cfg.fine_tune_at >= 0:   # phase 1 trains the new head alone
      models_lib.common.set_body_trainable(model, False)
    compile_model(model, cfg, learning_rate=make_learning_rate(cfg, steps_per_epoch),
                  num_classes=num_classes, jit_compile=jit, **loss_kw)
  if copied is not None:
    transfer_record = source[0].record(copied)
    logging.info("--init_from=%s: copied %d backbone layer(s) (%d weight tensors, %d parameters) "
                 "of its best weights (sha256 %s); the head and output are new%s", cfg.init_from,
                 copied["layers"], copied["tensors"], copied["params"],
                 source[0].weights_sha256[:12],
                 "; phase 1 trains them alone" if cfg.fine_tune_at >= 0 else "; every layer trains")
    source.clear()   # the source model is not needed any more
  _log_lines(_summary(model), logging.DEBUG)   # the layer table: with -v=1
  params = models_lib.common.count_params(model)
  logging.info("Parameters: %d total, %d trainable", params["total"], params["trainable"])

  run_dir = mirror.local
  chief = info.is_chief
  run_info: dict[str, Any] = {
      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join(sys.argv),
      "versions": _versions(),
      "strategy": info.to_dict(),
      "replicas": info.replicas,
      "global_batch": global_batch,
      "per_replica_batch": per_replica,
      "steps_per_epoch": steps_per_epoch,
      "mixed_precision_policy": policy,
      "jit_compile": jit,
      "data": data,     # schema.data_fingerprint: a resume on other data is refused
      "manifest": {"data_dir": cfg.data_dir, "sha256": _manifest_digest(cfg.data_dir),
                   "name": manifest.get("name"), "classes": classes,
                   "num_examples": {s: v.get("num_examples") for s, v in manifest["splits"].items()}},
      "num_classes": num_classes,
      "task": task,
      "label_mode": label_mode,
      "class_weight": {str(k): float(v) for k, v in (class_weights or {}).items()},
      "output_bias": output_bias.tolist(),
      "params": params,
      "monitor": monitor,
      "resumed": mode == "resume",
  }
  if transfer_record is not None:
    run_info["init_from"] = transfer_record   # transfer.Source.record: what the backbone started from
  if multi_label:
    # In `classes` order: each finding's history.csv column ("val_" + metric for
    # validation) and its training statistics.
    run_info["findings"] = [
        {"name": c, "metric": name, "prevalence": None if np.isnan(prev) else float(prev),
         "positive_weight": float(w)}
        for c, name, prev, w in zip(classes, multilabel.metric_names(classes).values(),
                                    stats.prevalence(manifest),
                                    pos_weight if pos_weight is not None else np.ones(num_classes))]
  if chief:
    with writing(rundir.path(run_dir, rundir.CHECKPOINTS)):
      storage.makedirs(rundir.path(run_dir, rundir.CHECKPOINTS))
    _write_json(cfg, run_dir, "running", run_info)
    with writing(rundir.path(run_dir, rundir.MANIFEST_COPY)):
      rundir.write_manifest_copy(run_dir, manifest)
    with writing(rundir.path(run_dir, rundir.TRAINING_FILMS)):   # what evaluate checks overlap with
      films.record(run_dir, cfg.data_dir, manifest)

  total_epochs = cfg.epochs + (cfg.fine_tune_epochs if cfg.fine_tune_at >= 0 else 0)
  nan = StopOnNaN()
  fit_kw = dict(steps_per_epoch=steps_per_epoch, validation_data=val_ds,
                validation_steps=val_steps,
                verbose=verbose if chief else 0)
  phase1_done = storage.exists(rundir.path(run_dir, rundir.PHASE1_WEIGHTS))
  log_kw = dict(log_dir=log_mirror.local, log_mirror=log_mirror) if log_mirror is not None else {}

  # ---- phase 1 ---------------------------------------------------------------
  if phase1_done:
    logging.info("Phase 1 finished before the restart: loading its final weights.")
    model.load_weights(rundir.path(run_dir, rundir.PHASE1_WEIGHTS))
  else:
    cbs = make_callbacks(cfg, run_dir, chief=chief, monitor=monitor, phase=1,
                         global_batch=global_batch, steps_per_epoch=steps_per_epoch,
                         total_epochs=total_epochs, best_so_far=_best(run_dir, monitor), nan=nan,
                         mirror=mirror, **log_kw)
    with integrity.named_data_errors(cfg.data_dir, manifest, ("train", "val")):
      model.fit(train_ds, epochs=cfg.epochs, callbacks=cbs, **fit_kw)
    _check_nan(nan, cfg.model_dir)

  # ---- phase 2: fine-tune the backbone ----------------------------------------
  if cfg.fine_tune_at >= 0:
    with strategy.scope():
      n = applications.set_fine_tune(model, cfg.fine_tune_at)
      compile_model(model, cfg, learning_rate=cfg.fine_tune_learning_rate,
                    num_classes=num_classes, jit_compile=jit, **loss_kw)
    logging.info("Phase 2: fine-tuning backbone layers from %d on (%d with weights) at lr %g, %d epochs; "
                 "%d trainable parameters", cfg.fine_tune_at, n, cfg.fine_tune_learning_rate,
                 cfg.fine_tune_epochs, models_lib.common.count_params(model)["trainable"])
    cbs = make_callbacks(cfg, run_dir, chief=chief, monitor=monitor, phase=2,
                         global_batch=global_batch, steps_per_epoch=steps_per_epoch,
                         total_epochs=total_epochs, best_so_far=_best(run_dir, monitor), nan=nan,
                         mirror=mirror, **log_kw)
    with integrity.named_data_errors(cfg.data_dir, manifest, ("train", "val")):
      model.fit(train_ds, initial_epoch=cfg.epochs, epochs=total_epochs, callbacks=cbs, **fit_kw)
    _check_nan(nan, cfg.model_dir)

  # ---- finish ------------------------------------------------------------------
  history = rundir.read_history(run_dir) if chief else []
  inference = keras.Model(model.inputs, model.outputs, name=model.name)
  # Every worker saves (see _save_weights_atomic); non-chief copies go to a temp dir.
  with writing(rundir.path(run_dir, rundir.MODEL)):
    _save_model_atomic(inference, rundir.path(run_dir, rundir.MODEL), chief)
  if chief:
    # BackupAndRestore already removed its state; drop the phase marker and folder
    storage.rmtree(rundir.path(run_dir, rundir.BACKUP))
  best_row = rundir.best_row(history, monitor) if chief else None
  best = None if best_row is None else float(best_row[monitor])
  best_epoch = None if best_row is None else best_row["epoch"]
  collapsed = rundir.collapse(history, monitor, num_classes, task) if chief else None
  run_info.update({
      "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "epochs_trained": len(history),
      "best": {"monitor": monitor, "value": best, "epoch": best_epoch},
      "seconds_this_session": round(time.perf_counter() - t_start, 1),
  })
  if collapsed:
    run_info["collapsed"] = collapsed
  if chief:
    _write_json(cfg, run_dir, "finished", run_info)
  logging.info("Done: %d epochs; best %s %s (epoch %s, counting from 1 as in the progress "
               "lines); run dir %s", len(history), monitor, "n/a" if best is None else f"{best:.4f}",
               "n/a" if best_epoch is None else int(best_epoch) + 1, cfg.model_dir)
  if collapsed:
    logging.warning("WARNING: %s (recorded in %s; xraytpu.summary and the model card say so too)",
                    collapsed, rundir.CONFIG)
  return TrainResult(model=model, history=history, run_dir=cfg.model_dir, config=cfg, strategy=info)


def _has_saved_weights(run_dir: str) -> bool:
  """Whether a resumed run restores weights of its own: phase 1's final weights, or a
  BackupAndRestore checkpoint of either phase."""
  return (storage.exists(rundir.path(run_dir, rundir.PHASE1_WEIGHTS))
          or any(storage.walk_files(rundir.backup_dir(run_dir, phase)) for phase in (1, 2)))


def _best(run_dir: str, monitor: str) -> float | None:
  """The best `monitor` value so far (rundir.best_row: epochs with a finite loss only)."""
  row = rundir.best_row(rundir.read_history(run_dir), monitor)
  return None if row is None else float(row[monitor])


def _check_nan(nan: StopOnNaN, run_dir: str) -> None:
  if nan.where is not None:
    epoch, batch = nan.where
    raise TrainingDiverged(
        f"the training loss became NaN/inf in epoch {epoch + 1} (step {batch}); the run in {run_dir} "
        "is marked failed and keeps no weights of that epoch: lower --learning_rate, try "
        "--mixed_precision=off, or check the data (python -m tfrecord_tools.inspect)",
        epoch=epoch, step=batch)


def _write_json(cfg: Config, run_dir: str, status: str, run_info: dict) -> None:
  doc = cfg.to_dict()
  doc["status"] = status
  doc["run"] = run_info
  with writing(rundir.path(run_dir, rundir.CONFIG)):
    rundir.write_config(run_dir, doc)


def _save_model_atomic(model: keras.Model, path: str, chief: bool = True) -> None:
  if not chief:
    _save_and_discard(model.save, rundir.MODEL)
    return
  if storage.is_remote(path):  # keras writes remote files through a local temp copy itself
    model.save(path)
    return
  fd, tmp = tempfile.mkstemp(suffix=".keras", prefix=".model.tmp-", dir=os.path.dirname(path) or ".")
  os.close(fd)
  try:
    model.save(tmp)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
