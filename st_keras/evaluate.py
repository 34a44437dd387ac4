"""Evaluation of a trained run: held-out bits, the context sweep, the
position profile.

- `held_out_bits`: bits per byte (per dim for images) over the whole
  held-out set, in the windows the trainer evaluates.
- `context_sweep`: the paper's Table 3, bits per byte of the same scored
  bytes as the evaluation context grows.
- `position_profile`: mean bits per byte by bands of positions of whole
  training-length windows.

`st-eval --run RUN_DIR` prints them as JSON:

  st-eval --run runs/demo [--model PATH] [--contexts 512,1024,2048]
      [--profile] [--output result.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from st_keras import cli_types
from st_keras import config as config_lib
from st_keras import data
from st_keras import run_dir as run_dir_lib
from st_keras.data import kinds

BATCH = 4  # windows per forward pass


@dataclasses.dataclass
class Run:
  """A trained run, loaded.

  Attributes:
    model: its SparseTransformer.
    config: its `config.Config` (from config.json).
    splits: `kinds.load(config.data)`: {'train', 'valid'}.
  """
  model: object
  config: config_lib.Config
  splits: dict

  @property
  def valid(self) -> np.ndarray:
    """The held-out bytes."""
    return self.splits["valid"]

  @property
  def kind(self) -> kinds.DataKind:
    """The run's data kind."""
    return kinds.get(self.config.data.kind)


def load_run(run_dir: str, model_path: Optional[str] = None) -> Run:
  """Loads a trained run's model, config and data.

  Args:
    run_dir: an output directory of `st-train` (config.json, model.keras).
    model_path: the model to load instead of run_dir/model.keras.

  Returns:
    The `Run`.

  Raises:
    FileNotFoundError: config.json or the model is missing.
  """
  config_path = os.path.join(run_dir, run_dir_lib.CONFIG_FILE)
  model_path = model_path or os.path.join(run_dir, "model.keras")
  for path in (config_path, model_path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} does not exist")
  with open(config_path) as f:
    cfg = config_lib.from_dict(json.load(f))
  return Run(keras.models.load_model(model_path), cfg, kinds.load(cfg.data))


def _stream(valid: np.ndarray, name: str) -> np.ndarray:
  """valid, checked to be a 1-D byte stream (not whole images)."""
  if valid.ndim != 1:
    raise ValueError(f"{name} needs a stream of bytes (text or audio), not "
                     f"whole images of shape {valid.shape}")
  return valid


def held_out_bits(model, valid: np.ndarray, batch: int = BATCH) -> dict:
  """Bits per byte (per dim) of the whole held-out set.

  The windows are the trainer's validation windows: contiguous windows of
  the model's context covering a stream once (`evaluation_windows`), or
  every whole sequence of an image set, shifted right after the start byte
  (`sequence_batches`).

  Args:
    model: a SparseTransformer.
    valid: the held-out bytes: 1-D uint8, or [N, length] uint8 sequences.
    batch: windows per forward pass.

  Returns:
    {'bits': mean bits over every predicted byte, 'windows': windows read,
    'tokens': bytes predicted}.
  """
  if batch < 1:
    raise ValueError(f"batch must be positive, got {batch}")
  if valid.ndim == 1:
    windows = data.evaluation_windows(valid, model.seq_len, batch)
  else:
    windows = data.sequence_batches(valid, batch)

  @tf.function
  def nats(x, y):  # (batch, n) int32 each -> (batch,)
    return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
        y, model(x)), axis=1)

  total, count, tokens = 0.0, 0, 0
  for x, y in windows:
    total += float(nats(x, y).numpy().astype(np.float64).sum())
    count += int(x.shape[0])
    tokens += int(np.prod(y.shape))
  return {"bits": total / tokens / math.log(2.0), "windows": count,
          "tokens": tokens}


