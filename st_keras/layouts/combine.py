"""Combining layouts: `union` (token-wise OR) and `per_head` (heads
concatenated: the paper's multi-head integration)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .structure import Component
from .structure import Layout
from .structure import Tiles
from .structure import component_tiles
from .structure import perm_of
from .tiling import assemble


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
  perm = perm_of(comp, lay.seq_len)
  ar = np.arange(bs)
  per_head_tiles = []
  for t, tiles in enumerate(component_tiles(comp, nb)):
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
  return assemble(lay.seq_len, bs, per_head_tiles, comp.perm)


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
        if np.array_equal(perm_of(mine, n), perm_of(theirs, n)):
          comps[i] = assemble(
              n, bs, [_or_tiles(a, b, bs)
                      for a, b in zip(component_tiles(mine, nb),
                                      component_tiles(theirs, nb))],
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
      tiles.extend(component_tiles(part, nb))
    any_perm = any(p.perm is not None for p in parts)
    perm = (np.concatenate([perm_of(p, n) for p in parts])
            if any_perm else None)
    comps.append(assemble(n, bs, tiles, perm))
  return Layout(n, bs, sum(lay.num_heads for lay in layouts), comps,
                name="per_head(" + ", ".join(l.name for l in layouts) + ")")
