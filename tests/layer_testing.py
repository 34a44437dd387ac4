"""`run_layer_test`: the checks every Keras layer of the package passes (the
idea of keras-hub's TestCase.run_layer_test)."""

import keras
import numpy as np
import tensorflow as tf

POLICIES = {"mixed_float16": ("float16", 2e-2), "mixed_bfloat16":
            ("bfloat16", 8e-2)}


def run_layer_test(make_layer, inputs: np.ndarray, expected_shape: tuple):
  """Checks a layer the way a Keras user relies on it.

  - eager call: the output shape;
  - config round trip: `from_config(get_config())` with the same weights
    gives the same outputs;
  - symbolic call on `keras.Input` (any batch size) and a functional model;
  - graph call (`tf.function`) equals the eager one;
  - a training step: finite gradients for every trainable weight, and an
    optimizer step changes each of them;
  - each mixed precision policy: outputs in the policy's compute dtype,
    close to float32 with the same weights.

  Args:
    make_layer: `**kwargs -> layer`, a fresh layer each call (kwargs are
      `keras.layers.Layer` arguments such as dtype).
    inputs: float32 inputs.
    expected_shape: the output shape for `inputs`.
  """
  layer = make_layer()
  out = layer(inputs)
  assert tuple(out.shape) == tuple(expected_shape), out.shape
  want = out.numpy()
  assert np.isfinite(want).all()

  clone = type(layer).from_config(layer.get_config())
  clone(inputs)
  clone.set_weights(layer.get_weights())
  np.testing.assert_allclose(clone(inputs).numpy(), want, rtol=1e-5,
                             atol=1e-5)

  symbolic = keras.Input(shape=inputs.shape[1:])
  symbolic_out = make_layer()(symbolic)
  assert tuple(symbolic_out.shape) == (None,) + tuple(expected_shape[1:])
  model = keras.Model(symbolic, symbolic_out)
  assert tuple(model(inputs).shape) == tuple(expected_shape)

  np.testing.assert_allclose(tf.function(layer)(inputs).numpy(), want,
                             rtol=1e-5, atol=1e-5)

  before = [w.numpy().copy() for w in layer.trainable_weights]
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(tf.square(layer(inputs, training=True)))
  grads = tape.gradient(loss, layer.trainable_weights)
  for weight, grad in zip(layer.trainable_weights, grads):
    assert grad is not None, f"no gradient for {weight.path}"
    assert np.isfinite(tf.convert_to_tensor(grad).numpy()).all(), weight.path
  keras.optimizers.SGD(0.1).apply(grads, layer.trainable_weights)
  for weight, old in zip(layer.trainable_weights, before):
    assert not np.array_equal(weight.numpy(), old), (
        f"{weight.path} did not change")

  reference = make_layer()
  reference(inputs)
  for policy, (dtype, tolerance) in POLICIES.items():
    mixed = make_layer(dtype=policy)
    mixed(inputs)
    mixed.set_weights(reference.get_weights())
    got = mixed(inputs)
    assert got.dtype == dtype, (policy, got.dtype)
    np.testing.assert_allclose(
        tf.cast(got, tf.float32).numpy(), reference(inputs).numpy(),
        rtol=tolerance, atol=tolerance)
