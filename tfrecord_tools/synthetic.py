"""A deterministic, chest-radiograph-like demo data set (numpy + PIL only).

  python -m tfrecord_tools.synthetic --output_dir=demo/images \
      [--num_images=200 --size=256 --bit_depth=8|16 --classes=2 --seed=0 \
       --with_splits --images_per_patient=1 --image_format=png|jpeg|dicom \
       --dicom_variants=monochrome1,rescale,windowed,rle,16bit]

Writes one image file per example, class per folder, the layout the converter
reads:

  OUTPUT/NORMAL/p00000_0.png             (default)
  OUTPUT/train/NORMAL/p00000_0.png       (--with_splits: train/val/test by patient)
  OUTPUT/synthetic.json                  (the arguments; the converter reads its group_regex)

Each image is a grayscale frontal "radiograph": a body outline, two dark lung
fields above a domed diaphragm, spine and heart shadows, ribs, a random
exposure and film noise. Class 0 (NORMAL) has clear lungs; every other class
adds a learnable signal: bright, blurry opacities inside the lungs whose number,
size and zone depend on the class (class 1: one to three focal lower-zone
consolidations; class 2: many small bilateral peripheral patches; class 3+:
upper-zone lesions). Anatomy is drawn per patient, noise per image, all from
`numpy.random.default_rng([seed, ...])`, so the same arguments give the same
bytes. File names start with the patient id (`p00012_0.png`), and synthetic.json
records the regex that finds it (`group_regex`): with --images_per_patient > 1
the converter keeps each patient's films in one split by itself (it reads that
regex; `tfrecord_tools.convert.split.detect_grouping`), as --group_regex would.

--image_format=dicom writes each film as a DICOM file (`.dcm`, PatientID =
the patient id, so `--group_by=dicom_patient_id` splits by patient too), the
variants of `--dicom_variants` taken in turn (`encode_dicom`): each renders,
with the default --dicom_window=viewer (its window in the file) and with
--dicom_window=full, to the same film as the PNG would.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shutil
from typing import Sequence

import numpy as np
from PIL import Image

from tfrecord_tools import _entry, errors

DICOM_VARIANTS = ("monochrome1", "rescale", "windowed", "rle", "16bit")


@dataclasses.dataclass(frozen=True)
class StorageKind:
  """How a PACS export may store a grey film (`store_dicom`): its modality values fill
  low..low+span, a part of what BitsStored allows, as real CR/DX films do."""
  bits: int
  low: float                 # modality value of the film's black (white for MONOCHROME1)
  span: float                # modality values from black to white
  signed: bool = False
  slope: float = 1.0         # Rescale Slope / Intercept (modality = slope * stored + intercept)
  intercept: float = 0.0
  photometric: str = "MONOCHROME2"
  rle: bool = False          # RLE Lossless compressed


# The storage kinds tests/test_dicom.py and benchmarks/dicom_presentation.py score the same
# film in, each with and without a window in the file.
STORAGE_KINDS = {
    "12-bit": StorageKind(12, low=300, span=3000),
    "13-bit, intercept -1024": StorageKind(13, low=-800, span=5000, intercept=-1024),
    "14-bit": StorageKind(14, low=1500, span=9000),
    "16-bit": StorageKind(16, low=4000, span=40000),
    "16-bit signed, slope 0.5": StorageKind(16, low=-6000, span=12000, signed=True, slope=0.5,
                                            intercept=100),
    "12-bit MONOCHROME1": StorageKind(12, low=200, span=3200, photometric="MONOCHROME1"),
    "12-bit RLE": StorageKind(12, low=250, span=3000, rle=True),
    "16-bit RLE MONOCHROME1": StorageKind(16, low=3000, span=30000, photometric="MONOCHROME1",
                                          rle=True),
}
CLASS_NAMES = ("NORMAL", "PNEUMONIA", "COVID", "NODULE", "EFFUSION")
SPLIT_FRACTIONS = (("train", 0.7), ("val", 0.15), ("test", 0.15))
MARKER = "synthetic.json"
TOOL = "tfrecord_tools.synthetic"      # synthetic.json's "tool"


class SyntheticError(errors.UserError):
  """Bad arguments for the generator (shown as one line, no traceback)."""


def class_names(num_classes: int) -> list[str]:
  """`NORMAL, PNEUMONIA, COVID, NODULE, EFFUSION, CLASS5, ...`."""
  return [CLASS_NAMES[k] if k < len(CLASS_NAMES) else f"CLASS{k}" for k in range(num_classes)]


# --------------------------------------------------------------------------
# Drawing. Everything is a float image in [0, 1] on a grid x, y in [-1, 1].
# --------------------------------------------------------------------------


def _soft(v: np.ndarray, edge: float) -> np.ndarray:
  """Smooth step: 1 where v < 0, 0 where v > 0, over a band of width ~edge."""
  return 0.5 * (1.0 - np.tanh(v / edge))


def _ellipse(x, y, cx, cy, rx, ry, edge):
  return _soft(np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) - 1.0, edge)


def _anatomy(rng: np.random.Generator) -> dict:
  """Per-patient shape parameters."""
  j = lambda s: float(rng.normal(0.0, s))  # noqa: E731
  return {
      "body_rx": 0.86 + j(0.03), "body_ry": 1.05 + j(0.03),
      "lung_cx": 0.38 + j(0.02), "lung_cy": -0.12 + j(0.03),
      "lung_rx": 0.27 + j(0.02), "lung_ry": 0.56 + j(0.03),
      "diaphragm": 0.42 + j(0.04), "heart_cx": 0.12 + j(0.02),
      "heart_r": 0.27 + j(0.02), "rib_gap": 0.125 + j(0.006),
      "rib_phase": float(rng.uniform(0.0, 1.0)), "tilt": j(0.03),
  }


def _opacities(rng: np.random.Generator, label: int, a: dict) -> list[tuple]:
  """(cx, cy, sigma, amplitude) of each class-specific opacity."""
  if label == 0:
    return []
  blobs = []
  if label == 1:      # focal lobar consolidation, lower zones
    for _ in range(int(rng.integers(1, 4))):
      side = rng.choice([-1.0, 1.0])
      blobs.append((side * a["lung_cx"] + rng.normal(0, 0.06), rng.uniform(0.0, 0.3),
                    rng.uniform(0.10, 0.16), rng.uniform(0.30, 0.45)))
  elif label == 2:    # diffuse bilateral peripheral patches
    for _ in range(int(rng.integers(6, 11))):
      side = rng.choice([-1.0, 1.0])
      blobs.append((side * (a["lung_cx"] + rng.uniform(0.05, 0.18)), rng.uniform(-0.5, 0.3),
                    rng.uniform(0.05, 0.08), rng.uniform(0.25, 0.40)))
  else:               # upper-zone lesions, a different count per class
    for _ in range(label - 1):
      side = rng.choice([-1.0, 1.0])
      blobs.append((side * a["lung_cx"] + rng.normal(0, 0.05), rng.uniform(-0.6, -0.35),
                    rng.uniform(0.06, 0.10), rng.uniform(0.35, 0.5)))
  return blobs


def _signs(x, y, a: dict, lungs, edge: float, signs: Sequence[str],
           rng: np.random.Generator) -> np.ndarray:
  """The additive image of each finding's own sign (multi-label sets; see SIGNS).

  effusion: a homogeneous fluid level with a lateral meniscus at the base of the
  image-left lung (its lower third); nodule: a small sharp round density in an upper zone;
  pneumothorax: a dark, markingless upper-lateral band of the image-right lung
  behind a thin bright pleural line; consolidation: a large fuzzy opacity in
  the mid zone of the image-left lung (away from the heart and the nodules);
  cardiomegaly enlarges the heart shadow (in `render`).
  """
  out = np.zeros_like(x)
  if "effusion" in signs:
    side_lung = _ellipse(x, y, -a["lung_cx"], a["lung_cy"], a["lung_rx"], a["lung_ry"], 2 * edge)
    level = a["diaphragm"] - 0.40 - 0.35 * np.clip(-x - a["lung_cx"], 0.0, None)
    out += 0.45 * side_lung * _soft(level - y, 2 * edge)
  if "nodule" in signs:
    side = float(rng.choice([-1.0, 1.0]))
    cx, cy = side * a["lung_cx"] + float(rng.uniform(-0.07, 0.07)), float(rng.uniform(-0.55, -0.35))
    out += 0.5 * _ellipse(x, y, cx, cy, 0.07, 0.07, edge) * lungs
  if "pneumothorax" in signs:
    border = a["lung_cx"] + 0.04
    upper = _soft(y - a["lung_cy"], 4 * edge) * lungs
    out -= 0.20 * _soft(border - x, 2 * edge) * upper
    out += 0.18 * np.exp(-((x - border) / 0.015) ** 2) * upper
  if "consolidation" in signs:
    cx = -a["lung_cx"] - 0.03 + float(rng.normal(0, 0.03))
    cy = a["lung_cy"] + float(rng.uniform(-0.04, 0.04))
    out += 0.55 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 0.10 ** 2)) * lungs
  return out


def render(height: int, width: int, label: int, anatomy: dict,
           rng: np.random.Generator, signs: Sequence[str] = ()) -> np.ndarray:
  """One radiograph as float32 [height, width] in [0, 1]; `signs`: findings drawn (SIGNS)."""
  # Draw the smooth anatomy at <= 512 px and upsample: same look, much faster.
  scale = min(1.0, 512.0 / max(height, width))
  h, w = max(8, round(height * scale)), max(8, round(width * scale))
  a = anatomy
  ys = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
  xs = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :] * (w / h)
  # Small rotation of the patient in the frame.
  c, s = math.cos(a["tilt"]), math.sin(a["tilt"])
  x, y = c * xs - s * ys, s * xs + c * ys
  edge = 2.5 / h

  body = _ellipse(x, y, 0.0, 0.1, a["body_rx"], a["body_ry"], 3 * edge)
  below_dome = _soft(a["diaphragm"] - 0.08 * np.cos(2.2 * x) - y, edge)  # 1 under the diaphragm
  lungs = np.zeros_like(x)
  for side in (-1.0, 1.0):
    lungs = np.maximum(lungs, _ellipse(x, y, side * a["lung_cx"], a["lung_cy"],
                                       a["lung_rx"], a["lung_ry"], 2 * edge))
  lungs = lungs * (1.0 - below_dome)
  heart_r = a["heart_r"] * (1.6 if "cardiomegaly" in signs else 1.0)
  heart = _ellipse(x, y, a["heart_cx"], a["diaphragm"] - 0.2, heart_r * 1.15, heart_r, 6 * edge)
  spine = _soft(np.abs(x) - 0.075, edge) * body

  # Ribs: arcs sloping down and outwards from the spine, visible over the lungs.
  ax = np.abs(x)
  rib_y = y - (0.35 * ax * ax + 0.15 * ax)
  phase = (rib_y / a["rib_gap"] + a["rib_phase"]) % 1.0
  ribs = np.exp(-((phase - 0.5) / 0.12) ** 2) * _soft(ax - 0.75, edge) * _soft(0.08 - ax, edge)
  ribs *= _soft(y - a["diaphragm"] + 0.1, 3 * edge)

  img = 0.06 + 0.50 * body + 0.12 * below_dome * body
  img -= 0.36 * lungs * (1.0 - 0.8 * heart)
  img += 0.16 * heart * body + 0.14 * spine * (0.6 + 0.4 * lungs.max()) + 0.10 * ribs * body

  for cx, cy, sigma, amp in _opacities(rng, label, a):
    blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma * sigma))
    img += amp * blob * lungs
  if signs:   # own stream (spawned: `rng`'s draws stay as they are), so a film with and
              # without a finding differ by the sign only
    img += _signs(x, y, a, lungs, edge, signs, rng.spawn(1)[0])

  # Film/detector: low-frequency mottle, exposure (gamma, contrast).
  mottle = rng.normal(0.0, 1.0, (6, 6)).astype(np.float32)
  mottle_img = Image.fromarray(mottle, mode="F").resize((w, h), Image.Resampling.BICUBIC)
  img += 0.03 * np.asarray(mottle_img)
  img = np.clip(img, 0.0, 1.0) ** float(rng.uniform(0.8, 1.25))
  img = img * float(rng.uniform(0.85, 1.0)) + float(rng.uniform(0.0, 0.05))

  if (h, w) != (height, width):
    img = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize(
        (width, height), Image.Resampling.BICUBIC))
  img = img + rng.normal(0.0, 0.012, img.shape).astype(np.float32)  # quantum noise
  return np.clip(img, 0.0, 1.0).astype(np.float32)


def encode(img: np.ndarray, bit_depth: int, image_format: str, rgb: bool = False) -> bytes:
  """float [H, W] in [0, 1] -> PNG (8- or 16-bit grayscale) or JPEG bytes.

  rgb: an 8-bit grey film stored as RGB (R = G = B), as many public sets ship them.
  """
  buf = io.BytesIO()
  if bit_depth == 16:
    pil = Image.fromarray(np.round(img * 65535.0).astype(np.uint16))  # mode I;16
  else:
    pil = Image.fromarray(np.round(img * 255.0).astype(np.uint8), mode="L")
    if rgb:
      pil = pil.convert("RGB")
  if image_format == "jpeg":
    pil.save(buf, format="JPEG", quality=92)
  else:
    pil.save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def encode_dicom(img: np.ndarray, variant: str, *, patient_id: str = "", uid_seed: str = "") -> bytes:
  """float [H, W] in [0, 1] -> a DICOM file (Part 10, secondary capture) of one variant:

    monochrome1  12-bit, stored = 4095 (1 - v): white is low
    rescale      signed 12-bit, Rescale Slope 2 / Intercept 1000 (modality = 2 s + 1000)
    windowed     12-bit, Window Center/Width [2048, 600] / [4096, 800]: the first
                 window spans the stored range, a second one (a narrow view) follows
    rle          16-bit, RLE Lossless compressed (pydicom's own encoder)
    16bit        16-bit, uncompressed

  The film fills the stored range, and every variant carries a LINEAR window
  spanning it (`windowed` the one above, the others center = the middle of the
  modality range + 0.5, width = the range + 1). Rendered with
  --dicom_window=full each gives round(v * 65535) within one stored step; with
  viewer (the default) or file, round(v * 255) within one grey level.
  The UIDs derive from `uid_seed`, so the same arguments give the same bytes.
  """
  from pydicom import uid  # noqa: PLC0415
  if variant not in DICOM_VARIANTS:
    raise SyntheticError(f"unknown DICOM variant {variant!r}: one of {', '.join(DICOM_VARIANTS)}")
  v = np.clip(np.asarray(img, np.float64), 0.0, 1.0)
  ds = _dicom_dataset(variant, patient_id, uid_seed)
  photometric = "MONOCHROME2"
  if variant == "monochrome1":
    photometric, bits, stored = "MONOCHROME1", 12, np.rint((1.0 - v) * 4095)
  elif variant == "rescale":
    bits, stored = 12, np.rint(v * 4095) - 2048
  elif variant == "windowed":
    bits, stored = 12, np.rint(v * 4095)
  else:
    bits, stored = 16, np.rint(v * 65535)
  dtype = np.int16 if variant == "rescale" else np.uint16
  ds.set_pixel_data(stored.astype(dtype), photometric, bits, generate_instance_uid=False)
  if variant == "rescale":
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 2, 1000, "US"
  if variant == "windowed":
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = [2048, 600], [4096, 800], "LINEAR"
  else:   # a LINEAR window whose ends are the modality range's (PS3.3 C.11.2.1.2.1)
    lo, hi = (-2048 * 2 + 1000, 2047 * 2 + 1000) if variant == "rescale" else (0, 2 ** bits - 1)
    ds.WindowCenter, ds.WindowWidth = (lo + hi) / 2 + 0.5, hi - lo + 1
  if variant == "rle":
    ds.compress(uid.RLELossless, generate_instance_uid=False)
  buf = io.BytesIO()
  ds.save_as(buf, enforce_file_format=True)
  return buf.getvalue()


def _dicom_dataset(variant: str, patient_id: str, uid_seed: str):
  """A secondary-capture DX chest data set without pixels; UIDs from `uid_seed`."""
  from pydicom.dataset import Dataset, FileMetaDataset  # noqa: PLC0415
  from pydicom import uid  # noqa: PLC0415
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.SOPClassUID = uid.SecondaryCaptureImageStorage
  ds.SOPInstanceUID = uid.generate_uid(entropy_srcs=[uid_seed, variant])
  ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
  ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
  ds.StudyInstanceUID = uid.generate_uid(entropy_srcs=[uid_seed, "study"])
  ds.SeriesInstanceUID = uid.generate_uid(entropy_srcs=[uid_seed, "series", variant])
  ds.PatientID, ds.PatientName = patient_id, patient_id
  ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
  return ds


def store_dicom(values: np.ndarray, kind: str | StorageKind, *, window: bool,
                patient_id: str = "", uid_seed: str = "") -> bytes:
  """A grey film as a PACS export may store it (`STORAGE_KINDS`): float [H, W] -> DICOM bytes.

  values: what a viewer shows, 0 = black and 1 = white; with `window`, values outside 0..1
  are stored too (beyond the window: shown clipped), without it the film is meant to be
  shown from its lowest to its highest value. Modality value = low + v * span (MONOCHROME1:
  low + (1 - v) * span), stored = (modality - intercept) / slope, rounded.
  window: a LINEAR Window Center/Width in the file mapping low..low+span to black..white
  (center = low + span / 2 + 0.5, width = span + 1; PS3.3 C.11.2.1.2.1).
  So the file as a viewer shows it (`--dicom_window=viewer`) is clip(values, 0, 1) with the
  window, (values - min) / (max - min) without, within one 8-bit grey level.
  """
  from pydicom import uid  # noqa: PLC0415
  k = STORAGE_KINDS[kind] if isinstance(kind, str) else kind
  v = np.asarray(values, np.float64)
  m = k.low + (1.0 - v if k.photometric == "MONOCHROME1" else v) * k.span
  lo, hi = ((-(2 ** (k.bits - 1)), 2 ** (k.bits - 1) - 1) if k.signed else (0, 2 ** k.bits - 1))
  stored = np.clip(np.rint((m - k.intercept) / k.slope), lo, hi)
  ds = _dicom_dataset(f"{k}-{window}", patient_id, uid_seed)
  ds.set_pixel_data(stored.astype(np.int16 if k.signed else np.uint16), k.photometric, k.bits,
                    generate_instance_uid=False)
  if k.slope != 1.0 or k.intercept != 0.0:
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = k.slope, k.intercept, "US"
  if window:
    ds.WindowCenter, ds.WindowWidth = k.low + k.span / 2 + 0.5, k.span + 1
    ds.VOILUTFunction = "LINEAR"
  if k.rle:
    ds.compress(uid.RLELossless, generate_instance_uid=False)
  buf = io.BytesIO()
  ds.save_as(buf, enforce_file_format=True)
  return buf.getvalue()


# --------------------------------------------------------------------------
# The data set.
# --------------------------------------------------------------------------


def plan(num_images: int, num_classes: int, images_per_patient: int,
         with_splits: bool) -> list[tuple[str, str, int, int, int]]:
  """(split or "", class name, label, patient, image index) for every image.

  Patients are assigned to classes round robin; with splits, the first 70% of
  each class's patients go to train, then 15% to val and the rest to test
  (at least one patient per split when the class has three or more).
  """
  names = class_names(num_classes)
  num_patients = math.ceil(num_images / images_per_patient)
  by_class: dict[int, list[int]] = {k: [] for k in range(num_classes)}
  for p in range(num_patients):
    by_class[p % num_classes].append(p)
  split_of: dict[int, str] = {}
  for k, patients in by_class.items():
    n = len(patients)
    n_val = n_test = 0
    if with_splits and n >= 3:
      n_val = max(1, round(n * SPLIT_FRACTIONS[1][1]))
      n_test = max(1, round(n * SPLIT_FRACTIONS[2][1]))
    for i, p in enumerate(patients):
      if not with_splits:
        split_of[p] = ""
      elif i < n - n_val - n_test:
        split_of[p] = "train"
      elif i < n - n_test:
        split_of[p] = "val"
      else:
        split_of[p] = "test"
  items = []
  for i in range(num_images):
    p, j = divmod(i, images_per_patient)
    k = p % num_classes
    items.append((split_of[p], names[k], k, p, j))
  return items


def _prepare_output(output_dir: str, overwrite: bool) -> None:
  """Refuses a non-empty folder unless --overwrite and it is an earlier synthetic set."""
  if os.path.isdir(output_dir) and os.listdir(output_dir):
    if not overwrite:
      raise SyntheticError(f"{output_dir} is not empty: pass --overwrite to replace it")
    if not os.path.exists(os.path.join(output_dir, MARKER)):
      raise SyntheticError(f"{output_dir} is not empty and was not written by this "
                           "generator: refusing to delete it; choose another --output_dir")
    shutil.rmtree(output_dir)


def generate(output_dir: str, *, num_images: int = 200, size: int = 256,
             bit_depth: int = 8, num_classes: int = 2, seed: int = 0,
             with_splits: bool = False, images_per_patient: int = 1,
             image_format: str = "png", size_jitter: float = 0.0,
             dicom_variants: Sequence[str] = DICOM_VARIANTS, overwrite: bool = False,
             rgb: bool = False) -> dict:
  """Writes the data set; returns the summary also saved as OUTPUT/synthetic.json.

  rgb: 8-bit PNG/JPEG films stored as RGB with equal channels (grey stored as RGB).

  `size` is the image height; the width is `size` too unless `size_jitter`
  > 0, then each image's width is size * U(1 - jitter, 1) (mixed sizes, like
  real collections).
  """
  if num_images < 1:
    raise SyntheticError("--num_images must be >= 1")
  if num_classes < 2:
    raise SyntheticError("--classes must be >= 2 (a classifier needs two classes)")
  if size < 8:
    raise SyntheticError("--size must be >= 8 pixels")
  if bit_depth not in (8, 16):
    raise SyntheticError("--bit_depth must be 8 or 16")
  if image_format not in ("png", "jpeg", "dicom"):
    raise SyntheticError("--image_format must be png, jpeg or dicom")
  bad = [v for v in dicom_variants if v not in DICOM_VARIANTS]
  if image_format == "dicom" and (bad or not dicom_variants):
    raise SyntheticError(f"--dicom_variants: {', '.join(bad) or 'none given'}; choose from "
                         f"{', '.join(DICOM_VARIANTS)}")
  if image_format == "jpeg" and bit_depth == 16:
    raise SyntheticError("JPEG cannot hold 16-bit images: use --image_format=png")
  if images_per_patient < 1:
    raise SyntheticError("--images_per_patient must be >= 1")
  if rgb and (bit_depth == 16 or image_format == "dicom"):
    raise SyntheticError("--rgb needs 8-bit PNG or JPEG films")
  if not 0.0 <= size_jitter < 1.0:
    raise SyntheticError("--size_jitter must be in [0, 1)")
  _prepare_output(output_dir, overwrite)

  ext = {"png": "png", "jpeg": "jpeg", "dicom": "dcm"}[image_format]
  items = plan(num_images, num_classes, images_per_patient, with_splits)
  counts: dict[str, dict[str, int]] = {}
  anatomies: dict[int, dict] = {}
  for n, (split, cls, label, patient, j) in enumerate(items):
    if patient not in anatomies:
      anatomies[patient] = _anatomy(np.random.default_rng([seed, patient, 0]))
    rng = np.random.default_rng([seed, patient, j + 1])
    width = size
    if size_jitter:
      width = max(8, round(size * rng.uniform(1.0 - size_jitter, 1.0)))
    img = render(size, width, label, anatomies[patient], rng)
    folder = os.path.join(output_dir, split, cls) if split else os.path.join(output_dir, cls)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"p{patient:05d}_{j}.{ext}")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
      if image_format == "dicom":
        f.write(encode_dicom(img, dicom_variants[n % len(dicom_variants)],
                             patient_id=f"p{patient:05d}", uid_seed=f"{seed}/{patient}/{j}"))
      else:
        f.write(encode(img, bit_depth, image_format, rgb=rgb))
    os.replace(tmp, path)
    key = split or "all"
    counts.setdefault(key, {}).setdefault(cls, 0)
    counts[key][cls] += 1

  summary = {
      "tool": TOOL, "num_images": num_images, "size": size,
      "bit_depth": bit_depth, "classes": class_names(num_classes), "seed": seed,
      "with_splits": with_splits, "images_per_patient": images_per_patient,
      "image_format": image_format, "size_jitter": size_jitter,
      **({"rgb": True} if rgb else {}),
      **({"dicom_variants": list(dicom_variants)} if image_format == "dicom" else {}),
      "group_regex": r"^(p\d+)_", "counts": counts,
  }
  with open(os.path.join(output_dir, MARKER), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  return summary


# --------------------------------------------------------------------------
# Label-CSV sets: multi-label films as NIH ChestX-ray14 and CheXpert ship them.
# --------------------------------------------------------------------------

# The drawn signs (`_signs`, `render`) and each layout's name for them.
SIGNS = ("cardiomegaly", "effusion", "nodule", "pneumothorax", "consolidation")
LABEL_LAYOUTS = {
    "nih": ("Cardiomegaly", "Effusion", "Nodule", "Pneumothorax", "Consolidation"),
    "chexpert": ("Cardiomegaly", "Pleural Effusion", "Lung Lesion", "Pneumothorax",
                 "Consolidation"),
}
NIH_CSV = "Data_Entry_2017.csv"
NIH_LISTS = {"train": "train_val_list.txt", "test": "test_list.txt"}
CHEXPERT_CSVS = {"train": "train.csv", "val": "valid.csv"}
PREVALENCE = 0.3          # each finding present independently with this probability


def _age(patient: int) -> int:
  """A patient's age in years: spread over 5-94, as adult and paediatric sets hold them."""
  return 5 + (patient * 37) % 90


