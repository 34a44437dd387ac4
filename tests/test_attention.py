"""block_sparse_attention (fused op and pure TF) against a float64 reference."""

import os

import numpy as np
import pytest
import tensorflow as tf

from st_keras import layouts
from st_keras import ops
from tests import reference

IMPLS = ["custom_op", "pure_tf"]

# Each case: a name and a layout factory. Sizes stay small: the reference is
# dense.
PATTERNS = {
    "fixed": lambda: layouts.fixed(256, 16, stride=64, summary=16, num_heads=3,
                                   num_summary_patterns=2),
    "fixed_bidirectional": lambda: layouts.fixed(128, 32, 64, 32, 2,
                                                 causal=False),
    "fixed_summary_only": lambda: layouts.fixed(192, 16, 48, 8, 2,
                                                part="summary"),
    "strided": lambda: layouts.strided(256, 32, stride=64, num_heads=2),
    "strided_n_not_multiple_of_stride": lambda: layouts.strided(
        224, 32, stride=48, num_heads=3),
    "strided_stride_only": lambda: layouts.strided(192, 16, 40, 2,
                                                   part="stride"),
    "strided_bidirectional": lambda: layouts.strided(128, 16, 24, 1,
                                                     causal=False),
    "local": lambda: layouts.local(128, 16, window=40, num_heads=3),
    "causal": lambda: layouts.causal(96, 32, num_heads=2),
    "one_block": lambda: layouts.fixed(64, 64, 128, 32, 1),
    "block_128": lambda: layouts.fixed(256, 128, 128, 32, 1),
    "union": lambda: layouts.union(layouts.fixed(128, 16, 32, 8, 2),
                                   layouts.strided(128, 16, 24, 2)),
    "per_head": lambda: layouts.per_head(
        layouts.strided(128, 16, 32, 1, part="local"),
        layouts.strided(128, 16, 32, 1, part="stride"),
        layouts.fixed(128, 16, 32, 8, 1)),
    "from_mask": lambda: layouts.from_mask(
        np.random.default_rng().random((2, 64, 64)) < 0.15, 16),
    # 13 query blocks: the kernel's groups of consecutive query blocks end
    # part-way, runs of query blocks sharing a key block are broken at
    # random, and few neighbouring key blocks have the same query blocks.
    "from_mask_ragged_groups": lambda: layouts.from_mask(
        np.random.default_rng().random((3, 208, 208)) < 0.3, 16),
    # 20 query blocks over 20 key blocks: several groups and merged steps.
    "causal_long_columns": lambda: layouts.causal(320, 16, num_heads=1),
    # The benchmark's pattern shrunk: at block 32 the kernel takes two key
    # blocks per step (summary columns of earlier strides) over groups of
    # four query blocks, and the diagonal's masked tiles in single steps.
    "fixed_block_32_many_strides": lambda: layouts.fixed(
        1024, 32, stride=128, summary=32, num_heads=2),
}


def _inputs(batch, heads, n, d, dtype=np.float32, rng=None):
  rng = rng or np.random.default_rng()
  return [rng.standard_normal((batch, heads, n, d)).astype(dtype)
          for _ in range(3)]


def _dense_tf(q, k, v, mask, scale, key_lengths=None):
  """Dense masked attention in TensorFlow, in the inputs' dtype (the peer
  whose error sets the tolerance)."""
  dtype = q.dtype
  s = tf.einsum("bhqd,bhkd->bhqk", q, k) * tf.cast(scale, dtype)
  full = tf.broadcast_to(mask[None], tf.shape(s))
  if key_lengths is not None:
    keys = tf.range(tf.shape(s)[-1])[None, None, None, :]
    full = tf.logical_and(full, keys < key_lengths[:, None, None, None])
  s = tf.where(full, s, tf.cast(-1e4 if dtype != tf.float32 else -1e30,
                                dtype))
  p = tf.where(full, tf.nn.softmax(s, axis=-1), tf.zeros_like(s))
  return tf.einsum("bhqk,bhkd->bhqd", p, v)


def _assert_close_to_reference(got, want, peer, atol_floor):
  """The flash-attention rule: our error at most 2x the framework's error."""
  err = np.abs(np.asarray(got, np.float64) - want).max()
  peer_err = np.abs(np.asarray(peer, np.float64) - want).max()
  assert err <= 2 * peer_err + atol_floor, (err, peer_err)


