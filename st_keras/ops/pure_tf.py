"""The pure-TensorFlow implementation of one component: a gather of each
query block's key blocks and a masked softmax (stock ops only: XLA and
exported SavedModels run it)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from st_keras.ops import tables as tables_lib
from st_keras.ops.decoding import masked_exp


@tf.custom_gradient
def _zero_non_finite(x):
  """x with every inf and NaN replaced by 0; the gradient passes unchanged."""
  def grad(dy):
    return dy
  return tf.where(tf.math.is_finite(x), x, tf.zeros_like(x)), grad


def _weighted_values(probs, values, scores, mask, total):
  """probs @ values per row, exact where values are not finite.

  A value entry that is inf or NaN would reach, as 0 * NaN in the einsum,
  the rows that do not attend its key. When there is one (tf.cond; the common
  path is the plain einsum), the einsum takes those entries as 0 and each row
  gets, per column, the inf or NaN that exact arithmetic gives: the sum of the
  non-finite entries of the keys it attends (score not -inf). That term is
  scaled by `total`, so the gradients of a poisoned row are NaN as well.

  Args:
    probs: (B, H, nb, bs, K) unnormalised probabilities, 0 where masked.
    values: (B, H, nb, K, d) the gathered values.
    scores: (B, H, nb, bs, K) scores before masking.
    mask: bool, broadcastable to scores: the allowed keys.
    total: (B, H, nb, bs) row sums of probs.

  Returns:
    (B, H, nb, bs, d): probs @ values, plus total times the non-finite part.
  """
  def plain():
    return tf.einsum("bhnqk,bhnkd->bhnqd", probs, values)

  def exact():
    attended = tf.cast(tf.logical_and(mask, tf.not_equal(scores, -np.inf)),
                       tf.float32)
    kinds = tf.concat([tf.math.is_nan(values), tf.equal(values, np.inf),
                       tf.equal(values, -np.inf)], axis=-1)
    # (B, H, nb, bs, 3 d): attended keys with a NaN, +inf, -inf per column
    counts = tf.einsum("bhnqk,bhnkd->bhnqd", attended,
                       tf.cast(kinds, tf.float32))
    nan, pos, neg = tf.split(counts > 0, 3, axis=-1)
    poison = tf.where(nan | (pos & neg), np.nan,
                      tf.where(pos, np.inf, tf.where(neg, -np.inf, 0.0)))
    return (tf.einsum("bhnqk,bhnkd->bhnqd", probs, _zero_non_finite(values))
            + poison * total[..., None])

  return tf.cond(tf.reduce_all(tf.math.is_finite(values)), plain, exact)


def component(q, k, v, layout, index, scale, key_lengths):
  """Gather-based masked softmax; returns (out, lse, stats) as the op does."""
  t = tables_lib.padded_tables(layout, index)
  batch = tf.shape(q)[0]
  heads, n, d = layout.num_heads, layout.seq_len, q.shape[-1]
  nb, bs, width = layout.num_blocks, layout.block_size, t["width"]
  q32, k32, v32 = (tf.cast(x, tf.float32) for x in (q, k, v))
  qb = tf.reshape(q32, [batch, heads, nb, bs, d])  # (B, H, nb, bs, d)
  kv_shape = [batch, heads, nb, width * bs, d]
  # Row of [B, H * nb, bs, d] gathered by each slot of each head.
  table = tf.range(heads) % t["table_heads"]  # (H,) table head of each head
  gather = tf.reshape(tf.gather(t["gather"], table) +
                      tf.range(heads)[:, None] * nb, [-1])  # (H * nb * width,)
  kg = tf.reshape(tf.gather(tf.reshape(k32, [batch, heads * nb, bs, d]),
                            gather, axis=1), kv_shape)
  vg = tf.reshape(tf.gather(tf.reshape(v32, [batch, heads * nb, bs, d]),
                            gather, axis=1), kv_shape)
  scores = tf.einsum("bhnqd,bhnkd->bhnqk", qb, kg) * scale
  # (B, H, nb, bs, width * bs)
  mask = tf.gather(t["masks"], t["mask_sel"])  # (T, nb, width, bs, bs)
  mask = tf.reshape(tf.transpose(mask, [0, 1, 3, 2, 4]),
                    [1, t["table_heads"], nb, bs, width * bs])
  key_positions = t["key_positions"]  # (T, nb, width * bs)
  if t["table_heads"] != 1:  # else both broadcast over the heads
    mask = tf.gather(mask, table, axis=1)  # (1, H, nb, bs, width * bs)
    key_positions = tf.gather(key_positions, table)  # (H, nb, width * bs)
  if key_lengths is not None:
    valid = (key_positions[None] <
             tf.reshape(key_lengths, [-1, 1, 1, 1]))  # (B, H|1, nb, width*bs)
    mask = tf.logical_and(mask, valid[:, :, :, None, :])
  probs, row_max, total = masked_exp(scores, mask)  # total: (B, H, nb, bs)
  has_key = tf.not_equal(total, 0.0)  # a NaN score makes the row NaN
  safe_total = tf.where(has_key, total, 1.0)
  out = (_weighted_values(probs, vg, scores, mask, total) /
         safe_total[..., None])
  log_total = tf.math.log(safe_total)
  lse = tf.where(has_key, row_max[..., 0] + log_total, -np.inf)
  stats = tf.stop_gradient(tf.stack(
      [tf.where(has_key, row_max[..., 0], -np.inf),
       tf.where(has_key, log_total, -np.inf)], axis=-1))
  return (tf.cast(tf.reshape(out, [batch, heads, n, d]), q.dtype),
          tf.reshape(lse, [batch, heads, n]),
          tf.reshape(stats, [batch, heads, n, 2]))
