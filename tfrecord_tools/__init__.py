"""Image folders -> sharded, validated TFRecords with a dataset.json manifest.

  convert    folders (or the Keras TPU example's tfrec pair) -> shards + manifest
  labels     label CSVs (NIH, CheXpert/MIMIC, RSNA, by hand) -> each image's labels
  inspect    read every record back, check counts, draw a sample grid
  synthetic  deterministic chest-radiograph-like demo data set
  records    the one definition of the record format (feature table, TFRecord framing)
  schema     the manifest (dataset.json); re-exports the record format's names
"""

import os as _os

# Hide TensorFlow's C++ INFO chatter (CPU feature notes, buffer defaults) in
# every entry point; warnings and errors still print. Set before TF is imported.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.1.0"
