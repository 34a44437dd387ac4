"""Training with `model.fit` under a distribution strategy, with exact resume.

`train(config)` builds the strategy (MirroredStrategy over the local
devices, or MultiWorkerMirroredStrategy when TF_CONFIG is set), the data,
the model and AdamW (linear warm-up then cosine decay, global gradient
clipping, weight decay), then runs `model.fit` in chunks of
`train.checkpoint_every` steps. A checkpoint (model, optimizer and step) is
written after every chunk and when the run is interrupted (SIGINT or
SIGTERM); a restarted run restores it and continues with the batch that
comes next, since training batch i is a pure function of (seed, i).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from st_keras import config as config_lib
from st_keras import data as data_lib
from st_keras import models
from st_keras import sample as sample_lib

LOG = logging.getLogger("st_keras.train")
IMAGE_AXES = {"cifar10": (32, 32, 3), "imagenet64": (64, 64, 3)}


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
  """The distribution strategy of a run.

  Args:
    name: 'auto' (multi-worker when TF_CONFIG is set, mirrored over the
      local GPUs when there are several, else the default strategy),
      'mirrored', 'multi_worker' or 'none' (default strategy). One device
      gains nothing from mirroring, and its distributed datasets cost: the
      mirrored strategy's multi-device iterator over the validation set
      takes tens of seconds to shut down after every evaluation on CPU.

  Returns:
    A `tf.distribute.Strategy`.
  """
  if name == "auto":
    if os.environ.get("TF_CONFIG"):
      name = "multi_worker"
    elif len(tf.config.list_logical_devices("GPU")) > 1:
      name = "mirrored"
    else:
      name = "none"
  if name == "multi_worker":
    if not os.environ.get("TF_CONFIG"):
      raise ValueError("train.strategy=multi_worker needs the TF_CONFIG "
                       "environment variable (cluster and task)")
    return tf.distribute.MultiWorkerMirroredStrategy()
  if name == "mirrored":
    return tf.distribute.MirroredStrategy()
  if name == "none":
    return tf.distribute.get_strategy()
  raise ValueError(f"unknown strategy {name!r}; use one of "
                   f"{config_lib.STRATEGIES}")


def _holdout(stream: np.ndarray, fraction: float, context: int) -> dict:
  """Splits a byte stream: the last `fraction` (at least one window) is
  held out."""
  valid = max(int(stream.size * fraction), context + 1)
  if stream.size - valid < context + 1:
    raise ValueError(f"{stream.size} bytes are too few for a training and a "
                     f"validation window of context {context}")
  return {"train": stream[:-valid], "valid": stream[-valid:]}


def load_data(cfg: config_lib.DataConfig) -> dict:
  """Reads the run's bytes.

  Returns:
    {'train', 'valid'}: 1-D uint8 streams (text, audio) or [N, length]
    uint8 sequences (images).
  """
  if cfg.kind == "text":
    data_lib.text.check_separator(cfg.separator, "data.separator")
    if cfg.path is None:
      return data_lib.text.stdlib_splits(separator=cfg.separator)
    return _holdout(data_lib.text.read_bytes(cfg.path, cfg.separator),
                    cfg.valid_fraction, cfg.context)
  if cfg.path is None:
    raise ValueError(f"data.path is required for data.kind={cfg.kind}")
  if cfg.kind == "enwik8":
    return data_lib.text.enwik8_splits(cfg.path)
  if cfg.kind == "audio":
    return _holdout(data_lib.audio.read_audio(cfg.path), cfg.valid_fraction,
                    cfg.context)
  if cfg.kind == "cifar10":
    return {"train": data_lib.images.read_cifar10(cfg.path, "train")[0],
            "valid": data_lib.images.read_cifar10(
                cfg.valid_path or cfg.path, "test")[0]}
  if cfg.valid_path is None:
    raise ValueError("data.valid_path (the validation .npz batches) is "
                     "required for data.kind=imagenet64")
  return {"train": data_lib.images.read_imagenet64(cfg.path),
          "valid": data_lib.images.read_imagenet64(cfg.valid_path)}


def held_out_file_starts(cfg: config_lib.DataConfig,
                         valid: np.ndarray) -> np.ndarray:
  """Where each file (document) begins in a text run's held-out bytes.

  Args:
    cfg: the run's data config (kind text or enwik8).
    valid: `load_data(cfg)['valid']`.

  Returns:
    Ascending int64 offsets into valid, the first 0: with data.path, the
    files under it that begin inside the held-out tail; enwik8 is one text.

  Raises:
    ValueError: data.kind is not a text kind.
  """
  if cfg.kind == "enwik8":
    return np.zeros([1], np.int64)
  if cfg.kind != "text":
    raise ValueError(f"held-out files are defined for text runs, not "
                     f"data.kind={cfg.kind}")
  if cfg.path is None:
    return data_lib.text.stdlib_valid_bounds(separator=cfg.separator)[:-1]
  bounds = data_lib.text.file_bounds(cfg.path, cfg.separator)
  starts = bounds[:-1] - (bounds[-1] - valid.size)  # valid is the tail
  return np.concatenate([[0], starts[starts > 0]]).astype(np.int64)


def make_datasets(cfg: config_lib.Config, arrays: dict, global_batch: int,
                  start_step: int) -> tuple:
  """(training stream starting at batch start_step, validation batches)."""
  seed, context = cfg.train.seed, cfg.data.context
  if cfg.data.kind in IMAGE_AXES:
    length = arrays["train"].shape[1]
    if context != length:
      raise ValueError(f"data.context must be the image length {length} "
                       f"for {cfg.data.kind}, got {context}")
    train = data_lib.sequence_batches(arrays["train"], global_batch,
                                      seed=seed,
                                      start=start_step * global_batch)
    valid = data_lib.sequence_batches(arrays["valid"], global_batch)
  else:
    train = data_lib.training_windows(arrays["train"], context, global_batch,
                                      seed, start=start_step * global_batch)
    valid = data_lib.evaluation_windows(arrays["valid"], context,
                                        global_batch)
  return train, valid


def build_model(cfg: config_lib.Config) -> models.SparseTransformer:
  """The run's model (built, not compiled)."""
  kwargs = dataclasses.asdict(cfg.model)
  if kwargs["embedding_axes"] is None and cfg.data.kind in IMAGE_AXES:
    kwargs["embedding_axes"] = list(IMAGE_AXES[cfg.data.kind])
  model = models.SparseTransformer(seq_len=cfg.data.context,
                                   seed=cfg.train.seed, **kwargs)
  model.build()
  return model


