"""Padding for the attention layers: the length a layout is built for, inputs
padded to it, and the key lengths that right-padding arguments (Keras masks,
a key-padding attention_mask, key_lengths) agree on."""

from __future__ import annotations

import functools
from typing import Optional

import tensorflow as tf


def layout_length(length: Optional[int], block_size: int,
                  max_length: Optional[int]) -> int:
  """The sequence length a layout is built for.

  Args:
    length: the static length of the inputs, or None when it is only known
      when the graph runs.
    block_size: the layout's tile size.
    max_length: the length to pad to when `length` is None.

  Returns:
    `length` rounded up to a multiple of block_size, or max_length.

  Raises:
    ValueError: length is None and max_length is None, or length exceeds
      max_length.
  """
  if length is None:
    if max_length is None:
      raise ValueError(
          "the sequence length is not known when the layer is traced (e.g. "
          "Input(shape=(None, width)) under model.fit): give max_length= "
          "to pad every batch to one layout, or feed batches whose length "
          "is static")
    return max_length
  if max_length is not None and length > max_length:
    raise ValueError(f"sequence length {length} exceeds max_length "
                     f"{max_length}")
  return -(-length // block_size) * block_size


def pad_to_length(x, axis: int, length: int, message: str):
  """Pads `x` with zeros along `axis` to a static `length`.

  Args:
    x: a tensor whose `axis` is at most `length` long.
    axis: the axis to pad.
    length: its length after padding.
    message: the error when `axis` is longer (checked when run if the axis
      is not static).

  Returns:
    (padded x, n): n is the original length, an int when static, else an
    int32 scalar tensor.
  """
  n = x.shape[axis]
  if n == length:
    return x, n
  if n is None:
    n = tf.shape(x)[axis]
    with tf.control_dependencies([tf.debugging.assert_less_equal(
        n, length, message=message)]):
      n = tf.identity(n)
  pad = [[0, 0]] * x.shape.rank
  pad[axis] = [0, length - n]
  shape = x.shape.as_list()
  shape[axis] = length
  return tf.ensure_shape(tf.pad(x, pad), shape), n


def lengths_from_mask(mask, name: str):
  """Per-example lengths of a right-padding mask.

  Args:
    mask: (batch, n) bool or 0/1: True for the first positions of each
      example, then False.
    name: the mask's name in the error message.

  Returns:
    int32 (batch,) number of True positions.

  Raises:
    tf.errors.InvalidArgumentError: (when run) a True follows a False (left
      or inner padding).
  """
  mask = tf.cast(mask, tf.bool)
  lengths = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)
  check = tf.debugging.assert_equal(
      mask, tf.sequence_mask(lengths, tf.shape(mask)[1]),
      message=f"{name} must be right padding: True for each example's "
      "first positions, then False")
  with tf.control_dependencies([check]):
    return tf.identity(lengths)


def key_lengths_of(key_lengths, attention_mask, masks):
  """The int32 (batch,) key lengths all the padding arguments agree on.

  Args:
    key_lengths: None or (batch,) ints.
    attention_mask: None, (batch, S) or (batch, 1, S): a key-padding mask.
    masks: Keras masks (batch, S) of the inputs, each None or a mask.

  Returns:
    int32 (batch,) or None when nothing pads.
  """
  found = []
  if key_lengths is not None:
    key_lengths = tf.convert_to_tensor(key_lengths)
    if not key_lengths.dtype.is_integer or key_lengths.shape.rank != 1:
      raise ValueError(f"key_lengths must be integers of shape (batch,), "
                       f"got {key_lengths.dtype.name} {key_lengths.shape}")
    found.append(tf.cast(key_lengths, tf.int32))
  if attention_mask is not None:
    attention_mask = tf.convert_to_tensor(attention_mask)
    rank = attention_mask.shape.rank
    if rank == 3 and attention_mask.shape[1] == 1:
      attention_mask = attention_mask[:, 0]
    elif rank != 2:
      raise ValueError(
          f"attention_mask must be a key-padding mask of shape (batch, S) "
          f"or (batch, 1, S), got {attention_mask.shape}: the keys each "
          f"query attends are the layout's pattern (st_keras.layouts), "
          f"so a per-query (batch, T, S) mask cannot be honoured")
    found.append(lengths_from_mask(attention_mask, "attention_mask"))
  # Keras passes the input's one mask as query_mask and value_mask alike.
  distinct = {id(m): m for m in masks if m is not None}
  found.extend(lengths_from_mask(m, "the Keras mask")
               for m in distinct.values())
  if not found:
    return None
  return functools.reduce(tf.minimum, found)
