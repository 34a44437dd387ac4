"""Writes scikit-learn's handwritten digits as a CIFAR-10 binary data set.

scikit-learn ships the UCI optical-recognition digits (1,797 scans of
digits written by 43 people, 8x8 pixels, 17 grey levels) inside its wheel,
so this runs offline. Each image is scaled to 0..255, upsampled to 32x32
with bilinear interpolation (Pillow, which matplotlib depends on), and
written as an RGB record with three equal channel planes, in the layout of
cifar-10-batches-bin: one label byte, then the 1,024 red, 1,024 green and
1,024 blue bytes in row-major order. The first `--test` images of a seeded
permutation go to test_batch.bin, the rest to data_batch_1.bin.

Usage:
  python -m benchmarks.digits_to_cifar --output data/digits-cifar [--test 297]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image

SIDE = 32
SEED = 0


def upsampled_digits() -> tuple:
  """The digits as 32x32 uint8 images.

  Returns:
    (images [N, 32, 32] uint8, labels [N] uint8).
  """
  from sklearn.datasets import load_digits  # the data is in the wheel
  digits = load_digits()
  scaled = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images = np.stack([
      np.asarray(Image.fromarray(image).resize((SIDE, SIDE),
                                               Image.Resampling.BILINEAR))
      for image in scaled])                    # (N, 32, 32)
  return images, digits.target.astype(np.uint8)


def cifar_records(images: np.ndarray, labels: np.ndarray) -> bytes:
  """CIFAR-10 binary records of grey images (channels repeated).

  Args:
    images: [N, 32, 32] uint8.
    labels: [N] uint8 in 0..9.

  Returns:
    N records of 1 + 3 * 1024 bytes.
  """
  planes = np.repeat(images.reshape(len(images), 1, SIDE * SIDE), 3,
                     axis=1)                   # (N, 3, 1024)
  return np.concatenate([labels[:, None],
                         planes.reshape(len(images), -1)], axis=1).tobytes()


def write_dataset(output: str, test: int = 297,
                  limit: int | None = None) -> dict:
  """Writes data_batch_1.bin and test_batch.bin under `output`.

  Args:
    output: directory to create or reuse.
    test: images held out for test_batch.bin.
    limit: use only the first `limit` images of the permutation (tests).

  Returns:
    {'train': count, 'test': count, 'path': output}.
  """
  images, labels = upsampled_digits()
  order = np.random.default_rng(SEED).permutation(len(images))[:limit]
  if not 0 < test < len(order):
    raise ValueError(f"test must be in 1..{len(order) - 1}, got {test}")
  os.makedirs(output, exist_ok=True)
  splits = {"test_batch.bin": order[:test], "data_batch_1.bin": order[test:]}
  for name, index in splits.items():
    with open(os.path.join(output, name), "wb") as f:
      f.write(cifar_records(images[index], labels[index]))
  return {"train": len(order) - test, "test": test, "path": output}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output", required=True, help="directory to write")
  parser.add_argument("--test", type=int, default=297,
                      help="images in test_batch.bin")
  parser.add_argument("--limit", type=int, help="use only this many images")
  args = parser.parse_args(argv)
  try:
    print(write_dataset(args.output, args.test, args.limit))
  except ValueError as e:
    parser.error(str(e))
  return 0


if __name__ == "__main__":
  sys.exit(main())
