"""The paper's patterns and the usual ones as layouts: `fixed`, `strided`,
`local`, `causal`, `dense`, and `from_mask` for any token mask."""

from __future__ import annotations

import numpy as np

from .structure import Component
from .structure import Layout
from .structure import Tiles
from .tiling import TileClassifier
from .tiling import assemble
from .tiling import check_common
from .tiling import from_predicates
from .tiling import ranges
from .tiling import reach_blocks

_FIXED_PARTS = ("local", "summary", "both")
_STRIDED_PARTS = ("local", "stride", "both")


def _check_pattern(seq_len, block_size, num_heads, part, parts) -> None:
  """`check_common`, and `part` one of `parts`: clear errors naming each."""
  check_common(seq_len, block_size, num_heads)
  if part not in parts:
    raise ValueError(f"part must be one of {parts}, got {part!r}")


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
  _check_pattern(seq_len, block_size, num_heads, part, _FIXED_PARTS)
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
  comp = from_predicates(seq_len, block_size, preds, causal, period=l,
                          reach=reach_blocks(l, block_size))
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
    qb, kb = ranges(np.zeros(nb, np.int64), end)  # sorted by (qb, kb)
    part = kb >= full[qb]
    # (partial, bs) keys of the tile attended by each query row
    reach = np.clip(prefix[qb[part]] - kb[part, None] * bs, 0, bs)
    shapes, mask_of = np.unique(reach, axis=0, return_inverse=True)
    masks = [np.arange(bs)[None, :] < row[:, None] for row in shapes]
    mask_idx = np.full(qb.shape[0], -1, np.int64)
    mask_idx[part] = mask_of.reshape(-1)
    perms[slot], heads_tiles[slot] = perm, Tiles(qb, kb, mask_idx, masks)
  slots = [t % num_patterns for t in range(table_heads)]
  return assemble(n, bs, [heads_tiles[s] for s in slots],
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
    period = seq_len // stride
    return from_predicates(seq_len, block_size, [pred], causal, period,
                           reach_blocks(period, block_size), perm=perm[None])
  # Chunks of two lengths: no common period.
  tiles = _chunk_tiles(seq_len, block_size, chunk, pred, causal)
  return assemble(seq_len, block_size, [tiles], perm[None])


def _chunk_tiles(seq_len, block_size, chunk, pred, causal) -> Tiles:
  """The tiles of attention within contiguous chunks of tokens.

  `pred(p, q)` must hold only where chunk[p] == chunk[q], and for every such
  pair off the diagonal tile (and, causal, below it). A query block's
  candidates are then the key blocks from its first token's chunk start to
  its last token's chunk end (causal: to itself); a candidate inside one
  chunk off the diagonal is full, and only the others (chunk boundaries,
  the diagonal) are evaluated token by token.

  Args:
    seq_len: n.
    block_size: tile width.
    chunk: int [n], the chunk of each kernel position, nondecreasing.
    pred: the token predicate in kernel coordinates.
    causal: only key blocks <= the query block.

  Returns:
    `Tiles`, sorted by (qb, kb).
  """
  bs = block_size
  nb = seq_len // bs
  starts = np.searchsorted(chunk, chunk, side="left")  # (n,) chunk start
  ends = np.searchsorted(chunk, chunk, side="right")  # (n,) chunk end
  first, last = chunk[::bs], chunk[bs - 1::bs]  # (nb,) chunks of block ends
  rows = np.arange(nb, dtype=np.int64)
  lo = starts[::bs] // bs  # first candidate key block per query block
  hi = rows + 1 if causal else (ends[bs - 1::bs] - 1) // bs + 1
  qb, kb = ranges(lo, hi)  # sorted by (qb, kb)
  full = ((first[qb] == last[qb]) & (first[kb] == last[kb]) &
          (first[qb] == first[kb]) & (qb != kb))
  status = np.full(qb.shape[0], -1, np.int64)
  classify = TileClassifier(bs, pred)
  status[~full] = classify(qb[~full], kb[~full])
  keep = status > -2
  return Tiles(qb[keep], kb[keep], status[keep], classify.masks)


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
  _check_pattern(seq_len, block_size, num_heads, part, _STRIDED_PARTS)
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
  return from_predicates(seq_len, block_size, [pred], causal, period=1,
                          reach=reach_blocks(window, block_size))


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
  check_common(seq_len, block_size, num_heads)
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
  return _all_pairs(seq_len, block_size, num_heads, causal=True)


def dense(seq_len: int, block_size: int = 32, num_heads: int = 1) -> Layout:
  """Full bidirectional attention as a layout (every tile full); the
  arguments are `causal`'s."""
  return _all_pairs(seq_len, block_size, num_heads, causal=False)


def _all_pairs(seq_len, block_size, num_heads, causal) -> Layout:
  """Every (causal: j <= i) pair, one table for all heads."""
  check_common(seq_len, block_size, num_heads)

  def pred(i, j):
    return j <= i if causal else np.ones(np.broadcast_shapes(i.shape, j.shape),
                                         np.bool_)
  comp = from_predicates(seq_len, block_size, [pred], causal, period=1,
                         reach=1)
  return Layout(seq_len, block_size, num_heads, [comp],
                name="causal" if causal else "dense")


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
  check_common(n, block_size, heads)
  mask = mask.astype(np.bool_)
  preds = [(lambda m: lambda i, j: m[i, j])(mask[h]) for h in range(heads)]
  comp = from_predicates(n, block_size, preds, False, period=None, reach=None)
  return Layout(n, block_size, heads, [comp], name="from_mask")
