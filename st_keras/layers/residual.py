"""The pre-activation residual block of the paper's Eqs. 9-14."""

from __future__ import annotations

import functools
from typing import Optional

import keras
import tensorflow as tf

from st_keras.layers.attention import SparseSelfAttention


@keras.saving.register_keras_serializable(package="st_keras")
def sigmoid_gelu(x):
  """The paper's GELU approximation f(x) = x * sigmoid(1.702 x)."""
  return x * keras.ops.sigmoid(1.702 * x)


def residual_initializer(num_layers: int):
  """Glorot-uniform scaled by sqrt(1 / (2 num_layers)), for W2 and W_p."""
  return keras.initializers.VarianceScaling(
      scale=1.0 / (2.0 * num_layers), mode="fan_avg",
      distribution="uniform")


@keras.saving.register_keras_serializable(package="st_keras")
class SparseTransformerBlock(keras.layers.Layer):
  """resblock(H) = a(H) + b(H), added to H (Eqs. 9-14).

  a(H) = dropout(attention(norm(H))), b(H) = dropout(ff(norm(H + a(H)))),
  ff(x) = W2 f(W1 x + b1) + b2 with f the sigmoid GELU. Dropout acts only at
  the ends of the two branches. With `recompute`, the branches are wrapped
  in `tf.recompute_grad` during training: their activations are recomputed
  in the backward pass instead of stored. The dropout seed is drawn outside
  the recomputed function and the masks are stateless, so the recomputed
  forward is identical to the first.

  Args:
    num_heads: attention heads.
    attention: keyword arguments of `SparseSelfAttention` other than
      num_heads and output_initializer (pattern, mode, stride, ...).
    ff_multiplier: width of the feed-forward hidden layer relative to the
      model width (4, or 0.5 for the paper's half-size layers).
    dropout: dropout rate at the end of each branch.
    num_layers: layers N of the model; W2 and W_p are initialised with
      scale sqrt(1 / (2N)).
    recompute: recompute the branches in the backward pass.
    seed: seed of the dropout masks.
    **kwargs: `keras.layers.Layer` arguments.

  Call arguments:
    x: (batch, n, width).
    training: whether dropout and recomputation are active.
    key_lengths: None or int32 (batch,): the attention ignores keys at
      positions >= key_lengths[b] (right padding).

  Returns:
    (batch, n, width).
  """

  def __init__(self, num_heads: int, attention: Optional[dict] = None,
               ff_multiplier: float = 4.0, dropout: float = 0.0,
               num_layers: int = 1, recompute: bool = False,
               seed: Optional[int] = None, **kwargs):
    super().__init__(**kwargs)
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if ff_multiplier <= 0:
      raise ValueError(f"ff_multiplier must be positive, got "
                       f"{ff_multiplier}")
    if num_layers < 1:
      raise ValueError(f"num_layers must be positive, got {num_layers}")
    self.num_heads = num_heads
    self.attention_config = dict(attention or {})
    self.ff_multiplier = ff_multiplier
    self.dropout = dropout
    self.num_layers = num_layers
    self.recompute = recompute
    self.seed = seed
    self.seed_generator = keras.random.SeedGenerator(seed)
    self.attention = SparseSelfAttention(
        num_heads, output_initializer=residual_initializer(num_layers),
        name="attention", dtype=self.dtype_policy, **self.attention_config)
    self.supports_jit = self.attention.supports_jit

  def build(self, input_shape):
    width = input_shape[-1]
    hidden = max(1, int(round(width * self.ff_multiplier)))
    self.attention_norm = keras.layers.LayerNormalization(
        epsilon=1e-5, name="attention_norm", dtype=self.dtype_policy)
    self.ff_norm = keras.layers.LayerNormalization(
        epsilon=1e-5, name="ff_norm", dtype=self.dtype_policy)
    self.ff_in = keras.layers.Dense(hidden, activation=sigmoid_gelu,
                                    name="ff_in", dtype=self.dtype_policy)
    self.ff_out = keras.layers.Dense(
        width, kernel_initializer=residual_initializer(self.num_layers),
        name="ff_out", dtype=self.dtype_policy)
    for layer in (self.attention_norm, self.ff_norm, self.attention,
                  self.ff_in):
      layer.build(input_shape)
    self.ff_out.build(tuple(input_shape[:-1]) + (hidden,))

  def _branches(self, x, seed, rate, key_lengths):
    """a(H) + b(H) for x = H; seed: int32 [2] of the dropout masks."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    a = self.attention(self.attention_norm(x), key_lengths=key_lengths)
    # (batch, n, width)
    b = self.ff_out(self.ff_in(self.ff_norm(x + a)))
    if rate > 0:
      a = tf.nn.experimental.stateless_dropout(a, rate, seeds[0])
      b = tf.nn.experimental.stateless_dropout(b, rate, seeds[1])
    return a + b

  def call(self, x, training=False, key_lengths=None):
    rate = self.dropout if training else 0.0
    if rate > 0:
      seed = self.seed_generator.next()
      seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
    else:
      seed = tf.zeros([2], tf.int32)
    # The seed and lengths are bound here, not passed: recompute_grad
    # watches every argument, and an int32 one makes it warn "The dtype of
    # the watched tensor must be floating" at every step.
    branches = functools.partial(self._branches, seed=seed, rate=rate,
                                 key_lengths=key_lengths)
    if self.recompute and training:
      return x + tf.recompute_grad(branches)(x)
    return x + branches(x)

  def decode_step(self, x, position, cache: tuple, attended: tuple):
    """The block at one new position (inference: no dropout).

    Args:
      x: (batch, width) input at `position`.
      position: int32 scalar tensor.
      cache: the attention's (keys, values) cache.
      attended: see `SparseSelfAttention.decode_step`.

    Returns:
      (output (batch, width), updated cache).
    """
    a, cache = self.attention.decode_step(self.attention_norm(x), position,
                                          cache, attended)
    b = self.ff_out(self.ff_in(self.ff_norm(x + a)))
    return x + a + b, cache

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    config = super().get_config()
    config.update(num_heads=self.num_heads, attention=self.attention_config,
                  ff_multiplier=self.ff_multiplier, dropout=self.dropout,
                  num_layers=self.num_layers, recompute=self.recompute,
                  seed=self.seed)
    return config
