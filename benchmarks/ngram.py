"""Byte n-gram baselines: how many bits per byte a few bytes of context buy.

A model's held-out bits per byte are put in scale by count-based n-gram
models fitted on the same training bytes: order 1 sees no context, order 2
the byte before, order k the k - 1 bytes before. A transformer that scores
no better than order k uses, in effect, no more than k - 1 bytes of
context, however long its window.
"""

from __future__ import annotations

import numpy as np

VOCAB = 256
ALPHA = 0.05  # the additive smoothing of the baselines


def _codes(data: np.ndarray, order: int) -> np.ndarray:
  """The n-grams of data as ints: byte i..i+order-1 in base 256.

  Args:
    data: 1-D uint8 bytes.
    order: n-gram length, 1..7 (the code must fit in int64).

  Returns:
    (len(data) - order + 1,) int64.
  """
  data = data.astype(np.int64)
  count = data.size - order + 1
  codes = np.zeros(count, np.int64)
  for i in range(order):
    codes = codes * VOCAB + data[i:i + count]
  return codes


def _counts(table: np.ndarray, queries: np.ndarray) -> np.ndarray:
  """How often each query occurs in table (int64 codes)."""
  values, counts = np.unique(table, return_counts=True)
  index = np.clip(np.searchsorted(values, queries), 0, values.size - 1)
  return np.where(values[index] == queries, counts[index], 0)


def ngram_bits(train: np.ndarray, valid: np.ndarray, order: int,
               alpha: float = ALPHA) -> float:
  """Held-out bits per byte of an add-alpha byte n-gram model.

  p(b | c) = (count(c b) + alpha) / (count(c) + 256 alpha), counted on
  train, with c the order - 1 bytes before b. The first order - 1 bytes of
  valid, which lack a full context, are not scored.

  Args:
    train: 1-D uint8 training bytes.
    valid: 1-D uint8 held-out bytes, longer than order.
    order: n-gram length, 1..7.
    alpha: additive smoothing, > 0.

  Returns:
    Mean -log2 p over the scored bytes of valid.
  """
  if not 1 <= order <= 7:
    raise ValueError(f"order must be in 1..7, got {order}")
  if alpha <= 0:
    raise ValueError(f"alpha must be positive, got {alpha}")
  if min(train.size, valid.size) <= order:
    raise ValueError(f"train ({train.size} bytes) and valid ({valid.size} "
                     f"bytes) must be longer than order {order}")
  grams, queries = _codes(train, order), _codes(valid, order)
  # A context's count: its occurrences followed by a byte, i.e. the n-grams
  # it begins.
  joint = _counts(grams, queries)
  context = _counts(grams // VOCAB, queries // VOCAB)
  p = (joint + alpha) / (context + VOCAB * alpha)
  return float(-np.log2(p).mean())
