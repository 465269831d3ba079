"""The Keras callbacks of a training run (`xraytpu.training.train_lib` builds the list).

  make_callbacks(cfg, run_dir, ...)  the list for one phase, in the order that matters
  EpochSummary     lr / images_per_sec / epoch_seconds in the logs, one log line per epoch
  HistoryCSV       history.csv, rewritten each epoch, resume-aware (xraytpu.run.rundir reads and writes it)
  BestCheckpoint   checkpoints/best.weights.h5: the best epoch's weights, written atomically,
                   only from finite weights (a NaN/inf epoch never becomes "best")
  tensorboard      Keras' TensorBoard callback: epoch scalars (lr included), graph, profiler trace
  StopOnNaN        stops at the first NaN/inf loss and remembers where
  SaveOnTrainEnd   the phase's final weights, before BackupAndRestore deletes its state
  Backup           Keras' BackupAndRestore (the resume point), never of a diverged epoch
  EmaValidation    --ema_decay: validation sees the moving average of the weights
                   (`ema_weights`; BestCheckpoint saves it too)
  PlateauState     EarlyStopping / ReduceLROnPlateau counters across a resume
  PushRunDir       uploads the local copy of a gs:// run directory after every epoch

Every file these write goes through `rundir.writing`: a full disk, a quota or a folder
that cannot be written is one line naming the file and the cause (WRITE_HINT), and the
trainer marks the run failed; the last good state stays (atomic writes), so the same
command resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time

from absl import logging
import numpy as np

from xraytpu._keras import keras
from xraytpu.config import Config
from tfrecord_tools import storage
from xraytpu.run import rundir


def current_learning_rate(model: keras.Model) -> float:
  """The optimizer's learning rate now (a schedule evaluated at the current step)."""
  opt = model.optimizer
  opt = getattr(opt, "inner_optimizer", opt)  # LossScaleOptimizer under float16
  lr = opt.learning_rate
  if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
    lr = lr(opt.iterations)
  return float(keras.backend.get_value(lr))


def ema_optimizer(model: keras.Model):
  """The model's optimizer when it keeps a moving average of the weights and has built it
  (tf-keras' use_ema; under float16 the LossScaleOptimizer around it), else None."""
  opt = getattr(model, "optimizer", None)
  inner = getattr(opt, "inner_optimizer", opt)
  if not getattr(inner, "use_ema", False) or not getattr(inner, "_model_variables_moving_average", None):
    return None
  return opt


@contextlib.contextmanager
def ema_weights(model: keras.Model):
  """Inside the block the model's trainable variables hold their moving averages (--ema_decay),
  put there by the optimizer's own `finalize_variable_values` (what `fit` does at its end, under
  every strategy); the raw training weights come back after. A no-op without EMA."""
  opt = ema_optimizer(model)
  if opt is None:
    yield
    return
  variables = model.trainable_variables
  raw = [v.numpy() for v in variables]
  opt.finalize_variable_values(variables)
  try:
    yield
  finally:
    for v, value in zip(variables, raw):
      v.assign(value)


class EmaValidation(keras.callbacks.Callback):
  """--ema_decay: each epoch's validation scores the averaged weights (as Model Garden
  evaluates its EMA), so val_auc, the best epoch and checkpoints/best.weights.h5 are the
  averaged model's; training resumes on the raw weights after. The training metrics of
  the epoch are the raw weights'. At the end of `fit`, tf-keras puts the averages into the
  model for good (model.keras, the next phase)."""

  def __init__(self):
    super().__init__()
    self._swap = None

  def on_test_begin(self, logs=None):
    self._swap = ema_weights(self.model)
    self._swap.__enter__()

  def on_test_end(self, logs=None):
    if self._swap is not None:
      swap, self._swap = self._swap, None
      swap.__exit__(None, None, None)


class EpochSummary(keras.callbacks.Callback):
  """Adds lr / images_per_sec / epoch_seconds to the logs and prints one line per epoch."""

  def __init__(self, *, global_batch: int, steps_per_epoch: int, total_epochs: int, phase: str):
    super().__init__()
    self.global_batch, self.steps_per_epoch = global_batch, steps_per_epoch
    self.total_epochs, self.phase = total_epochs, phase
    self._t0 = self._t_train = None

  def on_epoch_begin(self, epoch, logs=None):
    self._t0, self._t_train = time.perf_counter(), None

  def on_test_begin(self, logs=None):
    if self._t0 is not None and self._t_train is None:
      self._t_train = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    logs = logs if logs is not None else {}
    now = time.perf_counter()
    train_s = (self._t_train or now) - self._t0
    ips = self.steps_per_epoch * self.global_batch / max(train_s, 1e-9)
    logs["lr"] = current_learning_rate(self.model)
    logs["images_per_sec"] = ips
    logs["epoch_seconds"] = now - self._t0
    train = " ".join(f"{k}={_fmt(logs[k])}" for k in ("loss", "accuracy", "auc") if k in logs)
    val = " ".join(f"{k}={_fmt(logs[k])}" for k in ("val_loss", "val_accuracy", "val_auc", "val_pr_auc")
                   if k in logs)
    logging.info("epoch %d/%d (%s): %.1fs, %.1f images/sec | %s | %s | lr=%.3g",
                 epoch + 1, self.total_epochs, self.phase, now - self._t0, ips, train, val or "no val",
                 logs["lr"])


