"""Block-sparse attention for TensorFlow: fused custom op or pure TensorFlow.

`block_sparse_attention(q, k, v, layout)` computes, for every head h and
query i, softmax(scale * q_i . k_j) over the keys j that `layout` allows,
applied to v. Two implementations compute the same function:

* ``"custom_op"``: the fused C++ kernels `SparseTransformer>BlockSparseAttention`
  (and its gradient op) from the Bazel-built library `st_keras/lib/
  _st_keras_ops.so`. Online softmax over the layout's tiles only; memory
  O(n * head_dim) beyond the inputs.
* ``"pure_tf"``: stock TensorFlow ops (gather of each query block's key
  blocks, masked softmax). Differentiable by autodiff, works under XLA and in
  SavedModels that stock TensorFlow Serving loads.

The module-level choice is `implementation()` / `set_implementation()`,
initialised from the environment variable ``ST_KERAS_ATTENTION`` (``auto``,
``custom_op`` or ``pure_tf``; default ``auto``: the op when its library loads,
else pure TensorFlow with a warning that says why the library did not load).
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np
import tensorflow as tf

from st_keras import layouts as layouts_lib

IMPLEMENTATIONS = ("auto", "custom_op", "pure_tf")
ENV_IMPLEMENTATION = "ST_KERAS_ATTENTION"
ENV_LIBRARY = "ST_KERAS_OPS_LIBRARY"
OP_NAME = "SparseTransformer>BlockSparseAttention"
GRAD_OP_NAME = "SparseTransformer>BlockSparseAttentionGrad"

_DEFAULT_LIBRARY = os.path.join(os.path.dirname(__file__), "lib",
                                "_st_keras_ops.so")
_state = {"implementation": None, "library": None, "load_error": None,
          "warned": False}


def _check_implementation(name: str) -> str:
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{name!r}")
  return name


def implementation() -> str:
  """Returns the module-wide implementation choice ('auto' by default)."""
  if _state["implementation"] is None:
    _state["implementation"] = _check_implementation(
        os.environ.get(ENV_IMPLEMENTATION, "auto"))
  return _state["implementation"]


def set_implementation(name: str) -> None:
  """Selects 'auto', 'custom_op' or 'pure_tf' for later calls.

  Args:
    name: one of `IMPLEMENTATIONS`.
  """
  _state["implementation"] = _check_implementation(name)


def library_path() -> str:
  """Returns the op library path: $ST_KERAS_OPS_LIBRARY or the packaged one."""
  return os.environ.get(ENV_LIBRARY, _DEFAULT_LIBRARY)


def load_library():
  """Loads the op library once.

  Returns:
    The module `tf.load_op_library` returned, or None when it failed to load
    (`load_error()` then says why).
  """
  if _state["library"] is None and _state["load_error"] is None:
    path = library_path()
    try:
      if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist; build it with tools/build_ops.sh")
      _state["library"] = tf.load_op_library(path)
    except (FileNotFoundError, tf.errors.NotFoundError, OSError) as err:
      _state["load_error"] = f"{type(err).__name__}: {err}"
  return _state["library"]


def load_error() -> Optional[str]:
  """Returns why the op library failed to load, or None."""
  load_library()
  return _state["load_error"]


def custom_op_available() -> bool:
  """Whether the fused op library is loaded."""
  return load_library() is not None


def _in_xla_context() -> bool:
  """Whether ops built now are compiled by XLA (jit_compile=True)."""
  from tensorflow.python.framework import ops as tf_ops  # pylint: disable=g-import-not-at-top
  from tensorflow.python.ops import control_flow_util  # pylint: disable=g-import-not-at-top
  return control_flow_util.GraphOrParentsInXlaContext(
      tf_ops.get_default_graph())


def resolve_implementation(name: Optional[str] = None) -> str:
  """Maps a requested implementation (None: module-wide) to the one used.

  Args:
    name: 'auto', 'custom_op', 'pure_tf' or None.

  Returns:
    'custom_op' or 'pure_tf'. 'auto' picks 'pure_tf' inside an XLA-compiled
    function, where custom ops cannot run.

  Raises:
    RuntimeError: 'custom_op' was requested and the library failed to load.
  """
  name = _check_implementation(name or implementation())
  if name == "pure_tf" or (name == "auto" and _in_xla_context()):
    return "pure_tf"
  if custom_op_available():
    return "custom_op"
  if name == "custom_op":
    raise RuntimeError(
        f"the block-sparse attention op library failed to load: "
        f"{load_error()}")
  if not _state["warned"]:
    warnings.warn(
        "st_keras: the fused block-sparse attention op is not loaded "
        f"({load_error()}); falling back to the slower pure-TensorFlow "
        f"implementation. Set {ENV_IMPLEMENTATION}=pure_tf to silence this.",
        RuntimeWarning, stacklevel=3)
    _state["warned"] = True
  return "pure_tf"


# ----------------------------------------------------------------------------
# Layout tables as tensors (cached on the layout; created outside any graph so
# that functions capture them as constants).


def _tables(layout: layouts_lib.Layout, index: int) -> dict:
  """The op's inputs for one component: its T-head tables, unexpanded."""
  cache = layout.__dict__.setdefault("_st_keras_tensors", {})
  if index not in cache:
    comp = layout.components[index]
    col_ptr, row_idx, col_mask_idx = comp.column_tables(layout.num_blocks)
    with tf.init_scope():
      perm = comp.perm
      cache[index] = {
          "key_positions": tf.constant(
              np.zeros((0, 0), np.int32) if perm is None else perm),
          "inverse_perm": None if perm is None else tf.constant(
              np.argsort(perm, axis=1).astype(np.int32)),
          # Whether every head has the same order (one gather for all).
          "shared_perm": perm is None or bool((perm == perm[:1]).all()),
          "row_ptr": tf.constant(comp.row_ptr),
          "col_idx": tf.constant(comp.col_idx),
          "mask_idx": tf.constant(comp.mask_idx),
          "masks": tf.constant(comp.masks),
          # The column-major table: the GPU kernels' backward walks it.
          "col_ptr": tf.constant(col_ptr),
          "row_idx": tf.constant(row_idx),
          "col_mask_idx": tf.constant(col_mask_idx),
      }
  return cache[index]


