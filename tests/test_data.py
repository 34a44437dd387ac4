"""Data pipelines: small files in each real format, exact bytes out."""

import os
import wave

import numpy as np
import pytest

from st_keras import data
from st_keras.data import audio
from st_keras.data import images
from st_keras.data import text


def _write(path, payload):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(payload)


def test_read_bytes_walks_directories_in_sorted_order(tmp_path):
  rng = np.random.default_rng()
  blobs = {name: rng.integers(0, 256, rng.integers(1, 50)).astype(
      np.uint8).tobytes() for name in ("b.txt", "a/z.py", "a/c.py")}
  for name, blob in blobs.items():
    _write(str(tmp_path / name), blob)
  _write(str(tmp_path / ".hidden"), b"skip me")
  got = text.read_bytes(str(tmp_path))
  want = blobs["a/c.py"] + blobs["a/z.py"] + blobs["b.txt"]
  assert got.tobytes() == want
  assert text.read_bytes(str(tmp_path / "b.txt")).tobytes() == blobs["b.txt"]
  with pytest.raises(FileNotFoundError, match="no such file"):
    text.read_bytes(str(tmp_path / "missing"))


def test_file_bounds_mark_each_file_in_read_bytes(tmp_path):
  rng = np.random.default_rng()
  names = ("b.txt", "a/z.py", "a/c.py", "a/empty.py")
  for name in names:
    size = 0 if name == "a/empty.py" else int(rng.integers(1, 80))
    _write(str(tmp_path / name), rng.integers(0, 256, size).astype(
        np.uint8).tobytes())
  bounds = text.file_bounds(str(tmp_path))
  data = text.read_bytes(str(tmp_path))
  files = text.list_files(str(tmp_path))  # a/c, a/empty, a/z, b
  assert bounds.dtype == np.int64 and bounds.size == len(files) + 1
  assert bounds[0] == 0 and bounds[-1] == data.size
  for name, lo, hi in zip(files, bounds[:-1], bounds[1:]):
    with open(name, "rb") as f:
      assert data[lo:hi].tobytes() == f.read()
  # A list of paths walks them in the given order, like read_bytes.
  both = [str(tmp_path / "b.txt"), str(tmp_path / "a")]
  assert text.file_bounds(both)[-1] == text.read_bytes(both).size
  assert text.file_bounds(both)[1] == os.path.getsize(tmp_path / "b.txt")
  valid = text.stdlib_valid_bounds()
  assert valid[-1] == text.stdlib_splits()["valid"].size
  assert valid.size == len(text.stdlib_manifest()["valid"]) + 1


def test_separator_begins_each_file_and_its_bounds(tmp_path):
  rng = np.random.default_rng()
  names = ("b.txt", "a/z.py", "a/c.py")
  for name in names:
    _write(str(tmp_path / name), rng.integers(0, 256, int(rng.integers(
        1, 60))).astype(np.uint8).tobytes())
  separator = int(rng.integers(0, 256))
  data = text.read_bytes(str(tmp_path), separator)
  bounds = text.file_bounds(str(tmp_path), separator)
  files = text.list_files(str(tmp_path))
  assert bounds[-1] == data.size == sum(os.path.getsize(f) + 1
                                        for f in files)
  for name, lo, hi in zip(files, bounds[:-1], bounds[1:]):
    with open(name, "rb") as f:
      assert data[lo] == separator and data[lo + 1:hi].tobytes() == f.read()
  for bad in (-1, 256, True, 2.0, "x"):
    with pytest.raises(ValueError, match="separator must be null or a byte"):
      text.read_bytes(str(tmp_path), bad)
    with pytest.raises(ValueError, match="separator must be null or a byte"):
      text.file_bounds(str(tmp_path), bad)


def test_default_corpus_files_each_begin_with_the_only_separators():
  from st_keras import config as config_lib
  assert config_lib.DataConfig().separator == text.DOCUMENT_SEPARATOR
  valid = text.stdlib_splits()["valid"]
  bounds = text.stdlib_valid_bounds()
  assert np.all(valid[bounds[:-1]] == text.DOCUMENT_SEPARATOR)
  # The sources hold no separator byte of their own.
  assert np.sum(valid == text.DOCUMENT_SEPARATOR) == bounds.size - 1
  plain = text.stdlib_splits(separator=None)["valid"]
  assert plain.size == valid.size - (bounds.size - 1)
  assert text.stdlib_valid_bounds(separator=None)[-1] == plain.size


