"""Multi-label runs through every door: evaluate (per finding, macro mean, per-finding
thresholds chosen on val), predict, serve, export and the model card."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from tfrecord_tools import records, schema

FINDINGS = ["Effusion", "Nodule", "Cardiomegaly"]


def _film(rng, present: list[bool], size: int = 48) -> np.ndarray:
  """A grey film; each present finding draws its own sign (bright band, dark dot, bright block)."""
  img = rng.normal(90, 12, (size, size)).clip(0, 255)
  if present[0]:
    img[size * 3 // 4:, :] += 90                                  # Effusion: bright base
  if present[1]:
    c = rng.integers(10, size - 10, 2)
    img[c[0] - 4:c[0] + 4, c[1] - 4:c[1] + 4] = 10                # Nodule: dark dot
  if present[2]:
    img[size // 3:size * 2 // 3, size // 3:size * 2 // 3] += 80   # Cardiomegaly: central block
  return img.clip(0, 255).astype(np.uint8)


def _png(a: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG")
  return buf.getvalue()


def write_multilabel_set(out: str, n: dict[str, int], seed: int = 0) -> dict:
  """A converted multi-label data set, written as the converter would (records + manifest),
  plus the films as PNG files under out/films/ (for predict and serve)."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(out, "films"), exist_ok=True)
  splits = {}
  for split, count in n.items():
    name = schema.shard_name(split, 0, 1)
    counts = {c: {"positive": 0, "negative": 0, "uncertain": 0, "ignored": 0} for c in FINDINGS}
    with open(os.path.join(out, name), "wb") as f:
      for i in range(count):
        present = [bool(rng.random() < 0.4) for _ in FINDINGS]
        mask = [1.0 if rng.random() > 0.1 else 0.0 for _ in FINDINGS]   # ~10% ignored labels
        png = _png(_film(rng, present))
        rel = f"films/{split}_{i:03d}.png"
        with open(os.path.join(out, rel), "wb") as g:
          g.write(png)
        for c, p, m in zip(FINDINGS, present, mask):
          counts[c]["ignored" if not m else "positive" if p else "negative"] += 1
        text = "|".join(c for c, p in zip(FINDINGS, present) if p) or schema.NO_FINDING
        f.write(records.frame(records.serialize_example(
            encoded=png, image_format="png", height=48, width=48, channels=1, bit_depth=8, label=0,
            text=text, filename=rel, multi_hot=[float(p) for p in present], mask=mask)))
    splits[split] = {"num_examples": count, "shards": [{"file": name, "num_examples": count}],
                     "class_counts": {c: counts[c]["positive"] for c in FINDINGS},
                     "finding_counts": counts, "num_groups": None}
  manifest = {"manifest_version": schema.MANIFEST_VERSION, "name": "multi", "task": schema.MULTI_LABEL,
              "classes": FINDINGS, "splits": splits,
              "args": {"max_side": 0, "channels": "keep", "image_format": "keep", "jpeg_quality": 95},
              "image_stats": {"channels": {"1": sum(n.values())}, "bit_depth": {"8": sum(n.values())}}}
  with open(os.path.join(out, schema.MANIFEST_NAME), "w") as f:
    json.dump(manifest, f)
  return manifest


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory):
  from xraytpu.training import train_lib
  from xraytpu.config import Config
  root = tmp_path_factory.mktemp("multilabel")
  data = str(root / "data")
  write_multilabel_set(data, {"train": 160, "val": 60, "test": 60})
  run = str(root / "run")
  cfg = Config(data_dir=data, model_dir=run, model="xray_cnn", image_size=48, batch_size=16,
               epochs=6, augment="none", cache="memory", seed=0,
               learning_rate=3e-3).resolve_augment()
  train_lib.train_and_evaluate(cfg, verbose=0)
  return data, run


