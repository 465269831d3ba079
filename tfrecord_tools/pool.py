"""A process pool that survives a dying worker: `run(fn, tasks, num_workers, ...)`.

The converter writes each shard in a worker process. A worker can die under
it (the out-of-memory killer, a crash in a native image decoder), and Python's
`ProcessPoolExecutor` then breaks as a whole. `run` handles that:

  - the tasks run on a pool of `num_workers` processes (forkserver, else
    spawn); one worker or one task runs in this process, with no pool;
  - a broken pool: the unfinished tasks are run once more on a new pool; if
    that breaks too, `WorkersDied` says why (`death_cause`: "was killed by
    SIGKILL (the out-of-memory killer?)", ...) and how many tasks finished;
  - `recover(task)` takes a task that finished in the broken pool though its
    result was lost (e.g. its output is on disk) instead of running it again;
  - workers that re-ran a main script calling the pool again (no
    `if __name__ == "__main__":` guard) -> `UnguardedMain`, never a hang;
  - Ctrl-C or an exception in a task stops every worker before it returns;
  - workers end themselves when the process that started them dies.

Progress: a task calls `tick(n)` (from any process) as it advances; the
`progress(done)` callback sees the running total in this process.

Callers turn `WorkersDied` and `UnguardedMain` into their own user-facing
errors; they are not user errors by themselves.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
from concurrent import futures
from typing import Any, Callable, Sequence

UNGUARDED_MAIN = "re-ran an unguarded main script"   # a death_cause
# Exit status of a worker process that, while starting, re-ran the user's main
# script and reached the pool again: the script has no __main__ guard.
EXIT_UNGUARDED_MAIN = 87


class WorkersDied(RuntimeError):
  """A worker died in the first pool and again in the retry's pool."""

  def __init__(self, cause: str, num_finished: int, num_tasks: int):
    super().__init__(f"a worker process {cause} ({num_finished} of {num_tasks} tasks finished)")
    self.cause, self.num_finished, self.num_tasks = cause, num_finished, num_tasks


class UnguardedMain(RuntimeError):
  """The workers re-ran the main script `main`, which started the work again."""

  def __init__(self, main: str):
    super().__init__(f"the worker processes re-ran {main}")
    self.main = main


# --------------------------------------------------------------------------
# Inside a worker.
# --------------------------------------------------------------------------

_PROGRESS = None  # multiprocessing.Value in workers; a callable in-process


def tick(n: int = 1) -> None:
  """Adds `n` to the progress of the running `run` (a no-op outside one)."""
  if _PROGRESS is None:
    return
  if callable(_PROGRESS):
    _PROGRESS(n)
  else:
    with _PROGRESS.get_lock():
      _PROGRESS.value += n


def _init_worker(counter) -> None:
  """Starts a pool worker: `counter` is the shared progress Value `tick` adds to.

  The worker also ends itself when the starting process dies (SIGKILL, the
  out-of-memory killer): it would otherwise wait on the pool's queue forever,
  or finish its task behind the back of a rerun.
  """
  global _PROGRESS
  _PROGRESS = counter
  parent = mp.parent_process()
  if parent is not None:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent) -> None:
  parent.join()   # returns when the parent process is gone
  os._exit(1)


def exit_if_starting_worker() -> None:
  """Quietly ends a worker process that is still starting up and got here.

  Call it first thing in the function whose script starts the pool. spawn and
  forkserver workers first re-run the user's main script (as `__mp_main__`);
  a script that calls that function without an `if __name__ == "__main__":`
  guard would do all the work again in every worker, then fail to start a
  pool of its own (RuntimeError: "... before the current process has finished
  its bootstrapping phase"), and the real run's pool would wait forever.
  `death_cause` recognises the exit status.
  """
  if getattr(mp.current_process(), "_inheriting", False):   # multiprocessing's own test
    os._exit(EXIT_UNGUARDED_MAIN)


# --------------------------------------------------------------------------
# Why a pool broke.
# --------------------------------------------------------------------------


class _RecordingContext:
  """A multiprocessing context that keeps the processes it makes: their exit
  codes tell why a pool broke."""

  def __init__(self, ctx):
    self._ctx = ctx
    self.processes: list = []

  def __getattr__(self, name: str):
    return getattr(self._ctx, name)

  def Process(self, *args, **kwargs):  # noqa: N802 (multiprocessing's name)
    p = self._ctx.Process(*args, **kwargs)
    self.processes.append(p)
    return p