def test_enwik8_split_boundaries(tmp_path):
  path = str(tmp_path / "enwik8")
  marks = {0: 1, 89_999_999: 2, 90_000_000: 3, 94_999_999: 4,
           95_000_000: 5, 99_999_999: 6}
  with open(path, "wb") as f:
    f.truncate(text.ENWIK8_BYTES)  # sparse: fast to write
    for offset, value in marks.items():
      f.seek(offset)
      f.write(bytes([value]))
  splits = text.enwik8_splits(path)
  assert [splits[k].size for k in ("train", "valid", "test")] == [
      90_000_000, 5_000_000, 5_000_000]
  assert (splits["train"][0], splits["train"][-1]) == (1, 2)
  assert (splits["valid"][0], splits["valid"][-1]) == (3, 4)
  assert (splits["test"][0], splits["test"][-1]) == (5, 6)
  _write(str(tmp_path / "short"), b"abc")
  with pytest.raises(ValueError, match="exactly"):
    text.enwik8_splits(str(tmp_path / "short"))
  with pytest.raises(FileNotFoundError, match="enwik8"):
    text.enwik8_splits(str(tmp_path / "nothing"))


def test_stdlib_manifest_is_a_deterministic_split_by_file():
  a, b = text.stdlib_manifest(), text.stdlib_manifest()
  assert a == b
  assert not set(a["train"]) & set(a["valid"])
  assert all(p.endswith(".py") for p in a["train"] + a["valid"])
  share = len(a["valid"]) / (len(a["train"]) + len(a["valid"]))
  assert 0.02 < share < 0.10
  assert not any(p.split(os.sep)[0] in ("test", "site-packages")
                 for p in a["train"])


def test_training_windows_are_crops_resumable_by_index():
  rng = np.random.default_rng()
  corpus = rng.integers(0, 256, 5000).astype(np.uint8)
  ds = data.training_windows(corpus, context=32, batch_size=4, seed=11)
  batches = [b for b, _ in zip(ds, range(3))]
  for x, y in batches:
    x, y = x.numpy(), y.numpy()
    assert x.shape == y.shape == (4, 32) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):
      window = np.concatenate([row_x, row_y[-1:]]).astype(np.uint8)
      starts = [s for s in range(corpus.size - 32)
                if corpus[s] == window[0] and
                np.array_equal(corpus[s:s + 33], window)]
      assert starts, "a window is not a crop of the corpus"
  resumed = data.training_windows(corpus, 32, 4, seed=11, start=8)
  x2, _ = next(iter(resumed))
  np.testing.assert_array_equal(x2.numpy(), batches[2][0].numpy())
  other = next(iter(data.training_windows(corpus, 32, 4, seed=12)))[0]
  assert not np.array_equal(other.numpy(), batches[0][0].numpy())


def test_evaluation_windows_are_contiguous_and_cover_once():
  rng = np.random.default_rng()
  corpus = rng.integers(0, 256, 1000).astype(np.uint8)
  xs, ys = zip(*[(x.numpy(), y.numpy())
                 for x, y in data.evaluation_windows(corpus, 64, 5)])
  x, y = np.concatenate(xs), np.concatenate(ys)
  assert x.shape == (15, 64)  # (1000 - 1) // 64 windows
  np.testing.assert_array_equal(x.reshape(-1), corpus[:960])
  np.testing.assert_array_equal(y.reshape(-1), corpus[1:961])


def test_pipelines_do_not_autotune():
  # An autotuning validation iterator took ~9 s to drop after every
  # evaluation of a run (st_keras.data.windows._in_memory).
  rng = np.random.default_rng()
  corpus = rng.integers(0, 256, 300).astype(np.uint8)
  seqs = rng.integers(0, 256, (4, 6)).astype(np.uint8)
  for ds in (data.training_windows(corpus, 16, 2, seed=1),
             data.evaluation_windows(corpus, 16, 2),
             data.sequence_batches(seqs, 2),
             data.sequence_batches(seqs, 2, seed=3)):
    assert ds.options().autotune.enabled is False
    assert next(iter(ds))[0].shape[0] == 2


def test_windows_reject_short_or_bad_data():
  with pytest.raises(ValueError, match="fewer than one window"):
    data.training_windows(np.zeros(10, np.uint8), 16, 2, seed=0)
  with pytest.raises(ValueError, match="uint8"):
    data.evaluation_windows(np.zeros(100, np.int32), 16, 2)


def _cifar_file(path, rng, count):
  labels = rng.integers(0, 10, count).astype(np.uint8)
  pixels = rng.integers(0, 256, (count, 3, 32, 32)).astype(np.uint8)
  records = np.concatenate([labels[:, None], pixels.reshape(count, -1)], 1)
  _write(path, records.tobytes())
  return labels, pixels


