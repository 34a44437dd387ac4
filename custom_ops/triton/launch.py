"""PyTorch driver of the Triton block-sparse attention kernels.

Launches `custom_ops.triton.kernels` on torch tensors: on a CUDA device, or on
CPU under Triton's interpreter (set ``TRITON_INTERPRET=1`` before
`custom_ops.triton.kernels` is first imported: `@triton.jit` picks the
interpreter when it decorates). Imports neither TensorFlow nor st_keras (whose
package imports TensorFlow): it takes `st_keras.layouts` objects from the
caller, so it runs the kernels on a GPU machine that has only PyTorch:

  tables = component_tables(layout.components[0], layout.num_blocks, "cuda")
  out, lse, stats = forward(q, k, v, tables, scale)
  out = attention(q, k, v, layout)  # whole layout, differentiable

`attention` computes what `st_keras.ops.block_sparse_attention` computes,
with the components merged inside the kernels: they address q, k, v and the
results in original order through each component's permutation, and each
component continues the previous one's online softmax (`LayoutAttention`).
The TensorFlow op runs one component in its kernel order, with the
permutation and the merge done in TensorFlow.
"""

import math
import sys
from typing import Optional

import numpy as np
import torch
import triton

from custom_ops.triton import kernels

_THIS_MODULE = sys.modules[__name__]

# Triton's names of the element types, as keys of kernels.LAUNCH.
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def interpreted() -> bool:
  """Whether the kernels were decorated for Triton's interpreter."""
  from triton.runtime.interpreter import InterpretedFunction  # pylint: disable=g-import-not-at-top
  return isinstance(kernels.bsa_forward, InterpretedFunction)


def _check_device(device: torch.device) -> None:
  """Raises RuntimeError unless the kernels can run on `device`."""
  if device.type != "cuda" and not interpreted():
    raise RuntimeError(
        f"the Triton kernels need CUDA tensors, got tensors on {device}; to "
        f"run them on CPU set TRITON_INTERPRET=1 before "
        f"custom_ops.triton.kernels is first imported")


def component_tables(component, num_blocks: int, device) -> dict:
  """The tables of one component as torch tensors on `device`.

  Args:
    component: an `st_keras.layouts.Component`.
    num_blocks: nb, the layout's blocks per head.
    device: torch device (or its name) to put them on.

  Returns:
    dict of int32 tensors "row_ptr", "col_idx", "mask_idx" (row table),
    "col_ptr", "row_idx", "col_mask_idx" (column table), "key_positions"
    ([T, n] the component's permutation, or an empty [0] tensor when it
    has none), and the uint8 "masks" [num_masks, bs, bs]; the tables are
    the component's T = table_heads heads (head h reads table head h % T).
  """
  col_ptr, row_idx, col_mask_idx = component.column_tables(num_blocks)
  arrays = {
      "row_ptr": component.row_ptr, "col_idx": component.col_idx,
      "mask_idx": component.mask_idx, "col_ptr": col_ptr,
      "row_idx": row_idx, "col_mask_idx": col_mask_idx,
      "key_positions": (np.zeros(0, np.int32) if component.perm is None
                        else component.perm),
  }
  tables = {name: torch.from_numpy(np.ascontiguousarray(a, np.int32)).to(device)
            for name, a in arrays.items()}
  tables["masks"] = torch.from_numpy(
      np.ascontiguousarray(component.masks, np.uint8)).to(device)
  return tables


_TILE_KERNELS = ("bsa_forward", "bsa_backward_dkdv", "bsa_backward_dq")


def _options(kernel: str, key) -> dict:
  """kernels.LAUNCH[kernel][key], or a ValueError naming what is missing."""
  options = kernels.LAUNCH[kernel].get(key)
  if options is None:
    raise ValueError(f"{kernel} has no specialisation for (block, head_dim, "
                     f"dtype) = {key}: its tiles would not fit in shared "
                     f"memory (float32 needs block * head_dim <= 4096)")
  return options


