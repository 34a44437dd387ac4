"""Multi-head self-attention over a sparse layout (the paper's Sec. 4)."""

from __future__ import annotations

import functools
import math
from typing import Optional

import keras
import tensorflow as tf

from st_keras import layouts
from st_keras import ops

PATTERNS = ("fixed", "strided", "dense", "local")
# The two parts (the paper's A1 and A2) of each factorized pattern.
FACTORIZED_PARTS = {"fixed": ("local", "summary"),
                    "strided": ("local", "stride")}


def modes(pattern: str) -> tuple:
  """The attention modes a pattern allows.

  How the two parts are integrated (Eqs. 5-8): one union for every head
  ('merged'), half the heads each ('multihead'), or one part per layer
  (interleaved: the model gives each layer its part). 'dense' and 'local'
  have a single part: 'merged' only.
  """
  if pattern in FACTORIZED_PARTS:
    return ("merged", "multihead") + FACTORIZED_PARTS[pattern]
  return ("merged",)


# Layers with the same arguments share one layout, and so one set of table
# constants in traced and exported graphs.
@functools.lru_cache(maxsize=64)
def build_layout(pattern: str, mode: str, seq_len: int, num_heads: int,
                 block_size: int, stride: int, summary: int,
                 num_summary_patterns: int) -> layouts.Layout:
  """The layout one attention layer uses for `seq_len` tokens.

  Args:
    pattern: 'fixed', 'strided', 'dense' (causal) or 'local' (a window of
      `stride` keys).
    mode: 'merged' (every head attends A1 and A2), 'multihead' (the first
      half of the heads A1, the rest A2), or one part: 'local' (A1),
      'summary' (fixed A2) or 'stride' (strided A2).
    seq_len: number of tokens, a multiple of block_size.
    num_heads: attention heads.
    block_size: tile size of the layout (16, 32, 64 or 128).
    stride: the paper's l.
    summary: the fixed pattern's c.
    num_summary_patterns: the fixed pattern's per-head summary slots.

  Returns:
    A causal `layouts.Layout`.
  """
  if pattern == "dense":
    return layouts.causal(seq_len, block_size, num_heads)
  if pattern == "local":
    return layouts.local(seq_len, block_size, stride, num_heads)

  def part_layout(part, heads):
    if pattern == "fixed":
      return layouts.fixed(seq_len, block_size, stride, summary, heads,
                           num_summary_patterns, part=part)
    return layouts.strided(seq_len, block_size, stride, heads, part=part)

  if mode == "merged":
    return part_layout("both", num_heads)
  if mode == "multihead":
    first_part, second_part = FACTORIZED_PARTS[pattern]
    first = num_heads // 2
    return layouts.per_head(part_layout(first_part, first),
                            part_layout(second_part, num_heads - first))
  return part_layout(mode, num_heads)