def test_cifar10_binary_to_raster_sequences(tmp_path):
  rng = np.random.default_rng()
  parts = [_cifar_file(str(tmp_path / f"data_batch_{i}.bin"), rng, 3)
           for i in (1, 2)]
  test_labels, test_pixels = _cifar_file(str(tmp_path / "test_batch.bin"),
                                         rng, 2)
  seqs, labels = images.read_cifar10(str(tmp_path), "train")
  pixels = np.concatenate([p for _, p in parts])
  np.testing.assert_array_equal(labels, np.concatenate([l for l, _ in parts]))
  assert seqs.shape == (6, 3072)
  for n in range(6):
    for r, c, ch in [(0, 0, 0), (0, 0, 2), (5, 7, 1), (31, 31, 2)]:
      assert seqs[n, (r * 32 + c) * 3 + ch] == pixels[n, ch, r, c]
  np.testing.assert_array_equal(
      images.sequence_to_images(seqs, images.CIFAR_SHAPE),
      pixels.transpose(0, 2, 3, 1))
  seqs, labels = images.read_cifar10(str(tmp_path), "test")
  np.testing.assert_array_equal(labels, test_labels)
  np.testing.assert_array_equal(
      seqs.reshape(-1, 32, 32, 3), test_pixels.transpose(0, 2, 3, 1))


def test_cifar10_errors(tmp_path):
  _write(str(tmp_path / "data_batch_1.bin"), b"\x00" * 3000)
  with pytest.raises(ValueError, match="corrupt"):
    images.read_cifar10(str(tmp_path))
  _write(str(tmp_path / "data_batch_1.bin"), b"\x0c" * 3073)
  with pytest.raises(ValueError, match="not a CIFAR-10 class"):
    images.read_cifar10(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="test_batch"):
    images.read_cifar10(str(tmp_path), "test")


