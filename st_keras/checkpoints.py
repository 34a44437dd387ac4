"""Training checkpoints that survive kills and corruption.

A run's checkpoints are `<run>/checkpoints/ckpt-<step>` (an .index file and
its data files), numbered by the batches seen at the time, and the
`checkpoint` state file that `tf.train.CheckpointManager` keeps. On resume
`restore_newest_intact` does not trust the state file: it lists the
checkpoints on disk, reads every tensor of the newest one (each is
checksummed) before restoring it, and falls back to the next older one when
a checkpoint is damaged. Damaged checkpoints are moved to
`<run>/checkpoints/damaged/`, never deleted, and what a killed write left
behind (`ckpt-<step>_temp/`, data files without an index) is removed. The
state file is then rewritten to list the checkpoints that remain.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from typing import Dict, List, Optional, Sequence

import tensorflow as tf

LOG = logging.getLogger("st_keras.checkpoints")
PREFIX = "ckpt"
DAMAGED_DIR = "damaged"
_INDEX = re.compile(rf"^{PREFIX}-(\d+)\.index$")
_DATA = re.compile(rf"^{PREFIX}-(\d+)\.data-\d+-of-\d+$")
_TEMP = re.compile(rf"^{PREFIX}-(\d+)_temp$")


class CheckpointError(RuntimeError):
  """No checkpoint of a run can be restored into its model."""


@dataclasses.dataclass
class Restored:
  """What `restore_newest_intact` found.

  Attributes:
    step: the restored checkpoint's number (batches seen), or None when the
      directory holds no checkpoint.
    damaged: the checkpoints that could not be read, as 'name: reason'.
    removed: leftovers of killed writes that were removed.
    absent: the optional objects the restored checkpoint did not hold (it
      was written before they existed); they keep their values.
  """
  step: Optional[int] = None
  damaged: List[str] = dataclasses.field(default_factory=list)
  removed: List[str] = dataclasses.field(default_factory=list)
  absent: List[str] = dataclasses.field(default_factory=list)


def checkpoint_steps(directory: str) -> List[int]:
  """The numbers of the checkpoints in `directory` that have an index file,
  newest first."""
  if not os.path.isdir(directory):
    return []
  found = (_INDEX.match(name) for name in os.listdir(directory))
  return sorted((int(m.group(1)) for m in found if m), reverse=True)


def _remove_partial_writes(directory: str) -> List[str]:
  """Removes `ckpt-N_temp/` directories and data files without an index,
  which only a write killed before its end leaves."""
  indexed = set(checkpoint_steps(directory))
  removed = []
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    data = _DATA.match(name)
    if _TEMP.match(name):
      shutil.rmtree(path, ignore_errors=True)
    elif data and int(data.group(1)) not in indexed:
      os.remove(path)
    else:
      continue
    removed.append(name)
  return removed


def _read_every_tensor(prefix: str) -> List[str]:
  """Reads all of a checkpoint's tensors, which checks their checksums.

  Returns:
    The names of the objects at the top of the checkpoint.

  Raises:
    Whatever TensorFlow raises for a missing, truncated or corrupt file.
  """
  reader = tf.train.load_checkpoint(prefix)
  names = list(reader.get_variable_to_shape_map())
  for name in names:
    reader.get_tensor(name)
  return sorted({name.split("/")[0] for name in names})


def _move_aside(directory: str, step: int) -> None:
  """Moves the files of checkpoint `step` into the damaged/ subdirectory."""
  target = os.path.join(directory, DAMAGED_DIR)
  os.makedirs(target, exist_ok=True)
  stem = f"{PREFIX}-{step}."
  for name in os.listdir(directory):
    if name.startswith(stem):
      os.replace(os.path.join(directory, name), os.path.join(target, name))


def _rewrite_state(directory: str, step: int) -> None:
  """Points the state file at checkpoint `step`, listing it and the older
  ones with their times, so that the run's `tf.train.CheckpointManager`
  deletes the oldest beyond its max_to_keep at its next save."""
  kept = sorted(s for s in checkpoint_steps(directory) if s <= step)
  paths = [os.path.join(directory, f"{PREFIX}-{s}") for s in kept]
  times = [os.path.getmtime(p + ".index") for p in paths]
  tf.compat.v1.train.update_checkpoint_state(
      directory, paths[-1], all_model_checkpoint_paths=paths,
      all_model_checkpoint_timestamps=times,
      last_preserved_timestamp=min(times) - 1.0)


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"


def restore_newest_intact(objects: Dict[str, object], directory: str,
                          optional: Sequence[str] = ()) -> Restored:
  """Restores the newest readable checkpoint of `directory` into `objects`.

  Args:
    objects: what the run's `tf.train.Checkpoint` holds, by name (model,
      optimizer, ...).
    directory: the run's checkpoint directory (may not exist yet).
    optional: names of `objects` that checkpoints written by older versions
      do not hold; every other object must be in the checkpoint.

  Returns:
    A `Restored`; every damaged checkpoint and removed leftover is also
    logged as a warning.

  Raises:
    CheckpointError: checkpoints exist but none can be read, or the newest
      readable one does not fit the model (a run of another model); nothing
      is restored then, and nothing is moved.
  """
  result = Restored()
  if not os.path.isdir(directory):
    return result
  result.removed = _remove_partial_writes(directory)
  for name in result.removed:
    LOG.warning("removed %s, left by a checkpoint write that was killed",
                os.path.join(directory, name))
  damaged_steps = []
  for step in checkpoint_steps(directory):
    prefix = os.path.join(directory, f"{PREFIX}-{step}")
    try:
      held = _read_every_tensor(prefix)
    except Exception as e:  # pylint: disable=broad-except
      # A damaged file raises errors of many types (DataLossError,
      # OpError, IndexError, ...): any failure to read is damage.
      result.damaged.append(f"{PREFIX}-{step}: {_first_line(e)}")
      damaged_steps.append(step)
      continue
    result.absent = [name for name in optional if name not in held]
    checkpoint = tf.train.Checkpoint(**{
        name: value for name, value in objects.items()
        if name not in result.absent})
    try:
      checkpoint.restore(prefix).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
      raise CheckpointError(
          f"checkpoint {prefix} is intact but does not fit this model "
          f"({_first_line(e)}): was the run started with another config? "
          f"Use another train.output_dir") from None
    result.step = step
    break
  if result.damaged and result.step is None:
    raise CheckpointError(
        f"no checkpoint in {directory} can be read: "
        f"{'; '.join(result.damaged)}. Refusing to start over from step 0 "
        f"beside them; move the directory aside to start a new run")
  for step, entry in zip(damaged_steps, result.damaged):
    _move_aside(directory, step)
    LOG.warning("skipped damaged checkpoint %s; moved to %s/", entry,
                os.path.join(directory, DAMAGED_DIR))
  if result.step is not None:
    _rewrite_state(directory, result.step)
  return result
