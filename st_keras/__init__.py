"""st_keras: the Sparse Transformer (Child et al. 2019) for TensorFlow and Keras.

Public modules:
  layouts: sparse attention patterns (fixed, strided, local, ...) as layouts.
  ops: `block_sparse_attention`, fused custom op or pure TensorFlow.
  layers: Keras layers (sparse self-attention, residual block, embeddings).
  models: the `SparseTransformer` Keras model and its bits-per-byte metric.
  data: tf.data pipelines for bytes of text, images and audio.
  config, train, sample: run configs, the trainer (`st-train`), sampling.
  evaluate: held-out bits, the context sweep, the position profile
    (`st-eval`).

`layouts` needs numpy only: where TensorFlow cannot be imported (a GPU
machine with PyTorch alone, say), `import st_keras` gives the layouts, and
the other modules raise an ImportError that says why.
"""

from st_keras import layouts

try:
  import tensorflow  # noqa: F401  # pylint: disable=unused-import
except ImportError as e:
  _NO_TENSORFLOW = e
else:
  _NO_TENSORFLOW = None
  # Imported here so that `import st_keras` registers the Keras classes
  # that keras.models.load_model needs.
  from st_keras import layers
  from st_keras import models
  from st_keras import ops

__all__ = ["layouts", "ops", "layers", "models"]
__version__ = "0.1.0"


def __getattr__(name):
  if _NO_TENSORFLOW is not None and name in ("ops", "layers", "models"):
    raise ImportError(
        f"st_keras.{name} needs TensorFlow, which cannot be imported "
        f"({_NO_TENSORFLOW}); st_keras.layouts works without it"
    ) from _NO_TENSORFLOW
  raise AttributeError(f"module 'st_keras' has no attribute {name!r}")
