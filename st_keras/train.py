"""Training with `model.fit` under a distribution strategy, with exact resume.

`train(config)` builds the strategy (MirroredStrategy over the local
devices, or MultiWorkerMirroredStrategy when TF_CONFIG is set), the data,
the model and AdamW (linear warm-up then cosine decay, global gradient
clipping, weight decay), then runs `model.fit` in chunks of
`train.checkpoint_every` steps. A checkpoint (model, optimizer and the
count of batches seen) is written after every chunk and when the run is
interrupted (SIGINT or SIGTERM, acted on at the end of a batch); a restarted
run restores its newest intact checkpoint and continues with the batch that
comes next, since training batch i is a pure function of (seed, i).

The run directory is one trainer's at a time (a lock), keeps the config it
was started with, and never holds a checkpoint of non-finite weights: a
diverging run stops with an error and keeps its last good checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from st_keras import checkpoints
from st_keras import cli_types
from st_keras import config as config_lib
from st_keras import data as data_lib
from st_keras import models
from st_keras import run_control
from st_keras import run_dir
from st_keras import sample as sample_lib
from st_keras import training_log

LOG = logging.getLogger("st_keras.train")
# Checkpoints kept on disk: the newest and one before it, to fall back on.
MAX_TO_KEEP = 2


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


def make_datasets(cfg: config_lib.Config, arrays: dict, global_batch: int,
                  start_step: int) -> tuple:
  """(training stream starting at batch start_step, validation batches)."""
  seed, context = cfg.train.seed, cfg.data.context
  if data_lib.kinds.get(cfg.data.kind).image_shape is not None:
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
  image_shape = data_lib.kinds.get(cfg.data.kind).image_shape
  if kwargs["embedding_axes"] is None and image_shape is not None:
    kwargs["embedding_axes"] = list(image_shape)
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


def train(cfg: config_lib.Config, stop_after: Optional[int] = None,
          allow_config_change: bool = False) -> dict:
  """Trains (or resumes) a run and evaluates it.

  The run directory is locked for the whole call (`run_dir.RunLock`), a
  resumed run must have the config it was started with (but for
  train.steps), and it resumes from its newest intact checkpoint
  (`checkpoints.restore_newest_intact`).

  Args:
    cfg: the run's config.
    stop_after: stop (with a checkpoint) after this many steps of this
      invocation; a later call with the same config continues the run.
    allow_config_change: resume even when cfg differs from the run's saved
      config (the differences are logged).

  Returns:
    A summary dict: steps (batches trained on), updates (optimizer updates
    applied: fewer than steps when a mixed_float16 loss scaler skipped
    some), the held-out metric (named by `metric`: bits_per_byte or
    bits_per_dim) as valid_bits_per_byte, tokens_per_second (over the timed
    steps: all but the first of each checkpoint interval), median_step_ms
    (of the same steps), output_dir, resumed_from, sample.

  Raises:
    run_dir.RunDirectoryError: another trainer holds the directory, or its
      saved config differs.
    checkpoints.CheckpointError: the run's checkpoints cannot be restored.
    run_control.NonFiniteLossError: training diverged (the last checkpoint
      is kept).
  """
  if stop_after is not None and stop_after < 1:
    raise ValueError(f"stop_after must be >= 1, got {stop_after}")
  keras.mixed_precision.set_global_policy(cfg.train.precision)
  keras.utils.set_random_seed(cfg.train.seed)
  strategy = make_strategy(cfg.train.strategy)
  global_batch = cfg.data.batch_size
  if global_batch % strategy.num_replicas_in_sync:
    raise ValueError(f"data.batch_size {global_batch} must be a multiple of "
                     f"the {strategy.num_replicas_in_sync} replicas")
  out_dir = worker_dir(cfg.train.output_dir, strategy)
  with run_dir.RunLock(out_dir):
    changes = run_dir.check_saved_config(out_dir, cfg.to_dict(),
                                         allow_config_change)
    if changes:
      LOG.warning("resuming %s with a changed config: %s", out_dir,
                  "; ".join(changes))
    return _train_locked(cfg, strategy, out_dir, stop_after)


def _train_locked(cfg: config_lib.Config, strategy, out_dir: str,
                  stop_after: Optional[int]) -> dict:
  """`train` once the run directory is locked and its config checked."""
  global_batch = cfg.data.batch_size
  kind = data_lib.kinds.get(cfg.data.kind)
  arrays = kind.load(cfg.data)
  metric_name = kind.metric
  with strategy.scope():
    model = build_model(cfg)
    models.compile_for_training(model, make_optimizer(cfg.train),
                                metric_name)
    model.optimizer.build(model.trainable_variables)
  batches = tf.Variable(0, dtype=tf.int64, trainable=False, name="batches")
  saved = {"model": model, "optimizer": model.optimizer, "batches": batches}
  directory = os.path.join(out_dir, "checkpoints")
  restored = checkpoints.restore_newest_intact(saved, directory,
                                               optional=["batches"])
  if "batches" in restored.absent:  # written before batches were counted
    batches.assign(model.optimizer.iterations)
  resumed_from = int(batches.numpy())
  if restored.step is not None:
    LOG.info("resumed from %s at step %d",
             os.path.join(directory, f"{checkpoints.PREFIX}-{restored.step}"),
             resumed_from)
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(**saved),
                                       directory, max_to_keep=MAX_TO_KEEP)
  run_dir.write_atomically(os.path.join(out_dir, run_dir.CONFIG_FILE),
                           json.dumps(cfg.to_dict(), indent=2))

  last = cfg.train.steps if stop_after is None else min(
      cfg.train.steps, resumed_from + stop_after)
  every = cfg.train.checkpoint_every
  # history.csv: one row per checkpoint interval (step, training and
  # validation metrics), kept on resume, for learning curves.
  history = run_dir.History(os.path.join(out_dir, run_dir.HISTORY_FILE),
                            resumed_from)
  stop = run_control.GracefulStop()
  checkpointer = run_control.IntervalCheckpointer(
      manager, batches, last, history, global_batch * cfg.data.context,
      stop)
  # After the checkpointer, which counts the step this one reports.
  callbacks = [checkpointer, training_log.TrainingLog(
      lambda: checkpointer.step, last, every, cfg.train.log_every,
      os.path.join(out_dir, "logs"), interactive=sys.stdout.isatty())]
  # The training stream starts at the restored batch count.
  train_ds, valid_ds = make_datasets(cfg, arrays, global_batch, resumed_from)
  if resumed_from < last:
    # One fit call; an "epoch" is one checkpoint interval.
    with stop, run_control.frozen_heap():
      try:
        model.fit(train_ds, initial_epoch=resumed_from // every,
                  epochs=resumed_from // every + math.ceil(
                      (last - resumed_from) / every),
                  steps_per_epoch=every, validation_data=valid_ds,
                  validation_steps=cfg.train.eval_batches,
                  callbacks=callbacks,
                  verbose=0)  # TrainingLog shows the progress
        stop.check()  # a signal during the last validation
      except run_control.StopRequested:
        step = checkpointer.save()
        LOG.warning("interrupted at step %d; checkpoint written to %s",
                    step, manager.directory)
        raise
  bits = model.evaluate(valid_ds, verbose=0, return_dict=True)[metric_name]
  model.save(os.path.join(out_dir, "model.keras"))
  sample_path = None
  if cfg.train.sample_bytes > 0 and kind.is_text:
    sample_path = os.path.join(out_dir, "sample.txt")
    write_text_sample(model, arrays["valid"], cfg.train.sample_bytes,
                      cfg.train.seed, sample_path)
  summary = {"steps": checkpointer.step, "metric": metric_name,
             "updates": int(model.optimizer.iterations.numpy()),
             "valid_bits_per_byte": bits,
             "tokens_per_second": checkpointer.tokens_per_second(),
             "median_step_ms": checkpointer.median_step_ms(),
             "output_dir": out_dir,
             "resumed_from": resumed_from, "sample": sample_path}
  run_dir.write_atomically(os.path.join(out_dir, "summary.json"),
                           json.dumps(summary, indent=2))
  return summary


def configure_logging() -> None:
  """Prints the st_keras loggers' INFO lines to stderr, each once.

  The package's logger gets a handler of its own and, like TensorFlow's
  (which has its own), stops propagating to the root logger: a handler
  there (logging.basicConfig, which a library's first module-level
  logging.info() call installs) would print every line a second time.
  """
  logger = logging.getLogger("st_keras")
  if not logger.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  for name in ("st_keras", "tensorflow"):
    logging.getLogger(name).propagate = False


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`st-train --config X.yaml [--override section.key=value ...]`.

  Exit status: 0 when the run finished, 1 when training diverged (the last
  finite checkpoint is kept), 2 for a bad config or an unusable run
  directory, 130 when interrupted (a checkpoint is written).
  """
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True,
                      help="YAML config file, or a shipped config's name: "
                      + ", ".join(config_lib.shipped()))
  parser.add_argument("--override", action="append", default=[],
                      metavar="SECTION.KEY=VALUE",
                      help="change one config value (repeatable)")
  parser.add_argument("--stop-after", type=cli_types.positive_int,
                      metavar="STEPS",
                      help="checkpoint and stop after this many steps; run "
                      "again to continue")
  parser.add_argument("--allow-config-change", action="store_true",
                      help="resume a run whose saved config.json differs "
                      "from this config (other than train.steps)")
  args = parser.parse_args(argv)
  configure_logging()
  try:
    cfg = config_lib.load(args.config, args.override)
  except (OSError, KeyError, TypeError, ValueError) as e:
    parser.error(e.args[0] if isinstance(e, KeyError) else str(e))
  try:
    summary = train(cfg, stop_after=args.stop_after,
                    allow_config_change=args.allow_config_change)
  except KeyboardInterrupt:
    print(f"interrupted; run the same command to resume from "
          f"{cfg.train.output_dir}", file=sys.stderr)
    return 130
  except (run_dir.RunDirectoryError, checkpoints.CheckpointError) as e:
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return 2
  except run_control.NonFiniteLossError as e:
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(summary, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
