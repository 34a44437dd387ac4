"""Configs and the trainer: errors, exact resume, strategies (in
subprocesses: logical devices and multi-worker clusters need a fresh
TensorFlow)."""

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import yaml

from st_keras import config as config_lib
from st_keras import run_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(tmp_path, corpus, **train):
  raw = {
      "model": dict(width=16, num_layers=2, num_heads=2, stride=16,
                    summary_size=4, block_size=16),
      "data": dict(kind="text", path=str(corpus), context=64, batch_size=4),
      "train": dict(steps=4, warmup_steps=1, checkpoint_every=2,
                    eval_batches=2, output_dir=str(tmp_path / "run"),
                    sample_bytes=0, learning_rate=1e-3),
  }
  raw["train"].update(train)
  return raw


@pytest.fixture
def corpus(tmp_path):
  rng = np.random.default_rng()
  path = tmp_path / "corpus.txt"
  path.write_bytes(rng.integers(32, 127, 20000).astype(np.uint8).tobytes())
  return path


@pytest.mark.parametrize("name", config_lib.shipped())
def test_shipped_configs_load_by_name_and_path(name):
  cfg = config_lib.load(name)
  assert cfg.data.context % cfg.model.block_size == 0
  assert config_lib.load(os.path.join(config_lib.SHIPPED_DIR,
                                      name + ".yaml")) == cfg


def test_an_unknown_config_lists_the_shipped_ones():
  assert "demo_text" in config_lib.shipped()
  with pytest.raises(FileNotFoundError, match="demo_text"):
    config_lib.load("no_such_config")
  with pytest.raises(FileNotFoundError, match="neither a file"):
    config_lib.load("some/dir/demo_text.yaml")


def test_config_errors_name_the_key(tmp_path):
  with pytest.raises(KeyError, match="train.stepz"):
    config_lib.from_dict({"train": {"stepz": 3}})
  with pytest.raises(KeyError, match="optimizer"):
    config_lib.from_dict({"optimizer": {}})
  with pytest.raises(TypeError, match="train.steps must be int"):
    config_lib.from_dict({"train": {"steps": "many"}})
  with pytest.raises(TypeError, match="model.recompute must be bool"):
    config_lib.from_dict({"model": {"recompute": 1}})
  with pytest.raises(ValueError, match="train.precision"):
    config_lib.from_dict({"train": {"precision": "float8"}})
  with pytest.raises(ValueError, match="section.key=value"):
    config_lib.override({}, ["steps=3"])
  cfg = config_lib.from_dict(config_lib.override(
      {"train": {"steps": 3}}, ["train.steps=7", "model.embedding_axes=[4, 16]",
                                "train.learning_rate=1"]))
  assert (cfg.train.steps, cfg.model.embedding_axes,
          cfg.train.learning_rate) == (7, [4, 16], 1.0)


def test_the_old_name_of_summary_size_is_read(tmp_path):
  assert config_lib.from_dict(
      {"model": {"summary": 16}}).model.summary_size == 16
  assert config_lib.from_dict(config_lib.override(
      {}, ["model.summary=8"])).model.summary_size == 8
  with pytest.raises(ValueError, match="model.summary and model.summary_size"):
    config_lib.from_dict({"model": {"summary": 16, "summary_size": 16}})
  # A run directory saved before the rename resumes without a config change.
  wanted = config_lib.from_dict({}).to_dict()
  saved = json.loads(json.dumps(wanted))
  saved["model"]["summary"] = saved["model"].pop("summary_size")
  (tmp_path / run_dir.CONFIG_FILE).write_text(json.dumps(saved))
  assert run_dir.check_saved_config(str(tmp_path), wanted) == []
  wanted["model"]["summary_size"] += 1
  with pytest.raises(run_dir.RunDirectoryError,
                     match="model.summary_size: 32 -> 33"):
    run_dir.check_saved_config(str(tmp_path), wanted)


def _run_train(raw, tmp_path, *args, env=None):
  path = tmp_path / "config.yaml"
  path.write_text(yaml.safe_dump(raw))
  return subprocess.run(
      [sys.executable, "-m", "st_keras.train", "--config", str(path), *args],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, **(env or {})))