def _sex(patient: int, male: str, female: str) -> str:
  """A patient's sex as the layout spells it; every 13th patient "Unknown", as CheXpert has some."""
  if patient % 13 == 12:
    return "Unknown"
  return male if patient % 2 else female


def _chexpert_cell(rng: np.random.Generator, present: bool, consensus: bool) -> str:
  """A CheXpert label cell: train labels from reports (uncertain, blank), valid by consensus."""
  if consensus:
    return "1.0" if present else "0.0"
  u = float(rng.uniform())
  if present:
    return "1.0" if u < 0.85 else "-1.0"
  return "0.0" if u < 0.35 else ("" if u < 0.90 else "-1.0")


def generate_labelled(output_dir: str, layout: str, *, num_images: int = 200, size: int = 256,
                      bit_depth: int = 8, seed: int = 0, images_per_patient: int = 2,
                      image_format: str = "png", overwrite: bool = False) -> dict:
  """Writes a multi-label set in the NIH or CheXpert layout; returns its summary (synthetic.json).

  Each finding of LABEL_LAYOUTS[layout] is present independently (PREVALENCE)
  and drawn as its own visible sign (SIGNS), so a small CNN can learn each.

  nih:       OUTPUT/images_001/images/00000000_000.png (50 per folder, as NIH ships
             them), Data_Entry_2017.csv (Image Index, Finding Labels "A|B" or
             "No Finding", Follow-up #, Patient ID, Patient Age, Patient Gender, View
             Position, ...), train_val_list.txt and test_list.txt (a fifth of the patients).
             Ages spread over 5-94, sex M/F (every 13th patient "Unknown"), a third of
             the films AP, the rest PA: subgroups to report (tfrecord_tools.metadata).
  chexpert:  OUTPUT/{train,valid}/patient00000/study1/view1_frontal.png,
             train.csv / valid.csv (Path "<OUTPUT name>/train/...", Sex, Age,
             Frontal/Lateral, AP/PA, No Finding, one column per finding). train
             cells come "from reports": 1.0, -1.0 uncertain (15% of positives,
             10% of negatives), 0.0 or blank; valid cells are 1.0 / 0.0. Valid
             holds about 15% of the patients.

  The drawn truth is in the summary's "truth" ({file: [findings]}).
  """
  if layout not in LABEL_LAYOUTS:
    raise SyntheticError(f"--labels_layout must be one of {', '.join(LABEL_LAYOUTS)}")
  if num_images < 1 or size < 8 or images_per_patient < 1:
    raise SyntheticError("--num_images and --images_per_patient must be >= 1, --size >= 8")
  if image_format not in ("png", "jpeg") or bit_depth not in (8, 16) or (
      image_format == "jpeg" and bit_depth == 16):
    raise SyntheticError("label-CSV sets are 8- or 16-bit PNG or 8-bit JPEG")
  _prepare_output(output_dir, overwrite)
  names = LABEL_LAYOUTS[layout]
  ext = "png" if image_format == "png" else "jpg"
  root = os.path.basename(os.path.normpath(output_dir))
  rows: dict[str, list[list[str]]] = {}
  lists: dict[str, list[str]] = {}
  truth: dict[str, list[str]] = {}
  anatomies: dict[int, dict] = {}
  num_patients = math.ceil(num_images / images_per_patient)
  for i in range(num_images):
    patient, j = divmod(i, images_per_patient)
    if patient not in anatomies:
      anatomies[patient] = _anatomy(np.random.default_rng([seed, patient, 0]))
    label_rng = np.random.default_rng([seed, patient, j + 1, 7])
    present = [bool(label_rng.uniform() < PREVALENCE) for _ in names]
    rng = np.random.default_rng([seed, patient, j + 1])
    img = render(size, size, 0, anatomies[patient], rng,
                 signs=[sg for sg, p in zip(SIGNS, present) if p])
    held_out = patient % 20 >= (16 if layout == "nih" else 17)   # 20% test / 15% valid
    if layout == "nih":
      name = f"{patient:08d}_{j:03d}.{ext}"
      rel = f"images_{i // 50 + 1:03d}/images/{name}"
      found = [n for n, p in zip(names, present) if p]
      rows.setdefault("", []).append([name, "|".join(found) or "No Finding", str(j),
                                      str(patient), str(_age(patient)), _sex(patient, "M", "F"),
                                      "AP" if (patient + j) % 3 == 0 else "PA", str(size),
                                      str(size), "0.143", "0.143"])
      lists.setdefault("test" if held_out else "train", []).append(name)
    else:
      split = "valid" if held_out else "train"
      rel = f"{split}/patient{patient:05d}/study{j + 1}/view1_frontal.{ext}"
      cells = [_chexpert_cell(label_rng, p, split == "valid") for p in present]
      no_finding = "" if any(c in ("1.0", "-1.0") for c in cells) else "1.0"
      rows.setdefault(split, []).append([f"{root}/{rel}", _sex(patient, "Male", "Female"),
                                         str(_age(patient)), "Frontal",
                                         "AP" if (patient + j) % 3 == 0 else "PA", no_finding]
                                        + cells)
    truth[rel] = [n for n, p in zip(names, present) if p]
    path = os.path.join(output_dir, *rel.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(encode(img, bit_depth, image_format))

  def write_csv(name: str, header: list[str], body: list[list[str]]) -> None:
    with open(os.path.join(output_dir, name), "w", encoding="utf-8", newline="") as f:
      w = csv.writer(f, lineterminator="\n")
      w.writerow(header)
      w.writerows(body)

  if layout == "nih":
    write_csv(NIH_CSV, ["Image Index", "Finding Labels", "Follow-up #", "Patient ID",
                        "Patient Age", "Patient Gender", "View Position", "OriginalImage[Width",
                        "Height]", "OriginalImagePixelSpacing[x", "y]"], rows[""])
    for split, file in NIH_LISTS.items():
      with open(os.path.join(output_dir, file), "w", encoding="utf-8") as f:
        f.write("".join(n + "\n" for n in lists.get(split, [])))
    files = {"csv": NIH_CSV, "split_lists": NIH_LISTS}
  else:
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", *names]
    for split, file in (("train", "train.csv"), ("valid", "valid.csv")):
      write_csv(file, header, rows.get(split, []))
    files = {"csv": CHEXPERT_CSVS}
  summary = {
      "tool": TOOL, "labels_layout": layout, "num_images": num_images,
      "num_patients": num_patients, "size": size, "bit_depth": bit_depth, "seed": seed,
      "images_per_patient": images_per_patient, "image_format": image_format,
      "findings": list(names), "prevalence": PREVALENCE, **files,
      "positives": {n: sum(n in t for t in truth.values()) for n in names}, "truth": truth,
  }
  with open(os.path.join(output_dir, MARKER), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  return summary


# --------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------


def _define_flags() -> None:
  """Flags of the command; defined in run(), so importing this module defines none."""
  from absl import flags
  flags.DEFINE_string("output_dir", None, "Folder to write the class-per-folder images into.")
  flags.DEFINE_integer("num_images", 200, "Total number of images (classes balanced).")
  flags.DEFINE_integer("size", 256, "Image height (and width) in pixels; real X-rays: 2000-3000.")
  flags.DEFINE_enum("bit_depth", "8", ["8", "16"], "8-bit or 16-bit grayscale PNG.")
  flags.DEFINE_integer("classes", 2, "Number of classes: NORMAL plus classes with opacities.")
  flags.DEFINE_integer("seed", 0, "Seed: the same arguments write the same bytes.")
  flags.DEFINE_bool("with_splits", False, "Write train/val/test subfolders (70/15/15 by patient).")
  flags.DEFINE_integer("images_per_patient", 1, "Images per patient (file names p<id>_<n>).")
  flags.DEFINE_enum("image_format", "png", ["png", "jpeg", "dicom"], "File format (dicom: .dcm "
                    "files, the --dicom_variants in turn).")
  flags.DEFINE_list("dicom_variants", list(DICOM_VARIANTS), "With --image_format=dicom: the DICOM "
                    f"variants written in turn, from {', '.join(DICOM_VARIANTS)}.")
  flags.DEFINE_float("size_jitter", 0.0, "Width = size * U(1 - jitter, 1): mixed image sizes.")
  flags.DEFINE_bool("overwrite", False, "Replace an earlier synthetic set in --output_dir.")
  flags.DEFINE_bool("rgb", False, "Store the grey films as RGB (R = G = B), as many public sets do.")
  flags.DEFINE_enum("labels_layout", "folders", ["folders", *LABEL_LAYOUTS], "folders: class "
                    "per folder. nih / chexpert: a multi-label set with label CSVs as NIH "
                    "ChestX-ray14 / CheXpert ship them (each finding its own visible sign; "
                    "--classes, --with_splits and --size_jitter do not apply).")
  flags.mark_flag_as_required("output_dir")


def main(argv: Sequence[str]) -> None:
  from absl import flags
  from tfrecord_tools import cli
  cli.no_arguments(argv)
  f = flags.FLAGS
  if f.labels_layout != "folders":
    summary = generate_labelled(f.output_dir, f.labels_layout, num_images=f.num_images,
                                size=f.size, bit_depth=int(f.bit_depth), seed=f.seed,
                                images_per_patient=f.images_per_patient,
                                image_format=f.image_format, overwrite=f.overwrite)
    print(f"wrote {summary['num_images']} images ({f.labels_layout} layout) to {f.output_dir}: "
          f"positives {json.dumps(summary['positives'])}")
    return
  summary = generate(f.output_dir, num_images=f.num_images, size=f.size,
                     bit_depth=int(f.bit_depth), num_classes=f.classes, seed=f.seed,
                     with_splits=f.with_splits, images_per_patient=f.images_per_patient,
                     image_format=f.image_format, size_jitter=f.size_jitter,
                     dicom_variants=f.dicom_variants, overwrite=f.overwrite, rgb=f.rgb)
  print(f"wrote {summary['num_images']} images to {f.output_dir}: "
        + json.dumps(summary["counts"]))


def run() -> None:
  _entry.run_command(_define_flags, main)


if __name__ == "__main__":
  run()
