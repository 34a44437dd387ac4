"""The fused custom op on one component, and its registered gradient."""

from __future__ import annotations

import tensorflow as tf

from st_keras.ops.library import OP_NAME
from st_keras.ops.library import load_library


def component(q, k, v, tables, scale, key_lengths):
  """Returns (out [B, H, n, d] q.dtype, lse [B, H, n], stats [B, H, n, 2]).

  stats holds each row's max score m and log l, l = sum exp(score - m)
  (-inf, -inf for a row with no key), without gradient.
  """
  out, lse, stats = load_library().sparse_transformer_block_sparse_attention(
      q, k, v, key_lengths, tables["key_positions"], tables["row_ptr"],
      tables["col_idx"], tables["mask_idx"], tables["masks"],
      tables["col_ptr"], tables["row_idx"], tables["col_mask_idx"],
      scale=scale)
  return out, lse, tf.stop_gradient(stats)


@tf.RegisterGradient(OP_NAME)
def _block_sparse_attention_grad(op, dout, dlse, unused_dstats):
  """Gradient of the fused op through its gradient op.

  Args:
    op: the forward op; its `stats` output feeds the gradient op.
    dout: upstream gradient of `out` (None: zeros).
    dlse: upstream gradient of `lse` (None: zeros).
    unused_dstats: `stats` is not differentiable.

  Returns:
    dq, dk, dv and None for each layout input.
  """
  q, k, v = op.inputs[:3]
  layout_inputs = list(op.inputs[3:])
  out, lse, stats = op.outputs
  if dout is None:
    dout = tf.zeros_like(out)
  if dlse is None:
    dlse = tf.zeros_like(lse)
  dq, dk, dv = load_library().sparse_transformer_block_sparse_attention_grad(
      q, k, v, out, stats, dout, dlse, *layout_inputs,
      scale=op.get_attr("scale"))
  return [dq, dk, dv] + [None] * len(layout_inputs)