def _padded_tables(layout: layouts_lib.Layout, index: int) -> dict:
  """Row tables of the component's T table heads padded to the longest row,
  for the pure-TF gather (head h reads table head h % T)."""
  cache = layout.__dict__.setdefault("_st_keras_padded", {})
  if index not in cache:
    comp = layout.components[index]
    nb, bs, t_heads = layout.num_blocks, layout.block_size, comp.table_heads
    counts = np.diff(comp.row_ptr.astype(np.int64))
    width = max(1, int(counts.max()) if counts.size else 1)
    rows = comp.tile_rows()
    slot = np.arange(comp.nnz) - comp.row_ptr[rows]
    num_masks = comp.masks.shape[0]
    empty, full = num_masks, num_masks + 1
    # Key block of each slot. Padding slots (fully masked) gather the head's
    # first block: their zero-weight gradients (0 * NaN is NaN) stay in
    # that head.
    gather = np.zeros((t_heads * nb, width), np.int32)
    mask_sel = np.full((t_heads * nb, width), empty, np.int32)
    gather[rows, slot] = comp.col_idx
    mask_sel[rows, slot] = np.where(comp.mask_idx < 0, full, comp.mask_idx)
    masks = np.concatenate([comp.masks.astype(np.bool_),
                            np.zeros((1, bs, bs), np.bool_),
                            np.ones((1, bs, bs), np.bool_)])
    perm = (np.tile(np.arange(layout.seq_len, dtype=np.int32), (t_heads, 1))
            if comp.perm is None else comp.perm)
    # Original position of every gathered key: [T, nb, width * bs].
    key_block_pos = np.take_along_axis(
        perm.reshape(t_heads, nb, bs), gather.reshape(t_heads, nb * width, 1),
        axis=1)
    query_rows = np.argsort(perm, axis=1).astype(np.int32)
    mask_sel = mask_sel.reshape(t_heads, nb, width)
    key_block_pos = key_block_pos.reshape(t_heads, nb, width * bs)
    with tf.init_scope():
      cache[index] = {
          "width": width,
          "table_heads": t_heads,
          # Kernel position of every original position: [T, n].
          "query_rows": tf.constant(query_rows),
          # Whether every head has the same rows (decoding gathers once).
          "same_heads": all((x == x[:1]).all() for x in (
              query_rows, mask_sel, key_block_pos)),
          "gather": tf.constant(gather.reshape(t_heads, nb * width)),
          "mask_sel": tf.constant(mask_sel),
          "masks": tf.constant(masks),
          "key_positions": tf.constant(key_block_pos),
      }
  return cache[index]


