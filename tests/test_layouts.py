"""Layouts against the paper's token-level formulas, written independently."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from st_keras import layouts
from st_keras import plotting
from st_keras.layouts import combine
from st_keras.layouts import structure
from st_keras.layouts import tiling
from tests import reference


@pytest.mark.parametrize("n,bs,l,c,heads,patterns", [
    (256, 16, 64, 16, 3, 2),
    (384, 32, 128, 32, 2, 1),
    (192, 16, 40, 8, 4, 3),   # l not a multiple of the block size
    (64, 64, 128, 32, 1, 1),  # n = one block, shorter than a window
    (512, 128, 128, 32, 2, 4),
])
@pytest.mark.parametrize("part", ["local", "summary", "both"])
@pytest.mark.parametrize("causal", [True, False])
def test_fixed_equals_formula(n, bs, l, c, heads, patterns, part, causal):
  lay = layouts.fixed(n, block_size=bs, stride=l, summary=c, num_heads=heads,
                      num_summary_patterns=patterns, part=part, causal=causal)
  want = reference.fixed_mask(n, l, c, heads, patterns, part, causal)
  np.testing.assert_array_equal(lay.to_dense(), want)
  assert lay.density() == pytest.approx(want.mean(), abs=1e-12)
  assert lay.num_pairs() == int(want.sum())


@pytest.mark.parametrize("n,bs,l,heads", [
    (256, 16, 64, 2),
    (384, 32, 100, 1),  # n not a multiple of the stride
    (96, 32, 7, 2),
    (480, 16, 50, 2),
    (256, 64, 100, 1),  # chunks shorter than a block
    (128, 128, 16, 1),  # n = one block
    (320, 64, 128, 3),
])
@pytest.mark.parametrize("part", ["local", "stride", "both"])
@pytest.mark.parametrize("causal", [True, False])
def test_strided_equals_formula(n, bs, l, heads, part, causal):
  lay = layouts.strided(n, block_size=bs, stride=l, num_heads=heads, part=part,
                        causal=causal)
  want = reference.strided_mask(n, l, heads, part, causal)
  np.testing.assert_array_equal(lay.to_dense(), want)
  assert lay.num_pairs() == int(want.sum())


@pytest.mark.parametrize("block,heads,patterns,bound", [
    (64, 2, 1, 1.15), (128, 3, 3, 1.3)])  # original order: 1.94, 3.77
def test_fixed_summary_narrower_than_a_tile_is_not_computed_half_empty(
    block, heads, patterns, bound):
  # c = 32 is half (or a quarter) of a tile: in original order every
  # summary tile would be computed whole (about 1.9 pairs per attended
  # pair at block 64); with the summary tokens gathered in front, queries
  # attend prefixes of full tiles.
  lay = layouts.fixed(4096, block, stride=128, summary=32, num_heads=heads,
                      num_summary_patterns=patterns)
  assert len(lay.components) == 2 and lay.components[1].perm is not None
  # Tiles computed for all heads (heads sharing tables compute them each).
  computed = sum(c.nnz * (heads // c.table_heads)
                 for c in lay.components) * block * block
  assert computed / lay.num_pairs() < bound


def test_strided_stride_part_is_dense_tiles_in_transposed_order():
  # The stride part must not be computed as one key in every l inside dense
  # tiles: in the kernel's (transposed) order the tiles it computes are at
  # least 40% used, while tiles in original order would hold 1 key in 32.
  lay = layouts.strided(4096, block_size=32, stride=128, num_heads=1,
                        part="stride")
  (comp,) = lay.components
  assert comp.perm is not None
  computed = comp.nnz * 32 * 32
  assert lay.num_pairs() / computed > 0.4
  original_order_tiles = int(lay.block_mask().sum())
  assert computed * 8 < original_order_tiles * 32 * 32


@pytest.mark.parametrize("n,bs,window,causal", [
    (256, 16, 40, True), (256, 32, 32, False), (64, 64, 200, True)])
def test_local_and_causal_and_dense(n, bs, window, causal):
  i = np.arange(n)[:, None]
  j = np.arange(n)[None, :]
  want = ((i - j >= 0) & (i - j < window)) if causal else (
      np.abs(i - j) < window)
  lay = layouts.local(n, bs, window, num_heads=2, causal=causal)
  np.testing.assert_array_equal(lay.to_dense(), np.stack([want, want]))
  np.testing.assert_array_equal(layouts.causal(n, bs, 3).to_dense(),
                                np.broadcast_to(j <= i, (3, n, n)))
  assert layouts.dense(n, bs, 1).to_dense().all()


def test_from_mask_roundtrip_and_block_mask():
  rng = np.random.default_rng()
  mask = rng.random((3, 128, 128)) < 0.05
  mask[1, 17] = False  # an empty row
  lay = layouts.from_mask(mask, block_size=16)
  np.testing.assert_array_equal(lay.to_dense(), mask)
  blocks = mask.reshape(3, 8, 16, 8, 16).any(axis=(2, 4))
  np.testing.assert_array_equal(lay.block_mask(), blocks)


def test_union_and_per_head():
  n, bs = 256, 16
  a = layouts.fixed(n, bs, stride=64, summary=16, num_heads=2,
                    num_summary_patterns=2)
  b = layouts.strided(n, bs, stride=48, num_heads=2, part="both")
  u = layouts.union(a, b)
  np.testing.assert_array_equal(u.to_dense(), a.to_dense() | b.to_dense())
  assert u.num_pairs() == int((a.to_dense() | b.to_dense()).sum())
  u2 = layouts.union(b, a)  # permuted component first
  np.testing.assert_array_equal(u2.to_dense(), u.to_dense())
  assert u2.num_pairs() == u.num_pairs()

  parts = [layouts.strided(n, bs, 64, 1, part="local"),
           layouts.strided(n, bs, 64, 2, part="stride"),
           layouts.fixed(n, bs, 64, 16, 1)]
  ph = layouts.per_head(*parts)
  assert ph.num_heads == 4
  np.testing.assert_array_equal(
      ph.to_dense(), np.concatenate([p.to_dense() for p in parts]))


def test_contains_matches_dense():
  lay = layouts.union(layouts.fixed(192, 16, 64, 16, 2),
                      layouts.strided(192, 16, 40, 2))
  rng = np.random.default_rng()
  h, i, j = (rng.integers(0, hi, 500) for hi in (2, 192, 192))
  np.testing.assert_array_equal(lay.contains(h, i, j), lay.to_dense()[h, i, j])


def _reaches_within(mask, hops):
  """bool [n, n]: j reaches i through at most `hops` attention steps."""
  step = mask.astype(np.int64)
  reach = step.copy()
  for _ in range(hops - 1):
    reach = ((reach @ step) > 0).astype(np.int64) | reach
  return reach > 0


@pytest.mark.parametrize("make", [
    lambda n: layouts.fixed(n, 16, stride=32, summary=8, num_heads=1),
    lambda n: layouts.strided(n, 16, stride=16, num_heads=1),
])
def test_merged_patterns_connect_every_pair_within_three_hops(make):
  n = 256
  mask = make(n).to_dense()[0]
  reach = _reaches_within(mask, hops=3)
  causal = np.tril(np.ones((n, n), np.bool_))
  assert reach[causal].all()
  assert not reach[~causal].any()


def test_one_part_alone_does_not_connect_everything():
  # The check above can fail: a local-only pattern does not connect far pairs.
  mask = layouts.fixed(256, 16, 32, 8, 1, part="local").to_dense()[0]
  assert not _reaches_within(mask, hops=3)[255, 0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_len=100), "multiple of block_size"),
    (dict(block_size=24), "block_size"),
    (dict(part="A3"), "part"),
    (dict(summary=200), "summary"),
    (dict(num_summary_patterns=5), "num_summary_patterns"),
    (dict(num_heads=0), "num_heads"),
])
def test_fixed_bad_arguments(kwargs, match):
  args = dict(seq_len=256, block_size=32, stride=128, summary=32)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    layouts.fixed(**args)


def test_combinators_reject_mismatched_layouts():
  with pytest.raises(ValueError, match="seq_len"):
    layouts.union(layouts.causal(64, 16), layouts.causal(128, 16))
  with pytest.raises(ValueError, match="num_heads"):
    layouts.union(layouts.causal(64, 16, 1), layouts.causal(64, 16, 2))
  with pytest.raises(ValueError, match="shape"):
    layouts.from_mask(np.ones((2, 64, 32), np.bool_), 16)


def test_large_layouts_build_quickly_and_stay_sparse():
  lay = layouts.fixed(65536, 32, 128, 32, num_heads=4)
  # Per row: the own window (<= 128 keys) plus 32 summary keys per window.
  assert lay.density() < 0.13
  assert layouts.strided(65536, 32, 128, 4).density() < 0.01


@pytest.mark.parametrize("make", [
    lambda heads: layouts.fixed(65536, 32, 1024, 32, num_heads=heads),
    lambda heads: layouts.strided(65536, 32, 1024, num_heads=heads),
])
def test_heads_sharing_a_pattern_store_it_once(make):
  many, one = make(8), make(1)
  assert many.num_pairs() == 8 * one.num_pairs() > 0
  for comp, single in zip(many.components, one.components, strict=True):
    assert comp.table_heads == 1
    assert comp.nnz == single.nnz > 0
    assert comp.row_ptr.shape == single.row_ptr.shape
    assert comp.perm is None or comp.perm.shape == (1, 65536)


def _expanded(lay):
  """The same layout with per-head tables (table_heads = num_heads)."""
  return layouts.Layout(
      lay.seq_len, lay.block_size, lay.num_heads,
      [combine._expand(c, lay.num_heads) for c in lay.components],  # pylint: disable=protected-access
      name=lay.name)


@pytest.mark.parametrize("make,table_heads", [
    (lambda: layouts.fixed(256, 16, 64, 16, 6, num_summary_patterns=1), [1]),
    (lambda: layouts.fixed(256, 16, 64, 16, 6, num_summary_patterns=2), [2]),
    (lambda: layouts.fixed(256, 16, 64, 16, 6, num_summary_patterns=3), [3]),
    # Summary slots narrower than a tile: a shared local part and the summary
    # tokens gathered in front per pattern.
    (lambda: layouts.fixed(256, 32, 64, 16, 6, num_summary_patterns=3),
     [1, 3]),
    (lambda: layouts.fixed(256, 16, 64, 8, 6, num_summary_patterns=4),
     [1, 6]),  # 4 does not divide 6: per-head summary tables
    (lambda: layouts.strided(240, 16, 40, 6), [1, 1]),
    (lambda: layouts.local(192, 32, 50, 4, causal=False), [1]),
    (lambda: layouts.per_head(layouts.fixed(128, 16, 32, 8, 2),
                              layouts.strided(128, 16, 32, 4)), [6, 6]),
    (lambda: layouts.union(layouts.fixed(128, 16, 32, 8, 4,
                                         num_summary_patterns=2),
                           layouts.strided(128, 16, 24, 4)), [2, 2, 2]),
])
def test_shared_tables_equal_per_head_tables(make, table_heads):
  lay = make()
  assert [c.table_heads for c in lay.components] == table_heads
  full = _expanded(lay)
  assert all(c.table_heads == lay.num_heads for c in full.components)
  dense = lay.to_dense()
  np.testing.assert_array_equal(dense, full.to_dense())
  assert lay.num_pairs() == full.num_pairs() == int(dense.sum())
  rng = np.random.default_rng(7)
  h, i, j = (rng.integers(0, hi, 3000)
             for hi in (lay.num_heads, lay.seq_len, lay.seq_len))
  np.testing.assert_array_equal(lay.contains(h, i, j), dense[h, i, j])
  np.testing.assert_array_equal(full.contains(h, i, j), dense[h, i, j])
  assert dense[h, i, j].any() and not dense[h, i, j].all()


def test_layout_rejects_tables_whose_heads_do_not_divide_num_heads():
  comp = layouts.fixed(128, 16, 32, 16, 3, num_summary_patterns=2).components[0]
  assert comp.table_heads == 3
  with pytest.raises(ValueError, match=r"table_heads \(3\) must divide "
                     r"num_heads \(4\)"):
    layouts.Layout(128, 16, 4, [comp])
  with pytest.raises(ValueError, match="row_ptr"):
    layouts.Layout(256, 16, 3, [comp])


def _tile_masks(comp, block_size):
  """bool [nnz, bs, bs]: every tile's token mask (full tiles all True)."""
  tiles = np.ones((comp.nnz, block_size, block_size), np.bool_)
  partial = comp.mask_idx >= 0
  tiles[partial] = comp.masks[comp.mask_idx[partial]].astype(np.bool_)
  return tiles