def test_custom_op_library_is_loaded():
  # The suite must exercise the Bazel-built kernels, not a silent fallback.
  assert ops.custom_op_available(), ops.load_error()
  assert ops.load_error() is None
  assert os.path.exists(ops.library_path())
  assert ops.resolve_implementation("auto") == "custom_op"
  assert ops.resolve_implementation("custom_op") == "custom_op"


def test_custom_op_runs_the_fused_op_not_the_fallback():
  lay = layouts.causal(64, 16, 1)
  q, k, v = _inputs(1, 1, 64, 32)
  graph = tf.function(
      lambda q, k, v: ops.block_sparse_attention(q, k, v, lay)
  ).get_concrete_function(*[tf.TensorSpec(q.shape, tf.float32)] * 3).graph
  op_types = {o.type for o in graph.get_operations()}
  assert ops.OP_NAME in op_types
  assert "Einsum" not in op_types


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_forward_float32_matches_reference(name, impl):
  lay = PATTERNS[name]()
  rng = np.random.default_rng()
  batch = 2
  q, k, v = _inputs(batch, lay.num_heads, lay.seq_len, 32, rng=rng)
  scale = 0.3
  want, _ = reference.attention(q, k, v, lay.to_dense(), scale)
  got = ops.block_sparse_attention(q, k, v, lay, scale=scale,
                                   implementation=impl)
  assert got.dtype == tf.float32
  np.testing.assert_allclose(got.numpy(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("head_dim", [32, 64, 128, 40])
@pytest.mark.parametrize("batch,heads", [(1, 1), (3, 2)])
def test_head_dims_batch_and_heads(impl, head_dim, batch, heads):
  lay = layouts.fixed(128, 32, 64, 32, heads)
  q, k, v = _inputs(batch, heads, 128, head_dim)
  want, _ = reference.attention(q, k, v, lay.to_dense(), head_dim**-0.5)
  got = ops.block_sparse_attention(q, k, v, lay, implementation=impl)
  np.testing.assert_allclose(got.numpy(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["fixed", "strided", "local"])
def test_key_lengths_make_padded_batches_exact(name, impl):
  lay = PATTERNS[name]()
  n = lay.seq_len
  q, k, v = _inputs(3, lay.num_heads, n, 32)
  lengths = np.array([n, n // 2 + 5, 1], np.int32)
  want, _ = reference.attention(q, k, v, lay.to_dense(), 0.2, lengths)
  got = ops.block_sparse_attention(q, k, v, lay, scale=0.2,
                                   key_lengths=lengths, implementation=impl)
  np.testing.assert_allclose(got.numpy(), want, atol=2e-5, rtol=1e-4)
  # Example 1 equals running it alone on its first n // 2 + 5 tokens' keys:
  # changing the padded keys changes nothing.
  k2, v2 = k.copy(), v.copy()
  k2[1, :, n // 2 + 5:] = 1e3
  v2[1, :, n // 2 + 5:] = -1e3
  got2 = ops.block_sparse_attention(q, k2, v2, lay, scale=0.2,
                                    key_lengths=lengths, implementation=impl)
  np.testing.assert_allclose(got2.numpy()[1], got.numpy()[1], atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_with_no_allowed_key_are_zero(impl):
  mask = np.random.default_rng().random((2, 64, 64)) < 0.2
  mask[0, 5] = False
  mask[1, 40:48] = False
  lay = layouts.from_mask(mask, 16)
  q, k, v = _inputs(2, 2, 64, 32)
  qt, kt, vt = (tf.constant(x) for x in (q, k, v))
  with tf.GradientTape() as tape:
    tape.watch([qt, kt, vt])
    out = ops.block_sparse_attention(qt, kt, vt, lay, implementation=impl)
    loss = tf.reduce_sum(out * out)
  grads = tape.gradient(loss, [qt, kt, vt])
  out = out.numpy()
  assert np.all(out[:, 0, 5] == 0) and np.all(out[:, 1, 40:48] == 0)
  assert np.abs(out[:, 0, 6]).sum() > 0
  for g in grads:
    assert np.isfinite(g.numpy()).all()
  assert np.all(grads[0].numpy()[:, 0, 5] == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["fixed", "strided_n_not_multiple_of_stride",
                                  "local", "union", "per_head", "from_mask",
                                  "from_mask_ragged_groups",
                                  "fixed_block_32_many_strides"])
def test_gradients_match_reference(name, impl):
  lay = PATTERNS[name]()
  batch, d, scale = 2, 48, 0.25
  q, k, v = _inputs(batch, lay.num_heads, lay.seq_len, d)
  dout = np.random.default_rng().standard_normal(q.shape).astype(np.float32)
  lengths = np.array([lay.seq_len, lay.seq_len - 37], np.int32)
  want = reference.attention_grads(q, k, v, lay.to_dense(), scale, dout,
                                   lengths)
  qt, kt, vt = (tf.constant(x) for x in (q, k, v))
  with tf.GradientTape() as tape:
    tape.watch([qt, kt, vt])
    out = ops.block_sparse_attention(qt, kt, vt, lay, scale=scale,
                                     key_lengths=lengths, implementation=impl)
    loss = tf.reduce_sum(out * dout)
  got = tape.gradient(loss, [qt, kt, vt])
  for g, w, label in zip(got, want, "qkv"):
    np.testing.assert_allclose(g.numpy(), w, atol=5e-5, rtol=1e-3,
                               err_msg=f"d{label}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,heads,patterns,part", [
    (1, 4, 2, "both"),   # table heads 2 of 4
    (3, 6, 3, "both"),   # table heads 3 of 6
    (2, 5, 1, "both"),   # one table head for 5 heads
    (2, 4, 2, "summary"),
])
def test_tables_shared_by_heads_match_reference(impl, batch, heads, patterns,
                                                part):
  # Heads h and h + P read the same tables (table head h % P): forward and
  # gradients must still be each head's own attention.
  lay = layouts.union(
      layouts.fixed(192, 16, stride=48, summary=16, num_heads=heads,
                    num_summary_patterns=patterns, part=part),
      layouts.strided(192, 16, stride=40, num_heads=heads, part="stride"))
  assert {c.table_heads for c in lay.components} == {patterns}
  rng = np.random.default_rng(heads * 10 + batch)
  q, k, v = _inputs(batch, heads, lay.seq_len, 32, rng=rng)
  dout = rng.standard_normal(q.shape).astype(np.float32)
  lengths = np.array([lay.seq_len - 29 * b for b in range(batch)], np.int32)
  mask = lay.to_dense()
  np.testing.assert_array_equal(mask, mask[np.arange(heads) % patterns])
  assert patterns == 1 or (mask[0] != mask[1]).any()
  want_out, _ = reference.attention(q, k, v, mask, 0.3, lengths)
  want = reference.attention_grads(q, k, v, mask, 0.3, dout, lengths)
  qt, kt, vt = (tf.constant(x) for x in (q, k, v))
  with tf.GradientTape() as tape:
    tape.watch([qt, kt, vt])
    out = ops.block_sparse_attention(qt, kt, vt, lay, scale=0.3,
                                     key_lengths=lengths, implementation=impl)
    loss = tf.reduce_sum(out * dout)
  np.testing.assert_allclose(out.numpy(), want_out, atol=2e-5, rtol=1e-4)
  for g, w, label in zip(tape.gradient(loss, [qt, kt, vt]), want, "qkv"):
    np.testing.assert_allclose(g.numpy(), w, atol=5e-5, rtol=1e-3,
                               err_msg=f"d{label}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["fixed", "strided"])
def test_numerical_gradient(name, impl):
  lay = {"fixed": lambda: layouts.fixed(32, 16, 16, 4, 1),
         "strided": lambda: layouts.strided(32, 16, 6, 1)}[name]()
  q, k, v = (tf.constant(x) for x in _inputs(1, 1, 32, 8))
  for index in range(3):
    @tf.function
    def f(x, index=index):
      args = [q, k, v]
      args[index] = x
      return ops.block_sparse_attention(*args, lay, implementation=impl)
    theoretical, numerical = tf.test.compute_gradient(f, [[q, k, v][index]],
                                                      delta=1e-2)
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=2e-2,
                               rtol=2e-2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
@pytest.mark.parametrize("name", ["fixed", "strided", "causal"])
def test_half_precision_within_twice_framework_error(name, dtype, impl):
  lay = PATTERNS[name]()
  q, k, v = _inputs(2, lay.num_heads, lay.seq_len, 64)
  mask = lay.to_dense()
  want, _ = reference.attention(q, k, v, mask, 0.125)
  qh, kh, vh = (tf.cast(x, dtype) for x in (q, k, v))
  # Reference inputs rounded like the kernel's, so only kernel error counts.
  want, _ = reference.attention(*(tf.cast(x, tf.float64).numpy()
                                  for x in (qh, kh, vh)), mask, 0.125)
  got = ops.block_sparse_attention(qh, kh, vh, lay, scale=0.125,
                                   implementation=impl)
  assert got.dtype == dtype
  peer = _dense_tf(qh, kh, vh, mask, 0.125)
  _assert_close_to_reference(tf.cast(got, tf.float64).numpy(), want,
                             tf.cast(peer, tf.float64).numpy(),
                             atol_floor=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_half_precision_gradients(impl):
  lay = PATTERNS["fixed"]()
  q, k, v = _inputs(1, lay.num_heads, lay.seq_len, 64)
  dout = np.random.default_rng().standard_normal(q.shape)
  qh, kh, vh = (tf.cast(x, tf.float16) for x in (q, k, v))
  rounded = [tf.cast(x, tf.float64).numpy() for x in (qh, kh, vh)]
  want = reference.attention_grads(*rounded, lay.to_dense(), 0.125, dout)

  def grads(fn):
    with tf.GradientTape() as tape:
      tape.watch([qh, kh, vh])
      loss = tf.reduce_sum(tf.cast(fn(qh, kh, vh), tf.float32) * dout)
    return [tf.cast(g, tf.float64).numpy()
            for g in tape.gradient(loss, [qh, kh, vh])]

  got = grads(lambda *a: ops.block_sparse_attention(*a, lay, scale=0.125,
                                                    implementation=impl))
  peer = grads(lambda *a: _dense_tf(*a, lay.to_dense(), 0.125))
  for g, p, w in zip(got, peer, want):
    _assert_close_to_reference(g, w, p, atol_floor=2e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_graph_mode_matches_eager(impl):
  lay = PATTERNS["strided"]()
  q, k, v = _inputs(2, lay.num_heads, lay.seq_len, 32)
  eager = ops.block_sparse_attention(q, k, v, lay, implementation=impl)

  @tf.function(input_signature=[tf.TensorSpec([None, 2, 256, 32])] * 3)
  def graph_fn(q, k, v):
    with tf.GradientTape() as tape:
      tape.watch(q)
      out = ops.block_sparse_attention(q, k, v, lay, implementation=impl)
      loss = tf.reduce_sum(out * out)
    return out, tape.gradient(loss, q)

  out, dq = graph_fn(q, k, v)
  np.testing.assert_allclose(out.numpy(), eager.numpy(), atol=1e-6)
  assert np.isfinite(dq.numpy()).all() and np.abs(dq.numpy()).sum() > 0


def test_pure_tf_runs_under_xla_and_auto_picks_it():
  lay = PATTERNS["fixed"]()
  q, k, v = _inputs(1, lay.num_heads, lay.seq_len, 32)
  want, _ = reference.attention(q, k, v, lay.to_dense(), 32**-0.5)

  @tf.function(jit_compile=True)
  def xla_fn(q, k, v):
    return ops.block_sparse_attention(q, k, v, lay)  # "auto" under XLA

  np.testing.assert_allclose(xla_fn(q, k, v).numpy(), want, atol=2e-5)


def test_mixed_float16_policy_inputs():
  import keras  # pylint: disable=g-import-not-at-top
  lay = PATTERNS["fixed"]()
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    layer = keras.layers.Dense(32, use_bias=False)
    x = np.random.default_rng().standard_normal(
        (2, lay.num_heads, lay.seq_len, 32)).astype(np.float32)
    h = layer(x)  # float16 activations, as inside a mixed_float16 model
    assert h.dtype == "float16"
    outs = [ops.block_sparse_attention(h, h, h, lay, implementation=impl)
            for impl in IMPLS]
  finally:
    keras.mixed_precision.set_global_policy("float32")
  hd = tf.cast(h, tf.float64).numpy()
  want, _ = reference.attention(hd, hd, hd, lay.to_dense(), 32**-0.5)
  for out in outs:
    assert out.dtype == tf.float16
    np.testing.assert_allclose(tf.cast(out, tf.float64).numpy(), want,
                               atol=5e-3)


def test_module_switch_and_environment_variable(monkeypatch):
  lay = layouts.causal(64, 16, 1)
  q, k, v = _inputs(1, 1, 64, 32)

  def op_types():
    fn = tf.function(lambda q, k, v: ops.block_sparse_attention(q, k, v, lay))
    graph = fn.get_concrete_function(
        *[tf.TensorSpec(q.shape, tf.float32)] * 3).graph
    return {o.type for o in graph.get_operations()}

  try:
    ops.set_implementation("pure_tf")
    assert ops.OP_NAME not in op_types()
    ops.set_implementation("custom_op")
    assert ops.OP_NAME in op_types()
    with pytest.raises(ValueError, match="implementation"):
      ops.set_implementation("fast")
  finally:
    ops.set_implementation("auto")
  monkeypatch.setenv(ops.ENV_IMPLEMENTATION, "pure_tf")
  monkeypatch.setitem(ops.library._state, "implementation", None)  # re-read the env
  assert ops.implementation() == "pure_tf"


def test_missing_library_warns_loudly_and_falls_back(monkeypatch, tmp_path):
  monkeypatch.setenv(ops.ENV_LIBRARY, str(tmp_path / "missing.so"))
  for key, value in (("library", None), ("load_error", None),
                     ("warned", False)):
    monkeypatch.setitem(ops.library._state, key, value)
  with pytest.warns(RuntimeWarning, match="missing.so"):
    assert ops.resolve_implementation("auto") == "pure_tf"
  with pytest.raises(RuntimeError, match="failed to load"):
    ops.resolve_implementation("custom_op")


class TestBadInput:
  """Bad input raises a clear error naming the argument; never a crash."""

  def setup_method(self):
    self.lay = layouts.fixed(128, 32, 64, 32, 2)
    self.q, self.k, self.v = _inputs(1, 2, 128, 32)

  @pytest.mark.parametrize("impl", IMPLS)
  def test_python_checks(self, impl):
    call = lambda *a, **kw: ops.block_sparse_attention(
        *a, implementation=impl, **kw)
    with pytest.raises(ValueError, match="q must have rank 4"):
      call(self.q[0], self.k[0], self.v[0], self.lay)
    with pytest.raises(TypeError, match="share a dtype"):
      call(self.q, self.k.astype(np.float16), self.v, self.lay)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
      call(*(x.astype(np.float64) for x in (self.q, self.k, self.v)),
           self.lay)
    with pytest.raises(ValueError, match="seq_len 256"):
      call(self.q, self.k, self.v, layouts.fixed(256, 32, 64, 32, 2))
    with pytest.raises(ValueError, match="heads"):
      call(self.q, self.k, self.v, layouts.fixed(128, 32, 64, 32, 3))
    with pytest.raises(ValueError, match="one shape"):
      call(self.q, self.k[:, :, :64], self.v, self.lay)
    with pytest.raises(TypeError, match="key_lengths must be int32"):
      call(self.q, self.k, self.v, self.lay, key_lengths=np.ones(1))
    with pytest.raises(ValueError, match="scale"):
      call(self.q, self.k, self.v, self.lay, scale=-1.0)
    with pytest.raises(TypeError, match="Layout"):
      call(self.q, self.k, self.v, self.lay.to_dense())

  def _tables(self):
    comp = self.lay.components[0]
    col_ptr, row_idx, col_mask_idx = comp.column_tables(self.lay.num_blocks)
    return dict(key_lengths=np.zeros(0, np.int32),
                key_positions=np.zeros((0, 0), np.int32),
                row_ptr=comp.row_ptr, col_idx=comp.col_idx,
                mask_idx=comp.mask_idx, masks=comp.masks, col_ptr=col_ptr,
                row_idx=row_idx, col_mask_idx=col_mask_idx)

  def _raw(self, **overrides):
    args = dict(q=self.q, k=self.k, v=self.v, scale=0.1, **self._tables())
    args.update(overrides)
    return ops.load_library().sparse_transformer_block_sparse_attention(
        **args)

  def test_raw_op_accepts_good_tables(self):
    out, lse, stats = self._raw()
    assert out.shape == self.q.shape and lse.shape == self.q.shape[:3]
    assert stats.shape == self.q.shape[:3] + (2,)

  @pytest.mark.parametrize("overrides,match", [
      (lambda c: dict(col_idx=c.col_idx + 100), "col_idx"),
      (lambda c: dict(col_idx=c.col_idx - 100), "col_idx"),
      (lambda c: dict(mask_idx=c.mask_idx + 50), "mask_idx"),
      (lambda c: dict(row_ptr=c.row_ptr[:-1]), "row_ptr"),
      (lambda c: dict(row_ptr=c.row_ptr[::-1].copy()), "row_ptr"),
      (lambda c: dict(row_idx=np.full(c.nnz, 7, np.int32)), "row_idx"),
      (lambda c: dict(col_mask_idx=np.full(c.nnz, 99, np.int32)),
       "col_mask_idx"),
      (lambda c: dict(col_ptr=c.row_ptr[:-1]), "col_ptr"),
      (lambda c: dict(row_idx=np.zeros(c.nnz - 1, np.int32)), "row_idx"),
      (lambda c: dict(masks=np.zeros((1, 8, 8), np.uint8)), "block size"),
      (lambda c: dict(masks=np.zeros((1, 24, 24), np.uint8)),
       "one of 16, 32, 64, 128"),
      (lambda c: dict(key_lengths=np.ones(3, np.int32)), "key_lengths"),
      (lambda c: dict(key_positions=np.ones((2, 5), np.int32)),
       "key_positions"),
      # One table head: key_positions must be [1, n], not [heads, n].
      (lambda c: dict(key_positions=np.zeros((2, 128), np.int32)),
       r"key_positions must have shape \[table_heads, n\] = \[1, 128\]"),
      # Three table heads do not divide the two heads.
      (lambda c: dict(row_ptr=np.zeros(3 * 4 + 1, np.int32)),
       "table_heads dividing heads = 2"),
      (lambda c: dict(scale=0.0), "scale"),
      (lambda c: dict(q=np.ones((1, 2, 128), np.float32)), "rank 4"),
  ])
  def test_raw_op_rejects_bad_tables(self, overrides, match):
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
      self._raw(**overrides(self.lay.components[0]))

  @pytest.mark.parametrize("stats_rows,dlse_rows,match", [
      (64, 128, "stats"), (128, 64, "dlse")])
  def test_raw_grad_op_rejects_bad_shapes(self, stats_rows, dlse_rows, match):
    lib = ops.load_library()
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
      lib.sparse_transformer_block_sparse_attention_grad(
          q=self.q, k=self.k, v=self.v, out=self.q,
          stats=np.zeros((1, 2, stats_rows, 2), np.float32), dout=self.q,
          dlse=np.zeros((1, 2, dlse_rows), np.float32), scale=0.1,
          **self._tables())


def test_pure_tf_path_exports_to_a_savedmodel_of_stock_ops(tmp_path):
  lay = PATTERNS["strided"]()
  q, k, v = _inputs(2, lay.num_heads, lay.seq_len, 32)
  spec = tf.TensorSpec([None, lay.num_heads, lay.seq_len, 32], tf.float32)
  module = tf.Module()
  module.attend = tf.function(
      lambda q, k, v: ops.block_sparse_attention(q, k, v, lay,
                                                 implementation="pure_tf"),
      input_signature=[spec] * 3)
  path = str(tmp_path / "saved")
  tf.saved_model.save(module, path, options=tf.saved_model.SaveOptions(
      experimental_custom_gradients=False))
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  graph = proto.meta_graphs[0].graph_def
  op_types = {n.op for n in graph.node} | {
      n.op for fn in graph.library.function for n in fn.node_def}
  assert "Einsum" in op_types
  assert not any(t.startswith("SparseTransformer") for t in op_types)
  reloaded = tf.saved_model.load(path)
  want, _ = reference.attention(q, k, v, lay.to_dense(), 32**-0.5)
  np.testing.assert_allclose(reloaded.attend(q, k, v).numpy(), want,
                             atol=2e-5)


def test_layout_tables_are_cached_beside_the_layout_not_in_it(rng):
  import gc

  from st_keras.ops import tables as tables_lib
  lay = layouts.fixed(64, 16, 32, 8, num_heads=2)
  before = dict(vars(lay))
  q = rng.standard_normal((1, 2, 64, 16)).astype(np.float32)
  for impl in ("custom_op", "pure_tf"):
    ops.block_sparse_attention(q, q, q, lay, implementation=impl)
  assert vars(lay).keys() == before.keys()  # nothing written into it
  assert tables_lib.op_tables(lay, 0) is tables_lib.op_tables(lay, 0)
  assert lay in tables_lib._CACHE  # pylint: disable=protected-access
  count = len(tables_lib._CACHE)  # pylint: disable=protected-access
  # The pure-TF path builds no tables of the fused op (no column sort).
  other = layouts.strided(64, 16, 8, num_heads=2)
  ops.block_sparse_attention(q, q, q, other, implementation="pure_tf")
  assert ("op", 0) not in tables_lib._CACHE[other]  # pylint: disable=protected-access
  assert ("perm", 1) in tables_lib._CACHE[other]  # pylint: disable=protected-access
  del lay, other
  gc.collect()
  assert len(tables_lib._CACHE) == count - 1  # pylint: disable=protected-access