def _fmt(v) -> str:
  return f"{float(v):.4f}"


# What a failed write of the run directory adds to its one line (rundir.writing).
WRITE_HINT = ("make room (or fix the permissions), then run the same command again: it resumes "
              "from the last finished epoch")


def writing(path: str):
  """rundir.writing with the trainer's hint: the one wrapper of the run's writers."""
  return rundir.writing(path, WRITE_HINT)


class HistoryCSV(keras.callbacks.Callback):
  """history.csv, rewritten atomically each epoch; on resume, rows from the
  restart epoch on are dropped (they will be trained again)."""

  def __init__(self, run_dir: str, enabled: bool = True, first_epoch: int = 0):
    super().__init__()
    self.run_dir, self.enabled, self.first_epoch = run_dir, enabled, first_epoch
    self.rows: list[dict] = []
    self._started = False

  def on_train_begin(self, logs=None):
    self.rows = rundir.read_history(self.run_dir)
    self._started = False

  def on_epoch_begin(self, epoch, logs=None):
    if not self._started:
      self.rows = [r for r in self.rows if int(r["epoch"]) < epoch]
      self._started = True
      if epoch > self.first_epoch:
        logging.info("Resuming at epoch %d: epochs 1..%d were restored from the backup", epoch + 1, epoch)

  def on_epoch_end(self, epoch, logs=None):
    row = {"epoch": epoch}
    row.update({k: float(v) for k, v in (logs or {}).items()})
    self.rows.append(row)
    if self.enabled:
      with writing(rundir.path(self.run_dir, rundir.HISTORY)):
        rundir.write_history(self.run_dir, self.rows)


def parse_profile_steps(text: str) -> tuple[int, int] | None:
  """--profile_steps: "" -> None (off), "N" -> (N, N), "START,END" -> (START, END).

  Steps count from 1 at the start of each phase's fit (Keras' profile_batch);
  raises ValueError unless 1 <= START <= END.
  """
  text = (text or "").strip()
  if not text:
    return None
  parts = [p.strip() for p in text.split(",")]
  try:
    steps = [int(p) for p in parts]
  except ValueError:
    steps = []
  if len(steps) == 1:
    steps = steps * 2
  if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
    raise ValueError(f"--profile_steps={text}: expected START,END (or one step N) with "
                     "1 <= START <= END, e.g. --profile_steps=10,20")
  return steps[0], steps[1]


def tensorboard(log_dir: str, profile_steps: str = "") -> keras.callbacks.TensorBoard:
  """Keras' own TensorBoard callback, writing into `log_dir` (a local folder):

    train/, validation/   one scalar per metric and epoch, tag "epoch_<metric>" (validation
                          without its "val_" prefix), step = epoch (from 0). EpochSummary
                          comes before it in the list, so its lr / images_per_sec /
                          epoch_seconds are scalars too: "epoch_lr" is the learning rate of
                          every epoch (schedule or not), the value history.csv's "lr" holds.
    train/                the model (Keras summary) and the train step's graph (Graphs tab)
    plugins/profile/      a profiler trace of --profile_steps (the Profile tab)

  View with `tensorboard --logdir RUN/logs` (or the runs' parent folder).
  """
  steps = parse_profile_steps(profile_steps)
  try:
    import tensorboard  # noqa: F401, PLC0415 - tf.summary.scalar and the callback need it
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("xraytpu.train writes TensorBoard logs: pip install 'tensorboard~=2.21.0' "
                      "(a dependency of xraytpu; see docs/workspace.md)") from e
  return _TensorBoard(log_dir, write_graph=True, update_freq="epoch", profile_batch=steps or 0)


class _TensorBoard(keras.callbacks.TensorBoard):
  """Keras' callback with one learning-rate scalar: EpochSummary's "lr" (the rate of the
  epoch's last step). Keras would add "epoch_learning_rate" for a schedule, evaluated one
  step later, a second and slightly different curve. Its event writers' failures (a full
  disk: ResourceExhaustedError) are one line naming the log folder (`writing`)."""

  def _collect_learning_rate(self, logs):
    return logs

  def on_train_begin(self, logs=None):
    with writing(self.log_dir):
      super().on_train_begin(logs)

  def on_train_end(self, logs=None):
    with writing(self.log_dir):
      super().on_train_end(logs)

  def on_epoch_end(self, epoch, logs=None):
    with writing(self.log_dir):
      super().on_epoch_end(epoch, logs)

  def on_train_batch_end(self, batch, logs=None):
    with writing(self.log_dir):
      super().on_train_batch_end(batch, logs)

  def on_test_end(self, logs=None):
    with writing(self.log_dir):
      super().on_test_end(logs)


