"""The op library and the choice of implementation.

`load_library()` loads the Bazel-built `_st_keras_ops.so` once (from
$ST_KERAS_OPS_LIBRARY or the package's lib/); `implementation()` /
`set_implementation()` hold the module-wide choice, initialised from
$ST_KERAS_ATTENTION; `resolve_implementation()` maps a request to the
implementation that runs.
"""

from __future__ import annotations

import os
from typing import Optional
import warnings

import tensorflow as tf

IMPLEMENTATIONS = ("auto", "custom_op", "pure_tf")
ENV_IMPLEMENTATION = "ST_KERAS_ATTENTION"
ENV_LIBRARY = "ST_KERAS_OPS_LIBRARY"
OP_NAME = "SparseTransformer>BlockSparseAttention"
GRAD_OP_NAME = "SparseTransformer>BlockSparseAttentionGrad"

_DEFAULT_LIBRARY = os.path.join(os.path.dirname(os.path.dirname(__file__)), "lib",
                                "_st_keras_ops.so")
_state = {"implementation": None, "library": None, "load_error": None,
          "warned": False}


def _check_implementation(name: str) -> str:
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{name!r}")
  return name


def implementation() -> str:
  """Returns the module-wide implementation choice ('auto' by default)."""
  if _state["implementation"] is None:
    _state["implementation"] = _check_implementation(
        os.environ.get(ENV_IMPLEMENTATION, "auto"))
  return _state["implementation"]


def set_implementation(name: str) -> None:
  """Selects 'auto', 'custom_op' or 'pure_tf' for later calls.

  Args:
    name: one of `IMPLEMENTATIONS`.
  """
  _state["implementation"] = _check_implementation(name)


def library_path() -> str:
  """Returns the op library path: $ST_KERAS_OPS_LIBRARY or the packaged one."""
  return os.environ.get(ENV_LIBRARY, _DEFAULT_LIBRARY)


def load_library():
  """Loads the op library once.

  Returns:
    The module `tf.load_op_library` returned, or None when it failed to load
    (`load_error()` then says why).
  """
  if _state["library"] is None and _state["load_error"] is None:
    path = library_path()
    try:
      if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist; build it with tools/build_ops.sh")
      _state["library"] = tf.load_op_library(path)
    except (FileNotFoundError, tf.errors.NotFoundError, OSError) as err:
      _state["load_error"] = f"{type(err).__name__}: {err}"
  return _state["library"]


def load_error() -> Optional[str]:
  """Returns why the op library failed to load, or None."""
  load_library()
  return _state["load_error"]


def custom_op_available() -> bool:
  """Whether the fused op library is loaded."""
  return load_library() is not None


def _in_xla_context() -> bool:
  """Whether ops built now are compiled by XLA (jit_compile=True)."""
  from tensorflow.python.framework import ops as tf_ops  # pylint: disable=g-import-not-at-top
  from tensorflow.python.ops import control_flow_util  # pylint: disable=g-import-not-at-top
  return control_flow_util.GraphOrParentsInXlaContext(
      tf_ops.get_default_graph())


def resolve_implementation(name: Optional[str] = None) -> str:
  """Maps a requested implementation (None: module-wide) to the one used.

  Args:
    name: 'auto', 'custom_op', 'pure_tf' or None.

  Returns:
    'custom_op' or 'pure_tf'. 'auto' picks 'pure_tf' inside an XLA-compiled
    function, where custom ops cannot run.

  Raises:
    RuntimeError: 'custom_op' was requested and the library failed to load.
  """
  name = _check_implementation(name or implementation())
  if name == "pure_tf" or (name == "auto" and _in_xla_context()):
    return "pure_tf"
  if custom_op_available():
    return "custom_op"
  if name == "custom_op":
    raise RuntimeError(
        f"the block-sparse attention op library failed to load: "
        f"{load_error()}")
  if not _state["warned"]:
    warnings.warn(
        "st_keras: the fused block-sparse attention op is not loaded "
        f"({load_error()}); falling back to the slower pure-TensorFlow "
        f"implementation. Set {ENV_IMPLEMENTATION}=pure_tf to silence this.",
        RuntimeWarning, stacklevel=3)
    _state["warned"] = True
  return "pure_tf"
