"""A layout's tables as TensorFlow constants, built once per layout.

They are cached in a `WeakKeyDictionary` keyed by the layout (nothing is
written into the layout object) and created outside any graph, so that
functions capture them as constants.
"""

from __future__ import annotations

import weakref

import numpy as np
import tensorflow as tf

from st_keras import layouts as layouts_lib

# layout -> {(kind, component index): tables}
_CACHE = weakref.WeakKeyDictionary()


def _cached(layout: layouts_lib.Layout, key: tuple, build):
  """`build()` for (layout, key), computed once while the layout lives."""
  entries = _CACHE.setdefault(layout, {})
  if key not in entries:
    entries[key] = build()
  return entries[key]


def perm_tables(layout: layouts_lib.Layout, index: int) -> dict:
  """One component's token order, for both implementations.

  Args:
    layout: a `layouts.Layout`.
    index: the component.

  Returns:
    {'key_positions': int32 [T, n] tensor (the permutation; [0, 0] for
    none), 'inverse_perm': its inverse or None, 'shared_perm': whether every
    table head has the same order (one gather for all heads)}.
  """
  return _cached(layout, ("perm", index),
                 lambda: _build_perm_tables(layout.components[index]))


def _build_perm_tables(comp: layouts_lib.Component) -> dict:
  perm = comp.perm
  with tf.init_scope():
    return {
        "key_positions": tf.constant(
            np.zeros((0, 0), np.int32) if perm is None else perm),
        "inverse_perm": None if perm is None else tf.constant(
            np.argsort(perm, axis=1).astype(np.int32)),
        "shared_perm": perm is None or bool((perm == perm[:1]).all()),
    }


def op_tables(layout: layouts_lib.Layout, index: int) -> dict:
  """The fused op's inputs for one component: its T-head tables, unexpanded
  (built only when the op runs: the column-major copy costs a sort).

  Args:
    layout: a `layouts.Layout`.
    index: the component.

  Returns:
    {name: tf.Tensor}: `key_positions` (from `perm_tables`) and the
    row-major and column-major tile tables.
  """
  return _cached(layout, ("op", index),
                 lambda: _build_op_tables(layout, index))


def _build_op_tables(layout: layouts_lib.Layout, index: int) -> dict:
  comp = layout.components[index]
  col_ptr, row_idx, col_mask_idx = comp.column_tables(layout.num_blocks)
  with tf.init_scope():
    return {
        "key_positions": perm_tables(layout, index)["key_positions"],
        "row_ptr": tf.constant(comp.row_ptr),
        "col_idx": tf.constant(comp.col_idx),
        "mask_idx": tf.constant(comp.mask_idx),
        "masks": tf.constant(comp.masks),
        # The column-major table: the GPU kernels' backward walks it.
        "col_ptr": tf.constant(col_ptr),
        "row_idx": tf.constant(row_idx),
        "col_mask_idx": tf.constant(col_mask_idx),
    }


def padded_tables(layout: layouts_lib.Layout, index: int) -> dict:
  """Row tables of a component's T table heads padded to the longest row,
  for the pure-TF gather and for decoding (head h reads table head h % T).

  Args:
    layout: a `layouts.Layout`.
    index: the component.

  Returns:
    {name: value}: `width` (slots per row), `table_heads`, and as tensors
    `query_rows` [T, n] (kernel position of each original position),
    `gather` [T, nb * width] (key block per slot), `mask_sel`
    [T, nb, width] (token mask per slot), `masks`, `key_positions`
    [T, nb, width * bs] (original position of every gathered key), and
    `same_heads` (every head has the same rows).
  """
  return _cached(layout, ("padded", index),
                 lambda: _build_padded_tables(layout, index))


def _build_padded_tables(layout: layouts_lib.Layout, index: int) -> dict:
  comp = layout.components[index]
  nb, bs, t_heads = layout.num_blocks, layout.block_size, comp.table_heads
  counts = np.diff(comp.row_ptr.astype(np.int64))
  width = max(1, int(counts.max()) if counts.size else 1)
  rows = comp.tile_rows()
  slot = np.arange(comp.nnz) - comp.row_ptr[rows]
  num_masks = comp.masks.shape[0]
  empty, full = num_masks, num_masks + 1
  # Key block of each slot. Padding slots (fully masked) gather the head's
  # first block: their zero-weight gradients (0 * NaN is NaN) stay in
  # that head.
  gather = np.zeros((t_heads * nb, width), np.int32)
  mask_sel = np.full((t_heads * nb, width), empty, np.int32)
  gather[rows, slot] = comp.col_idx
  mask_sel[rows, slot] = np.where(comp.mask_idx < 0, full, comp.mask_idx)
  masks = np.concatenate([comp.masks.astype(np.bool_),
                          np.zeros((1, bs, bs), np.bool_),
                          np.ones((1, bs, bs), np.bool_)])
  perm = (np.tile(np.arange(layout.seq_len, dtype=np.int32), (t_heads, 1))
          if comp.perm is None else comp.perm)
  # Original position of every gathered key: [T, nb, width * bs].
  key_block_pos = np.take_along_axis(
      perm.reshape(t_heads, nb, bs), gather.reshape(t_heads, nb * width, 1),
      axis=1)
  # Kernel position of each original position: the inverse permutation,
  # which perm_tables already holds.
  query_rows = perm if comp.perm is None else (
      perm_tables(layout, index)["inverse_perm"].numpy())
  mask_sel = mask_sel.reshape(t_heads, nb, width)
  key_block_pos = key_block_pos.reshape(t_heads, nb, width * bs)
  with tf.init_scope():
    return {
        "width": width,
        "table_heads": t_heads,
        "query_rows": tf.constant(query_rows),
        "same_heads": all((x == x[:1]).all() for x in (
            query_rows, mask_sel, key_block_pos)),
        "gather": tf.constant(gather.reshape(t_heads, nb * width)),
        "mask_sel": tf.constant(mask_sel),
        "masks": tf.constant(masks),
        "key_positions": tf.constant(key_block_pos),
    }