@pytest.mark.slow
def test_evaluate_reports_each_finding_with_thresholds_chosen_on_val(multi_run):
  from xraytpu.evaluation import evaluate_lib
  from xraytpu.run import reports, rundir
  data, run = multi_run
  report = evaluate_lib.evaluate(run, split="test", n_resamples=200)
  assert report["task"] == "multi_label" and report["classes"] == FINDINGS
  for c in FINDINGS:
    d = report["per_finding"][c]
    assert d["auc"] is not None and d["auc_ci"][0] <= d["auc"] <= d["auc_ci"][1]
    assert d["positives"] + d["negatives"] + d["ignored"] == 60
  assert report["auc"] > 0.7, report["auc"]          # each finding has a visible sign
  lo, hi = report["auc_ci"]
  assert lo <= report["auc"] <= hi
  op = rundir.read_operating_point(run)
  assert op["source_split"] == "val" and set(op["thresholds"]) == set(FINDINGS)
  assert report["thresholds"] == {c: op["thresholds"][c] for c in FINDINGS}
  out = report["report_dir"]
  with open(os.path.join(out, "predictions.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 60 and {f"prob_{c}" for c in FINDINGS} <= set(rows[0])
  # Ignored labels are blank, never 0.
  manifest = json.load(open(os.path.join(data, "dataset.json")))
  blanks = sum(r[f"true_{c}"] == "" for r in rows for c in FINDINGS)
  assert blanks == sum(manifest["splits"]["test"]["finding_counts"][c]["ignored"] for c in FINDINGS)
  md = open(os.path.join(out, "report.md")).read()
  assert "| Effusion |" in md and "Macro mean" in md
  assert os.path.exists(os.path.join(out, "roc.png"))
  assert "macro AUC" in reports.headline(report)


@pytest.mark.slow
def test_predict_export_and_serve_agree_per_finding(multi_run, tmp_path):
  import tensorflow as tf
  from xraytpu.evaluation import evaluate_lib
  from xraytpu.inference import export_lib, predict_lib
  from xraytpu.run import model_card
  from xraytpu.serving import service
  from xraytpu.config import ServeOptions
  data, run = multi_run
  evaluate_lib.evaluate(run, split="test", n_resamples=50, write_plots=False)
  films = sorted(os.path.join(data, "films", f) for f in os.listdir(os.path.join(data, "films"))
                 if f.startswith("test_"))[:12]
  loaded = predict_lib.load(run)
  want = predict_lib.predict_files(loaded, films)
  assert all(r.error is None and r.findings is not None for r in want)
  assert any(r.findings for r in want) and set(want[0].probabilities) == set(FINDINGS)
  for r in want:
    assert r.findings == [c for c in FINDINGS if r.probabilities[c] >= r.thresholds[c]]
    assert r.label == ("|".join(r.findings) or "No Finding")
  expected = np.array([[r.probabilities[c] for c in FINDINGS] for r in want])

  out_csv = str(tmp_path / "p.csv")
  predict_lib.write_predictions(want, loaded.classes, out_csv)
  rows = list(csv.DictReader(open(out_csv)))
  assert [r["label"] for r in rows] == [r.label for r in want]

  path = export_lib.export(run)
  meta = export_lib.load_metadata(path)
  assert meta["task"] == "multi_label" and set(meta["thresholds"]) == set(FINDINGS)
  served = tf.saved_model.load(path).signatures["serving_default"]
  out = served(image_bytes=tf.constant([open(f, "rb").read() for f in films]))
  np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
  assert [s.decode() for s in out["label"].numpy()] == [r.label for r in want]
  assert out["positive"].numpy().tolist() == [[c in r.findings for c in FINDINGS] for r in want]

  app = service.App(loaded, ServeOptions(model_dir=run))
  try:
    answer = app.predict([(os.path.basename(f), open(f, "rb").read()) for f in films])
  finally:
    app.close()
  assert answer["task"] == "multi_label" and set(answer["thresholds"]) == set(FINDINGS)
  assert [p["findings"] for p in answer["predictions"]] == [r.findings for r in want]
  card = model_card.model_card(loaded)
  assert card["task"] == "multi_label" and card["evaluation"]["per_finding"]["Nodule"]["auc"] is not None


@pytest.mark.slow
def test_model_card_of_a_multi_label_run(multi_run, tmp_path):
  """MODEL_CARD.md: per-finding AUCs with CIs and thresholds, positives per finding."""
  from xraytpu.evaluation import evaluate_lib
  from xraytpu.inference import export_lib
  from xraytpu.run import model_card, rundir
  data, run = multi_run
  report = evaluate_lib.evaluate(run, split="test", n_resamples=50, write_plots=False)
  text = open(os.path.join(run, "MODEL_CARD.md")).read()
  assert [l for l in text.splitlines() if l.startswith("## ")] == [
      "## Model details", "## Intended use", "## Factors", "## Metrics", "## Evaluation data",
      "## Training data", "## Quantitative analyses", "## Ethical considerations",
      "## Caveats and recommendations", "## Notice"]
  assert model_card.DISCLAIMER in text and "multi-label classifier of 3 findings" in text
  manifest = json.load(open(os.path.join(data, "dataset.json")))
  train = manifest["splits"]["train"]
  assert (f"| train | {train['num_examples']} | "
          + ", ".join(f"{c} {train['class_counts'][c]}" for c in FINDINGS) + " |") in text
  op = rundir.read_operating_point(run)
  for c in FINDINGS:
    d = report["per_finding"][c]
    lo, hi = d["auc_ci"]
    assert (f"| {c} | {d['auc']:.3f} ({lo:.3f}-{hi:.3f}) |") in text, c
    assert f"| {op['thresholds'][c]:.3f} | {d['positives']} / {d['negatives']} / {d['ignored']} |" in text
    assert f"{c} {op['thresholds'][c]:.4f}" in text                     # the operating point
  assert "its own threshold" in text and "chosen on the `val` split" in text
  assert "masked out, never counted as negative" in text
  path = export_lib.export(run, export_dir=str(tmp_path / "export"))
  assert open(os.path.join(path, rundir.EXPORT_MODEL_CARD)).read() == text
