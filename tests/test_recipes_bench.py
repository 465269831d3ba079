"""benchmarks/recipes.py's protocol pieces (the numbers in docs/results.md#recipes rest on
them): the held-out split is disjoint, stratified and seeded; the folder views keep a film
in one split and carry no patient-like ids; the paired AUC difference is zero for the same
model and signed right; the shift renderings never mirror a film."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from benchmarks import recipes


def _source(tmp_path, counts=None):
  counts = counts or {"Normal": 40, "BacterialPneumonia": 30, "ViralPneumonia": 20, "COVID-19": 7}
  root = tmp_path / "src"
  for folder, n in counts.items():
    (root / folder).mkdir(parents=True)
    for i in range(n):
      (root / folder / f"{i}.jpeg").write_bytes(b"x%d" % i)
  return str(root), counts


def test_split_is_disjoint_stratified_and_seeded(tmp_path):
  src, counts = _source(tmp_path)
  films = recipes.split_films(src, seed=7)
  assert films == recipes.split_films(src, seed=7)
  assert films != recipes.split_films(src, seed=8)
  for folder, n in counts.items():
    parts = [set(films[s][folder]) for s in ("train", "val", "test")]
    assert sum(map(len, parts)) == n and set.union(*parts) == set(os.listdir(os.path.join(src, folder)))
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(parts[2]) == round(n * 0.15) and len(parts[1]) == round(n * 0.15)


def test_views_link_each_film_once_under_its_class(tmp_path):
  src, counts = _source(tmp_path)
  films = recipes.split_films(src, seed=1)
  view = recipes.link_view(str(tmp_path / "view"), src, films, recipes.BINARY_CLASSES)
  linked = {}
  for split in ("train", "val", "test"):
    for cls in recipes.BINARY_CLASSES:
      for name in os.listdir(os.path.join(view, split, cls)):
        assert "_" not in name and "-" not in name   # no <id>_<n> names: no invented patients
        target = os.readlink(os.path.join(view, split, cls, name))
        assert target not in linked
        linked[target] = (split, cls)
  # COVID-19 is not in the binary view; every other film is, under its class
  assert len(linked) == sum(n for f, n in counts.items() if f != "COVID-19")
  assert {c for t, (s, c) in linked.items() if "/Normal/" in t} == {"NORMAL"}
  assert {c for t, (s, c) in linked.items() if "Pneumonia/" in t} == {"PNEUMONIA"}


def test_paired_auc_delta():
  rng = np.random.default_rng(0)
  y = np.r_[np.zeros(60, int), np.ones(40, int)]
  good = y + rng.normal(0, 0.5, len(y))
  bad = y + rng.normal(0, 2.0, len(y))
  same = recipes.paired_auc_delta(y, good, good, n=200)
  assert same == (0.0, 0.0, 0.0)
  d, lo, hi = recipes.paired_auc_delta(y, bad, good, n=200)
  assert d > 0 and lo <= d <= hi
  assert recipes.paired_auc_delta(y, good, bad, n=200)[0] == -d


def test_shift_renderings_keep_the_film_unmirrored():
  arr = np.zeros((300, 400), np.uint8)
  arr[:, :100] = 200   # bright on the left only
  im = Image.fromarray(arr)
  for label, fn in recipes.Bench.SHIFTS.items():
    if fn is None:
      continue
    out = np.asarray(fn(im), np.float32)
    w = out.shape[1]
    assert out[:, : w // 5].mean() > out[:, -w // 5:].mean() + 50, label
