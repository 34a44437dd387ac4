"""The Sparse Transformer: a decoder-only model over bytes (the paper's Sec. 5)."""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional

import keras
import tensorflow as tf

from st_keras import layouts
from st_keras import multi_worker
from st_keras import ops
from st_keras.layers import attention as attention_lib
from st_keras.layers import padding
from st_keras.layers.embeddings import AxialPositionEmbedding
from st_keras.layers.embeddings import text_axes
from st_keras.layers.residual import SparseTransformerBlock

INTEGRATIONS = ("merged", "multihead", "interleaved")


@dataclasses.dataclass
class ModelConfig:
  """The settings of a `SparseTransformer` but its context, seed and
  padding token: the one list of them, read by the model's constructor and
  `get_config` and by the run configs' `model` section (`st_keras.config`).
  `SparseTransformer` documents each."""
  width: int = 256
  num_layers: int = 4
  num_heads: int = 4
  vocab_size: int = 256
  pattern: str = "fixed"
  integration: str = "merged"
  stride: int = 128
  summary_size: int = 32
  num_summary_patterns: int = 1
  block_size: int = 32
  qk_ratio: float = 1.0
  ff_multiplier: float = 4.0
  dropout: float = 0.0
  embedding_axes: Optional[List[int]] = None
  recompute: bool = False
  attention_implementation: Optional[str] = None


SETTINGS = tuple(f.name for f in dataclasses.fields(ModelConfig))
LN2 = math.log(2.0)


def layer_modes(pattern: str, integration: str, num_layers: int) -> list:
  """The attention mode of each layer for an integration (Eqs. 5-8).

  Args:
    pattern: 'fixed', 'strided', 'dense' or 'local'.
    integration: 'merged' (every head attends A1 and A2), 'multihead' (half
      the heads each part), or 'interleaved' (layer r attends part r mod 2).
    num_layers: number of residual blocks.

  Returns:
    A list of `SparseSelfAttention` modes, one per layer.
  """
  if integration not in INTEGRATIONS:
    raise ValueError(f"integration must be one of {INTEGRATIONS}, got "
                     f"{integration!r}")
  parts = attention_lib.FACTORIZED_PARTS.get(pattern)
  if parts is None:  # one part only
    return ["merged"] * num_layers
  if integration == "interleaved":
    return [parts[r % 2] for r in range(num_layers)]
  return [integration] * num_layers


def _check_sizes(**sizes) -> None:
  """Checks the integer size arguments of `SparseTransformer`.

  Args:
    **sizes: argument name -> value; every value must be a positive int,
      block_size one the attention op supports and seq_len a multiple of it.

  Raises:
    ValueError, naming the first bad argument.
  """
  for name, value in sizes.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  block_size = sizes["block_size"]
  if block_size not in layouts.SUPPORTED_BLOCK_SIZES:
    raise ValueError(f"block_size must be one of "
                     f"{layouts.SUPPORTED_BLOCK_SIZES}, got {block_size}")
  if sizes["seq_len"] % block_size:
    raise ValueError(f"seq_len {sizes['seq_len']} must be a multiple of "
                     f"block_size {block_size}")


def bits_per_token(y_true, y_pred):
  """Next-token cross-entropy in bits of logits y_pred for targets y_true.

  Args:
    y_true: (batch, n) int targets.
    y_pred: (batch, n, vocab) logits.

  Returns:
    (batch, n) float32 bits.
  """
  nats = keras.losses.sparse_categorical_crossentropy(
      y_true, tf.cast(y_pred, tf.float32), from_logits=True)
  return nats / LN2


@keras.saving.register_keras_serializable(package="st_keras")
class BitsPerByte(keras.metrics.MeanMetricWrapper):
  """Mean next-token cross-entropy in bits (bits per byte, or per dim).

  A weighted mean under sample weights or a Keras mask on the logits:
  compiled as a weighted metric, it leaves out the padding a
  `SparseTransformer` with a padding_token weighs 0, as the loss does.

  Args:
    name: metric name.
    dtype: the metric's dtype.
  """

  def __init__(self, name: str = "bits_per_byte", dtype=None):
    super().__init__(bits_per_token, name=name, dtype=dtype)

  def get_config(self):
    return {"name": self.name, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="st_keras")