def death_cause(exitcodes: Sequence[int | None]) -> str:
  """Why a pool broke, from its workers' exit codes, e.g. "was killed by SIGKILL ...".

  The worker that died is the one not ended by the pool's own SIGTERM.
  """
  dead = [c for c in exitcodes if c not in (None, 0, -signal.SIGTERM)]
  if not dead:
    return ("was terminated (SIGTERM)" if -signal.SIGTERM in exitcodes
            else "stopped unexpectedly")
  code = dead[0]
  if code == EXIT_UNGUARDED_MAIN:
    return UNGUARDED_MAIN
  if code > 0:
    return f"exited with status {code}"
  try:
    name = signal.Signals(-code).name
  except ValueError:
    name = f"signal {-code}"
  crash = " (a crash in native code, e.g. an image decoder)"
  hint = {"SIGKILL": " (the out-of-memory killer?)", "SIGSEGV": crash, "SIGBUS": crash,
          "SIGABRT": crash, "SIGFPE": crash, "SIGILL": crash}.get(name, "")
  return f"was killed by {name}{hint}"


# --------------------------------------------------------------------------
# Running the tasks.
# --------------------------------------------------------------------------


def _run_pool(fn: Callable, tasks: list, num_workers: int, progress: Callable[[int], None],
              ctx, counter) -> tuple[list, list, str]:
  """Runs `tasks` (submitted in order) on a new pool of `num_workers` processes.

  Returns (results of the finished tasks, the unfinished tasks in their
  order, why the pool broke: a `death_cause`, "" when all finished). A
  task's exception (as opposed to its worker's death) is re-raised here.
  """
  rec = _RecordingContext(ctx)
  pool = futures.ProcessPoolExecutor(min(num_workers, len(tasks)), mp_context=rec,
                                     initializer=_init_worker, initargs=(counter,))
  results, unfinished = [], []
  ok = False
  try:
    pending = {}
    for i, t in enumerate(tasks):
      try:
        pending[pool.submit(fn, t)] = i
      except futures.BrokenExecutor:
        unfinished += range(i, len(tasks))
        break
    while pending:
      done, _ = futures.wait(pending, timeout=0.25, return_when=futures.FIRST_COMPLETED)
      for f in done:
        i = pending.pop(f)
        try:
          results.append(f.result())   # re-raises a task's unexpected error
        except futures.BrokenExecutor:
          unfinished.append(i)
      progress(counter.value)
    ok = True
  finally:
    pool.shutdown(wait=ok, cancel_futures=True)
    if not ok:   # an error or KeyboardInterrupt: stop the other tasks now
      for p in rec.processes:
        if p.is_alive():
          p.terminate()
      for p in rec.processes:
        if p.pid is not None:   # started
          p.join()
  cause = death_cause([p.exitcode for p in rec.processes]) if unfinished else ""
  return results, [tasks[i] for i in sorted(unfinished)], cause


def run(fn: Callable[[Any], Any], tasks: Sequence, num_workers: int, *,
        progress: Callable[[int], None] = lambda done: None,
        size: Callable[[Any], int] = lambda task: 1,
        recover: Callable[[Any], Any] = lambda task: None,
        log: Callable[[str], None] = lambda msg: None, noun: str = "task") -> list:
  """`[fn(t) for t in tasks]`, in worker processes, in order of completion.

  Args:
    fn: a module-level function (workers import it by name); it may call `tick`.
    tasks: picklable arguments of `fn`, submitted in this order.
    num_workers: processes; <= 1 (or a single task) runs in this process.
    progress: called with the total of the `tick`s so far.
    size: a task's share of that total, to reset it to the finished tasks' share
      before a retry.
    recover: a lost task's result when it finished anyway (None: run it again).
    log: told about a retry ("a worker process ...; trying the 2 unfinished
      <noun>s again").
  Raises:
    WorkersDied: a worker died in the retry too.
    UnguardedMain: the workers re-ran an unguarded main script.
    Whatever `fn` raised.
  """
  global _PROGRESS
  tasks = list(tasks)
  if num_workers <= 1 or len(tasks) <= 1:
    counter = [0]

    def bump(n):
      counter[0] += n
      progress(counter[0])
    _PROGRESS = bump
    try:
      return [fn(t) for t in tasks]
    finally:
      _PROGRESS = None

  method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
  ctx = mp.get_context(method)
  if method == "forkserver":
    ctx.set_forkserver_preload([fn.__module__])
  value = ctx.Value("q", 0)
  results, todo = [], tasks
  for attempt in (1, 2):
    new, todo, cause = _run_pool(fn, todo, num_workers, progress, ctx, value)
    results += new
    # A task can finish while the broken pool reports its future lost: take
    # its result as a rerun would, instead of running it again.
    saved = [(t, recover(t)) for t in todo]
    results += [r for _, r in saved if r is not None]
    todo = [t for t, r in saved if r is None]
    if not todo:
      break
    if cause == UNGUARDED_MAIN:
      raise UnguardedMain(getattr(sys.modules.get("__main__"), "__file__", None)
                          or "the main module")
    if attempt == 2:
      raise WorkersDied(cause, len(tasks) - len(todo), len(tasks))
    log(f"a worker process {cause}; trying the {len(todo)} unfinished "
        f"{noun}{'s' if len(todo) > 1 else ''} again")
    value.value = sum(size(t) for t in tasks) - sum(size(t) for t in todo)
  progress(value.value)
  return results
