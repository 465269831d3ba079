"""Label views of the real data sets (no flags: tests import this).

`write_chest_xray_labels(image_root, path)`: a CheXpert-layout CSV over
chest_xray_400x300's class folders, with the findings Pneumonia, Bacterial,
Viral and COVID-19 (COVID-19 films are viral pneumonias; Normal has none).
"""

from __future__ import annotations

import csv
import os

# The multi-label view of chest_xray_400x300: folder -> its findings.
CHEST_XRAY_FINDINGS = ("Pneumonia", "Bacterial", "Viral", "COVID-19")
CHEST_XRAY_FOLDERS = {"Normal": (0, 0, 0, 0), "BacterialPneumonia": (1, 1, 0, 0),
                      "ViralPneumonia": (1, 0, 1, 0), "COVID-19": (1, 0, 1, 1)}


def write_chest_xray_labels(image_root: str, path: str) -> str:
  """A CheXpert-layout CSV (Path + one 1/0 column per finding) over chest_xray_400x300."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["Path", *CHEST_XRAY_FINDINGS])
    for folder, present in CHEST_XRAY_FOLDERS.items():
      for name in sorted(os.listdir(os.path.join(image_root, folder))):
        w.writerow([f"{folder}/{name}", *present])
  return path