def test_imagenet64_npz(tmp_path):
  rng = np.random.default_rng()
  pixels = rng.integers(0, 256, (4, 3, 64, 64)).astype(np.uint8)
  np.savez(str(tmp_path / "train_data_batch_1.npz"),
           data=pixels[:3].reshape(3, -1), labels=np.arange(3))
  np.savez(str(tmp_path / "train_data_batch_2.npz"),
           data=pixels[3:].reshape(1, -1), labels=np.arange(1))
  seqs = images.read_imagenet64(str(tmp_path))
  np.testing.assert_array_equal(seqs.reshape(4, 64, 64, 3),
                                pixels.transpose(0, 2, 3, 1))
  np.savez(str(tmp_path / "bad.npz"), data=np.zeros((2, 10), np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    images.read_imagenet64(str(tmp_path / "bad.npz"))


def test_sequence_batches_shift_right_with_a_start_byte():
  rng = np.random.default_rng()
  seqs = rng.integers(0, 256, (5, 12)).astype(np.uint8)
  batches = list(data.sequence_batches(seqs, 2))
  assert [b[0].shape[0] for b in batches] == [2, 2, 1]
  x = np.concatenate([b[0].numpy() for b in batches])
  y = np.concatenate([b[1].numpy() for b in batches])
  np.testing.assert_array_equal(y, seqs)
  np.testing.assert_array_equal(x[:, 0], 0)
  np.testing.assert_array_equal(x[:, 1:], seqs[:, :-1])


def _stream(seqs, seed, start, batches):
  """The targets of `batches` training batches of 3, rows as bytes."""
  ds = data.sequence_batches(seqs, 3, seed=seed, start=start)
  return [row.astype(np.uint8).tobytes() for _, y in ds.take(batches)
          for row in y.numpy()]


def test_sequence_batches_training_order_is_a_pure_function_of_the_seed():
  rng = np.random.default_rng()
  seqs = rng.integers(0, 256, (7, 5)).astype(np.uint8)
  rows = {s.tobytes(): i for i, s in enumerate(seqs)}
  seed = int(rng.integers(1 << 30))
  stream = _stream(seqs, seed, 0, 10)  # 30 examples: 4 epochs and 2
  assert stream == _stream(seqs, seed, 0, 10)
  epochs = [[rows[r] for r in stream[e * 7:e * 7 + 7]] for e in range(4)]
  for order in epochs:  # each epoch is a permutation of the sequences
    assert sorted(order) == list(range(7))
  assert len({tuple(order) for order in epochs}) > 1  # reshuffled
  # Resuming at example 11 (mid-epoch, not a batch multiple of 7) continues
  # the same stream; another seed gives another order.
  assert _stream(seqs, seed, 11, 5) == stream[11:26]
  assert _stream(seqs, seed + 1, 0, 10) != stream
  with pytest.raises(ValueError, match="start"):
    data.sequence_batches(seqs, 3, seed=seed, start=-1)
  with pytest.raises(ValueError, match="start"):
    data.training_windows(rng.integers(0, 256, 64).astype(np.uint8), 8, 2,
                          seed, start=-1)


def _write_wav(path, samples, rate, width):
  """samples: [frames, channels] ints of the given byte width."""
  with wave.open(path, "wb") as f:
    f.setnchannels(samples.shape[1])
    f.setsampwidth(width)
    f.setframerate(rate)
    if width == 1:
      f.writeframes(samples.astype(np.uint8).tobytes())
    else:
      f.writeframes(samples.astype("<i2").tobytes())


def test_mu_law_codes():
  assert audio.mu_law_encode(np.array([-1.0, 0.0, 1.0])).tolist() == [
      0, 128, 255]
  x = np.linspace(-1, 1, 1001)
  codes = audio.mu_law_encode(x)
  assert np.all(np.diff(codes.astype(int)) >= 0)
  # Mu-law steps are at most ~ 2 * ln(256) / 255 in relative terms.
  back = audio.mu_law_decode(codes)
  assert np.all(np.abs(back - x) <= 0.05 * np.abs(x) + 2e-4)


def test_wav_at_12khz_gives_mu_law_of_the_mono_mix(tmp_path):
  rng = np.random.default_rng()
  stereo = rng.integers(-30000, 30000, (500, 2))
  path = str(tmp_path / "clip.wav")
  _write_wav(path, stereo, 12000, 2)
  got = audio.read_audio(path)
  want = audio.mu_law_encode(stereo.mean(axis=1) / 32768.0)
  np.testing.assert_array_equal(got, want)
  mono8 = rng.integers(0, 256, (300, 1))
  os.makedirs(tmp_path / "dir")
  _write_wav(str(tmp_path / "dir" / "a.wav"), mono8, 12000, 1)
  got = audio.read_audio(str(tmp_path / "dir"))
  np.testing.assert_array_equal(
      got, audio.mu_law_encode((mono8[:, 0] - 128.0) / 128.0))


@pytest.mark.parametrize("rate", [8000, 24000, 44100])
def test_resampling_keeps_a_tone(tmp_path, rate):
  seconds, tone = 0.5, 440.0
  t = np.arange(int(rate * seconds)) / rate
  samples = 0.5 * np.sin(2 * np.pi * tone * t)
  out = audio.resample(samples, rate, 12000)
  assert out.size == int(12000 * seconds)
  want = 0.5 * np.sin(2 * np.pi * tone * np.arange(out.size) / 12000)
  inner = slice(200, out.size - 200)  # away from the zero-padded edges
  assert np.max(np.abs(out[inner] - want[inner])) < 5e-3


def test_audio_errors(tmp_path):
  _write(str(tmp_path / "bad.wav"), b"RIFF0000WAVEjunk")
  with pytest.raises(ValueError, match="not a readable PCM WAV"):
    audio.read_audio(str(tmp_path / "bad.wav"))
  os.makedirs(tmp_path / "empty")
  _write(str(tmp_path / "empty" / "notes.txt"), b"x")
  with pytest.raises(FileNotFoundError, match="no .wav"):
    audio.read_audio(str(tmp_path / "empty"))


def test_kinds_registry_is_the_one_list_of_data_kinds(tmp_path):
  from st_keras import config as config_lib
  from st_keras.data import kinds
  assert config_lib.DATA_KINDS == kinds.NAMES
  assert set(kinds.NAMES) == {"text", "enwik8", "cifar10", "imagenet64",
                              "audio"}
  for name in ("cifar10", "imagenet64"):
    kind = kinds.get(name)
    assert kind.metric == "bits_per_dim" and len(kind.image_shape) == 3
  assert kinds.get("audio").start_byte == audio.SILENCE
  assert [k for k in kinds.NAMES if kinds.get(k).is_text] == ["text",
                                                              "enwik8"]
  with pytest.raises(ValueError, match="data.kind must be one of"):
    kinds.get("video")
  rng = np.random.default_rng(41)
  tokens = rng.integers(0, 256, (2, 1 + 4 * 4 * 3)).astype(np.uint8)
  kinds.get("cifar10").write(tokens, str(tmp_path / "s.png"), (4, 4, 3))
  import matplotlib.image
  grid = matplotlib.image.imread(str(tmp_path / "s.png"))
  assert grid.shape[:2] == (2 * 5, 2 * 5)  # 2x2 cells of 4+1 pixels
  kinds.get("audio").write(tokens, str(tmp_path / "s.wav"))
  with wave.open(str(tmp_path / "s.wav")) as f:
    assert f.getnframes() == 2 * (tokens.shape[1] + audio.SAMPLE_RATE // 4)
  kinds.get("text").write(tokens, str(tmp_path / "s.txt"))
  assert (tmp_path / "s.txt").read_bytes().startswith(
      b"=== sample 1/2: 49 bytes ===\n" + tokens[0].tobytes())