def test_cli_reports_config_errors(tmp_path, corpus):
  raw = _tiny(tmp_path, corpus)
  raw["train"]["stepz"] = 1
  result = _run_train(raw, tmp_path)
  assert result.returncode == 2
  assert "unknown config key train.stepz" in result.stderr


def _scalars(directory):
  """{tag: [step, ...]} of the scalars in a TensorBoard directory."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  steps = {}
  for name in sorted(os.listdir(directory)):
    for event in tf.compat.v1.train.summary_iterator(
        os.path.join(directory, name)):
      for value in event.summary.value:
        assert np.isfinite(tf.make_ndarray(value.tensor)), value.tag
        steps.setdefault(value.tag, []).append(event.step)
  return steps


def test_resume_continues_exactly(tmp_path, corpus, caplog):
  from st_keras import train
  caplog.set_level("INFO", logger="st_keras")
  straight = config_lib.from_dict(_tiny(tmp_path / "a", corpus, steps=5))
  whole = train.train(straight)
  split = config_lib.from_dict(_tiny(tmp_path / "b", corpus, steps=5,
                                     log_every=1))
  first = train.train(split, stop_after=3)  # stops mid-chunk
  assert first["steps"] == 3
  # Progress counts the steps that run: 2, then 1 (stopped at 3).
  assert "step 3/3 (1 steps in" in caplog.text, caplog.text[-2000:]
  assert sorted(os.listdir(tmp_path / "b" / "run" / "checkpoints"))
  second = train.train(split)
  assert second["resumed_from"] == 3 and second["steps"] == 5
  np.testing.assert_allclose(second["valid_bits_per_byte"],
                             whole["valid_bits_per_byte"], rtol=1e-5)
  assert np.isfinite(whole["tokens_per_second"])
  # Two timed steps (2 and 4; the first step of each 2-step interval is
  # not timed), so their median is their mean, which tokens_per_second gives.
  mean_ms = 1e3 * 64 * 4 / whole["tokens_per_second"]
  np.testing.assert_allclose(whole["median_step_ms"], mean_ms, rtol=1e-6)
  # history.csv: a row per checkpoint interval with its end step, appended
  # to on resume.
  def history(run):
    with open(tmp_path / run / "run" / "history.csv") as f:
      return list(csv.DictReader(f))
  rows = history("a")
  assert [int(r["step"]) for r in rows] == [2, 4, 5]
  assert all(np.isfinite(float(v)) for r in rows for v in r.values())
  # Stopped at 3 (one full interval, one cut short), then resumed to 5.
  assert [int(r["step"]) for r in history("b")] == [2, 3, 5]
  assert "step 5/5 (2 steps in" in caplog.text
  # TensorBoard: each interval's training and validation metrics and every
  # step's loss, at the run's step: the resumed run extends the curves.
  logs = tmp_path / "b" / "run" / "logs"
  train_tags = _scalars(logs / "train")
  valid_tags = _scalars(logs / "validation")
  for tag in ("epoch_loss", "epoch_bits_per_byte", "epoch_learning_rate"):
    assert train_tags[tag] == [2, 3, 5], tag
  for tag in ("epoch_loss", "epoch_bits_per_byte"):
    assert valid_tags[tag] == [2, 3, 5], tag
  assert train_tags["batch_loss"] == [1, 2, 3, 4, 5]


def test_sigterm_writes_a_checkpoint(tmp_path, corpus):
  raw = _tiny(tmp_path, corpus, steps=100000, checkpoint_every=100000,
              log_every=1)
  path = tmp_path / "config.yaml"
  path.write_text(yaml.safe_dump(raw))
  proc = subprocess.Popen(
      [sys.executable, "-m", "st_keras.train", "--config", str(path)],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=dict(os.environ, PYTHONUNBUFFERED="1"))
  watchdog = threading.Timer(300, proc.kill)  # never hang the suite
  watchdog.start()
  seen = []
  for line in proc.stdout:  # wait until training is under way
    seen.append(line)
    if "step 2/100000: loss" in line:
      break
  proc.terminate()
  out = "".join(seen) + proc.communicate(timeout=120)[0]
  watchdog.cancel()
  assert proc.returncode == 130, out[-3000:]
  assert "interrupted; run the same command to resume" in out
  checkpoints = tmp_path / "run" / "checkpoints"
  steps = [int(n.split("-")[1].split(".")[0])
           for n in os.listdir(checkpoints) if n.endswith(".index")]
  assert steps and steps[0] > 0, out[-3000:]


MIRRORED = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from st_keras import models
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (8, 65))
    ds = tf.data.Dataset.from_tensor_slices(
        (data[:, :-1].astype(np.int32), data[:, 1:].astype(np.int32))).batch(8)
    results = {}
    for name, strategy in [
        ("one", tf.distribute.OneDeviceStrategy("/cpu:0")),
        ("two", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))]:
      keras.utils.set_random_seed(1)
      with strategy.scope():
        model = models.SparseTransformer(seq_len=64, width=16, num_layers=2,
                                         num_heads=2, stride=16, summary_size=4,
                                         block_size=16)
        model.build()
        models.compile_for_training(model, keras.optimizers.SGD(0.1))
      history = model.fit(ds, epochs=2, verbose=0)
      results[name] = dict(
          replicas=strategy.num_replicas_in_sync,
          loss=history.history["loss"],
          weight=float(np.sum(model.logits.kernel.numpy())))
    print(json.dumps(results))
""")