def masked_exp(scores, mask):
  """The unnormalised terms of a softmax over the last axis of `scores`
  restricted to `mask` (broadcastable to scores).

  Returns:
    (probs, row_max, total): exp(scores - row_max) where mask, else 0; the
    row maximum over the mask (keepdims, no gradient); the row sums. A row
    with no key has total 0.
  """
  scores = tf.where(mask, scores, -1e30)
  row_max = tf.stop_gradient(tf.reduce_max(scores, axis=-1, keepdims=True))
  probs = tf.where(mask, tf.exp(scores - row_max), 0.0)
  return probs, row_max, tf.reduce_sum(probs, axis=-1)


def attended_keys(layout: layouts_lib.Layout, position):
  """The keys one query position attends, per head, for cached decoding.

  Reads the row of `position` from the same padded tables the pure-TF path
  uses, so the set is exactly the layout's: a fixed number of slots per
  head (the widest row of each component, whole tiles), of which `valid`
  marks the attended ones.

  Args:
    layout: a `layouts.Layout`.
    position: int32 scalar tensor, the query's position (original order).

  Returns:
    (keys, valid): int32 [h, K] original key positions and bool [h, K],
    with h = 1 when every head attends the same keys, else h = heads. K is
    fixed by the layout; slots that are not attended hold position 0.
  """
  heads, bs = layout.num_heads, layout.block_size
  tables = [_padded_tables(layout, i) for i in range(len(layout.components))]
  if all(t["same_heads"] for t in tables):
    heads = 1
  keys, valid = [], []
  for t in tables:
    table = tf.range(heads) % t["table_heads"]  # (heads,) table head
    row = tf.gather(t["query_rows"], table)[:, position]  # (heads,)
    block, offset = row // bs, row % bs
    keys.append(tf.gather(tf.gather(t["key_positions"], table), block,
                          batch_dims=1))
    sel = tf.gather(tf.gather(t["mask_sel"], table), block, batch_dims=1)
    # (heads, width): the query's row of each tile's token mask
    rows = tf.broadcast_to(offset[:, None], tf.shape(sel))
    mask = tf.gather_nd(t["masks"], tf.stack([sel, rows], axis=-1))
    valid.append(tf.reshape(mask, [heads, -1]))  # (heads, width * bs)
  keys, valid = tf.concat(keys, axis=1), tf.concat(valid, axis=1)
  return tf.where(valid, keys, 0), valid


# ----------------------------------------------------------------------------
# Permutations.


def _permute(x, perm, shared: bool, heads: int):
  """Gathers axis 2 of x [B, H, n, ...] by perm [T, n]: head h by row h % T.

  Args:
    x: [B, H, n, ...] tensor.
    perm: int32 [T, n], T dividing H.
    shared: every row of perm is the same (one gather for all heads).
    heads: H.

  Returns:
    x with axis 2 of head h gathered by perm[h % T].
  """
  if shared:
    return tf.gather(x, perm[0], axis=2)
  perm = tf.gather(perm, tf.range(heads) % tf.shape(perm)[0])  # (H, n)
  rank = len(x.shape)
  order = [1, 0] + list(range(2, rank))
  xt = tf.transpose(x, order)  # (H, B, n, ...)
  return tf.transpose(tf.gather(xt, perm, axis=2, batch_dims=1), order)


# ----------------------------------------------------------------------------
# The two implementations of one component (kernel coordinates).


def _component_custom_op(q, k, v, tables, scale, key_lengths):
  """Returns (out [B, H, n, d] q.dtype, lse [B, H, n], stats [B, H, n, 2]).

  stats holds each row's max score m and log l, l = sum exp(score - m)
  (-inf, -inf for a row with no key), without gradient.
  """
  out, lse, stats = load_library().sparse_transformer_block_sparse_attention(
      q, k, v, key_lengths, tables["key_positions"], tables["row_ptr"],
      tables["col_idx"], tables["mask_idx"], tables["masks"],
      tables["col_ptr"], tables["row_idx"], tables["col_mask_idx"],
      scale=scale)
  return out, lse, tf.stop_gradient(stats)


@tf.custom_gradient
def _zero_non_finite(x):
  """x with every inf and NaN replaced by 0; the gradient passes unchanged."""
  def grad(dy):
    return dy
  return tf.where(tf.math.is_finite(x), x, tf.zeros_like(x)), grad


