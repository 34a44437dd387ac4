"""block_sparse_attention on hostile input: block sizes, extreme scores, NaN.

Both implementations (fused op and pure TF) against an independent float64
reference (tests/reference.py). Inputs are seeded so that a failure replays.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from st_keras import layouts
from st_keras import ops
from tests import reference

IMPLS = ["custom_op", "pure_tf"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The audit's crash: a block size of 262144 read from the masks' shape made
# the forward kernel's scratch allocation fail in a worker thread (SIGSEGV).
_HUGE_BLOCK_SCRIPT = r"""
import numpy as np
import tensorflow as tf
from st_keras import ops

lib = ops.load_library()
n = 262144
z = np.zeros((1, 1, n, 1), np.float32)
stats = np.zeros((1, 1, n, 2), np.float32)
dlse = np.zeros((1, 1, n), np.float32)
tables = [np.zeros(0, np.int32), np.zeros((0, 0), np.int32),
          np.array([0, 1], np.int32), np.array([0], np.int32),
          np.array([-1], np.int32), np.zeros((0, n, n), np.uint8),
          np.array([0, 1], np.int32), np.array([0], np.int32),
          np.array([-1], np.int32)]
calls = {
    "forward": lambda: lib.sparse_transformer_block_sparse_attention(
        z, z, z, *tables, scale=1.0),
    "gradient": lambda: lib.sparse_transformer_block_sparse_attention_grad(
        z, z, z, z, stats, z, dlse, *tables, scale=1.0),
}
for name, call in calls.items():
  try:
    call()
    print(name, "ran")
  except tf.errors.InvalidArgumentError as err:
    print(name, "InvalidArgumentError:", err.message)