@pytest.mark.parametrize("separator", [None, 28])
def test_held_out_file_starts_mark_files_of_the_held_out_tail(tmp_path,
                                                              separator):
  from st_keras.data import kinds
  rng = np.random.default_rng(31)
  blobs = [rng.integers(0, 256, int(rng.integers(300, 900))).astype(
      np.uint8).tobytes() for _ in range(6)]
  for i, blob in enumerate(blobs):
    (tmp_path / f"f{i}.txt").write_bytes(blob)
  data = config_lib.DataConfig(kind="text", path=str(tmp_path), context=64,
                               valid_fraction=0.6, separator=separator)
  valid = kinds.load(data)["valid"]
  starts = kinds.held_out_file_starts(data, valid)
  assert starts[0] == 0 and np.all(np.diff(starts) > 0)
  # Each later start begins a whole file (its separator first, if any); the
  # first file is cut by the split.
  head = b"" if separator is None else bytes([separator])
  ends = list(starts[1:]) + [valid.size]
  whole = [valid[a:b].tobytes() for a, b in zip(starts[1:], ends[1:])]
  assert whole == [head + b for b in blobs[len(blobs) - len(whole):]]
  assert (head + blobs[-len(whole) - 1]).endswith(valid[:starts[1]].tobytes())
  with pytest.raises(ValueError, match="data.separator must be null or a"):
    kinds.load(config_lib.DataConfig(kind="text", path=str(tmp_path),
                                     separator=300))
  enwik8 = config_lib.DataConfig(kind="enwik8", path="unused")
  assert kinds.held_out_file_starts(enwik8, valid).tolist() == [0]
  with pytest.raises(ValueError, match="data.kind=cifar10"):
    kinds.held_out_file_starts(config_lib.DataConfig(kind="cifar10"), valid)


