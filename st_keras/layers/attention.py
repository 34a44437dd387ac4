"""Multi-head self-attention over a sparse layout (the paper's Sec. 4)."""

from __future__ import annotations

import functools
import math
from typing import Optional

import keras
import tensorflow as tf

from st_keras import layouts
from st_keras import ops
from st_keras.layers import padding

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
                 num_summary_patterns: int,
                 causal: bool = True) -> layouts.Layout:
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
    causal: keys j <= i only (a decoder); False gives the pattern's
      bidirectional form (an encoder).

  Returns:
    A `layouts.Layout`.
  """
  if pattern == "dense":
    return (layouts.causal(seq_len, block_size, num_heads) if causal else
            layouts.dense(seq_len, block_size, num_heads))
  if pattern == "local":
    return layouts.local(seq_len, block_size, stride, num_heads,
                         causal=causal)

  def part_layout(part, heads):
    if pattern == "fixed":
      return layouts.fixed(seq_len, block_size, stride, summary, heads,
                           num_summary_patterns, part=part, causal=causal)
    return layouts.strided(seq_len, block_size, stride, heads, part=part,
                           causal=causal)

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
  """Multi-head self-attention restricted to a sparse pattern.

  Projects the input to queries, keys and values, runs
  `st_keras.ops.block_sparse_attention` over the pattern's layout for the
  input's length, and projects the heads back to the model width. It takes
  the call arguments of `keras.layers.MultiHeadAttention` for
  self-attention, so it can replace that layer in a model.

  Padding: Keras masks on the input (`Embedding(mask_zero=True)`,
  `Masking`), a key-padding `attention_mask` and `key_lengths` all mark
  right padding; the keys past each example's length are ignored, so the
  valid positions of a padded batch get the outputs each sequence gets
  alone. The input's Keras mask is passed on to the output.

  Lengths: any length works. Inputs are padded internally to a multiple of
  block_size (one cached layout per padded length), and to max_length when
  the length is unknown when the layer is traced; the pattern of a shorter
  sequence is the longer one's restricted to its tokens, so the result is
  the same.

  Args:
    num_heads: attention heads.
    pattern: 'fixed', 'strided', 'dense' or 'local' (see `build_layout`).
    mode: 'merged', 'multihead', 'local', 'summary' or 'stride'.
    stride: the paper's l (also the window of the 'local' pattern).
    summary: the fixed pattern's c.
    num_summary_patterns: fixed-pattern summary slots across heads.
    block_size: layout tile size: 16, 32, 64 or 128.
    qk_ratio: width of the query and key projections relative to the model
      width (0.5: the half-size projections of the paper's CIFAR-10 run).
    output_initializer: initializer of the output projection W_p (the
      model scales it by sqrt(1 / (2 * num_layers))).
    implementation: 'auto', 'custom_op', 'pure_tf' or None (module-wide).
    causal: attend keys j <= i only (a decoder; the default); False: the
      pattern's bidirectional form (an encoder).
    max_length: length (a multiple of block_size) that inputs of unknown
      static length are padded to; None: such inputs are an error.
    **kwargs: `keras.layers.Layer` arguments (name, dtype, ...).

  Call arguments:
    query: (batch, n, width) inputs.
    value: None or the query tensor itself (self-attention; a different
      tensor must hold the same values, checked when run).
    key: the same as value.
    query_mask, value_mask, key_mask, mask: (batch, n) right-padding
      masks; Keras fills them from the input's Keras mask.
    attention_mask: (batch, n) or (batch, 1, n) key-padding mask (True:
      attend). Per-query masks are refused: the pattern is the layout's.
    key_lengths: (batch,) ints: keys at positions >= key_lengths[b] are
      ignored for example b.
    return_attention_scores: must be False (there is no dense score matrix).
    training: accepted for the Keras signature (no dropout inside).
    use_causal_mask: None: the layer's `causal`; True or False: the causal
      or bidirectional layout for this call.

  Returns:
    (batch, n, width).

  Example:
    >>> inputs = keras.Input(shape=(None,), dtype="int32")
    >>> x = keras.layers.Embedding(256, 64, mask_zero=True)(inputs)
    >>> layer = SparseSelfAttention(num_heads=4, pattern="fixed", stride=64,
    ...                             summary=16, block_size=16, causal=False,
    ...                             max_length=256)
    >>> outputs = layer(x, x)  # where MultiHeadAttention(4, 16)(x, x) was
    >>> model = keras.Model(inputs, outputs)
    >>> model(tf.constant([[5, 6, 7, 0]])).shape
    TensorShape([1, 4, 64])
  """

  def __init__(self, num_heads: int, pattern: str = "fixed",
               mode: str = "merged", stride: int = 128, summary: int = 32,
               num_summary_patterns: int = 1, block_size: int = 32,
               qk_ratio: float = 1.0,
               output_initializer="glorot_uniform",
               implementation: Optional[str] = None, causal: bool = True,
               max_length: Optional[int] = None, **kwargs):
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
    if block_size not in layouts.SUPPORTED_BLOCK_SIZES:
      raise ValueError(f"block_size must be one of "
                       f"{layouts.SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    if max_length is not None and (max_length < 1 or max_length % block_size):
      raise ValueError(f"max_length must be a positive multiple of "
                       f"block_size {block_size}, got {max_length!r}")
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
    self.causal = bool(causal)
    self.max_length = max_length
    self.supports_masking = True
    # The fused op has no XLA kernel: Keras must not jit-compile this layer.
    self.supports_jit = ops.resolve_implementation(implementation) != (
        "custom_op")

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
        kernel_initializer="lecun_uniform", name="qkv",
        dtype=self.dtype_policy)
    self.output_dense = keras.layers.Dense(
        width, kernel_initializer=self.output_initializer, name="output",
        dtype=self.dtype_policy)
    self.qkv.build(input_shape)
    self.output_dense.build(tuple(input_shape[:-1]) + (heads *
                                                       self.value_dim,))

  def layout(self, seq_len: int,
             causal: Optional[bool] = None) -> layouts.Layout:
    """The layout for `seq_len` tokens (shared by layers of one config).

    Args:
      seq_len: a multiple of block_size.
      causal: None for the layer's `causal`.

    Returns:
      A `layouts.Layout`.
    """
    if seq_len % self.block_size:
      raise ValueError(f"sequence length {seq_len} is not a multiple of "
                       f"block_size {self.block_size}")
    return build_layout(
        self.pattern, self.mode, seq_len, self.num_heads, self.block_size,
        self.stride, self.summary, self.num_summary_patterns,
        self.causal if causal is None else bool(causal))

  def call(self, query, value=None, key=None, query_mask=None,
           value_mask=None, key_mask=None, attention_mask=None,
           key_lengths=None, return_attention_scores=False, training=None,
           use_causal_mask=None, mask=None):
    del training  # no dropout inside the attention
    if return_attention_scores:
      raise ValueError(
          "return_attention_scores=True is not supported: the fused "
          "block-sparse op never forms the attention matrix")
    checks = [self._check_same(query, other, name)
              for name, other in (("value", value), ("key", key))
              if other is not None and other is not query]
    causal = self.causal if use_causal_mask is None else bool(
        use_causal_mask)
    lengths = padding.key_lengths_of(key_lengths, attention_mask,
                                     (mask, query_mask, value_mask, key_mask))
    length = padding.layout_length(query.shape[1], self.block_size,
                                    self.max_length)
    with tf.control_dependencies(checks):
      q, k, v = self._project(query)  # (batch, heads, n, dim) each
    if self.key_dim != self.value_dim:
      # The op takes one head_dim: pad q and k with zeros (scores unchanged).
      pad = [[0, 0], [0, 0], [0, 0], [0, self.value_dim - self.key_dim]]
      q, k = tf.pad(q, pad), tf.pad(k, pad)
    n = query.shape[1]
    if n != length:
      # Pad to the layout's length; the padded keys are masked out unless
      # the layout is causal and nothing else pads (no valid query reaches
      # them then).
      message = f"sequence length exceeds max_length {length}"
      (q, n), (k, _), (v, _) = (padding.pad_to_length(t, 2, length, message)
                                for t in (q, k, v))
      if lengths is not None or not causal:
        lengths = tf.fill([tf.shape(query)[0]], n) if lengths is None else (
            tf.minimum(lengths, n))
    out = ops.block_sparse_attention(
        q, k, v, self.layout(length, causal),
        scale=1.0 / math.sqrt(self.key_dim), key_lengths=lengths,
        implementation=self.implementation)  # (batch, heads, length, dim)
    out = tf.transpose(out[:, :, :n], [0, 2, 1, 3])
    # (batch, n, heads, value_dim)
    return self.output_dense(tf.reshape(
        out, [tf.shape(query)[0], -1, self.num_heads * self.value_dim]))

  @staticmethod
  def _check_same(query, other, name: str):
    """An op that fails when run unless `other` holds query's values."""
    if not query.shape.is_compatible_with(other.shape):
      raise ValueError(
          f"SparseSelfAttention attends a sequence to itself: {name} must "
          f"be the query (or None), got shapes {query.shape} and "
          f"{other.shape}")
    return tf.debugging.assert_equal(
        query, tf.cast(other, query.dtype),
        message=f"SparseSelfAttention attends a sequence to itself: {name} "
        f"must hold the query's values (or be None)")

  def _project(self, x):
    """Queries, keys and values of x (batch, n, width).

    Returns:
      q, k: (batch, heads, n, key_dim); v: (batch, heads, n, value_dim).
    """
    heads, batch = self.num_heads, tf.shape(x)[0]
    qkv = self.qkv(x)  # (batch, n, heads * (2 key_dim + value_dim))
    parts = tf.split(qkv, [heads * self.key_dim, heads * self.key_dim,
                           heads * self.value_dim], axis=-1)
    # (batch, n, heads * dim) -> (batch, heads, n, dim)
    return tuple(tf.transpose(tf.reshape(t, [batch, -1, heads, t.shape[-1] //
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
    if not self.causal:
      raise ValueError("cached decoding needs a causal layer (causal=True)")
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
    out = ops.attend_cached(q, keys, values, attended,
                            1.0 / math.sqrt(self.key_dim))
    # (batch, heads, value_dim)
    out = tf.reshape(tf.cast(out, self.compute_dtype),
                     [-1, self.num_heads * self.value_dim])
    return self.output_dense(out), (keys, values)

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
        implementation=self.implementation, causal=self.causal,
        max_length=self.max_length)
    return config
