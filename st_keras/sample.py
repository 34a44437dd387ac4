"""Autoregressive sampling from a SparseTransformer.

`generate` recomputes the whole window for every new byte: simple and exact,
the reference that faster decoders are checked against.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf


def filter_logits(logits, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0):
  """Temperature, top-k and nucleus (top-p) filtering of [batch, vocab]
  float32 logits; filtered entries become -inf."""
  if temperature <= 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  if top_k < 0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got {top_k}, "
                     f"{top_p}")
  logits = tf.cast(logits, tf.float32) / temperature
  vocab = logits.shape[-1]
  if 0 < top_k < vocab:
    kth = tf.math.top_k(logits, top_k).values[:, -1:]
    logits = tf.where(logits < kth, -np.inf, logits)
  if top_p < 1.0:
    ordered = tf.sort(logits, direction="DESCENDING")
    probs = tf.nn.softmax(ordered)
    # Keep the smallest prefix whose mass reaches top_p (at least one).
    before = tf.cumsum(probs, axis=-1, exclusive=True)
    cutoff = tf.reduce_min(tf.where(before < top_p, ordered, np.inf),
                           axis=-1, keepdims=True)
    logits = tf.where(logits < cutoff, -np.inf, logits)
  return logits


def generate(model, prompt: np.ndarray, length: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: Optional[int] = None) -> np.ndarray:
  """Samples `length` bytes after `prompt`, one full forward per byte.

  Args:
    model: a `SparseTransformer`.
    prompt: [batch, p] ints in 0..255 (p >= 1).
    length: bytes to generate; p + length <= model.seq_len.
    temperature, top_k, top_p: see `filter_logits`.
    seed: seed of the sampler.

  Returns:
    [batch, p + length] uint8: the prompts and their continuations.
  """
  prompt = np.asarray(prompt)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be [batch, p] with p >= 1, got shape "
                     f"{prompt.shape}")
  if prompt.min() < 0 or prompt.max() >= model.vocab_size:
    raise ValueError(f"prompt tokens must be in 0..{model.vocab_size - 1}")
  total = prompt.shape[1] + length
  if length < 0 or total > model.seq_len:
    raise ValueError(f"prompt ({prompt.shape[1]}) + length ({length}) must "
                     f"fit the context {model.seq_len}")
  tokens = np.zeros((prompt.shape[0], model.seq_len), np.int32)
  tokens[:, :prompt.shape[1]] = prompt
  rng = tf.random.Generator.from_seed(0 if seed is None else seed)

  @tf.function
  def next_token(tokens, position):
    # Causal: the zeros after `position` do not change its logits.
    logits = model(tokens, training=False)[:, position - 1]
    logits = filter_logits(logits, temperature, top_k, top_p)
    return tf.random.stateless_categorical(
        logits, 1, seed=rng.make_seeds(1)[:, 0], dtype=tf.int32)[:, 0]

  for position in range(prompt.shape[1], total):
    tokens[:, position] = next_token(tf.constant(tokens),
                                     tf.constant(position)).numpy()
  return tokens[:, :total].astype(np.uint8)