@keras.saving.register_keras_serializable(package="st_keras")
class SparseSelfAttention(keras.layers.Layer):
  """Causal multi-head self-attention restricted to a sparse pattern.

  Projects the input to queries, keys and values, runs
  `st_keras.ops.block_sparse_attention` over the pattern's layout for the
  input's length, and projects the heads back to the model width.

  Args:
    num_heads: attention heads.
    pattern: 'fixed', 'strided', 'dense' or 'local' (see `build_layout`).
    mode: 'merged', 'multihead', 'local', 'summary' or 'stride'.
    stride: the paper's l (also the window of the 'local' pattern).
    summary: the fixed pattern's c.
    num_summary_patterns: fixed-pattern summary slots across heads.
    block_size: layout tile size; the sequence length must be a multiple.
    qk_ratio: width of the query and key projections relative to the model
      width (0.5: the half-size projections of the paper's CIFAR-10 run).
    output_initializer: initializer of the output projection W_p (the
      model scales it by sqrt(1 / (2 * num_layers))).
    implementation: 'auto', 'custom_op', 'pure_tf' or None (module-wide).
    **kwargs: `keras.layers.Layer` arguments (name, dtype, ...).

  Call arguments:
    x: (batch, n, width) inputs.

  Returns:
    (batch, n, width).

  Example:
    >>> layer = SparseSelfAttention(num_heads=4, pattern="fixed",
    ...                             stride=64, summary=16, block_size=16)
    >>> layer(tf.random.normal([2, 256, 64])).shape
    TensorShape([2, 256, 64])
  """

  def __init__(self, num_heads: int, pattern: str = "fixed",
               mode: str = "merged", stride: int = 128, summary: int = 32,
               num_summary_patterns: int = 1, block_size: int = 32,
               qk_ratio: float = 1.0,
               output_initializer="glorot_uniform",
               implementation: Optional[str] = None, **kwargs):
    super().__init__(**kwargs)
    if pattern not in PATTERNS:
      raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if mode not in modes(pattern):
      raise ValueError(f"mode must be one of {modes(pattern)} for the "
                       f"{pattern} pattern, got {mode!r}")
    if num_heads < 1:
      raise ValueError(f"num_heads must be positive, got {num_heads}")
    if mode == "multihead" and num_heads < 2:
      raise ValueError("mode='multihead' needs num_heads >= 2")
    if not 0.0 < qk_ratio <= 1.0:
      raise ValueError(f"qk_ratio must be in (0, 1], got {qk_ratio}")
    if implementation is not None and (implementation
                                       not in ops.IMPLEMENTATIONS):
      raise ValueError(f"implementation must be one of "
                       f"{ops.IMPLEMENTATIONS} or None, got "
                       f"{implementation!r}")
    self.num_heads = num_heads
    self.pattern = pattern
    self.mode = mode
    self.stride = stride
    self.summary = summary
    self.num_summary_patterns = num_summary_patterns
    self.block_size = block_size
    self.qk_ratio = qk_ratio
    self.output_initializer = keras.initializers.get(output_initializer)
    self.implementation = implementation
    # The fused op has no XLA kernel: Keras must not jit-compile this layer.
    self.supports_jit = ops.resolve_implementation(implementation) != (
        "custom_op")
    self._layouts = {}

  def build(self, input_shape):
    width = input_shape[-1]
    if width is None:
      raise ValueError("the last axis of the input must be known")
    if width % self.num_heads:
      raise ValueError(f"input width {width} is not divisible by num_heads "
                       f"{self.num_heads}")
    self.value_dim = width // self.num_heads
    self.key_dim = max(1, int(self.value_dim * self.qk_ratio))
    heads = self.num_heads

    # One matmul projects queries, keys and values; LeCun-uniform gives each
    # of the three the variance 1 / width of a square Glorot projection.
    self.qkv = keras.layers.Dense(
        heads * (2 * self.key_dim + self.value_dim),
        kernel_initializer="lecun_uniform", name="qkv")
    self.output_dense = keras.layers.Dense(
        width, kernel_initializer=self.output_initializer, name="output")
    self.qkv.build(input_shape)
    self.output_dense.build(tuple(input_shape[:-1]) + (heads *
                                                       self.value_dim,))

  def layout(self, seq_len: int) -> layouts.Layout:
    """The (cached) layout for `seq_len` tokens."""
    if seq_len not in self._layouts:
      if seq_len % self.block_size:
        raise ValueError(f"sequence length {seq_len} is not a multiple of "
                         f"block_size {self.block_size}")
      self._layouts[seq_len] = build_layout(
          self.pattern, self.mode, seq_len, self.num_heads, self.block_size,
          self.stride, self.summary, self.num_summary_patterns)
    return self._layouts[seq_len]

  def call(self, x):
    seq_len = x.shape[1]
    if seq_len is None:
      raise ValueError("the sequence axis must be known statically: the "
                       "layout depends on it")
    q, k, v = self._project(x)  # (batch, heads, n, dim) each
    if self.key_dim != self.value_dim:
      # The op takes one head_dim: pad q and k with zeros (scores unchanged).
      pad = [[0, 0], [0, 0], [0, 0], [0, self.value_dim - self.key_dim]]
      q, k = tf.pad(q, pad), tf.pad(k, pad)
    out = ops.block_sparse_attention(
        q, k, v, self.layout(seq_len), scale=1.0 / math.sqrt(self.key_dim),
        implementation=self.implementation)  # (batch, heads, n, value_dim)
    out = tf.transpose(out, [0, 2, 1, 3])  # (batch, n, heads, value_dim)
    return self.output_dense(tf.reshape(
        out, [-1, seq_len, self.num_heads * self.value_dim]))  # (b, n, width)

  def _project(self, x):
    """Queries, keys and values of x (batch, n, width).

    Returns:
      q, k: (batch, heads, n, key_dim); v: (batch, heads, n, value_dim).
    """
    heads, n = self.num_heads, x.shape[1]
    qkv = self.qkv(x)  # (batch, n, heads * (2 key_dim + value_dim))
    parts = tf.split(qkv, [heads * self.key_dim, heads * self.key_dim,
                           heads * self.value_dim], axis=-1)
    # (batch, n, heads * dim) -> (batch, heads, n, dim)
    return tuple(tf.transpose(tf.reshape(t, [-1, n, heads, t.shape[-1] //
                                             heads]), [0, 2, 1, 3])
                 for t in parts)

  def initial_cache(self, batch_size, seq_len: int) -> tuple:
    """Empty key and value caches for `decode_step`.

    A cache holds one (batch, heads, dim) float32 entry per position, in
    `tf.TensorArray`s: writing a position costs O(1), not a copy of the
    whole cache.

    Args:
      batch_size: sequences decoded together (int or int32 tensor).
      seq_len: the longest sequence to decode (a multiple of block_size).

    Returns:
      (keys, values): `tf.TensorArray`s of seq_len entries.
    """
    del batch_size  # the entries' batch axis is set by the first write
    self.layout(seq_len)  # checks seq_len
    return tuple(
        tf.TensorArray(tf.float32, size=seq_len, clear_after_read=False,
                       element_shape=[None, self.num_heads, dim])
        for dim in (self.key_dim, self.value_dim))

  def decode_step(self, x, position, cache: tuple, attended: tuple):
    """Attention output for one new position, given the earlier ones cached.

    The new key and value are written into the cache at `position`; the
    query attends only the keys of its row of the layout (its sparse set),
    gathered from the cache, so a step costs O(|set|) and not O(position).
    Scores are computed in float32 from float32 queries and keys under any
    dtype policy (float16 scores can overflow).

    Args:
      x: (batch, width) normalised input at `position`.
      position: int32 scalar tensor; all earlier positions are cached.
      cache: (keys, values) from `initial_cache` or the previous step.
      attended: `ops.attended_keys(self.layout(seq_len), position)` for the
        `initial_cache` length (layers that share a layout share it).

    Returns:
      (output (batch, width), updated cache).
    """
    keys, values = cache
    q, k, v = (tf.cast(t[:, :, 0], tf.float32)
               for t in self._project(x[:, None]))
    # (batch, heads, dim) each
    keys, values = keys.write(position, k), values.write(position, v)
    slots, valid = attended
    # (1 or heads, K): the same keys for every head, or a row per head
    kg, vg = (self._gather_heads(entries, slots) for entries in (keys, values))
    # (batch, heads, K, dim)
    scores = tf.einsum("bhd,bhkd->bhk", q, kg) / math.sqrt(self.key_dim)
    probs, _, total = ops.masked_exp(scores, valid)
    probs = probs / tf.where(total > 0, total, 1.0)[..., None]
    # a row with no key gives 0
    out = tf.einsum("bhk,bhkd->bhd", probs, vg)  # (batch, heads, value_dim)
    out = tf.reshape(tf.cast(out, self.compute_dtype),
                     [-1, self.num_heads * self.value_dim])
    return self.output_dense(out), (keys, values)

  def _gather_heads(self, entries, slots):
    """Entries of a cache TensorArray at `slots` (1 or heads, K):
    (batch, heads, K, dim)."""
    gathered = entries.gather(tf.reshape(slots, [-1]))
    # (slots.size, batch, heads, dim)
    if slots.shape[0] == 1:
      return tf.transpose(gathered, [1, 2, 0, 3])
    heads, count = self.num_heads, slots.shape[1]
    # Entry (h, k) was gathered for head h: keep that head's slice.
    gathered = tf.reshape(gathered, [heads, count, -1, heads,
                                     gathered.shape[-1]])
    gathered = tf.linalg.diag_part(tf.transpose(gathered, [1, 2, 4, 0, 3]))
    # (K, batch, dim, heads)
    return tf.transpose(gathered, [1, 3, 0, 2])

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    config = super().get_config()
    config.update(
        num_heads=self.num_heads, pattern=self.pattern, mode=self.mode,
        stride=self.stride, summary=self.summary,
        num_summary_patterns=self.num_summary_patterns,
        block_size=self.block_size, qk_ratio=self.qk_ratio,
        output_initializer=keras.initializers.serialize(
            self.output_initializer),
        implementation=self.implementation)
    return config
