"""Evaluation plots as PNG files (matplotlib, headless Agg backend).

Every function takes plain numpy data (as computed by xraytpu.evaluation.metrics), writes
one PNG to `path` (local or gs://, written atomically) and returns `path`.
No TensorFlow needed except for gs:// paths.
"""

from __future__ import annotations

import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display on TPU VMs / CI
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from tfrecord_tools import storage  # noqa: E402

_DPI = 100


def save_figure(fig, path: str) -> str:
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format="png", dpi=_DPI)
  plt.close(fig)
  storage.write_bytes(path, buf.getvalue())
  return path


def roc(curves: dict[str, dict[str, np.ndarray]], path: str, *, title: str = "ROC curve",
        operating_point: tuple[float, float] | None = None, op_label: str = "") -> str:
  """ROC curves, one per entry: {label: {"fpr": [...], "tpr": [...]}}.

  operating_point: (1 - specificity, sensitivity) to mark, e.g. the frozen threshold.
  """
  fig, ax = plt.subplots(figsize=(5, 5))
  ax.plot([0, 1], [0, 1], ls="--", color="0.7", lw=1, label="chance")
  for label, c in curves.items():
    ax.plot(c["fpr"], c["tpr"], lw=2, label=label)
  if operating_point is not None:
    ax.plot([operating_point[0]], [operating_point[1]], "o", color="crimson", ms=8,
            label=op_label or "operating point")
  ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
         xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title=title)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  return save_figure(fig, path)


def precision_recall(curves: dict[str, dict[str, np.ndarray]], path: str, *,
                     prevalence: float | None = None, title: str = "Precision-recall curve",
                     operating_point: tuple[float, float] | None = None, op_label: str = "") -> str:
  """PR curves, one per entry: {label: {"recall": [...], "precision": [...]}}.

  prevalence: the no-skill precision line; operating_point: (recall, precision).
  """
  fig, ax = plt.subplots(figsize=(5, 5))
  for label, c in curves.items():
    ax.step(c["recall"], c["precision"], where="post", lw=2, label=label)
  if prevalence is not None:
    ax.axhline(prevalence, ls="--", color="0.7", lw=1, label=f"no skill ({prevalence:.2f})")
  if operating_point is not None and None not in operating_point:
    ax.plot([operating_point[0]], [operating_point[1]], "o", color="crimson", ms=8,
            label=op_label or "operating point")
  ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(-0.01, 1.01),
         ylim=(-0.01, 1.01), title=title)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower left", fontsize=8)
  return save_figure(fig, path)


def confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str, *,
                     title: str = "Confusion matrix") -> str:
  """cm [K, K] counts (rows true, columns predicted); cells show count and row %."""
  cm = np.asarray(cm)
  k = cm.shape[0]
  rows = cm.sum(axis=1, keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    frac = np.where(rows > 0, cm / np.maximum(rows, 1), 0.0)
  fig, ax = plt.subplots(figsize=(1.2 * k + 3, 1.2 * k + 2.5))
  im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
  for i in range(k):
    for j in range(k):
      ax.text(j, i, f"{cm[i, j]}\n{100 * frac[i, j]:.1f}%", ha="center", va="center",
              color="white" if frac[i, j] > 0.5 else "black", fontsize=9)
  ax.set(xticks=range(k), yticks=range(k), xticklabels=class_names, yticklabels=class_names,
         xlabel="predicted", ylabel="true", title=title)
  plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
  return save_figure(fig, path)


def reliability(bins: dict[str, np.ndarray], path: str, *, title: str = "Calibration",
                xlabel: str = "predicted probability", ylabel: str = "observed frequency",
                extra: dict[str, dict[str, np.ndarray]] | None = None) -> str:
  """Reliability diagram from metrics.calibration_bins (+ a histogram of confidences).

  extra: more bin sets to overlay, e.g. {"after temperature scaling": bins2}.
  """
  fig, (ax, axh) = plt.subplots(2, 1, figsize=(5, 6), sharex=True,
                                gridspec_kw={"height_ratios": [3, 1]})
  ax.plot([0, 1], [0, 1], ls="--", color="0.7", lw=1, label="perfect calibration")
  sets = {"model": bins, **(extra or {})}
  for label, b in sets.items():
    ok = b["count"] > 0
    ax.plot(b["confidence"][ok], b["observed"][ok], "o-", lw=2, label=label)
  edges = bins["edges"]
  axh.bar(edges[:-1], bins["count"], width=np.diff(edges), align="edge", color="0.6",
          edgecolor="white")
  ax.set(ylabel=ylabel, xlim=(0, 1), ylim=(-0.01, 1.01), title=title)
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left", fontsize=8)
  axh.set(xlabel=xlabel, ylabel="count")
  return save_figure(fig, path)


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], path: str, *,
               colors: Sequence[str] | None = None, cols: int = 4,
               title: str | None = None) -> str:
  """A grid of uint8 images [H, W, 1|3] with one (multi-line) title each."""
  n = max(1, len(images))
  cols = min(cols, n)
  rows = (n + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.axis("off")
    if i >= len(images):
      continue
    img = np.asarray(images[i])
    if img.ndim == 3 and img.shape[-1] == 1:
      ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
      ax.imshow(img)
    ax.set_title(titles[i], fontsize=8, color=(colors[i] if colors else "black"))
  if title:
    fig.suptitle(title)
  return save_figure(fig, path)


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
  """history rows (xraytpu.run.rundir.read_history) -> one float array per column (NaN where missing)."""
  keys = sorted({k for r in rows for k in r})
  return {k: np.array([float(r[k]) if k in r else np.nan for r in rows]) for k in keys}


def training_history(rows: list[dict], path: str) -> str | None:
  """Loss and every other metric per epoch, training vs validation (val_*) side by side.

  rows: xraytpu.run.rundir.read_history(RUN). Returns None (and writes nothing) when empty.
  """
  if not rows:
    return None
  h = _columns(rows)
  epochs = h.get("epoch", np.arange(len(next(iter(h.values())))))
  epochs = epochs + 1 if epochs.size and epochs.min() == 0 else epochs
  skip = ("epoch", "lr", "learning_rate", "epoch_seconds", "images_per_sec", "seconds")
  names = [k for k in h if not k.startswith("val_") and k not in skip]
  names = [k for k in names if np.isfinite(h[k]).any() or np.isfinite(h.get(f"val_{k}", [np.nan])).any()]
  names += [k[4:] for k in h if k.startswith("val_") and k[4:] not in names]
  names.sort(key=lambda k: (k != "loss", k))
  if not names:
    return None
  cols = min(3, len(names))
  rows = (len(names) + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  for ax, name in zip(axes.flat, names):
    if name in h:
      ax.plot(epochs, h[name], "o-", label="train")
    if f"val_{name}" in h:
      ax.plot(epochs, h[f"val_{name}"], "s-", label="val")
    ax.set(title=name, xlabel="epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  return save_figure(fig, path)


def roc_and_pr_per_class(entries, roc_path: str, pr_path: str, *, roc_title: str,
                         pr_title: str) -> dict[str, str]:
  """One ROC plot and one PR plot with a curve per class (or finding).

  entries: [(name, its AUC as text, y_true [n], score [n])]. A class without both
  labels has no curve. Returns {"roc": roc_path, "pr": pr_path} for the plots written.
  """
  from xraytpu.evaluation import metrics  # noqa: PLC0415
  curves, prs = {}, {}
  for name, auc_text, y, p in entries:
    cv = metrics.roc_curve(y, p)
    if cv is not None:
      curves[f"{name} (AUC {auc_text})"] = cv
    pc = metrics.pr_curve(y, p)
    if pc is not None:
      prs[name] = pc
  written = {}
  if curves:
    written["roc"] = roc(curves, roc_path, title=roc_title)
  if prs:
    written["pr"] = precision_recall(prs, pr_path, title=pr_title)
  return written
