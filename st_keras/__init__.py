"""st_keras: the Sparse Transformer (Child et al. 2019) for TensorFlow and Keras.

Public modules:
  layouts: sparse attention patterns (fixed, strided, local, ...) as layouts.
  ops: `block_sparse_attention`, fused custom op or pure TensorFlow.
  layers: Keras layers (sparse self-attention, residual block, embeddings).
  models: the `SparseTransformer` Keras model and its bits-per-byte metric.
  data: tf.data pipelines for bytes of text, images and audio.
  config, train, sample: run configs, the trainer (`st-train`), sampling.
"""

from st_keras import layouts
from st_keras import ops
from st_keras import layers
from st_keras import models

__all__ = ["layouts", "ops", "layers", "models"]
__version__ = "0.1.0"
