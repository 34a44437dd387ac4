"""What a training run shows and records as it goes.

`TrainingLog` is the trainer's one place for progress and TensorBoard: the
scalars are written at the run's step (the number of batches trained on,
which continues across resumes), so the curves of a resumed run extend the
earlier ones instead of starting over at 0; and the progress it prints
counts the steps that will run, not Keras' `steps_per_epoch`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

LOG = logging.getLogger("st_keras.train")


def scalar(value) -> float:
  """A log value (a tensor, or shape [1] under multi-worker) as a float."""
  return float(np.asarray(value).reshape(-1)[0])


class TrainingLog(keras.callbacks.Callback):
  """Progress lines or bars, and TensorBoard scalars, by the run's step.

  TensorBoard (under `log_dir`, as Keras' TensorBoard callback lays it
  out): `train/` gets `batch_loss` every `log_every` steps, and `train/` and
  `validation/` get `epoch_<metric>` at the end of every checkpoint
  interval (Keras' "epoch"), plus `epoch_learning_rate` in `train/`; every
  value at the run's step.

  Progress: on a terminal, a bar per interval whose target is the steps
  that interval will run; otherwise a line every `log_every` steps and one
  per interval with its metrics.

  Args:
    step: returns the run's step after the current batch (the
      checkpointing callback counts the batches; it runs before this one).
    last: the step at which the run stops.
    every: steps per checkpoint interval.
    log_every: steps between loss lines and `batch_loss` scalars (0: none).
    log_dir: the TensorBoard directory, or None for none.
    interactive: draw bars (a terminal) rather than print lines.

  Example:

  ```python
  log = TrainingLog(lambda: checkpointer.step, last=1000, every=100,
                    log_every=50, log_dir="runs/x/logs", interactive=False)
  model.fit(..., callbacks=[checkpointer, log], verbose=0)
  ```
  """

  def __init__(self, step: Callable[[], int], last: int, every: int,
               log_every: int = 0, log_dir: Optional[str] = None,
               interactive: bool = False):
    super().__init__()
    self._step = step
    self.last = last
    self.every = every
    self.log_every = log_every
    self.interactive = interactive
    self._writers = None
    if log_dir is not None:
      self._writers = {part: tf.summary.create_file_writer(
          os.path.join(log_dir, part)) for part in ("train", "validation")}
    self._bar = None
    self._interval_start = None
    self._interval_time = None

  def _write(self, part: str, values: dict, step: int) -> None:
    if self._writers is None or not values:
      return
    with self._writers[part].as_default():
      for name, value in values.items():
        tf.summary.scalar(name, value, step=step)
    self._writers[part].flush()

  def on_epoch_begin(self, epoch, logs=None):
    start = self._step()
    self._interval_start = start
    self._interval_time = time.perf_counter()
    if self.interactive:
      target = max(1, min(self.every, self.last - start))
      print(f"steps {start + 1}-{start + target} of {self.last}")
      self._bar = keras.utils.Progbar(target, stateful_metrics=None)

  def on_train_batch_end(self, batch, logs=None):
    step = self._step()
    loss = scalar((logs or {}).get("loss", np.nan))
    if self._bar is not None:
      self._bar.update(step - self._interval_start, [("loss", loss)])
    if self.log_every and step % self.log_every == 0:
      self._write("train", {"batch_loss": loss}, step)
      if not self.interactive:
        LOG.info("step %d/%d: loss %.4f", step, self.last, loss)

  def on_epoch_end(self, epoch, logs=None):
    step = self._step()
    values = {k: scalar(v) for k, v in (logs or {}).items()}
    train = {f"epoch_{k}": v for k, v in values.items()
             if not k.startswith("val_")}
    valid = {f"epoch_{k[4:]}": v for k, v in values.items()
             if k.startswith("val_")}
    learning_rate = getattr(self.model.optimizer, "learning_rate", None)
    if learning_rate is not None:
      train["epoch_learning_rate"] = scalar(learning_rate)
    self._write("train", train, step)
    self._write("validation", valid, step)
    seconds = time.perf_counter() - self._interval_time
    LOG.info("step %d/%d (%d steps in %.1f s): %s", step, self.last,
             step - self._interval_start, seconds, " ".join(
                 f"{k} {v:.4f}" for k, v in values.items()))
    self._bar = None

  def on_train_end(self, logs=None):
    if self._writers is not None:
      for writer in self._writers.values():
        writer.close()
