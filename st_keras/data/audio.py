"""Audio as bytes: PCM WAV files resampled to 12 kHz, 8-bit mu-law (the
paper's Sec. 7.4)."""

from __future__ import annotations

import math
import os
import wave
from typing import Sequence

import numpy as np

from st_keras.data.text import list_files

SAMPLE_RATE = 12_000
MU = 255


def read_wav(path: str) -> tuple:
  """Reads a PCM WAV file (8, 16, 24 or 32-bit integer samples).

  Returns:
    (mono float64 samples in [-1, 1], sample rate).
  """
  try:
    with wave.open(path, "rb") as f:
      channels, width, rate = (f.getnchannels(), f.getsampwidth(),
                               f.getframerate())
      frames = f.readframes(f.getnframes())
  except (wave.Error, EOFError) as e:
    raise ValueError(f"{path!r} is not a readable PCM WAV file: {e}") from e
  if width not in (1, 2, 3, 4):
    raise ValueError(f"{path!r}: unsupported sample width {width} bytes")
  raw = np.frombuffer(frames, np.uint8)
  raw = raw[:raw.size - raw.size % (width * channels)].reshape(-1, width)
  if width == 1:  # unsigned 8-bit
    samples = (raw[:, 0].astype(np.float64) - 128.0) / 128.0
  else:
    # Little-endian signed: the bytes go to the top of an int32, which
    # sign-extends them; full scale is then 2^31.
    padded = np.zeros((raw.shape[0], 4), np.uint8)
    padded[:, 4 - width:] = raw
    samples = padded.view("<i4")[:, 0].astype(np.float64) / 2.0 ** 31
  return samples.reshape(-1, channels).mean(axis=1), rate


def _kaiser(u: np.ndarray, beta: float = 8.0) -> np.ndarray:
  """The Kaiser window at continuous positions u in [-1, 1] (0 outside)."""
  inside = np.abs(u) < 1.0
  arg = np.sqrt(np.where(inside, 1.0 - u * u, 0.0))
  return np.where(inside, np.i0(beta * arg) / np.i0(beta), 0.0)


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE,
             zero_crossings: int = 16, chunk: int = 65536) -> np.ndarray:
  """Band-limited resampling with a Kaiser-windowed sinc kernel.

  Args:
    samples: 1-D float samples.
    rate: their sample rate.
    target: the wanted rate.
    zero_crossings: kernel half-width in zero crossings of the lower rate.
    chunk: output samples computed per step (bounds memory).

  Returns:
    1-D float64 samples at `target` Hz.
  """
  if rate <= 0 or target <= 0:
    raise ValueError(f"sample rates must be positive, got {rate}, {target}")
  samples = np.asarray(samples, np.float64)
  if rate == target or samples.size == 0:
    return samples.copy()
  cutoff = min(1.0, target / rate)  # in units of the input Nyquist
  half = int(math.ceil(zero_crossings / cutoff))
  taps = np.arange(-half, half + 1)
  count = int(samples.size * target // rate)
  padded = np.pad(samples, half)
  out = np.empty(count)
  for begin in range(0, count, chunk):
    t = np.arange(begin, min(count, begin + chunk)) * (rate / target)
    base = np.floor(t).astype(np.int64)
    offsets = t - base  # in [0, 1)
    x = taps[None, :] - offsets[:, None]  # distance of each tap from t
    kernel = cutoff * np.sinc(cutoff * x) * _kaiser(x / (half + 1))
    out[begin:begin + len(t)] = (
        padded[base[:, None] + taps[None, :] + half] * kernel).sum(axis=1)
  return out


def mu_law_encode(samples: np.ndarray) -> np.ndarray:
  """Samples in [-1, 1] -> 8-bit mu-law codes (uint8, 0..255)."""
  x = np.clip(np.asarray(samples, np.float64), -1.0, 1.0)
  y = np.sign(x) * np.log1p(MU * np.abs(x)) / math.log1p(MU)
  return np.floor((y + 1.0) / 2.0 * MU + 0.5).astype(np.uint8)


def mu_law_decode(codes: np.ndarray) -> np.ndarray:
  """8-bit mu-law codes -> samples in [-1, 1] (float64)."""
  y = 2.0 * np.asarray(codes, np.float64) / MU - 1.0
  return np.sign(y) * np.expm1(np.abs(y) * math.log1p(MU)) / MU


def read_audio(paths: Sequence[str] | str,
               rate: int = SAMPLE_RATE) -> np.ndarray:
  """WAV files (or directories of them) as one mu-law byte stream.

  Args:
    paths: files or directories; directories contribute their .wav files in
      sorted order.
    rate: the rate to resample to.

  Returns:
    1-D uint8 mu-law codes at `rate`, files concatenated.
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  chunks = []
  for path in paths:
    names = list_files(os.fspath(path))
    if os.path.isdir(path):
      names = [n for n in names if n.lower().endswith(".wav")]
      if not names:
        raise FileNotFoundError(f"no .wav file in {path!r}")
    for name in names:
      samples, file_rate = read_wav(name)
      chunks.append(mu_law_encode(resample(samples, file_rate, rate)))
  return np.concatenate(chunks)