def _geometry(q, k, v, tables, key_lengths):
  """Checks the inputs of one component's kernels.

  Args:
    q: queries, [B, H, n, D].
    k: keys.
    v: values.
    tables: `component_tables` of the component.
    key_lengths: int32 [B] tensor or None.

  Returns:
    (B, H, n, D, BLOCK, T, key_lengths): T the tables' heads (from row_ptr's
    length), key_lengths the int32 tensor to pass (an empty one when None).

  Raises:
    ValueError, TypeError: naming the argument that is wrong.
    RuntimeError: no CUDA tensors and the kernels are not interpreted.
  """
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
      raise ValueError(f"{name} must be a 4-D tensor [batch, heads, n, "
                       f"head_dim], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in DTYPES:
      raise TypeError(f"{name} must be float16, bfloat16 or float32, got "
                      f"{x.dtype}")
    if not x.is_contiguous():
      raise ValueError(f"{name} must be contiguous")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, "
                    f"{k.dtype}, {v.dtype}")
  if not q.shape == k.shape == v.shape:
    raise ValueError(f"q, k and v must have one shape, got "
                     f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
  if not q.device == k.device == v.device:
    raise ValueError(f"q, k and v must be on one device, got {q.device}, "
                     f"{k.device}, {v.device}")
  _check_device(q.device)
  batch, heads, n, head_dim = q.shape
  if head_dim not in kernels.HEAD_DIMS:
    raise ValueError(f"head_dim (last axis of q) must be one of "
                     f"{kernels.HEAD_DIMS}, got {head_dim}")
  block = tables["masks"].shape[-1]
  if block not in kernels.BLOCK_SIZES:
    raise ValueError(f"tables: block size must be one of "
                     f"{kernels.BLOCK_SIZES}, got {block}")
  if n % block:
    raise ValueError(f"q: n ({n}) must be a multiple of the layout's block "
                     f"size ({block})")
  for kernel in _TILE_KERNELS:
    _options(kernel, (block, head_dim, DTYPES[q.dtype]))
  if n * head_dim >= 2**31:
    raise ValueError(f"q: n * head_dim ({n} * {head_dim}) must be below 2^31 "
                     f"(offsets within a head are int32)")
  if batch * heads > 65535:
    raise ValueError(f"q: batch * heads ({batch} * {heads}) must be at most "
                     f"65535 (the grid's second axis)")
  table_heads, rest = divmod(tables["row_ptr"].numel() - 1, n // block)
  if rest or table_heads < 1 or heads % table_heads:
    raise ValueError(
        f"tables: row_ptr has {tables['row_ptr'].numel()} entries, want "
        f"table_heads * n / block + 1 with table_heads dividing heads "
        f"({heads}) for q of shape {tuple(q.shape)}")
  for name, x in tables.items():
    if x.device != q.device:
      raise ValueError(f"tables[{name!r}] is on {x.device}, q on {q.device}")
  if tables["key_positions"].numel() not in (0, table_heads * n):
    raise ValueError(f"tables: key_positions must be empty or [table_heads, "
                     f"n] = [{table_heads}, {n}], got "
                     f"{tuple(tables['key_positions'].shape)}")
  if key_lengths is None:
    key_lengths = torch.zeros(0, dtype=torch.int32, device=q.device)
  elif (not isinstance(key_lengths, torch.Tensor) or
        key_lengths.dtype != torch.int32 or
        tuple(key_lengths.shape) != (batch,) or
        key_lengths.device != q.device):
    raise ValueError(f"key_lengths must be an int32 tensor of shape [batch] "
                     f"= [{batch}] on {q.device}, got "
                     f"{getattr(key_lengths, 'dtype', type(key_lengths))} "
                     f"{tuple(getattr(key_lengths, 'shape', ()))}")
  return (batch, heads, n, head_dim, block, table_heads,
          key_lengths.contiguous())


def _check_results(name: str, tensors, shapes, device) -> None:
  """Raises ValueError unless tensors have `shapes` on `device`."""
  for x, shape in zip(tensors, shapes):
    if (not isinstance(x, torch.Tensor) or tuple(x.shape) != shape or
        x.device != device or not x.is_contiguous()):
      raise ValueError(f"{name} must be contiguous tensors of shapes "
                       f"{shapes} on {device}, got "
                       f"{[tuple(getattr(t, 'shape', ())) for t in tensors]}")


def empty_results(q):
  """Uninitialised (out, lse, stats) for a forward over q [B, H, n, D]."""
  batch, heads, n, _ = q.shape
  return (torch.empty_like(q),  # (B, H, n, D)
          torch.empty(batch, heads, n, dtype=torch.float32, device=q.device),
          torch.empty(batch, heads, n, 2, dtype=torch.float32,
                      device=q.device))


def _io_flags(tables: dict, original_order: bool, accumulate: bool):
  """(original_order, accumulate) as kernel flags; checks the permutation."""
  if original_order and tables["key_positions"].numel() == 0:
    raise ValueError("original_order needs the component's permutation "
                     "(tables['key_positions'] is empty)")
  return int(original_order), int(accumulate)


def forward(q, k, v, tables: dict, scale: float, key_lengths=None,
            original_order: bool = False, results=None):
  """Attention over one component: launches bsa_forward.

  Args:
    q: [B, H, n, D] float16, bfloat16 or float32, contiguous, in the
      component's kernel order (or original order: `original_order`).
    k: keys, like q.
    v: values, like q.
    tables: `component_tables` of the component, on q's device.
    scale: positive score scale.
    key_lengths: optional int32 [B]: keys at original positions >=
      key_lengths[b] are masked for example b.
    original_order: q, k, v and the results are in original token order,
      addressed through the component's permutation.
    results: None, or (out, lse, stats) of earlier components of the layout
      over the same rows and order: the softmax continues from them, in
      place, so the result is attention over all of them.

  Returns:
    (out [B, H, n, D] q.dtype, lse [B, H, n] float32, stats [B, H, n, 2]
    float32 (max score m, log l)); a row with no allowed key gets out 0 and
    lse, m, log l -inf.
  """
  batch, heads, n, head_dim, block, table_heads, lengths = _geometry(
      q, k, v, tables, key_lengths)
  flags = _io_flags(tables, original_order, results is not None)
  if results is None:
    results = empty_results(q)
  else:
    _check_results("results", results, (tuple(q.shape), (batch, heads, n),
                                        (batch, heads, n, 2)), q.device)
  out, lse, stats = results
  grid = (n // block, batch * heads)
  kernels.bsa_forward[grid](
      q, k, v, out, lse, stats,
      tables["row_ptr"], tables["col_idx"], tables["mask_idx"],
      tables["masks"], lengths, tables["key_positions"],
      float(scale), n, heads, table_heads, int(key_lengths is not None),
      int(tables["key_positions"].numel() > 0), *flags,
      BLOCK=block, HEAD_DIM=head_dim,
      **_options("bsa_forward", (block, head_dim, DTYPES[q.dtype])))
  return out, lse, stats


def backward(q, k, v, out, stats, dout, dlse, tables: dict, scale: float,
             key_lengths=None, original_order: bool = False, grads=None):
  """Gradients of one component: launches the delta, dK/dV and dQ kernels
  (the delta kernel only for the first component of a layout).

  Args:
    q: [B, H, n, D] as given to `forward`.
    k: keys, like q.
    v: values, like q.
    out: [B, H, n, D] the forward's output (of the whole layout when the
      forward merged components).
    stats: [B, H, n, 2] float32, the forward's stats (likewise).
    dout: [B, H, n, D] upstream gradient of out (any float dtype).
    dlse: [B, H, n] upstream gradient of lse, or None for zeros.
    tables: `component_tables` of the component.
    scale: the forward's scale.
    key_lengths: the forward's key_lengths.
    original_order: as in `forward`.
    grads: None, or what this function returned for an earlier component
      of the layout (same out, dout and dlse): its dq, dk, dv are added to
      in place, and its delta is used as it is.

  Returns:
    (dq, dk, dv, delta): the gradients, each [B, H, n, D] in q's dtype, and
    delta = rowsum(dout * out) - dlse, [B * H * n] float32.
  """
  batch, heads, n, head_dim, block, table_heads, lengths = _geometry(
      q, k, v, tables, key_lengths)
  shape4 = (batch, heads, n, head_dim)
  for name, x, shape in (("out", out, shape4), ("dout", dout, shape4),
                         ("stats", stats, (batch, heads, n, 2))):
    if tuple(x.shape) != shape or x.device != q.device:
      raise ValueError(f"{name} must have shape {shape} on {q.device}, got "
                       f"{tuple(x.shape)} on {x.device}")
  if stats.dtype != torch.float32:
    raise TypeError(f"stats must be float32, got {stats.dtype}")
  if dlse is None:
    dlse = torch.zeros(batch, heads, n, dtype=torch.float32, device=q.device)
  if tuple(dlse.shape) != (batch, heads, n):
    raise ValueError(f"dlse must have shape {(batch, heads, n)}, got "
                     f"{tuple(dlse.shape)}")
  flags = _io_flags(tables, original_order, grads is not None)
  rows = batch * heads * n
  dout = dout.to(q.dtype).contiguous()
  stats = stats.contiguous()
  if grads is None:
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))  # (B, H, n, D)
    delta = torch.empty(rows, dtype=torch.float32, device=q.device)
    kernels.bsa_backward_delta[(triton.cdiv(rows, kernels.DELTA_ROWS),)](
        out.to(q.dtype).contiguous(), dout,
        dlse.to(torch.float32).contiguous(), delta, rows, HEAD_DIM=head_dim,
        ROWS=kernels.DELTA_ROWS,
        **_options("bsa_backward_delta", (head_dim, DTYPES[q.dtype])))
  else:
    _check_results("grads", grads, (shape4,) * 3 + ((rows,),), q.device)
    dq, dk, dv, delta = grads
  grid = (n // block, batch * heads)
  args = (float(scale), n, heads, table_heads, int(key_lengths is not None),
          int(tables["key_positions"].numel() > 0), *flags)
  kernels.bsa_backward_dkdv[grid](
      q, k, v, dout, stats, delta, dk, dv,
      tables["col_ptr"], tables["row_idx"], tables["col_mask_idx"],
      tables["masks"], lengths, tables["key_positions"], *args,
      BLOCK=block, HEAD_DIM=head_dim,
      **_options("bsa_backward_dkdv", (block, head_dim, DTYPES[q.dtype])))
  kernels.bsa_backward_dq[grid](
      q, k, v, dout, stats, delta, dq,
      tables["row_ptr"], tables["col_idx"], tables["mask_idx"],
      tables["masks"], lengths, tables["key_positions"], *args,
      BLOCK=block, HEAD_DIM=head_dim,
      **_options("bsa_backward_dq", (block, head_dim, DTYPES[q.dtype])))
  return dq, dk, dv, delta


class LayoutAttention(torch.autograd.Function):
  """Differentiable attention over every component of a layout.

  apply(q, k, v, components, scale, key_lengths, backend) -> out, with q, k,
  v in original order and `components` the `component_tables` of each. The
  kernels read and write original order (through each permuted component's
  permutation) and merge the components: the forward continues one online
  softmax component after component, the backward adds each component's
  gradients, with the merged stats and one delta. No permuted copies, no
  merge pass. backend has this module's `forward` and `backward` (the kernels
  launched from Python) or the same functions over another launcher.
  """

  @staticmethod
  def forward(ctx, q, k, v, components, scale, key_lengths, backend):  # pylint: disable=arguments-differ
    results = None
    for tables in components:
      results = backend.forward(
          q, k, v, tables, scale, key_lengths,
          original_order=tables["key_positions"].numel() > 0,
          results=results)
    out, _, stats = results
    ctx.save_for_backward(q, k, v, out, stats)
    ctx.components, ctx.scale, ctx.key_lengths = components, scale, key_lengths
    ctx.backend = backend
    return out

  @staticmethod
  def backward(ctx, dout):  # pylint: disable=arguments-differ
    q, k, v, out, stats = ctx.saved_tensors
    grads = None
    for tables in ctx.components:
      grads = ctx.backend.backward(
          q, k, v, out, stats, dout, None, tables, ctx.scale,
          ctx.key_lengths,
          original_order=tables["key_positions"].numel() > 0, grads=grads)
    return grads[:3] + (None,) * 4  # dq, dk, dv


def _cached_tables(layout, device) -> list:
  """`component_tables` of every component of `layout`, cached on it.

  Args:
    layout: an `st_keras.layouts.Layout`.
    device: torch device.

  Returns:
    A list of the components' tables.
  """
  cache = layout.__dict__.setdefault("_st_keras_torch_tables", {})
  key = str(device)
  if key not in cache:
    cache[key] = [component_tables(comp, layout.num_blocks, device)
                  for comp in layout.components]
  return cache[key]


def attention(q, k, v, layout, scale: Optional[float] = None,
              key_lengths=None, backend=None):
  """Block-sparse attention over a whole layout, differentiable by autograd.

  Args:
    q: [B, H, n, D] float16, bfloat16 or float32 (original token order).
    k: keys, like q.
    v: values, like q.
    layout: an `st_keras.layouts.Layout` for n tokens and H heads.
    scale: positive score scale, finite in float32; default 1 / sqrt(D).
    key_lengths: optional int32 [B] tensor: keys at positions >=
      key_lengths[b] are masked for example b.
    backend: what runs one component: an object with this module's
      `forward` and `backward` functions and their `original_order`,
      `results` and `grads` arguments (None: this module, the Triton kernels
      launched from Python; tools/gpu_check.py passes the C ABI's).

  Returns:
    [B, H, n, D] in q's dtype; a query with no allowed key gets zeros.
  """
  if not all(hasattr(layout, a) for a in ("components", "num_blocks",
                                            "seq_len", "num_heads")):
    raise TypeError(f"layout must be an st_keras.layouts.Layout, got "
                    f"{type(layout).__name__}")
  if not isinstance(q, torch.Tensor) or q.dim() != 4:
    raise ValueError(f"q must be a 4-D tensor [batch, heads, n, head_dim], "
                     f"got {getattr(q, 'shape', type(q))}")
  if q.shape[2] != layout.seq_len:
    raise ValueError(f"layout is for seq_len {layout.seq_len} but q has "
                     f"n = {q.shape[2]}")
  if q.shape[1] != layout.num_heads:
    raise ValueError(f"layout has {layout.num_heads} heads but q has "
                     f"{q.shape[1]}")
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  with np.errstate(over="ignore"):
    scale32 = np.float32(scale)
  if not (np.isfinite(scale32) and scale32 > 0):
    raise ValueError(f"scale must be a positive number finite in float32, "
                     f"got {scale}")
  q, k, v = (x.contiguous() for x in (q, k, v))
  return LayoutAttention.apply(q, k, v, _cached_tables(layout, q.device),
                               float(scale32), key_lengths,
                               backend or _THIS_MODULE)
