"""Building a component's tiles from token predicates: every candidate
tile, or for periodic patterns a few tile signatures (sign of the block
offset, query and key phase) instead of all nb^2 candidates."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from .structure import SUPPORTED_BLOCK_SIZES
from .structure import Component
from .structure import Tiles

# Candidate block pairs are classified in chunks of this many pairs, and token
# masks are evaluated for at most this many tiles at a time.
PAIR_CHUNK = 1 << 22
TILE_CHUNK = 1 << 11

# A token predicate in kernel coordinates: pred(p, q) -> bool array, where p are
# query positions and q key positions (broadcastable integer arrays).
TokenPredicate = Callable[[np.ndarray, np.ndarray], np.ndarray]


def check_common(seq_len: int, block_size: int, num_heads: int) -> None:
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


class TileClassifier:
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
    for c0 in range(0, qb.shape[0], TILE_CHUNK):
      p = qb[c0:c0 + TILE_CHUNK, None, None] * bs + ar[None, :, None]
      q = kb[c0:c0 + TILE_CHUNK, None, None] * bs + ar[None, None, :]
      tiles = np.broadcast_to(self.pred(p, q), (p.shape[0], bs, bs))
      flat = tiles.reshape(p.shape[0], bs * bs)
      chunk = np.where(flat.all(axis=1), -1, -2)
      for i in np.flatnonzero(flat.any(axis=1) & (chunk == -2)).tolist():
        key = np.packbits(flat[i]).tobytes()
        if key not in self._ids:
          self._ids[key] = len(self.masks)
          self.masks.append(tiles[i].copy())
        chunk[i] = self._ids[key]
      status[c0:c0 + TILE_CHUNK] = chunk
    return status


def head_blocks(seq_len: int, block_size: int, pred: TokenPredicate,
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
  classify = TileClassifier(block_size, pred)
  if period is not None:
    qb, kb, status = _periodic_blocks(nb, block_size, classify, causal,
                                      period, reach)
    return Tiles(qb, kb, status, classify.masks)
  out_q, out_k, out_m = [], [], []
  rows_per_chunk = max(1, PAIR_CHUNK // nb)
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
  """The non-empty tiles of a periodic predicate (see `head_blocks`).

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
    classify: a `TileClassifier` of the predicate.
    causal: only tiles with kb <= qb are candidates.
    period: P.
    reach: the band's half width in blocks (at least 1).

  Returns:
    (qb, kb, status), int32 [t], sorted by (qb, kb); status as
    `TileClassifier` gives it (-1 or a mask index).
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

    def count(stops, per_phase=per_phase, below=below):
      """Tiles of each row with kb < stops: (nb,)."""
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
  idx = range_concat(starts.ravel(), lengths.ravel())
  qb = np.repeat(np.arange(nb, dtype=np.int32), lengths.sum(axis=1))
  return qb, src_kb[idx], src_status[idx]


def _band_blocks(nb, bp, classify, causal, reach):
  """The non-empty tiles with |qb - kb| < reach (see `_periodic_blocks`).

  Args:
    nb: blocks.
    bp: blocks per phase period.
    classify: a `TileClassifier` of the predicate.
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


def assemble(seq_len: int, block_size: int, head_tiles: Sequence[Tiles],
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


def from_predicates(seq_len, block_size, head_preds, causal, period, reach,
                     perm=None) -> Component:
  """Builds a component from one predicate per table head (reusing shared
  work)."""
  built = {}
  blocks = []
  for pred in head_preds:
    if id(pred) not in built:
      built[id(pred)] = head_blocks(seq_len, block_size, pred, causal, period,
                                     reach)
    blocks.append(built[id(pred)])
  return assemble(seq_len, block_size, blocks, perm)


def reach_blocks(width: int, block_size: int) -> int:
  """Block offset beyond which two tokens are more than `width` apart."""
  return -(-width // block_size) + 1


def range_concat(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
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


def ranges(starts, stops):
  """The ranges [starts[i], stops[i]) concatenated, vectorised.

  Returns:
    (owner, value), int64: entry e is value[e] of range owner[e].
  """
  counts = stops - starts
  owner = np.repeat(np.arange(counts.shape[0]), counts)
  return owner, range_concat(starts, counts)
