"""Text as bytes: any file or directory, enwik8, and the default corpus (the
Python standard library's sources)."""

from __future__ import annotations

import os
import stat
import sysconfig
from typing import Dict, List, Sequence
import warnings
import zlib

import numpy as np

# enwik8 (the first 10^8 bytes of an English Wikipedia dump) and the
# paper's split: 90M train, 5M valid, 5M test.
ENWIK8_BYTES = 100_000_000
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)
# The byte placed before each file of a multi-file text (ASCII "file
# separator"): text files do not hold it, so a window that crosses into a
# new file shows the model where that file begins.
DOCUMENT_SEPARATOR = 0x1C


def list_files(path: str) -> List[str]:
  """The regular files under `path` (itself if a file), sorted by path.

  Hidden files and directories are skipped, and so, with a warning naming
  them, are entries that are not regular files (FIFOs, sockets, devices,
  broken links): opening a FIFO would block forever.

  Args:
    path: a regular file or a directory.

  Returns:
    The paths of the files, sorted.

  Raises:
    FileNotFoundError: path does not exist or holds no file.
    ValueError: path is neither a regular file nor a directory.
  """
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    if os.path.exists(path):
      raise ValueError(f"{path!r} is not a regular file or directory")
    raise FileNotFoundError(f"no such file or directory: {path!r}")
  files = []
  for root, dirs, names in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    files.extend(_regular_files(root, names))
  if not files:
    raise FileNotFoundError(f"{path!r} holds no file")
  return sorted(files)


def _regular_files(root: str, names: Sequence[str]) -> List[str]:
  """The visible regular files among `names`; others warn and are skipped.

  Args:
    root: a directory.
    names: the names of its entries that are not directories.

  Returns:
    The paths of the visible regular files, sorted by name.
  """
  files = []
  for name in sorted(n for n in names if not n.startswith(".")):
    full = os.path.join(root, name)
    if os.path.isfile(full):
      files.append(full)
    else:
      warnings.warn(f"skipping {full!r}: not a regular file", stacklevel=3)
  return files


def read_file(path: str) -> bytes:
  """The bytes of a regular file, refusing (never blocking on) any other.

  The file is opened without blocking and checked once open, so a path
  swapped for a FIFO after it was listed is refused too.

  Args:
    path: the file.

  Returns:
    Its contents.

  Raises:
    ValueError: path is not a regular file.
  """
  fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
  with os.fdopen(fd, "rb") as f:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      raise ValueError(f"{path!r} is not a regular file")
    return f.read()


def check_separator(separator: int | None, name: str = "separator") -> None:
  """Checks a separator argument (see `read_bytes`).

  Args:
    separator: the value to check.
    name: the argument's name, for the error.

  Raises:
    ValueError, naming `name`, unless separator is None or a byte value.
  """
  if separator is not None and (isinstance(separator, bool) or
                                not isinstance(separator, (int, np.integer))
                                or not 0 <= separator <= 255):
    raise ValueError(f"{name} must be null or a byte value 0-255, got "
                     f"{separator!r}")


def read_bytes(paths: Sequence[str] | str,
               separator: int | None = None) -> np.ndarray:
  """Concatenates the bytes of files (directories are walked, sorted).

  Args:
    paths: a path or a list of paths to files or directories.
    separator: None, or a byte value placed before each file, so that
      where one file ends and the next begins stays visible (e.g.
      `DOCUMENT_SEPARATOR`; it should be a byte the files do not hold).

  Returns:
    A 1-D uint8 array.

  Raises:
    FileNotFoundError: a path does not exist or holds no file.
    ValueError: separator is not None or a byte value, or a path is not a
      regular file or directory.
  """
  check_separator(separator)
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  head = [] if separator is None else [np.array([separator], np.uint8)]
  chunks = []
  for path in paths:
    for name in list_files(os.fspath(path)):
      chunks += head + [np.frombuffer(read_file(name), np.uint8)]
  return np.concatenate(chunks) if chunks else np.zeros([0], np.uint8)


