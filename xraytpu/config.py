"""One readable config module: every option of every xraytpu command, its default and why.

`Config` is a run's (train): a flat dataclass, logged at start and written to
`RUN/config.json`. `EvalConfig`, `PredictConfig`, `ExportConfig` and
`ServeOptions` are the options of evaluate, predict, export and serve. Each
field carries its flag help text; entry points define one absl flag per field
(`tfrecord_tools.cli.define_flags`, or `xraytpu.flags` for `Config`) and read
them back into the dataclass, so every default is written here once. Library
code takes these dataclasses (or plain values) and never reads flags.

Example run (the demo's settings):
  python -m xraytpu.train --data_dir=demo/tfrecords --model_dir=demo/run \
      --model=xray_cnn --image_size=128 --batch_size=32 --epochs=5

Ready flagfiles for the seed recipes are in configs/ (`--flagfile=configs/chexnet.flags`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

from tfrecord_tools import cli
from tfrecord_tools import pixels
from xraytpu import errors

# Augmentation presets. Names mirror keras' ImageDataGenerator arguments so
# notebook settings carry over (rotation in degrees, shifts/zoom as fractions).
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "none": dict(rotation_range=0.0, width_shift_range=0.0, height_shift_range=0.0,
                 zoom_range=0.0, shear_range=0.0, horizontal_flip=False,
                 vertical_flip=False, brightness_range=0.0, contrast_range=0.0),
    # Radiographs: small rotations/zoom/shift, mild exposure change, no flips
    # (anatomy is not left-right symmetric: the heart is on the left).
    "light": dict(rotation_range=10.0, width_shift_range=0.05, height_shift_range=0.05,
                  zoom_range=0.1, shear_range=0.0, horizontal_flip=False,
                  vertical_flip=False, brightness_range=0.1, contrast_range=0.1),
    # The COVID-CT tutorial's ImageDataGenerator settings, reproduced.
    "tutorial": dict(rotation_range=360.0, width_shift_range=0.2, height_shift_range=0.2,
                     zoom_range=0.2, shear_range=0.0, horizontal_flip=True,
                     vertical_flip=True, brightness_range=0.0, contrast_range=0.0),
}


DEFAULT_AUGMENT = "light"
_f = cli.field   # a dataclass field with its flag help text (and choices); no default = required


def _aug(name: str, help: str):  # noqa: A002
  """An augmentation field; its default is the default preset's value (written once, above)."""
  return _f(AUGMENT_PRESETS[DEFAULT_AUGMENT][name], help)


