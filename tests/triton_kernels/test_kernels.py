"""The Triton kernels under Triton's interpreter against float64 references.

`custom_ops/triton/kernels.py` runs here through `custom_ops/triton/launch.py`
(PyTorch) with TRITON_INTERPRET=1, which must be set before the kernels module
is first imported. Errors follow flash-attention's rule: the kernel's largest
error against the float64 reference stays within twice that of a dense PyTorch
implementation in the same precision, plus a few units in the last place.
float16 and float32 only: bfloat16 `tl.dot` is wrong in the interpreter.
Interpreted tiles cost milliseconds each: shapes stay small.

This folder runs in a pytest process of its own (tests/conftest.py;
tools/test.sh runs both): Triton, imported after TensorFlow, aborts the
process (each carries an LLVM).
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

# @triton.jit picks the interpreter when it decorates: TRITON_INTERPRET is set
# while the kernels are first imported and, by the fixture below, while this
# module's tests run (the interpreter reads it too), and restored otherwise so
# that other tests' subprocesses (Triton's compiler) do not inherit it.
_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
from custom_ops.triton import kernels  # pylint: disable=g-import-not-at-top,wrong-import-position
from custom_ops.triton import launch  # pylint: disable=g-import-not-at-top,wrong-import-position

if _INTERPRET is None:
  del os.environ["TRITON_INTERPRET"]
else:
  os.environ["TRITON_INTERPRET"] = _INTERPRET
from st_keras import layouts  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests import reference  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
DTYPES = [torch.float32, torch.float16]
# Units in the last place of the reference's largest value allowed beyond
# twice the dense implementation's error.
ULPS = 4

# log(0) = -inf of rows without keys, computed by numpy in the interpreter.
pytestmark = pytest.mark.filterwarnings(
    "ignore:divide by zero encountered in log:RuntimeWarning")


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
  """Keeps TRITON_INTERPRET=1 while this module's tests run."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("TRITON_INTERPRET", "1")
    yield


def _random_layout(n, block_size, num_heads, seed):
  """from_mask of random tiles: full, partial (random tokens) and empty ones.

  Head 0's query row 5 attends nothing and head 1's query block 1 has no
  tile at all.
  """
  rng = np.random.default_rng(seed)
  nb = n // block_size
  kind = rng.choice(3, size=(num_heads, nb, nb), p=[0.5, 0.2, 0.3])
  tiles = np.repeat(np.repeat(kind, block_size, 1), block_size, 2)
  mask = (tiles == 1) | ((tiles == 2) & (rng.random((num_heads, n, n)) < 0.5))
  mask[0, 5] = False
  mask[1, block_size:2 * block_size] = False
  return layouts.from_mask(mask, block_size)


# name: (layout factory, batch, head_dim, scale or None, key lengths or None).
CASES = {
    "fixed": (lambda: layouts.fixed(256, 32, stride=128, summary=32,
                                    num_heads=2, num_summary_patterns=2),
              2, 32, None, None),
    "strided": (lambda: layouts.strided(256, 32, stride=64, num_heads=1),
                2, 64, 0.3, None),
    "local": (lambda: layouts.local(256, 64, window=96, num_heads=2),
              1, 64, None, None),
    "causal": (lambda: layouts.causal(128, 32, num_heads=1), 3, 32, None,
               None),
    "from_mask": (lambda: _random_layout(128, 16, 2, seed=3), 2, 32, None,
                  None),
    "fixed_key_lengths": (lambda: layouts.fixed(192, 32, stride=64,
                                                summary=16, num_heads=2),
                          3, 32, None, [192, 70, 0]),
    # Summary slots half a tile wide: a second component whose permutation
    # differs per head (the summary tokens in front).
    "fixed_block_64": (lambda: layouts.fixed(256, 64, stride=128, summary=32,
                                             num_heads=2,
                                             num_summary_patterns=2),
                       1, 32, None, [200]),
    "strided_key_lengths": (lambda: layouts.strided(256, 32, stride=48,
                                                    num_heads=2),
                            2, 32, None, [90, 256]),
    "one_block": (lambda: layouts.causal(32, 32, num_heads=1), 3, 16, None,
                  None),
    "one_block_strided": (lambda: layouts.strided(64, 64, stride=16,
                                                  num_heads=2),
                          1, 32, None, None),
    "n_not_multiple_of_stride": (lambda: layouts.strided(
        192, 32, stride=40, num_heads=1), 2, 32, None, None),
    # Tables shared by heads: 4 heads read 2 table heads (h % 2), and in
    # the strided case 4 heads read one (both components, one permuted).
    "fixed_two_table_heads_of_four": (
        lambda: layouts.fixed(256, 32, stride=128, summary=32, num_heads=4,
                              num_summary_patterns=2),
        2, 32, None, [256, 150]),
    "strided_one_table_head_of_four": (
        lambda: layouts.strided(256, 32, stride=64, num_heads=4),
        1, 32, 0.2, [170]),
}


