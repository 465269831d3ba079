"""The recipes' evidence (docs/results.md#recipes): held-out split, recipe choice on val,
ablation, shift check and label efficiency, with the commands a user types.

  python -m benchmarks.recipes --data_root=../shared/data --work_dir=/tmp/xraytpu-recipes \
      [--parts=views,choose,ablation,shift,fourclass,transfer] [--json=PATH]

The protocol (what keeps the held-out part honest):
  1. `views`: chest_xray_400x300's films are split ONCE, seeded and stratified by source
     folder, into train 70% / val 15% / held-out 15%, written as explicit
     input/<split>/<class>/ folders of symbolic links (binary NORMAL vs PNEUMONIA =
     Bacterial + Viral; 4-class: the four folders; a film keeps its split in both views),
     then converted with `python -m tfrecord_tools.convert` as a user would.
  2. `choose`: candidate recipes train on train and are compared on VAL only (val AUC;
     the threshold policy's sensitivity/specificity on val). The held-out part is not
     read until the recipe is fixed in configs/.
  3. Every other part trains the fixed recipe (`--flagfile=configs/pneumonia.flags`) or
     one ingredient less, freezes the threshold on val (`xraytpu.evaluate`), and scores the
     held-out part once. Differences in AUC come with a paired bootstrap CI (the same
     resampled films for both models).
  4. `shift`: the held-out films re-rendered (half and double resolution, square aspect,
     a tighter field of view, gamma 0.8 / 1.25, JPEG quality 40) and pneumoniamnist28's
     test split (the same source at 28 px), scored at the threshold frozen on val.
  5. `transfer`: the train split is halved, seeded and stratified: a "large set" half
     pretrains a multi-label model (configs/pretrain_multilabel.flags on the CheXpert-
     layout CSV view of benchmarks.real_data_views), the other half is the "local set";
     the binary recipe is trained on 10/25/50/100% of the local half's labels, from
     scratch and with --init_from the pretrained run; same val, same held-out part.

Each training and evaluation is a subprocess running the entry point (`python -m
xraytpu.train --flagfile=...`), so the times are a user's times. Parts write JSON
under --work_dir and are skipped when their JSON exists (rerun after an interruption).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from benchmarks.real_data_views import CHEST_XRAY_FINDINGS, CHEST_XRAY_FOLDERS
from xraytpu.run.rundir import EVAL_FILES

SOURCE = "chest_xray_400x300"
BINARY_CLASSES = {"NORMAL": ("Normal",), "PNEUMONIA": ("BacterialPneumonia", "ViralPneumonia")}
FOURCLASS = ("Normal", "BacterialPneumonia", "ViralPneumonia", "COVID-19")
FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
CONVERT = ["--max_side=256", "--group_by=none", "--quiet"]
BINARY_FLAGS = "configs/pneumonia.flags"
FOURCLASS_FLAGS = "configs/pneumonia_4class.flags"
PRETRAIN_FLAGS = "configs/pretrain_multilabel.flags"
# The screening policy the recipe recommends, and the one the numbers used.
POLICIES = ("youden", "sensitivity:0.95")


def define_flags() -> None:
  flags.DEFINE_string("data_root", "../shared/data", "Folder holding the real data sets.")
  flags.DEFINE_string("work_dir", "/tmp/xraytpu-recipes", "Where views, records and runs go.")
  flags.DEFINE_list("parts", ["views", "choose", "ablation", "shift", "fourclass", "transfer"],
                    "Parts to run, in order.")
  flags.DEFINE_integer("seed", 20261205, "Seed of the held-out split and the transfer halves.")
  flags.DEFINE_string("json", "", "Also write every part's rows here.")


# ---- running the entry points ----------------------------------------------------

def sh(args: list[str], log: str) -> float:
  """Runs `python -m ...args`, appending its output to `log`; returns the wall seconds."""
  t0 = time.monotonic()
  with open(log, "a") as f:
    f.write("\n$ python -m " + " ".join(args) + "\n")
    f.flush()
    rc = subprocess.call([sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT)
  if rc:
    raise SystemExit(f"failed ({rc}): python -m {' '.join(args)} (see {log})")
  return time.monotonic() - t0


def convert(input_dir: str, output_dir: str, log: str, *extra: str) -> str:
  if not os.path.exists(os.path.join(output_dir, "dataset.json")):
    sh(["tfrecord_tools.convert", f"--input_dir={input_dir}", f"--output_dir={output_dir}",
        "--overwrite", *CONVERT, *extra], log)
  return output_dir


def train(run: str, data_dir: str, flagfile: str, log: str, **overrides) -> float:
  """Trains the recipe with `overrides` into `run` (kept when finished); returns seconds."""
  done = os.path.join(run, "train_seconds.json")
  if os.path.exists(done):
    return json.load(open(done))["seconds"]
  args = ["xraytpu.train", f"--flagfile={flagfile}", f"--data_dir={data_dir}", f"--model_dir={run}",
          "--overwrite"] + [f"--{k}={v}" for k, v in overrides.items()]
  seconds = sh(args, log)
  json.dump({"seconds": seconds, "args": args}, open(done, "w"))
  return seconds


def evaluate(run: str, log: str, *, split: str = "test", data_dir: str = "", policy: str = "youden",
             tta: str = "", ensemble_dir: str = "") -> dict:
  """`python -m xraytpu.evaluate` (threshold frozen on the run's val); returns report.json
  with the predictions (filename -> P(positive) or the K probabilities) beside it."""
  out = os.path.join(ensemble_dir or run, "bench", f"{os.path.basename(data_dir or 'own')}-{split}-"
                     f"{policy.replace(':', '_')}-{tta or 'none'}")
  if not os.path.exists(os.path.join(out, EVAL_FILES["report_json"])):
    args = ["xraytpu.evaluate", f"--model_dir={run}", f"--split={split}", f"--threshold_policy={policy}",
            f"--out_dir={out}", "--noplots"]
    args += [f"--data_dir={data_dir}"] if data_dir else []
    args += [f"--tta={tta or 'none'}"]   # explicit: evaluate keeps threshold.json's TTA otherwise
    args += [f"--ensemble_dir={ensemble_dir}"] if ensemble_dir else []
    sh(args, log)
  report = json.load(open(os.path.join(out, EVAL_FILES["report_json"])))
  with open(os.path.join(out, EVAL_FILES["predictions"]), newline="") as f:
    rows = list(csv.DictReader(f))
  classes = [k[len("prob_"):] for k in rows[0] if k.startswith("prob_")]
  report["_files"] = [r["filename"] for r in rows]
  if "true_label" not in rows[0]:   # multi-label: the report's per-finding numbers suffice
    return report
  report["_y"] = np.array([classes.index(r["true_label"]) for r in rows])
  report["_p"] = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
  return report


# ---- the held-out split, as folders ------------------------------------------------

def split_films(source: str, seed: int) -> dict[str, dict[str, list[str]]]:
  """{split: {source folder: [file names]}}: seeded, stratified by source folder."""
  rng = random.Random(seed)
  out: dict[str, dict[str, list[str]]] = {s: {} for s in FRACTIONS}
  for folder in FOURCLASS:
    names = sorted(os.listdir(os.path.join(source, folder)))
    rng.shuffle(names)
    n_val, n_test = round(len(names) * FRACTIONS["val"]), round(len(names) * FRACTIONS["test"])
    parts = {"test": names[:n_test], "val": names[n_test:n_test + n_val], "train": names[n_test + n_val:]}
    for split, part in parts.items():
      out[split][folder] = sorted(part)
  return out


def link_view(root: str, source: str, films: dict[str, dict[str, list[str]]], classes: dict) -> str:
  """root/<split>/<class>/<folder><name> -> the source film (names without '_': no patient ids)."""
  if os.path.isdir(root):
    shutil.rmtree(root)
  for split, by_folder in films.items():
    for cls, folders in classes.items():
      os.makedirs(os.path.join(root, split, cls), exist_ok=True)
      for folder in folders:
        for name in by_folder.get(folder, ()):
          os.symlink(os.path.join(source, folder, name),
                     os.path.join(root, split, cls, folder.replace("-", "") + name))
  return root


# ---- statistics -----------------------------------------------------------------------

def paired_auc_delta(y, p_a, p_b, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
  """AUC(b) - AUC(a) on the same films, with a 95% paired, stratified bootstrap CI.

  scipy.stats.bootstrap(paired=True) would do the pairing, but it does not stratify by
  class (a resample without positives has no AUC). metrics.bootstrap_ci is the reports'
  stratified resampling and percentile interval: given both models' scores side by side,
  each resample scores both on the same films (the pairing)."""
  from xraytpu.evaluation import metrics
  both = np.stack([np.asarray(p_a), np.asarray(p_b)], axis=-1)
  delta = lambda yy, s: _auc(yy, s[..., 1]) - _auc(yy, s[..., 0])  # noqa: E731
  interval, _ = metrics.bootstrap_ci(delta, y, both, n_resamples=n, seed=seed)
  lo, hi = interval or (float("nan"), float("nan"))
  return float(delta(np.asarray(y), both)), float(lo), float(hi)


def _auc(y, p) -> float:
  """Binary AUC of P(positive) (p [n] or [n, 2]), or the macro one-vs-rest AUC of [n, K]: the
  reports' own (xraytpu.evaluation.metrics)."""
  from xraytpu.evaluation import metrics
  if p.ndim == 2 and p.shape[1] > 2:
    return metrics.multiclass_auc(y, p, ci=False)["macro"].value
  return metrics.roc_auc(y, p[:, -1] if p.ndim == 2 else p, ci=False).value


def row(name: str, report: dict, seconds: float | None = None, **extra) -> dict:
  r = {"name": name, "auc": report["auc"], "auc_ci": report["auc_ci"],
       "threshold": report.get("threshold"), "sensitivity": report.get("sensitivity"),
       "sensitivity_ci": report.get("sensitivity_ci"), "specificity": report.get("specificity"),
       "specificity_ci": report.get("specificity_ci"), "n": report["num_examples"],
       "minutes": None if seconds is None else seconds / 60, **extra}
  return r


def fmt_ci(v, ci) -> str:
  if v is None:
    return "n/a"
  return f"{v:.3f} ({ci[0]:.3f}-{ci[1]:.3f})" if ci else f"{v:.3f}"


def table(rows: list[dict], delta: bool = False) -> str:
  head = "| recipe | AUC (95% CI) | " + ("ΔAUC vs recipe (95% CI) | " if delta else "") + \
         "threshold (val) | sensitivity (95% CI) | specificity (95% CI) | train time |"
  out = [head, "|" + " --- |" * (head.count("|") - 1)]
  for r in rows:
    d = r.get("delta")
    cells = [r["name"], fmt_ci(r["auc"], r["auc_ci"])]
    if delta:
      cells.append("—" if d is None else f"{d[0]:+.3f} ({d[1]:+.3f} to {d[2]:+.3f})")
    cells += ["n/a" if r["threshold"] is None else f"{r['threshold']:.3f}",
              fmt_ci(r["sensitivity"], r["sensitivity_ci"]), fmt_ci(r["specificity"], r["specificity_ci"]),
              "—" if r["minutes"] is None else f"{r['minutes']:.1f} min"]
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


# ---- the parts ------------------------------------------------------------------------

class Bench:
  def __init__(self, data_root: str, work_dir: str, seed: int):
    self.source = os.path.abspath(os.path.join(data_root, SOURCE))
    self.data_root = os.path.abspath(data_root)
    self.work = os.path.abspath(work_dir)
    self.seed = seed
    os.makedirs(self.work, exist_ok=True)
    self.log = os.path.join(self.work, "commands.log")
    self.films = split_films(self.source, seed)
    self.binary = os.path.join(self.work, "binary", "tfrecords")
    self.fourclass_data = os.path.join(self.work, "4class", "tfrecords")

  def part(self, name: str, fn) -> list[dict]:
    path = os.path.join(self.work, f"{name}.json")
    if os.path.exists(path):
      return json.load(open(path))
    rows = fn()
    json.dump(rows, open(path, "w"), indent=2, default=float)
    return rows

  def run(self, name: str) -> str:
    return os.path.join(self.work, "runs", name)

  def views(self) -> list[dict]:
    bin_view = link_view(os.path.join(self.work, "binary", "films"), self.source, self.films, BINARY_CLASSES)
    four_view = link_view(os.path.join(self.work, "4class", "films"), self.source, self.films,
                          {c: (c,) for c in FOURCLASS})
    convert(bin_view, self.binary, self.log)
    convert(four_view, self.fourclass_data, self.log)
    return [{"split": s, **{f: len(n) for f, n in by.items()}} for s, by in self.films.items()]

  # Candidates compared on VAL only (the held-out part is not read here). Shared: xray_cnn,
  # batch 32, Adam with a 1-epoch warmup then cosine decay, balanced class weights, --augment=light.
  BASE = dict(model="xray_cnn", image_size=128, batch_size=32, optimizer="adam", learning_rate=1e-3,
              lr_schedule="cosine", warmup_epochs=1, class_weight="balanced", augment="light", epochs=20)
  CANDIDATES = {
      "plain": dict(),
      "ingredients": dict(ema_decay=0.99, mixup_alpha=0.2, label_smoothing=0.05),
  }

  def choose(self) -> list[dict]:
    rows = []
    for label, over in self.CANDIDATES.items():
      name = "cand_" + label.replace(", ", "_").replace(" ", "")
      secs = train(self.run(name), self.binary, "/dev/null", self.log, **{**self.BASE, **over})
      rows.append(row(f"{label} (val)", evaluate(self.run(name), self.log, split="val"), secs))
    return rows

  def binary_runs(self) -> dict[str, tuple[str, dict]]:
    """The ablation: the recipe (the "plain" candidate, chosen on val), then one ingredient
    more (or, for augmentation, less) each; two more seeds for the ensemble."""
    return {
        "recipe (configs/pneumonia.flags)": ("recipe", {}),
        "+ EMA of weights (0.99)": ("ema", dict(ema_decay=0.99)),
        "+ mixup (alpha 0.2)": ("mixup", dict(mixup_alpha=0.2)),
        "+ label smoothing (0.05)": ("ls", dict(label_smoothing=0.05)),
        "- augmentation (--augment=none)": ("no_aug", dict(augment="none")),
        "+ low-resolution augmentation (0.2)": ("lowres", dict(low_resolution_range=0.2)),
        "+ low-resolution augmentation and mixup": ("lowres_mixup", dict(low_resolution_range=0.2,
                                                                          mixup_alpha=0.2)),
        "recipe, seed 2": ("seed2", dict(seed=2)),
        "recipe, seed 3": ("seed3", dict(seed=3)),
    }

  def ablation(self) -> list[dict]:
    rows, base = [], None
    for label, (name, over) in self.binary_runs().items():
      secs = train(self.run(name), self.binary, BINARY_FLAGS, self.log, **over)
      rep = evaluate(self.run(name), self.log)
      base = base or rep
      rows.append(row(label, rep, secs, delta=None if base is rep else
                      paired_auc_delta(base["_y"], base["_p"], rep["_p"])))
    rep = evaluate(self.run("recipe"), self.log, tta="shift")
    rows.append(row("recipe + TTA (shift)", rep, None, delta=paired_auc_delta(base["_y"], base["_p"], rep["_p"])))
    members = ",".join(self.run(n) for n in ("recipe", "seed2", "seed3"))
    rep = evaluate(members, self.log, ensemble_dir=self.run("ensemble3"))
    rows.append(row("ensemble of 3 seeds", rep, None, delta=paired_auc_delta(base["_y"], base["_p"], rep["_p"])))
    for policy in POLICIES[1:]:
      rep = evaluate(self.run("recipe"), self.log, policy=policy)
      rows.append(row(f"recipe, threshold {policy} on val", rep, None))
    return rows


  # ---- shift: the frozen threshold on re-rendered held-out films -------------------------

  SHIFTS = {
      "half resolution (200x150)": lambda im: im.resize((im.width // 2, im.height // 2), _BOX),
      "double resolution (800x600)": lambda im: im.resize((im.width * 2, im.height * 2), _BICUBIC),
      "square aspect (300x300)": lambda im: im.resize((im.height, im.height), _BOX),
      "field of view 90% (centre crop)": lambda im: im.crop(_centre(im, 0.9)),
      "gamma 0.8 (brighter)": lambda im: _gamma(im, 0.8),
      "gamma 1.25 (darker)": lambda im: _gamma(im, 1.25),
      "JPEG quality 40": None,
  }

  def shift(self, run: str = "", data_dir: str = "", classes: dict | None = None) -> list[dict]:
    from PIL import Image
    run = run or self.run("recipe")
    classes = classes or BINARY_CLASSES
    rows = [row("held-out, as stored", evaluate(run, self.log), None)]
    for label, fn in self.SHIFTS.items():
      name = "".join(c for c in label.split(" (")[0] if c.isalnum())
      root = os.path.join(self.work, "shift", name)
      records = root + "-tfrecords"
      if not os.path.exists(os.path.join(records, "dataset.json")):
        for cls, folders in classes.items():
          os.makedirs(os.path.join(root, "test", cls), exist_ok=True)
          for folder in folders:
            for film in self.films["test"][folder]:
              im = Image.open(os.path.join(self.source, folder, film)).convert("L")
              stem = folder.replace("-", "") + os.path.splitext(film)[0]
              if fn is None:
                im.save(os.path.join(root, "test", cls, stem + ".jpeg"), quality=40)
              else:
                fn(im).save(os.path.join(root, "test", cls, stem + ".png"))
        convert(root, records, self.log)
      rows.append(row(label, evaluate(run, self.log, data_dir=records), None))
    mnist = convert(os.path.join(self.data_root, "pneumoniamnist28"),
                    os.path.join(self.work, "pneumoniamnist28-tfrecords"), self.log)
    rows.append(row("pneumoniamnist28 test (28 px, same source)", evaluate(run, self.log, data_dir=mnist), None))
    return rows

  # ---- the ablation under shift -------------------------------------------------------

  ABLATION_SHIFTS = ("halfresolution", "gamma125", "pneumoniamnist28")

  def ablation_shift(self) -> list[dict]:
    """Each ablation run (and TTA, the ensemble) at its val threshold on shifted films
    (the shift part's sets): where an ingredient matters when the held-out part saturates."""
    self.part("shift", self.shift)   # the shifted sets
    rows = []
    targets = [(label, self.run(name), {}) for label, (name, _) in self.binary_runs().items()]
    targets += [("recipe + TTA (shift)", self.run("recipe"), {"tta": "shift"}),
                ("ensemble of 3 seeds", ",".join(self.run(n) for n in ("recipe", "seed2", "seed3")),
                 {"ensemble_dir": self.run("ensemble3")})]
    base = {}
    for label, run, kw in targets:
      r = {"name": label}
      for shift in self.ABLATION_SHIFTS:
        data = os.path.join(self.work, shift + "-tfrecords" if shift == "pneumoniamnist28"
                            else os.path.join("shift", shift + "-tfrecords"))
        rep = evaluate(run, self.log, data_dir=data, **kw)
        base.setdefault(shift, rep)
        r[shift] = row(shift, rep, delta=None if base[shift] is rep else
                       paired_auc_delta(base[shift]["_y"], base[shift]["_p"], rep["_p"]))
      rows.append(r)
    return rows

  # ---- the 4-class recipe ----------------------------------------------------------------

  def fourclass(self) -> list[dict]:
    rows = []
    for label, over in (("4-class recipe", {}),):
      run = self.run("fourclass")
      secs = train(run, self.fourclass_data, FOURCLASS_FLAGS, self.log, **over)
      rep = evaluate(run, self.log)
      y, p = rep["_y"], rep["_p"]
      classes = list(rep["classes"]) if "classes" in rep else list(FOURCLASS)
      b, v = classes.index("BacterialPneumonia"), classes.index("ViralPneumonia")
      keep = (y == b) | (y == v)
      score = p[keep, v] / np.maximum(p[keep, v] + p[keep, b], 1e-12)
      from xraytpu.evaluation import metrics
      vb = metrics.roc_auc((y[keep] == v).astype(int), score)
      per = {c: d["auc"] for c, d in rep["per_class"].items()}
      rows.append(row(label, rep, secs, per_class_auc=per, viral_vs_bacterial=[vb.value, vb.ci],
                      accuracy=rep.get("accuracy")))
    return rows

  # ---- transfer: label efficiency ---------------------------------------------------------

  TRANSFER_FRACTIONS = (0.10, 0.25, 0.50, 1.00)

  def transfer(self) -> list[dict]:
    rng = random.Random(self.seed + 1)
    pool_a, pool_b = {}, {}
    for folder, names in self.films["train"].items():
      names = sorted(names)
      rng.shuffle(names)
      pool_a[folder], pool_b[folder] = names[: len(names) // 2], names[len(names) // 2:]
    # The "large set": a CheXpert-layout CSV of pool A (train) and val, findings of
    # benchmarks.real_data_views; the held-out films are never in it.
    csvs = []
    for split, pool in (("train", pool_a), ("val", self.films["val"])):
      path = os.path.join(self.work, "transfer", f"{split}.csv")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Path", *CHEST_XRAY_FINDINGS])
        for folder, names in pool.items():
          for n in names:
            w.writerow([f"{folder}/{n}", *CHEST_XRAY_FOLDERS[folder]])
      csvs.append(f"{split}={path}")
    pre_data = convert(self.source, os.path.join(self.work, "transfer", "pretrain-tfrecords"), self.log,
                       "--labels_csv=" + ",".join(csvs))
    pre_run = self.run("pretrain_multilabel")
    pre_secs = train(pre_run, pre_data, PRETRAIN_FLAGS, self.log)
    rows = [row("pretrain (multi-label, pool A)", evaluate(pre_run, self.log, split="val"), pre_secs)]
    for frac in self.TRANSFER_FRACTIONS:
      sub = {f: n[: max(1, round(len(n) * frac))] for f, n in pool_b.items()}
      films = {"train": sub, "val": self.films["val"], "test": self.films["test"]}
      tag = f"{int(frac * 100)}pct"
      view = link_view(os.path.join(self.work, "transfer", tag), self.source, films, BINARY_CLASSES)
      data = convert(view, os.path.join(self.work, "transfer", tag + "-tfrecords"), self.log)
      n_train = sum(len(sub[f]) for fs in BINARY_CLASSES.values() for f in fs)
      reps = {}
      for how, over in (("scratch", {}), ("init_from", {"init_from": pre_run})):
        run = self.run(f"transfer_{tag}_{how}")
        secs = train(run, data, BINARY_FLAGS, self.log, **over)
        reps[how] = (evaluate(run, self.log), secs)
      (a, sa), (b, sb) = reps["scratch"], reps["init_from"]
      rows.append({"fraction": frac, "train_films": n_train,
                   "scratch": row("scratch", a, sa), "init_from": row("init_from", b, sb),
                   "delta": paired_auc_delta(a["_y"], a["_p"], b["_p"])})
    return rows


_BOX, _BICUBIC = 4, 3   # PIL.Image.Resampling.BOX / BICUBIC (plain ints: PIL is imported lazily)


def _centre(im, keep: float) -> tuple[int, int, int, int]:
  w, h = im.size
  dw, dh = round(w * (1 - keep) / 2), round(h * (1 - keep) / 2)
  return dw, dh, w - dw, h - dh


def _gamma(im, g: float):
  lut = [round(255 * (i / 255) ** g) for i in range(256)]
  return im.point(lut)


def shift_table(rows: list[dict]) -> str:
  names = Bench.ABLATION_SHIFTS
  out = ["| recipe | " + " | ".join(f"{n}: AUC / sens / spec" for n in names) + " |",
         "|" + " --- |" * (len(names) + 1)]
  for r in rows:
    cells = [f"{r[n]['auc']:.3f} / {r[n]['sensitivity']:.3f} / {r[n]['specificity']:.3f}" +
             ("" if not r[n].get("delta") else " (ΔAUC {:+.3f}, {:+.3f} to {:+.3f})".format(*r[n]["delta"]))
             for n in names]
    out.append(f"| {r['name']} | " + " | ".join(cells) + " |")
  return "\n".join(out)


def transfer_table(rows: list[dict]) -> str:
  out = ["| labels used (share of the local half) | training films | from scratch: AUC (95% CI) | "
         "--init_from pretrained: AUC (95% CI) | ΔAUC (95% CI) | sens / spec, scratch | sens / spec, init_from |",
         "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    if "fraction" not in r:
      continue
    a, b, d = r["scratch"], r["init_from"], r["delta"]
    out.append(f"| {r['fraction']:.0%} | {r['train_films']} | {fmt_ci(a['auc'], a['auc_ci'])} | "
               f"{fmt_ci(b['auc'], b['auc_ci'])} | {d[0]:+.3f} ({d[1]:+.3f} to {d[2]:+.3f}) | "
               f"{a['sensitivity']:.3f} / {a['specificity']:.3f} | {b['sensitivity']:.3f} / {b['specificity']:.3f} |")
  return "\n".join(out)


def main(argv):
  del argv
  F = flags.FLAGS
  bench = Bench(F.data_root, F.work_dir, F.seed)
  results = {}
  for part in F.parts:
    print(f"== {part}", flush=True)
    t0 = time.monotonic()
    try:
      rows = bench.part(part, getattr(bench, part))
    except SystemExit as e:   # a failed command: the other parts still run (rerun resumes)
      print(f"{part} stopped: {e}", flush=True)
      continue
    results[part] = rows
    if part == "views":
      print(json.dumps(rows, indent=1, default=float))
    elif part == "ablation_shift":
      print(shift_table(rows))
    elif part == "transfer":
      print(table(rows[:1]) + "\n\n" + transfer_table(rows))
    else:
      print(table(rows, delta=any(r.get("delta") for r in rows)), flush=True)
    print(f"({part}: {(time.monotonic() - t0) / 60:.1f} min)", flush=True)
  if F.json:
    json.dump(results, open(F.json, "w"), indent=2, default=float)


if __name__ == "__main__":
  define_flags()
  app.run(main)
