"""Sparse attention patterns of the Sparse Transformer as block-sparse layouts.

A `Layout` says, for every head, which (query, key) token pairs attend. It is
stored the way the fused kernel consumes it: one or more *components*, each a
block-sparse structure over `block_size x block_size` tiles, optionally over a
permuted token order. Inside a component a tile is either full (no mask) or
partial (a `block_size x block_size` token mask, deduplicated in a small mask
table). Components of one layout are token-disjoint, so attention over the
layout is the log-sum-exp merge of attention over its components.

The strided pattern's stride part `A2(i) = {j <= i : (i - j) mod l == 0}` is
held in the transposed order of the paper's code: tokens are sorted by
`(i mod l, i div l)`, so each residue class is one contiguous chunk and A2 is
causal attention inside a chunk -- dense tiles instead of one key in every l.

Heads that share a pattern share its tables: a component's tables describe
`table_heads` T heads, T dividing the layout's heads, and head h reads table
head h % T (T = 1 for the local, causal, dense and strided patterns and the
fixed pattern with one summary pattern, whatever the number of heads).
Periodic patterns are built from a few tile signatures (sign of the block
offset, query and key phase) instead of all nb^2 candidate tiles, so the
fixed and strided patterns at n = 2^20 build in about a second.

Everything here is numpy; `to_dense()` is the token-level truth in original
order and is what tests compare against.

Public constructors: `fixed`, `strided`, `local`, `causal`, `dense`, `union`,
`per_head`, `from_mask`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)

# Candidate block pairs are classified in chunks of this many pairs, and token
# masks are evaluated for at most this many tiles at a time.
_PAIR_CHUNK = 1 << 22
_TILE_CHUNK = 1 << 11

# A token predicate in kernel coordinates: pred(p, q) -> bool array, where p are
# query positions and q key positions (broadcastable integer arrays).
TokenPredicate = Callable[[np.ndarray, np.ndarray], np.ndarray]


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
    order = _stable_argsort(cols, slots)
    col_ptr = np.zeros(slots + 1, np.int64)
    col_ptr[1:] = np.cumsum(np.bincount(cols, minlength=slots))
    return (col_ptr.astype(np.int32),
            (rows[order] % num_blocks).astype(np.int32),
            self.mask_idx[order].astype(np.int32))


def _stable_argsort(keys: np.ndarray, bound: int) -> np.ndarray:
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
      perms = _perm_of(comp, n)
      for t, tiles in enumerate(_component_tiles(comp, nb)):
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


# ----------------------------------------------------------------------------
# Building components from token predicates.


def _check_common(seq_len: int, block_size: int, num_heads: int) -> None:
  if not isinstance(seq_len, (int, np.integer)) or seq_len <= 0:
    raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
  if block_size not in SUPPORTED_BLOCK_SIZES:
    raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, "
                     f"got {block_size!r}")
  if seq_len % block_size:
    raise ValueError(f"seq_len ({seq_len}) must be a multiple of block_size "
                     f"({block_size}); pad the sequence")
  if not isinstance(num_heads, (int, np.integer)) or num_heads <= 0:
    raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")


class _TileClassifier:
  """Evaluates a token predicate on whole tiles and numbers their masks.

  Args:
    block_size: tile width.
    pred: token predicate in kernel coordinates.

  Attributes:
    masks: list of np.bool_ [bs, bs], the distinct partial masks seen.
  """

  def __init__(self, block_size: int, pred: TokenPredicate):
    self.block_size = block_size
    self.pred = pred
    self.masks = []
    self._ids = {}  # packed mask bytes -> index into masks

  def __call__(self, qb: np.ndarray, kb: np.ndarray) -> np.ndarray:
    """Classifies tiles (qb[i], kb[i]).

    Args:
      qb, kb: int arrays [t] of query and key blocks (kernel order).

    Returns:
      int64 [t]: -2 for an empty tile, -1 for a full one, else the index of
      its mask in `masks`.
    """
    bs = self.block_size
    ar = np.arange(bs, dtype=np.int64)
    status = np.empty(qb.shape[0], np.int64)
    for c0 in range(0, qb.shape[0], _TILE_CHUNK):
      p = qb[c0:c0 + _TILE_CHUNK, None, None] * bs + ar[None, :, None]
      q = kb[c0:c0 + _TILE_CHUNK, None, None] * bs + ar[None, None, :]
      tiles = np.broadcast_to(self.pred(p, q), (p.shape[0], bs, bs))
      flat = tiles.reshape(p.shape[0], bs * bs)
      chunk = np.where(flat.all(axis=1), -1, -2)
      for i in np.flatnonzero(flat.any(axis=1) & (chunk == -2)).tolist():
        key = np.packbits(flat[i]).tobytes()
        if key not in self._ids:
          self._ids[key] = len(self.masks)
          self.masks.append(tiles[i].copy())
        chunk[i] = self._ids[key]
      status[c0:c0 + _TILE_CHUNK] = chunk
    return status


def _head_blocks(seq_len: int, block_size: int, pred: TokenPredicate,
                 causal: bool, period: Optional[int], reach: Optional[int]):
  """Classifies the tiles of one head's pattern in kernel coordinates.

  When `period` is given, the predicate must satisfy pred(p + P, q + P) ==
  pred(p, q), and for tiles at least `reach` blocks off the diagonal it must
  depend only on the sign of the offset and the positions modulo P. Such
  tiles are classified once per (sign, query phase, key phase) and only the
  non-empty ones are enumerated; tiles nearer the diagonal are classified
  once per (offset, query phase). Without a period every candidate tile is
  evaluated.

  Args:
    seq_len: n.
    block_size: tile width.
    pred: token predicate in kernel coordinates.
    causal: only tiles with key block <= query block are candidates.
    period: P described above, or None to evaluate every tile.
    reach: block offset beyond which tiles are alike up to phase.

  Returns:
    `Tiles` of the non-empty tiles, sorted by (qb, kb).
  """
  nb = seq_len // block_size
  classify = _TileClassifier(block_size, pred)
  if period is not None:
    qb, kb, status = _periodic_blocks(nb, block_size, classify, causal,
                                      period, reach)
    return Tiles(qb, kb, status, classify.masks)
  out_q, out_k, out_m = [], [], []
  rows_per_chunk = max(1, _PAIR_CHUNK // nb)
  for r0 in range(0, nb, rows_per_chunk):
    qb, kb = np.meshgrid(np.arange(r0, min(nb, r0 + rows_per_chunk)),
                         np.arange(nb), indexing="ij")
    keep = kb <= qb if causal else np.ones(qb.shape, np.bool_)
    qb, kb = qb[keep].astype(np.int64), kb[keep].astype(np.int64)
    status = classify(qb, kb)
    nonempty = status > -2
    out_q.append(qb[nonempty])
    out_k.append(kb[nonempty])
    out_m.append(status[nonempty])
  return Tiles(np.concatenate(out_q), np.concatenate(out_k),
               np.concatenate(out_m), classify.masks)


def _periodic_blocks(nb, block_size, classify, causal, period, reach):
  """The non-empty tiles of a periodic predicate (see `_head_blocks`).

  A block b has phase b mod bp, bp = P / gcd(P, block_size): its tokens'
  positions modulo P depend on nothing else. Row qb's tiles, in key order,
  are the far-left ones (kb <= qb - reach), the band (|qb - kb| < reach)
  and the far-right ones (kb >= qb + reach). The far tiles of a side in a
  row of phase a are a slice of one sequence per (side, a): the key blocks
  of the non-empty key phases, period after period. Every row is thus three
  slices of a source table, gathered at once.

  Args:
    nb: blocks.
    block_size: tile width.
    classify: a `_TileClassifier` of the predicate.
    causal: only tiles with kb <= qb are candidates.
    period: P.
    reach: the band's half width in blocks (at least 1).

  Returns:
    (qb, kb, status), int32 [t], sorted by (qb, kb); status as
    `_TileClassifier` gives it (-1 or a mask index).
  """
  bp = period // np.gcd(period, block_size)
  rows = np.arange(nb, dtype=np.int64)
  phase = rows % bp  # (nb,)
  band_row, band_kb, band_status = _band_blocks(nb, bp, classify, causal,
                                                reach)
  band_count = np.bincount(band_row, minlength=nb)
  # Per source: (kb, status) tables, and each row's slice start and length.
  band = (band_kb, band_status, np.cumsum(band_count) - band_count,
          band_count)
  far = []  # far-left, then (not causal) far-right
  sides = [(1, 0, rows - reach + 1)]  # (sign, first, stop): kb in [first, stop)
  if not causal:
    sides.append((-1, rows + reach, np.full(nb, nb)))
  a, c = np.meshgrid(np.arange(bp), np.arange(bp), indexing="ij")
  last_a, last_c = a + (nb - 1 - a) // bp * bp, c + (nb - 1 - c) // bp * bp
  periods = -(-nb // bp)
  for sign, first, stop in sides:
    # One tile per (query phase a, key phase c): the pair farthest apart on
    # this side of the diagonal, which is in range when any such tile is.
    qb, kb = (last_a, c) if sign > 0 else (a, last_c)
    exists = (a < nb) & (c < nb) & (sign * (qb - kb) >= reach)
    status = np.full((bp, bp), -2, np.int64)
    status[exists] = classify(qb[exists], kb[exists])
    kept = status > -2  # (bp, bp)
    per_phase = kept.sum(axis=1)  # (bp,) key phases with tiles
    # below[a, x]: key phases < x with tiles, (bp, bp + 1)
    below = np.concatenate([np.zeros((bp, 1), np.int64),
                            np.cumsum(kept, axis=1)], axis=1)

    def count(stops):  # tiles of each row with kb < stops: (nb,)
      stops = np.maximum(stops, 0)
      return stops // bp * per_phase[phase] + below[phase, stops % bp]

    # The sequence of phase a: (periods, per_phase[a]) key blocks, flattened.
    seq_kb = [(np.arange(periods)[:, None] * bp + c[x][kept[x]]).ravel()
              for x in range(bp)]
    seq_status = [np.tile(status[x][kept[x]], periods) for x in range(bp)]
    seq_start = np.cumsum(per_phase * periods) - per_phase * periods
    lo, hi = count(first), count(np.maximum(stop, first))
    far.append((np.concatenate(seq_kb), np.concatenate(seq_status),
                seq_start[phase] + lo, hi - lo))
  # Row by row: far-left, band, far-right slices.
  sources = far[:1] + [band] + far[1:]
  src_kb = np.concatenate([s[0] for s in sources]).astype(np.int32)
  src_status = np.concatenate([s[1] for s in sources]).astype(np.int32)
  src_offset = np.cumsum([0] + [s[0].shape[0] for s in sources[:-1]])
  starts = np.stack([s[2] + o for s, o in zip(sources, src_offset)], axis=1)
  lengths = np.stack([s[3] for s in sources], axis=1)  # (nb, parts)
  idx = _range_concat(starts.ravel(), lengths.ravel())
  qb = np.repeat(np.arange(nb, dtype=np.int32), lengths.sum(axis=1))
  return qb, src_kb[idx], src_status[idx]


def _band_blocks(nb, bp, classify, causal, reach):
  """The non-empty tiles with |qb - kb| < reach (see `_periodic_blocks`).

  Args:
    nb: blocks.
    bp: blocks per phase period.
    classify: a `_TileClassifier` of the predicate.
    causal: only tiles with kb <= qb are candidates.
    reach: the band's half width in blocks (at least 1).

  Returns:
    (qb, kb, status), int64, sorted by (qb, kb).
  """
  offsets = np.arange(reach - 1, -1 if causal else -reach, -1)  # kb ascends
  # One tile per (offset, query phase): the first row of that phase whose
  # key block qb - offset is in range.
  off, a = np.meshgrid(offsets, np.arange(bp), indexing="ij")
  lo = np.maximum(off, 0)
  qb = a + np.maximum(0, -(-(lo - a) // bp)) * bp
  exists = (qb < nb) & (qb - off < nb)
  status = np.full(off.shape, -2, np.int64)  # (offsets, bp)
  status[exists] = classify(qb[exists], qb[exists] - off[exists])
  rows = np.arange(nb, dtype=np.int64)[:, None]
  kbs = rows - offsets[None, :]  # (nb, offsets)
  tile = status[:, rows[:, 0] % bp].T  # (nb, offsets)
  keep = (kbs >= 0) & (kbs < nb) & (tile > -2)
  row, col = np.nonzero(keep)
  return row, kbs[row, col], tile[row, col]


def _assemble(seq_len: int, block_size: int, head_tiles: Sequence[Tiles],
              perm: Optional[np.ndarray]) -> Component:
  """Packs `Tiles` (sorted, one per table head) into one `Component`.

  Args:
    seq_len: n.
    block_size: tile width.
    head_tiles: the T table heads' tiles; the same object may repeat.
    perm: int [T, n] or None.

  Returns:
    A `Component` with T table heads and a shared mask table.
  """
  nb = seq_len // block_size
  mask_ids = {}
  mask_list = []
  remaps = {}  # id(tiles) -> mask index map (last entry: full stays -1)
  for tiles in head_tiles:
    if id(tiles) in remaps:
      continue
    remap = np.full(len(tiles.masks) + 1, -1, np.int32)
    for t, m in enumerate(tiles.masks):
      key = np.packbits(m).tobytes()
      if key not in mask_ids:
        mask_ids[key] = len(mask_list)
        mask_list.append(m)
      remap[t] = mask_ids[key]
    remaps[id(tiles)] = remap
  counts = np.concatenate([np.bincount(tiles.qb, minlength=nb)
                           for tiles in head_tiles])
  row_ptr = np.zeros(len(head_tiles) * nb + 1, np.int64)
  np.cumsum(counts, out=row_ptr[1:])
  masks = (np.stack(mask_list).astype(np.uint8) if mask_list else
           np.zeros((0, block_size, block_size), np.uint8))
  return Component(
      perm=None if perm is None else np.asarray(perm, np.int32),
      row_ptr=row_ptr.astype(np.int32),
      col_idx=np.concatenate([t.kb for t in head_tiles]).astype(
          np.int32, copy=False),
      mask_idx=np.concatenate([remaps[id(t)][t.mask_idx]
                               for t in head_tiles]),
      masks=masks, table_heads=len(head_tiles))


def _from_predicates(seq_len, block_size, head_preds, causal, period, reach,
                     perm=None) -> Component:
  """Builds a component from one predicate per table head (reusing shared
  work)."""
  built = {}
  blocks = []
  for pred in head_preds:
    if id(pred) not in built:
      built[id(pred)] = _head_blocks(seq_len, block_size, pred, causal, period,
                                     reach)
    blocks.append(built[id(pred)])
  return _assemble(seq_len, block_size, blocks, perm)


def _reach(width: int, block_size: int) -> int:
  """Block offset beyond which two tokens are more than `width` apart."""
  return -(-width // block_size) + 1


# ----------------------------------------------------------------------------
# Public constructors.

_FIXED_PARTS = ("local", "summary", "both")
_STRIDED_PARTS = ("local", "stride", "both")


def fixed(seq_len: int, block_size: int = 32, stride: int = 128,
          summary: int = 32, num_heads: int = 1, num_summary_patterns: int = 1,
          part: str = "both", causal: bool = True) -> Layout:
  """The paper's fixed pattern (Sec. 4.3), for text.

  A1(i) = {j : j div l == i div l}; A2 for head h = {j : l - c*(h mod P + 1) <=
  j mod l < l - c*(h mod P)} with l = stride, c = summary, P =
  num_summary_patterns; causal layouts also require j <= i. With
  causal=False A1 is the whole own window and A2 the summary slots of every
  window.

  Args:
    seq_len: n, a multiple of block_size.
    block_size: tile width, one of 16, 32, 64, 128. Causal layouts whose
      summary slots are not whole tiles (c or l not a multiple of it) hold
      A2 in a second component with the summary tokens gathered in front,
      so no tile is mostly unused.
    stride: window length l.
    summary: number c of summary positions at the end of each window.
    num_heads: heads of the layout.
    num_summary_patterns: P, distinct summary slots cycled over heads.
    part: "local" (A1), "summary" (A2) or "both" (A1 | A2, the merged head).
    causal: restrict to j <= i.

  Returns:
    A `Layout`.
  """
  _check_common(seq_len, block_size, num_heads)
  if part not in _FIXED_PARTS:
    raise ValueError(f"part must be one of {_FIXED_PARTS}, got {part!r}")
  if stride <= 0 or summary <= 0 or summary > stride:
    raise ValueError(f"need 0 < summary <= stride, got summary={summary}, "
                     f"stride={stride}")
  if num_summary_patterns <= 0 or num_summary_patterns * summary > stride:
    raise ValueError(
        f"num_summary_patterns ({num_summary_patterns}) x summary ({summary}) "
        f"must be positive and at most stride ({stride})")
  l, c = stride, summary

  def make_pred(slot):
    def pred(i, j):
      allowed = np.zeros(np.broadcast_shapes(i.shape, j.shape), np.bool_)
      if part in ("local", "both"):
        allowed = allowed | (i // l == j // l)
      if part in ("summary", "both"):
        r = j % l
        allowed = allowed | ((r >= l - c * (slot + 1)) & (r < l - c * slot))
      return allowed & (j <= i) if causal else allowed
    return pred

  name = f"fixed(l={l}, c={c}, part={part}, causal={causal})"
  if causal and part != "local" and (c % block_size or l % block_size):
    # Summary slots narrower than a tile (or off the tile grid) would leave
    # most of each summary tile unused: gather them to the front instead.
    comps = [] if part == "summary" else [
        fixed(seq_len, block_size, l, c, num_heads, num_summary_patterns,
              part="local").components[0]]
    comps.append(_summary_component(seq_len, block_size, l, c, num_heads,
                                    num_summary_patterns,
                                    own_window=part == "summary"))
    return Layout(seq_len, block_size, num_heads, comps, name=name)
  # The local part is the same for every head: one table head.
  table_heads = (1 if part == "local" else
                 _pattern_heads(num_summary_patterns, num_heads))
  slots = [make_pred(s) for s in range(min(num_summary_patterns,
                                           table_heads))]
  preds = [slots[t % len(slots)] for t in range(table_heads)]
  comp = _from_predicates(seq_len, block_size, preds, causal, period=l,
                          reach=_reach(l, block_size))
  return Layout(seq_len, block_size, num_heads, [comp], name=name)


def _pattern_heads(num_patterns: int, num_heads: int) -> int:
  """Table heads of a pattern that cycles num_patterns variants over heads.

  Args:
    num_patterns: variants; head h has variant h mod num_patterns.
    num_heads: heads of the layout.

  Returns:
    num_patterns when it divides num_heads (head h reads table head h mod
    num_patterns), else num_heads.
  """
  return num_patterns if num_heads % num_patterns == 0 else num_heads


def _range_concat(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """The ranges [starts[i], starts[i] + lengths[i]) concatenated, vectorised.

  Args:
    starts: int [r], each range's first value.
    lengths: int [r], each range's length (0 allowed).

  Returns:
    int64 [sum(lengths)].
  """
  keep = lengths > 0
  starts, lengths = starts[keep].astype(np.int64), lengths[keep]
  step = np.ones(int(lengths.sum()), np.int64)
  if step.shape[0]:
    # Each range's first entry steps from the previous range's last one.
    step[0] = starts[0]
    step[np.cumsum(lengths)[:-1]] = starts[1:] - (starts[:-1] + lengths[:-1]
                                                  - 1)
  return np.cumsum(step, out=step)


def _ranges(starts, stops):
  """The ranges [starts[i], stops[i]) concatenated, vectorised.

  Returns:
    (owner, value), int64: entry e is value[e] of range owner[e].
  """
  counts = stops - starts
  owner = np.repeat(np.arange(counts.shape[0]), counts)
  return owner, _range_concat(starts, counts)


def _summary_component(seq_len, block_size, stride, summary, num_heads,
                       num_patterns, own_window) -> Component:
  """A2 of the causal fixed pattern with the summary tokens in front.

  Kernel order of a head with summary slot s: its summary tokens (j mod l in
  [l - c(s+1), l - c s)) in order, then every other token in order. Query i
  then attends a prefix of the kernel positions: the c summary tokens of each
  window before its own, plus (own_window) those of its own window up to i.
  The tiles are full but for one or two per query block at the prefix's end.

  Args:
    seq_len: n.
    block_size: tile width B.
    stride: window length l.
    summary: c.
    num_heads: heads.
    num_patterns: P, summary slots cycled over heads.
    own_window: also attend the own window's summary tokens j <= i (the
      summary part alone); without it they belong to the local part.

  Returns:
    A `Component` with a permutation per table head.
  """
  n, bs, l, c = seq_len, block_size, stride, summary
  nb = n // bs
  tokens = np.arange(n, dtype=np.int64)
  table_heads = _pattern_heads(num_patterns, num_heads)
  perms, heads_tiles = {}, {}
  for slot in range(min(num_patterns, table_heads)):
    first = l - c * (slot + 1)  # the slot is [first, first + c) mod l
    in_slot = (tokens % l >= first) & (tokens % l < first + c)
    perm = np.concatenate([tokens[in_slot], tokens[~in_slot]])  # (n,)
    prefix = c * (perm // l)  # (n,) keys attended by kernel position p
    if own_window:
      prefix += np.clip(perm % l - first + 1, 0, c)
    prefix = prefix.reshape(nb, bs)  # (nb, bs) per query block
    full = prefix.min(axis=1) // bs  # key blocks [0, full) are full tiles
    end = -(-prefix.max(axis=1) // bs)  # partial tiles in [full, end)
    qb, kb = _ranges(np.zeros(nb, np.int64), end)  # sorted by (qb, kb)
    part = kb >= full[qb]
    # (partial, bs) keys of the tile attended by each query row
    reach = np.clip(prefix[qb[part]] - kb[part, None] * bs, 0, bs)
    shapes, mask_of = np.unique(reach, axis=0, return_inverse=True)
    masks = [np.arange(bs)[None, :] < row[:, None] for row in shapes]
    mask_idx = np.full(qb.shape[0], -1, np.int64)
    mask_idx[part] = mask_of.reshape(-1)
    perms[slot], heads_tiles[slot] = perm, Tiles(qb, kb, mask_idx, masks)
  slots = [t % num_patterns for t in range(table_heads)]
  return _assemble(n, bs, [heads_tiles[s] for s in slots],
                   np.stack([perms[s] for s in slots]))


def _stride_perm(seq_len: int, stride: int) -> np.ndarray:
  """Token order sorted by (i mod l, i div l): residue classes contiguous."""
  i = np.arange(seq_len, dtype=np.int64)
  return np.lexsort((i // stride, i % stride))


def _stride_component(seq_len, block_size, stride, causal,
                      strict) -> Component:
  """A2 of the strided pattern as causal attention within residue chunks."""
  perm = _stride_perm(seq_len, stride)
  chunk = (perm % stride)  # residue class of kernel position p

  def pred(p, q):
    same = chunk[p] == chunk[q]
    if causal:
      return same & ((q < p) if strict else (q <= p))
    return same & (q != p) if strict else same

  if seq_len % stride == 0:
    period, reach = seq_len // stride, _reach(seq_len // stride, block_size)
  else:  # chunks of two lengths: no common period, evaluate every tile
    period, reach = None, None
  return _from_predicates(seq_len, block_size, [pred], causal, period, reach,
                          perm=perm[None])


def strided(seq_len: int, block_size: int = 32, stride: int = 128,
            num_heads: int = 1, part: str = "both",
            causal: bool = True) -> Layout:
  """The paper's strided pattern (Sec. 4.3), for images and audio.

  A1(i) = {j : i - l < j <= i}; A2(i) = {j <= i : (i - j) mod l == 0}. With
  causal=False both are symmetric: |i - j| < l and (i - j) mod l == 0.
  A2 is computed in the transposed order (one contiguous chunk per residue
  class), so it costs dense tiles, not one key in every l.

  Args:
    seq_len: n, a multiple of block_size (need not be a multiple of stride).
    block_size: tile width, one of 16, 32, 64, 128.
    stride: l.
    num_heads: heads of the layout.
    part: "local" (A1), "stride" (A2) or "both" (A1 | A2, the merged head;
      held as two disjoint components merged by log-sum-exp).
    causal: restrict to j <= i.

  Returns:
    A `Layout`.
  """
  _check_common(seq_len, block_size, num_heads)
  if part not in _STRIDED_PARTS:
    raise ValueError(f"part must be one of {_STRIDED_PARTS}, got {part!r}")
  if stride <= 0:
    raise ValueError(f"stride must be positive, got {stride}")
  comps = []
  if part in ("local", "both"):
    comps.append(_window_component(seq_len, block_size, stride, causal))
  if part in ("stride", "both"):
    comps.append(_stride_component(seq_len, block_size, stride, causal,
                                   strict=part == "both"))
  return Layout(seq_len, block_size, num_heads, comps,
                name=f"strided(l={stride}, part={part}, causal={causal})")


def _window_component(seq_len, block_size, window, causal) -> Component:
  """i - window < j <= i (causal) or |i - j| < window."""
  def pred(i, j):
    d = i - j
    return (d >= 0) & (d < window) if causal else np.abs(d) < window
  return _from_predicates(seq_len, block_size, [pred], causal, period=1,
                          reach=_reach(window, block_size))


def local(seq_len: int, block_size: int = 32, window: int = 128,
          num_heads: int = 1, causal: bool = True) -> Layout:
  """Sliding-window attention: i - window < j <= i (or |i - j| < window).

  Args:
    seq_len: n, a multiple of block_size.
    block_size: tile width, one of 16, 32, 64, 128.
    window: number of keys per query (causal), the query itself included.
    num_heads: heads of the layout.
    causal: restrict to j <= i.

  Returns:
    A `Layout`.
  """
  _check_common(seq_len, block_size, num_heads)
  if window <= 0:
    raise ValueError(f"window must be positive, got {window}")
  comp = _window_component(seq_len, block_size, window, causal)
  return Layout(seq_len, block_size, num_heads, [comp],
                name=f"local(window={window}, causal={causal})")


def causal(seq_len: int, block_size: int = 32, num_heads: int = 1) -> Layout:
  """Dense causal attention, j <= i, as a block-sparse layout.

  Args:
    seq_len: n, a multiple of block_size.
    block_size: tile width, one of 16, 32, 64, 128.
    num_heads: heads of the layout.

  Returns:
    A `Layout`.
  """
  _check_common(seq_len, block_size, num_heads)
  comp = _from_predicates(seq_len, block_size, [lambda i, j: j <= i], True,
                          period=1, reach=1)
  return Layout(seq_len, block_size, num_heads, [comp], name="causal")


def dense(seq_len: int, block_size: int = 32, num_heads: int = 1) -> Layout:
  """Full bidirectional attention as a layout (every tile full).

  Args:
    seq_len: n, a multiple of block_size.
    block_size: tile width, one of 16, 32, 64, 128.
    num_heads: heads of the layout.

  Returns:
    A `Layout`.
  """
  _check_common(seq_len, block_size, num_heads)
  comp = _from_predicates(
      seq_len, block_size,
      [lambda i, j: np.ones(np.broadcast_shapes(i.shape, j.shape), np.bool_)],
      False, period=1, reach=1)
  return Layout(seq_len, block_size, num_heads, [comp], name="dense")


def from_mask(mask: np.ndarray, block_size: int = 32) -> Layout:
  """Any token mask as a layout.

  Args:
    mask: bool [num_heads, n, n] (or [n, n] for one head); mask[h, i, j] iff
      query i attends key j.
    block_size: tile width, one of 16, 32, 64, 128.

  Returns:
    A `Layout` whose `to_dense()` equals `mask`.
  """
  mask = np.asarray(mask)
  if mask.ndim == 2:
    mask = mask[None]
  if mask.ndim != 3 or mask.shape[1] != mask.shape[2]:
    raise ValueError(f"mask must have shape [num_heads, n, n], got "
                     f"{mask.shape}")
  heads, n, _ = mask.shape
  _check_common(n, block_size, heads)
  mask = mask.astype(np.bool_)
  preds = [(lambda m: lambda i, j: m[i, j])(mask[h]) for h in range(heads)]
  comp = _from_predicates(n, block_size, preds, False, period=None, reach=None)
  return Layout(n, block_size, heads, [comp], name="from_mask")


def _empty_component(seq_len, block_size, table_heads) -> Component:
  nb = seq_len // block_size
  return Component(None, np.zeros(table_heads * nb + 1, np.int32),
                   np.zeros(0, np.int32), np.zeros(0, np.int32),
                   np.zeros((0, block_size, block_size), np.uint8), table_heads)


def _expand(comp: Component, table_heads: int) -> Component:
  """The component's tables repeated for `table_heads` table heads.

  Args:
    comp: a `Component`.
    table_heads: a multiple of comp.table_heads.

  Returns:
    comp itself when the counts agree, else a `Component` whose table head
    t holds comp's table head t mod comp.table_heads.
  """
  reps, rest = divmod(table_heads, comp.table_heads)
  if rest:
    raise ValueError(f"table_heads ({table_heads}) must be a multiple of the "
                     f"component's ({comp.table_heads})")
  if reps == 1:
    return comp
  counts = np.tile(np.diff(comp.row_ptr), reps)  # (table_heads * nb,)
  return Component(
      perm=None if comp.perm is None else np.tile(comp.perm, (reps, 1)),
      row_ptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
      col_idx=np.tile(comp.col_idx, reps),
      mask_idx=np.tile(comp.mask_idx, reps), masks=comp.masks,
      table_heads=table_heads)


def _layout_table_heads(lay: Layout) -> int:
  """Returns the least table-head count every component of `lay` expands to
  (the lcm of their table_heads)."""
  return int(np.lcm.reduce([c.table_heads for c in lay.components] + [1]))


def _component_tiles(comp: Component, nb: int) -> list:
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


def _perm_of(comp: Component, seq_len: int) -> np.ndarray:
  """Returns int32 [T, n]: the component's token order (identity if None)."""
  if comp.perm is None:
    return np.tile(np.arange(seq_len, dtype=np.int32)[None],
                   (comp.table_heads, 1))
  return comp.perm


