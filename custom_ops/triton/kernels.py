"""Triton kernels of fused block-sparse attention: forward and backward.

One component of a layout (`st_keras.layouts.Component`) in its kernel
(maybe permuted) token order. q, k, v, out, dout, dq, dk, dv are [B, H, n, D]
contiguous; a program owns one BLOCK-row tile of one (batch, head): the
(batch, head) offset (b * H + h) * n * D is int64, offsets within a head are
int32 (n * D < 2^31). Compiled ahead of time, give every pointer and n the
attribute tt.divisibility=16 (as Triton's JIT does for 16-byte aligned
pointers and multiples of 16): without it the tile loads are not pipelined
and the forward needs 255 registers instead of about 140.

Tables (int32) describe table_heads heads T, T dividing num_heads: head h
reads table head t = h % T (heads that share a pattern share its tables).
Tiles of query block r of table head t are entries
row_ptr[t * nb + r] .. row_ptr[t * nb + r + 1] of col_idx (key block) and
mask_idx (-1: full tile, else a row of masks [M, BLOCK, BLOCK] uint8, indexed
[query][key]). The column-major table (`Component.column_tables`) holds the
same tiles by key block: entries col_ptr[t * nb + c] .. col_ptr[t * nb + c + 1]
of row_idx (query block) and col_mask_idx. Keys whose original position
(key_positions[t, p] when has_key_positions, else p) is >= key_lengths[b]
are masked when has_key_lengths.

Two flags merge a layout's components in the kernels (launch.attention):
with original_order (needs has_key_positions) the tensors are in original
token order and kernel position p of head h lives at row key_positions[t, p]
(no permuted copies); with accumulate the forward continues the online
softmax from Out and Stats (a previous component's rows, out = acc / l
rescaled by l), and the backward kernels add to DQ, DK, DV. Without them a
program reads and writes one component in kernel order, as the op does.

Semantics (those of the CPU op `SparseTransformer>BlockSparseAttention`):
scores s = scale * (q . k), the dot product accumulated in float32 and scaled
once; online softmax in float32 with m = max score and l = sum exp(s - m) per
row; out = (sum p v) / l in the input dtype, lse = m + log l, stats = (m,
log l); a row with no allowed key gets out = 0 and lse, m, log l = -inf. The
backward recomputes p = exp((s - m) - log l), exactly 0 (by tl.where on the
mask) where masked: dv = p^T dout, ds = p (dout v^T - delta) scale with
delta = rowsum(dout * out) - dlse, dk = ds^T q, dq = ds k. dK/dV come from a
kernel walking the column table and dQ from one walking the row table: no
atomics, each output tile is written by one program.

float16 and bfloat16 operands go to the tensor cores as they are, the
probabilities and dS cast to the input dtype for their products, as
flash-attention does. float32 operands take tf32x3 products (three TF32
products per product, about float32's precision on the tensor cores; plain
TF32 would lose 13 mantissa bits, IEEE products on the FMA units compile for
minutes and spill at block 64); Triton's interpreter computes them in float32.
float32 specialisations exist up to BLOCK * HEAD_DIM = 4096 (see LAUNCH).

Non-finite inputs: a NaN score at an allowed position makes its row's out,
lse and log l NaN (the exp of the NaN reaches l and the row's accumulator,
whether or not the max skipped it), and a row with a NaN stat gets NaN
gradients at its allowed positions. Masked positions get p = dS = 0 exactly,
but the tile products spread a NaN or inf of q, k, v or dout, as 0 * NaN, to
the rows and keys that share a tile with it (also in the forward: a
non-finite v[j] reaches every row of the tiles holding key j, where the CPU op
confines it to the rows that attend j).
"""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Block sizes (BLOCK), head dims (HEAD_DIM) and element types (Triton's
# names) the kernels are written for; the GPU build compiles GPU_BLOCK_SIZES x
# GPU_HEAD_DIMS x DTYPES where LAUNCH has an entry.
BLOCK_SIZES = (16, 32, 64, 128)
HEAD_DIMS = (16, 32, 64, 128)
GPU_BLOCK_SIZES = (32, 64, 128)
GPU_HEAD_DIMS = (64, 128)
DTYPES = ("fp16", "bf16", "fp32")

# Rows of [rows, D] per program of bsa_backward_delta (its ROWS constexpr).
DELTA_ROWS = 64

# (num_warps, num_stages) per tile kernel and BLOCK: float16/bfloat16, and
# float32, whose tiles take twice the shared memory (and tf32x3 products
# three times the registers). The half-precision entries for blocks 32, 64
# and 128 are the fastest of tools/gpu_tune.py's sweep on an H200 (bf16,
# head_dim 64, n = 16384, fixed and strided patterns; BENCHMARKS.md), where
# 8 warps at block 64 took twice as long as 4; the others are untuned. Every
# entry fits sm_80's 163 KB and sm_90's 227 KB of shared memory.
_HALF_OPTIONS = {
    "bsa_forward": {16: (4, 2), 32: (4, 3), 64: (4, 2), 128: (8, 2)},
    "bsa_backward_dkdv": {16: (4, 2), 32: (4, 2), 64: (4, 1), 128: (8, 2)},
    "bsa_backward_dq": {16: (4, 2), 32: (4, 3), 64: (4, 1), 128: (8, 2)},
}
_FP32_OPTIONS = {
    "bsa_forward": {16: (4, 2), 32: (4, 2), 64: (4, 1), 128: (8, 1)},
    "bsa_backward_dkdv": {16: (4, 1), 32: (4, 1), 64: (4, 1), 128: (8, 1)},
    "bsa_backward_dq": {16: (4, 1), 32: (4, 1), 64: (4, 1), 128: (8, 1)},
}
# float32 fits shared memory on both archs up to BLOCK * HEAD_DIM = 4096
# (block 64 with head_dim 128 needs 180 KB on sm_80 in bsa_backward_dkdv).
_FP32_MAX_TILE = 4096


def _launch_table(kernel):
  """Launch options of one tile kernel for every specialisation that fits.

  Args:
    kernel: name of a tile kernel, a key of _HALF_OPTIONS.

  Returns:
    {(BLOCK, HEAD_DIM, dtype): dict(num_warps, num_stages, maxnreg)}.
  """
  table = {}
  for bs in BLOCK_SIZES:
    for d in HEAD_DIMS:
      for t in DTYPES:
        if t == "fp32" and bs * d > _FP32_MAX_TILE:
          continue
        options = _FP32_OPTIONS if t == "fp32" else _HALF_OPTIONS
        warps, stages = options[kernel][bs]
        table[(bs, d, t)] = dict(num_warps=warps, num_stages=stages,
                                 maxnreg=255, enable_fp_fusion=True)
  return table


# Launch options, the one source for launch.py and the ahead-of-time
# compiler: LAUNCH[kernel][(BLOCK, HEAD_DIM, dtype)] for the three tile
# kernels (a missing key is a specialisation that does not fit) and
# LAUNCH["bsa_backward_delta"][(HEAD_DIM, dtype)]. maxnreg=255: without it,
# ptxas gives some sm_80 kernels 32 registers and kilobytes of spills.
# enable_fp_fusion=True (Triton 3.10 turns it off by default): the softmax's
# products fuse with their additions; _scores keeps the scores' rounding.
LAUNCH = {kernel: _launch_table(kernel) for kernel in _HALF_OPTIONS}
LAUNCH["bsa_backward_delta"] = {
    (d, t): dict(num_warps=4, num_stages=1) for d in HEAD_DIMS for t in DTYPES
}


@triton.jit
def _dot(a, b, acc):
  """acc + a @ b in float32; float32 operands get tf32x3 products."""
  if a.dtype == tl.float32:
    return tl.dot(a, b, acc, input_precision="tf32x3")
  else:
    return tl.dot(a, b, acc)


if os.environ.get("TRITON_INTERPRET") == "1":
  # The interpreter computes in numpy float32: a product is rounded as it is,
  # never fused with the next addition (and it has no libdevice).
  @triton.jit
  def _scores(a, b, scale):
    """scale * (a @ b), the dot product in float32, rounded once."""
    return _dot(a, b, tl.zeros([a.shape[0], b.shape[1]], tl.float32)) * scale
else:
  @triton.jit
  def _scores(a, b, scale):
    """scale * (a @ b), the dot product in float32, rounded once.

    mul.rn is never contracted into a fused multiply-add: the softmax's
    s - m then starts from the rounded score (exponent exactly <= 0 at the
    row max, for any scale), while every other product may fuse.
    """
    return libdevice.mul_rn(
        _dot(a, b, tl.zeros([a.shape[0], b.shape[1]], tl.float32)), scale)


@triton.jit
def _program_head(n, num_heads, table_heads):
  """(b, table head, first row of (b, h) in [B * H * n]) of this program.

  Grid axis 1 is bh = b * num_heads + h; head h reads table head
  h % table_heads. The first row is int64: offsets past one head may pass
  2^31.
  """
  bh = tl.program_id(1)
  return bh // num_heads, bh % num_heads % table_heads, bh.to(tl.int64) * n


@triton.jit
def _backward_inputs(Q, K, V, DOut, Stats, Delta, n, num_heads, table_heads,
                     HEAD_DIM: tl.constexpr):
  """`_program_head`, then the backward kernels' inputs at that (b, h)."""
  b, th, head = _program_head(n, num_heads, table_heads)
  return (b, th, head, Q + head * HEAD_DIM, K + head * HEAD_DIM,
          V + head * HEAD_DIM, DOut + head * HEAD_DIM, Stats + 2 * head,
          Delta + head)


@triton.jit
def _tile_range(Ptr, t, block, n, BLOCK: tl.constexpr):
  """[start, end): the entries of `block` (a query block of row_ptr or a
  key block of col_ptr) in table head t, as the module doc lays them out."""
  entry = Ptr + t * (n // BLOCK) + block
  return tl.load(entry), tl.load(entry + 1)


@triton.jit
def _block_rows(KeyPositions, t, block, n, has_key_lengths, has_key_positions,
                original_order, BLOCK: tl.constexpr):
  """Original positions and memory rows of one block of kernel positions.

  Args:
    KeyPositions: *i32 [T, n], original position of each kernel position.
    t: table head.
    block: kernel block.
    n: sequence length.
    has_key_lengths: whether the positions are compared with key lengths
      (else they are needed only to address original order).
    has_key_positions: whether KeyPositions is given (else the identity).
    original_order: whether the tensors are in original order (row
      KeyPositions[t, p] holds kernel position p) rather than kernel order.
    BLOCK: tile width.

  Returns:
    (positions, rows), i32 [BLOCK] each; positions are the kernel positions
    where neither key lengths nor original order need the permutation.
  """
  rows = block * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) kernel positions
  positions = rows
  if has_key_positions != 0:
    if (has_key_lengths != 0) | (original_order != 0):
      positions = tl.load(KeyPositions + t.to(tl.int64) * n + rows)
      if original_order != 0:
        rows = positions
  return positions, rows


@triton.jit
def _key_length(KeyLengths, b, n, has_key_lengths):
  """Keys at original positions >= this are masked for example b (n: none)."""
  key_length = n
  if has_key_lengths != 0:
    key_length = tl.load(KeyLengths + b)
  return key_length


@triton.jit
def _row_offsets(rows, HEAD_DIM: tl.constexpr):
  """(BLOCK, HEAD_DIM) offsets of `rows` in a contiguous [rows, D] tensor."""
  return rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def _and_tile_mask(allowed, Masks, mask_id, transposed: tl.constexpr,
                   BLOCK: tl.constexpr):
  """allowed & the tile's token mask (mask_id -1: a full tile, unchanged).

  The masks are indexed [query][key]; `transposed` reads them [key][query],
  for the tiles of the dK/dV kernel.
  """
  if mask_id >= 0:
    offs = tl.arange(0, BLOCK)
    if transposed:
      cells = offs[None, :] * BLOCK + offs[:, None]
    else:
      cells = offs[:, None] * BLOCK + offs[None, :]
    tile = tl.load(Masks + mask_id.to(tl.int64) * (BLOCK * BLOCK) + cells)
    allowed = allowed & (tile != 0)
  return allowed


@triton.jit
def bsa_forward(Q, K, V, Out, Lse, Stats,
                RowPtr, ColIdx, MaskIdx, Masks, KeyLengths, KeyPositions,
                scale, n, num_heads, table_heads, has_key_lengths,
                has_key_positions, original_order, accumulate,
                BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
  """Online-softmax attention of one query block of one (batch, head).

  Grid (n // BLOCK, B * num_heads); program (i, bh) computes query block
  r = n // BLOCK - 1 - i of (b, h) = divmod(bh, num_heads) and writes its
  rows of Out, Lse and Stats. Late query blocks of causal layouts hold the
  most tiles: they start first, and the short ones fill the tail. With
  `accumulate`, the softmax continues from Out and Stats (a previous
  component's result over the same rows), merging the two components.
  """
  r = tl.num_programs(0) - 1 - tl.program_id(0)
  b, th, head = _program_head(n, num_heads, table_heads)
  offs_m = tl.arange(0, BLOCK)
  Q += head * HEAD_DIM
  K += head * HEAD_DIM
  V += head * HEAD_DIM
  Out += head * HEAD_DIM
  Lse += head
  Stats += 2 * head
  _, rows = _block_rows(KeyPositions, th, r, n, has_key_lengths,
                        has_key_positions, original_order,
                        BLOCK)  # (BLOCK,) query rows
  q = tl.load(Q + _row_offsets(rows, HEAD_DIM))  # (BLOCK, D)
  key_length = _key_length(KeyLengths, b, n, has_key_lengths)

  m_i = tl.full([BLOCK], float("-inf"), tl.float32)
  l_i = tl.zeros([BLOCK], tl.float32)
  acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
  if accumulate != 0:  # (m, log l) and out = acc / l of the earlier parts
    m_i = tl.load(Stats + 2 * rows)
    l_i = tl.exp(tl.load(Stats + 2 * rows + 1))
    acc = tl.load(Out + _row_offsets(rows, HEAD_DIM)).to(
        tl.float32) * l_i[:, None]
  start, end = _tile_range(RowPtr, th, r, n, BLOCK)
  for t in range(start, end):
    key_block = tl.load(ColIdx + t)
    positions, keys = _block_rows(KeyPositions, th, key_block, n,
                                  has_key_lengths, has_key_positions,
                                  original_order, BLOCK)
    k = tl.load(K + _row_offsets(keys, HEAD_DIM))  # (BLOCK, D)
    v = tl.load(V + _row_offsets(keys, HEAD_DIM))  # (BLOCK, D)
    allowed = _and_tile_mask(  # (BLOCK, BLOCK) [query, key]
        (offs_m < BLOCK)[:, None] & (positions < key_length)[None, :],
        Masks, tl.load(MaskIdx + t), False, BLOCK)
    s = tl.where(allowed, _scores(q, tl.trans(k), scale), float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK,)
    # Rows that attended nothing yet keep m = -inf; shift them by 0 so that
    # exp gives 0 for their -inf scores and NaN for a NaN score.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - shift)
    p = tl.exp(s - shift[:, None])  # (BLOCK, BLOCK)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None])  # (BLOCK, D)
    m_i = m_new

  # l = 0: the row attended nothing (out 0, lse and stats -inf).
  out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # (BLOCK, D)
  log_l = tl.log(l_i)
  tl.store(Out + _row_offsets(rows, HEAD_DIM), out.to(Out.dtype.element_ty))
  tl.store(Lse + rows, m_i + log_l)
  tl.store(Stats + 2 * rows, m_i)
  tl.store(Stats + 2 * rows + 1, log_l)


@triton.jit
def bsa_backward_delta(Out, DOut, DLse, Delta, rows,
                       HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
  """delta = rowsum(dout * out) - dlse in float32 for ROWS rows.

  Grid (cdiv(rows, ROWS),) over the [rows, D] views of out and dout.
  """
  row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
  ok = row < rows
  offsets = _row_offsets(row, HEAD_DIM)  # (ROWS, D)
  out = tl.load(Out + offsets, mask=ok[:, None], other=0.0).to(tl.float32)
  dout = tl.load(DOut + offsets, mask=ok[:, None], other=0.0).to(tl.float32)
  dlse = tl.load(DLse + row, mask=ok, other=0.0)
  tl.store(Delta + row, tl.sum(dout * out, 1) - dlse, mask=ok)


@triton.jit
def bsa_backward_dkdv(Q, K, V, DOut, Stats, Delta, DK, DV,
                      ColPtr, RowIdx, ColMaskIdx, Masks, KeyLengths,
                      KeyPositions,
                      scale, n, num_heads, table_heads, has_key_lengths,
                      has_key_positions, original_order, accumulate,
                      BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
  """dK and dV of one key block of one (batch, head), by the column table.

  Grid (n // BLOCK, B * num_heads); program (c, bh) writes the rows of key
  block c (adds to them with `accumulate`). Works on transposed tiles [key,
  query], so that dV += P^T dO and dK += dS^T Q need no transpose of P or dS.
  """
  c = tl.program_id(0)
  b, th, head, Q, K, V, DOut, Stats, Delta = _backward_inputs(
      Q, K, V, DOut, Stats, Delta, n, num_heads, table_heads, HEAD_DIM)
  DK += head * HEAD_DIM
  DV += head * HEAD_DIM
  positions, keys = _block_rows(KeyPositions, th, c, n, has_key_lengths,
                                has_key_positions, original_order,
                                BLOCK)  # (BLOCK,) key rows
  k = tl.load(K + _row_offsets(keys, HEAD_DIM))  # (BLOCK, D)
  v = tl.load(V + _row_offsets(keys, HEAD_DIM))  # (BLOCK, D)
  # (BLOCK,) keys within the key length
  valid = positions < _key_length(KeyLengths, b, n, has_key_lengths)

  dk = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
  dv = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
  start, end = _tile_range(ColPtr, th, c, n, BLOCK)
  for t in range(start, end):
    _, rows = _block_rows(KeyPositions, th, tl.load(RowIdx + t), n,
                          has_key_lengths, has_key_positions, original_order,
                          BLOCK)
    q = tl.load(Q + _row_offsets(rows, HEAD_DIM))  # (BLOCK, D)
    dout = tl.load(DOut + _row_offsets(rows, HEAD_DIM))
    m = tl.load(Stats + 2 * rows)  # (BLOCK,) per query
    log_l = tl.load(Stats + 2 * rows + 1)
    delta = tl.load(Delta + rows)
    # Rows with log l = -inf attended nothing: p = 0.
    allowed = _and_tile_mask(  # (BLOCK, BLOCK) [key, query]
        valid[:, None] & (log_l != float("-inf"))[None, :], Masks,
        tl.load(ColMaskIdx + t), True, BLOCK)
    s_t = _scores(k, tl.trans(q), scale)  # (BLOCK, BLOCK) [key, query]
    p_t = tl.where(allowed,
                   tl.exp((s_t - m[None, :]) - log_l[None, :]), 0.0)
    dv = _dot(p_t.to(dout.dtype), dout, dv)  # (BLOCK, D)
    dp_t = _dot(v, tl.trans(dout), tl.zeros([BLOCK, BLOCK], tl.float32))
    ds_t = tl.where(allowed, p_t * (dp_t - delta[None, :]) * scale, 0.0)
    dk = _dot(ds_t.to(q.dtype), q, dk)  # (BLOCK, D)

  offsets = _row_offsets(keys, HEAD_DIM)  # (BLOCK, D)
  if accumulate != 0:
    dk += tl.load(DK + offsets).to(tl.float32)
    dv += tl.load(DV + offsets).to(tl.float32)
  tl.store(DK + offsets, dk.to(DK.dtype.element_ty))
  tl.store(DV + offsets, dv.to(DV.dtype.element_ty))


@triton.jit
def bsa_backward_dq(Q, K, V, DOut, Stats, Delta, DQ,
                    RowPtr, ColIdx, MaskIdx, Masks, KeyLengths, KeyPositions,
                    scale, n, num_heads, table_heads, has_key_lengths,
                    has_key_positions, original_order, accumulate,
                    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
  """dQ of one query block of one (batch, head), by the row table.

  Grid (n // BLOCK, B * num_heads); program (i, bh) writes the rows of query
  block r = n // BLOCK - 1 - i (the longest rows of causal layouts first),
  or adds to them with `accumulate`.
  """
  r = tl.num_programs(0) - 1 - tl.program_id(0)
  b, th, head, Q, K, V, DOut, Stats, Delta = _backward_inputs(
      Q, K, V, DOut, Stats, Delta, n, num_heads, table_heads, HEAD_DIM)
  DQ += head * HEAD_DIM
  _, rows = _block_rows(KeyPositions, th, r, n, has_key_lengths,
                        has_key_positions, original_order,
                        BLOCK)  # (BLOCK,) query rows
  q = tl.load(Q + _row_offsets(rows, HEAD_DIM))  # (BLOCK, D)
  dout = tl.load(DOut + _row_offsets(rows, HEAD_DIM))
  m = tl.load(Stats + 2 * rows)  # (BLOCK,)
  log_l = tl.load(Stats + 2 * rows + 1)
  delta = tl.load(Delta + rows)
  attends = log_l != float("-inf")  # rows with log l = -inf: p = 0
  key_length = _key_length(KeyLengths, b, n, has_key_lengths)

  dq = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
  start, end = _tile_range(RowPtr, th, r, n, BLOCK)
  for t in range(start, end):
    positions, keys = _block_rows(KeyPositions, th, tl.load(ColIdx + t), n,
                                  has_key_lengths, has_key_positions,
                                  original_order, BLOCK)
    k = tl.load(K + _row_offsets(keys, HEAD_DIM))  # (BLOCK, D)
    v = tl.load(V + _row_offsets(keys, HEAD_DIM))  # (BLOCK, D)
    allowed = _and_tile_mask(  # (BLOCK, BLOCK) [query, key]
        attends[:, None] & (positions < key_length)[None, :], Masks,
        tl.load(MaskIdx + t), False, BLOCK)
    s = _scores(q, tl.trans(k), scale)
    p = tl.where(allowed, tl.exp((s - m[:, None]) - log_l[:, None]), 0.0)
    dp = _dot(dout, tl.trans(v), tl.zeros([BLOCK, BLOCK], tl.float32))
    ds = tl.where(allowed, p * (dp - delta[:, None]) * scale, 0.0)
    dq = _dot(ds.to(k.dtype), k, dq)  # (BLOCK, D)

  offsets = _row_offsets(rows, HEAD_DIM)  # (BLOCK, D)
  if accumulate != 0:
    dq += tl.load(DQ + offsets).to(tl.float32)
  tl.store(DQ + offsets, dq.to(DQ.dtype.element_ty))
