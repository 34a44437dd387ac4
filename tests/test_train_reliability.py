"""The trainer under faults: kill -9 at random moments (inside checkpoint
writes too), damaged checkpoints, a second trainer, a changed config, a
diverging run, steps a loss scaler skips, and bad configs."""

import csv
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from st_keras import checkpoints
from st_keras import config as config_lib
from st_keras import run_dir
from st_keras import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 12, 2


def _raw(corpus, output_dir, **train_overrides):
  raw = {
      "model": dict(width=16, num_layers=2, num_heads=2, stride=16,
                    summary_size=4, block_size=16),
      "data": dict(kind="text", path=str(corpus), context=64, batch_size=4),
      "train": dict(steps=STEPS, warmup_steps=1, checkpoint_every=EVERY,
                    eval_batches=2, output_dir=str(output_dir),
                    sample_bytes=0, learning_rate=1e-3, log_every=1),
  }
  raw["train"].update(train_overrides)
  return raw


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  rng = np.random.default_rng(29)
  path.write_bytes(rng.integers(32, 127, 20000).astype(np.uint8).tobytes())
  return path


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
  """An uninterrupted run of STEPS steps: (its raw config, its summary)."""
  raw = _raw(corpus, tmp_path_factory.mktemp("straight") / "run")
  return raw, train.train(config_lib.from_dict(raw))


def _weights(run):
  model = keras.models.load_model(os.path.join(run, "model.keras"))
  return model.get_weights()


def _history(run):
  with open(os.path.join(run, "history.csv")) as f:
    return list(csv.DictReader(f))


def _saved_steps(run):
  return checkpoints.checkpoint_steps(os.path.join(run, "checkpoints"))


# Runs the trainer CLI; with a save number k > 0, kills itself with SIGKILL
# at a random moment (0-20 ms) after the k-th checkpoint write begins:
# before, inside or after the write, as the timer falls.
DRIVER = textwrap.dedent("""
    import os, random, signal, sys, threading
    import tensorflow as tf
    from st_keras import train
    config, seed, kill_at_save = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    save, count = tf.train.CheckpointManager.save, [0]
    def killing_save(self, *args, **kwargs):
      count[0] += 1
      if count[0] == kill_at_save:
        threading.Timer(rng.uniform(0.0, 0.02), os.kill,
                        (os.getpid(), signal.SIGKILL)).start()
      return save(self, *args, **kwargs)
    tf.train.CheckpointManager.save = killing_save
    sys.exit(train.main(["--config", config]))
""")