def test_cases_cover_tables_shared_by_heads():
  shared = {name: [(c.table_heads, make().num_heads)
                   for c in make().components]
            for name, (make, *_) in CASES.items()}
  assert shared["fixed_two_table_heads_of_four"] == [(2, 4)]
  assert shared["strided_one_table_head_of_four"] == [(1, 4), (1, 4)]
  assert shared["fixed_block_64"] == [(1, 2), (2, 2)]


def _inputs(shape, dtype, seed, count=4):
  """`count` seeded standard normal tensors of `shape` in `dtype`."""
  gen = torch.Generator().manual_seed(seed)
  return [torch.randn(shape, generator=gen).to(dtype) for _ in range(count)]


def _allowed(layout, batch, key_lengths):
  """bool [B, H, n, n]: the token mask with key lengths applied."""
  mask = torch.from_numpy(layout.to_dense())[None]  # (1, H, n, n)
  if key_lengths is None:
    return mask.expand(batch, -1, -1, -1)
  pos = torch.arange(layout.seq_len)
  valid = pos[None, :] < torch.tensor(key_lengths)[:, None]  # (B, n)
  return mask & valid[:, None, None, :]


def _dense_torch(q, k, v, allowed, scale):
  """Dense masked attention in q's dtype: the same-precision baseline."""
  s = (q @ k.transpose(-1, -2)) * scale  # (B, H, n, n)
  has_key = allowed.any(-1, keepdim=True)
  s = torch.where(allowed, s, float("-inf"))
  s = torch.where(has_key, s, torch.zeros_like(s))
  p = torch.where(allowed, torch.softmax(s, -1), torch.zeros_like(s))
  return p @ v  # (B, H, n, D)


def _run(fn, q, k, v, dout):
  """Returns (out, dq, dk, dv) of fn(q, k, v) with upstream gradient dout."""
  leaves = [x.clone().requires_grad_() for x in (q, k, v)]
  out = fn(*leaves)
  out.backward(dout)
  return [out.detach()] + [x.grad for x in leaves]


def _max_error(x, want):
  return float(np.abs(x.double().numpy() - want).max())


def _check(name, got, dense, want, dtype):
  """Asserts the flash-attention rule for one output; returns both errors."""
  err, dense_err = _max_error(got, want), _max_error(dense, want)
  floor = ULPS * torch.finfo(dtype).eps * float(np.abs(want).max())
  assert np.all(np.isfinite(got.numpy())), f"{name}: not finite"
  assert err <= 2 * dense_err + floor, (
      f"{name}: error {err:.3g} > 2 x dense {dense_err:.3g} + {floor:.3g}")
  return err, dense_err


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_float64_reference(case, dtype):
  make, batch, head_dim, scale, key_lengths = CASES[case]
  lay = make()
  n, heads = lay.seq_len, lay.num_heads
  q, k, v, dout = _inputs((batch, heads, n, head_dim), dtype, seed=7)
  lengths = (None if key_lengths is None else
             torch.tensor(key_lengths, dtype=torch.int32))
  used_scale = 1 / np.sqrt(head_dim) if scale is None else scale

  got = _run(lambda *x: launch.attention(*x, lay, scale=scale,
                                         key_lengths=lengths), q, k, v, dout)
  allowed = _allowed(lay, batch, key_lengths)
  dense = _run(lambda *x: _dense_torch(*x, allowed, used_scale), q, k, v,
               dout)
  x64 = [x.double().numpy() for x in (q, k, v)]
  want_out, _ = reference.attention(*x64, lay.to_dense(), used_scale,
                                    key_lengths)
  want = [want_out] + list(reference.attention_grads(
      *x64, lay.to_dense(), used_scale, dout.double().numpy(), key_lengths))

  assert got[0].dtype == dtype and got[0].shape == q.shape
  errors = {}
  for name, g, d, w in zip(("out", "dq", "dk", "dv"), got, dense, want):
    errors[name] = _check(f"{case} {name}", g, d, w, dtype)
  print(f"{case} {dtype}: " + ", ".join(
      f"{name} {e:.2e} (dense {d:.2e})" for name, (e, d) in errors.items()))