def _tile_list(tiles: Tiles, block_size: int):
  """Yields ((qb, kb), bool [bs, bs] token mask) for every tile."""
  full = np.ones((block_size, block_size), np.bool_)
  for q, k, m in zip(tiles.qb.tolist(), tiles.kb.tolist(),
                     tiles.mask_idx.tolist()):
    yield (q, k), (full if m < 0 else tiles.masks[m])


def _tiles_from_dict(tiles: dict) -> Tiles:
  """Packs {(qb, kb): bool mask} (non-empty masks) into sorted `Tiles`."""
  keys = sorted(tiles)
  masks, mids = [], []
  for key in keys:
    if tiles[key].all():
      mids.append(-1)
    else:
      mids.append(len(masks))
      masks.append(tiles[key])
  return Tiles(np.array([k[0] for k in keys], np.int64),
               np.array([k[1] for k in keys], np.int64),
               np.array(mids, np.int64), masks)


def _or_tiles(a: Tiles, b: Tiles, block_size: int) -> Tiles:
  """Token-wise OR of two heads' tiles over the same token order."""
  merged = dict(_tile_list(a, block_size))
  for key, mask in _tile_list(b, block_size):
    merged[key] = merged[key] | mask if key in merged else mask
  return _tiles_from_dict(merged)


