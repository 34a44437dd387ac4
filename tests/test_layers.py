"""Keras layers: attention against a float64 reference, embeddings, residual
block (formula, initialisation, recomputation), config round trips."""

import logging
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from st_keras import layers
from tests import layer_testing
from tests import reference

IMPLS = ["custom_op", "pure_tf"]
SMALL = dict(stride=32, summary=8, block_size=16)


def _attention_reference(layer, x, mask=None):
  """The layer's function in float64 numpy: projections from its weights,
  dense masked softmax over `mask` (default: layout.to_dense()), output
  projection."""
  w = {v.path.split("/")[-2] + "/" + v.path.split("/")[-1]:
       np.asarray(v.numpy(), np.float64) for v in layer.weights}
  x = np.asarray(x, np.float64)
  heads = layer.num_heads

  qkv = x @ w["qkv/kernel"] + w["qkv/bias"]  # (batch, n, heads * dims)
  key_width = heads * layer.key_dim
  parts = np.split(qkv, [key_width, 2 * key_width], axis=-1)
  # (batch, heads, n, dim): head h owns columns [h * dim, (h + 1) * dim)
  q, k, v = (t.reshape(*t.shape[:2], heads, -1).transpose(0, 2, 1, 3)
             for t in parts)
  if mask is None:
    mask = layer.layout(x.shape[1]).to_dense()
  out, _ = reference.attention(q, k, v, mask, 1.0 / math.sqrt(q.shape[-1]))
  out = out.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)
  return out @ w["output/kernel"] + w["output/bias"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pattern,mode,heads,qk_ratio", [
    ("fixed", "merged", 2, 1.0),
    ("fixed", "multihead", 4, 1.0),
    ("fixed", "summary", 3, 0.5),
    ("strided", "merged", 2, 0.5),
    ("strided", "multihead", 2, 1.0),
    ("strided", "stride", 1, 1.0),
    ("dense", "merged", 2, 1.0),
    ("local", "merged", 2, 1.0),
])
def test_attention_matches_float64_reference(impl, pattern, mode, heads,
                                             qk_ratio):
  rng = np.random.default_rng()
  width = 8 * heads * (1 + rng.integers(2))
  layer = layers.SparseSelfAttention(heads, pattern, mode, qk_ratio=qk_ratio,
                                     implementation=impl, **SMALL)
  x = rng.standard_normal((2, 128, width)).astype(np.float32)
  got = layer(x).numpy()
  want = _attention_reference(layer, x)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_attention_modes_use_the_papers_parts():
  def dense(mode, heads):
    return layers.build_layout("fixed", mode, 128, heads, 16, 32, 8,
                               1).to_dense()
  both, local, summary = dense("merged", 4), dense("local", 4), dense(
      "summary", 4)
  np.testing.assert_array_equal(both, local | summary)
  assert (local & ~both).sum() == 0 and (summary & ~local).any()
  multi = dense("multihead", 4)
  np.testing.assert_array_equal(multi[:2], local[:2])
  np.testing.assert_array_equal(multi[2:], summary[2:])


def test_attention_is_causal():
  rng = np.random.default_rng()
  layer = layers.SparseSelfAttention(2, "strided", **SMALL)
  x = rng.standard_normal((1, 128, 16)).astype(np.float32)
  y = x.copy()
  y[:, 70:] = rng.standard_normal(y[:, 70:].shape)
  np.testing.assert_allclose(layer(x).numpy()[:, :70],
                             layer(y).numpy()[:, :70], rtol=1e-5, atol=1e-5)
  assert not np.allclose(layer(x).numpy()[:, 70:], layer(y).numpy()[:, 70:])


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=2, pattern="diagonal"), "pattern"),
    (dict(num_heads=2, mode="columns"), "mode"),
    (dict(num_heads=2, pattern="fixed", mode="stride"), "stride"),
    (dict(num_heads=1, mode="multihead"), "num_heads"),
    (dict(num_heads=2, qk_ratio=0.0), "qk_ratio"),
    (dict(num_heads=2, implementation="cuda"), "implementation"),
])
def test_attention_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    layers.SparseSelfAttention(**kwargs)


