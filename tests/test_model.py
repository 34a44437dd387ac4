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
    (dict(padding_token=256), "padding_token"),
    (dict(padding_token=True), "padding_token"),
])
def test_model_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _model(**kwargs)


def test_model_rejects_too_many_tokens():
  model = _model()
  with pytest.raises(ValueError, match="exceed the context"):
    model(np.zeros((1, 80), np.int32))


def _documents(rng, lengths, n=64, padding_token=0):
  """Documents of `lengths` tokens (none is padding_token), right-padded."""
  docs = [rng.integers(1, 256, length).astype(np.int32) for length in lengths]
  batch = np.full((len(docs), n), padding_token, np.int32)
  for row, doc in zip(batch, docs):
    row[:doc.shape[0]] = doc
  return docs, batch


@pytest.mark.parametrize("impl", ["custom_op", "pure_tf"])
@pytest.mark.parametrize("pattern", ["fixed", "strided"])
def test_padded_documents_get_the_logits_they_get_alone(impl, pattern):
  rng = np.random.default_rng(21)
  model = _model(pattern=pattern, padding_token=0,
                 attention_implementation=impl)
  docs, batch = _documents(rng, [64, 23, 40, 1])
  by_token = model(batch).numpy()
  by_length = _model(pattern=pattern, attention_implementation=impl)
  by_length.build()
  by_length.set_weights(model.get_weights())
  lengths = tf.constant([d.shape[0] for d in docs], tf.int32)
  by_lengths = by_length(batch, key_lengths=lengths).numpy()
  for b, doc in enumerate(docs):
    alone = model(doc[None]).numpy()[0]  # any length: padded internally
    assert alone.shape == (doc.shape[0], 256)
    np.testing.assert_allclose(by_token[b, :doc.shape[0]], alone, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(by_lengths[b, :doc.shape[0]], alone,
                               rtol=1e-5, atol=1e-5)


def test_loss_and_bits_leave_the_padding_out():
  rng = np.random.default_rng(22)
  model = _model(padding_token=0)
  model.build()
  # Predicting the padding token costs ~20 nats: counting it would show.
  bias = np.zeros(256, np.float32)
  bias[0] = -20.0
  model.logits.bias.assign(bias)
  models.compile_for_training(model, keras.optimizers.Adam(1e-3))
  docs, batch = _documents(rng, [65, 30, 9], n=65)
  targets = np.array([d.shape[0] - 1 for d in docs])
  # Pad then shift (x keeps each document's last token), and shift then pad.
  shifted = np.zeros((3, 2, 64), np.int32)
  for b, doc in enumerate(docs):
    shifted[b, :, :targets[b]] = doc[:-1], doc[1:]
  for x, y in [(batch[:, :-1], batch[:, 1:]),
               (shifted[:, 0], shifted[:, 1])]:
    got = model.evaluate(x, y, verbose=0, return_dict=True)
    logits = model(x).numpy().astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nats = -np.take_along_axis(log_probs, y[..., None], -1)[..., 0]
    valid = np.arange(64)[None] < targets[:, None]
    want = nats[valid].mean()
    assert nats.mean() > want + 1.0  # the padding would count
    np.testing.assert_allclose(got["loss"], want, rtol=1e-4)
    np.testing.assert_allclose(got["bits_per_byte"], want / math.log(2),
                               rtol=1e-4)


def test_fit_on_batches_of_different_lengths():
  # padded_batch gives each batch its own length: Keras traces the step
  # with length None, and the model pads to its context.
  rng = np.random.default_rng(23)
  docs = [rng.integers(1, 256, length).astype(np.int32)
          for length in rng.integers(5, 65, 12)]
  data = tf.data.Dataset.from_generator(
      lambda: ((d[:-1], d[1:]) for d in docs), output_signature=(
          tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32)))
  data = data.padded_batch(3).apply(
      tf.data.experimental.assert_cardinality(4))
  model = _model(padding_token=0)
  models.compile_for_training(model, keras.optimizers.Adam(1e-3))
  history = model.fit(data, epochs=2, verbose=0).history
  assert np.isfinite(history["loss"]).all()
  # The traced (length None) function and the eager model agree.
  x, _ = next(iter(data))
  np.testing.assert_allclose(model.predict_on_batch(x), model(x).numpy(),
                             rtol=1e-4, atol=1e-4)


def test_a_dtype_policy_given_to_the_model_reaches_every_layer(rng):
  model = _model(dtype="mixed_bfloat16")
  logits = model(rng.integers(0, 256, (1, 64)).astype(np.int32))
  assert logits.dtype == tf.float32  # the logits stay float32
  inner = [model.token_embedding, model.position_embedding, model.final_norm]
  for block in model.blocks:
    inner += [block, block.attention, block.attention.qkv, block.ff_in]
  assert {layer.compute_dtype for layer in inner} == {"bfloat16"}
  assert model.logits.compute_dtype == "float32"
