"""How a training run stops and saves: signals acted on at a batch end
(`GracefulStop`), checkpoints at every interval that refuse non-finite
weights (`IntervalCheckpointer`), and a garbage collector kept out of the
training steps (`frozen_heap`)."""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from st_keras import run_dir
from st_keras import training_log


class StopRequested(KeyboardInterrupt):
  """A SIGINT or SIGTERM, acted on at the end of a training batch."""


class GracefulStop:
  """While active, SIGINT and SIGTERM ask training to stop at the end of
  the current batch, where the batch count and the weights agree (a
  checkpoint is written there); a second signal interrupts at once.

  Outside the main thread, signals are left alone.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self) -> "GracefulStop":
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        break
    return self

  def _handle(self, signum, frame):
    del frame  # unused
    if self.signum is not None:
      raise KeyboardInterrupt(f"signal {signum}, twice")
    self.signum = signum

  def check(self) -> None:
    """Raises StopRequested if a signal has come."""
    if self.signum is not None:
      raise StopRequested(f"signal {self.signum}")

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


@contextlib.contextmanager
def frozen_heap():
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


class NonFiniteLossError(RuntimeError):
  """Training produced a non-finite loss or weights; nothing was saved."""


class IntervalCheckpointer(keras.callbacks.Callback):
  """Counts the batches, stops at batch `last`, and ends every checkpoint
  interval (epoch) with its history.csv row, then its checkpoint.

  The step of a run is the number of batches it has trained on, counted
  here rather than read from `optimizer.iterations`, which does not advance
  on the steps a mixed_float16 loss scaler skips. The count is saved in
  the checkpoint (`batches`), and the data stream resumes there.

  A non-finite training loss stops the run at once (with a loss scaler,
  which skips such steps, only non-finite weights do), and no checkpoint is
  ever written from non-finite weights, so the last checkpoint stays the
  last good one.

  Args:
    manager: the run's `tf.train.CheckpointManager`.
    batches: the checkpointed int64 variable holding the batch count.
    last: the batch count at which to stop.
    history: the run's `run_dir.History`.
    tokens_per_step: tokens in one global batch.
    stop: a `GracefulStop` checked after every batch, or None.
  """

  def __init__(self, manager, batches: tf.Variable, last: int,
               history: run_dir.History, tokens_per_step: int,
               stop: Optional[GracefulStop] = None):
    super().__init__()
    self.stop = stop
    self.manager = manager
    self.batches = batches
    self.step = int(batches.numpy())
    self.last = last
    self.history = history
    self.tokens_per_step = tokens_per_step
    self.step_seconds, self._start = [], None

  def _check_finite(self, loss: Optional[float] = None) -> None:
    """Raises NonFiniteLossError when the weights are not finite, or the
    batch's loss (if given) is not and no loss scaler skips such steps."""
    scaled = isinstance(self.model.optimizer,
                        keras.optimizers.LossScaleOptimizer)
    if loss is not None and not math.isfinite(loss) and not scaled:
      problem = f"loss {loss}"
    elif not all(bool(tf.reduce_all(tf.math.is_finite(w)))
                 for w in self.model.trainable_weights):
      problem = "non-finite weights"
    else:
      return
    raise NonFiniteLossError(
        f"training diverged at step {self.step} ({problem}); stopped "
        f"without writing a checkpoint. The last checkpoint "
        f"({self.manager.latest_checkpoint}) holds finite weights: lower "
        f"train.learning_rate (or raise train.warmup_steps) and resume from "
        f"it with --allow-config-change, or start a new run")

  def save(self) -> int:
    """Writes a checkpoint at the current step and returns the step.

    Raises:
      NonFiniteLossError: the weights are not finite (nothing is written).
    """
    self._check_finite()
    self.batches.assign(self.step)
    self.manager.save(checkpoint_number=self.step)
    return self.step

  def on_train_batch_begin(self, batch, logs=None):
    self._start = time.perf_counter()

  def on_train_batch_end(self, batch, logs=None):
    self.step += 1
    if batch > 0:  # the first step of an epoch includes tracing/warm-up
      self.step_seconds.append(time.perf_counter() - self._start)
    loss = training_log.scalar((logs or {}).get("loss", 0.0))
    if not math.isfinite(loss):
      self._check_finite(loss)
    if self.step >= self.last:
      self.model.stop_training = True
    if self.stop is not None:
      self.stop.check()

  def on_epoch_end(self, epoch, logs=None):
    self._check_finite()
    # The row first: a kill between the two leaves a row past the last
    # checkpoint, which the resumed run drops (run_dir.History).
    self.history.append(self.step, {k: training_log.scalar(v)
                                    for k, v in (logs or {}).items()})
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
