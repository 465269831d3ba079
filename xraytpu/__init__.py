"""xraytpu: train chest X-ray and CT classifiers fast on TPU, GPU or CPU.

  import xraytpu
  run = xraytpu.load("runs/cxr")
  run.predict("film.png")      # probabilities, label and threshold, as `python -m xraytpu.predict`

(xraytpu.api: load, convert, train, evaluate.) Map of the package, each layer
importing only the ones above it (tests/test_layers.py keeps it so):

  tfrecord_tools       image folders -> sharded TFRecords + dataset.json; the pixel contract
  xraytpu.config       every option, one dataclass per command (errors, _keras beside it)
  xraytpu.data         dataset.json + shards -> tf.data batches of (uint8 image, label)
  xraytpu.models       registry name -> keras.Model (augmentation + rescaling inside)
  xraytpu.run          a run directory: layout, operating point, reports, model card, loading
  xraytpu.inference    the one model call; predict, export, Grad-CAM
  xraytpu.training     strategy + data + model -> run directory
  xraytpu.evaluation   run + data -> clinical report (AUC with CIs, operating point)
  xraytpu.serving      run -> HTTP (web page, JSON API, TF Serving's REST shape)

Entry points (`python -m xraytpu.train`, ...) only parse flags into a
`xraytpu.config.Config` and call a library function; libraries never read flags.
"""

import os as _os

# Hide TensorFlow's C++ INFO chatter (CPU feature notes, buffer defaults) in
# every entry point; warnings and errors still print. Set before TF is imported.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from tfrecord_tools import __version__  # noqa: E402 - one distribution, one version
from xraytpu.api import Run, convert, evaluate, load, train  # noqa: E402

__all__ = ["Run", "__version__", "convert", "evaluate", "load", "train"]
