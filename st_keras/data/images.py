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
from typing import Sequence, Tuple
import zipfile
import zlib

import numpy as np

from st_keras.data.text import read_file

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
    raw = np.frombuffer(read_file(name), np.uint8)
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


def _npz_data(name: str, size: int) -> np.ndarray:
  """The 'data' array of one downsampled-ImageNet .npz batch, checked.

  Args:
    name: the .npz file.
    size: image side.

  Returns:
    [N >= 1, 3*size*size] uint8, channel-major.

  Raises:
    ValueError, naming the file: it is not a readable .npz archive (truncated,
      corrupt, or another format), or its 'data' is missing, empty or not
      uint8 [N, 3*size*size].
  """
  if not os.path.isfile(name):  # np.load of a FIFO would block
    raise ValueError(f"{name!r} is not a regular file")
  try:
    batch = np.load(name)
    if not isinstance(batch, np.lib.npyio.NpzFile):
      raise ValueError("a .npy array, not a .npz archive")
    with batch:
      if "data" not in batch:
        raise ValueError(f"no 'data' array (keys: {sorted(batch.keys())})")
      data = batch["data"]
  except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
    raise ValueError(f"{name!r} is not a readable ImageNet .npz batch: "
                     f"{e}") from e
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != (
      3 * size * size):
    raise ValueError(f"{name!r}: 'data' must be uint8 [N, {3 * size * size}]"
                     f", got {data.dtype} {data.shape}")
  if not data.shape[0]:
    raise ValueError(f"{name!r}: 'data' holds no image")
  return data


def read_imagenet64(path: str, size: int = 64) -> np.ndarray:
  """Reads downsampled-ImageNet .npz batches (key 'data', [N, 3*size*size]
  channel-major uint8).

  Args:
    path: one .npz file or a directory of them (read in sorted order).
    size: image side (64 for Imagenet64x64).

  Returns:
    sequences [N, size*size*3] uint8 in model order.

  Raises:
    FileNotFoundError: path does not exist or holds no .npz file.
    ValueError: a file is not a readable batch (see `_npz_data`).
  """
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.npz")))
    if not files:
      raise FileNotFoundError(f"no .npz file in {path!r}")
  elif os.path.isfile(path):
    files = [path]
  else:
    raise FileNotFoundError(f"no such file or directory: {path!r}")
  return np.concatenate([
      channel_major_to_sequence(_npz_data(name, size), (size, size, 3))
      for name in files])


def write_grid(tokens: np.ndarray, image_shape: Sequence[int],
               path: str) -> None:
  """Writes [batch, n] raster-order bytes as a PNG grid of images.

  Args:
    tokens: [batch, n] bytes, n <= rows * cols * channels; missing bytes
      (an unfinished image) are drawn black.
    image_shape: (rows, cols, channels), channels 1 or 3.
    path: the .png to write.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.image  # pylint: disable=import-outside-toplevel
  rows, cols, channels = image_shape
  if channels not in (1, 3):
    raise ValueError(f"image channels must be 1 or 3, got {channels}")
  flat = np.zeros((tokens.shape[0], rows * cols * channels), np.uint8)
  flat[:, :tokens.shape[1]] = tokens[:, :flat.shape[1]]
  images = flat.reshape(-1, rows, cols, channels)
  per_row = int(np.ceil(np.sqrt(len(images))))
  grid = np.zeros((per_row * (rows + 1), per_row * (cols + 1), channels),
                  np.uint8)
  for i, image in enumerate(images):
    r, c = divmod(i, per_row)
    grid[r * (rows + 1):r * (rows + 1) + rows,
         c * (cols + 1):c * (cols + 1) + cols] = image
  matplotlib.image.imsave(path, grid[..., 0] if channels == 1 else grid,
                          cmap="gray" if channels == 1 else None)
