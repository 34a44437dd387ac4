"""Factorized position embeddings (the paper's Sec. 5.3 and 7)."""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf


def _digits(positions, axes) -> list:
  """Digits of `positions` (numpy or tensor ints) in the mixed radix of
  `axes`, the last axis fastest: one array per axis."""
  out, place = [], int(np.prod(axes))
  for size in axes:
    place //= size
    out.append((positions // place) % size)
  return out


def text_axes(seq_len: int, stride: int) -> tuple:
  """Embedding axes aligned with a stride l: positions i div l and i mod l.

  Args:
    seq_len: the longest sequence the model sees.
    stride: the attention stride l.

  Returns:
    (ceil(seq_len / stride), stride).
  """
  return (-(-seq_len // stride), stride)


@keras.saving.register_keras_serializable(package="st_keras")
class AxialPositionEmbedding(keras.layers.Layer):
  """Adds a sum of learned embeddings, one per axis of the position.

  Position i of the flattened sequence is written in the mixed radix of
  `axes` (the last axis varies fastest) and the embeddings of its digits are
  summed: images use (rows, columns, channels), text and audio
  (i div l, i mod l) via `text_axes`.

  Args:
    axes: sizes of the axes; their product bounds the sequence length.
    initializer: initializer of the embedding tables.
    **kwargs: `keras.layers.Layer` arguments.

  Call arguments:
    x: (batch, n, width) token embeddings, n <= prod(axes).

  Returns:
    (batch, n, width): x plus the position embedding.
  """

  def __init__(self, axes: Sequence[int], initializer="random_normal",
               **kwargs):
    super().__init__(**kwargs)
    axes = tuple(int(a) for a in axes)
    if not axes or min(axes) < 1:
      raise ValueError(f"axes must be positive sizes, got {axes}")
    self.axes = axes
    self.initializer = keras.initializers.get(initializer)

  def build(self, input_shape):
    width = input_shape[-1]
    self.tables = [
        self.add_weight(name=f"axis_{i}", shape=(size, width),
                        initializer=self.initializer)
        for i, size in enumerate(self.axes)]

  def digits(self, seq_len: int) -> list:
    """The digits of positions 0 .. seq_len - 1, one int array per axis."""
    capacity = int(np.prod(self.axes))
    if seq_len > capacity:
      raise ValueError(f"sequence length {seq_len} exceeds the position "
                       f"embedding's capacity prod{self.axes} = {capacity}")
    return _digits(np.arange(seq_len), self.axes)

  def at(self, position):
    """The embedding of one position: (width,), from an int32 scalar."""
    return tf.add_n([tf.gather(table, digit) for table, digit in
                     zip(self.tables, _digits(position, self.axes))])

  def call(self, x):
    seq_len = x.shape[1]
    if seq_len is None:
      raise ValueError("the sequence axis must be known statically")
    pos = 0
    for table, digit in zip(self.tables, self.digits(seq_len)):
      pos = pos + tf.gather(table, digit)  # (n, width)
    return x + tf.cast(pos, x.dtype)[None]

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    config = super().get_config()
    config.update(axes=list(self.axes),
                  initializer=keras.initializers.serialize(self.initializer))
    return config