class SparseTransformer(multi_worker.MultiWorkerModel):
  """Autoregressive Sparse Transformer over a byte vocabulary.

  H0 = token embedding + position embedding; H_k = H_{k-1} +
  resblock(H_{k-1}); logits = norm(H_N) W_out. Logits are float32 under
  every dtype policy. Token i's logits predict token i + 1.

  Args:
    seq_len: context length n (a multiple of block_size).
    seed: seed of the dropout masks.
    padding_token: None, or the token that right-pads a batch of documents
      of different lengths: the trailing run of it in each row is padding.
      `fit` and `evaluate` weigh the targets in each row's trailing run of
      it 0 (as a Keras mask would), so the loss and `BitsPerByte` are means
      over the real targets, whether the batch was padded before or after
      shifting. Choose a token that does not end documents (e.g.
      vocab_size=257, padding_token=256).
    **kwargs: the settings of `ModelConfig`, each described below, and
      `keras.Model` arguments (name, dtype, ...).

  Settings (`ModelConfig`; each is also an attribute of the model):
    width: model width d.
    num_layers: residual blocks N.
    num_heads: attention heads.
    vocab_size: token vocabulary (256 bytes).
    pattern: 'fixed', 'strided', 'dense' or 'local'.
    integration: 'merged', 'multihead' or 'interleaved'.
    stride: the pattern's l.
    summary_size: the fixed pattern's c, a positive int (<= stride for the
      fixed pattern). Saved models whose config says `summary` load too.
    num_summary_patterns: fixed-pattern summary slots across heads.
    block_size: attention tile size: 16, 32, 64 or 128.
    qk_ratio: query/key projection width relative to the value width.
    ff_multiplier: feed-forward width relative to the model width.
    dropout: residual-branch dropout rate.
    embedding_axes: axes of the position embedding; default
      (ceil(n / stride), stride) for text and audio; (rows, columns,
      channels) for images.
    recompute: recompute each block's activations in the backward pass.
    attention_implementation: 'auto', 'custom_op', 'pure_tf' or None.

  Call arguments:
    tokens: (batch, n') int tokens in 0..vocab_size - 1, n' <= n (any n';
      inputs are padded internally to a multiple of block_size, or to n
      when n' is not static).
    training: whether dropout and recomputation are active.
    key_lengths: None or (batch,) ints: right padding, keys at positions
      >= key_lengths[b] are ignored (with padding_token, the smaller of
      the two lengths counts).

  Returns:
    (batch, n', vocab_size) float32 logits. Valid positions of a padded
    batch get the logits each document gets alone.

  Raises:
    ValueError: (construction) a bad size argument, named.
    TypeError: (call) tokens are not integers.
    tf.errors.InvalidArgumentError: (call, when run) a token is outside
      0..vocab_size - 1.
  """

  def __init__(self, seq_len: int, seed: Optional[int] = None,
               padding_token: Optional[int] = None, **kwargs):
    settings = ModelConfig(**{k: kwargs.pop(k) for k in SETTINGS
                              if k in kwargs})
    super().__init__(**kwargs)
    _check_sizes(seq_len=seq_len, width=settings.width,
                 num_layers=settings.num_layers,
                 num_heads=settings.num_heads,
                 vocab_size=settings.vocab_size,
                 block_size=settings.block_size, stride=settings.stride,
                 summary_size=settings.summary_size)
    if settings.pattern == "fixed" and (settings.summary_size >
                                        settings.stride):
      raise ValueError(f"summary_size must be <= stride ({settings.stride}) "
                       f"for the fixed pattern, got {settings.summary_size}")
    vocab_size = settings.vocab_size
    if padding_token is not None and (
        isinstance(padding_token, bool) or
        not isinstance(padding_token, int) or
        not 0 <= padding_token < vocab_size):
      raise ValueError(f"padding_token must be None or a token in "
                       f"0..{vocab_size - 1}, got {padding_token!r}")
    settings.embedding_axes = list(settings.embedding_axes or text_axes(
        seq_len, settings.stride))
    self.settings = settings
    # Attributes named as the settings (summary_size, not summary: that is
    # keras.Model.summary()).
    for name in SETTINGS:
      setattr(self, name, getattr(settings, name))
    self.embedding_axes = tuple(settings.embedding_axes)
    self.seq_len = seq_len
    self.seed = seed
    self.padding_token = padding_token

    self.token_embedding = keras.layers.Embedding(
        vocab_size, self.width, embeddings_initializer="random_normal",
        name="token_embedding", dtype=self.dtype_policy)
    self.position_embedding = AxialPositionEmbedding(
        self.embedding_axes, name="position_embedding",
        dtype=self.dtype_policy)
    self.blocks = []
    for r, mode in enumerate(layer_modes(self.pattern, self.integration,
                                         self.num_layers)):
      attention = dict(
          pattern=self.pattern, mode=mode, stride=self.stride,
          summary=self.summary_size,
          num_summary_patterns=self.num_summary_patterns,
          block_size=self.block_size, qk_ratio=self.qk_ratio,
          implementation=self.attention_implementation)
      self.blocks.append(SparseTransformerBlock(
          self.num_heads, attention, ff_multiplier=self.ff_multiplier,
          dropout=self.dropout, num_layers=self.num_layers,
          recompute=self.recompute,
          seed=None if seed is None else seed + r, name=f"block_{r}",
          dtype=self.dtype_policy))
    self.final_norm = keras.layers.LayerNormalization(
        epsilon=1e-5, name="final_norm", dtype=self.dtype_policy)
    self.logits = keras.layers.Dense(vocab_size, dtype="float32",
                                     name="logits")
    self.supports_jit = all(b.supports_jit for b in self.blocks)

  def build(self, input_shape=None):
    shape = (None, self.seq_len, self.width)
    self.token_embedding.build((None, self.seq_len))
    self.position_embedding.build(shape)
    for block in self.blocks:
      block.build(shape)
    self.final_norm.build(shape)
    self.logits.build(shape)
    self.built = True

  def call(self, tokens, training=False, key_lengths=None):
    if tokens.shape.rank != 2:
      raise ValueError(f"tokens must have shape (batch, n), got "
                       f"{tokens.shape}")
    if tokens.shape[1] is not None and tokens.shape[1] > self.seq_len:
      raise ValueError(f"{tokens.shape[1]} tokens exceed the context "
                       f"seq_len={self.seq_len}")
    tokens = self._checked_tokens(tokens)
    lengths = self._padding_lengths(tokens)
    if key_lengths is not None:
      key_lengths = tf.cast(key_lengths, tf.int32)
      lengths = key_lengths if lengths is None else tf.minimum(lengths,
                                                               key_lengths)
    # The attention layouts' length: padded keys follow every valid query,
    # so the causal layers need no key lengths for them.
    tokens, n = padding.pad_to_length(
        tokens, 1, padding.layout_length(
            tokens.shape[1], self.block_size, self.seq_len),
        f"tokens exceed the context seq_len={self.seq_len}")
    h = self.token_embedding(tokens)  # (batch, length, width)
    h = self.position_embedding(h)
    for block in self.blocks:
      h = block(h, training=training, key_lengths=lengths)
    logits = self.logits(self.final_norm(h))  # (batch, length, vocab) f32
    return logits[:, :n]

  def _padding_lengths(self, tokens):
    """int32 (batch,): each row's length without its trailing run of
    padding_token, or None without a padding_token."""
    if self.padding_token is None:
      return None
    real = tf.not_equal(tokens, tf.cast(self.padding_token, tokens.dtype))
    # (batch, n): 1 + index of the last real token, 0 for none
    last = tf.cast(real, tf.int32) * tf.range(1, tf.shape(tokens)[1] + 1)
    return tf.reduce_max(last, axis=1)

  def _checked_tokens(self, tokens):
    """`tokens` once they have passed a runtime check of their range.

    The embedding's gather would otherwise wrap negative ids and, on some
    devices, clamp ids >= vocab_size without an error.

    Args:
      tokens: (batch, n) integer tensor.

    Returns:
      `tokens`, int32 or int64.

    Raises:
      TypeError: tokens are not integers.
      tf.errors.InvalidArgumentError: (when run) a token is outside
        0..vocab_size - 1.
    """
    dtype = tf.as_dtype(tokens.dtype)
    if not dtype.is_integer:
      raise TypeError(f"tokens must be integers, got dtype {dtype.name}")
    if dtype not in (tf.int32, tf.int64):
      # Exact for the narrower types; uint64 ids >= 2^63 turn negative.
      tokens = tf.cast(tokens, tf.int64)
    message = f"tokens must be in 0..{self.vocab_size - 1}"
    checks = [tf.debugging.assert_non_negative(tokens, message=message),
              tf.debugging.assert_less(
                  tokens, tf.cast(self.vocab_size, tokens.dtype),
                  message=message)]
    with tf.control_dependencies(checks):
      return tf.identity(tokens)

  def initial_cache(self, batch_size) -> list:
    """Empty per-layer key/value caches for `decode_step` (float32).

    Args:
      batch_size: sequences decoded together (int or int32 tensor).

    Returns:
      A list with one (keys, values) pair of `tf.TensorArray`s per layer.
    """
    if not self.built:
      self.build()
    return [block.attention.initial_cache(batch_size, self.seq_len)
            for block in self.blocks]

  def decode_step(self, tokens, position, caches: list):
    """Next-token logits for one new position, using cached keys/values.

    Equal (to float tolerance) to `self(x)[:, position]` when x holds the
    same tokens at positions 0..position; each attention layer reads only
    the sparse set of `position`.

    Args:
      tokens: (batch,) int tokens at `position`.
      position: int32 scalar tensor, 0 <= position < seq_len.
      caches: from `initial_cache` or the previous step.

    Returns:
      (logits (batch, vocab_size) float32, updated caches).
    """
    h = self.token_embedding(tokens)  # (batch, width)
    h = h + tf.cast(self.position_embedding.at(position), h.dtype)
    new_caches, attended = [], {}
    for block, cache in zip(self.blocks, caches):
      # One row lookup per step for each layout (layers share layouts).
      layout = block.attention.layout(self.seq_len)
      if id(layout) not in attended:
        attended[id(layout)] = ops.attended_keys(layout, position)
      h, cache = block.decode_step(h, position, cache, attended[id(layout)])
      new_caches.append(cache)
    return self.logits(self.final_norm(h)), new_caches

  def _weigh_targets(self, data):
    """(x, y, sample_weight) with the targets in each row's trailing run of
    padding_token weighted 0 and the others total / valid, as Keras weighs
    a mask: the loss, a mean over all positions, is the mean over the real
    targets."""
    if self.padding_token is None:
      return data
    x, y, weights = keras.utils.unpack_x_y_sample_weight(data)
    valid = tf.sequence_mask(self._padding_lengths(y), tf.shape(y)[1],
                             dtype=tf.float32)  # (batch, n)
    scale = tf.math.divide_no_nan(tf.cast(tf.size(valid), tf.float32),
                                  tf.reduce_sum(valid))
    valid = valid * scale
    if weights is not None:
      weights = tf.cast(weights, tf.float32)
      valid = valid * (weights[:, None] if weights.shape.rank == 1 else
                       weights)
    return x, y, valid

  def train_step(self, data):
    return super().train_step(self._weigh_targets(data))

  def test_step(self, data):
    return super().test_step(self._weigh_targets(data))

  def get_config(self):
    return {"name": self.name, "seq_len": self.seq_len, "seed": self.seed,
            "padding_token": self.padding_token,
            **dataclasses.asdict(self.settings)}

  @classmethod
  def from_config(cls, config):
    """The model of `get_config`; a config saved before summary_size was
    named so (key `summary`) loads too."""
    config = dict(config)
    if "summary" in config:
      config.setdefault("summary_size", config.pop("summary"))
    return cls(**config)


def compile_for_training(model: SparseTransformer, optimizer,
                         metric_name: str = "bits_per_byte") -> None:
  """Compiles `model` with the next-byte loss and the bits-per-byte metric.

  Args:
    model: a `SparseTransformer`.
    optimizer: a Keras optimizer (wrapped in a LossScaleOptimizer by Keras
      under a float16 policy).
    metric_name: 'bits_per_byte', or 'bits_per_dim' for images.
  """
  model.compile(
      optimizer=optimizer,
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      weighted_metrics=[BitsPerByte(name=metric_name)], jit_compile=False)