class StopOnNaN(keras.callbacks.Callback):
  """Stops training at the first NaN/inf loss and remembers where."""

  def __init__(self):
    super().__init__()
    self.epoch, self.where = 0, None

  def on_epoch_begin(self, epoch, logs=None):
    self.epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    loss = (logs or {}).get("loss")
    if loss is not None and not np.isfinite(float(loss)):
      self.where = (self.epoch, batch)
      self.model.stop_training = True


class BestCheckpoint(keras.callbacks.Callback):
  """checkpoints/best.weights.h5: the weights of the epoch with the highest `monitor`
  (above `best_so_far`, the best of the epochs before a resume), like Keras' ModelCheckpoint
  with save_best_only, but written atomically (`_save_weights_atomic`: a temp file, then a
  rename; a failed write leaves the previous best whole) and only from finite weights: an
  epoch whose loss became NaN/inf, or whose weights hold a NaN/inf, is never the best.
  With --ema_decay the saved weights are the moving averages (`ema_weights`)."""

  def __init__(self, path: str, monitor: str, best_so_far: float | None, chief: bool,
               nan: "StopOnNaN"):
    super().__init__()
    self.path, self.monitor, self.chief, self.nan = path, monitor, chief, nan
    self.best = best_so_far

  def on_epoch_end(self, epoch, logs=None):
    value = (logs or {}).get(self.monitor)
    if value is None or self.nan.where is not None:
      return
    value = float(value)
    if not np.isfinite(value) or (self.best is not None and not value > self.best):
      return
    with ema_weights(self.model):
      bad = rundir.nonfinite_weights(self.model)
      if bad:
        logging.warning("Epoch %d: %s=%.4f but %d weight variable(s) hold NaN/inf (e.g. %s): not "
                        "saved as the best checkpoint", epoch + 1, self.monitor, value, len(bad),
                        bad[0])
        return
      _save_weights_atomic(self.model, self.path, self.chief)
    self.best = value


class SaveOnTrainEnd(keras.callbacks.Callback):
  """Saves the weights when a phase completes, before BackupAndRestore deletes its state."""

  def __init__(self, path: str, chief: bool, nan: StopOnNaN):
    super().__init__()
    self.path, self.chief, self.nan = path, chief, nan

  def on_train_end(self, logs=None):
    if self.nan.where is None:
      _save_weights_atomic(self.model, self.path, self.chief)


class PlateauState(keras.callbacks.Callback):
  """Carries the EarlyStopping / ReduceLROnPlateau counters across a resume.

  BackupAndRestore brings back weights, optimizer (learning rate included) and
  the epoch, but those two callbacks reset their patience in on_train_begin.
  This one saves their counters after every backup and puts them back when the
  phase resumes; it must come after them and after BackupAndRestore in the list.
  """

  FIELDS = {"EarlyStopping": ("wait", "best", "best_epoch"),
            "ReduceLROnPlateau": ("wait", "best", "cooldown_counter")}

  def __init__(self, path: str, callbacks: list, enabled: bool):
    super().__init__()
    self.path, self.callbacks, self.enabled = path, callbacks, enabled

  def on_train_begin(self, logs=None):
    if not storage.exists(self.path):
      return
    state = json.loads(storage.read_text(self.path))
    for cb in self.callbacks:
      for field, value in state.get(type(cb).__name__, {}).items():
        setattr(cb, field, value)
    logging.info("Resumed the patience counters: %s", state)

  def on_epoch_end(self, epoch, logs=None):
    if self.enabled:
      state = {type(cb).__name__: {f: float(getattr(cb, f)) if f == "best" else int(getattr(cb, f))
                                   for f in self.FIELDS[type(cb).__name__] if hasattr(cb, f)}
               for cb in self.callbacks}
      with writing(self.path):
        storage.write_text(self.path, json.dumps(state))


class Backup(keras.callbacks.BackupAndRestore):
  """Keras' BackupAndRestore (weights, optimizer and epoch after every epoch: the resume
  point), except after an epoch whose loss became NaN/inf: a rerun must not resume from
  NaN weights. Its writes are one line on failure (`writing`); tf.train.Checkpoint
  updates its index last, so a failed write leaves the previous backup usable."""

  def __init__(self, backup_dir: str, nan: "StopOnNaN"):
    super().__init__(backup_dir)
    self.nan = nan

  def on_train_begin(self, logs=None):
    with writing(self.backup_dir):
      super().on_train_begin(logs)

  def on_epoch_end(self, epoch, logs=None):
    if self.nan.where is not None:
      return
    with writing(self.backup_dir):
      super().on_epoch_end(epoch, logs)