def _weighted_values(probs, values, scores, mask, total):
  """probs @ values per row, exact where values are not finite.

  A value entry that is inf or NaN would reach, as 0 * NaN in the einsum,
  the rows that do not attend its key. When there is one (tf.cond; the common
  path is the plain einsum), the einsum takes those entries as 0 and each row
  gets, per column, the inf or NaN that exact arithmetic gives: the sum of the
  non-finite entries of the keys it attends (score not -inf). That term is
  scaled by `total`, so the gradients of a poisoned row are NaN as well.

  Args:
    probs: (B, H, nb, bs, K) unnormalised probabilities, 0 where masked.
    values: (B, H, nb, K, d) the gathered values.
    scores: (B, H, nb, bs, K) scores before masking.
    mask: bool, broadcastable to scores: the allowed keys.
    total: (B, H, nb, bs) row sums of probs.

  Returns:
    (B, H, nb, bs, d): probs @ values, plus total times the non-finite part.
  """
  def plain():
    return tf.einsum("bhnqk,bhnkd->bhnqd", probs, values)

  def exact():
    attended = tf.cast(tf.logical_and(mask, tf.not_equal(scores, -np.inf)),
                       tf.float32)
    kinds = tf.concat([tf.math.is_nan(values), tf.equal(values, np.inf),
                       tf.equal(values, -np.inf)], axis=-1)
    # (B, H, nb, bs, 3 d): attended keys with a NaN, +inf, -inf per column
    counts = tf.einsum("bhnqk,bhnkd->bhnqd", attended,
                       tf.cast(kinds, tf.float32))
    nan, pos, neg = tf.split(counts > 0, 3, axis=-1)
    poison = tf.where(nan | (pos & neg), np.nan,
                      tf.where(pos, np.inf, tf.where(neg, -np.inf, 0.0)))
    return (tf.einsum("bhnqk,bhnkd->bhnqd", probs, _zero_non_finite(values))
            + poison * total[..., None])

  return tf.cond(tf.reduce_all(tf.math.is_finite(values)), plain, exact)


def _component_pure_tf(q, k, v, layout, index, scale, key_lengths):
  """Gather-based masked softmax; returns (out, lse, stats) as the op does."""
  t = _padded_tables(layout, index)
  batch = tf.shape(q)[0]
  heads, n, d = layout.num_heads, layout.seq_len, q.shape[-1]
  nb, bs, width = layout.num_blocks, layout.block_size, t["width"]
  q32, k32, v32 = (tf.cast(x, tf.float32) for x in (q, k, v))
  qb = tf.reshape(q32, [batch, heads, nb, bs, d])  # (B, H, nb, bs, d)
  kv_shape = [batch, heads, nb, width * bs, d]
  # Row of [B, H * nb, bs, d] gathered by each slot of each head.
  table = tf.range(heads) % t["table_heads"]  # (H,) table head of each head
  gather = tf.reshape(tf.gather(t["gather"], table) +
                      tf.range(heads)[:, None] * nb, [-1])  # (H * nb * width,)
  kg = tf.reshape(tf.gather(tf.reshape(k32, [batch, heads * nb, bs, d]),
                            gather, axis=1), kv_shape)
  vg = tf.reshape(tf.gather(tf.reshape(v32, [batch, heads * nb, bs, d]),
                            gather, axis=1), kv_shape)
  scores = tf.einsum("bhnqd,bhnkd->bhnqk", qb, kg) * scale
  # (B, H, nb, bs, width * bs)
  mask = tf.gather(t["masks"], t["mask_sel"])  # (T, nb, width, bs, bs)
  mask = tf.reshape(tf.transpose(mask, [0, 1, 3, 2, 4]),
                    [1, t["table_heads"], nb, bs, width * bs])
  key_positions = t["key_positions"]  # (T, nb, width * bs)
  if t["table_heads"] != 1:  # else both broadcast over the heads
    mask = tf.gather(mask, table, axis=1)  # (1, H, nb, bs, width * bs)
    key_positions = tf.gather(key_positions, table)  # (H, nb, width * bs)
  if key_lengths is not None:
    valid = (key_positions[None] <
             tf.reshape(key_lengths, [-1, 1, 1, 1]))  # (B, H|1, nb, width*bs)
    mask = tf.logical_and(mask, valid[:, :, :, None, :])
  probs, row_max, total = masked_exp(scores, mask)  # total: (B, H, nb, bs)
  has_key = tf.not_equal(total, 0.0)  # a NaN score makes the row NaN
  safe_total = tf.where(has_key, total, 1.0)
  out = (_weighted_values(probs, vg, scores, mask, total) /
         safe_total[..., None])
  log_total = tf.math.log(safe_total)
  lse = tf.where(has_key, row_max[..., 0] + log_total, -np.inf)
  stats = tf.stop_gradient(tf.stack(
      [tf.where(has_key, row_max[..., 0], -np.inf),
       tf.where(has_key, log_total, -np.inf)], axis=-1))
  return (tf.cast(tf.reshape(out, [batch, heads, n, d]), q.dtype),
          tf.reshape(lse, [batch, heads, n]),
          tf.reshape(stats, [batch, heads, n, 2]))


