"""Cached decoding: the keys one new position attends and its attention
over keys and values read from a cache."""

from __future__ import annotations

import tensorflow as tf

from st_keras import layouts as layouts_lib
from st_keras.ops import tables as tables_lib


def masked_exp(scores, mask):
  """The unnormalised terms of a softmax over the last axis of `scores`
  restricted to `mask` (broadcastable to scores).

  Returns:
    (probs, row_max, total): exp(scores - row_max) where mask, else 0; the
    row maximum over the mask (keepdims, no gradient); the row sums. A row
    with no key has total 0.
  """
  scores = tf.where(mask, scores, -1e30)
  row_max = tf.stop_gradient(tf.reduce_max(scores, axis=-1, keepdims=True))
  probs = tf.where(mask, tf.exp(scores - row_max), 0.0)
  return probs, row_max, tf.reduce_sum(probs, axis=-1)


def attended_keys(layout: layouts_lib.Layout, position):
  """The keys one query position attends, per head, for cached decoding.

  Reads the row of `position` from the same padded tables the pure-TF path
  uses, so the set is exactly the layout's: a fixed number of slots per
  head (the widest row of each component, whole tiles), of which `valid`
  marks the attended ones.

  Args:
    layout: a `layouts.Layout`.
    position: int32 scalar tensor, the query's position (original order).

  Returns:
    (keys, valid): int32 [h, K] original key positions and bool [h, K],
    with h = 1 when every head attends the same keys, else h = heads. K is
    fixed by the layout; slots that are not attended hold position 0.
  """
  heads, bs = layout.num_heads, layout.block_size
  tables = [tables_lib.padded_tables(layout, i)
            for i in range(len(layout.components))]
  if all(t["same_heads"] for t in tables):
    heads = 1
  keys, valid = [], []
  for t in tables:
    table = tf.range(heads) % t["table_heads"]  # (heads,) table head
    row = tf.gather(t["query_rows"], table)[:, position]  # (heads,)
    block, offset = row // bs, row % bs
    keys.append(tf.gather(tf.gather(t["key_positions"], table), block,
                          batch_dims=1))
    sel = tf.gather(tf.gather(t["mask_sel"], table), block, batch_dims=1)
    # (heads, width): the query's row of each tile's token mask
    rows = tf.broadcast_to(offset[:, None], tf.shape(sel))
    mask = tf.gather_nd(t["masks"], tf.stack([sel, rows], axis=-1))
    valid.append(tf.reshape(mask, [heads, -1]))  # (heads, width * bs)
  keys, valid = tf.concat(keys, axis=1), tf.concat(valid, axis=1)
  return tf.where(valid, keys, 0), valid


def _gather_heads(entries: tf.TensorArray, slots, heads: int):
  """Entries of a cache at `slots` (1 or heads, K), per head.

  Args:
    entries: a TensorArray of (batch, heads, dim) entries, one per position.
    slots: int32 (1 or heads, K) positions: the same for every head, or a
      row per head.
    heads: the number of heads.

  Returns:
    (batch, heads, K, dim).
  """
  gathered = entries.gather(tf.reshape(slots, [-1]))
  # (slots.size, batch, heads, dim)
  if slots.shape[0] == 1:
    return tf.transpose(gathered, [1, 2, 0, 3])
  count = slots.shape[1]
  # Entry (h, k) was gathered for head h: keep that head's slice.
  gathered = tf.reshape(gathered, [heads, count, -1, heads,
                                   gathered.shape[-1]])
  gathered = tf.linalg.diag_part(tf.transpose(gathered, [1, 2, 4, 0, 3]))
  # (K, batch, dim, heads)
  return tf.transpose(gathered, [1, 3, 0, 2])


def attend_cached(q, keys: tf.TensorArray, values: tf.TensorArray,
                  attended: tuple, scale: float):
  """One query position's attention over the keys it attends, from caches.

  Args:
    q: (batch, heads, key_dim) float32 query.
    keys: TensorArray of (batch, heads, key_dim) float32 keys per position.
    values: TensorArray of (batch, heads, value_dim) values per position.
    attended: `attended_keys(layout, position)`: (slots, valid).
    scale: the score scale.

  Returns:
    (batch, heads, value_dim) float32; a query with no key gets 0.
  """
  slots, valid = attended
  heads = q.shape[1]
  kg, vg = (_gather_heads(entries, slots, heads)
            for entries in (keys, values))  # (batch, heads, K, dim)
  scores = tf.einsum("bhd,bhkd->bhk", q, kg) * scale
  probs, _, total = masked_exp(scores, valid)
  probs = probs / tf.where(total > 0, total, 1.0)[..., None]
  return tf.einsum("bhk,bhkd->bhd", probs, vg)