@pytest.mark.parametrize("make", [
    lambda: layouts.fixed(512, 16, 64, 16, 2, num_summary_patterns=2),
    lambda: layouts.fixed(480, 32, 96, 32, 1, causal=False),
    lambda: layouts.fixed(448, 16, 40, 8, 3, num_summary_patterns=3),
    lambda: layouts.fixed(384, 64, 200, 40, 1, part="summary", causal=False),
    lambda: layouts.fixed(512, 128, 128, 32, 2, part="local"),
    lambda: layouts.strided(512, 16, 64, 2),
    lambda: layouts.strided(576, 32, 48, 1, causal=False),
    lambda: layouts.strided(480, 16, 100, 1, part="stride"),  # n % l != 0
    lambda: layouts.strided(384, 64, 24, 1, part="local", causal=False),
    lambda: layouts.local(320, 16, 37, 1),
    lambda: layouts.local(320, 32, 70, 2, causal=False),
    lambda: layouts.causal(256, 16, 2),
    lambda: layouts.dense(192, 32, 1),
    # The benchmark's patterns (block 32, stride 1024), shorter.
    lambda: layouts.fixed(4096, 32, 1024, 32, 2),
    lambda: layouts.strided(8192, 32, 1024, 2),
])
def test_periodic_construction_equals_evaluating_every_tile(make,
                                                            monkeypatch):
  fast = make()
  generic = tiling.head_blocks
  monkeypatch.setattr(
      tiling, "head_blocks",
      lambda n, bs, pred, causal, period, reach: generic(n, bs, pred, causal,
                                                         None, None))
  slow = make()
  assert len(fast.components) == len(slow.components)
  for a, b in zip(fast.components, slow.components):
    assert a.table_heads == b.table_heads
    np.testing.assert_array_equal(a.row_ptr, b.row_ptr)
    np.testing.assert_array_equal(a.col_idx, b.col_idx)
    np.testing.assert_array_equal(_tile_masks(a, fast.block_size),
                                  _tile_masks(b, slow.block_size))
    assert a.perm is None if b.perm is None else np.array_equal(a.perm,
                                                                b.perm)
  assert fast.num_pairs() > 0