"""


def test_huge_block_size_is_an_error_not_a_crash():
  result = subprocess.run([sys.executable, "-c", _HUGE_BLOCK_SCRIPT],
                          cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
  for name in ("forward", "gradient"):
    assert re.search(
        rf"{name} InvalidArgumentError: .*block size \(masks.shape\[1\]\) "
        r"must be one of 16, 32, 64, 128, got 262144", result.stdout), (
            result.stdout, result.stderr[-3000:])


@pytest.mark.parametrize("block_size", [48, 256])
def test_unsupported_block_sizes_are_rejected_by_both_ops(block_size):
  rng = np.random.default_rng(11)
  n = block_size
  q = rng.standard_normal((1, 1, n, 8)).astype(np.float32)
  stats = np.zeros((1, 1, n, 2), np.float32)
  dlse = np.zeros((1, 1, n), np.float32)
  tables = [np.zeros(0, np.int32), np.zeros((0, 0), np.int32),
            np.array([0, 1], np.int32), np.array([0], np.int32),
            np.array([-1], np.int32),
            np.zeros((0, block_size, block_size), np.uint8),
            np.array([0, 1], np.int32), np.array([0], np.int32),
            np.array([-1], np.int32)]
  lib = ops.load_library()
  match = f"must be one of 16, 32, 64, 128, got {block_size}"
  with pytest.raises(tf.errors.InvalidArgumentError, match=match):
    lib.sparse_transformer_block_sparse_attention(q, q, q, *tables, scale=1.0)
  with pytest.raises(tf.errors.InvalidArgumentError, match=match):
    lib.sparse_transformer_block_sparse_attention_grad(
        q, q, q, q, stats, q, dlse, *tables, scale=1.0)


# ----------------------------------------------------------------------------
# Huge scores: the softmax is one-hot or an exact tie, and must be exact.


def _integer_inputs(rng, shape, low, high, unit, dtype=np.float32):
  """Integers in [low, high] times `unit` (a power of two): q.k is exact."""
  return (rng.integers(low, high + 1, shape) * unit).astype(dtype)


# name: (q's unit, k's unit, integer range, scale, dtype). Scores reach 1e9
# to 1e20, where a rounding slip between the row max and the exponents is
# far larger than exp can take.
EXTREME = {
    "scale_1e10": (1.0, 1.0, 3, 1e10, np.float32),
    "scale_1e30": (2.0**-40, 1.0, 3, 1e30, np.float32),
    "entries_3e4_default_scale": (2.0**13, 2.0**13, 4, None, np.float32),
    "float16_entries_6e4": (2.0**13, 2.0**13, 7, None, np.float16),
}


def _forward_and_grads(q, k, v, lay, impl, dout, scale=None):
  """Returns (out, [dq, dk, dv]) as float64 arrays; loss = sum(out * dout)."""
  qt, kt, vt = (tf.constant(x) for x in (q, k, v))
  with tf.GradientTape() as tape:
    tape.watch([qt, kt, vt])
    out = ops.block_sparse_attention(qt, kt, vt, lay, scale=scale,
                                     implementation=impl)
    loss = tf.reduce_sum(tf.cast(out, tf.float32) * dout)
  grads = tape.gradient(loss, [qt, kt, vt])
  return (tf.cast(out, tf.float64).numpy(),
          [tf.cast(g, tf.float64).numpy() for g in grads])


def _assert_matches_reference(lay, q, k, v, dout, scale, impl, tol):
  """Forward within tol of the float64 reference, gradients within 10 tol
  of their largest entry (they reach scale * |k|); returns the output."""
  ref_scale = 32**-0.5 if scale is None else scale
  mask = lay.to_dense()
  want, _ = reference.attention(q, k, v, mask, ref_scale)
  want_grads = reference.attention_grads(q, k, v, mask, ref_scale, dout)
  out, grads = _forward_and_grads(q, k, v, lay, impl, dout, scale)
  np.testing.assert_allclose(out, want, atol=tol, rtol=0)
  for got, w, name in zip(grads, want_grads, ("dq", "dk", "dv")):
    err = np.abs(got - w).max()
    assert err <= 10 * tol * np.abs(w).max(), (name, err, np.abs(w).max())
  return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", sorted(EXTREME))
def test_huge_scores_give_the_exact_softmax(case, impl):
  q_unit, k_unit, high, scale, dtype = EXTREME[case]
  lay = layouts.causal(64, 16, num_heads=2)
  rng = np.random.default_rng(sorted(EXTREME).index(case))
  shape = (2, 2, 64, 32)
  q = _integer_inputs(rng, shape, -high, high, q_unit, dtype)
  k = _integer_inputs(rng, shape, -high, high, k_unit, dtype)
  k[:, :, 1] = k[:, :, 0]  # query 1's two keys tie exactly
  v = rng.standard_normal(shape).astype(dtype)
  # Small enough that float16 gradients stay in range; float16-exact.
  dout = rng.standard_normal(shape).astype(np.float16).astype(np.float32)
  dout *= 2.0**-6
  tol = 2e-5 if dtype == np.float32 else 4e-3
  out = _assert_matches_reference(lay, q, k, v, dout, scale, impl, tol)
  # Query 0 attends key 0 only; query 1 averages its two equal keys.
  np.testing.assert_array_equal(out[:, :, 0], v[:, :, 0].astype(np.float64))
  np.testing.assert_allclose(out[:, :, 1],
                             v[:, :, :2].astype(np.float64).mean(2), atol=tol)


def test_huge_scores_merge_the_parts_of_a_layout_exactly():
  # The strided layout is two token-disjoint parts merged by their
  # log-sum-exp; query 16's three top keys tie across the parts (0 in the
  # stride part, 9 and 10 in the local one), at scores near 1e11.
  lay = layouts.strided(64, 16, 8, num_heads=2)
  mask = lay.to_dense()
  assert mask[:, 16, [0, 9, 10]].all()
  rng = np.random.default_rng(12)
  shape = (2, 2, 64, 32)
  q = _integer_inputs(rng, shape, -3, 3, 1.0)
  k = _integer_inputs(rng, shape, -3, 3, 1.0)
  k[:, :, [0, 9, 10]] = np.where(q[:, :, 16:17] < 0, -4.0, 4.0)
  v = rng.standard_normal(shape).astype(np.float32)
  dout = rng.standard_normal(shape).astype(np.float32)
  for impl in IMPLS:
    out = _assert_matches_reference(lay, q, k, v, dout, 1e10, impl, tol=2e-5)
    np.testing.assert_allclose(out[:, :, 16], v[:, :, [0, 9, 10]].mean(2),
                               atol=1e-6)


# ----------------------------------------------------------------------------
# NaN and inf: exactly the outputs exact arithmetic poisons.


def _nan_layouts():
  mask = np.random.default_rng(7).random((2, 64, 64)) < 0.3
  mask[1, 9] = False  # a query with no allowed key
  return {
      "from_mask": layouts.from_mask(mask, 16),
      "union": layouts.union(layouts.fixed(64, 16, 32, 8, 2),
                             layouts.strided(64, 16, 24, 2)),
  }


NAN_LAYOUTS = _nan_layouts()
B0, H0 = 0, 1  # where the non-finite entry goes


def _nan_setup(name, seed):
  """Layout, its dense mask [H, n, n], clean inputs and dout (float32)."""
  lay = NAN_LAYOUTS[name]
  rng = np.random.default_rng(seed)
  q, k, v, dout = (rng.standard_normal((2, 2, 64, 32)).astype(np.float32)
                   for _ in range(4))
  return lay, lay.to_dense(), q, k, v, dout


def _partly_attended_key(mask):
  """A key of head H0 that some but not all queries of its blocks attend."""
  counts = mask[H0].sum(axis=0)
  return int(np.flatnonzero((counts >= 3) & (counts <= 40))[0])


def _check(got, want, nan, care=None, what=""):
  """Where `care`: got is NaN exactly where `nan`, else close to want."""
  care = np.ones(got.shape, bool) if care is None else care
  np.testing.assert_array_equal(np.isnan(got)[care], nan[care],
                                err_msg=f"{what}: NaN pattern")
  ok = care & ~nan
  np.testing.assert_allclose(got[ok], want[ok], atol=5e-5, rtol=1e-3,
                             err_msg=what)


def _rows(mask_rows, d=32):
  """[n] bool at (B0, H0) -> [2, 2, n, d] bool."""
  full = np.zeros((2, 2, mask_rows.shape[0], d), bool)
  full[B0, H0] = mask_rows[:, None]
  return full


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(NAN_LAYOUTS))
def test_nan_in_q_poisons_its_row(name, impl):
  lay, mask, q, k, v, dout = _nan_setup(name, 1)
  i = int(np.flatnonzero(mask[H0].sum(axis=1) >= 3)[0])
  attended = mask[H0, i]  # (n,) keys of query i
  assert 0 < attended.sum() < 64
  want, _ = reference.attention(q, k, v, mask, 0.3)
  want_grads = reference.attention_grads(q, k, v, mask, 0.3, dout)
  bad = q.copy()
  bad[B0, H0, i, 5] = np.nan
  empty = np.flatnonzero(~mask[H0].any(axis=1))
  bad[B0, H0, empty] = np.nan  # no allowed key: stays zero
  out, (dq, dk, dv) = _forward_and_grads(bad, k, v, lay, impl, dout, 0.3)

  row_i = np.arange(64) == i
  _check(out, want, _rows(row_i), what="out")
  _check(dq, want_grads[0], _rows(row_i), what="dq")
  # dK, dV: NaN at the keys query i attends. Elsewhere in (B0, H0) the GEMMs
  # over a tile may spread it as 0 * NaN (query i's q, or its upstream
  # gradient, is NaN), so only other examples and heads are compared.
  care = np.ones(dk.shape, bool)
  care[B0, H0] = _rows(attended)[B0, H0]
  _check(dk, want_grads[1], _rows(attended), care, what="dk")
  _check(dv, want_grads[2], _rows(attended), care, what="dv")
  if empty.size:
    assert np.all(out[B0, H0, empty] == 0) and np.all(dq[B0, H0, empty] == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(NAN_LAYOUTS))
def test_nan_in_k_poisons_the_rows_attending_it(name, impl):
  lay, mask, q, k, v, dout = _nan_setup(name, 2)
  j = _partly_attended_key(mask)
  poisoned = mask[H0, :, j]  # (n,) queries attending key j
  reached = mask[H0][poisoned].any(axis=0)  # (n,) keys those attend
  want, _ = reference.attention(q, k, v, mask, 0.3)
  want_grads = reference.attention_grads(q, k, v, mask, 0.3, dout)
  bad = k.copy()
  bad[B0, H0, j, 3] = np.nan
  out, (dq, dk, dv) = _forward_and_grads(q, bad, v, lay, impl, dout, 0.3)

  _check(out, want, _rows(poisoned), what="out")
  _check(dk, want_grads[1], _rows(reached), what="dk")
  # dQ: NaN for the rows attending key j; dV: NaN at the keys those attend.
  # Elsewhere in (B0, H0) the GEMMs over a tile may spread it as 0 * NaN (k_j
  # is NaN; with several components, so are those rows' upstream
  # gradients), so only other examples and heads are compared.
  care = np.ones(dq.shape, bool)
  care[B0, H0] = _rows(poisoned)[B0, H0]
  _check(dq, want_grads[0], _rows(poisoned), care, what="dq")
  care[B0, H0] = _rows(reached)[B0, H0]
  _check(dv, want_grads[2], _rows(reached), care, what="dv")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(NAN_LAYOUTS))
def test_nan_in_v_poisons_only_the_rows_attending_it(name, impl):
  lay, mask, q, k, v, dout = _nan_setup(name, 3)
  j, c = _partly_attended_key(mask), 7
  poisoned = mask[H0, :, j]
  reached = mask[H0][poisoned].any(axis=0)
  want, _ = reference.attention(q, k, v, mask, 0.3)
  want_grads = reference.attention_grads(q, k, v, mask, 0.3, dout)
  bad = v.copy()
  bad[B0, H0, j, c] = np.nan
  out, (dq, dk, dv) = _forward_and_grads(q, k, bad, lay, impl, dout, 0.3)

  out_nan = np.zeros(out.shape, bool)
  out_nan[B0, H0, :, c] = poisoned  # only column c of those rows
  _check(out, want, out_nan, what="out")
  _check(dq, want_grads[0], _rows(poisoned), what="dq")
  _check(dk, want_grads[1], _rows(reached), what="dk")
  _check(dv, want_grads[2], np.zeros(dv.shape, bool), what="dv")


@pytest.mark.parametrize("impl", IMPLS)
def test_inf_in_v_gives_the_exact_inf_or_nan(impl):
  lay, mask, q, k, v, _ = _nan_setup("from_mask", 4)
  counts = mask[H0].sum(axis=0)
  j1, j2 = np.flatnonzero((counts >= 3) & (counts <= 40))[:2]
  c = 4
  bad = v.copy()
  bad[B0, H0, j1, c] = np.inf
  bad[B0, H0, j2, c] = -np.inf
  out = ops.block_sparse_attention(q, k, bad, lay, scale=0.3,
                                   implementation=impl).numpy()
  want, _ = reference.attention(q, k, v, mask, 0.3)
  a1, a2 = mask[H0, :, j1], mask[H0, :, j2]
  col = out[B0, H0, :, c]
  assert np.all(np.isnan(col[a1 & a2]))
  assert np.all(col[a1 & ~a2] == np.inf)
  assert np.all(col[a2 & ~a1] == -np.inf)
  assert (a1 ^ a2).any()
  finite = np.ones(out.shape, bool)
  finite[B0, H0, :, c] = ~(a1 | a2)
  np.testing.assert_allclose(out[finite], want[finite], atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------
# Argument checks.


@pytest.mark.parametrize("impl", IMPLS)
def test_key_lengths_of_another_batch_size_names_key_lengths(impl):
  lay = layouts.causal(64, 16, num_heads=2)
  rng = np.random.default_rng(5)
  q, k, v = (rng.standard_normal((2, 2, 64, 16)).astype(np.float32)
             for _ in range(3))
  with pytest.raises(ValueError,
                     match=r"key_lengths must have shape \[batch\] = \[2\]"):
    ops.block_sparse_attention(q, k, v, lay, key_lengths=np.ones(3, np.int32),
                               implementation=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", [1e-50, 1e39])
def test_scale_outside_float32_is_rejected(scale, impl):
  lay = layouts.causal(64, 16, num_heads=2)
  q = np.random.default_rng(6).standard_normal((1, 2, 64, 16))
  q = q.astype(np.float32)
  with pytest.raises(ValueError, match="scale"):
    ops.block_sparse_attention(q, q, q, lay, scale=scale, implementation=impl)