def _subtract(comp: Component, lay: Layout, other: Layout) -> Component:
  """Removes from `comp` (a component of `lay`) the tokens `other` attends.

  Returns:
    A `Component` with the least common multiple of the table heads of comp
    and other's components.
  """
  nb, bs = lay.num_blocks, lay.block_size
  comp = _expand(comp, int(np.lcm(comp.table_heads,
                                  _layout_table_heads(other))))
  perm = _perm_of(comp, lay.seq_len)
  ar = np.arange(bs)
  per_head_tiles = []
  for t, tiles in enumerate(_component_tiles(comp, nb)):
    rows = perm[t][tiles.qb[:, None, None] * bs + ar[None, :, None]]
    cols = perm[t][tiles.kb[:, None, None] * bs + ar[None, None, :]]
    rows, cols = np.broadcast_arrays(rows, cols)
    taken = other.contains(np.full(rows.shape, t), rows, cols)
    kept = {}
    for i, (key, mask) in enumerate(_tile_list(tiles, bs)):
      remaining = mask & ~taken[i]
      if remaining.any():
        kept[key] = remaining
    per_head_tiles.append(_tiles_from_dict(kept))
  return _assemble(lay.seq_len, bs, per_head_tiles, comp.perm)


def _check_compatible(layouts: Sequence[Layout], same_heads: bool) -> None:
  if not layouts:
    raise ValueError("need at least one layout")
  first = layouts[0]
  for lay in layouts:
    if not isinstance(lay, Layout):
      raise TypeError(f"expected Layout, got {type(lay).__name__}")
    if (lay.seq_len, lay.block_size) != (first.seq_len, first.block_size):
      raise ValueError(
          f"layouts differ in seq_len/block_size: "
          f"({first.seq_len}, {first.block_size}) vs "
          f"({lay.seq_len}, {lay.block_size})")
    if same_heads and lay.num_heads != first.num_heads:
      raise ValueError(f"layouts differ in num_heads: {first.num_heads} vs "
                       f"{lay.num_heads}")