def _start(raw, tmp_path, seed, kill_at_save=0):
  path = tmp_path / f"config{seed}.yaml"
  path.write_text(yaml.safe_dump(raw))
  return subprocess.Popen(
      [sys.executable, "-c", DRIVER, str(path), str(seed), str(kill_at_save)],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _wait(proc, timeout=300):
  timer = threading.Timer(timeout, proc.kill)  # never hang the suite
  timer.start()
  out = proc.communicate()[0]
  timer.cancel()
  return out


def test_kill_9_and_a_damaged_checkpoint_resume_to_the_same_weights(
    finished, corpus, tmp_path, caplog):
  straight, _ = finished
  run = tmp_path / "run"
  raw = _raw(corpus, run)
  rng = random.Random(290)

  # 1. Killed at a random moment of its first or second checkpoint write.
  proc = _start(raw, tmp_path, seed=1, kill_at_save=rng.randint(1, 2))
  out = _wait(proc)
  assert proc.returncode == -signal.SIGKILL, out[-3000:]

  # 2. Killed from outside at a random moment, after two more checkpoints.
  # While it trains, a second trainer on the same directory is refused.
  resumed = _saved_steps(run)[0] if _saved_steps(run) else 0
  proc = _start(raw, tmp_path, seed=2)
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if f"step {resumed + 2 * EVERY + 1}/{STEPS}: loss" in line:
      break
  with pytest.raises(run_dir.RunDirectoryError, match="in use by another"):
    train.train(config_lib.from_dict(raw))
  threading.Event().wait(rng.uniform(0.0, 0.3))
  proc.send_signal(signal.SIGKILL)
  out = "".join(seen) + _wait(proc)
  assert proc.returncode == -signal.SIGKILL, out[-3000:]

  # 3. The newest checkpoint and the state file are damaged, and a killed
  # write's leftovers lie beside them.
  directory = run / "checkpoints"
  newest, older = _saved_steps(run)[:2]
  data = next(directory.glob(f"ckpt-{newest}.data-*"))
  blob = bytearray(data.read_bytes())
  blob[len(blob) // 2] ^= 0xFF
  data.write_bytes(bytes(blob))
  (directory / "checkpoint").write_text("model_checkpoint_path: {{{")
  (directory / "ckpt-999_temp").mkdir()
  (directory / "ckpt-999_temp" / "part-00000-of-00001.index").write_bytes(b"x")

  # 4. The resumed run falls back to the older checkpoint, says so, and
  # ends where the uninterrupted run ended, bit for bit.
  with caplog.at_level(logging.WARNING, logger="st_keras.checkpoints"):
    summary = train.train(config_lib.from_dict(raw))
  assert summary["resumed_from"] == older and summary["steps"] == STEPS
  assert f"skipped damaged checkpoint ckpt-{newest}" in caplog.text
  assert "ckpt-999_temp" in caplog.text
  assert not (directory / "ckpt-999_temp").exists()
  assert (directory / "damaged" / data.name).exists()  # kept, not deleted
  assert _saved_steps(run) == [STEPS, STEPS - EVERY]
  for got, want in zip(_weights(run), _weights(straight["train"]["output_dir"])):
    np.testing.assert_array_equal(got, want)
  assert _history(run) == _history(straight["train"]["output_dir"])


def _checkpoint(value):
  variables = {"w": tf.Variable(tf.fill([64, 8], value)),
               "b": tf.Variable(value)}
  return tf.train.Checkpoint(**variables), variables


def test_restore_falls_back_past_damaged_checkpoints(tmp_path, caplog):
  checkpoint, variables = _checkpoint(0.0)
  manager = tf.train.CheckpointManager(checkpoint, str(tmp_path),
                                       max_to_keep=3)
  for step in (2, 4, 6):
    variables["b"].assign(float(step))
    variables["w"].assign(tf.fill([64, 8], float(step)))
    manager.save(checkpoint_number=step)
  # ckpt-6: a truncated data file; ckpt-4: no index (a killed merge leaves
  # a data file alone); no state file.
  data6 = next(tmp_path.glob("ckpt-6.data-*"))
  data6.write_bytes(data6.read_bytes()[:40])
  os.remove(tmp_path / "ckpt-4.index")
  os.remove(tmp_path / "checkpoint")
  _, into = _checkpoint(-1.0)
  with caplog.at_level(logging.WARNING, logger="st_keras.checkpoints"):
    result = checkpoints.restore_newest_intact(into, str(tmp_path))
  assert result.step == 2 and float(into["b"].numpy()) == 2.0
  np.testing.assert_array_equal(into["w"].numpy(), np.full([64, 8], 2.0))
  assert [d.split(":")[0] for d in result.damaged] == ["ckpt-6"]
  assert result.removed == ["ckpt-4.data-00000-of-00001"]
  assert "skipped damaged checkpoint ckpt-6" in caplog.text
  assert sorted(os.listdir(tmp_path / "damaged")) == sorted(
      ["ckpt-6.index", data6.name])
  # The state file now names the checkpoint that was restored.
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-2")


def test_restore_refuses_when_nothing_is_readable(tmp_path):
  checkpoint, _ = _checkpoint(1.0)
  tf.train.CheckpointManager(checkpoint, str(tmp_path), max_to_keep=2).save(
      checkpoint_number=3)
  index = tmp_path / "ckpt-3.index"
  index.write_bytes(index.read_bytes()[:10])
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(checkpoints.CheckpointError,
                     match="no checkpoint .* can be read.*ckpt-3"):
    checkpoints.restore_newest_intact(_checkpoint(0.0)[1], str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == before  # nothing moved or deleted
  index.unlink()
  tf.train.CheckpointManager(checkpoint, str(tmp_path), max_to_keep=2).save(
      checkpoint_number=4)
  with pytest.raises(checkpoints.CheckpointError, match="does not fit"):
    checkpoints.restore_newest_intact({"w": tf.Variable(tf.zeros([3]))},
                                      str(tmp_path))
  assert (tmp_path / "ckpt-4.index").exists()


def test_objects_older_checkpoints_lack_are_optional(tmp_path):
  old = {"w": tf.Variable(tf.fill([64, 8], 3.0))}
  tf.train.CheckpointManager(tf.train.Checkpoint(**old), str(tmp_path),
                             max_to_keep=2).save(checkpoint_number=7)
  _, into = _checkpoint(-1.0)
  with pytest.raises(checkpoints.CheckpointError, match="does not fit"):
    checkpoints.restore_newest_intact(into, str(tmp_path))
  result = checkpoints.restore_newest_intact(into, str(tmp_path),
                                             optional=["b"])
  assert (result.step, result.absent) == (7, ["b"])
  np.testing.assert_array_equal(into["w"].numpy(), np.full([64, 8], 3.0))
  assert float(into["b"].numpy()) == -1.0


def test_a_changed_config_is_refused_and_the_step_budget_is_not(
    finished, tmp_path):
  straight, summary = finished
  run = straight["train"]["output_dir"]
  saved = (open(os.path.join(run, "config.json")).read(),
           _saved_steps(run))
  changed = json.loads(json.dumps(straight))
  changed["model"]["pattern"] = "strided"
  changed["train"]["learning_rate"] = 0.1
  changed["data"]["context"] = 128
  with pytest.raises(run_dir.RunDirectoryError) as error:
    train.train(config_lib.from_dict(changed))
  for key in ("model.pattern", "train.learning_rate", "data.context"):
    assert key in str(error.value)
  assert str(error.value).count(" -> ") == 3  # those keys, no others
  assert (open(os.path.join(run, "config.json")).read(),
          _saved_steps(run)) == saved
  # Only the step budget changed: the run resumes (already finished here).
  budget = json.loads(json.dumps(straight))
  budget["train"]["steps"] = STEPS - 2
  again = train.train(config_lib.from_dict(budget))
  assert again["resumed_from"] == STEPS == summary["steps"]
  # The CLI says so in one line and exits 2.
  path = tmp_path / "changed.yaml"
  path.write_text(yaml.safe_dump(changed))
  assert train.main(["--config", str(path)]) == 2


def test_a_held_directory_is_refused(tmp_path):
  with run_dir.RunLock(str(tmp_path)):
    with pytest.raises(run_dir.RunDirectoryError, match=str(os.getpid())):
      with run_dir.RunLock(str(tmp_path)):
        pass
  with run_dir.RunLock(str(tmp_path)):  # released
    pass


def test_divergence_stops_and_keeps_the_last_finite_checkpoint(
    finished, tmp_path, capsys):
  straight, _ = finished
  run = tmp_path / "run"
  shutil.copytree(straight["train"]["output_dir"], run)
  diverging = json.loads(json.dumps(straight))
  diverging["train"].update(output_dir=str(run), steps=STEPS + 4,
                            learning_rate=1e30)
  path = tmp_path / "diverging.yaml"
  path.write_text(yaml.safe_dump(diverging))
  status = train.main(["--config", str(path), "--allow-config-change"])
  err = capsys.readouterr().err
  assert status == 1, err[-3000:]
  assert "training diverged at step" in err and f"ckpt-{STEPS}" in err
  assert _saved_steps(run) == [STEPS, STEPS - 2]
  reader = tf.train.load_checkpoint(str(run / "checkpoints" / f"ckpt-{STEPS}"))
  for name in reader.get_variable_to_shape_map():
    value = reader.get_tensor(name)
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
      assert np.isfinite(value).all(), name
  assert [int(r["step"]) for r in _history(run)] == list(
      range(EVERY, STEPS + 1, EVERY))


def test_skipped_loss_scaled_steps_still_count(corpus, tmp_path,
                                               monkeypatch):
  # A loss scale of 2^20 overflows the float16 gradients of the first
  # batches, which the loss scaler skips: steps count batches, not updates.
  init = keras.optimizers.LossScaleOptimizer.__init__
  monkeypatch.setattr(
      keras.optimizers.LossScaleOptimizer, "__init__",
      lambda self, inner, **kw: init(self, inner,
                                     **dict(kw, initial_scale=2.0 ** 20)))
  steps = 6
  straight = train.train(config_lib.from_dict(_raw(
      corpus, tmp_path / "straight", steps=steps,
      precision="mixed_float16")))
  assert straight["steps"] == steps > straight["updates"] > 0
  assert _saved_steps(tmp_path / "straight") == [steps, steps - 2]
  assert [int(r["step"]) for r in _history(tmp_path / "straight")] == [
      2, 4, 6]
  split = config_lib.from_dict(_raw(corpus, tmp_path / "split", steps=steps,
                                    precision="mixed_float16"))
  assert train.train(split, stop_after=3)["steps"] == 3
  resumed = train.train(split)
  assert (resumed["resumed_from"], resumed["steps"]) == (3, steps)
  for got, want in zip(_weights(tmp_path / "split"),
                       _weights(tmp_path / "straight")):
    np.testing.assert_array_equal(got, want)
  again = train.train(split)  # finished: trains nothing more
  assert (again["resumed_from"], again["updates"]) == (
      steps, resumed["updates"])


@pytest.mark.parametrize("section,key,value,match", [
    ("train", "steps", -1, "train.steps must be >= 0"),
    ("train", "checkpoint_every", 0, "train.checkpoint_every must be >= 1"),
    ("train", "checkpoint_every", -5, "train.checkpoint_every must be >= 1"),
    ("train", "learning_rate", -1e-3, "train.learning_rate must be >= 0"),
    ("train", "learning_rate", float("nan"), "train.learning_rate must be"),
    ("train", "beta_1", 1.0, r"train.beta_1 must be in \[0, 1\)"),
    ("train", "beta_1", -0.1, r"train.beta_1 must be in \[0, 1\)"),
    ("train", "clipnorm", 0.0, "train.clipnorm must be > 0"),
    ("train", "warmup_steps", -1, "train.warmup_steps must be >= 0"),
    ("data", "valid_fraction", -0.5, r"data.valid_fraction must be in \(0"),
    ("data", "batch_size", 0, "data.batch_size must be >= 1"),
    ("model", "dropout", 1.0, r"model.dropout must be in \[0, 1\)"),
])
def test_out_of_range_values_name_the_key(section, key, value, match):
  with pytest.raises(ValueError, match=match):
    config_lib.from_dict({section: {key: value}})


@pytest.mark.parametrize("text,match", [
    ("train: {steps: [1, 2\n", "invalid YAML at line 2"),
    ("train: !!python/object/apply:os.system ['true']\n",
     "could not determine a constructor"),
    ("- model\n- data\n", "a config must be a mapping of sections"),
    ("model: 5\n", "config section model must be a mapping"),
    ("model: &m {width: *m}\n", "alias refers to a node that contains it"),
    ("a: &a [*a]\n", "alias refers to a node that contains it"),
    ("train: {steps: -3}\n", "train.steps must be >= 0"),
])
def test_cli_gives_one_line_config_errors(tmp_path, capsys, text, match):
  path = tmp_path / "bad.yaml"
  path.write_text(text)
  with pytest.raises(SystemExit) as stop:
    train.main(["--config", str(path)])
  err = capsys.readouterr().err
  assert stop.value.code == 2
  assert "Traceback" not in err
  assert err.startswith("usage:")
  last = err.strip().splitlines()[-1]
  assert last.startswith("train.py: error:") or ": error: " in last, err
  assert match in last, err


@pytest.mark.parametrize("argument", ["0", "-3"])
def test_cli_rejects_a_stop_after_below_one(argument, capsys):
  with pytest.raises(SystemExit):
    train.main(["--config", "unused.yaml", "--stop-after", argument])
  assert "--stop-after: must be >= 1" in capsys.readouterr().err


def test_floats_in_exponent_notation():
  cfg = config_lib.from_dict(config_lib.override(
      config_lib.parse_yaml("train: {learning_rate: 1.0e4, steps: 10}"),
      ["train.weight_decay=1e-3", "train.clipnorm=2E+1"]))
  assert (cfg.train.learning_rate, cfg.train.weight_decay,
          cfg.train.clipnorm, cfg.train.steps) == (1e4, 1e-3, 20.0, 10)
  assert isinstance(cfg.train.learning_rate, float)
  with pytest.raises(TypeError, match="data.path must be str"):
    config_lib.from_dict(config_lib.parse_yaml("data: {path: 1e3}"))


def test_history_rows_past_the_resumed_step_are_dropped(tmp_path):
  path = str(tmp_path / "history.csv")
  history = run_dir.History(path, resume_step=0)
  for step in (2, 4, 6):
    history.append(step, {"loss": step / 10, "val_loss": step / 5})
  # The run is resumed from step 4 (the checkpoint of 6 was lost).
  history = run_dir.History(path, resume_step=4)
  history.append(6, {"loss": 0.7, "val_loss": 1.4})
  rows = _history(tmp_path)
  assert [(r["step"], float(r["loss"])) for r in rows] == [
      ("2", 0.2), ("4", 0.4), ("6", 0.7)]
  assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]
