"""The layout data structure: `Layout`, its token-disjoint `Component`s
(block-sparse tile tables, maybe over a permuted token order, shared by
the heads of one pattern) and per-head `Tiles` before packing."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)


@dataclasses.dataclass
class Tiles:
  """The non-empty tiles of one head, before packing into a `Component`.

  Attributes:
    qb: int [t], query block of each tile.
    kb: int [t], key block of each tile; tiles are sorted by (qb, kb).
    mask_idx: int [t], index into `masks`, -1 for a full tile.
    masks: list of np.bool_ [block_size, block_size].
  """
  qb: np.ndarray
  kb: np.ndarray
  mask_idx: np.ndarray
  masks: list


@dataclasses.dataclass(frozen=True)
class Component:
  """One token-disjoint part of a layout, in the kernel's (maybe permuted) order.

  The tables describe `table_heads` heads T, T dividing the layout's
  num_heads: layout head h reads table head h % T. Heads that share a
  pattern share its tables (T = 1 when every head has the same pattern).

  Attributes:
    perm: int32 [T, n] or None. Kernel position p of table head t holds
      original token perm[t, p]; None means the identity for every head.
    row_ptr: int32 [T * nb + 1]. Tiles of query block r of table head t are
      entries row_ptr[t * nb + r] : row_ptr[t * nb + r + 1] of the next two.
    col_idx: int32 [nnz]. Key block of each tile, increasing within a row.
    mask_idx: int32 [nnz]. Row of `masks` for a partial tile, -1 when full.
    masks: uint8 [num_masks, block_size, block_size], indexed [query, key].
    table_heads: T.
  """
  perm: Optional[np.ndarray]
  row_ptr: np.ndarray
  col_idx: np.ndarray
  mask_idx: np.ndarray
  masks: np.ndarray
  table_heads: int

  @property
  def nnz(self) -> int:
    return int(self.col_idx.shape[0])

  def tile_rows(self) -> np.ndarray:
    """Returns int64 [nnz]: each tile's row, table head * nb + query block."""
    counts = np.diff(self.row_ptr.astype(np.int64))
    return np.repeat(np.arange(counts.shape[0], dtype=np.int64), counts)

  def column_tables(self, num_blocks: int):
    """The same tiles in column-major order, for a backward pass by key block.

    Args:
      num_blocks: nb, blocks per head (the layout's `num_blocks`).

    Returns:
      (col_ptr, row_idx, col_mask_idx), int32: tiles of key block c of table
      head t are entries col_ptr[t * nb + c] : col_ptr[t * nb + c + 1] of
      row_idx (query block, increasing) and col_mask_idx (the tile's
      `mask_idx`), i.e. the tiles sorted by (table head, key block, query
      block). col_ptr is [T * nb + 1], the others [nnz].

    Raises:
      ValueError: num_blocks times table_heads is not the row table's length.
    """
    slots = self.row_ptr.shape[0] - 1
    if num_blocks <= 0 or slots != num_blocks * self.table_heads:
      raise ValueError(f"num_blocks ({num_blocks}) times table_heads "
                       f"({self.table_heads}) must be the row table's {slots} "
                       f"rows")
    rows = self.tile_rows()  # (nnz,) table head * nb + query block
    # (nnz,) table head * nb + key block
    cols = rows // num_blocks * num_blocks + self.col_idx
    # Tiles are sorted by row: a stable sort by column gives (column, row).
    order = stable_argsort(cols, slots)
    col_ptr = np.zeros(slots + 1, np.int64)
    col_ptr[1:] = np.cumsum(np.bincount(cols, minlength=slots))
    return (col_ptr.astype(np.int32),
            (rows[order] % num_blocks).astype(np.int32),
            self.mask_idx[order].astype(np.int32))


def stable_argsort(keys: np.ndarray, bound: int) -> np.ndarray:
  """Stable argsort of integers in [0, bound): numpy's radix sort (which it
  uses for 16-bit keys), 16 bits at a time from the lowest.

  Args:
    keys: int array [t], nonnegative.
    bound: an upper bound (exclusive) of keys.

  Returns:
    int64 [len(keys)]: the order.
  """
  order = None
  for shift in range(0, max(1, (bound - 1).bit_length()), 16):
    digit = (((keys if order is None else keys[order]) >> shift) &
             0xFFFF).astype(np.uint16)
    step = np.argsort(digit, kind="stable")
    order = step if order is None else order[step]
  return order


