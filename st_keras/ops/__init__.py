"""Block-sparse attention for TensorFlow: fused custom op or pure TensorFlow.

`block_sparse_attention(q, k, v, layout)` computes, for every head h and
query i, softmax(scale * q_i . k_j) over the keys j that `layout` allows,
applied to v. Two implementations compute the same function:

* ``"custom_op"``: the fused C++ kernels `SparseTransformer>BlockSparseAttention`
  (and its gradient op) from the Bazel-built library `st_keras/lib/
  _st_keras_ops.so`. Online softmax over the layout's tiles only; memory
  O(n * head_dim) beyond the inputs.
* ``"pure_tf"``: stock TensorFlow ops (gather of each query block's key
  blocks, masked softmax). Differentiable by autodiff, works under XLA and in
  SavedModels that stock TensorFlow Serving loads.

The module-level choice is `implementation()` / `set_implementation()`,
initialised from the environment variable ``ST_KERAS_ATTENTION`` (``auto``,
``custom_op`` or ``pure_tf``; default ``auto``: the op when its library loads,
else pure TensorFlow with a warning that says why the library did not load).
"""

from st_keras.ops.attention import block_sparse_attention
from st_keras.ops.decoding import attend_cached
from st_keras.ops.decoding import attended_keys
from st_keras.ops.library import ENV_IMPLEMENTATION
from st_keras.ops.library import ENV_LIBRARY
from st_keras.ops.library import GRAD_OP_NAME
from st_keras.ops.library import IMPLEMENTATIONS
from st_keras.ops.library import OP_NAME
from st_keras.ops.library import custom_op_available
from st_keras.ops.library import implementation
from st_keras.ops.library import library_path
from st_keras.ops.library import load_error
from st_keras.ops.library import load_library
from st_keras.ops.library import resolve_implementation
from st_keras.ops.library import set_implementation

__all__ = [
    "block_sparse_attention", "attend_cached", "attended_keys",
    "ENV_IMPLEMENTATION", "ENV_LIBRARY", "GRAD_OP_NAME", "IMPLEMENTATIONS",
    "OP_NAME", "custom_op_available", "implementation", "library_path",
    "load_error", "load_library", "resolve_implementation",
    "set_implementation",
]
