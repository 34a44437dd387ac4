"""Keras layers: attention against a float64 reference, embeddings, residual
block (formula, initialisation, recomputation), config round trips."""

import logging
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from st_keras import layers
from tests import reference

IMPLS = ["custom_op", "pure_tf"]
SMALL = dict(stride=32, summary=8, block_size=16)


def _attention_reference(layer, x):
  """The layer's function in float64 numpy: projections from its weights,
  dense masked softmax over layout.to_dense(), output projection."""
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
  layer = layers.SparseSelfAttention(2, **SMALL)
  with pytest.raises(ValueError, match="multiple of block_size"):
    layer(tf.zeros([1, 40, 16]))


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
