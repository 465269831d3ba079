"""A multi-label CSV view of real films (chest_xray_400x300: Pneumonia, Bacterial, Viral,
COVID-19) through convert -> train -> evaluate, as benchmarks/real_data.py runs it for README."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_chest_xray_multi_label_view_trains_and_evaluates_per_finding(shared_data, tmp_path):
  from benchmarks import real_data_views as real_data
  from tfrecord_tools import convert as convert_lib
  from xraytpu.evaluation import evaluate_lib
  from xraytpu.training import train_lib
  from xraytpu.config import Config
  images = shared_data / "chest_xray_400x300"
  labels = real_data.write_chest_xray_labels(str(images), str(tmp_path / "labels.csv"))
  data = str(tmp_path / "data")
  m = convert_lib.convert(convert_lib.ConvertOptions(
      input_dir=str(images), output_dir=data, labels_csv=labels, val_fraction=0.15,
      test_fraction=0.15, max_side=64, quiet=True))
  assert m["task"] == "multi_label" and m["classes"] == list(real_data.CHEST_XRAY_FINDINGS)
  cfg = Config(data_dir=data, model_dir=str(tmp_path / "run"), model="xray_cnn", image_size=48,
               batch_size=32, epochs=6, learning_rate=1e-3, seed=0,
               deterministic=True).resolve_augment()   # the same input order on a loaded machine
  result = train_lib.train_and_evaluate(cfg, verbose=0)
  assert "val_auc_covid_19" in result.history[-1]
  report = evaluate_lib.evaluate(cfg.model_dir, split="test", n_resamples=200, write_plots=False)
  assert set(report["per_finding"]) == set(real_data.CHEST_XRAY_FINDINGS)
  assert all(d["auc"] is not None for d in report["per_finding"].values())
  # Pneumonia vs normal is easy on these films (the binary row reaches ~0.99).
  assert report["per_finding"]["Pneumonia"]["auc"] > 0.85, report["per_finding"]
  assert report["auc"] > 0.7, report["auc"]