def _merge_components(outs, lses, stats, dtype):
  """Log-sum-exp merge of token-disjoint partial attentions.

  Each part's weight is exp(lse - top), normalised. Its value comes from the
  part's (m, log l) as exp((m - top) + log l), with top the largest m: lse =
  m + log l in float32 rounds log l away where |m| is large (scores of 1e10
  that tie across parts); its gradient is that of lse.

  Args:
    outs: per part, [B, H, n, d] attention over the part's keys.
    lses: per part, [B, H, n] float32 log-sum-exp of the scores.
    stats: per part, [B, H, n, 2] float32 (m, log l), no gradient.
    dtype: the result's dtype.

  Returns:
    [B, H, n, d] attention over the union of the parts' keys.
  """
  lse = tf.stack(lses)  # (C, B, H, n)
  row_max, log_sum = tf.unstack(tf.stack(stats), axis=-1)  # (C, B, H, n)
  top = tf.reduce_max(row_max, axis=0)
  top = tf.where(tf.math.is_finite(top), top, 0.0)
  # The value of (row_max - top) + log_sum, the gradient of lse - top.
  exponent = (row_max - top) + log_sum + tf.where(
      tf.math.is_finite(lse), lse - tf.stop_gradient(lse), 0.0)
  weights = tf.exp(exponent)  # (C, B, H, n); 0 where a part had no key
  total = tf.reduce_sum(weights, axis=0)
  # A NaN row (a NaN score in any part) stays NaN in every part's gradient.
  weights = weights / tf.where(tf.not_equal(total, 0.0), total, 1.0)
  out = tf.add_n([tf.cast(o, tf.float32) * w[..., None]
                  for o, w in zip(outs, tf.unstack(weights))])
  return tf.cast(out, dtype)


# ----------------------------------------------------------------------------
# Public entry point.


