"""The SparseTransformer model: training steps per integration mode, the
bits-per-byte metric, causality, save/load, mixed precision, errors."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from st_keras import models

TINY = dict(seq_len=64, width=16, num_layers=2, num_heads=2, stride=16,
            summary_size=4, block_size=16)


def _model(**kwargs):
  args = dict(TINY)
  args.update(kwargs)
  return models.SparseTransformer(**args)


def _batches(rng, count=4, batch=2, n=64):
  data = rng.integers(0, 256, (count * batch, n + 1))
  return tf.data.Dataset.from_tensor_slices(
      (data[:, :-1].astype(np.int32), data[:, 1:].astype(np.int32))).batch(
          batch)


@pytest.mark.parametrize("pattern,integration", [
    ("fixed", "merged"), ("fixed", "multihead"), ("fixed", "interleaved"),
    ("strided", "interleaved"), ("dense", "merged")])
def test_two_fit_steps_per_integration_mode(pattern, integration):
  rng = np.random.default_rng()
  model = _model(pattern=pattern, integration=integration, dropout=0.1,
                 seed=1)
  models.compile_for_training(model, keras.optimizers.AdamW(1e-3))
  model.build()
  before = [w.numpy().copy() for w in model.trainable_weights]
  history = model.fit(_batches(rng, count=2), epochs=1, verbose=0)
  losses = history.history["loss"]
  bits = history.history["bits_per_byte"]
  assert np.isfinite(losses).all() and np.isfinite(bits).all()
  # Random bytes: close to 8 bits at initialisation.
  assert 6.0 < bits[-1] < 10.0
  changed = [not np.allclose(b, w.numpy())
             for b, w in zip(before, model.trainable_weights)]
  assert all(changed), "some weights received no update"


def test_layer_modes_alternate_parts_when_interleaved():
  assert models.layer_modes("fixed", "interleaved", 3) == [
      "local", "summary", "local"]
  assert models.layer_modes("strided", "interleaved", 2) == [
      "local", "stride"]
  assert models.layer_modes("fixed", "multihead", 2) == ["multihead"] * 2
  with pytest.raises(ValueError, match="integration"):
    models.layer_modes("fixed", "stacked", 2)


def test_bits_per_byte_is_cross_entropy_in_bits():
  rng = np.random.default_rng()
  logits = rng.standard_normal((3, 5, 256))
  targets = rng.integers(0, 256, (3, 5))
  metric = models.BitsPerByte()
  metric.update_state(targets, logits.astype(np.float32))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nats = -np.take_along_axis(logp, targets[..., None], -1).mean()
  np.testing.assert_allclose(float(metric.result()), nats / math.log(2),
                             rtol=1e-5)


@pytest.mark.parametrize("pattern", ["fixed", "strided", "dense"])
def test_model_is_causal(pattern):
  rng = np.random.default_rng()
  model = _model(pattern=pattern)
  x = rng.integers(0, 256, (1, 64)).astype(np.int32)
  y = x.copy()
  y[:, 40:] = (y[:, 40:] + 1) % 256
  np.testing.assert_allclose(model(x).numpy()[:, :40],
                             model(y).numpy()[:, :40], rtol=1e-5, atol=1e-5)
  assert not np.allclose(model(x).numpy()[:, 40:], model(y).numpy()[:, 40:])


def test_save_and_load_round_trip(tmp_path):
  rng = np.random.default_rng()
  model = _model(pattern="strided", integration="multihead", recompute=True,
                 dropout=0.2, seed=5, qk_ratio=0.5, ff_multiplier=0.5)
  models.compile_for_training(model, keras.optimizers.AdamW(1e-3))
  model.fit(_batches(rng, count=1), epochs=1, verbose=0)
  x = rng.integers(0, 256, (2, 64)).astype(np.int32)
  want = model(x).numpy()
  path = str(tmp_path / "model.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded, models.SparseTransformer)
  assert loaded.get_config() == model.get_config()
  np.testing.assert_allclose(loaded(x).numpy(), want, rtol=1e-6, atol=1e-6)
  clone = models.SparseTransformer.from_config(model.get_config())
  assert clone.get_config() == model.get_config()


def test_summary_prints_for_a_built_and_a_loaded_model(tmp_path):
  # The fixed pattern's c is summary_size: an attribute named `summary`
  # hid keras.Model.summary() ("'int' object is not callable").
  model = _model()
  model.build()
  lines = []
  model.summary(print_fn=lines.append)
  text = "\n".join(lines)
  assert "block_0" in text and "Total params" in text
  path = str(tmp_path / "model.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  lines = []
  loaded.summary(print_fn=lines.append)
  assert "\n".join(lines) == text
  assert loaded.summary_size == 4


def test_a_config_saved_with_the_old_summary_key_loads():
  model = _model(summary_size=8)
  old = dict(model.get_config())
  old["summary"] = old.pop("summary_size")
  clone = models.SparseTransformer.from_config(old)
  assert clone.summary_size == 8
  assert clone.get_config() == model.get_config()


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_training_step_is_finite(policy):
  rng = np.random.default_rng()
  keras.mixed_precision.set_global_policy(policy)
  try:
    model = _model(recompute=True, dropout=0.1, seed=2)
    models.compile_for_training(model, keras.optimizers.AdamW(1e-3))
    history = model.fit(_batches(rng, count=2), epochs=1, verbose=0)
    block = model.blocks[0]
    assert block.attention.qkv.compute_dtype == policy.split("_")[1]
    assert model(np.zeros((1, 64), np.int32)).dtype == tf.float32
  finally:
    keras.mixed_precision.set_global_policy("float32")
  if policy == "mixed_float16":
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
  assert np.isfinite(history.history["loss"]).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_len=60), "multiple of block_size"),
    (dict(width=0), "width"),
    (dict(integration="stacked"), "integration"),
    (dict(pattern="diagonal"), "pattern"),
])
def test_model_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _model(**kwargs)


def test_model_rejects_too_many_tokens():
  model = _model()
  with pytest.raises(ValueError, match="exceed the context"):
    model(np.zeros((1, 80), np.int32))
