"""`block_sparse_attention`: checks its arguments, runs each component of
the layout with the chosen implementation (in the component's token order)
and merges the components."""

from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from st_keras import layouts as layouts_lib
from st_keras.ops import custom_op
from st_keras.ops import pure_tf
from st_keras.ops import tables as tables_lib
from st_keras.ops.library import resolve_implementation


def _permute(x, perm, shared: bool, heads: int):
  """Gathers axis 2 of x [B, H, n, ...] by perm [T, n]: head h by row h % T.

  Args:
    x: [B, H, n, ...] tensor.
    perm: int32 [T, n], T dividing H.
    shared: every row of perm is the same (one gather for all heads).
    heads: H.

  Returns:
    x with axis 2 of head h gathered by perm[h % T].
  """
  if shared:
    return tf.gather(x, perm[0], axis=2)
  perm = tf.gather(perm, tf.range(heads) % tf.shape(perm)[0])  # (H, n)
  rank = len(x.shape)
  order = [1, 0] + list(range(2, rank))
  xt = tf.transpose(x, order)  # (H, B, n, ...)
  return tf.transpose(tf.gather(xt, perm, axis=2, batch_dims=1), order)


def _merge_components(outs, lses, stats, dtype):
  """Log-sum-exp merge of token-disjoint partial attentions.

  Each part's weight is exp(lse - top), normalised. Its value comes from the
  part's (m, log l) as exp((m - top) + log l), with top the largest m: lse =
  m + log l in float32 rounds log l away where |m| is large (scores of 1e10
  that tie across parts); its gradient is that of lse.

  Args:
    outs: per part, [B, H, n, d] attention over the part's keys.
    lses: per part, [B, H, n] float32 log-sum-exp of the scores.
    stats: per part, [B, H, n, 2] float32 (m, log l), no gradient.
    dtype: the result's dtype.

  Returns:
    [B, H, n, d] attention over the union of the parts' keys.
  """
  lse = tf.stack(lses)  # (C, B, H, n)
  row_max, log_sum = tf.unstack(tf.stack(stats), axis=-1)  # (C, B, H, n)
  top = tf.reduce_max(row_max, axis=0)
  top = tf.where(tf.math.is_finite(top), top, 0.0)
  # The value of (row_max - top) + log_sum, the gradient of lse - top.
  exponent = (row_max - top) + log_sum + tf.where(
      tf.math.is_finite(lse), lse - tf.stop_gradient(lse), 0.0)
  weights = tf.exp(exponent)  # (C, B, H, n); 0 where a part had no key
  total = tf.reduce_sum(weights, axis=0)
  # A NaN row (a NaN score in any part) stays NaN in every part's gradient.
  weights = weights / tf.where(tf.not_equal(total, 0.0), total, 1.0)
  out = tf.add_n([tf.cast(o, tf.float32) * w[..., None]
                  for o, w in zip(outs, tf.unstack(weights))])
  return tf.cast(out, dtype)


