"""Bad inputs give clear errors that name the argument or the file, never a
hang, a crash, a silent wrong answer or a misleading message: the data
readers, the model, the export and its CLI, sampling and the serving
client."""

import contextlib
import io
import os
import re
import socket
import struct
import threading
import tracemalloc
import warnings
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from st_keras import export
from st_keras import models
from st_keras import sample
from st_keras import serving_client
from st_keras.data import audio
from st_keras.data import images
from st_keras.data import text

TINY = dict(seq_len=64, width=16, num_layers=1, num_heads=2, stride=16,
            summary_size=4, block_size=16)
# A read that blocks on a FIFO fails the test after this many seconds.
TIMEOUT_S = 30
# KSDATAFORMAT_SUBTYPE_PCM and _IEEE_FLOAT as a WAV file stores them.
PCM_GUID = bytes.fromhex("0100000000001000800000aa00389b71")
FLOAT_GUID = bytes.fromhex("0300000000001000800000aa00389b71")
TOKENS_MESSAGE = r"tokens must be in 0\.\.255"


def _tiny(**kwargs):
  return models.SparseTransformer(**dict(TINY, **kwargs))


# ----------------------------------------------------------------------------
# Text: FIFOs, sockets and devices.


def _without_hanging(fn, fifos):
  """Runs fn() in a daemon thread.

  Args:
    fn: the call to run.
    fifos: FIFOs fn might block on; if it does, a writer is opened on each,
      which lets the blocked open() return, and the test fails.

  Returns:
    {'value': fn's result, 'warnings': [messages]} or {'error': exception}.
  """
  outcome = {}

  def target():
    try:
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome["value"] = fn()
      outcome["warnings"] = [str(w.message) for w in caught]
    except Exception as e:  # pylint: disable=broad-except
      outcome["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(TIMEOUT_S)
  if thread.is_alive():
    for fifo in fifos:
      with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    pytest.fail(f"{fn} blocked for {TIMEOUT_S} s on a FIFO")
  return outcome


def test_non_regular_files_in_a_directory_are_skipped_with_a_warning(
    tmp_path):
  payload = np.random.default_rng(1).integers(0, 256, 100).astype(
      np.uint8).tobytes()
  (tmp_path / "a.txt").write_bytes(payload)
  fifo = str(tmp_path / "b.fifo")
  os.mkfifo(fifo)
  with socket.socket(socket.AF_UNIX) as sock:
    sock.bind(str(tmp_path / "c.sock"))
    for fn, want in ((text.read_bytes, payload),
                     (text.file_bounds, [0, len(payload)]),
                     (text.list_files, [str(tmp_path / "a.txt")])):
      out = _without_hanging(lambda fn=fn: fn(str(tmp_path)), [fifo])
      assert "error" not in out, out.get("error")
      value = out["value"]
      assert (value.tobytes() if fn is text.read_bytes else
              list(value)) == want, fn
      skipped = " ".join(out["warnings"])
      assert "b.fifo" in skipped and "c.sock" in skipped, out["warnings"]


def test_a_path_that_is_not_a_regular_file_or_directory_is_refused(tmp_path):
  fifo = str(tmp_path / "corpus.fifo")
  os.mkfifo(fifo)
  for path in (fifo, os.devnull):
    for fn in (text.list_files, text.read_bytes, text.file_bounds):
      out = _without_hanging(lambda fn=fn, path=path: fn(path), [fifo])
      assert isinstance(out.get("error"), ValueError), (fn, path, out)
      assert re.search(f"{re.escape(path)}.* not a regular file or "
                       "directory", str(out["error"])), out["error"]
  out = _without_hanging(lambda: text.read_file(fifo), [fifo])
  assert isinstance(out.get("error"), ValueError), out
  assert "not a regular file" in str(out["error"])
  with pytest.raises(FileNotFoundError, match="no such file"):
    text.read_bytes(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------
# ImageNet .npz batches.


def test_unreadable_imagenet_npz_names_the_file(tmp_path):
  good = tmp_path / "good.npz"
  np.savez(good, data=np.random.default_rng(2).integers(
      0, 256, (2, 3 * 8 * 8)).astype(np.uint8))
  blob = good.read_bytes()
  (tmp_path / "truncated.npz").write_bytes(blob[:len(blob) // 2])
  (tmp_path / "text.npz").write_bytes(b"not an archive\n" * 4)
  (tmp_path / "zero.npz").write_bytes(b"")
  np.save(tmp_path / "array.npy", np.zeros(3, np.uint8))
  os.rename(tmp_path / "array.npy", tmp_path / "array.npz")
  np.savez(tmp_path / "empty.npz", data=np.zeros((0, 3 * 8 * 8), np.uint8))
  assert images.read_imagenet64(str(good), size=8).shape == (2, 3 * 8 * 8)
  for name, reason in (("truncated", "not a readable"),
                       ("text", "not a readable"), ("zero", "not a readable"),
                       ("array", "not a .npz archive"),
                       ("empty", "holds no image")):
    path = str(tmp_path / f"{name}.npz")
    with pytest.raises(ValueError, match=re.escape(path) + ".*" + reason):
      images.read_imagenet64(path, size=8)
  with pytest.raises(ValueError, match="array.npz"):  # the first, sorted
    images.read_imagenet64(str(tmp_path), size=8)


def test_a_fifo_among_image_batches_is_refused(tmp_path):
  fifos = [str(tmp_path / "data_batch_1.bin"), str(tmp_path / "a.npz")]
  for fifo in fifos:
    os.mkfifo(fifo)
  for fn in (images.read_cifar10, images.read_imagenet64):
    out = _without_hanging(lambda fn=fn: fn(str(tmp_path)), fifos)
    assert isinstance(out.get("error"), ValueError), (fn, out)
    assert "not a regular file" in str(out["error"]), out["error"]


# ----------------------------------------------------------------------------
# WAV files.


def _riff(fmt: bytes, data: bytes) -> bytes:
  """A RIFF/WAVE file of a 'fmt ' chunk and a 'data' chunk."""
  chunks = (b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" +
            struct.pack("<I", len(data)) + data + b"\0" * (len(data) % 2))
  return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def _fmt(channels, rate, container, valid=None, subformat=None):
  """A 'fmt ' chunk: plain PCM, or WAVE_FORMAT_EXTENSIBLE when `valid` (the
  valid bits of each `container`-bit sample) is given."""
  align = channels * container // 8
  byte_rate = min(rate * align, 2**32 - 1)
  if valid is None:
    return struct.pack("<HHIIHH", 1, channels, rate, byte_rate, align,
                       container)
  return struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, byte_rate, align,
                     container, 22, valid, 0x3) + subformat


def _pcm_bytes(samples, container, valid):
  """Signed samples left-justified in little-endian `container`-bit words."""
  words = (samples.astype(np.int64) << (container - valid)).astype("<i4")
  return words.view(np.uint8).reshape(-1, 4)[:, :container // 8].tobytes()


@pytest.mark.parametrize("container,valid", [(16, 16), (24, 24), (32, 24)])
def test_extensible_pcm_wav_is_read_like_plain_pcm(tmp_path, container,
                                                   valid):
  rng = np.random.default_rng(container + valid)
  full = 2 ** (valid - 1)
  samples = rng.integers(-full, full, (50, 2))
  samples[:2] = [[-full, full - 1], [full - 1, -full]]  # the extremes
  data = _pcm_bytes(samples, container, valid)
  path = str(tmp_path / "extensible.wav")
  with open(path, "wb") as f:
    f.write(_riff(_fmt(2, 22050, container, valid, PCM_GUID), data))
  got, rate = audio.read_wav(path)
  assert rate == 22050
  np.testing.assert_array_equal(got, (samples / 2.0 ** (valid - 1)).mean(1))
  if container == valid:  # the same samples as plain PCM
    plain = str(tmp_path / "plain.wav")
    with open(plain, "wb") as f:
      f.write(_riff(_fmt(2, 22050, container), data))
    np.testing.assert_array_equal(audio.read_wav(plain)[0], got)
  floats = str(tmp_path / "float.wav")
  with open(floats, "wb") as f:
    f.write(_riff(_fmt(2, 22050, 32, 32, FLOAT_GUID), data))
  with pytest.raises(ValueError, match=re.escape(floats) + ".*not integer"):
    audio.read_wav(floats)


def test_wav_sample_rates_outside_the_supported_range_name_the_file(
    tmp_path):
  data = _pcm_bytes(np.arange(-20, 20), 16, 16)
  for rate in (0, 384_001, 4_000_000_000):
    path = str(tmp_path / f"rate{rate}.wav")
    with open(path, "wb") as f:
      f.write(_riff(_fmt(1, rate, 16), data))
    with pytest.raises(ValueError,
                       match=re.escape(path) + f".*sample rate {rate} Hz"):
      audio.read_wav(path)
  for rate in (1, 384_000):
    path = str(tmp_path / f"ok{rate}.wav")
    with open(path, "wb") as f:
      f.write(_riff(_fmt(1, rate, 16), data))
    assert audio.read_wav(path)[1] == rate
  with pytest.raises(ValueError, match="sample rates must be in"):
    audio.resample(np.zeros(8), 0, 12_000)
  with pytest.raises(ValueError, match="kernel"):
    audio.resample(np.zeros(8), 384_000, 12)


def test_resampling_memory_is_bounded_at_the_highest_rate():
  samples = np.random.default_rng(3).standard_normal(96_000)
  tracemalloc.start()
  try:
    out = audio.resample(samples, 384_000, 12_000)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert out.size == 3000 and np.isfinite(out).all()
  assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------
# The model.


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=8), "block_size must be one of"),
    (dict(block_size=48, seq_len=96), "block_size must be one of"),
    (dict(block_size=256, seq_len=256), "block_size must be one of"),
    (dict(summary_size=0), "summary_size must be a positive int"),
    (dict(summary_size=-2), "summary_size must be a positive int"),
    (dict(summary_size=2.5), "summary_size must be a positive int"),
    (dict(summary_size=True), "summary_size must be a positive int"),
    (dict(summary_size=17), r"summary_size must be <= stride \(16\)"),
])
def test_model_rejects_bad_block_size_and_summary_when_built(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _tiny(**kwargs)


def test_summary_is_bounded_by_stride_for_the_fixed_pattern_only():
  assert _tiny(summary_size=16).summary_size == 16
  assert _tiny(pattern="strided", summary_size=17).summary_size == 17


@pytest.fixture(scope="module")
def tiny_model():
  model = _tiny()
  model.build()
  return model


def _tokens(bad=None):
  tokens = np.random.default_rng(4).integers(0, 256, (2, 64)).astype(np.int32)
  if bad is not None:
    tokens[1, 17] = bad
  return tokens


def test_tokens_out_of_range_fail_eagerly_and_in_tf_function(tiny_model):
  call = tf.function(lambda tokens: tiny_model(tokens))
  for bad in (-1, -256, 256, 1 << 20):
    for fn in (tiny_model, call):
      with pytest.raises(tf.errors.InvalidArgumentError,
                         match=TOKENS_MESSAGE):
        fn(tf.constant(_tokens(bad)))
  want = tiny_model(_tokens()).numpy()
  for dtype in (np.uint8, np.int64):
    np.testing.assert_array_equal(
        tiny_model(_tokens().astype(dtype)).numpy(), want)
  with pytest.raises(TypeError, match="tokens must be integers"):
    tiny_model(_tokens().astype(np.float32))


def test_tokens_out_of_range_fail_in_predict_and_fit():
  model = _tiny()
  models.compile_for_training(model, keras.optimizers.AdamW(1e-3))
  targets = _tokens()
  with pytest.raises(tf.errors.InvalidArgumentError, match=TOKENS_MESSAGE):
    model.predict(_tokens(-1), verbose=0)
  with pytest.raises(tf.errors.InvalidArgumentError, match=TOKENS_MESSAGE):
    model.fit(_tokens(-3), targets, epochs=1, verbose=0)
  assert model.predict(_tokens(), verbose=0).shape == (2, 64, 256)


# ----------------------------------------------------------------------------
# The export and its CLI.


@pytest.fixture(scope="module")
def race(tmp_path_factory):
  """Two `st-export` runs of one model to one version at once, each of which
  has written its SavedModel before either publishes it."""
  root = tmp_path_factory.mktemp("race")
  model = _tiny()
  model.build()
  keras_path = str(root / "model.keras")
  model.save(keras_path)
  base = str(root / "serving")
  write, barrier = export.export, threading.Barrier(2)

  def write_then_wait(*args, **kwargs):
    try:
      out = write(*args, **kwargs)
    except BaseException:
      barrier.abort()
      raise
    barrier.wait(timeout=120)
    return out

  results = [None, None]

  def run(i):
    try:
      results[i] = export.main(["--model", keras_path, "--output", base,
                                "--version", "1"])
    except SystemExit as e:
      results[i] = e.code
    except Exception as e:  # pylint: disable=broad-except
      results[i] = repr(e)

  stderr = io.StringIO()
  with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(
      stderr):
    patch.setattr(export, "export", write_then_wait)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
  return {"model": model, "keras_path": keras_path, "base": base,
          "path": os.path.join(base, "1"), "results": results,
          "stderr": stderr.getvalue()}


@pytest.fixture(scope="module")
def served(race):
  return tf.saved_model.load(race["path"])


def test_concurrent_exports_to_one_version_one_wins(race, served):
  assert sorted(race["results"], key=str) == [0, 2], race["results"]
  assert re.search(re.escape(race["path"]) + ".* exists", race["stderr"]), (
      race["stderr"][-2000:])
  assert os.listdir(race["base"]) == ["1"]  # no temporary directory left
  tokens = _tokens()
  out = served.signatures["next_token"](
      tokens=tf.constant(tokens), lengths=tf.constant([64, 30], tf.int32))
  want = race["model"](tokens).numpy()[[0, 1], [63, 29]]
  np.testing.assert_allclose(out["logits"].numpy(), want, rtol=1e-4,
                             atol=1e-4)


def test_exported_model_checks_tokens_with_stock_ops(race):
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(race["path"], "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  nodes = [n for fn in proto.meta_graphs[0].graph_def.library.function
           for n in fn.node_def]
  assert not [n.op for n in nodes if ">" in n.op]  # no custom op
  messages = {s for n in nodes if n.op == "Const"
              for s in n.attr["value"].tensor.string_val}
  # The model's own check (the signatures' say "tokens: tokens must...").
  assert b"tokens must be in 0..255" in messages, sorted(messages)


def test_generate_signature_rejects_overflowing_length_and_bad_temperature(
    served):
  generate = served.signatures["generate"]

  def run(length=3, temperature=1.0):
    return generate(prompt=tf.constant([[1, 2, 3]]),
                    length=tf.constant(length, tf.int32),
                    temperature=tf.constant(temperature, tf.float32),
                    seed=tf.constant(5, tf.int64))["tokens"]

  assert run().shape == (1, 6)
  for length in (2**31 - 1, 2**31 - 3):  # 3 + length overflows int32
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="prompt \\+ length: must fit the context"):
      run(length=length)
  for temperature in (np.inf, np.nan, -np.inf, 0.0):
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="temperature: must be finite and > 0"):
      run(temperature=temperature)


