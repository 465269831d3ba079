"""The one place that chooses the Keras implementation.

xraytpu uses the Keras 2 API from the `tf-keras` package, not Keras 3: measured
on TensorFlow 2.21, Keras 3.15's `fit` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585) and under MirroredStrategy with steps_per_execution > 1,
while tf_keras 2.21 passes both. Every other module does
`from xraytpu._keras import keras`.

Supported: TensorFlow 2.20 and 2.21 with the tf-keras of the same minor version
(tf-keras X.Y only runs on TensorFlow X.Y). tf-keras is often installed with
`--no-deps` (beside tensorflow-cpu or tensorflow-tpu), so pip cannot enforce the
match: it is checked here, with one line that says what to install.
"""

from tfrecord_tools.cli import not_installed
from xraytpu import errors

SUPPORTED_TF = ("2.20", "2.21")


class KerasInstallError(ImportError, errors.UserError):
  """TensorFlow or tf-keras is missing or mismatched (one line, with the install commands):
  an ImportError to Python, a user error to the entry points (one line, exit 2)."""


try:
  import tensorflow as _tf
  import tf_keras as keras  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
  raise KerasInstallError(not_installed(e.name), name=e.name) from e


def _minor(version: str) -> str:
  return ".".join(version.split(".")[:2])


if _minor(keras.__version__) != _minor(_tf.__version__):
  raise KerasInstallError(
      f"tf-keras {keras.__version__} does not match TensorFlow {_tf.__version__}: pip install "
      f"--no-deps 'tf-keras~={_minor(_tf.__version__)}.0'", name="tf_keras")
if _minor(_tf.__version__) not in SUPPORTED_TF:
  import warnings  # noqa: E402
  warnings.warn(f"TensorFlow {_tf.__version__} is untested with xraytpu (supported: "
                f"{', '.join(SUPPORTED_TF)})", stacklevel=2)

__all__ = ["keras"]