def test_log_lines_are_printed_once():
  # The trainer's logger and TensorFlow's each print through their own
  # handler and do not propagate: a root handler (which any module-level
  # logging.info() call installs) would print their lines a second time.
  script = textwrap.dedent("""
      import logging
      from st_keras import train
      import tensorflow as tf
      train.configure_logging()
      logging.info("a library's module-level call adds a root handler")
      tf.get_logger().warning("from tensorflow")
      logging.getLogger("st_keras.train").info("from the trainer")
      """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  err = result.stderr
  assert err.count("from tensorflow") == 1, err[-2000:]
  assert err.count("from the trainer") == 1, err[-2000:]


def test_strategy_choice(monkeypatch):
  import tensorflow as tf

  from st_keras import train
  monkeypatch.delenv("TF_CONFIG", raising=False)
  assert not tf.config.list_logical_devices("GPU")  # this suite runs on CPU
  # One device: the default strategy, no mirroring.
  assert train.make_strategy("auto") is tf.distribute.get_strategy()
  assert train.make_strategy("none") is tf.distribute.get_strategy()
  assert isinstance(train.make_strategy("mirrored"),
                    tf.distribute.MirroredStrategy)
  with pytest.raises(ValueError, match="needs the TF_CONFIG"):
    train.make_strategy("multi_worker")
  with pytest.raises(ValueError, match="unknown strategy 'ring'"):
    train.make_strategy("ring")


def test_mirrored_two_devices_match_one(tmp_path):
  result = subprocess.run([sys.executable, "-c", MIRRORED], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  got = json.loads(result.stdout.strip().splitlines()[-1])
  assert (got["one"]["replicas"], got["two"]["replicas"]) == (1, 2)
  np.testing.assert_allclose(got["two"]["loss"], got["one"]["loss"],
                             rtol=1e-4)
  np.testing.assert_allclose(got["two"]["weight"], got["one"]["weight"],
                             rtol=1e-4, atol=1e-5)


def _free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("localhost", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def test_multi_worker_on_localhost(tmp_path, corpus):
  ports = _free_ports(2)
  workers = [f"localhost:{p}" for p in ports]
  procs = []
  for index in range(2):
    raw = _tiny(tmp_path / f"w{index}", corpus, steps=2, checkpoint_every=2)
    raw["train"]["output_dir"] = str(tmp_path / "run")
    raw["train"]["strategy"] = "multi_worker"
    path = tmp_path / f"config{index}.yaml"
    path.write_text(yaml.safe_dump(raw))
    tf_config = json.dumps({"cluster": {"worker": workers},
                            "task": {"type": "worker", "index": index}})
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "st_keras.train", "--config", str(path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=dict(os.environ, TF_CONFIG=tf_config)))
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["steps"] == 2
  # The chief's TensorBoard scalars, at the run's step.
  assert _scalars(tmp_path / "run" / "logs" / "train")["epoch_loss"] == [2]
  assert _scalars(tmp_path / "run" / "logs" / "validation")[
      "epoch_bits_per_byte"] == [2]
  assert os.path.isdir(tmp_path / "run" / "checkpoints")
  other = json.loads((tmp_path / "run" / "workers" / "worker_1" /
                      "summary.json").read_text())
  # Both workers hold the same synchronised model.
  np.testing.assert_allclose(other["valid_bits_per_byte"],
                             summary["valid_bits_per_byte"], rtol=1e-5)


def test_train_on_cifar10_files(tmp_path):
  from st_keras import train
  rng = np.random.default_rng()
  for name, count in (("data_batch_1.bin", 4), ("test_batch.bin", 2)):
    records = np.concatenate(
        [rng.integers(0, 10, (count, 1)),
         rng.integers(0, 256, (count, 3072))], 1).astype(np.uint8)
    (tmp_path / name).write_bytes(records.tobytes())
  raw = {
      "model": dict(width=16, num_layers=2, num_heads=2, pattern="strided",
                    integration="interleaved", stride=96, block_size=32),
      "data": dict(kind="cifar10", path=str(tmp_path), context=3072,
                   batch_size=2),
      "train": dict(steps=3, warmup_steps=1, checkpoint_every=2,
                    eval_batches=1, output_dir=str(tmp_path / "run")),
  }
  cfg = config_lib.from_dict(raw)
  model = train.build_model(cfg)
  assert model.embedding_axes == (32, 32, 3)
  summary = train.train(cfg)
  assert summary["steps"] == 3 and summary["sample"] is None
  assert 6.0 < summary["valid_bits_per_byte"] < 10.0
  # Stopped after step 1 (mid-epoch: 2 of 4 images seen) and resumed, the
  # run sees the same images in the same order as the straight one.
  raw["train"]["output_dir"] = str(tmp_path / "split")
  split = config_lib.from_dict(raw)
  assert train.train(split, stop_after=1)["steps"] == 1
  resumed = train.train(split)
  assert resumed["resumed_from"] == 1 and resumed["steps"] == 3
  np.testing.assert_allclose(resumed["valid_bits_per_byte"],
                             summary["valid_bits_per_byte"], rtol=1e-5)
  raw["data"]["context"] = 1024
  raw["train"]["output_dir"] = str(tmp_path / "short")
  with pytest.raises(ValueError, match="image length 3072"):
    train.train(config_lib.from_dict(raw))