def segment_ends(size: int, window: int, segments: int,
                 starts=None) -> np.ndarray:
  """Ends (exclusive) of evenly spread held-out segments.

  Args:
    size: held-out bytes.
    window: bytes a segment reads before its end (the longest context + 1).
    segments: how many ends.
    starts: None, or where each held-out file begins: then only ends whose
      whole window [end - window, end) lies inside one file.

  Returns:
    int64 [segments], ascending.

  Raises:
    ValueError: fewer possible ends than segments.
  """
  bounds = np.append(np.zeros([1], np.int64) if starts is None else
                     np.asarray(starts, np.int64), size)
  first, last = bounds[:-1] + window, bounds[1:]  # ends e in [first, last]
  keep = last >= first
  first, counts = first[keep], (last - first + 1)[keep]
  if counts.sum() < segments:
    where = "within one held-out file" if starts is not None else ""
    raise ValueError(f"{counts.sum()} segment ends of {window} bytes "
                     f"{where}, fewer than segments={segments}")
  rank = np.linspace(0, counts.sum() - 1, segments).astype(np.int64)
  before = np.cumsum(counts) - counts  # ends in the files before each
  part = np.searchsorted(before, rank, side="right") - 1
  return first[part] + rank - before[part]


def context_sweep(model, valid, contexts: list, scored: int, segments: int,
                  batch: int = BATCH, starts=None, full_windows: bool = False,
                  separator: Optional[int] = None) -> dict:
  """Bits per byte of the last positions of windows of growing context.

  For segment end e (exclusive) and context c, the model reads bytes
  [e-c-1, e-1) and is scored on its predictions of bytes [e-k, e), k =
  scored: the same bytes for every c.

  Args:
    model: a trained SparseTransformer.
    valid: held-out bytes, 1-D uint8.
    contexts: evaluation contexts, each <= model.seq_len and >= scored.
    scored: k, the scored positions at the end of each window.
    segments: segment ends, spread evenly over valid.
    batch: windows per forward pass.
    starts: None, or where each held-out file begins in valid: then only
      segments whose longest window lies inside one file, so that all the
      context a longer window adds is the scored bytes' own file.
    full_windows: False: the model reads a window of c bytes, so a longer
      context also moves the scored bytes to later positions. True: it
      reads windows of n = model.seq_len bytes whose last c are the scored
      bytes' own context and whose first n - c are the start of another
      segment's window (the segment half the segments away), like a
      training window that crosses into a new file. Every c then scores
      the same bytes at the same positions with as many keys, and only how
      much of the window is the scored bytes' own text differs.
    separator: with full_windows, None: the other segment's bytes run
      straight into the scored bytes' own; a byte (the run's
      data.separator): it replaces the last byte before them, as where a
      training window crosses into the next file.

  Returns:
    {'bits': {str(c): bits per byte}, 'step_se': {str(c): the standard
    error of bits(c) - bits(the context before c) over the segments, for
    every c but the first}, 'scored_bytes': segments x k, and with
    full_windows 'separator': the separator argument}. The errors are
    paired: both contexts score the same bytes.

  Raises:
    ValueError: a context outside [scored, model.seq_len], or too few
      segment ends.
  """
  valid = _stream(valid, "the context sweep")
  k, n = scored, model.seq_len
  if not 1 <= k <= n:
    raise ValueError(f"scored must be in 1..{n}, got {scored}")
  bad = [c for c in contexts if not k <= c <= n]
  if bad or not contexts:
    raise ValueError(f"contexts must be in {k}..{n} (scored..the model's "
                     f"context), got {list(contexts)}")
  ends = segment_ends(valid.size, n + 1, segments, starts)
  results, step_se, previous = {}, {}, None
  for c in contexts:
    @tf.function
    def scored_nats(x, y):
      logits = model(x)[:, -k:]                    # (batch, k, 256)
      return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
          y[:, -k:], logits), axis=1)              # (batch,)
    rows = sweep_windows(valid, ends, c, n if full_windows else None,
                         separator)
    nats = [scored_nats(rows[s:s + batch, :-1], rows[s:s + batch, 1:]).numpy()
            for s in range(0, ends.size, batch)]
    bits = np.concatenate(nats).astype(np.float64) / (k * math.log(2.0))
    results[str(c)] = float(bits.mean())             # bits: (segments,)
    if previous is not None:
      step_se[str(c)] = float(np.std(bits - previous, ddof=1) /
                              math.sqrt(bits.size))
    previous = bits
  result = {"bits": results, "step_se": step_se,
            "scored_bytes": int(ends.size * k)}
  if full_windows:
    result["separator"] = separator
  return result


