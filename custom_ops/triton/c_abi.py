"""The GPU kernels' C ABI (block_sparse_attention_c_api.h) from Python.

A ctypes binding of st_keras/lib/libst_bsa_gpu.so that needs neither
TensorFlow nor PyTorch: tensors are passed as device addresses (PyTorch's
`data_ptr()`, CuPy's `.data.ptr`), the stream as a CUstream handle.

    lib = c_abi.Library("st_keras/lib/libst_bsa_gpu.so")
    problem = c_abi.Problem(batch=2, heads=16, seq_len=n, head_dim=64, ...)
    error = lib.forward(problem, q, k, v, out, lse, stats, stream)
"""

from __future__ import annotations

import ctypes

DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}
_ERROR_BYTES = 4096


class Problem(ctypes.Structure):
  """st_bsa_gpu_problem: the shape, dtype, scale and layout tables (device
  addresses, 0 or None for an absent table), and how the tensors are
  addressed (original_order, accumulate: see the header)."""
  _fields_ = ([(name, ctypes.c_int64)
               for name in ("batch", "heads", "seq_len", "head_dim")] +
              [("block_size", ctypes.c_int32), ("dtype", ctypes.c_int32),
               ("scale", ctypes.c_float), ("table_heads", ctypes.c_int64)] +
              [(name, ctypes.c_void_p)
               for name in ("row_ptr", "col_idx", "mask_idx", "col_ptr",
                            "row_idx", "col_mask_idx", "masks")] +
              [("num_masks", ctypes.c_int64), ("key_lengths", ctypes.c_void_p),
               ("key_positions", ctypes.c_void_p),
               ("original_order", ctypes.c_int32),
               ("accumulate", ctypes.c_int32)])


class Library:
  """libst_bsa_gpu.so. Each call returns "" on success, else the library's
  error message.

  Args:
    path: the shared library.

  Raises:
    OSError: it cannot be loaded.
  """

  def __init__(self, path: str):
    self.path = path
    self._lib = ctypes.CDLL(path)
    pointer, size = ctypes.c_void_p, ctypes.c_size_t
    problem = ctypes.POINTER(Problem)
    self._lib.st_bsa_gpu_self_check.argtypes = [ctypes.c_char_p, size]
    self._lib.st_bsa_gpu_forward.argtypes = (
        [problem] + [pointer] * 7 + [ctypes.c_char_p, size])
    self._lib.st_bsa_gpu_backward.argtypes = (
        [problem] + [pointer] * 12 + [ctypes.c_char_p, size])

  @staticmethod
  def _call(fn, *args) -> str:
    error = ctypes.create_string_buffer(_ERROR_BYTES)
    if fn(*args, error, _ERROR_BYTES):
      return error.value.decode() or "failed without a message"
    return ""

  def self_check(self) -> str:
    """Whether every compiled kernel takes the arguments the launcher
    passes and fits its architecture (no GPU needed)."""
    return self._call(self._lib.st_bsa_gpu_self_check)

  def forward(self, problem, q, k, v, out, lse, stats, stream=None) -> str:
    """out, lse and stats from q, k, v (device addresses)."""
    return self._call(self._lib.st_bsa_gpu_forward,
                      None if problem is None else ctypes.byref(problem),
                      q, k, v, out, lse, stats, stream)

  def backward(self, problem, q, k, v, out, stats, dout, dlse, delta, dq, dk,
               dv, stream=None) -> str:
    """dq, dk, dv; delta is a [batch, heads, seq_len] float32 workspace."""
    return self._call(self._lib.st_bsa_gpu_backward,
                      None if problem is None else ctypes.byref(problem),
                      q, k, v, out, stats, dout, dlse, delta, dq, dk, dv,
                      stream)