def _validate(q, k, v, layout, key_lengths):
  if not isinstance(layout, layouts_lib.Layout):
    raise TypeError(f"layout must be an st_keras.layouts.Layout, got "
                    f"{type(layout).__name__}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.shape.rank is not None and x.shape.rank != 4:
      raise ValueError(f"{name} must have rank 4 [batch, heads, n, head_dim], "
                       f"got shape {x.shape}")
    if not x.dtype.is_floating:
      raise TypeError(f"{name} must be float32, float16 or bfloat16, got "
                      f"{x.dtype.name}")
  if not (q.dtype == k.dtype == v.dtype):
    raise TypeError(f"q, k and v must share a dtype, got {q.dtype.name}, "
                    f"{k.dtype.name}, {v.dtype.name}")
  if q.dtype not in (tf.float32, tf.float16, tf.bfloat16):
    raise TypeError(f"q must be float32, float16 or bfloat16, got "
                    f"{q.dtype.name}")
  if not (q.shape.is_compatible_with(k.shape) and
          q.shape.is_compatible_with(v.shape)):
    raise ValueError(f"q, k and v must have one shape, got {q.shape}, "
                     f"{k.shape}, {v.shape}")
  heads, n, d = q.shape[1], q.shape[2], q.shape[3]
  if n is not None and n != layout.seq_len:
    raise ValueError(f"layout is for seq_len {layout.seq_len} but q has "
                     f"n = {n}")
  if heads is not None and heads != layout.num_heads:
    raise ValueError(f"layout has {layout.num_heads} heads but q has "
                     f"{heads}")
  if d is None:
    raise ValueError("head_dim (last axis of q) must be known statically")
  if key_lengths is not None:
    if key_lengths.dtype != tf.int32:
      raise TypeError(f"key_lengths must be int32, got "
                      f"{key_lengths.dtype.name}")
    if key_lengths.shape.rank is not None and (
        key_lengths.shape.rank != 1 or
        not key_lengths.shape.is_compatible_with(q.shape[:1])):
      raise ValueError(f"key_lengths must have shape [batch] = "
                       f"[{q.shape[0]}], got {key_lengths.shape}")


@tf.autograph.experimental.do_not_convert
def block_sparse_attention(q, k, v, layout: layouts_lib.Layout,
                           scale: Optional[float] = None, key_lengths=None,
                           implementation: Optional[str] = None):
  """Attention restricted to a sparse layout.

  Args:
    q: [batch, heads, n, head_dim] queries, float32, float16 or bfloat16.
    k: keys, same shape and dtype as q.
    v: values, same shape and dtype as q.
    layout: an `st_keras.layouts.Layout` for n tokens and `heads` heads.
    scale: positive score scale, finite in float32; default
      1 / sqrt(head_dim).
    key_lengths: optional int32 [batch]: keys at positions >= key_lengths[b]
      are ignored for example b (padded batches).
    implementation: 'auto', 'custom_op', 'pure_tf' or None for the
      module-wide choice.

  Returns:
    [batch, heads, n, head_dim] in q's dtype. A query with no allowed key
    gets zeros. Softmax and accumulation run in float32, exactly for any
    finite scores. Non-finite inputs reach the outputs exact arithmetic
    gives them to: a NaN score (NaN in q or an attended key) makes its row
    NaN, an inf or NaN in v[j, c] reaches column c of exactly the rows that
    attend key j.

  Raises:
    ValueError, TypeError: bad shapes, dtypes, layout, key_lengths or scale.
  """
  q = tf.convert_to_tensor(q)
  k = tf.convert_to_tensor(k)
  v = tf.convert_to_tensor(v)
  if key_lengths is not None:
    key_lengths = tf.convert_to_tensor(key_lengths)
  _validate(q, k, v, layout, key_lengths)
  scale = float(1.0 / np.sqrt(q.shape[-1]) if scale is None else scale)
  with np.errstate(over="ignore"):
    scale32 = np.float32(scale)  # the op's attribute and pure TF's factor
  if not (np.isfinite(scale32) and scale32 > 0):
    raise ValueError(f"scale must be a positive number finite in float32, "
                     f"got {scale}")
  impl = resolve_implementation(implementation)
  outs, lses, stats = [], [], []
  for index, comp in enumerate(layout.components):
    order = tables_lib.perm_tables(layout, index)
    qc, kc, vc = q, k, v
    if comp.perm is not None:
      qc, kc, vc = (_permute(x, order["key_positions"], order["shared_perm"],
                             layout.num_heads) for x in (q, k, v))
    if impl == "custom_op":
      kl = (tf.zeros([0], tf.int32) if key_lengths is None else key_lengths)
      parts = custom_op.component(qc, kc, vc,
                                  tables_lib.op_tables(layout, index), scale,
                                  kl)
    else:
      parts = pure_tf.component(qc, kc, vc, layout, index, scale,
                                key_lengths)
    if comp.perm is not None:
      parts = [_permute(x, order["inverse_perm"], order["shared_perm"],
                        layout.num_heads) for x in parts]
    for results, x in zip((outs, lses, stats), parts):
      results.append(x)
  if len(outs) == 1:
    return outs[0]
  return _merge_components(outs, lses, stats, q.dtype)