def make_optimizer(cfg: config_lib.TrainConfig) -> keras.optimizers.AdamW:
  """AdamW with linear warm-up to the learning rate, then cosine decay to
  zero at the last step; global gradient clipping."""
  warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
  schedule = keras.optimizers.schedules.CosineDecay(
      initial_learning_rate=0.0, decay_steps=max(1, cfg.steps - warmup),
      warmup_target=cfg.learning_rate, warmup_steps=warmup)
  return keras.optimizers.AdamW(
      learning_rate=schedule, weight_decay=cfg.weight_decay,
      beta_1=cfg.beta_1, beta_2=cfg.beta_2, global_clipnorm=cfg.clipnorm)


@contextlib.contextmanager
def _interrupt_on_sigterm():
  """Turns SIGTERM into KeyboardInterrupt so a killed job checkpoints."""
  def handler(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
  try:
    previous = signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread: leave signals alone
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _frozen_heap():
  """Keeps the objects alive now out of the garbage collector's passes.

  TensorFlow and Keras hold millions of long-lived Python objects; a full
  collection walks all of them and, during `fit`, lands inside whichever
  training step triggers it. Freezing them (after one collection) leaves
  the passes only the objects made while training.
  """
  gc.collect()
  gc.freeze()
  try:
    yield
  finally:
    gc.unfreeze()


def worker_dir(output_dir: str, strategy) -> str:
  """Where this process writes: output_dir for the chief (or a single
  process), output_dir/workers/<task> for the other workers (multi-worker
  checkpointing needs every worker to write, each to its own place)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  task_type = getattr(resolver, "task_type", None)
  if not task_type:
    return output_dir
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  if task_type == "chief" or (not has_chief and task_type == "worker" and
                              resolver.task_id == 0):
    return output_dir
  return os.path.join(output_dir, "workers",
                      f"{task_type}_{resolver.task_id}")


class StepHistory(keras.callbacks.CSVLogger):
  """`CSVLogger` whose rows also carry the optimizer step at the end of the
  interval, so rows of resumed runs (whose epoch indices restart at the
  resumed interval) still place exactly on a learning curve.

  Args:
    path: the CSV file; appended to when it exists.
  """

  def __init__(self, path: str):
    super().__init__(path, append=True)

  def on_epoch_end(self, epoch, logs=None):
    step = int(self.model.optimizer.iterations.numpy())
    super().on_epoch_end(epoch, {**(logs or {}), "step": step})


class StepCheckpointer(keras.callbacks.Callback):
  """Saves a checkpoint at the end of every epoch (checkpoint interval),
  stops training at step `last`, and times the training steps.

  Args:
    manager: the run's `tf.train.CheckpointManager`.
    last: the step at which to stop.
    tokens_per_step: tokens in one global batch.
    log_every: log the step and loss every this many steps (0: never).
  """

  def __init__(self, manager, last: int, tokens_per_step: int,
               log_every: int = 0):
    super().__init__()
    self.manager = manager
    self.last = last
    self.tokens_per_step = tokens_per_step
    self.log_every = log_every
    self.step_seconds, self._start = [], None

  def save(self) -> int:
    """Writes a checkpoint at the current step and returns the step."""
    step = int(self.model.optimizer.iterations.numpy())
    self.manager.save(checkpoint_number=step)
    return step

  def on_train_batch_begin(self, batch, logs=None):
    self._start = time.perf_counter()

  def on_train_batch_end(self, batch, logs=None):
    step = int(self.model.optimizer.iterations.numpy())
    if batch > 0:  # the first step of an epoch includes tracing/warm-up
      self.step_seconds.append(time.perf_counter() - self._start)
    if self.log_every and step % self.log_every == 0:
      LOG.info("step %d: loss %.4f", step, (logs or {}).get("loss", math.nan))
    if step >= self.last:
      self.model.stop_training = True

  def on_epoch_end(self, epoch, logs=None):
    self.save()

  def tokens_per_second(self) -> float:
    """Training throughput over the timed steps (NaN if none)."""
    if not self.step_seconds:
      return math.nan
    return len(self.step_seconds) * self.tokens_per_step / sum(
        self.step_seconds)

  def median_step_ms(self) -> float:
    """The median time of the timed steps in ms (NaN if none): unlike the
    mean, it is not moved by the stalls of a shared machine."""
    if not self.step_seconds:
      return math.nan
    return 1e3 * float(np.median(self.step_seconds))


def write_text_sample(model, valid: np.ndarray, length: int, seed: int,
                      path: str) -> bytes:
  """Continues the first bytes of the validation text and writes prompt and
  continuation to `path`.

  Returns:
    The bytes written.
  """
  prompt = valid[:max(1, min(64, model.seq_len // 4))]
  length = min(length, model.seq_len - prompt.size)
  out = sample_lib.generate(model, prompt[None], length, temperature=0.8,
                            seed=seed)[0].tobytes()
  with open(path, "wb") as f:
    f.write(out)
  return out


def train(cfg: config_lib.Config, stop_after: Optional[int] = None) -> dict:
  """Trains (or resumes) a run and evaluates it.

  Args:
    cfg: the run's config.
    stop_after: stop (with a checkpoint) after this many steps of this
      invocation; a later call with the same config continues the run.

  Returns:
    A summary dict: steps, valid_bits_per_byte, tokens_per_second (over
    the timed steps: all but the first of each checkpoint interval),
    median_step_ms (of the same steps), output_dir, resumed_from, sample.
  """
  keras.mixed_precision.set_global_policy(cfg.train.precision)
  keras.utils.set_random_seed(cfg.train.seed)
  strategy = make_strategy(cfg.train.strategy)
  global_batch = cfg.data.batch_size
  if global_batch % strategy.num_replicas_in_sync:
    raise ValueError(f"data.batch_size {global_batch} must be a multiple of "
                     f"the {strategy.num_replicas_in_sync} replicas")
  arrays = load_data(cfg.data)
  metric_name = ("bits_per_dim" if cfg.data.kind in IMAGE_AXES else
                 "bits_per_byte")
  out_dir = worker_dir(cfg.train.output_dir, strategy)
  os.makedirs(out_dir, exist_ok=True)
  with strategy.scope():
    model = build_model(cfg)
    models.compile_for_training(model, make_optimizer(cfg.train),
                                metric_name)
    model.optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
  manager = tf.train.CheckpointManager(
      checkpoint, os.path.join(out_dir, "checkpoints"), max_to_keep=2)
  resumed_from = 0
  if manager.latest_checkpoint:
    checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    resumed_from = int(model.optimizer.iterations.numpy())
    LOG.info("resumed from %s at step %d", manager.latest_checkpoint,
             resumed_from)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg.to_dict(), f, indent=2)

  last = cfg.train.steps if stop_after is None else min(
      cfg.train.steps, resumed_from + stop_after)
  every = cfg.train.checkpoint_every
  checkpointer = StepCheckpointer(manager, last,
                                  global_batch * cfg.data.context,
                                  cfg.train.log_every)
  # history.csv: one row per checkpoint interval (step, training and
  # validation metrics), appended to on resume, for learning curves.
  callbacks = [checkpointer, StepHistory(os.path.join(out_dir, "history.csv")),
               keras.callbacks.TensorBoard(os.path.join(out_dir, "logs"),
                                           update_freq=10)]
  # The training stream starts at the restored step.
  train_ds, valid_ds = make_datasets(cfg, arrays, global_batch, resumed_from)
  if resumed_from < last:
    # One fit call; an "epoch" is one checkpoint interval.
    with _interrupt_on_sigterm(), _frozen_heap():
      try:
        model.fit(train_ds, initial_epoch=resumed_from // every,
                  epochs=resumed_from // every + math.ceil(
                      (last - resumed_from) / every),
                  steps_per_epoch=every, validation_data=valid_ds,
                  validation_steps=cfg.train.eval_batches,
                  callbacks=callbacks,
                  # A progress bar on a terminal, a line per epoch in logs.
                  verbose=1 if sys.stdout.isatty() else 2)
      except KeyboardInterrupt:
        step = checkpointer.save()
        LOG.warning("interrupted at step %d; checkpoint written to %s",
                    step, manager.directory)
        raise
  step = int(model.optimizer.iterations.numpy())
  bits = model.evaluate(valid_ds, verbose=0, return_dict=True)[metric_name]
  model.save(os.path.join(out_dir, "model.keras"))
  sample_path = None
  if cfg.train.sample_bytes > 0 and cfg.data.kind in ("text", "enwik8"):
    sample_path = os.path.join(out_dir, "sample.txt")
    write_text_sample(model, arrays["valid"], cfg.train.sample_bytes,
                      cfg.train.seed, sample_path)
  summary = {"steps": step, "valid_bits_per_byte": bits,
             "tokens_per_second": checkpointer.tokens_per_second(),
             "median_step_ms": checkpointer.median_step_ms(),
             "output_dir": out_dir,
             "resumed_from": resumed_from, "sample": sample_path}
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`st-train --config X.yaml [--override section.key=value ...]`."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="YAML config file")
  parser.add_argument("--override", action="append", default=[],
                      metavar="SECTION.KEY=VALUE",
                      help="change one config value (repeatable)")
  parser.add_argument("--stop-after", type=int, metavar="STEPS",
                      help="checkpoint and stop after this many steps; run "
                      "again to continue")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
  try:
    cfg = config_lib.load(args.config, args.override)
  except (OSError, KeyError, TypeError, ValueError) as e:
    parser.error(str(e))
  try:
    summary = train(cfg, stop_after=args.stop_after)
  except KeyboardInterrupt:
    print(f"interrupted; run the same command to resume from "
          f"{cfg.train.output_dir}", file=sys.stderr)
    return 130
  print(json.dumps(summary, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