@dataclasses.dataclass
class Config:
  # ---- data -----------------------------------------------------------------
  data_dir: str = _f("", "Folder (local or gs://) written by tfrecord_tools.convert, holding dataset.json; "
                     "or tfds:NAME[/CONFIG][:VERSION], a TensorFlow Datasets image classifier set, "
                     "converted once (see --tfds_cache_dir).")
  tfds_data_dir: str = _f("", "With --data_dir=tfds:...: TFDS's data_dir (default: TFDS's own, ~/tensorflow_datasets).")
  tfds_manual_dir: str = _f("", "With --data_dir=tfds:...: TFDS's manual_dir, for sets downloaded by hand.")
  tfds_cache_dir: str = _f("", "With --data_dir=tfds:...: where its converted copy goes and is reused "
                           "(default: <TFDS data_dir>/xraytpu/<name>/<version>).")
  model_dir: str = _f("", "Run directory: config.json, history.csv, checkpoints/, model.keras, eval/, export/.")
  image_size: int = _f(224, "Side of the square image the model sees, in pixels.")
  channels: int = _f(0, "Channels fed to the model: 1, 3, or 0 = from the data set (1 if every image is grayscale).")
  aspect: str = _f("squash", "How a non-square image becomes square: squash (plain resize), pad (letterbox with black), center_crop.",
                   ("squash", "pad", "center_crop"))
  pixel_contract: int = _f(pixels.CONTRACT_VERSION,
                           "Version of the pixel contract's reading steps (tfrecord_tools.pixels, steps "
                           "7-8) the run trains with, and then evaluates, predicts, serves and exports "
                           f"with: {' or '.join(map(str, pixels.READ_CONTRACTS))}. 5: a lossless image is "
                           "reduced by the same power of two as a JPEG's DCT-scaled decode, and AREA "
                           "resampling when shrinking; 4: what runs trained before 5 read (bilinear "
                           "with antialiasing). Only to reproduce an old run.")
  cache: str = _f("auto", "Cache the decoded, resized uint8 images: 'auto' (memory if they fit half the available RAM, else a file under --cache_dir if the disk has room, else off), 'memory', 'off', or a file path prefix.")
  cache_dir: str = _f("", "Folder of --cache=auto's file cache (empty = the system temp folder).")
  shuffle_buffer: int = _f(4096, "Shuffle buffer in examples (after the cache; capped at the split size).")
  deterministic: bool = _f(False, "Deterministic input order even when training (slower interleave).")
  private_threads: int = _f(0, "Give tf.data a private thread pool of this size (0 = shared pool).")
  ram_budget_mb: int = _f(0, "RAM budget for tf.data autotuning in MiB (0 = TensorFlow's default).")
  data_service_address: str = _f("", "grpc://host:port of a tf.data service dispatcher; empty = preprocess in this process.")
  # ---- augmentation (runs inside the model, on the device, training only) ---
  augment: str = _f(DEFAULT_AUGMENT, "Augmentation preset; the individual flags below override it. "
                    "light (the default) suits radiographs: small rotation, zoom and shift, mild "
                    "brightness/contrast, never a flip (the heart is on the left); tutorial flips.",
                    tuple(AUGMENT_PRESETS))
  rotation_range: float = _aug("rotation_range", "Random rotation, +- degrees (ImageDataGenerator semantics).")
  width_shift_range: float = _aug("width_shift_range", "Random horizontal shift, fraction of width.")
  height_shift_range: float = _aug("height_shift_range", "Random vertical shift, fraction of height.")
  zoom_range: float = _aug("zoom_range", "Random zoom, +- fraction.")
  shear_range: float = _aug("shear_range", "Random shear, +- degrees.")
  horizontal_flip: bool = _aug("horizontal_flip", "Random left-right flips (off for chest films: anatomy is not symmetric).")
  vertical_flip: bool = _aug("vertical_flip", "Random up-down flips.")
  brightness_range: float = _aug("brightness_range", "Random brightness change, +- fraction of the full range.")
  contrast_range: float = _aug("contrast_range", "Random contrast change, +- fraction.")
  # Not in the presets (the recipes were measured without it): its own flag, off by default.
  low_resolution_range: float = _f(0.0, "Films that arrive at low resolution: half the training "
                                   "films are downscaled (area) to a random side between this "
                                   "fraction of --image_size and the full side, then upscaled back "
                                   "as the model's input resize does, in [0, 1) (0 = off; 0.2 at "
                                   "128 px reaches 26 px, e.g. 28 px MedMNIST films).")
  # Model Garden's mixup_and_cutmix (image classification's ImageClassificationConfig
  # parser: mixup_and_cutmix.mixup_alpha / cutmix_alpha, switch_prob 0.5).
  mixup_alpha: float = _f(0.0, "Mixup: each training batch is mixed with its reverse, images and "
                          "labels, lam ~ Beta(alpha, alpha) per film (0 = off; Model Garden uses 0.8).")
  cutmix_alpha: float = _f(0.0, "CutMix: a box of the partner film pasted in, labels weighted by area, "
                           "lam ~ Beta(alpha, alpha) (0 = off; Model Garden uses 1.0). With "
                           "--mixup_alpha too, each batch takes one of the two, cutmix half the time.")
  # ---- model ---------------------------------------------------------------
  model: str = _f("xray_cnn", "Architecture name from xraytpu.models.MODELS.")
  weights: str = _f("none", "Backbone weights: 'imagenet', 'none', or a path to a .weights.h5/.h5 file.")
  head: str = _f("default", "Classifier head: 'default' (the architecture's seed head), 'inception', 'xception', 'simple'.")
  dropout: float = _f(-1.0, "Override the head's dropout rate (-1 = the seed's value).")
  init_from: str = _f("", "Warm start: RUN_DIR, a finished xraytpu.train run of the same --model (on "
                      "any data: multi-label NIH, CheXpert, ...), gives this run's backbone (every "
                      "layer up to the features) its best weights; the head and output are new, for "
                      "this data's classes or findings. All layers then train at --learning_rate; "
                      "with --fine_tune_at/--fine_tune_epochs the backbone stays frozen for --epochs "
                      "(the new head alone), then fine-tunes. Empty = off.")
  fine_tune_at: int = _f(-1, "Backbone models, and any model with --init_from: after the frozen phase, "
                         "unfreeze backbone layers from this index on (-1 = no second phase, 0 = all).")
  fine_tune_epochs: int = _f(0, "Epochs of the fine-tuning phase (added after --epochs).")
  fine_tune_learning_rate: float = _f(1e-5, "Learning rate of the fine-tuning phase.")
  # ---- training --------------------------------------------------------------
  strategy: str = _f("default", "Distribution strategy.", ("default", "one_device", "mirrored", "multi_worker", "tpu"))
  tpu: str = _f("local", "With --strategy=tpu: TPU name, grpc:// address, or 'local' on a TPU VM.")
  batch_size: int = _f(32, "Global batch size (per-replica batch = this / replicas).")
  epochs: int = _f(10, "Training epochs (first phase).")
  steps_per_epoch: int = _f(0, "Steps per epoch, >= 0 (0 = one pass over the training split, from the manifest).")
  optimizer: str = _f("adam", "Optimizer.", ("adam", "adamw", "sgd", "rmsprop"))
  learning_rate: float = _f(1e-3, "Peak learning rate.")
  lr_schedule: str = _f("constant", "Learning-rate schedule after warmup.", ("constant", "exponential", "cosine"))
  warmup_epochs: float = _f(0.0, "Linear warmup length in epochs.")
  weight_decay: float = _f(0.0, "Weight decay (adamw) or L2-style decay for sgd.")
  class_weight: str = _f("balanced", "Class weights: 'balanced' (scikit-learn's definition, from the manifest) or 'none'.", ("balanced", "none"))
  label_smoothing: float = _f(0.0, "Label smoothing for the loss, in [0, 1): targets move towards "
                              "1/K (binary and multi-label: towards 0.5) by this fraction (0 = off).")
  ema_decay: float = _f(0.0, "Exponential moving average of the weights, its decay per step in [0, 1) "
                        "(0 = off; Model Garden's average_decay is 0.9999 for long runs: about "
                        "1/(1 - decay) steps are averaged). Validation, the best checkpoint, "
                        "model.keras, evaluate and export use the averaged weights.")
  mixed_precision: str = _f("auto", "Mixed precision: auto = bfloat16 on TPU, float16 on GPU, off on CPU.", ("auto", "off", "bfloat16", "float16"))
  steps_per_execution: int = _f(1, "Training steps per compiled call (raise on TPU).")
  jit_compile: bool = _f(False, "XLA-compile the train step (always on for TPU).")
  early_stopping_patience: int = _f(0, "Stop after this many epochs without val AUC improvement (0 = off).")
  reduce_lr_patience: int = _f(0, "Halve the LR after this many epochs without val AUC improvement (0 = off).")
  seed: int = _f(42, "Random seed for weights, shuffling and augmentation.")
  profile_steps: str = _f("", "START,END (or one step N): write a TensorFlow profiler trace of these training "
                          "steps, counted from 1 in each phase, to the TensorBoard log folder (Keras' "
                          "profile_batch); empty = off.")
  overwrite: bool = _f(False, "Allow replacing a finished run in --model_dir.")
  model_license: str = _f("", "Licence of the trained model, as its model card's YAML header states it "
                          "(a Hugging Face / SPDX id such as apache-2.0 or cc-by-nc-4.0; the training "
                          "data's terms bind it too). Empty: unknown.")

  # --help groups the flags by these topics (tfrecord_tools.cli.help_text); the rest: "training".
  FLAG_TOPIC: ClassVar[str] = "training"
  FLAG_TOPICS: ClassVar[dict[str, tuple[str, ...]]] = {
      "data": ("data_dir", "tfds_data_dir", "tfds_manual_dir", "tfds_cache_dir", "image_size",
               "channels", "aspect", "pixel_contract", "cache", "cache_dir", "shuffle_buffer",
               "deterministic", "private_threads", "ram_budget_mb", "data_service_address"),
      "augmentation": ("augment",) + tuple(AUGMENT_PRESETS["none"])
                      + ("low_resolution_range", "mixup_alpha", "cutmix_alpha"),
      "model": ("model", "weights", "init_from", "head", "dropout"),
      "distribution": ("strategy", "tpu", "mixed_precision", "steps_per_execution", "jit_compile"),
      "run directory": ("model_dir", "overwrite", "profile_steps", "model_license"),
  }

  def resolve_augment(self, explicit: set[str] | None = None) -> "Config":
    """Applies `augment`'s preset to every augmentation field not in `explicit`."""
    preset = AUGMENT_PRESETS[self.augment]
    explicit = explicit or set()
    return dataclasses.replace(self, **{k: v for k, v in preset.items() if k not in explicit})

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Config":
    """Rebuilds a Config from config.json (unknown keys are ignored; a key written before
    its field existed takes the value that reproduces that run, LEGACY_VALUES)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**LEGACY_VALUES, **{k: v for k, v in d.items() if k in names}})


# What a config.json without the field meant: the run was trained before the field existed.
LEGACY_VALUES: dict[str, Any] = {"pixel_contract": pixels.LEGACY_READ_CONTRACT}


AUGMENT_FIELDS = tuple(AUGMENT_PRESETS["none"])


# Test-time augmentation (evaluate --tta, then predict, serve and export as evaluate chose):
# the model's outputs are averaged over views of each image. A view is a square crop box
# (side as a fraction of the S x S model input; its position in the free margin: -1 top/left,
# 0 centred, +1 bottom/right) resized back to S by the pixel contract's resize
# (xraytpu.inference.tta). Radiograph-safe: zoom-in and small shifts within what --augment=light
# trains with (zoom 10%, shift 5%): an 8% zoom, shifts of 4% of S; never a flip (anatomy has a
# side) and no border to fill (every box lies inside the image).
TTA_VIEWS: dict[str, tuple[float, int, int]] = {
    "identity": (1.0, 0, 0), "zoom": (0.92, 0, 0),
    "top": (0.92, -1, 0), "bottom": (0.92, 1, 0), "left": (0.92, 0, -1), "right": (0.92, 0, 1)}
TTA_PRESETS: dict[str, tuple[str, ...]] = {
    "none": ("identity",),
    "zoom": ("identity", "zoom"),
    "shift": ("identity", "zoom", "top", "bottom", "left", "right"),
}
DEFAULT_TTA = "none"   # what a run whose threshold.json names no TTA applies

# ---- the other commands ------------------------------------------------------
# Bootstrap confidence intervals: xraytpu.evaluation.metrics' defaults too.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
RUN_DIR_HELP = ("Run directory written by xraytpu.train, or an ensemble's directory; or several run "
                "directories, comma-separated: an ensemble averaging their probabilities (see "
                "--ensemble_dir).")
ENSEMBLE_DIR_HELP = ("With several comma-separated run directories in --model_dir: the ensemble's own "
                     "folder (xraytpu.run.ensemble), created, or reused when it names the same runs; "
                     "it holds ensemble.json and, as a run does, threshold.json, eval/, export/ and "
                     "the model card, and is then the model directory. The runs' raw probabilities are "
                     "averaged. evaluate and export need it; predict and serve without it average in "
                     "memory, with no operating point.")


@dataclasses.dataclass
class EvalConfig:
  """What `python -m xraytpu.evaluate` takes (see xraytpu.evaluation.evaluate_lib.evaluate)."""
  FLAG_TOPIC: ClassVar[str] = "evaluation"   # --help heading
  model_dir: str = _f(help=RUN_DIR_HELP)
  ensemble_dir: str = _f("", ENSEMBLE_DIR_HELP)
  data_dir: str = _f("", "Converted data set to evaluate (default: the run's training data). "
                     "Its classes must be known to the model (matched by name).")
  split: str = _f("test", "Split to evaluate (train, val or test).")
  threshold_policy: str | None = _f(None, "How to choose the binary threshold (multi-label: each finding's) "
                                    "on the val split: youden | sensitivity:X | specificity:X | fixed:X; "
                                    "sensitivity:X:lower | specificity:X:lower hold X at the 95% exact "
                                    "(Clopper-Pearson) lower confidence bound on val, not only at the point "
                                    "estimate (too few val positives/negatives: the point estimate, with a "
                                    "warning). Default: keep RUN/threshold.json, or youden when there is "
                                    "none.")
  temperature_scaling: bool | None = _f(None, "Fit a temperature on val and calibrate the probabilities "
                                        "(default: keep what RUN/threshold.json says; off when there is none).")
  bootstrap_resamples: int = _f(BOOTSTRAP_RESAMPLES, "Bootstrap resamples for the 95% CIs.")
  bootstrap_seed: int = _f(BOOTSTRAP_SEED, "Seed of the bootstrap.")
  batch_size: int = _f(0, "Evaluation batch size (0 = the run's).")
  plots: bool = _f(True, "Write the PNG plots (--noplots: numbers only, faster).")
  out_dir: str = _f("", "Report folder (default RUN/eval/<dataset>-<split>).")
  allow_data_change: bool = _f(False, "Evaluate even when the run's training data changed since "
                               "training (its digest differs from config.json's): the change, and "
                               "the films the model trained on, are named in the report and the card.")
  tta: str | None = _f(None, "Test-time augmentation: the model's outputs averaged over views of each "
                       "film: none | zoom (the film and an 8% zoom-in: 2 views) | shift (those and "
                       "the zoom-in shifted 4% up, down, left and right: 6 views); never a flip. The "
                       "threshold is chosen on val with it and RUN/threshold.json records it, so "
                       "predict, serve and export apply it too. Default: keep RUN/threshold.json's "
                       "(none when it names none).", tuple(TTA_PRESETS))


@dataclasses.dataclass
class PredictConfig:
  """What `python -m xraytpu.predict` takes besides the paths (see xraytpu.inference.predict_lib.run_predict)."""
  FLAG_TOPIC: ClassVar[str] = "prediction"   # --help heading
  FLAG_ALIASES: ClassVar[dict[str, str]] = {"window": "dicom_window"}   # its name before the rename
  model_dir: str = _f(help=RUN_DIR_HELP)
  ensemble_dir: str = _f("", ENSEMBLE_DIR_HELP)
  output: str = _f("", "Also write the predictions to FILE.csv or FILE.jsonl.")
  gradcam: str = _f("", "Write a Grad-CAM overlay PNG per image to this folder.")
  dicom_window: str = _f("auto", "How DICOM files are rendered (tfrecord_tools.dicom): auto = as the "
                   "run's training data was converted (its --dicom_window), so predict sees what training saw; "
                   "or viewer (the file's VOI LUT / window, else the image's value range), full (16-bit, "
                   "the modality range), file (the file's VOI LUT / window), none, "
                   "CENTER,WIDTH in modality units (HU for CT) or lung, mediastinum, soft_tissue, bone, "
                   "brain.")
  batch_size: int = _f(32, "Images per model call.")
  max_pixels: int = _f(50_000_000, "Most pixels (width x height, x frames for DICOM) per image, read "
                       "from the file header before decoding; larger files are reported, not decoded.")


@dataclasses.dataclass
class ExportConfig:
  """What `python -m xraytpu.export` takes (see xraytpu.inference.export_lib.export)."""
  FLAG_TOPIC: ClassVar[str] = "exporting"   # --help heading
  model_dir: str = _f(help=RUN_DIR_HELP)
  ensemble_dir: str = _f("", ENSEMBLE_DIR_HELP)
  version: int = _f(0, "Integer version folder (0 = the next free one).")
  export_dir: str = _f("", "Parent folder of the version folders (default RUN/export), e.g. a TF Serving "
                       "model base path.")


class ServeError(errors.UserError):
  """A user mistake at start-up (missing run, bad option, port in use); one line for the user."""


def is_loopback(host: str) -> bool:
  """Whether `host` (serve's --host) is reachable from this machine only."""
  import ipaddress
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


@dataclasses.dataclass
class ServeOptions:
  """What `python -m xraytpu.serve` takes (see xraytpu.serving.http_api.serve); fields without help are not flags."""
  FLAG_TOPIC: ClassVar[str] = "serving"   # --help heading
  model_dir: str = _f(help=RUN_DIR_HELP)
  ensemble_dir: str = _f("", ENSEMBLE_DIR_HELP)
  host: str = _f("127.0.0.1", "Address to listen on. Any address but a loopback one (127.0.0.1, ::1, "
                 "localhost) needs --auth_token_file, or --allow_unauthenticated.")
  port: int = _f(8080, "Port to listen on (0 = any free port, printed at start-up).")
  max_upload_mb: float = _f(32.0, "Largest request body in MiB (checked from Content-Length before reading).")
  max_files: int = _f(16, "Most images in one request.")
  max_pixels: int = _f(50_000_000, "Most pixels (width x height) per image, read from the file header "
                       "before decoding.")
  batch_timeout_ms: float = _f(5.0, "How long the model waits for more concurrent requests after the "
                               "first, ms.")
  max_batch: int = _f(8, "Most images per model call. GPU/TPU: try 32+. CPU: measure with "
                      "benchmarks/serve_load.py; 1 (no batching) can be faster for 224-px models.")
  decode_budget: int = _f(100_000_000, "Most pixels (width x height, from the file headers) being decoded "
                          "at once across all requests; more wait. The memory bound: see docs/serving.md.")
  max_inflight: int = _f(64, "Most prediction requests in the server at once (reading, decoding or "
                         "waiting for the model); more wait, then get 503.")
  header_timeout_s: float = _f(10.0, "A request's line and headers must arrive within this many seconds "
                               "(else 408 and the connection is closed).")
  body_timeout_s: float = _f(60.0, "A request's whole body must arrive within this many seconds (else 408).")
  request_timeout_s: float = 60.0  # the wait for a request slot and for the model (then 503)
  model_name: str = _f("", "Name in TF Serving's /v1/models/<name> (empty = the run's model name; "
                       "'default' is always accepted too).")
  access_log: bool = _f(True, "Log one line per request on stderr (never a token).")
  auth_token_file: str = _f("", "File of bearer tokens, one per line ('#' comments and blank lines "
                            "skipped; 16-512 characters of A-Z a-z 0-9 - . _ ~ + / =). When set, every "
                            "request but GET /healthz and the page's own files needs 'Authorization: "
                            "Bearer <token>' (else 401). Format and how to make one: docs/serving.md.")
  allow_unauthenticated: bool = _f(False, "Serve a non-loopback --host without --auth_token_file: anyone "
                                   "who can reach the port can use it (e.g. behind Vertex AI's own IAM).")
  ssl_certfile: str = _f("", "TLS certificate chain (PEM): serve HTTPS. Without --ssl_keyfile the file must "
                         "hold the private key too.")
  ssl_keyfile: str = _f("", "TLS private key (PEM) of --ssl_certfile.")

  def validate(self) -> None:
    if not self.model_dir:
      raise ServeError("--model_dir is required: a run directory written by xraytpu.train")
    if not 0 <= self.port <= 65535:
      raise ServeError(f"--port={self.port}: must be 0..65535 (0 = any free port)")
    checks = [(self.max_upload_mb > 0, f"--max_upload_mb={self.max_upload_mb}: must be > 0"),
              (self.max_files >= 1, f"--max_files={self.max_files}: must be >= 1"),
              (self.max_pixels >= 1, f"--max_pixels={self.max_pixels}: must be >= 1"),
              (self.batch_timeout_ms >= 0, f"--batch_timeout_ms={self.batch_timeout_ms}: must be >= 0"),
              (self.max_batch >= 1, f"--max_batch={self.max_batch}: must be >= 1"),
              (self.max_inflight >= 1, f"--max_inflight={self.max_inflight}: must be >= 1"),
              (self.decode_budget >= self.max_pixels,
               f"--decode_budget={self.decode_budget}: must be >= --max_pixels={self.max_pixels} "
               "(one image of the largest size must fit)"),
              (self.header_timeout_s > 0, f"--header_timeout_s={self.header_timeout_s}: must be > 0"),
              (self.body_timeout_s > 0, f"--body_timeout_s={self.body_timeout_s}: must be > 0"),
              (self.request_timeout_s > 0, f"request_timeout_s={self.request_timeout_s}: must be > 0"),
              (self.ssl_certfile or not self.ssl_keyfile,
               f"--ssl_keyfile={self.ssl_keyfile}: needs --ssl_certfile (the certificate it belongs to)"),
              (is_loopback(self.host) or self.auth_token_file or self.allow_unauthenticated,
               f"--host={self.host} serves anyone who can reach this machine and there is no "
               "authentication: give --auth_token_file=PATH (docs/serving.md), or "
               "--allow_unauthenticated to serve it open on purpose")]
    for ok, message in checks:
      if not ok:
        raise ServeError(message)

  @property
  def max_upload_bytes(self) -> int:
    return int(self.max_upload_mb * (1 << 20))
