"""st_keras: the Sparse Transformer (Child et al. 2019) for TensorFlow and Keras.

Public modules:
  layouts: sparse attention patterns (fixed, strided, local, ...) as layouts.
  ops: `block_sparse_attention`, fused custom op or pure TensorFlow.
"""

from st_keras import layouts
from st_keras import ops

__all__ = ["layouts", "ops"]
__version__ = "0.1.0"
