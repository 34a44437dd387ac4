"""Images as byte sequences: CIFAR-10 binary files and downsampled ImageNet
.npz batches.

Both store each image channel-major (all red, then green, then blue
values). The model reads an image in raster order with the channels of a
pixel adjacent, position = (row * width + column) * channels + channel,
which is the order of `AxialPositionEmbedding((rows, columns, channels))`.
"""

from __future__ import annotations

import glob
import os
from typing import Tuple

import numpy as np

CIFAR_SHAPE = (32, 32, 3)
CIFAR_RECORD = 1 + 32 * 32 * 3  # one label byte, then the image


def channel_major_to_sequence(images: np.ndarray,
                              shape: Tuple[int, int, int]) -> np.ndarray:
  """[N, channels * rows * columns] channel-major -> [N, rows*cols*channels]
  in raster order with interleaved channels."""
  rows, cols, channels = shape
  images = images.reshape(-1, channels, rows, cols)
  return np.ascontiguousarray(images.transpose(0, 2, 3, 1)).reshape(
      images.shape[0], -1)


def sequence_to_images(sequences: np.ndarray,
                       shape: Tuple[int, int, int]) -> np.ndarray:
  """[N, rows*cols*channels] sequences -> [N, rows, cols, channels] uint8."""
  return np.asarray(sequences, np.uint8).reshape((-1,) + tuple(shape))


def read_cifar10(path: str, split: str = "train") -> Tuple[np.ndarray,
                                                           np.ndarray]:
  """Reads CIFAR-10 binary batches.

  Args:
    path: directory holding `data_batch_*.bin` and `test_batch.bin`
      (cifar-10-batches-bin), or one .bin file.
    split: 'train' (data_batch_*.bin) or 'test' (test_batch.bin); ignored
      when path is a file.

  Returns:
    (sequences [N, 3072] uint8 in model order, labels [N] uint8).
  """
  if os.path.isfile(path):
    files = [path]
  elif os.path.isdir(path):
    pattern = {"train": "data_batch_*.bin", "test": "test_batch.bin"}.get(
        split)
    if pattern is None:
      raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    files = sorted(glob.glob(os.path.join(path, pattern)))
    if not files:
      raise FileNotFoundError(f"no CIFAR-10 file {pattern} in {path!r}")
  else:
    raise FileNotFoundError(f"no such file or directory: {path!r}")
  records = []
  for name in files:
    raw = np.fromfile(name, np.uint8)
    if raw.size == 0 or raw.size % CIFAR_RECORD:
      raise ValueError(f"{name!r} has {raw.size} bytes, not a positive "
                       f"multiple of the {CIFAR_RECORD}-byte CIFAR-10 "
                       "record: the file is corrupt or not CIFAR-10")
    records.append(raw.reshape(-1, CIFAR_RECORD))
  records = np.concatenate(records)
  labels = records[:, 0]
  if labels.max() > 9:
    raise ValueError(f"label byte {labels.max()} is not a CIFAR-10 class "
                     "(0-9): the file is corrupt or not CIFAR-10")
  return channel_major_to_sequence(records[:, 1:], CIFAR_SHAPE), labels


def read_imagenet64(path: str, size: int = 64) -> np.ndarray:
  """Reads downsampled-ImageNet .npz batches (key 'data', [N, 3*size*size]
  channel-major uint8).

  Args:
    path: one .npz file or a directory of them (read in sorted order).
    size: image side (64 for Imagenet64x64).

  Returns:
    sequences [N, size*size*3] uint8 in model order.
  """
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.npz")))
    if not files:
      raise FileNotFoundError(f"no .npz file in {path!r}")
  elif os.path.isfile(path):
    files = [path]
  else:
    raise FileNotFoundError(f"no such file or directory: {path!r}")
  out = []
  for name in files:
    with np.load(name) as batch:
      if "data" not in batch:
        raise ValueError(f"{name!r} has no 'data' array (keys: "
                         f"{sorted(batch.keys())})")
      data = batch["data"]
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != (
        3 * size * size):
      raise ValueError(f"{name!r}: 'data' must be uint8 [N, {3 * size * size}]"
                       f", got {data.dtype} {data.shape}")
    out.append(channel_major_to_sequence(data, (size, size, 3)))
  return np.concatenate(out)