def test_column_tables_list_the_tiles_by_key_block():
  comp = layouts.fixed(512, 16, 64, 16, 4,
                       num_summary_patterns=2).components[0]
  nb = 32
  col_ptr, row_idx, col_mask_idx = comp.column_tables(nb)
  rows = comp.tile_rows()
  want = sorted(zip(rows // nb, comp.col_idx, rows % nb, comp.mask_idx))
  heads = np.repeat(np.arange(2 * nb), np.diff(col_ptr))
  got = list(zip(heads // nb, heads % nb, row_idx, col_mask_idx))
  assert got == [tuple(w) for w in want]
  with pytest.raises(ValueError, match="num_blocks"):
    comp.column_tables(nb * 2)


def test_save_layout_png(tmp_path):
  path = plotting.save_layout_png(layouts.fixed(256, 16, 64, 16, 1),
                                  os.path.join(tmp_path, "fixed.png"))
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(path) > 1000


def test_layouts_import_without_tensorflow():
  # st_keras.layouts is numpy-only: with TensorFlow blocked, `import st_keras`
  # gives the layouts, and the TensorFlow modules say why they are missing.
  script = textwrap.dedent("""
      import sys
      sys.modules["tensorflow"] = None  # `import tensorflow` fails
      import st_keras
      from st_keras import layouts
      assert layouts.fixed(4096, 64, 128, 32, num_heads=2).num_pairs() > 0
      loaded = [m for m, v in sys.modules.items() if v is not None and
                m.split(".")[0] in ("tensorflow", "keras")]
      assert not loaded, loaded
      try:
        st_keras.ops
      except ImportError as e:
        assert "needs TensorFlow" in str(e), e
      else:
        raise AssertionError("st_keras.ops without TensorFlow")
      print("OK")
      """)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", script], cwd=repo,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=repo))
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr


@pytest.mark.parametrize("bound", [1, 300, 2**16, 2**16 + 1, 2**35])
def test_stable_argsort_equals_numpy(bound):
  keys = np.random.default_rng(bound).integers(0, bound, 5000)
  keys[:40] = keys[40:80]  # ties, kept in order
  order = structure.stable_argsort(keys, bound)
  np.testing.assert_array_equal(order, np.argsort(keys, kind="stable"))


@pytest.mark.parametrize("n,bs,l", [(384, 32, 100), (96, 32, 7),
                                    (256, 64, 100), (512, 16, 3)])
@pytest.mark.parametrize("causal", [True, False])
def test_stride_chunks_build_the_tiles_every_tile_evaluation_finds(n, bs, l,
                                                                   causal):
  # n not a multiple of l: chunks of two lengths, built by chunk bounds.
  comp = layouts.strided(n, bs, l, part="stride", causal=causal).components[0]
  perm = comp.perm[0]
  chunk = perm % l

  def pred(p, q):
    same = chunk[p] == chunk[q]
    return same & (q <= p) if causal else same
  generic = tiling.head_blocks(n, bs, pred, causal, None, None)
  np.testing.assert_array_equal(np.repeat(np.arange(n // bs),
                                          np.diff(comp.row_ptr)), generic.qb)
  np.testing.assert_array_equal(comp.col_idx, generic.kb)
  want = np.ones((generic.qb.shape[0], bs, bs), np.bool_)
  partial = generic.mask_idx >= 0
  want[partial] = np.stack(generic.masks)[generic.mask_idx[partial]]
  np.testing.assert_array_equal(_tile_masks(comp, bs), want)
