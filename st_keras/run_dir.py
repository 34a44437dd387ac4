"""A training run's directory: one trainer at a time, one config, whole files.

Everything here is plain Python (no TensorFlow), so a trainer can claim its
directory and check its config before it loads any data or builds a model:

- `RunLock`: an exclusive `fcntl.flock` on `<run>/.lock`, held while a
  trainer works there; a second trainer on the same directory is refused.
- `check_saved_config`: a run resumed with a config that differs from the
  one it was started with (in anything but the step budget) is refused.
- `write_atomically`: config.json, summary.json and history.csv are written
  to a temporary file and renamed over the old one, so a killed process
  leaves either the old file or the new one, never half of one.
- `History`: history.csv, one row per checkpoint interval.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
from typing import Dict, List, Sequence

from st_keras import config as config_lib

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
# Keys a resumed run may change without --allow-config-change: the step
# budget, and where the run directory is (it may have been moved).
RESUMABLE_CHANGES = ("train.steps", "train.output_dir")


class RunDirectoryError(RuntimeError):
  """The run directory cannot be used as asked (in use, other config)."""


def write_atomically(path: str, text: str) -> None:
  """Replaces the file at `path` with `text` in one rename.

  Args:
    path: the file to write.
    text: its new contents.
  """
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class RunLock:
  """An exclusive lock on a run directory, held by one trainer at a time.

  The lock is an `flock` on `<directory>/.lock`, released by the kernel when
  the holder exits, however it exits (kill -9 included), so it is never
  stale. The file records the holder's pid for the error message.

  Args:
    directory: the run directory (created if missing).

  Raises:
    RunDirectoryError: on entry, when another process holds the lock.

  Example:

    with RunLock("runs/demo"):
      ...  # train
  """

  def __init__(self, directory: str):
    self.directory = directory
    self.path = os.path.join(directory, LOCK_FILE)
    self._file = None

  def __enter__(self) -> "RunLock":
    os.makedirs(self.directory, exist_ok=True)
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      f.close()
      raise RunDirectoryError(
          f"output directory {self.directory!r} is in use by another "
          f"trainer (pid {holder}); wait for it to finish or choose another "
          f"train.output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc) -> None:
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()
    self._file = None


def _flatten(tree: dict, prefix: str = "") -> Dict[str, object]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def config_changes(saved: dict, wanted: dict,
                   allowed: Sequence[str] = RESUMABLE_CHANGES) -> List[str]:
  """The keys whose values differ between two configs, as 'section.key'.

  Args:
    saved: the config a run was started with (nested dicts, JSON values).
    wanted: the config it is resumed with.
    allowed: keys whose changes are not reported.

  Returns:
    Sorted lines 'section.key: saved -> wanted'.
  """
  old, new = _flatten(saved), _flatten(json.loads(json.dumps(wanted)))
  return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
          for key in sorted(set(old) | set(new))
          if key not in allowed and old.get(key) != new.get(key)]


def check_saved_config(directory: str, wanted: dict,
                       allow_change: bool = False) -> List[str]:
  """Refuses to resume a run with a config other than its own.

  Args:
    directory: the run directory.
    wanted: the new config (nested dicts); the saved one is config.json.
    allow_change: report the differences instead of refusing them.

  Returns:
    The differing keys ('section.key: old -> new'), empty when none or when
    the directory has no config.json yet.

  Raises:
    RunDirectoryError: the configs differ and allow_change is False, or
      config.json cannot be read.
  """
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    return []
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError(f"a mapping of sections expected, got "
                       f"{type(saved).__name__}")
  except (OSError, ValueError) as e:
    raise RunDirectoryError(
        f"cannot read the saved config {path!r} ({e}); restore it, or move "
        f"the run directory aside to start a new run") from None
  try:  # a run saved before a key was renamed has its old name
    saved = config_lib.upgrade(saved)
  except ValueError as e:
    raise RunDirectoryError(f"the saved config {path!r}: {e}") from None
  changes = config_changes(saved, wanted)
  if changes and not allow_change:
    raise RunDirectoryError(
        f"{directory!r} holds a run with another config; refusing to resume "
        f"it with these changes: {'; '.join(changes)}. Use another "
        f"train.output_dir, or pass --allow-config-change to resume anyway")
  return changes


class History:
  """history.csv: one row per checkpoint interval, rewritten whole.

  Each row holds the batch count at the end of the interval ('step') and
  the interval's training and validation metrics. Rows past the step a run
  resumes from (written before a kill that lost their checkpoint) are
  dropped, so the file always agrees with the checkpoints.

  Args:
    path: the CSV file.
    resume_step: the step the run resumes from (0 for a new run).
  """

  def __init__(self, path: str, resume_step: int):
    self.path = path
    self.rows = []
    if os.path.exists(path):
      with open(path, newline="") as f:
        self.rows = [row for row in csv.DictReader(f)
                     if row.get("step") and int(row["step"]) <= resume_step]
    self._write()

  def append(self, step: int, logs: dict) -> None:
    """Adds the row of the interval ending at `step` and rewrites the file.

    Args:
      step: batches seen at the end of the interval.
      logs: the interval's metrics (numbers).
    """
    row = {"step": str(step)}
    row.update({key: repr(float(value)) for key, value in
                sorted(logs.items())})
    self.rows.append(row)
    self._write()

  def _write(self) -> None:
    fields = ["step"] + sorted({k for row in self.rows for k in row} -
                               {"step"})
    out = io.StringIO()
    writer = csv.DictWriter(out, fields, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(self.rows)
    write_atomically(self.path, out.getvalue() if self.rows else "")
