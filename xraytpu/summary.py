"""Prints a run's headline: what was trained, how fast, and how well.

  python -m xraytpu.summary RUN_DIR

Reads only files in the run directory (config.json, history.csv and every
eval/*/report.json); `make demo` ends with it.
"""

from __future__ import annotations

import json
import statistics
import sys

from tfrecord_tools import storage
from xraytpu import rundir


def _fmt_ci(value, ci) -> str:
  if value is None:
    return "n/a"
  if not ci or None in ci:
    return f"{value:.3f}"
  return f"{value:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})"


def summarize(run_dir: str) -> str:
  """The headline text of one run directory."""
  cfg = rundir.read_config(run_dir)
  if cfg is None:
    raise FileNotFoundError(f"{run_dir} is not a run directory (no {rundir.CONFIG}): train first")
  lines = [f"run:      {run_dir}",
           f"model:    {cfg.get('model')} at {cfg.get('image_size')} px, data {cfg.get('data_dir')}"]
  rows = rundir.read_history(run_dir)
  if rows:
    speeds = [float(r["images_per_sec"]) for r in rows if r.get("images_per_sec")]
    # Steady state: the first epoch also decodes and fills the cache.
    steady = statistics.median(speeds[1:]) if len(speeds) > 1 else (speeds[0] if speeds else None)
    best = max((float(r["val_auc"]), i + 1) for i, r in enumerate(rows) if r.get("val_auc"))
    speed = f"{steady:.1f} images/sec (median after epoch 1)" if steady else "n/a"
    lines.append(f"training: {len(rows)} epochs, {speed}, best val AUC {best[0]:.3f} (epoch {best[1]})")
  for report_path in rundir.eval_report_paths(run_dir):
    r = json.loads(storage.read_text(report_path))
    where = f"{r.get('dataset')}/{r.get('split')}, {r.get('num_examples')} images"
    lines.append(f"eval:     {where}: AUC {_fmt_ci(r.get('auc'), r.get('auc_ci'))}")
    if r.get("threshold") is not None and r.get("sensitivity") is not None:
      lines.append(f"          at threshold {r['threshold']:.3f} ({r.get('threshold_policy')}, chosen on "
                   f"{r.get('threshold_source_split')}): sensitivity {_fmt_ci(r.get('sensitivity'), r.get('sensitivity_ci'))}, "
                   f"specificity {_fmt_ci(r.get('specificity'), r.get('specificity_ci'))}")
    lines.append(f"          report {storage.join(storage.dirname(report_path), rundir.EVAL_FILES['report_md'])} (plots beside it)")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  if len(argv) != 1:
    print("usage: python -m xraytpu.summary RUN_DIR", file=sys.stderr)
    return 2
  try:
    print(summarize(argv[0]))
  except (FileNotFoundError, json.JSONDecodeError, KeyError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