def _cli_error(capsys, argv):
  """The exit code and stderr of an `st-export` run that must fail."""
  with pytest.raises(SystemExit) as exit_info:
    export.main(argv)
  return exit_info.value.code, capsys.readouterr().err


def test_cli_tells_a_missing_model_from_an_unreadable_one(race, tmp_path,
                                                          capsys):
  output = str(tmp_path / "serving")
  missing = str(tmp_path / "missing.keras")
  code, err = _cli_error(capsys, ["--model", missing, "--output", output])
  assert code == 2 and f"--model {missing}: file not found" in err, err
  with open(race["keras_path"], "rb") as f:
    blob = f.read()
  unreadable = {"garbage.keras": b"\x00garbage" * 50,
                "truncated.keras": blob[:len(blob) // 2]}
  for name, payload in unreadable.items():
    (tmp_path / name).write_bytes(payload)
  with zipfile.ZipFile(tmp_path / "other.keras", "w") as archive:
    archive.writestr("notes.txt", "not a model")
  for name in list(unreadable) + ["other.keras"]:
    path = str(tmp_path / name)
    code, err = _cli_error(capsys, ["--model", path, "--output", output])
    assert code == 2 and f"--model {path}: could not be read" in err, err
    assert "not found" not in err, err
  (tmp_path / "file").write_bytes(b"x")
  code, err = _cli_error(capsys, ["--model", race["keras_path"], "--output",
                                  str(tmp_path / "file")])
  assert code == 2 and "exists and is not a directory" in err, err
  assert not os.path.exists(output)


# ----------------------------------------------------------------------------
# Sampling in Python.


@pytest.mark.parametrize("temperature", [np.inf, np.nan, -1.0, "1", True])
def test_sampling_rejects_a_temperature_that_is_not_finite_positive(
    temperature):
  with pytest.raises(ValueError, match="temperature must be a finite"):
    sample.check_sampling_args(temperature, 0, 1.0)
  with pytest.raises(ValueError, match="temperature must be a finite"):
    sample.generate(_tiny(), [[1, 2]], 3, temperature=temperature)


@pytest.mark.parametrize("length,match", [
    (2.5, "length must be an int"), (-1, "length must be an int"),
    (True, "length must be an int"), ("3", "length must be an int"),
    (np.int32(2**31 - 1), "fit the context"), (2**40, "fit the context"),
])
def test_generate_rejects_a_bad_length(length, match):
  with pytest.raises(ValueError, match=match):
    sample.generate(_tiny(), [[1, 2]], length)


def test_generate_rejects_float_prompts():
  with pytest.raises(ValueError, match="prompt tokens must be integers"):
    sample.generate(_tiny(), [[1.5, 2.0]], 3)


# ----------------------------------------------------------------------------
# The serving client.


GOOD = {"prompt": [[1, 2]], "length": 3, "temperature": 0.5, "seed": 7}


@pytest.mark.parametrize("name,value", [
    ("length", 2**31), ("length", -2**31 - 1), ("length", 2.5),
    ("length", np.nan), ("length", np.inf), ("length", True), ("length", "3"),
    ("seed", 2**63), ("seed", 2.0**63), ("seed", 2**70), ("seed", 1.5),
    ("prompt", [[1, 2**32 + 1]]), ("prompt", [[1.5, 2.0]]),
    ("prompt", [[True, False]]), ("prompt", [["a", "b"]]),
    ("temperature", np.inf), ("temperature", np.nan),
    ("temperature", 1e39), ("temperature", True), ("temperature", "0.5"),
])
def test_client_refuses_values_that_do_not_fit_their_dtype(name, value):
  inputs = dict(GOOD, **{name: value})
  with pytest.raises(ValueError, match=f"^{name}: "):
    serving_client.signature_inputs("generate", inputs)


def test_client_converts_values_that_fit_exactly():
  inputs = {"prompt": np.array([[0, 255]], np.uint8), "length": 3.0,
            "temperature": 2, "seed": -2**63}
  out = serving_client.signature_inputs("generate", inputs)
  assert out["prompt"].dtype == np.int32 and out["prompt"].tolist() == [
      [0, 255]]
  assert out["length"].dtype == np.int32 and out["length"] == 3
  assert out["temperature"].dtype == np.float32 and out["temperature"] == 2
  assert out["seed"].dtype == np.int64 and out["seed"] == -2**63
  with pytest.raises(ValueError, match="^lengths: "):
    serving_client.signature_inputs(
        "score", {"tokens": [[1, 2]], "lengths": [2**31 + 2]})
