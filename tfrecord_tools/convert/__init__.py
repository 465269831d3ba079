"""Image folders (or label CSVs) -> sharded, validated TFRecords + dataset.json.

`convert(ConvertOptions(input_dir=..., output_dir=...))` does the whole job;
`python -m tfrecord_tools.convert` (`__main__.py`) is its thin command line.
One chain of stages, each in its own module (`pipeline.convert` runs them):

  opts = ConvertOptions(...)           # options.py: the flags, check_options, ConvertError
  found = find_files(opts.input_dir)   # 1. find.py: walk the input (symlinks followed,
      # hidden files skipped) and list image-like files as `Source`s, sorted by path
      # (DICOM: .dcm, .dicom, and files without an extension that carry the DICM
      # preamble). Layouts:
      #   input/<split>/<class>/**/*   splits as given (train, val or validation, test)
      #   input/<class>/**/*           splits drawn by --val_fraction / --test_fraction / --seed
      # or find_keras_pair: the Keras TPU example's `images.tfrec` + `paths.tfrec` (in
      # input/ or input/<split>/), whose path's parent folder is the class;
      # or labelled_items (1b. labelled.py, --labels_csv): the images the label CSV rows
      # name under input/ (NIH, CheXpert/MIMIC, RSNA or set by hand: `tfrecord_tools.labels`),
      # multi-label or single-label; it takes stages 2 and 3 itself.
  classes, mapping = resolve_classes(found, opts.class_map)
      # 2. classes.py: sorted source class names (a normal/negative class first), or
      # --class_map ("NORMAL=Normal,PNEUMONIA=Bacterial+Viral": its order is the label
      # order; unnamed source classes are dropped and counted). Every split must have
      # the same classes.
  found = dedupe(found, mapping, ...)  # 3. split.py: identical files (sha256) converted
  items = make_items(found, ...)       #    once, kept in one split, or a conflict; splits
      # stratified by class, seeded by hashing (seed, name), and by patient when
      # --group_regex, --group_by=dicom_patient_id (the DICOM header's PatientID) or the
      # file names (split.detect_grouping) show one: a patient's images all go to one split.
  plan = plan_shards(items, opts)      # 4. plan.py: each split's files shuffled (seeded
      # hash order) and cut into `split-%05d-of-%05d.tfrecord` shards.
  run_locally(todo, opts, log)         # 5. plan.py: one task per shard
      # (`shards.write_shard`), run by a crash-tolerant pool of worker processes
      # (`pool.run`; a small job: this process, its images on the cores as threads,
      # `shards._ordered_map`): read, `pixels.prepare_image` (decode = validate, normalise,
      # resize), serialise a `tf.train.Example` (`records`), write. Bad files are
      # skipped with a reason. A shard is written to `<name>.tmp-N` and renamed when
      # complete, with its statistics saved beside it in `.convert-state/`, so a killed
      # run started again reuses the finished shards and redoes the rest. Only this
      # step is pluggable (`run_tasks`; beam.py runs it with Apache Beam, through the
      # same `shards` writer).
  dataset.json, summary_table(manifest)
      # 6. pipeline.py: the manifest (format in `schema.py`) is written last,
      # atomically: its presence marks a complete output; then TFDS's metadata.

Same input + same arguments -> byte-identical shards (the Example is
serialised with sorted feature keys; encoders are deterministic; no times or
process ids go into shards). Workers need no TensorFlow for local output:
`records` serialises the Example and frames the TFRecords by hand; neither
does importing this package.
"""

from tfrecord_tools.convert.classes import default_class_order, parse_class_map, resolve_classes
from tfrecord_tools.convert.find import Found, find_files, find_keras_pair
from tfrecord_tools.convert.labelled import find_labelled
from tfrecord_tools.convert.options import (AUTO_FRACTION, DEFAULT_FRACTION, SPLIT_ALIASES,
                                            ConvertError, ConvertOptions)
from tfrecord_tools.convert.pipeline import convert, summary_table
from tfrecord_tools.convert.plan import default_num_shards, plan_shards
from tfrecord_tools.convert.split import assign_splits, dedupe
from tfrecord_tools.shards import Source

__all__ = [
    "AUTO_FRACTION", "DEFAULT_FRACTION", "SPLIT_ALIASES", "ConvertError", "ConvertOptions", "Found",
    "Source", "assign_splits", "convert", "dedupe", "default_class_order", "default_num_shards",
    "find_files", "find_keras_pair", "find_labelled", "parse_class_map", "plan_shards",
    "resolve_classes", "summary_table",
]
