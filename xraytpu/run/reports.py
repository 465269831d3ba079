"""A run's evaluation reports, read back: where they are named from, and their one-line headline.

RUN/eval/<dataset>-<split>/report.json is written by xraytpu.evaluation; what
reads it back (the model card, `xraytpu.summary`, `xraytpu.evaluate`'s last
line, the server's start-up line) renders it here, so the headline reads the
same everywhere. No TensorFlow, no numpy.
"""

from __future__ import annotations

import json
import os

from tfrecord_tools import storage
from xraytpu import errors
from tfrecord_tools.schema import MULTI_LABEL
from xraytpu.run import rundir


class ReportError(errors.UserError):
  """A report.json that cannot be read; one line for the user."""


def read(path: str) -> dict:
  """One RUN/eval/<name>/report.json; ReportError when it is not valid JSON."""
  try:
    return json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise ReportError(f"{path}: not valid JSON ({e})") from None


def find(run_dir: str, dataset: str) -> dict | None:
  """The report that speaks for the run: <dataset>-test, else any *-test, else any other;
  the first that parses and has an AUC. None when the run has not been evaluated."""
  preferred = f"{dataset}-test"

  def rank(path: str) -> tuple[int, str]:
    name = os.path.basename(os.path.dirname(path))
    return (0 if name == preferred else 1 if name.endswith("-test") else 2, name)

  for path in sorted(rundir.eval_report_paths(run_dir), key=rank):
    try:
      report = read(path)
    except (OSError, ValueError):   # ReportError and StorageError are ValueErrors
      continue
    if isinstance(report, dict) and "auc" in report:
      return report
  return None


def dataset_name(data_dir: str, manifest: dict) -> str:
  """The name a data set's reports are filed under: the manifest's name, else the folder's."""
  name = manifest.get("name") or os.path.basename(os.path.normpath(data_dir)) or "data"
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def fmt(v, digits: int = 3) -> str:
  """A metric value, or n/a."""
  return "n/a" if v is None else f"{v:.{digits}f}"


def fmt_ci(v, ci) -> str:
  """'0.912 (0.880-0.940)': a value with its 95% interval, when there is one."""
  return fmt(v) + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def evidence(ev: dict | None) -> str:
  """What an operating point rests on (threshold.json's "evidence", xraytpu.evaluation.metrics.
  threshold_evidence), in one line: '20 positives / 30 negatives; sensitivity 0.950 (95% CI
  0.751-0.999, lower bound 0.780), specificity ... (exact binomial, Clopper-Pearson); target
  sensitivity 0.95 at the lower bound: not reached'."""
  if not ev:
    return "not recorded"
  level = f"{ev.get('confidence', 0.95):.0%}"

  def rate(m):
    lb, ci = ev.get(f"{m}_lower_bound"), ev.get(f"{m}_ci")
    inner = ", ".join(x for x in ((f"95% CI {ci[0]:.3f}-{ci[1]:.3f}" if ci else ""),
                                  (f"{level} lower bound {lb:.3f}" if lb is not None else "")) if x)
    return f"{m} {fmt(ev.get(m))}" + (f" ({inner})" if inner else "")

  line = (f"{ev.get('positives')} positives / {ev.get('negatives')} negatives; "
          f"{rate('sensitivity')}, {rate('specificity')} ({ev.get('method', 'exact binomial')})")
  t = ev.get("target")
  if t:
    line += (f"; target {t['metric']} {t['value']:g} at the {t['requested_at']}: "
             + ("reached" if t.get("met") else "not reached") + f" at the {level} lower bound")
  return line


def metric(report: dict, name: str) -> str:
  """report[name] with its interval, or n/a with the report's reason."""
  v = report.get(name)
  if v is None:
    why = report.get("undefined", {}).get(name)
    return f"n/a ({why})" if why else "n/a"
  return fmt_ci(v, report.get(f"{name}_ci"))


def headline(report: dict) -> str:
  """One line: 'test (chest_xray, 624 images): AUC 0.91 (0.88-0.94), sensitivity ...'."""
  if report["task"] == MULTI_LABEL:
    return (f"{report['split']} ({report['dataset']}, {report['num_examples']} images, "
            f"{len(report['classes'])} findings): macro AUC {fmt_ci(report['auc'], report['auc_ci'])}, "
            f"macro sensitivity {fmt(report['sensitivity'])}, macro specificity "
            f"{fmt(report['specificity'])} at per-finding thresholds ({report['threshold_policy']} on "
            f"{report['threshold_source_split'] or 'no data'})")
  parts = [f"{report['split']} ({report['dataset']}, {report['num_examples']} images): "
           f"AUC {metric(report, 'auc')}"]
  if report["task"] == "binary":
    parts.append(f"sensitivity {metric(report, 'sensitivity')}")
    parts.append(f"specificity {metric(report, 'specificity')}")
    parts.append(f"threshold {report['threshold']:.3f} ({report['threshold_policy']} on "
                 f"{report['threshold_source_split'] or 'no data'})")
  else:
    parts.append(f"micro AUC {metric(report, 'micro_auc')}")
    parts.append(f"accuracy {metric(report, 'accuracy')}")
  return ", ".join(parts)