class PushRunDir(keras.callbacks.Callback):
  """Uploads what changed in the local copy of a gs:// run directory after every
  epoch and when a phase ends (see tfrecord_tools.storage.Mirror)."""

  def __init__(self, mirror: storage.Mirror):
    super().__init__()
    self.mirror = mirror

  def _push(self, when: str) -> None:
    t = time.perf_counter()
    up, gone = self.mirror.push()
    logging.info("%s: pushed %d changed file(s), removed %d, to %s in %.1f s", when, up, gone,
                 self.mirror.remote, time.perf_counter() - t)

  def on_epoch_end(self, epoch, logs=None):
    self._push(f"epoch {epoch + 1}")

  def on_train_end(self, logs=None):
    self._push("phase end")


def _save_and_discard(save, name: str) -> None:
  """A non-chief worker's save: into a temp folder that is removed again."""
  tmp_dir = tempfile.mkdtemp(prefix="xraytpu-worker-")
  try:
    save(os.path.join(tmp_dir, name))
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)


def _save_weights_atomic(model: keras.Model, path: str, chief: bool = True) -> None:
  """Every worker must save (reading sync-on-read variables is a collective op
  under MultiWorkerMirroredStrategy); only the chief's file is kept."""
  if not chief:
    _save_and_discard(model.save_weights, "w.weights.h5")
    return
  tmp = path[:-len(".weights.h5")] + f".tmp-{os.getpid()}.weights.h5"
  try:
    with writing(path):
      model.save_weights(tmp)
      storage.rename(tmp, path)
  finally:
    if not storage.is_remote(tmp) and os.path.exists(tmp):
      # A half-written temp file (the disk filled): never left behind. Emptied first: HDF5
      # keeps a file open when its close fails, and an open file's space is not freed by
      # its removal alone (the run could not even be marked failed).
      with contextlib.suppress(OSError):
        os.truncate(tmp, 0)
      os.remove(tmp)


def make_callbacks(cfg: Config, run_dir: str, *, chief: bool, monitor: str, phase: int,
                   global_batch: int, steps_per_epoch: int, total_epochs: int,
                   best_so_far: float | None, nan: StopOnNaN,
                   mirror: storage.Mirror | None = None, log_dir: str = "",
                   log_mirror: storage.Mirror | None = None) -> list:
  """Order matters: summary (adds logs) -> CSV -> checkpoints -> ... -> backup,
  so a backup never exists for an epoch whose history row is missing; then the
  push of a gs:// run's local copy, so GCS gets each epoch's files together.

  Only the chief writes TensorBoard events: into `log_dir` (default RUN/logs of
  the local copy; the trainer passes $AIP_TENSORBOARD_LOG_DIR's local copy on
  Vertex AI), pushed after every epoch by `log_mirror` when that is a gs:// folder.
  """
  cbs: list = [EmaValidation()] if cfg.ema_decay > 0 else []
  cbs += [nan, EpochSummary(global_batch=global_batch, steps_per_epoch=steps_per_epoch,
                            total_epochs=total_epochs, phase=f"phase {phase}")]
  cbs.append(HistoryCSV(run_dir, enabled=chief,
                        first_epoch=0 if phase == 1 else cfg.epochs))
  cbs.append(BestCheckpoint(rundir.path(run_dir, rundir.BEST_WEIGHTS), monitor, best_so_far,
                            chief, nan))
  if chief:
    cbs.append(tensorboard(log_dir or rundir.path(run_dir, rundir.LOGS), cfg.profile_steps))
  plateau = []
  if cfg.early_stopping_patience > 0:
    plateau.append(keras.callbacks.EarlyStopping(monitor=monitor, mode="max",
                                                 patience=cfg.early_stopping_patience, verbose=1))
  if cfg.reduce_lr_patience > 0:
    plateau.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode="max", factor=0.5,
                                                     patience=cfg.reduce_lr_patience, verbose=1))
  cbs.extend(plateau)
  if phase == 1:
    cbs.append(SaveOnTrainEnd(rundir.path(run_dir, rundir.PHASE1_WEIGHTS), chief, nan))
  cbs.append(Backup(rundir.backup_dir(run_dir, phase), nan))
  if plateau:
    cbs.append(PlateauState(rundir.plateau_state(run_dir, phase), plateau, chief))
  for m in (mirror, log_mirror):
    if chief and m is not None and m.active:
      cbs.append(PushRunDir(m))
  return cbs
