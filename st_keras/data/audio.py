"""Audio as bytes: PCM WAV files resampled to 12 kHz, 8-bit mu-law (the
paper's Sec. 7.4)."""

from __future__ import annotations

import math
import os
import struct
from typing import Sequence
import wave

import numpy as np

from st_keras.data.text import list_files
from st_keras.data.text import read_file

SAMPLE_RATE = 12_000
MU = 255
# The mu-law code of a zero sample (mu_law_encode(0.0)): silence, the
# default start of a sampled clip (code 0 decodes to -1.0, a click).
SILENCE = 128
# Supported sample rates, in Hz: a header claiming more is refused.
MIN_RATE, MAX_RATE = 1, 384_000
# The longest resampling kernel (a rate ratio of up to 2048 with the
# default 16 zero crossings), and the kernel values computed per step (the
# step's temporaries then take some 30 MB, whatever the rates).
MAX_KERNEL_TAPS = 1 << 16
KERNEL_VALUES_PER_STEP = 1 << 18
WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# The sub-format GUID of integer PCM in WAVE_FORMAT_EXTENSIBLE
# (KSDATAFORMAT_SUBTYPE_PCM, as stored: little-endian fields first).
PCM_SUBFORMAT = bytes.fromhex("0100000000001000800000aa00389b71")


def _riff_chunks(blob: bytes) -> dict:
  """The chunks of a RIFF/WAVE file.

  Args:
    blob: the file's bytes.

  Returns:
    {chunk id: memoryview of its payload}, the first chunk of each id; a
    chunk cut short by the end of the file keeps the bytes that are there.

  Raises:
    ValueError: no RIFF/WAVE header, or no 'fmt ' or 'data' chunk.
  """
  if len(blob) < 12 or blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
    raise ValueError("no RIFF/WAVE header")
  view, chunks, offset = memoryview(blob), {}, 12
  while offset + 8 <= len(blob):
    chunk_id, size = struct.unpack_from("<4sI", blob, offset)
    chunks.setdefault(chunk_id, view[offset + 8:offset + 8 + size])
    offset += 8 + size + size % 2  # chunks are padded to even sizes
  for chunk_id in (b"fmt ", b"data"):
    if chunk_id not in chunks:
      raise ValueError(f"no {chunk_id.decode()!r} chunk")
  return chunks


def _pcm_format(fmt: memoryview) -> tuple:
  """The sample layout of a PCM 'fmt ' chunk.

  Plain PCM and WAVE_FORMAT_EXTENSIBLE with the PCM sub-format are read
  alike: samples fill whole bytes, left-justified when they hold fewer
  valid bits.

  Args:
    fmt: the chunk's payload.

  Returns:
    (channels, bytes per sample, sample rate).

  Raises:
    ValueError: a short chunk, no channel, or a format other than PCM.
  """
  if len(fmt) < 16:
    raise ValueError(f"'fmt ' chunk of {len(fmt)} bytes, not >= 16")
  tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt)
  if tag == WAVE_FORMAT_EXTENSIBLE and bytes(fmt[24:40]) == PCM_SUBFORMAT:
    tag = WAVE_FORMAT_PCM
  if tag != WAVE_FORMAT_PCM:
    raise ValueError(f"format tag {tag:#06x} is not integer PCM")
  if channels < 1:
    raise ValueError("no channel")
  return channels, (bits + 7) // 8, rate


def read_wav(path: str) -> tuple:
  """Reads a PCM WAV file (8, 16, 24 or 32-bit integer samples).

  Plain PCM and WAVE_FORMAT_EXTENSIBLE PCM are read; a data chunk cut
  short keeps its whole frames.

  Args:
    path: the .wav file.

  Returns:
    (mono float64 samples in [-1, 1], sample rate).

  Raises:
    ValueError, naming the file: it is not a readable PCM WAV file, or its
      sample width or rate (MIN_RATE..MAX_RATE Hz) is unsupported.
  """
  try:
    chunks = _riff_chunks(read_file(path))
    channels, width, rate = _pcm_format(chunks[b"fmt "])
  except ValueError as e:
    raise ValueError(f"{path!r} is not a readable PCM WAV file: {e}") from e
  if width not in (1, 2, 3, 4):
    raise ValueError(f"{path!r}: unsupported sample width {width} bytes")
  if not MIN_RATE <= rate <= MAX_RATE:
    raise ValueError(f"{path!r}: sample rate {rate} Hz is outside the "
                     f"supported {MIN_RATE}..{MAX_RATE} Hz")
  raw = np.frombuffer(chunks[b"data"], np.uint8)
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
    rate: their sample rate, MIN_RATE..MAX_RATE Hz.
    target: the wanted rate, MIN_RATE..MAX_RATE Hz.
    zero_crossings: kernel half-width in zero crossings of the lower rate.
    chunk: output samples computed per step at most (fewer when the kernel
      is long: a step computes at most KERNEL_VALUES_PER_STEP kernel values,
      which bounds memory).

  Returns:
    1-D float64 samples at `target` Hz.

  Raises:
    ValueError: a rate outside MIN_RATE..MAX_RATE, or a rate ratio that
      needs a kernel of more than MAX_KERNEL_TAPS taps.
  """
  if not (MIN_RATE <= rate <= MAX_RATE and MIN_RATE <= target <= MAX_RATE):
    raise ValueError(f"sample rates must be in {MIN_RATE}..{MAX_RATE} Hz, "
                     f"got {rate}, {target}")
  samples = np.asarray(samples, np.float64)
  if rate == target or samples.size == 0:
    return samples.copy()
  cutoff = min(1.0, target / rate)  # in units of the input Nyquist
  half = int(math.ceil(zero_crossings / cutoff))
  taps = np.arange(-half, half + 1)
  if taps.size > MAX_KERNEL_TAPS:
    raise ValueError(f"resampling {rate} Hz to {target} Hz needs a "
                     f"{taps.size}-tap kernel, more than {MAX_KERNEL_TAPS}: "
                     "resample in smaller steps")
  chunk = max(1, min(chunk, KERNEL_VALUES_PER_STEP // taps.size))
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


def write_wav(tokens: np.ndarray, path: str) -> None:
  """Writes [batch, n] mu-law bytes as one 16-bit mono WAV at 12 kHz, the
  sequences one after another with 0.25 s of silence between them."""
  gap = np.zeros(SAMPLE_RATE // 4, np.float32)
  signal = np.concatenate(
      [np.concatenate([mu_law_decode(row), gap]) for row in tokens])
  pcm = np.round(np.clip(signal, -1.0, 1.0) * 32767).astype("<i2")
  with wave.open(path, "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(SAMPLE_RATE)
    f.writeframes(pcm.tobytes())
