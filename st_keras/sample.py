"""Autoregressive sampling from a SparseTransformer, and the `st-sample` CLI.

`generate` decodes with a key/value cache: each new position runs one step
per layer that attends only its sparse set of cached keys
(`SparseTransformer.decode_step`), inside one `tf.while_loop`.
`generate(..., use_cache=False)` recomputes the whole window for every byte:
the exact reference the cached decoder is checked against. Both draw byte p
with the stateless seed (seed, p), so they sample the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import sys
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from st_keras import run_dir
from st_keras.data import kinds


def _is_real(value) -> bool:
  """Whether `value` is a real number (bools are not)."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
  """Whether `value` is an integer (bools are not)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
  """Checks the sampling arguments (see `filter_logits`).

  Raises:
    ValueError, naming the first bad argument: temperature is not a finite
      positive number, top_k not an int >= 0, or top_p not in (0, 1].
  """
  if not (_is_real(temperature) and math.isfinite(temperature)
          and temperature > 0):
    raise ValueError(f"temperature must be a finite number > 0, got "
                     f"{temperature!r}")
  if not (_is_int(top_k) and top_k >= 0):
    raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
  if not (_is_real(top_p) and 0.0 < top_p <= 1.0):
    raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def filter_logits(logits, temperature=1.0, top_k: int = 0,
                  top_p: float = 1.0):
  """Temperature, top-k and nucleus (top-p) filtering.

  Args:
    logits: [batch, vocab] logits.
    temperature: positive float or float32 scalar tensor.
    top_k: keep the k largest logits (0: all).
    top_p: keep the smallest prefix of the sorted distribution whose mass
      reaches top_p (at least one entry).

  Returns:
    [batch, vocab] float32 logits; filtered entries are -inf.
  """
  if not isinstance(temperature, tf.Tensor):
    check_sampling_args(temperature, top_k, top_p)
  logits = tf.cast(logits, tf.float32) / temperature
  vocab = logits.shape[-1]
  if 0 < top_k < vocab:
    kth = tf.math.top_k(logits, top_k).values[:, -1:]
    logits = tf.where(logits < kth, -np.inf, logits)
  if top_p < 1.0:
    ordered = tf.sort(logits, direction="DESCENDING")
    probs = tf.nn.softmax(ordered)
    before = tf.cumsum(probs, axis=-1, exclusive=True)
    cutoff = tf.reduce_min(tf.where(before < top_p, ordered, np.inf),
                           axis=-1, keepdims=True)
    logits = tf.where(logits < cutoff, -np.inf, logits)
  return logits


def draw(logits, position, seed, temperature=1.0, top_k: int = 0,
         top_p: float = 1.0):
  """Samples one token per row for `position` with the seed (seed, position).

  Returns:
    (batch,) int32 tokens.
  """
  seeds = tf.stack([tf.cast(seed, tf.int64), tf.cast(position, tf.int64)])
  return tf.random.stateless_categorical(
      filter_logits(logits, temperature, top_k, top_p), 1, seed=seeds,
      dtype=tf.int32)[:, 0]


def cached_sample(model, prompt, length, temperature, seed, top_k: int = 0,
                  top_p: float = 1.0):
  """The graph of cached generation (used by `generate` and the export).

  The prompt is fed through the same per-position steps (which fills the
  caches), then each sampled byte is fed back.

  Args:
    model: a built `SparseTransformer`.
    prompt: int32 [batch, p] tensor, p >= 1.
    length: int32 scalar tensor; p + length <= model.seq_len + 1 (the last
      byte is drawn from the logits of position seq_len - 1 and never fed
      back).
    temperature: float32 scalar tensor (> 0).
    seed: int64 scalar tensor.
    top_k, top_p: see `filter_logits` (Python values).

  Returns:
    int32 [batch, p + length]: the prompts and their continuations.
  """
  prompt = tf.convert_to_tensor(prompt, tf.int32)
  batch, p = tf.shape(prompt)[0], tf.shape(prompt)[1]
  total = p + length
  columns = tf.TensorArray(tf.int32, size=total, element_shape=[None])
  columns = columns.write(0, prompt[:, 0])

  def body(t, caches, columns):
    logits, caches = model.decode_step(columns.read(t), t, caches)
    sampled = draw(logits, t + 1, seed, temperature, top_k, top_p)
    given = prompt[:, tf.minimum(t + 1, p - 1)]
    columns = columns.write(t + 1, tf.where(t + 1 < p, given, sampled))
    return t + 1, caches, columns

  _, _, columns = tf.while_loop(
      lambda t, *_: t < total - 1, body,
      (tf.constant(0), model.initial_cache(batch), columns))
  return tf.transpose(columns.stack())  # (batch, total)


@tf.function
def cached_logits(model, tokens):
  """Logits of every position by cached decoding (the check of the cache).

  Args:
    model: a built `SparseTransformer`.
    tokens: int32 [batch, n'] with n' <= model.seq_len.

  Returns:
    float32 [batch, n', vocab], equal to `model(tokens)` to tolerance.
  """
  tokens = tf.convert_to_tensor(tokens, tf.int32)
  logits = tf.TensorArray(tf.float32, size=tf.shape(tokens)[1])

  def body(t, caches, logits):
    step, caches = model.decode_step(tokens[:, t], t, caches)
    return t + 1, caches, logits.write(t, step)

  _, _, logits = tf.while_loop(
      lambda t, *_: t < tf.shape(tokens)[1], body,
      (tf.constant(0), model.initial_cache(tf.shape(tokens)[0]), logits))
  return tf.transpose(logits.stack(), [1, 0, 2])


def _check_generate_args(model, prompt: np.ndarray, length: int) -> None:
  """Checks the prompt and length of `generate`.

  p + length may reach seq_len + 1: the last byte is drawn from the logits
  at position seq_len - 1 and is not fed back (a whole image after its
  start byte).

  Raises:
    ValueError, naming the argument: prompt is not a non-empty [batch, p]
      array of tokens in 0..vocab_size - 1, or length is not an int >= 0
      with p + length <= seq_len + 1.
  """
  if prompt.ndim != 2 or prompt.shape[0] < 1 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be [batch, p] with batch, p >= 1, got "
                     f"shape {prompt.shape}")
  if not np.issubdtype(prompt.dtype, np.integer):
    raise ValueError(f"prompt tokens must be integers, got dtype "
                     f"{prompt.dtype}")
  if prompt.min() < 0 or prompt.max() >= model.vocab_size:
    raise ValueError(f"prompt tokens must be in 0..{model.vocab_size - 1}")
  if not (_is_int(length) and length >= 0):
    raise ValueError(f"length must be an int >= 0, got {length!r}")
  if prompt.shape[1] + int(length) > model.seq_len + 1:
    raise ValueError(f"prompt ({prompt.shape[1]}) + length ({length}) must "
                     f"fit the context {model.seq_len} + 1 (the last byte "
                     f"is drawn, never read)")


def generate(model, prompt: np.ndarray, length: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: Optional[int] = None, use_cache: bool = True
             ) -> np.ndarray:
  """Samples `length` bytes after each prompt.

  Args:
    model: a `SparseTransformer`.
    prompt: [batch, p] ints in 0..vocab_size - 1 (p >= 1).
    length: bytes to generate; p + length <= model.seq_len + 1.
    temperature, top_k, top_p: see `filter_logits`.
    seed: seed of the sampler (0 when None).
    use_cache: decode with the key/value cache (else one full forward per
      byte, the reference).

  Returns:
    [batch, p + length] uint8: the prompts and their continuations.
  """
  prompt = np.asarray(prompt)
  _check_generate_args(model, prompt, length)
  check_sampling_args(temperature, top_k, top_p)
  seed = 0 if seed is None else int(seed)
  if use_cache:
    # One traced loop per model and filter, reused by later calls.
    samplers = model.__dict__.setdefault("_st_keras_samplers", {})
    if (top_k, top_p) not in samplers:
      samplers[top_k, top_p] = tf.function(
          lambda *args: cached_sample(model, *args, top_k=top_k, top_p=top_p))
    out = samplers[top_k, top_p](
        tf.constant(prompt, tf.int32), tf.constant(length, tf.int32),
        tf.constant(temperature, tf.float32), tf.constant(seed, tf.int64))
    return out.numpy().astype(np.uint8)

  @tf.function
  def next_token(tokens, position):
    # Causal: the zeros after `position` do not change its logits.
    logits = model(tokens, training=False)[:, position - 1]
    return draw(logits, position, seed, temperature, top_k, top_p)

  total = prompt.shape[1] + length
  # One column more than the model reads: the last byte is only drawn.
  tokens = np.zeros((prompt.shape[0], model.seq_len + 1), np.int32)
  tokens[:, :prompt.shape[1]] = prompt
  for position in range(prompt.shape[1], total):
    tokens[:, position] = next_token(tf.constant(tokens[:, :-1]),
                                     tf.constant(position)).numpy()
  return tokens[:, :total].astype(np.uint8)


# ----------------------------------------------------------------------------
# CLI.

def _run_kind(model_path: str) -> str:
  """The data kind of the run that wrote `model_path` (its config.json)."""
  config = os.path.join(os.path.dirname(os.path.abspath(model_path)),
                        run_dir.CONFIG_FILE)
  if not os.path.exists(config):
    return "text"
  with open(config) as f:
    return json.load(f)["data"]["kind"]


def _prompt(args, model, kind: str) -> np.ndarray:
  """The prompt rows [batch, p] from the CLI arguments.

  Without a prompt, an image starts from its start byte, audio from
  silence (mu-law 128) and text from a 0 byte.
  """
  if args.prompt_image:
    import matplotlib.image  # pylint: disable=import-outside-toplevel
    image = matplotlib.image.imread(args.prompt_image)
    if image.dtype != np.uint8:
      image = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    rows, cols, channels = model.embedding_axes
    image = image[..., :channels]
    if image.shape != (rows, cols, channels):
      raise ValueError(f"--prompt-image must be {rows}x{cols} with "
                       f"{channels} channels, got shape {image.shape}")
    data = np.concatenate([[kinds.START_BYTE],
                           image[:args.prompt_rows].reshape(-1)])
  elif args.prompt_file:
    with open(args.prompt_file, "rb") as f:
      data = np.frombuffer(f.read(), np.uint8)
  else:
    data = np.frombuffer(args.prompt.encode("utf-8"), np.uint8)
  if data.size == 0:  # the kind's own start
    data = np.array([kinds.get(kind).start_byte], np.uint8)
  return np.tile(data[None], (args.batch, 1))


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`st-sample --model RUN/model.keras --length N [--prompt TEXT] ...`."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True,
                      help="a model.keras written by st-train")
  parser.add_argument("--length", type=int, required=True,
                      help="bytes to generate after the prompt; prompt + "
                      "length may be the context + 1 (an image model's "
                      "whole image after its start byte)")
  source = parser.add_mutually_exclusive_group()
  source.add_argument("--prompt", default="", help="text prompt")
  source.add_argument("--prompt-file", help="file whose bytes are the prompt")
  source.add_argument("--prompt-image",
                      help="PNG whose first --prompt-rows rows are the prompt")
  parser.add_argument("--prompt-rows", type=int, default=8)
  parser.add_argument("--batch", type=int, default=1,
                      help="samples drawn for the same prompt")
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top-k", type=int, default=0)
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--kind", choices=kinds.NAMES,
                      help="data kind (default: the run's)")
  parser.add_argument("--output", required=True,
                      help=".txt/.bin for bytes, .png for images, .wav for "
                      "audio")
  parser.add_argument("--no-cache", action="store_true",
                      help="recompute the full forward pass for every byte")
  args = parser.parse_args(argv)
  if args.prompt_image and kinds.get(
      args.kind or _run_kind(args.model)).image_shape is None:
    parser.error("--prompt-image needs an image model (--kind cifar10 or "
                 "imagenet64)")
  if args.batch < 1:
    parser.error(f"--batch must be >= 1, got {args.batch}")
  import keras  # pylint: disable=import-outside-toplevel

  from st_keras import models  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  model = keras.models.load_model(args.model)
  kind = args.kind or _run_kind(args.model)
  try:
    prompt = _prompt(args, model, kind)
    tokens = generate(model, prompt, args.length, args.temperature,
                      args.top_k, args.top_p, args.seed,
                      use_cache=not args.no_cache)
  except ValueError as e:
    parser.error(str(e))
  kinds.get(kind).write(tokens, args.output,
                        getattr(model, "embedding_axes", None))
  print(f"wrote {tokens.shape[0]} x {tokens.shape[1]} bytes to {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
