"""Prints a run's headline: what was trained, how fast, and how well.

  python -m xraytpu.summary RUN_DIR
  python -m xraytpu.summary ENSEMBLE_DIR

Reads only files in the run directory (config.json, history.csv and every
eval/*/report.json); `make demo` ends with it. An ensemble's directory
(xraytpu.run.ensemble) is described the same way: its runs (each one's training line, and
whether it changed since the ensemble was made), its operating point and its eval reports.
"""

from __future__ import annotations

import statistics

from tfrecord_tools import cli, storage
from xraytpu import config, errors
from xraytpu.run import ensemble, reports, rundir


class SummaryError(errors.UserError):
  """The folder is not a run directory, or one of its files cannot be read."""


def _fmt_ci(value, ci) -> str:
  if value is None:
    return "n/a"
  if not ci or None in ci:
    return f"{value:.3f}"
  return f"{value:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})"


def summarize(run_dir: str) -> str:
  """The headline text of one run directory (or ensemble directory)."""
  if rundir.is_ensemble(run_dir):
    return _summarize_ensemble(run_dir)
  cfg = rundir.run_config(run_dir, run_dir)
  lines = [f"run:      {run_dir}",
           f"model:    {cfg.get('model')} at {cfg.get('image_size')} px, data {cfg.get('data_dir')}"]
  src = (cfg.get("run") or {}).get("init_from")   # xraytpu.training.transfer.Source.record
  if src:
    what = ", ".join(str(v) for v in (src.get("model"), src.get("task"), src.get("dataset")) if v)
    lines.append(f"start:    backbone warm-started (--init_from) from {src.get('run_dir')} ({what}; "
                 f"{src.get('layers')} layers copied)")
  rows = rundir.read_history(run_dir)
  if rows:
    lines.append(f"training: {_training(rows)}")
  lines += _status_lines(run_dir, cfg, rows)
  return "\n".join(lines + _eval_lines(run_dir))


def _training(rows: list[dict]) -> str:
  """history.csv in a few words: epochs, steady speed, the best val AUC."""
  speeds = [float(r["images_per_sec"]) for r in rows if r.get("images_per_sec")]
  # Steady state: the first epoch also decodes and fills the cache.
  steady = statistics.median(speeds[1:]) if len(speeds) > 1 else (speeds[0] if speeds else None)
  # Epochs whose loss became NaN/inf never count (rundir.best_row).
  best = rundir.best_row(rows, "val_auc")
  speed = f"{steady:.1f} images/sec (median after epoch 1)" if steady else "n/a"
  auc = (f"best val AUC {best['val_auc']:.3f} (epoch {int(best['epoch']) + 1})" if best
         else "no finite val AUC" if any("val_auc" in r for r in rows) else "no val AUC (no val split)")
  return f"{len(rows)} epochs, {speed}, {auc}"


def _eval_lines(run_dir: str) -> list[str]:
  """Each eval/*/report.json: the AUC, and the operating point's sensitivity and specificity."""
  lines = []
  for report_path in rundir.eval_report_paths(run_dir):
    r = reports.read(report_path)
    where = f"{r.get('dataset')}/{r.get('split')}, {r.get('num_examples')} images"
    lines.append(f"eval:     {where}: AUC {_fmt_ci(r.get('auc'), r.get('auc_ci'))}")
    if r.get("threshold") is not None and r.get("sensitivity") is not None:
      tta = f", --tta={r['tta']}" if r.get("tta") not in (None, config.DEFAULT_TTA) else ""
      lines.append(f"          at threshold {r['threshold']:.3f} ({r.get('threshold_policy')}, chosen on "
                   f"{r.get('threshold_source_split')}{tta}): sensitivity {_fmt_ci(r.get('sensitivity'), r.get('sensitivity_ci'))}, "
                   f"specificity {_fmt_ci(r.get('specificity'), r.get('specificity_ci'))}")
    lines.append(f"          report {storage.join(storage.dirname(report_path), rundir.EVAL_FILES['report_md'])} (plots beside it)")
  return lines


def _summarize_ensemble(ens_dir: str) -> str:
  """An ensemble's headline: its runs as a run's training is shown, its operating point, its
  evaluations. A run that is gone or changed since the ensemble was made is said (the
  ensemble is then refused by every command: xraytpu.run.ensemble.load)."""
  doc = ensemble.read(ens_dir)
  members = doc["members"]
  lines = [f"ensemble: {ens_dir}",
           f"model:    ensemble of {len(members)} runs, the {doc.get('combine') or ensemble.COMBINE}"]
  for m in members:
    cfg = rundir.read_config(m["path"]) if storage.isdir(m["path"]) else None
    if cfg is None:
      why = f"no {rundir.CONFIG}" if storage.isdir(m["path"]) else "no such folder"
      lines.append(f"run:      {m['path']}: MISSING ({why}): the ensemble cannot be used")
      continue
    rows = rundir.read_history(m["path"])
    training = f", {_training(rows)}" if rows else ""
    lines.append(f"run:      {m['path']}: {cfg.get('model')} at {cfg.get('image_size')} px{training}")
    if ensemble.changed(m):
      lines.append("          CHANGED since the ensemble was made (its weights are not those "
                   f"recorded): the ensemble is refused; delete {ens_dir} and make it again")
    lines += [f"          {line.split(':', 1)[1].strip()}" for line in _status_lines(m["path"], cfg, rows)]
  op = rundir.read_operating_point(ens_dir)
  if not op:
    lines.append(f"threshold: none yet (python -m xraytpu.evaluate --model_dir={ens_dir} chooses one "
                 "on val)")
  return "\n".join(lines + _eval_lines(ens_dir))


def _status_lines(run_dir: str, doc: dict, rows: list[dict]) -> list[str]:
  """What went wrong, when something did: a diverged, failed, unfinished or collapsed run."""
  status, info = doc.get("status"), doc.get("run") or {}
  has_best = storage.exists(rundir.path(run_dir, rundir.BEST_WEIGHTS))
  if info.get("diverged"):
    d = info["diverged"]
    kept = (f"{rundir.BEST_WEIGHTS} holds an earlier epoch's finite weights" if has_best else
            "no finite checkpoint: predict, evaluate, export and serve refuse this run")
    return [f"status:   DIVERGED: the training loss became NaN/inf in epoch {int(d.get('epoch', 0)) + 1} "
            f"(step {d.get('step')}); {kept}; retrain with a lower --learning_rate"]
  if status == "failed":
    return [f"status:   FAILED: {info.get('failure') or 'no reason recorded'}; fix it and run the "
            "same command again to resume"]
  if status == "running":
    return ["status:   unfinished (training is running, or stopped without a word: run the same "
            "command again to resume)"]
  collapsed = info.get("collapsed") or rundir.collapse_of(doc, rows)
  return [f"status:   WARNING: {collapsed}"] if collapsed else []


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise SummaryError("expected one argument, the run directory: python -m xraytpu.summary RUN_DIR")
  print(summarize(argv[1]))


def run() -> None:
  cli.run(main)


if __name__ == "__main__":
  run()