def union(*layouts: Layout) -> Layout:
  """Token-wise OR of layouts with the same length, block size and heads.

  Each component of a later layout keeps only the tokens not already
  attended, then merges tile by tile into a component over the same token
  order (or is appended), so the result stays token-disjoint.

  Args:
    *layouts: two or more `Layout`s.

  Returns:
    A `Layout` whose `to_dense()` is the OR of the inputs'.
  """
  _check_compatible(layouts, same_heads=True)
  result = layouts[0]
  n, bs, nb = result.seq_len, result.block_size, result.num_blocks
  for other in layouts[1:]:
    comps = list(result.components)
    for oc in other.components:
      # Keep only tokens no component of `result` holds yet; then merge tile by
      # tile into a component over the same order (both tables expanded to
      # their common table heads), or append.
      oc = _subtract(oc, other, result)
      for i, comp in enumerate(comps):
        heads = int(np.lcm(comp.table_heads, oc.table_heads))
        mine, theirs = _expand(comp, heads), _expand(oc, heads)
        if np.array_equal(_perm_of(mine, n), _perm_of(theirs, n)):
          comps[i] = _assemble(
              n, bs, [_or_tiles(a, b, bs)
                      for a, b in zip(_component_tiles(mine, nb),
                                      _component_tiles(theirs, nb))],
              mine.perm)
          break
      else:
        comps.append(oc)
    result = Layout(result.seq_len, result.block_size, result.num_heads, comps,
                    name=f"union({result.name}, {other.name})")
  return result


def per_head(*layouts: Layout) -> Layout:
  """Multi-head integration: heads of the inputs concatenated in order.

  Args:
    *layouts: `Layout`s with the same length and block size.

  Returns:
    A `Layout` with sum(num_heads) heads.
  """
  _check_compatible(layouts, same_heads=False)
  first = layouts[0]
  n, bs, nb = first.seq_len, first.block_size, first.num_blocks
  num = max(len(lay.components) for lay in layouts)
  comps = []
  for c in range(num):
    # Each layout's tables for all its heads, concatenated in head order.
    parts = [_expand(lay.components[c] if c < len(lay.components) else
                     _empty_component(n, bs, 1), lay.num_heads)
             for lay in layouts]
    tiles = []
    for part in parts:
      tiles.extend(_component_tiles(part, nb))
    any_perm = any(p.perm is not None for p in parts)
    perm = (np.concatenate([_perm_of(p, n) for p in parts])
            if any_perm else None)
    comps.append(_assemble(n, bs, tiles, perm))
  return Layout(n, bs, sum(lay.num_heads for lay in layouts), comps,
                name="per_head(" + ", ".join(l.name for l in layouts) + ")")
