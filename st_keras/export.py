"""SavedModel export for TensorFlow Serving, and the `st-export` CLI.

The exported graph has three serving signatures:

- `score(tokens, lengths)`: per-sequence bits per byte and per-position
  log-probabilities of a batch of byte sequences;
- `next_token(tokens, lengths)`: logits of the byte after each context;
- `generate(prompt, length, temperature, seed)`: sampled continuations,
  decoded with the key/value cache inside one `tf.while_loop`.

By default attention runs on the pure-TensorFlow path, so the graph holds
stock TensorFlow ops only and a stock `tensorflow_model_server` loads it;
custom gradients are not exported. `custom_op=True` keeps the fused op in
`score` and `next_token`; such a SavedModel needs a server with the op
library linked in.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from typing import Optional, Sequence
import uuid
import zipfile

import tensorflow as tf

from st_keras import models
from st_keras import sample

SIGNATURES = ("score", "next_token", "generate")


def serving_model(model: models.SparseTransformer,
                  implementation: str = "pure_tf"
                  ) -> models.SparseTransformer:
  """A copy of `model` (same weights) whose attention uses `implementation`.

  Args:
    model: a built `SparseTransformer`.
    implementation: 'pure_tf' (stock ops) or 'custom_op'.

  Returns:
    A built `SparseTransformer`.
  """
  config = dict(model.get_config(), attention_implementation=implementation)
  clone = models.SparseTransformer.from_config(config)
  clone.build()
  clone.set_weights(model.get_weights())
  return clone


def _with_rank(*tensors):
  """Runtime rank checks of signature inputs (a served signature does not
  check shapes itself); the error names the input."""
  return [tf.ensure_shape(t, t.shape) for t in tensors]


def _checked(tensor, checks):
  """`tensor` once every assertion in `checks` has passed."""
  with tf.control_dependencies(checks):
    return tf.identity(tensor)


def _byte_checks(tokens, name: str, vocab: int) -> list:
  return [
      tf.debugging.assert_positive(
          tf.size(tokens), message=f"{name}: the batch is empty"),
      tf.debugging.assert_non_negative(
          tokens, message=f"{name}: tokens must be in 0..{vocab - 1}"),
      tf.debugging.assert_less(
          tokens, vocab, message=f"{name}: tokens must be in 0..{vocab - 1}"),
  ]


class ServingModule(tf.Module):
  """The exported functions around a `SparseTransformer`.

  Args:
    model: a built `SparseTransformer` (see `serving_model`).
  """

  def __init__(self, model: models.SparseTransformer):
    super().__init__(name="sparse_transformer")
    self.model = model
    sequences = [tf.TensorSpec([None, None], tf.int32, name="tokens"),
                 tf.TensorSpec([None], tf.int32, name="lengths")]
    self.score = tf.function(self._score, input_signature=sequences)
    self.next_token = tf.function(self._next_token,
                                  input_signature=sequences)
    self.generate = tf.function(self._generate, input_signature=[
        tf.TensorSpec([None, None], tf.int32, name="prompt"),
        tf.TensorSpec([], tf.int32, name="length"),
        tf.TensorSpec([], tf.float32, name="temperature"),
        tf.TensorSpec([], tf.int64, name="seed")])

  def _check_batch(self, tokens, lengths, max_width: int, min_length: int):
    """`tokens` and `lengths` once a padded batch has passed its checks.

    Args:
      tokens: (batch, width) int32; sequence b is tokens[b, :lengths[b]].
      lengths: (batch,) int32.
      max_width: the largest allowed width.
      min_length: the smallest allowed length.
    """
    tokens, lengths = _with_rank(tokens, lengths)
    width = tf.shape(tokens)[1]
    checks = _byte_checks(tokens, "tokens", self.model.vocab_size) + [
        tf.debugging.assert_less_equal(
            width, max_width, message=f"tokens: at most {max_width} columns"),
        tf.debugging.assert_equal(
            tf.shape(lengths)[0], tf.shape(tokens)[0],
            message="lengths: one length per row of tokens"),
        tf.debugging.assert_less_equal(
            lengths, width, message="lengths: longer than the tokens row"),
        tf.debugging.assert_greater_equal(
            lengths, min_length,
            message=f"lengths: each must be >= {min_length}"),
    ]
    return _checked(tokens, checks), _checked(lengths, checks)

  def _logits(self, inputs):
    """float32 logits (batch, width, vocab) of inputs (batch, width <= n)."""
    n = self.model.seq_len
    # Causal: the zeros appended after each row change none of its logits.
    padded = tf.pad(inputs, [[0, 0], [0, n - tf.shape(inputs)[1]]])
    padded = tf.ensure_shape(padded, [None, n])
    return self.model(padded, training=False)[:, :tf.shape(inputs)[1]]

  def _score(self, tokens, lengths):
    """Bits per byte of each sequence.

    Args:
      tokens: (batch, width) int32 bytes, width <= seq_len + 1; row b holds
        a sequence of lengths[b] bytes, then padding.
      lengths: (batch,) int32, each >= 2: byte i is scored given bytes < i
        for 1 <= i < lengths[b] (the first byte has no context).

    Returns:
      bits_per_byte: (batch,) float32, mean -log2 p over the scored bytes.
      log_probs: (batch, width - 1) float32, ln p(byte i + 1 | bytes <= i),
        0 past the sequence.
    """
    tokens, lengths = self._check_batch(tokens, lengths,
                                        self.model.seq_len + 1, 2)
    log_probs = -tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tokens[:, 1:], logits=self._logits(tokens[:, :-1]))
    # (batch, width - 1)
    scored = tf.range(1, tf.shape(tokens)[1])[None] < lengths[:, None]
    log_probs = tf.where(scored, log_probs, 0.0)
    bits = -tf.reduce_sum(log_probs, axis=1) / (
        tf.cast(lengths - 1, tf.float32) * math.log(2.0))
    return {"bits_per_byte": bits, "log_probs": log_probs}

  def _next_token(self, tokens, lengths):
    """Logits of the byte after each context.

    Args:
      tokens: (batch, width) int32 bytes, width <= seq_len; row b holds a
        context of lengths[b] >= 1 bytes, then padding.
      lengths: (batch,) int32.

    Returns:
      logits: (batch, vocab) float32.
    """
    tokens, lengths = self._check_batch(tokens, lengths,
                                        self.model.seq_len, 1)
    logits = self._logits(tokens)  # (batch, width, vocab)
    return {"logits": tf.gather(logits, lengths - 1, batch_dims=1)}

  def _generate(self, prompt, length, temperature, seed):
    """Samples `length` bytes after each prompt with the cached decoder.

    Args:
      prompt: (batch, p) int32 bytes, p >= 1.
      length: int32 scalar, p + length <= seq_len + 1 (the last byte is
        drawn, never fed back).
      temperature: float32 scalar, finite and > 0.
      seed: int64 scalar; the same seed gives the same bytes.

    Returns:
      tokens: (batch, p + length) int32, the prompts and continuations.
    """
    model = self.model
    prompt, length, temperature, seed = _with_rank(prompt, length,
                                                   temperature, seed)
    checks = _byte_checks(prompt, "prompt", model.vocab_size) + [
        tf.debugging.assert_non_negative(
            length, message="length: must be >= 0"),
        # Compared as length <= seq_len + 1 - p: prompt + length could
        # overflow.
        tf.debugging.assert_less_equal(
            length, model.seq_len + 1 - tf.shape(prompt)[1],
            message=f"prompt + length: must fit the context {model.seq_len} "
                    f"+ 1 (the last byte is drawn, never read)"),
        tf.debugging.assert_positive(
            temperature, message="temperature: must be finite and > 0"),
        tf.debugging.assert_less(  # fails for inf and NaN
            temperature, math.inf,
            message="temperature: must be finite and > 0"),
    ]
    prompt = _checked(prompt, checks)
    return {"tokens": sample.cached_sample(model, prompt, length,
                                           temperature, seed)}


def export(model: models.SparseTransformer, path: str,
           custom_op: bool = False) -> str:
  """Writes `model` as a SavedModel with the `SIGNATURES`.

  Args:
    model: a built `SparseTransformer`.
    path: the SavedModel directory (TensorFlow Serving reads
      <base>/<version>/: pass such a path).
    custom_op: keep the fused op in `score` and `next_token` (needs a server
      with the op library) instead of stock ops only.

  Returns:
    `path`.
  """
  module = ServingModule(serving_model(
      model, "custom_op" if custom_op else "pure_tf"))
  signatures = {name: getattr(module, name).get_concrete_function()
                for name in SIGNATURES}
  tf.saved_model.save(
      module, path, signatures=signatures,
      options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))
  return path


def export_version(model: models.SparseTransformer, path: str,
                   custom_op: bool = False) -> str:
  """Exports `model` to the new local directory `path`, atomically.

  The SavedModel is written to a hidden directory beside `path` (TensorFlow
  Serving skips it: its name is not a version number), then renamed to
  `path`: a server never sees a half-written version, and of concurrent
  exports to one path exactly one succeeds.

  Args:
    model: a built `SparseTransformer`.
    path: the version directory to create, e.g. BASE/VERSION.
    custom_op: as in `export`.

  Returns:
    `path`.

  Raises:
    FileExistsError: `path` exists, or another export created it meanwhile.
  """
  if os.path.lexists(path):
    raise FileExistsError(f"{path} exists; pick another version")
  parent, name = os.path.split(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  temp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
  try:
    export(model, temp, custom_op=custom_op)
    _rename_new(temp, path)
  finally:
    shutil.rmtree(temp, ignore_errors=True)  # nothing left once renamed
  return path


def _rename_new(source: str, target: str) -> None:
  """Renames the directory `source` to `target`, which must not exist.

  Args:
    source: the directory to rename.
    target: its new path, on the same filesystem.

  Raises:
    FileExistsError: `target` exists (the rename of a directory fails onto a
      file or a non-empty directory).
  """
  try:
    os.rename(source, target)
  except OSError as e:
    if os.path.lexists(target):
      raise FileExistsError(f"{target} exists: another export wrote it "
                            "meanwhile; pick another version") from e
    raise


def _load_model(parser: argparse.ArgumentParser,
                path: str) -> models.SparseTransformer:
  """The `SparseTransformer` in the .keras file `path`.

  Args:
    parser: the CLI's parser, whose `error` reports a bad file.
    path: the --model argument.

  Returns:
    The loaded model.

  Raises:
    SystemExit: (from `parser.error`, naming the path) the file is missing,
      is not a .keras archive or does not hold a `SparseTransformer`.
  """
  if not os.path.exists(path):
    parser.error(f"--model {path}: file not found")
  if not os.path.isfile(path) or not zipfile.is_zipfile(path):
    parser.error(f"--model {path}: could not be read: not a .keras (zip) "
                 "archive")
  import keras  # pylint: disable=import-outside-toplevel
  try:
    model = keras.models.load_model(path)
  except Exception as e:  # pylint: disable=broad-except
    # A damaged archive fails in many ways (KeyError, JSON, HDF5, ...).
    parser.error(f"--model {path}: could not be read as a .keras model: "
                 f"{type(e).__name__}: {e}")
  if not isinstance(model, models.SparseTransformer):
    parser.error(f"--model {path}: holds a {type(model).__name__}, not a "
                 "SparseTransformer")
  return model


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`st-export --model RUN/model.keras --output BASE [--version N]`."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True,
                      help="a model.keras written by st-train")
  parser.add_argument("--output", required=True,
                      help="base directory; the SavedModel goes to "
                      "BASE/VERSION as TensorFlow Serving expects")
  parser.add_argument("--version", type=int, default=1)
  parser.add_argument("--custom-op", action="store_true",
                      help="keep the fused op (the server must link it)")
  args = parser.parse_args(argv)
  if args.version < 1:
    parser.error(f"--version must be >= 1, got {args.version}")
  if os.path.exists(args.output) and not os.path.isdir(args.output):
    parser.error(f"--output {args.output}: exists and is not a directory")
  path = os.path.join(args.output, str(args.version))
  if os.path.lexists(path):
    parser.error(f"{path} exists; pick another --version")
  model = _load_model(parser, args.model)
  try:
    export_version(model, path, custom_op=args.custom_op)
  except OSError as e:  # e.g. FileExistsError: another export won the race
    parser.error(str(e))
  print(f"exported {', '.join(SIGNATURES)} to {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
