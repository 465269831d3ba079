r"""Image folders -> sharded, validated TFRecords + dataset.json.

  python -m tfrecord_tools.convert --input_dir=data/chest_xray --output_dir=gs://bucket/chest_xray \
      [--val_fraction=0.15 --test_fraction=0.15 --seed=0] [--group_regex='^(\w+?)_'] \
      [--class_map=NORMAL=Normal,PNEUMONIA=BacterialPneumonia+ViralPneumonia] \
      [--max_side=1024 --image_format=keep|png|jpeg --channels=keep|1|3] \
      [--num_shards=0 --num_workers=0 --max_skipped_fraction=0.05 --overwrite] \
      [--input_format=folders|keras_pair] \
      [--runner=local|beam --beam_pipeline_options="--runner=DataflowRunner ..."]

Input layouts: input/<split>/<class>/* (train, val, test taken as they are) or
input/<class>/* (splits drawn with the fractions). The work is done by
`tfrecord_tools.convert_lib.convert`; see its docstring for every step.
--runner=beam runs the same steps as an Apache Beam pipeline
(`tfrecord_tools.beam_convert`; needs `pip install 'xraytpu[beam]'`).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Sequence

from absl import app, flags

from tfrecord_tools import convert_lib, pixels, storage

_INPUT_DIR = flags.DEFINE_string("input_dir", None, "Folder of images: input/<class>/* or "
                                 "input/<split>/<class>/*; for keras_pair, the folder of the "
                                 "images.tfrec + paths.tfrec pair (or of train/, test/ with one).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where shards and dataset.json go "
                                  "(local path or gs://bucket/path).")
_INPUT_FORMAT = flags.DEFINE_enum("input_format", "folders", list(convert_lib.INPUT_FORMATS),
                                  "folders: image files, class per folder. keras_pair: the Keras "
                                  "TPU pneumonia example's images.tfrec + paths.tfrec.")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", convert_lib.DEFAULT_FRACTION, "Fraction drawn "
                                   "into val (stratified, seeded) from train; by default only when "
                                   "the input has no val folder, else the folder is the split "
                                   "(0: no val split; training then has no validation AUC).")
_TEST_FRACTION = flags.DEFINE_float("test_fraction", convert_lib.DEFAULT_FRACTION, "Fraction drawn "
                                    "into test; by default only when the input has no test "
                                    "folder (0: no test split).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the split and of the shard order.")
_GROUP_REGEX = flags.DEFINE_string("group_regex", "", "Regex whose first group is the patient id, "
                                   "searched in the file name (in the relative path when it "
                                   "contains '/'); drawn splits then keep each patient in one "
                                   "split.")
_CLASS_MAP = flags.DEFINE_string("class_map", "", "Merge/rename/drop classes: "
                                 "NEW=OLD[+OLD...],NAME,...; its order is the label order; "
                                 "source classes not named are dropped (and counted). Default "
                                 "order: sorted, a normal/negative class (Normal, Healthy, "
                                 "NonX beside X, ...) first, so with two classes label 1, the "
                                 "positive class of sensitivity and PPV, is the finding.")
_MAX_SIDE = flags.DEFINE_integer("max_side", 0, "Shrink so the longer side is at most this many "
                                 "pixels (aspect kept); 0 keeps the size. The fast path for "
                                 "large X-rays.")
_IMAGE_FORMAT = flags.DEFINE_enum("image_format", "keep", list(pixels.IMAGE_FORMATS),
                                  "keep: JPEG stays JPEG, other formats become PNG.")
_CHANNELS = flags.DEFINE_enum("channels", "keep", list(pixels.CHANNELS),
                              "keep: grayscale stays 1 channel, color 3; or force 1 or 3.")
_JPEG_QUALITY = flags.DEFINE_integer("jpeg_quality", pixels.JPEG_QUALITY,
                                     "Quality of JPEGs the converter encodes.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 0, "Shards per split (at most one per image); "
                                   "0: from the data size (~150 MB per shard).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Worker processes; 0: all cores.")
_MAX_SKIPPED = flags.DEFINE_float("max_skipped_fraction", 0.05, "Fail (no manifest) when more "
                                  "than this fraction of the files found cannot be converted.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a complete earlier output.")
_NAME = flags.DEFINE_string("name", "", "Data set name in the manifest (default: output folder).")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress line.")
_RUNNER = flags.DEFINE_enum("runner", "local", ["local", "beam"], "local: a process pool on "
                            "this machine. beam: an Apache Beam pipeline (DirectRunner, "
                            "Dataflow, Flink, Spark), same output.")
_BEAM_OPTIONS = flags.DEFINE_string("beam_pipeline_options", "", "With --runner=beam: Beam's "
                                    "own flags as one string, e.g. \"--runner=DataflowRunner "
                                    "--project=P --region=R --temp_location=gs://B/tmp\". "
                                    "Default: the DirectRunner on --num_workers processes.")

flags.mark_flags_as_required(["input_dir", "output_dir"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  def fraction(flag) -> float:   # not given: the input's own split folder wins
    return flag.value if flags.FLAGS[flag.name].present else convert_lib.AUTO_FRACTION

  opts = convert_lib.ConvertOptions(
      input_dir=_INPUT_DIR.value, output_dir=_OUTPUT_DIR.value,
      input_format=_INPUT_FORMAT.value, val_fraction=fraction(_VAL_FRACTION),
      test_fraction=fraction(_TEST_FRACTION), seed=_SEED.value, group_regex=_GROUP_REGEX.value,
      class_map=_CLASS_MAP.value, max_side=_MAX_SIDE.value, image_format=_IMAGE_FORMAT.value,
      channels=_CHANNELS.value, jpeg_quality=_JPEG_QUALITY.value, num_shards=_NUM_SHARDS.value,
      num_workers=_NUM_WORKERS.value, max_skipped_fraction=_MAX_SKIPPED.value,
      overwrite=_OVERWRITE.value, name=_NAME.value, quiet=_QUIET.value)
  if _BEAM_OPTIONS.value and _RUNNER.value != "beam":
    raise app.UsageError("--beam_pipeline_options needs --runner=beam")
  try:
    if _RUNNER.value == "beam":
      if importlib.util.find_spec("apache_beam") is None:
        raise convert_lib.ConvertError("--runner=beam needs Apache Beam: "
                                       "pip install 'xraytpu[beam]'")
      from tfrecord_tools import beam_convert  # only with Beam installed
      manifest = beam_convert.convert(opts, _BEAM_OPTIONS.value)
    else:
      manifest = convert_lib.convert(opts)
  except (convert_lib.ConvertError, storage.StorageError) as e:
    print(f"convert: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(convert_lib.summary_table(manifest))
  print(f"converted {manifest['num_converted']} of {manifest['num_found']} files "
        f"(skipped {manifest['num_skipped']}, dropped {manifest['num_dropped']}) "
        f"in {manifest['elapsed_s']:.1f} s, {manifest['images_per_sec']:.1f} img/s "
        f"-> {opts.output_dir}")


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
