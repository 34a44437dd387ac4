"""tf.data pipelines of byte windows: random crops to train, contiguous
windows to evaluate."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# The byte before the first of a fixed-length sequence (an image): its
# inputs start with it, so every byte of the sequence is predicted, and
# sampling a sequence starts from it.
START_BYTE = 0


def _check(data: np.ndarray, context: int, batch_size: int,
           name: str) -> np.ndarray:
  data = np.asarray(data)
  if data.ndim != 1 or data.dtype != np.uint8:
    raise ValueError(f"{name} must be a 1-D uint8 array of bytes, got "
                     f"{data.dtype} with shape {data.shape}")
  if context < 1 or batch_size < 1:
    raise ValueError(f"context and batch_size must be positive, got "
                     f"{context} and {batch_size}")
  if data.size < context + 1:
    raise ValueError(f"{name} has {data.size} bytes, fewer than one window "
                     f"of context + 1 = {context + 1}")
  return data


def _in_memory(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Prefetches two batches of an in-memory pipeline, with tf.data's
  autotuning off.

  The pipelines here slice arrays already in memory, microseconds per batch,
  so there is nothing to tune. The autotuner costs, though: dropping a
  validation iterator that autotunes, as `fit` does at every evaluation,
  blocked ~9 s on 2 CPU cores once the iterator had lived through a
  checkpoint interval of tens of seconds.

  Args:
    ds: a batched dataset.

  Returns:
    ds, prefetched, with autotuning disabled in its options.
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.prefetch(2).with_options(options)


def _split(window):
  """(context + 1,) uint8 -> inputs (context,) and targets (context,) int32."""
  window = tf.cast(window, tf.int32)
  return window[:-1], window[1:]


def training_windows(data: np.ndarray, context: int, batch_size: int,
                     seed: int, start: int = 0) -> tf.data.Dataset:
  """An endless stream of random crops, a pure function of (seed, index).

  Window i starts at a stateless random offset drawn from (seed, i), so the
  stream can be resumed exactly at any window index `start` (a restored
  training step times the batch size): nothing is lost or repeated.

  Args:
    data: 1-D uint8 bytes.
    context: tokens per example; windows hold context + 1 bytes.
    batch_size: examples per batch.
    seed: the stream's seed.
    start: index of the first window (for resuming).

  Returns:
    A dataset of (inputs, targets), each (batch_size, context) int32, where
    targets are the inputs shifted by one byte.
  """
  data = _check(data, context, batch_size, "data")
  if start < 0:
    raise ValueError(f"start must be >= 0, got {start}")
  tokens = tf.constant(data)
  max_offset = data.size - context  # offsets in [0, max_offset)

  def crop(index):
    offset = tf.random.stateless_uniform(
        [], seed=tf.stack([tf.constant(seed, tf.int64), index]),
        maxval=max_offset, dtype=tf.int64)
    return _split(tf.slice(tokens, [offset], [context + 1]))  # static shape

  return _in_memory(tf.data.Dataset.range(start, np.iinfo(np.int64).max)
                    .map(crop).batch(batch_size, drop_remainder=True))


def evaluation_windows(data: np.ndarray, context: int,
                       batch_size: int) -> tf.data.Dataset:
  """Contiguous non-overlapping windows covering data once, in order.

  Window w holds bytes [w * context, w * context + context + 1); the tail
  that does not fill a window is left out.

  Args:
    data: 1-D uint8 bytes.
    context: tokens per example.
    batch_size: examples per batch (the last batch may be smaller).

  Returns:
    A finite, deterministic dataset of (inputs, targets), (batch, context)
    int32.
  """
  data = _check(data, context, batch_size, "data")
  count = (data.size - 1) // context
  starts = np.arange(count) * context
  windows = data[starts[:, None] + np.arange(context + 1)[None, :]]
  return _in_memory(tf.data.Dataset.from_tensor_slices(windows)
                    .map(_split).batch(batch_size))


def sequence_batches(sequences: np.ndarray, batch_size: int,
                     seed: int | None = None,
                     start: int = 0) -> tf.data.Dataset:
  """Batches of whole fixed-length sequences (images), shifted right.

  The inputs are the sequence shifted right by one with a zero start byte,
  the targets the sequence itself, so every byte is predicted (bits per
  dim over all of them).

  With a seed, epoch e is the permutation of the sequences drawn
  statelessly from (seed, e), so example i of the stream is a pure function
  of (seed, i): the stream resumes exactly at any example index `start`,
  whatever the strategy or the host.

  Args:
    sequences: [N, length] uint8.
    batch_size: examples per batch.
    seed: None for one pass in order (evaluation); else an endless stream
      reshuffled each epoch from this seed (training).
    start: with a seed, the index of the first example (for resuming).

  Returns:
    A dataset of (inputs, targets), (batch, length) int32.
  """
  sequences = np.asarray(sequences)
  if sequences.ndim != 2 or sequences.dtype != np.uint8 or not len(
      sequences):
    raise ValueError(f"sequences must be a non-empty [N, length] uint8 "
                     f"array, got {sequences.dtype} {sequences.shape}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if start < 0:
    raise ValueError(f"start must be >= 0, got {start}")

  def shift(sequence):
    sequence = tf.cast(sequence, tf.int32)
    return tf.concat([[START_BYTE], sequence[:-1]], 0), sequence

  if seed is None:
    ds = tf.data.Dataset.from_tensor_slices(sequences)
  else:
    table, count = tf.constant(sequences), len(sequences)

    def epoch_order(epoch):
      keys = tf.random.stateless_uniform(
          [count], seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
      return tf.data.Dataset.from_tensor_slices(tf.argsort(keys))  # (N,)

    ds = (tf.data.Dataset.range(start // count, np.iinfo(np.int64).max)
          .flat_map(epoch_order).skip(start % count)
          .map(lambda index: tf.gather(table, index)))  # (length,)
  return _in_memory(ds.map(shift).batch(batch_size,
                                       drop_remainder=seed is not None))
