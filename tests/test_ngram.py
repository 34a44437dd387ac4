"""benchmarks/ngram.py against a dictionary-count reference in float64."""

import collections
import math

import numpy as np
import pytest

from benchmarks import ngram


def reference_bits(train, valid, order, alpha):
  """-mean log2 of add-alpha n-gram probabilities, counted with dicts."""
  train, valid = train.tolist(), valid.tolist()
  joint = collections.Counter(tuple(train[i:i + order])
                              for i in range(len(train) - order + 1))
  context = collections.Counter()
  for gram, count in joint.items():
    context[gram[:-1]] += count
  total = 0.0
  scored = range(order - 1, len(valid))
  for i in scored:
    gram = tuple(valid[i - order + 1:i + 1])
    p = (joint[gram] + alpha) / (context[gram[:-1]] + 256 * alpha)
    total -= math.log2(p)
  return total / len(scored)


def markov_bytes(rng, size):
  """Bytes 0..15 where, but for 10% noise, byte i is byte i - 1 plus the
  parity of byte i - 2: one byte of context leaves two choices, two leave
  one."""
  out = np.empty(size, np.uint8)
  out[:2] = rng.integers(0, 16, 2)
  for i in range(2, size):
    out[i] = ((out[i - 1] + out[i - 2] % 2) % 16 if rng.random() < 0.9
              else rng.integers(0, 16))
  return out


@pytest.mark.parametrize("order", [1, 2, 3, 5])
@pytest.mark.parametrize("alpha", [0.05, 1.0])
def test_ngram_bits_match_dictionary_counts(order, alpha):
  rng = np.random.default_rng(order * 10 + int(alpha * 100))
  train, valid = markov_bytes(rng, 3001), markov_bytes(rng, 517)
  got = ngram.ngram_bits(train, valid, order, alpha)
  assert got == pytest.approx(reference_bits(train, valid, order, alpha),
                              rel=1e-12)


def test_context_lowers_bits_on_markov_data():
  rng = np.random.default_rng(0)
  train, valid = markov_bytes(rng, 20000), markov_bytes(rng, 2000)
  bits = [ngram.ngram_bits(train, valid, order) for order in (1, 2, 3)]
  # Each byte is mostly a function of the two before it.
  assert bits[0] > bits[1] + 1.5 and bits[1] > bits[2] + 0.5


@pytest.mark.parametrize("kwargs, message", [
    ({"order": 0}, "order must be in 1..7"),
    ({"order": 8}, "order must be in 1..7"),
    ({"order": 2, "alpha": 0.0}, "alpha must be positive"),
    ({"order": 6}, "must be longer than order 6"),
])
def test_ngram_bits_reject_bad_arguments(kwargs, message):
  rng = np.random.default_rng(1)
  train = rng.integers(0, 256, 100, dtype=np.uint8)
  valid = rng.integers(0, 256, 6, dtype=np.uint8)
  with pytest.raises(ValueError, match=message):
    ngram.ngram_bits(train, valid, **kwargs)