def test_attention_rejects_bad_shapes():
  layer = layers.SparseSelfAttention(3, **SMALL)
  with pytest.raises(ValueError, match="divisible by num_heads"):
    layer(tf.zeros([1, 32, 16]))
  with pytest.raises(ValueError, match="max_length"):
    layers.SparseSelfAttention(2, max_length=40, **SMALL)
  with pytest.raises(ValueError, match="block_size"):
    layers.SparseSelfAttention(2, stride=32, summary=8, block_size=24)


def test_attention_marks_itself_not_jittable_with_the_custom_op():
  assert not layers.SparseSelfAttention(2, implementation="custom_op"
                                        ).supports_jit
  assert layers.SparseSelfAttention(2, implementation="pure_tf").supports_jit


def test_axial_embedding_digits_and_sum():
  rng = np.random.default_rng()
  emb = layers.AxialPositionEmbedding(layers.text_axes(100, 16))
  assert emb.axes == (7, 16)
  x = rng.standard_normal((2, 100, 8)).astype(np.float32)
  got = emb(x).numpy()
  rows, cols = [t.numpy() for t in emb.tables]
  i = np.arange(100)
  np.testing.assert_allclose(got, x + rows[i // 16] + cols[i % 16],
                             rtol=1e-6, atol=1e-6)
  image = layers.AxialPositionEmbedding((4, 5, 3))
  r, c, ch = image.digits(60)
  i = np.arange(60)
  np.testing.assert_array_equal(r, i // 15)
  np.testing.assert_array_equal(c, (i // 3) % 5)
  np.testing.assert_array_equal(ch, i % 3)
  with pytest.raises(ValueError, match="capacity"):
    image(tf.zeros([1, 61, 4]))


def test_sigmoid_gelu_formula():
  x = np.random.default_rng().standard_normal(100).astype(np.float32)
  np.testing.assert_allclose(layers.sigmoid_gelu(x).numpy(),
                             x / (1 + np.exp(-1.702 * x)), rtol=1e-5,
                             atol=1e-6)


def _block(**kwargs):
  args = dict(num_heads=2, attention=dict(pattern="fixed", **SMALL),
              ff_multiplier=2.0)
  args.update(kwargs)
  return layers.SparseTransformerBlock(**args)


def test_block_matches_equations_9_to_14():
  rng = np.random.default_rng()
  block = _block()
  x = rng.standard_normal((2, 64, 16)).astype(np.float32)
  got = block(x).numpy()
  a = block.attention(block.attention_norm(x))
  b = block.ff_out(block.ff_in(block.ff_norm(x + a)))
  np.testing.assert_allclose(got, (x + a + b).numpy(), rtol=1e-5, atol=1e-5)
  w1 = block.ff_in.kernel.numpy()
  h = block.ff_norm(x + a).numpy() @ w1 + block.ff_in.bias.numpy()
  np.testing.assert_allclose(block.ff_in(block.ff_norm(x + a)).numpy(),
                             h / (1 + np.exp(-1.702 * h)), rtol=1e-4,
                             atol=1e-5)


def test_projections_have_their_initial_variance():
  num_layers = 8
  block = _block(num_layers=num_layers)
  block.build((None, 64, 256))
  residual = 1.0 / (2 * num_layers)  # W2 and W_p: Glorot scaled by depth
  for kernel, want in (
      (block.ff_out.kernel, residual * 2.0 / (512 + 256)),
      (block.attention.output_dense.kernel, residual * 2.0 / (256 + 256)),
      (block.ff_in.kernel, 2.0 / (256 + 512)),
      # q, k and v each as a square Glorot matrix: 1 / width
      (block.attention.qkv.kernel, 1.0 / 256)):
    assert abs(np.var(kernel.numpy()) / want - 1) < 0.1, kernel.path


def test_block_dropout_only_in_training():
  block = _block(dropout=0.5, seed=3)
  x = np.random.default_rng().standard_normal((1, 64, 16)).astype(np.float32)
  np.testing.assert_allclose(block(x).numpy(), block(x).numpy())
  assert not np.allclose(block(x, training=True).numpy(),
                         block(x, training=True).numpy())


@pytest.mark.parametrize("impl", IMPLS)
def test_recompute_gives_the_same_gradients(impl):
  rng = np.random.default_rng()
  x = tf.constant(rng.standard_normal((2, 64, 16)).astype(np.float32))
  attention = dict(pattern="strided", implementation=impl, **SMALL)
  plain = _block(attention=attention, dropout=0.3, seed=7)
  remat = _block(attention=attention, dropout=0.3, seed=7, recompute=True)
  plain.build(x.shape)
  remat.build(x.shape)
  remat.set_weights(plain.get_weights())

  def grads(block):
    @tf.function
    def step(x):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = block(x, training=True)
        loss = tf.reduce_sum(y * tf.sin(y))
      return tape.gradient(loss, [x] + block.trainable_variables)
    return [g.numpy() for g in step(x)]

  got, want = grads(remat), grads(plain)
  assert len(got) == len(want) == 1 + len(plain.trainable_variables)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_recompute_watches_no_integer_tensor():
  # recompute_grad watches its function's arguments; the dropout seed
  # (int32) is bound, not passed, so TensorFlow does not warn "The dtype of
  # the watched tensor must be floating" at every step.
  messages = []
  handler = logging.Handler()
  handler.emit = lambda record: messages.append(record.getMessage())
  tf.get_logger().addHandler(handler)
  try:
    block = _block(dropout=0.1, seed=3, recompute=True)
    x = tf.constant(np.random.default_rng().standard_normal(
        (2, 64, 16)).astype(np.float32))
    with tf.GradientTape() as tape:  # eagerly: the warning's first place
      y = block(x, training=True)
    grads = tape.gradient(y, block.trainable_variables)
  finally:
    tf.get_logger().removeHandler(handler)
  assert all(g is not None for g in grads)
  assert not [m for m in messages if "watched tensor" in m], messages


@pytest.mark.parametrize("make", [
    lambda: layers.SparseSelfAttention(2, "strided", "multihead",
                                       qk_ratio=0.5, **SMALL),
    lambda: layers.AxialPositionEmbedding((4, 16)),
    lambda: _block(dropout=0.1, recompute=True, seed=1, num_layers=3),
])
def test_config_round_trip(make):
  layer = make()
  x = np.random.default_rng().standard_normal((1, 64, 16)).astype(np.float32)
  want = layer(x).numpy()
  clone = layer.__class__.from_config(layer.get_config())
  assert clone.get_config() == layer.get_config()
  clone.build(x.shape)
  clone.set_weights(layer.get_weights())
  np.testing.assert_allclose(clone(x).numpy(), want, rtol=1e-6, atol=1e-6)
  restored = keras.saving.deserialize_keras_object(
      keras.saving.serialize_keras_object(layer))
  assert type(restored) is type(layer)


# ----------------------------------------------------------------------------
# SparseSelfAttention as a drop-in for keras.layers.MultiHeadAttention.


def _pattern_mask(pattern, n, heads, causal):
  """The paper's formulas at token level for SMALL's arguments."""
  if pattern == "fixed":
    return reference.fixed_mask(n, 32, 8, heads, 1, "both", causal)
  return reference.strided_mask(n, 32, heads, "both", causal)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pattern", ["fixed", "strided"])
@pytest.mark.parametrize("causal", [True, False])
def test_any_length_matches_the_patterns_formula(impl, pattern, causal):
  # Lengths that are not multiples of the block are padded internally.
  rng = np.random.default_rng(11)
  layer = layers.SparseSelfAttention(2, pattern, implementation=impl,
                                     causal=causal, **SMALL)
  for n in (37, 64, 90):
    x = rng.standard_normal((2, n, 16)).astype(np.float32)
    got = layer(x).numpy()
    want = _attention_reference(layer, x, _pattern_mask(pattern, n, 2,
                                                        causal))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def _padding_cases():
  """Ways of saying the same right padding: (name, call kwargs maker)."""
  def masking(x, lengths):
    mask = np.arange(x.shape[1])[None] < lengths[:, None]
    return dict(query_mask=tf.constant(mask), value_mask=tf.constant(mask))

  def attention_mask(x, lengths):
    mask = np.arange(x.shape[1])[None] < lengths[:, None]
    return dict(attention_mask=tf.constant(mask[:, None, :]))

  def key_lengths(x, lengths):
    del x
    return dict(key_lengths=tf.constant(lengths, tf.int32))
  return [masking, attention_mask, key_lengths]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padding", _padding_cases(),
                         ids=lambda f: f.__name__)
def test_padded_batch_matches_each_sequence_alone(impl, causal, padding):
  rng = np.random.default_rng(12)
  layer = layers.SparseSelfAttention(2, "strided", implementation=impl,
                                     causal=causal, **SMALL)
  lengths = np.array([80, 23, 64, 1])
  x = rng.standard_normal((4, 80, 16)).astype(np.float32)
  # The padding holds values that would change unmasked outputs.
  x[np.arange(80)[None] >= lengths[:, None]] = 50.0
  got = layer(x, x, **padding(x, lengths)).numpy()
  for b, length in enumerate(lengths):
    alone = layer(x[b:b + 1, :length]).numpy()[0]
    np.testing.assert_allclose(got[b, :length], alone, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_keras_masks_from_an_embedding_reach_the_attention(impl):
  rng = np.random.default_rng(13)
  tokens = keras.Input(shape=(None,), dtype="int32")
  x = keras.layers.Embedding(40, 16, mask_zero=True)(tokens)
  attention = layers.SparseSelfAttention(2, "fixed", implementation=impl,
                                         causal=False, max_length=96,
                                         **SMALL)
  y = attention(x, x)
  model = keras.Model(tokens, y)
  ids = rng.integers(1, 40, (3, 50)).astype(np.int32)
  lengths = np.array([50, 17, 33])
  ids[np.arange(50)[None] >= lengths[:, None]] = 0
  got = model(ids).numpy()
  for b, length in enumerate(lengths):
    alone = model(ids[b:b + 1, :length]).numpy()[0]
    np.testing.assert_allclose(got[b, :length], alone, rtol=1e-5,
                               atol=1e-5)
  # The input's mask is passed on, as MultiHeadAttention passes it on.
  embedded = model.layers[1](ids)
  out = attention(embedded, embedded)
  np.testing.assert_array_equal(out._keras_mask.numpy(), ids != 0)  # pylint: disable=protected-access


def _classifier(attention):
  """Embedding (mask_zero) -> self-attention -> masked mean -> logits."""
  tokens = keras.Input(shape=(None,), dtype="int32")
  x = keras.layers.Embedding(16, 16, mask_zero=True)(tokens)
  x = x + attention(x, x)
  x = keras.layers.GlobalAveragePooling1D()(x)
  return keras.Model(tokens, keras.layers.Dense(2)(x))


def test_replaces_multi_head_attention_in_a_functional_model():
  # A task attention solves: is token 1 anywhere in the (padded) sequence?
  rng = np.random.default_rng(14)
  keras.utils.set_random_seed(14)
  count = 256
  lengths = rng.integers(5, 60, count)
  ids = rng.integers(2, 16, (count, 64)).astype(np.int32)
  labels = rng.integers(0, 2, count)
  where = (rng.random(count) * lengths).astype(int)
  ids[labels == 1, where[labels == 1]] = 1
  ids[np.arange(64)[None] >= lengths[:, None]] = 0
  rows = [row[:length] for row, length in zip(ids, lengths)]
  data = tf.data.Dataset.from_generator(
      lambda: zip(rows, labels), output_signature=(
          tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int64)))
  # Batches of different lengths: the model is traced with length None.
  data = data.padded_batch(32).apply(
      tf.data.experimental.assert_cardinality(count // 32))
  results = {}
  for name, attention in [
      ("mha", keras.layers.MultiHeadAttention(2, 8)),
      ("sparse", layers.SparseSelfAttention(2, "strided", causal=False,
                                            max_length=64, **SMALL))]:
    model = _classifier(attention)
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True), metrics=["accuracy"])
    history = model.fit(data, epochs=8, verbose=0).history
    results[name] = history
    assert history["loss"][-1] < 0.5 * history["loss"][0], (name, history)
  assert results["sparse"]["accuracy"][-1] > 0.9


def test_use_causal_mask_selects_the_layout_per_call():
  rng = np.random.default_rng(15)
  layer = layers.SparseSelfAttention(2, "strided", causal=False, **SMALL)
  x = rng.standard_normal((1, 64, 16)).astype(np.float32)
  y = x.copy()
  y[:, 40:] = rng.standard_normal(y[:, 40:].shape)
  # Bidirectional: early positions see the changed later ones.
  assert not np.allclose(layer(x).numpy()[:, :40], layer(y).numpy()[:, :40])
  causal = [layer(t, t, use_causal_mask=True).numpy() for t in (x, y)]
  np.testing.assert_allclose(causal[0][:, :40], causal[1][:, :40],
                             rtol=1e-5, atol=1e-5)
  want = _attention_reference(layer, x, _pattern_mask("strided", 64, 2,
                                                      True))
  np.testing.assert_allclose(causal[0], want, rtol=2e-4, atol=2e-4)


def test_drop_in_call_errors_name_the_argument():
  rng = np.random.default_rng(16)
  layer = layers.SparseSelfAttention(2, **SMALL)
  x = tf.constant(rng.standard_normal((2, 32, 16)), tf.float32)
  with pytest.raises(ValueError, match="return_attention_scores"):
    layer(x, x, return_attention_scores=True)
  with pytest.raises(ValueError, match="value must be the query"):
    layer(x, x[:, :16])
  with pytest.raises(tf.errors.InvalidArgumentError, match="key must hold"):
    layer(x, x, key=x + 1.0)
  with pytest.raises(ValueError, match="per-query"):
    layer(x, attention_mask=tf.ones([2, 32, 32], tf.bool))
  left_padding = np.arange(32)[None] >= np.array([[4], [0]])
  with pytest.raises(tf.errors.InvalidArgumentError, match="right padding"):
    layer(x, attention_mask=left_padding)
  with pytest.raises(ValueError, match="key_lengths"):
    layer(x, key_lengths=tf.constant([[3]]))
  with pytest.raises(ValueError, match="causal=True"):
    layers.SparseSelfAttention(2, causal=False, **SMALL).initial_cache(1, 64)


def test_unknown_length_needs_max_length():
  layer = layers.SparseSelfAttention(2, **SMALL)
  spec = tf.TensorSpec([None, None, 16], tf.float32)
  with pytest.raises(ValueError, match="max_length="):
    tf.function(layer, input_signature=[spec]).get_concrete_function()
  bounded = layers.SparseSelfAttention(2, max_length=64, **SMALL)
  run = tf.function(bounded, input_signature=[spec])
  rng = np.random.default_rng(17)
  x = rng.standard_normal((2, 45, 16)).astype(np.float32)
  np.testing.assert_allclose(run(x).numpy(), bounded(x).numpy(), rtol=1e-5,
                             atol=1e-5)
  with pytest.raises(tf.errors.InvalidArgumentError, match="max_length"):
    run(rng.standard_normal((1, 80, 16)).astype(np.float32))
  with pytest.raises(ValueError, match="exceeds max_length"):
    bounded(tf.zeros([1, 80, 16]))


def test_attention_config_round_trip_keeps_causal_and_max_length():
  layer = layers.SparseSelfAttention(2, causal=False, max_length=64, **SMALL)
  clone = layers.SparseSelfAttention.from_config(layer.get_config())
  assert (clone.causal, clone.max_length) == (False, 64)


# ----------------------------------------------------------------------------
# Every layer as Keras users rely on it (tests/layer_testing.py).


def test_sparse_self_attention_passes_the_layer_checks(implementation, rng):
  x = rng.standard_normal((2, 64, 16)).astype(np.float32)
  layer_testing.run_layer_test(
      lambda **kw: layers.SparseSelfAttention(
          2, "fixed", implementation=implementation, **SMALL, **kw),
      x, (2, 64, 16))


def test_residual_block_passes_the_layer_checks(implementation, rng):
  x = rng.standard_normal((2, 64, 16)).astype(np.float32)
  attention = dict(pattern="strided", stride=32, block_size=16,
                   implementation=implementation)
  layer_testing.run_layer_test(
      lambda **kw: layers.SparseTransformerBlock(2, attention,
                                                 recompute=True, **kw),
      x, (2, 64, 16))


def test_position_embedding_passes_the_layer_checks(rng):
  x = rng.standard_normal((2, 48, 8)).astype(np.float32)
  layer_testing.run_layer_test(
      lambda **kw: layers.AxialPositionEmbedding((4, 4, 3), **kw), x,
      (2, 48, 8))