def test_component_lse_and_stats_and_rows_without_keys():
  lay = _random_layout(128, 32, 2, seed=11)
  (comp,) = lay.components
  batch, n, d = 2, lay.seq_len, 32
  q, k, v = _inputs((batch, 2, n, d), torch.float32, seed=5, count=3)
  lengths = [n, 40]
  tables = launch.component_tables(comp, lay.num_blocks, "cpu")
  out, lse, stats = launch.forward(q, k, v, tables, 0.25,
                                   torch.tensor(lengths, dtype=torch.int32))

  allowed = _allowed(lay, batch, lengths).numpy()
  s = np.einsum("bhqd,bhkd->bhqk", q.double().numpy(),
                k.double().numpy()) * 0.25
  s = np.where(allowed, s, -np.inf)
  with np.errstate(invalid="ignore"):
    m = s.max(-1)
    log_l = np.log(np.exp(s - np.where(np.isfinite(m), m, 0)[..., None])
                   .sum(-1))
  empty = ~allowed.any(-1)  # (B, H, n)
  assert empty[0, 0, 5] and empty[0, 1, 32:64].all() and empty[1].sum() > 0
  want_out, _ = reference.attention(q.numpy(), k.numpy(), v.numpy(),
                                    lay.to_dense(), 0.25, lengths)
  np.testing.assert_allclose(out.numpy(), want_out, atol=2e-6)
  assert (out.numpy()[empty] == 0).all()
  for got, want in ((lse, m + log_l), (stats[..., 0], m),
                    (stats[..., 1], log_l)):
    got = got.numpy()
    assert (got[empty] == -np.inf).all()
    np.testing.assert_allclose(got[~empty], want[~empty], rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("case", ["fixed", "strided"])
def test_nan_in_q_makes_its_row_nan(case):
  # Row i = 70 of (batch 0, head 0) gets a NaN in q. Its output is NaN and
  # every other row is exact. For one component (fixed with whole-tile
  # summary slots) the gradients hold
  # too: dq of other rows is exact; dv is NaN exactly at the keys row i
  # attends; dk is NaN there too and, through 0 * NaN in the tile products,
  # also at the other keys of tiles shared with row i's query block, but
  # exact in key blocks that share no tile with it.
  lay = (layouts.fixed(128, 32, stride=64, summary=32, num_heads=1)
         if case == "fixed" else layouts.strided(128, 32, stride=32))
  row, n, d = 70, lay.seq_len, 32
  q, k, v, dout = _inputs((2, 1, n, d), torch.float32, seed=9)
  q[0, 0, row, 3] = float("nan")
  got = _run(lambda *x: launch.attention(*x, lay), q, k, v, dout)
  clean = q.clone()
  clean[0, 0, row] = 0.0
  x64 = [x.double().numpy() for x in (clean, k, v)]
  mask = lay.to_dense()
  want_out, _ = reference.attention(*x64, mask, 1 / np.sqrt(d))
  want_dq, want_dk, want_dv = reference.attention_grads(
      *x64, mask, 1 / np.sqrt(d), dout.double().numpy())

  out = got[0].numpy()
  assert np.isnan(out[0, 0, row]).all()
  others = np.ones(out.shape[:3], np.bool_)
  others[0, 0, row] = False
  np.testing.assert_allclose(out[others], want_out[others], atol=2e-6)
  if case != "fixed":
    return
  dq, dk, dv = (x.numpy() for x in got[1:])
  np.testing.assert_allclose(dq[others], want_dq[others], atol=2e-6)
  attended = mask[0, row]  # (n,) keys row i attends
  assert np.isnan(dv[0, 0, attended]).all()
  np.testing.assert_allclose(dv[0, 0, ~attended], want_dv[0, 0, ~attended],
                             atol=2e-6)
  assert np.isnan(dk[0, 0, attended]).all()
  bs = lay.block_size
  shared = lay.block_mask()[0, row // bs]  # (nb,) key blocks of row's tiles
  apart = ~np.repeat(shared, bs)  # keys in blocks sharing no tile with it
  assert apart.any()
  np.testing.assert_allclose(dk[0, 0, apart], want_dk[0, 0, apart],
                             atol=2e-6)
  np.testing.assert_allclose(dk[1], want_dk[1], atol=2e-6)


def _brute_force_columns(comp, nb):
  """Column tables by sorting (table head, key block, query block, mask)
  tuples."""
  heads = (comp.row_ptr.shape[0] - 1) // nb
  tiles = []
  for slot in range(heads * nb):
    h, r = divmod(slot, nb)
    for t in range(comp.row_ptr[slot], comp.row_ptr[slot + 1]):
      tiles.append((h, int(comp.col_idx[t]), r, int(comp.mask_idx[t])))
  tiles.sort()
  col_ptr = [0] * (heads * nb + 1)
  for h, c, _, _ in tiles:
    col_ptr[h * nb + c + 1] += 1
  return (np.cumsum(col_ptr), [t[2] for t in tiles], [t[3] for t in tiles])


@pytest.mark.parametrize("make", [
    lambda: layouts.fixed(256, 16, stride=64, summary=16, num_heads=3,
                          num_summary_patterns=2),
    lambda: layouts.strided(192, 32, stride=40, num_heads=2),
    lambda: _random_layout(128, 16, 2, seed=4),
    # Component 1 (the stride part) has no tile in heads 1 and 2.
    lambda: layouts.per_head(layouts.strided(128, 32, stride=32),
                             layouts.local(128, 32, window=40, num_heads=2)),
], ids=["fixed", "strided", "from_mask", "per_head"])
def test_column_tables_equal_brute_force_transpose(make):
  lay = make()
  nb = lay.num_blocks
  for comp in lay.components:
    col_ptr, row_idx, col_mask_idx = comp.column_tables(nb)
    want_ptr, want_rows, want_masks = _brute_force_columns(comp, nb)
    assert col_ptr.dtype == row_idx.dtype == col_mask_idx.dtype == np.int32
    np.testing.assert_array_equal(col_ptr, want_ptr)
    np.testing.assert_array_equal(row_idx, want_rows)
    np.testing.assert_array_equal(col_mask_idx, want_masks)
  with pytest.raises(ValueError, match="num_blocks"):
    lay.components[0].column_tables(nb + 1 if nb > 1 else 0)


def test_bad_inputs_raise_errors_naming_the_argument():
  lay = layouts.causal(64, 32, num_heads=2)
  q = torch.zeros(1, 2, 64, 32)
  tables = launch.component_tables(lay.components[0], lay.num_blocks, "cpu")
  # Two table heads (a head each) do not fit one head of q.
  per_head = launch.component_tables(
      _random_layout(64, 32, 2, seed=1).components[0], 2, "cpu")
  cases = [
      (lambda: launch.attention(q[0], q, q, lay), ValueError, "q must be"),
      (lambda: launch.attention(q.double(), q, q, lay), TypeError, "float16"),
      (lambda: launch.attention(q, q.half(), q, lay), TypeError, "share"),
      (lambda: launch.attention(q, q, q[:, :, :32], lay), ValueError,
       "one shape"),
      (lambda: launch.attention(*[torch.zeros(1, 2, 64, 24)] * 3, lay),
       ValueError, "head_dim"),
      (lambda: launch.attention(q, q, q, layouts.causal(96, 32, 2)),
       ValueError, "seq_len"),
      (lambda: launch.attention(q, q, q, layouts.causal(64, 32, 1)),
       ValueError, "heads"),
      (lambda: launch.attention(q, q, q, lay, scale=-1.0), ValueError,
       "scale"),
      (lambda: launch.attention(q, q, q, lay, key_lengths=torch.tensor([3])),
       ValueError, "key_lengths"),
      (lambda: launch.attention(q, q, q, "causal"), TypeError, "layout"),
      (lambda: launch.forward(q, q, q.transpose(2, 3), tables, 1.0),
       ValueError, "v must"),
      (lambda: launch.forward(q[:, :1], q[:, :1], q[:, :1], per_head, 1.0),
       ValueError, "row_ptr"),
      (lambda: launch.forward(q, q, q, dict(
          tables, key_positions=torch.zeros(2, 64, dtype=torch.int32)), 1.0),
       ValueError, "key_positions"),
      (lambda: launch.backward(q, q, q, q, torch.zeros(1, 2, 64), q, None,
                               tables, 1.0), ValueError, "stats"),
  ]
  for call, error, match in cases:
    with pytest.raises(error, match=match):
      call()


def test_launch_imports_no_tensorflow_and_needs_cuda_or_interpreter():
  # A fresh process without TRITON_INTERPRET and with TensorFlow unimportable
  # (as on the GPU machine): launch imports, builds tables from a layouts
  # module loaded by path, and refuses CPU tensors with a clear error.
  script = textwrap.dedent("""
      import importlib.util, sys
      sys.modules["tensorflow"] = None
      import torch
      from custom_ops.triton import launch
      spec = importlib.util.spec_from_file_location(
          "layouts", "st_keras/layouts/__init__.py",
          submodule_search_locations=["st_keras/layouts"])
      layouts = sys.modules["layouts"] = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(layouts)
      lay = layouts.causal(64, 32, num_heads=1)
      q = torch.zeros(1, 1, 64, 32)
      try:
        launch.attention(q, q, q, lay)
      except RuntimeError as err:
        print("refused:", err)
      print("interpreted:", launch.interpreted())
      print("tensorflow:", any(m.startswith("tensorflow")
                               for m, x in sys.modules.items() if x))
  """)
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("TRITON_INTERPRET", None)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120,
                          check=False)
  assert result.returncode == 0, result.stderr
  assert "refused:" in result.stdout and "TRITON_INTERPRET" in result.stdout
  assert "interpreted: False" in result.stdout
  assert "tensorflow: False" in result.stdout


def test_launch_settings_cover_every_gpu_specialisation():
  tile_kernels = ("bsa_forward", "bsa_backward_dkdv", "bsa_backward_dq")
  keys = set(kernels.LAUNCH["bsa_forward"])
  for name in tile_kernels:
    assert set(kernels.LAUNCH[name]) == keys, name
    for options in kernels.LAUNCH[name].values():
      assert set(options) == {"num_warps", "num_stages", "maxnreg",
                              "enable_fp_fusion"}
      assert options["enable_fp_fusion"]
  for bs in kernels.GPU_BLOCK_SIZES:
    for d in kernels.GPU_HEAD_DIMS:
      assert (bs, d, "fp16") in keys and (bs, d, "bf16") in keys
  assert (64, 64, "fp32") in keys and (64, 128, "fp32") not in keys
  assert set(kernels.LAUNCH["bsa_backward_delta"]) == {
      (d, t) for d in kernels.HEAD_DIMS for t in kernels.DTYPES}
  q = torch.zeros(1, 1, 64, 128)
  tables = launch.component_tables(layouts.causal(64, 64).components[0], 1,
                                   "cpu")
  with pytest.raises(ValueError, match="shared memory"):
    launch.forward(q, q, q, tables, 1.0)
  assert launch.interpreted(), (
      "custom_ops.triton.kernels was imported before TRITON_INTERPRET=1 was "
      "set: run this file in its own process")