def sweep_windows(valid: np.ndarray, ends: np.ndarray, context: int,
                  full: Optional[int] = None,
                  separator: Optional[int] = None) -> np.ndarray:
  """The windows `context_sweep` reads at one context, with their targets.

  Args:
    valid: held-out bytes, 1-D uint8.
    ends: segment ends (exclusive), from `segment_ends` with a window of at
      least full + 1 (or context + 1) bytes.
    context: c, the bytes of each segment's own context.
    full: None: windows of c bytes; else n, for windows of n bytes whose
      first n - c are another segment's (the one half the segments away).
    separator: with full, None or the byte that replaces the last of the
      other segment's bytes.

  Returns:
    int32 [segments, window + 1]: the inputs of each window then its last
    target, so row[:-1] is read and row[1:] predicted; the last targets of
    row i are valid[ends[i] - k:ends[i]] for every context c >= k.
  """
  others = np.roll(ends, ends.size // 2)  # whose windows give the prefixes
  rows = []
  for e, o in zip(ends, others):
    own = valid[e - context - 1:e]                    # c + 1 bytes
    prefix = (valid[o - full - 1:o - context - 1] if full is not None
              else valid[:0])
    if prefix.size and separator is not None:
      prefix = np.append(prefix[:-1], np.uint8(separator))
    rows.append(np.concatenate([prefix, own]))
  return np.stack(rows).astype(np.int32)


def position_profile(model, valid, windows: int, band: int,
                     batch: int = BATCH) -> list:
  """Mean held-out bits per byte over bands of window positions.

  Args:
    model: a trained SparseTransformer.
    valid: its held-out bytes, 1-D uint8.
    windows: how many windows of the training context, spread evenly over
      the held-out bytes.
    band: positions per band; must divide the training context.
    batch: windows per forward pass.

  Returns:
    [training context // band] floats: band b averages positions
    [b * band, (b + 1) * band) over the windows.

  Raises:
    ValueError: band does not divide the context, or windows < 1.
  """
  valid = _stream(valid, "the position profile")
  n = model.seq_len
  if band < 1 or n % band:
    raise ValueError(f"--band must divide the training context {n}, got "
                     f"{band}")
  if windows < 1:
    raise ValueError(f"--windows must be positive, got {windows}")
  starts = np.linspace(0, valid.size - n - 1, windows).astype(np.int64)

  @tf.function
  def nats(x, y):  # (batch, n) int32 each -> (batch, n)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(y, model(x))

  total = np.zeros(n)  # (n,) nats summed over windows
  for first in range(0, windows, batch):
    chunk = starts[first:first + batch]
    x = np.stack([valid[s:s + n] for s in chunk]).astype(np.int32)
    y = np.stack([valid[s + 1:s + n + 1] for s in chunk]).astype(np.int32)
    total += nats(x, y).numpy().sum(0)
  bits = total / windows / math.log(2.0)
  return [float(b) for b in bits.reshape(-1, band).mean(1)]


def evaluate_run(run: Run, contexts: Sequence[int] = (),
                 scored: Optional[int] = None, segments: int = 256,
                 full_windows: bool = False, within_file: bool = False,
                 profile_windows: int = 0, band: int = 512,
                 batch: int = BATCH) -> dict:
  """What `st-eval` reports for a run.

  Args:
    run: a `load_run` result.
    contexts: the sweep's contexts (none: no sweep).
    scored: the sweep's scored bytes per segment (default: the smallest
      context).
    segments: the sweep's segments.
    full_windows, within_file: the sweep in full windows (the run's
      data.separator ending the other segment's bytes); over segments
      inside one held-out file.
    profile_windows: windows of the position profile (0: no profile).
    band: positions per band of the profile.
    batch: windows per forward pass.

  Returns:
    {'kind', 'metric', 'context', 'held_out': `held_out_bits`, and
    'sweep': `context_sweep` plus its 'contexts', 'scored' and 'segments'
    when contexts are given, 'profile': {'windows', 'band', 'bits'} when
    profile_windows > 0}.
  """
  model, valid, data_cfg = run.model, run.valid, run.config.data
  result = {"kind": data_cfg.kind, "metric": run.kind.metric,
            "context": model.seq_len,
            "held_out": held_out_bits(model, valid, batch)}
  if contexts:
    scored = scored or min(contexts)
    starts = (kinds.held_out_file_starts(data_cfg, valid) if within_file
              else None)
    sweep = context_sweep(model, valid, list(contexts), scored, segments,
                          batch, starts=starts, full_windows=full_windows,
                          separator=data_cfg.separator)
    sweep.update(contexts=list(contexts), scored=scored, segments=segments)
    result["sweep"] = sweep
  if profile_windows:
    result["profile"] = {"windows": profile_windows, "band": band,
                         "bits": position_profile(model, valid,
                                                  profile_windows, band,
                                                  batch)}
  return result


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`st-eval --run RUN_DIR [--contexts C,...] [--profile] ...`."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--run", required=True,
                      help="a run directory written by st-train")
  parser.add_argument("--model", help="the model to evaluate (default: "
                      "RUN/model.keras)")
  parser.add_argument("--contexts", type=cli_types.ascending_ints,
                      help="the context sweep (Table 3): comma-separated "
                      "evaluation contexts, ascending, each at most the "
                      "model's context")
  parser.add_argument("--scored", type=cli_types.positive_int,
                      help="bytes scored at the end of each sweep window "
                      "(default: the smallest context)")
  parser.add_argument("--segments", type=cli_types.positive_int,
                      default=256,
                      help="held-out segments of the sweep")
  parser.add_argument("--full-windows", action="store_true",
                      help="sweep in windows of the model's context whose "
                      "first bytes are another segment's")
  parser.add_argument("--within-file", action="store_true",
                      help="sweep only segments inside one held-out file "
                      "(text runs)")
  parser.add_argument("--profile", action="store_true",
                      help="bits by band of window positions")
  parser.add_argument("--windows", type=cli_types.positive_int,
                      default=256,
                      help="windows of the profile")
  parser.add_argument("--band", type=cli_types.positive_int,
                      default=512,
                      help="positions per band of the profile")
  parser.add_argument("--batch", type=cli_types.positive_int,
                      default=BATCH,
                      help="windows per forward pass")
  parser.add_argument("--output", help="JSON file to write (also printed)")
  args = parser.parse_args(argv)
  for flags, needed, given in (
      (("scored", "segments", "full_windows", "within_file"), "--contexts",
       args.contexts),
      (("windows", "band"), "--profile", args.profile)):
    for flag in flags:
      if not given and getattr(args, flag) != parser.get_default(flag):
        parser.error(f"--{flag.replace('_', '-')} needs {needed}")
  if not os.path.isdir(args.run):
    parser.error(f"--run: {args.run} is not a directory")
  try:
    run = load_run(args.run, args.model)
  except FileNotFoundError as e:
    parser.error(f"--{'model' if args.model else 'run'}: {e}")
  if args.contexts and args.contexts[-1] > run.model.seq_len:
    parser.error(f"--contexts: at most the model's context "
                 f"{run.model.seq_len}, got {args.contexts[-1]}")
  if args.scored and args.contexts and args.scored > args.contexts[0]:
    parser.error(f"--scored: at most the smallest context "
                 f"{args.contexts[0]}, got {args.scored}")
  if (args.contexts or args.profile) and run.valid.ndim != 1:
    parser.error(f"--contexts and --profile need a stream of bytes (text "
                 f"or audio), not data.kind={run.config.data.kind}")
  if args.profile and run.model.seq_len % args.band:
    parser.error(f"--band must divide the model's context "
                 f"{run.model.seq_len}, got {args.band}")
  try:
    result = evaluate_run(run, args.contexts or (), args.scored,
                          args.segments, args.full_windows, args.within_file,
                          args.windows if args.profile else 0, args.band,
                          args.batch)
  except ValueError as e:
    parser.error(str(e))
  result.update(run=args.run, model=args.model or os.path.join(
      args.run, "model.keras"))
  text = json.dumps(result, indent=1)
  if args.output:
    with open(args.output, "w") as f:
      f.write(text + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
