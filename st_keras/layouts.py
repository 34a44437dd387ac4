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
    qb: int64 [t], query block of each tile.
    kb: int64 [t], key block of each tile.
    mask_idx: int64 [t], index into `masks`, -1 for a full tile.
    masks: list of np.bool_ [block_size, block_size].
  """
  qb: np.ndarray
  kb: np.ndarray
  mask_idx: np.ndarray
  masks: list


@dataclasses.dataclass(frozen=True)
class Component:
  """One token-disjoint part of a layout, in the kernel's (maybe permuted) order.

  Attributes:
    perm: int32 [heads, n] or None. Kernel position p of head h holds original
      token perm[h, p]; None means the identity for every head.
    row_ptr: int32 [heads * nb + 1]. Tiles of query block r of head h are
      entries row_ptr[h * nb + r] : row_ptr[h * nb + r + 1] of the next two.
    col_idx: int32 [nnz]. Key block of each tile, increasing within a row.
    mask_idx: int32 [nnz]. Row of `masks` for a partial tile, -1 when full.
    masks: uint8 [num_masks, block_size, block_size], indexed [query, key].
  """
  perm: Optional[np.ndarray]
  row_ptr: np.ndarray
  col_idx: np.ndarray
  mask_idx: np.ndarray
  masks: np.ndarray

  @property
  def nnz(self) -> int:
    return int(self.col_idx.shape[0])

  def tile_rows(self) -> np.ndarray:
    """Returns int64 [nnz]: the flat (head * nb + query block) row of each tile."""
    counts = np.diff(self.row_ptr.astype(np.int64))
    return np.repeat(np.arange(counts.shape[0], dtype=np.int64), counts)

  def column_tables(self, num_blocks: int):
    """The same tiles in column-major order, for a backward pass by key block.

    Args:
      num_blocks: nb, blocks per head (the layout's `num_blocks`).

    Returns:
      (col_ptr, row_idx, col_mask_idx), int32: tiles of key block c of head
      h are entries col_ptr[h * nb + c] : col_ptr[h * nb + c + 1] of
      row_idx (query block, increasing) and col_mask_idx (the tile's
      `mask_idx`), i.e. the tiles sorted by (head, key block, query block).
      col_ptr is [heads * nb + 1], the others [nnz].

    Raises:
      ValueError: num_blocks does not divide the row table.
    """
    slots = self.row_ptr.shape[0] - 1
    if num_blocks <= 0 or slots % num_blocks:
      raise ValueError(f"num_blocks ({num_blocks}) must divide the row "
                       f"table's {slots} (heads * nb) rows")
    rows = self.tile_rows()  # (nnz,) head * nb + query block
    cols = rows // num_blocks * num_blocks + self.col_idx  # head * nb + key
    order = np.lexsort((rows, cols))  # by (head, key block, query block)
    col_ptr = np.zeros(slots + 1, np.int64)
    col_ptr[1:] = np.cumsum(np.bincount(cols, minlength=slots))
    return (col_ptr.astype(np.int32),
            (rows[order] % num_blocks).astype(np.int32),
            self.mask_idx[order].astype(np.int32))


class Layout:
  """A sparse attention pattern over `num_heads` heads and `seq_len` tokens.

  Build one with the module's constructors rather than directly.

  Attributes:
    seq_len: n, the number of tokens.
    block_size: tile width of the block-sparse structure.
    num_heads: number of heads the pattern is defined for.
    components: tuple of `Component`, token-disjoint.
    name: a short human-readable description.
  """

  def __init__(self, seq_len: int, block_size: int, num_heads: int,
               components: Sequence[Component], name: str = "layout"):
    self.seq_len = int(seq_len)
    self.block_size = int(block_size)
    self.num_heads = int(num_heads)
    self.components = tuple(components)
    self.name = name

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
      total += full * self.block_size**2 + int(mask_sizes[partial].sum())
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
      rows = comp.tile_rows()
      for h in range(self.num_heads):
        kernel = np.zeros((nb, bs, nb, bs), np.bool_)
        sel = rows // nb == h
        qb, kb, mid = rows[sel] % nb, comp.col_idx[sel], comp.mask_idx[sel]
        tiles = np.ones((qb.shape[0], bs, bs), np.bool_)
        tiles[mid >= 0] = comp.masks[mid[mid >= 0]].astype(np.bool_)
        kernel[qb, :, kb, :] = tiles
        kernel = kernel.reshape(n, n)
        perm = np.arange(n) if comp.perm is None else comp.perm[h]
        out[h][np.ix_(perm, perm)] |= kernel
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
      found |= _component_contains(comp, self, head, query, key)
    return found


def _component_contains(comp: Component, lay: Layout, head, query, key):
  """Membership of (head, query, key) token triples in one component."""
  nb, bs = lay.num_blocks, lay.block_size
  if comp.perm is not None:
    inverse = np.argsort(comp.perm, axis=1)
    query, key = inverse[head, query], inverse[head, key]
  rows = comp.tile_rows()
  tile_key = rows * nb + comp.col_idx  # sorted: rows ascend, columns ascend
  wanted = (head * nb + query // bs) * nb + key // bs
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


def _head_blocks(seq_len: int, block_size: int, pred: TokenPredicate,
                 causal: bool, period: Optional[int], reach: Optional[int]):
  """Classifies the tiles of one head's pattern in kernel coordinates.

  When `period` is given, the predicate must satisfy pred(p + P, q + P) ==
  pred(p, q), and for tiles at least `reach` blocks off the diagonal it must
  depend only on the sign of the offset and the positions modulo P. Tiles
  with the same (clipped offset, query phase, key phase) then share one mask
  and the predicate is evaluated once per such signature.

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
  bs = block_size
  nb = seq_len // bs
  ar = np.arange(bs, dtype=np.int64)
  cache = {}  # signature -> -2 (empty), -1 (full) or index into `masks`
  masks = []
  out_q, out_k, out_m = [], [], []
  rows_per_chunk = max(1, _PAIR_CHUNK // nb)
  for r0 in range(0, nb, rows_per_chunk):
    qb, kb = np.meshgrid(np.arange(r0, min(nb, r0 + rows_per_chunk)),
                         np.arange(nb), indexing="ij")
    keep = kb <= qb if causal else np.ones(qb.shape, np.bool_)
    qb, kb = qb[keep].astype(np.int64), kb[keep].astype(np.int64)
    if period is None:
      sig = qb * nb + kb
    else:
      off = np.clip(qb - kb, -reach, reach) + reach
      sig = (off * period + (qb * bs) % period) * period + (kb * bs) % period
    uniq, first, inverse = np.unique(sig, return_index=True,
                                     return_inverse=True)
    new = np.array([s not in cache for s in uniq.tolist()], np.bool_)
    new_sig, new_first = uniq[new], first[new]
    for c0 in range(0, new_sig.shape[0], _TILE_CHUNK):
      idx = new_first[c0:c0 + _TILE_CHUNK]
      p = qb[idx, None, None] * bs + ar[None, :, None]
      q = kb[idx, None, None] * bs + ar[None, None, :]
      tiles = np.broadcast_to(pred(p, q), (idx.shape[0], bs, bs))
      for s, tile in zip(new_sig[c0:c0 + _TILE_CHUNK].tolist(), tiles):
        if not tile.any():
          cache[s] = -2
        elif tile.all():
          cache[s] = -1
        else:
          cache[s] = len(masks)
          masks.append(tile.copy())
    status = np.array([cache[s] for s in uniq.tolist()], np.int64)[inverse]
    nonempty = status > -2
    out_q.append(qb[nonempty])
    out_k.append(kb[nonempty])
    out_m.append(status[nonempty])
  return Tiles(np.concatenate(out_q), np.concatenate(out_k),
               np.concatenate(out_m), masks)


def _assemble(seq_len: int, block_size: int, per_head_tiles: Sequence[Tiles],
              perm: Optional[np.ndarray]) -> Component:
  """Packs per-head `Tiles` into one `Component` with a shared mask table."""
  nb = seq_len // block_size
  mask_ids = {}
  mask_list = []
  rows, cols, mids = [], [], []
  for h, tiles in enumerate(per_head_tiles):
    remap = np.zeros(len(tiles.masks) + 1, np.int64)
    remap[-1] = -1  # index -1 (full) maps to -1
    for t, m in enumerate(tiles.masks):
      key = np.packbits(m).tobytes()
      if key not in mask_ids:
        mask_ids[key] = len(mask_list)
        mask_list.append(m)
      remap[t] = mask_ids[key]
    rows.append(h * nb + tiles.qb)
    cols.append(tiles.kb)
    mids.append(remap[tiles.mask_idx])
  rows = np.concatenate(rows).astype(np.int64)
  cols = np.concatenate(cols).astype(np.int64)
  order = np.lexsort((cols, rows))
  row_ptr = np.zeros(len(per_head_tiles) * nb + 1, np.int64)
  np.add.at(row_ptr, rows + 1, 1)
  masks = (np.stack(mask_list).astype(np.uint8) if mask_list else
           np.zeros((0, block_size, block_size), np.uint8))
  return Component(
      perm=None if perm is None else np.asarray(perm, np.int32),
      row_ptr=np.cumsum(row_ptr).astype(np.int32),
      col_idx=cols[order].astype(np.int32),
      mask_idx=np.concatenate(mids)[order].astype(np.int32),
      masks=masks)


def _from_predicates(seq_len, block_size, head_preds, causal, period, reach,
                     perm=None) -> Component:
  """Builds a component from one predicate per head (shared work is reused)."""
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
  # The local part is the same for every head: build it once.
  slots = [make_pred(s) for s in range(
      1 if part == "local" else num_summary_patterns)]
  preds = [slots[h % len(slots)] for h in range(num_heads)]
  comp = _from_predicates(seq_len, block_size, preds, causal, period=l,
                          reach=_reach(l, block_size))
  return Layout(seq_len, block_size, num_heads, [comp], name=name)


def _ranges(starts: np.ndarray, stops: np.ndarray):
  """The ranges [starts[i], stops[i]) concatenated, vectorised.

  Returns:
    (owner, value), int64: entry e is value[e] of range owner[e].
  """
  counts = stops - starts
  owner = np.repeat(np.arange(counts.shape[0]), counts)
  first = np.repeat(np.cumsum(counts) - counts, counts)  # each range's start
  return owner, starts[owner] + np.arange(owner.shape[0]) - first


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
    A `Component` with a per-head permutation.
  """
  n, bs, l, c = seq_len, block_size, stride, summary
  nb = n // bs
  tokens = np.arange(n, dtype=np.int64)
  perms, heads_tiles = {}, {}
  for slot in range(min(num_patterns, num_heads)):
    first = l - c * (slot + 1)  # the slot is [first, first + c) mod l
    in_slot = (tokens % l >= first) & (tokens % l < first + c)
    perm = np.concatenate([tokens[in_slot], tokens[~in_slot]])  # (n,)
    prefix = c * (perm // l)  # (n,) keys attended by kernel position p
    if own_window:
      prefix += np.clip(perm % l - first + 1, 0, c)
    prefix = prefix.reshape(nb, bs)  # (nb, bs) per query block
    full = prefix.min(axis=1) // bs  # key blocks [0, full) are full tiles
    end = -(-prefix.max(axis=1) // bs)  # partial tiles in [full, end)
    full_qb, full_kb = _ranges(np.zeros(nb, np.int64), full)
    part_qb, part_kb = _ranges(full, end)
    # (partial, bs) keys of the tile attended by each query row
    reach = np.clip(prefix[part_qb] - part_kb[:, None] * bs, 0, bs)
    shapes, mask_of = np.unique(reach, axis=0, return_inverse=True)
    masks = [np.arange(bs)[None, :] < row[:, None] for row in shapes]
    tiles = Tiles(np.concatenate([full_qb, part_qb]),
                  np.concatenate([full_kb, part_kb]),
                  np.concatenate([np.full(full_qb.shape[0], -1),
                                  mask_of.reshape(-1)]), masks)
    perms[slot], heads_tiles[slot] = perm, tiles
  slots = [h % num_patterns for h in range(num_heads)]
  return _assemble(n, bs, [heads_tiles[s] for s in slots],
                   np.stack([perms[s] for s in slots]))


def _stride_perm(seq_len: int, stride: int) -> np.ndarray:
  """Token order sorted by (i mod l, i div l): residue classes contiguous."""
  i = np.arange(seq_len, dtype=np.int64)
  return np.lexsort((i // stride, i % stride))


def _stride_component(seq_len, block_size, stride, num_heads, causal,
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
  return _from_predicates(seq_len, block_size, [pred] * num_heads, causal,
                          period, reach,
                          perm=np.tile(perm[None], (num_heads, 1)))


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
    comps.append(_window_component(seq_len, block_size, stride, num_heads,
                                   causal))
  if part in ("stride", "both"):
    comps.append(_stride_component(seq_len, block_size, stride, num_heads,
                                   causal, strict=part == "both"))
  return Layout(seq_len, block_size, num_heads, comps,
                name=f"strided(l={stride}, part={part}, causal={causal})")


def _window_component(seq_len, block_size, window, num_heads,
                      causal) -> Component:
  """i - window < j <= i (causal) or |i - j| < window."""
  def pred(i, j):
    d = i - j
    return (d >= 0) & (d < window) if causal else np.abs(d) < window
  return _from_predicates(seq_len, block_size, [pred] * num_heads, causal,
                          period=1, reach=_reach(window, block_size))


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
  comp = _window_component(seq_len, block_size, window, num_heads, causal)
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
  comp = _from_predicates(seq_len, block_size,
                          [lambda i, j: j <= i] * num_heads, True, period=1,
                          reach=1)
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
      [lambda i, j: np.ones(np.broadcast_shapes(i.shape, j.shape), np.bool_)] *
      num_heads, False, period=1, reach=1)
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


def _empty_component(seq_len, block_size, num_heads) -> Component:
  nb = seq_len // block_size
  return Component(None, np.zeros(num_heads * nb + 1, np.int32),
                   np.zeros(0, np.int32), np.zeros(0, np.int32),
                   np.zeros((0, block_size, block_size), np.uint8))


def _component_tiles(comp: Component, nb: int) -> list:
  """Splits a component into per-head `Tiles` (sharing its mask table)."""
  rows = comp.tile_rows()
  heads = (comp.row_ptr.shape[0] - 1) // nb
  masks = [m.astype(np.bool_) for m in comp.masks]
  out = []
  for h in range(heads):
    sel = rows // nb == h
    out.append(Tiles(rows[sel] % nb, comp.col_idx[sel].astype(np.int64),
                     comp.mask_idx[sel].astype(np.int64), masks))
  return out


def _perm_of(comp: Component, num_heads: int, seq_len: int) -> np.ndarray:
  """Returns int32 [heads, n]: the component's token order (identity if None)."""
  if comp.perm is None:
    return np.tile(np.arange(seq_len, dtype=np.int32)[None], (num_heads, 1))
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
  """Removes from `comp` (a component of `lay`) the tokens `other` attends."""
  nb, bs = lay.num_blocks, lay.block_size
  perm = _perm_of(comp, lay.num_heads, lay.seq_len)
  ar = np.arange(bs)
  per_head_tiles = []
  for h, tiles in enumerate(_component_tiles(comp, nb)):
    rows = perm[h][tiles.qb[:, None, None] * bs + ar[None, :, None]]
    cols = perm[h][tiles.kb[:, None, None] * bs + ar[None, None, :]]
    rows, cols = np.broadcast_arrays(rows, cols)
    taken = other.contains(np.full(rows.shape, h), rows, cols)
    kept = {}
    for t, (key, mask) in enumerate(_tile_list(tiles, bs)):
      remaining = mask & ~taken[t]
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
  for other in layouts[1:]:
    nb = result.num_blocks
    comps = list(result.components)
    for oc in other.components:
      # Keep only tokens no component of `result` holds yet; then merge tile by
      # tile into a component over the same order, or append.
      oc = _subtract(oc, other, result)
      same = [i for i, c in enumerate(comps)
              if np.array_equal(_perm_of(c, result.num_heads, result.seq_len),
                                _perm_of(oc, result.num_heads,
                                         result.seq_len))]
      if same:
        i = same[0]
        comps[i] = _assemble(
            result.seq_len, result.block_size,
            [_or_tiles(a, b, result.block_size)
             for a, b in zip(_component_tiles(comps[i], nb),
                             _component_tiles(oc, nb))],
            comps[i].perm)
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
    parts = [lay.components[c] if c < len(lay.components) else
             _empty_component(n, bs, lay.num_heads) for lay in layouts]
    tiles = []
    for lay, part in zip(layouts, parts):
      tiles.extend(_component_tiles(part, nb))
    any_perm = any(p.perm is not None for p in parts)
    perm = (np.concatenate([_perm_of(p, lay.num_heads, n)
                            for lay, p in zip(layouts, parts)])
            if any_perm else None)
    comps.append(_assemble(n, bs, tiles, perm))
  return Layout(n, bs, sum(lay.num_heads for lay in layouts), comps,
                name="per_head(" + ", ".join(l.name for l in layouts) + ")")
