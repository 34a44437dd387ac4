"""The data kinds a run trains on, in one registry.

Each kind knows how its bytes are read into training and held-out splits,
whether they are whole images or windows of a stream, the metric they are
scored in, the byte a sample starts from without a prompt, and how samples
are written. `st_keras.config` takes its `data.kind` choices from here, the
trainer reads its data through `load`, and `st-sample` writes through
`DataKind.write`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from st_keras.data import audio
from st_keras.data import images
from st_keras.data import text
from st_keras.data.windows import START_BYTE


@dataclasses.dataclass(frozen=True)
class DataKind:
  """One data kind.

  Attributes:
    name: its `data.kind` in a config.
    load: reads a `config.DataConfig` into {'train', 'valid'}: 1-D uint8
      streams, or [N, length] uint8 sequences for images.
    image_shape: (rows, columns, channels) of whole-image sequences, or
      None for windows of a stream.
    metric: 'bits_per_byte', or 'bits_per_dim' for images.
    start_byte: what a sample starts from without a prompt.
    sample_suffix: the file a sample is written to.
  """
  name: str
  load: Callable[..., Dict[str, np.ndarray]]
  image_shape: Optional[Tuple[int, int, int]] = None
  metric: str = "bits_per_byte"
  start_byte: int = 0
  sample_suffix: str = ".txt"

  @property
  def is_text(self) -> bool:
    """Whether samples are text (the trainer writes one at the end)."""
    return self.sample_suffix == ".txt"

  def write(self, tokens: np.ndarray, path: str,
            image_shape: Optional[Tuple[int, int, int]] = None) -> None:
    """Writes [batch, n] sampled bytes (prompt included) to `path`.

    Args:
      tokens: [batch, n] uint8.
      path: the file: text with a header per sample, a PNG grid of images
        (without their start byte) or one WAV of the clips.
      image_shape: the model's image axes (default: the kind's).
    """
    if self.image_shape is not None:
      images.write_grid(tokens[:, 1:], image_shape or self.image_shape, path)
    elif self.sample_suffix == ".wav":
      audio.write_wav(tokens, path)
    else:
      text.write_samples(tokens, path)


def _holdout(stream: np.ndarray, fraction: float, context: int) -> dict:
  """Splits a byte stream: the last `fraction` (at least one window) is
  held out."""
  valid = max(int(stream.size * fraction), context + 1)
  if stream.size - valid < context + 1:
    raise ValueError(f"{stream.size} bytes are too few for a training and a "
                     f"validation window of context {context}")
  return {"train": stream[:-valid], "valid": stream[-valid:]}


def _needs_path(cfg) -> str:
  if cfg.path is None:
    raise ValueError(f"data.path is required for data.kind={cfg.kind}")
  return cfg.path


def _load_text(cfg) -> dict:
  text.check_separator(cfg.separator, "data.separator")
  if cfg.path is None:
    return text.stdlib_splits(separator=cfg.separator)
  return _holdout(text.read_bytes(cfg.path, cfg.separator),
                  cfg.valid_fraction, cfg.context)


def _load_enwik8(cfg) -> dict:
  return text.enwik8_splits(_needs_path(cfg))


def _load_audio(cfg) -> dict:
  return _holdout(audio.read_audio(_needs_path(cfg)), cfg.valid_fraction,
                  cfg.context)


def _load_cifar10(cfg) -> dict:
  path = _needs_path(cfg)
  return {"train": images.read_cifar10(path, "train")[0],
          "valid": images.read_cifar10(cfg.valid_path or path, "test")[0]}


def _load_imagenet64(cfg) -> dict:
  path = _needs_path(cfg)
  if cfg.valid_path is None:
    raise ValueError("data.valid_path (the validation .npz batches) is "
                     "required for data.kind=imagenet64")
  return {"train": images.read_imagenet64(path),
          "valid": images.read_imagenet64(cfg.valid_path)}


KINDS = {kind.name: kind for kind in (
    DataKind("text", _load_text),
    DataKind("enwik8", _load_enwik8),
    DataKind("cifar10", _load_cifar10, images.CIFAR_SHAPE, "bits_per_dim",
             START_BYTE, ".png"),
    DataKind("imagenet64", _load_imagenet64, (64, 64, 3), "bits_per_dim",
             START_BYTE, ".png"),
    DataKind("audio", _load_audio, start_byte=audio.SILENCE,
             sample_suffix=".wav"),
)}
NAMES = tuple(KINDS)


def get(name: str) -> DataKind:
  """The registered kind `name`.

  Raises:
    ValueError: an unknown name, with the known ones.
  """
  if name not in KINDS:
    raise ValueError(f"data.kind must be one of {NAMES}, got {name!r}")
  return KINDS[name]


def load(cfg) -> dict:
  """Reads a run's bytes.

  Args:
    cfg: a `config.DataConfig`.

  Returns:
    {'train', 'valid'}: 1-D uint8 streams (text, audio) or [N, length]
    uint8 sequences (images).
  """
  return get(cfg.kind).load(cfg)


def held_out_file_starts(cfg, valid: np.ndarray) -> np.ndarray:
  """Where each file (document) begins in a text run's held-out bytes.

  Args:
    cfg: the run's `config.DataConfig` (kind text or enwik8).
    valid: `load(cfg)['valid']`.

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
    return text.stdlib_valid_bounds(separator=cfg.separator)[:-1]
  bounds = text.file_bounds(cfg.path, cfg.separator)
  starts = bounds[:-1] - (bounds[-1] - valid.size)  # valid is the tail
  return np.concatenate([[0], starts[starts > 0]]).astype(np.int64)