def file_bounds(paths: Sequence[str] | str,
                separator: int | None = None) -> np.ndarray:
  """Where each file begins and ends in `read_bytes(paths, separator)`.

  Args:
    paths: a path or a list of paths to files or directories.
    separator: as in `read_bytes`; a file's span begins with its separator.

  Returns:
    A 1-D int64 array of files + 1 ascending offsets: file f, after its
    separator if there is one, spans bytes [bounds[f], bounds[f + 1]).

  Raises:
    FileNotFoundError: a path does not exist or holds no file.
    ValueError: as in `read_bytes`.
  """
  check_separator(separator)
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  extra = 0 if separator is None else 1
  sizes = [os.path.getsize(name) + extra for path in paths
           for name in list_files(os.fspath(path))]
  return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def enwik8_splits(path: str) -> Dict[str, np.ndarray]:
  """The paper's enwik8 split: first 90M bytes train, next 5M valid, last 5M
  test.

  Args:
    path: the `enwik8` file (10^8 bytes, unzipped).

  Returns:
    {'train', 'valid', 'test'} -> uint8 arrays.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"enwik8 file not found: {path!r}")
  size = os.path.getsize(path)
  if size != ENWIK8_BYTES:
    raise ValueError(f"{path!r} has {size} bytes; enwik8 has exactly "
                     f"{ENWIK8_BYTES} (is it still zipped?)")
  data = np.fromfile(path, np.uint8)
  train, valid, _ = ENWIK8_SPLIT
  return {"train": data[:train], "valid": data[train:train + valid],
          "test": data[train + valid:]}


def stdlib_root() -> str:
  """The directory of this Python's standard library sources."""
  return sysconfig.get_paths()["stdlib"]


def stdlib_manifest(valid_per_mille: int = 50) -> Dict[str, List[str]]:
  """Splits the standard library's .py files into train and valid by file.

  A file goes to valid when the CRC-32 of its path relative to the library
  root, modulo 1000, is below `valid_per_mille`: the split depends on the
  names only, so it is the same on every machine with the same Python.
  site-packages and the test suites are left out.

  Args:
    valid_per_mille: share of files for validation, in thousandths.

  Returns:
    {'root': [root], 'train': [relative paths], 'valid': [relative paths]},
    sorted.
  """
  root = stdlib_root()
  split = {"root": [root], "train": [], "valid": []}
  for name in list_files(root):
    rel = os.path.relpath(name, root)
    parts = rel.split(os.sep)
    if (not rel.endswith(".py") or "site-packages" in parts or
        "test" in parts or "tests" in parts or "idle_test" in parts):
      continue
    bucket = zlib.crc32(rel.encode()) % 1000
    split["valid" if bucket < valid_per_mille else "train"].append(rel)
  if not split["train"] or not split["valid"]:
    raise FileNotFoundError(f"too few .py files under {root!r} for a "
                            "train/valid split")
  return split


def stdlib_splits(valid_per_mille: int = 50,
                  separator: int | None = DOCUMENT_SEPARATOR
                  ) -> Dict[str, np.ndarray]:
  """The default corpus: {'train', 'valid'} bytes of the standard library.

  Args:
    valid_per_mille: see `stdlib_manifest`.
    separator: see `read_bytes`; by default each file begins with
      `DOCUMENT_SEPARATOR`.
  """
  manifest = stdlib_manifest(valid_per_mille)
  root = manifest["root"][0]
  return {part: read_bytes([os.path.join(root, p) for p in manifest[part]],
                           separator)
          for part in ("train", "valid")}


def stdlib_valid_bounds(valid_per_mille: int = 50,
                        separator: int | None = DOCUMENT_SEPARATOR
                        ) -> np.ndarray:
  """`file_bounds` of the held-out files of the default corpus, i.e. of
  `stdlib_splits(valid_per_mille, separator)['valid']`."""
  manifest = stdlib_manifest(valid_per_mille)
  root = manifest["root"][0]
  return file_bounds([os.path.join(root, p) for p in manifest["valid"]],
                     separator)


def write_samples(tokens: np.ndarray, path: str) -> None:
  """Writes the byte sequences of [batch, n] tokens, each after a header.

  Sample i of B is the line `=== sample i/B: n bytes ===`, then exactly its
  n bytes (which may hold any byte, newlines included), then a newline: a
  reader takes the count from the header, so samples never run together.
  """
  with open(path, "wb") as f:
    for i, row in enumerate(tokens):
      data = row.astype(np.uint8).tobytes()
      f.write(f"=== sample {i + 1}/{len(tokens)}: {len(data)} bytes ===\n"
              .encode("ascii") + data + b"\n")