class Layout:
  """A sparse attention pattern over `num_heads` heads and `seq_len` tokens.

  Build one with the module's constructors rather than directly.

  Attributes:
    seq_len: n, the number of tokens.
    block_size: tile width of the block-sparse structure.
    num_heads: number of heads the pattern is defined for.
    components: tuple of `Component`, token-disjoint; each one's
      table_heads divides num_heads.
    name: a short human-readable description.

  Raises:
    ValueError: a component's tables do not fit seq_len, block_size and
      num_heads.
  """

  def __init__(self, seq_len: int, block_size: int, num_heads: int,
               components: Sequence[Component], name: str = "layout"):
    self.seq_len = int(seq_len)
    self.block_size = int(block_size)
    self.num_heads = int(num_heads)
    self.components = tuple(components)
    self.name = name
    nb = self.num_blocks
    for i, comp in enumerate(self.components):
      t = comp.table_heads
      if t <= 0 or self.num_heads % t:
        raise ValueError(f"components[{i}].table_heads ({t}) must divide "
                         f"num_heads ({self.num_heads})")
      if comp.row_ptr.shape != (t * nb + 1,):
        raise ValueError(f"components[{i}].row_ptr must have shape "
                         f"[table_heads * nb + 1] = [{t * nb + 1}], got "
                         f"{comp.row_ptr.shape}")
      if comp.perm is not None and comp.perm.shape != (t, self.seq_len):
        raise ValueError(f"components[{i}].perm must have shape [table_heads, "
                         f"n] = [{t}, {self.seq_len}], got {comp.perm.shape}")

  @property
  def num_blocks(self) -> int:
    return self.seq_len // self.block_size

  def __repr__(self) -> str:
    return (f"Layout({self.name}, seq_len={self.seq_len}, "
            f"block_size={self.block_size}, num_heads={self.num_heads}, "
            f"components={len(self.components)}, "
            f"density={self.density():.4f})")

  def num_pairs(self) -> int:
    """Returns the number of attended (query, key) token pairs, all heads."""
    total = 0
    for comp in self.components:
      full = int(np.count_nonzero(comp.mask_idx < 0))
      mask_sizes = comp.masks.sum(axis=(1, 2), dtype=np.int64)
      partial = comp.mask_idx[comp.mask_idx >= 0]
      pairs = full * self.block_size**2 + int(mask_sizes[partial].sum())
      total += pairs * (self.num_heads // comp.table_heads)
    return total

  def density(self) -> float:
    """Returns the fraction of the n*n token pairs attended, averaged over heads."""
    return self.num_pairs() / float(self.num_heads * self.seq_len**2)

  def to_dense(self) -> np.ndarray:
    """Returns np.bool_ [num_heads, n, n]: mask[h, i, j] iff query i attends key j.

    Token level, original order. Memory is O(heads * n^2): meant for tests and
    plots at small n.
    """
    n, bs, nb = self.seq_len, self.block_size, self.num_blocks
    out = np.zeros((self.num_heads, n, n), np.bool_)
    for comp in self.components:
      perms = perm_of(comp, n)
      for t, tiles in enumerate(component_tiles(comp, nb)):
        kernel = np.zeros((nb, bs, nb, bs), np.bool_)
        mid = tiles.mask_idx
        blocks = np.ones((mid.shape[0], bs, bs), np.bool_)
        blocks[mid >= 0] = comp.masks[mid[mid >= 0]].astype(np.bool_)
        kernel[tiles.qb, :, tiles.kb, :] = blocks
        original = np.zeros((n, n), np.bool_)
        original[np.ix_(perms[t], perms[t])] = kernel.reshape(n, n)
        out[t::comp.table_heads] |= original
    return out

  def block_mask(self) -> np.ndarray:
    """Returns np.bool_ [num_heads, nb, nb]: tiles (original order) with any pair."""
    nb, bs = self.num_blocks, self.block_size
    dense = self.to_dense().reshape(self.num_heads, nb, bs, nb, bs)
    return dense.any(axis=(2, 4))

  def contains(self, head: np.ndarray, query: np.ndarray,
               key: np.ndarray) -> np.ndarray:
    """Token membership without a dense mask.

    Args:
      head, query, key: integer arrays of one shape, original order.

    Returns:
      np.bool_ array of that shape: whether head attends query -> key.
    """
    head, query, key = np.broadcast_arrays(
        np.asarray(head, np.int64), np.asarray(query, np.int64),
        np.asarray(key, np.int64))
    found = np.zeros(head.shape, np.bool_)
    for comp in self.components:
      found |= _component_contains(comp, self, head % comp.table_heads, query,
                                   key)
    return found


def _component_contains(comp: Component, lay: Layout, table_head, query, key):
  """Membership of (table head, query, key) token triples in one component."""
  nb, bs = lay.num_blocks, lay.block_size
  if comp.perm is not None:
    inverse = np.argsort(comp.perm, axis=1)
    query, key = inverse[table_head, query], inverse[table_head, key]
  rows = comp.tile_rows()
  tile_key = rows * nb + comp.col_idx  # sorted: rows ascend, columns ascend
  wanted = (table_head * nb + query // bs) * nb + key // bs
  pos = np.searchsorted(tile_key, wanted)
  pos_clipped = np.minimum(pos, max(comp.nnz - 1, 0))
  hit = (pos < comp.nnz) & (tile_key[pos_clipped] == wanted) if comp.nnz else (
      np.zeros(wanted.shape, np.bool_))
  mid = np.where(hit, comp.mask_idx[pos_clipped] if comp.nnz else -1, -1)
  partial = hit & (mid >= 0)
  inside = np.ones(wanted.shape, np.bool_)
  if partial.any():
    inside[partial] = comp.masks[mid[partial], query[partial] % bs,
                                 key[partial] % bs].astype(np.bool_)
  return hit & inside


def component_tiles(comp: Component, nb: int) -> list:
  """Splits a component into one `Tiles` per table head (sharing its masks)."""
  masks = [m.astype(np.bool_) for m in comp.masks]
  out = []
  for t in range(comp.table_heads):
    lo, hi = comp.row_ptr[t * nb], comp.row_ptr[(t + 1) * nb]
    counts = np.diff(comp.row_ptr[t * nb:(t + 1) * nb + 1])
    out.append(Tiles(np.repeat(np.arange(nb, dtype=np.int64), counts),
                     comp.col_idx[lo:hi].astype(np.int64),
                     comp.mask_idx[lo:hi].astype(np.int64), masks))
  return out


def perm_of(comp: Component, seq_len: int) -> np.ndarray:
  """Returns int32 [T, n]: the component's token order (identity if None)."""
  if comp.perm is None:
    return np.tile(np.arange(seq_len, dtype=np.int32)[None],
                   (comp.table_heads, 1))
  return comp.perm