def _validate(q, k, v, layout, key_lengths):
  if not isinstance(layout, layouts_lib.Layout):
    raise TypeError(f"layout must be an st_keras.layouts.Layout, got "
                    f"{type(layout).__name__}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.shape.rank is not None and x.shape.rank != 4:
      raise ValueError(f"{name} must have rank 4 [batch, heads, n, head_dim], "
                       f"got shape {x.shape}")
    if not x.dtype.is_floating:
      raise TypeError(f"{name} must be float32, float16 or bfloat16, got "
                      f"{x.dtype.name}")
  if not (q.dtype == k.dtype == v.dtype):
    raise TypeError(f"q, k and v must share a dtype, got {q.dtype.name}, "
                    f"{k.dtype.name}, {v.dtype.name}")
  if q.dtype not in (tf.float32, tf.float16, tf.bfloat16):
    raise TypeError(f"q must be float32, float16 or bfloat16, got "
                    f"{q.dtype.name}")
  if not (q.shape.is_compatible_with(k.shape) and
          q.shape.is_compatible_with(v.shape)):
    raise ValueError(f"q, k and v must have one shape, got {q.shape}, "
                     f"{k.shape}, {v.shape}")
  heads, n, d = q.shape[1], q.shape[2], q.shape[3]
  if n is not None and n != layout.seq_len:
    raise ValueError(f"layout is for seq_len {layout.seq_len} but q has "
                     f"n = {n}")
  if heads is not None and heads != layout.num_heads:
    raise ValueError(f"layout has {layout.num_heads} heads but q has "
                     f"{heads}")
  if d is None:
    raise ValueError("head_dim (last axis of q) must be known statically")
  if key_lengths is not None:
    if key_lengths.dtype != tf.int32:
      raise TypeError(f"key_lengths must be int32, got "
                      f"{key_lengths.dtype.name}")
    if key_lengths.shape.rank is not None and (
        key_lengths.shape.rank != 1 or
        not key_lengths.shape.is_compatible_with(q.shape[:1])):
      raise ValueError(f"key_lengths must have shape [batch] = "
                       f"[{q.shape[0]}], got {key_lengths.shape}")


@tf.autograph.experimental.do_not_convert
def block_sparse_attention(q, k, v, layout: layouts_lib.Layout,
                           scale: Optional[float] = None, key_lengths=None,
                           implementation: Optional[str] = None):
  """Attention restricted to a sparse layout.

  Args:
    q: [batch, heads, n, head_dim] queries, float32, float16 or bfloat16.
    k: keys, same shape and dtype as q.
    v: values, same shape and dtype as q.
    layout: an `st_keras.layouts.Layout` for n tokens and `heads` heads.
    scale: positive score scale, finite in float32; default
      1 / sqrt(head_dim).
    key_lengths: optional int32 [batch]: keys at positions >= key_lengths[b]
      are ignored for example b (padded batches).
    implementation: 'auto', 'custom_op', 'pure_tf' or None for the
      module-wide choice.

  Returns:
    [batch, heads, n, head_dim] in q's dtype. A query with no allowed key
    gets zeros. Softmax and accumulation run in float32, exactly for any
    finite scores. Non-finite inputs reach the outputs exact arithmetic
    gives them to: a NaN score (NaN in q or an attended key) makes its row
    NaN, an inf or NaN in v[j, c] reaches column c of exactly the rows that
    attend key j.

  Raises:
    ValueError, TypeError: bad shapes, dtypes, layout, key_lengths or scale.
  """
  q = tf.convert_to_tensor(q)
  k = tf.convert_to_tensor(k)
  v = tf.convert_to_tensor(v)
  if key_lengths is not None:
    key_lengths = tf.convert_to_tensor(key_lengths)
  _validate(q, k, v, layout, key_lengths)
  scale = float(1.0 / np.sqrt(q.shape[-1]) if scale is None else scale)
  with np.errstate(over="ignore"):
    scale32 = np.float32(scale)  # the op's attribute and pure TF's factor
  if not (np.isfinite(scale32) and scale32 > 0):
    raise ValueError(f"scale must be a positive number finite in float32, "
                     f"got {scale}")
  impl = resolve_implementation(implementation)
  outs, lses, stats = [], [], []
  for index, comp in enumerate(layout.components):
    tables = _tables(layout, index)
    qc, kc, vc = q, k, v
    if comp.perm is not None:
      perm = tables["key_positions"]
      qc, kc, vc = (_permute(x, perm, tables["shared_perm"],
                             layout.num_heads) for x in (q, k, v))
    if impl == "custom_op":
      kl = (tf.zeros([0], tf.int32) if key_lengths is None else key_lengths)
      parts = _component_custom_op(qc, kc, vc, tables, scale, kl)
    else:
      parts = _component_pure_tf(qc, kc, vc, layout, index, scale,
                                 key_lengths)
    if comp.perm is not None:
      inverse = tables["inverse_perm"]
      parts = [_permute(x, inverse, tables["shared_perm"], layout.num_heads)
               for x in parts]
    for results, x in zip((outs, lses, stats), parts):
      results.append(x)
  if len(outs) == 1:
    return outs[0]
  return _merge_components(outs, lses, stats, q.dtype)


@tf.RegisterGradient(OP_NAME)
def _block_sparse_attention_grad(op, dout, dlse, unused_dstats):
  """Gradient of the fused op through its gradient op.

  Args:
    op: the forward op; its `stats` output feeds the gradient op.
    dout: upstream gradient of `out` (None: zeros).
    dlse: upstream gradient of `lse` (None: zeros).
    unused_dstats: `stats` is not differentiable.

  Returns:
    dq, dk, dv and None for each layout input.
  """
  q, k, v = op.inputs[:3]
  layout_inputs = list(op.inputs[3:])
  out, lse, stats = op.outputs
  if dout is None:
    dout = tf.zeros_like(out)
  if dlse is None:
    dlse = tf.zeros_like(lse)
  dq, dk, dv = load_library().sparse_transformer_block_sparse_attention_grad(
      q, k, v, out, stats, dout, dlse, *layout_inputs,
      scale=op.get_attr("scale"))
  return [dq, dk, dv] + [None] * len(layout_inputs)
