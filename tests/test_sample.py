"""Sampling: logit filters, the key/value-cached decoder against the full
forward pass, seeded generation and the st-sample CLI."""

import json
import re
import wave

import keras
import numpy as np
import pytest
import tensorflow as tf

from st_keras import layouts
from st_keras import models
from st_keras import ops
from st_keras import sample
from st_keras.data import audio


def test_top_k_keeps_the_k_largest():
  rng = np.random.default_rng()
  logits = rng.standard_normal((3, 50)).astype(np.float32)
  got = sample.filter_logits(logits, top_k=5).numpy()
  for row, out in zip(logits, got):
    kept = set(np.flatnonzero(np.isfinite(out)))
    assert kept == set(np.argsort(row)[-5:])
    np.testing.assert_allclose(out[list(kept)], row[list(kept)], rtol=1e-6)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  kept = lambda p: np.isfinite(sample.filter_logits(logits, top_p=p).numpy())
  np.testing.assert_array_equal(kept(0.5)[0], [True, False, False, False])
  np.testing.assert_array_equal(kept(0.6)[0], [True, True, False, False])
  np.testing.assert_array_equal(kept(0.9)[0], [True, True, True, False])
  got = sample.filter_logits(logits, temperature=2.0).numpy()
  np.testing.assert_allclose(got, logits / 2.0, rtol=1e-6)
  with pytest.raises(ValueError, match="temperature"):
    sample.filter_logits(logits, temperature=0.0)
  with pytest.raises(ValueError, match="top_p"):
    sample.filter_logits(logits, top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    sample.filter_logits(logits, temperature=0.0)


def test_generate_keeps_the_prompt_and_is_seeded():
  rng = np.random.default_rng()
  model = models.SparseTransformer(seq_len=64, width=16, num_layers=2,
                                   num_heads=2, stride=16, summary_size=4,
                                   block_size=16)
  prompt = rng.integers(0, 256, (2, 5))
  a = sample.generate(model, prompt, 10, top_k=20, seed=3)
  b = sample.generate(model, prompt, 10, top_k=20, seed=3)
  c = sample.generate(model, prompt, 10, top_k=20, seed=4)
  assert a.shape == (2, 15) and a.dtype == np.uint8
  np.testing.assert_array_equal(a[:, :5], prompt)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Greedy-like: with top_k=1 each byte is the argmax of the full forward.
  greedy = sample.generate(model, prompt[:1], 3, top_k=1, seed=0)
  tokens = np.zeros((1, 64), np.int32)
  tokens[0, :8] = greedy[0]
  logits = model(tokens).numpy()[0]
  np.testing.assert_array_equal(greedy[0, 5:], logits[4:7].argmax(-1))
  with pytest.raises(ValueError, match="fit the context"):
    sample.generate(model, prompt, 61)
  # prompt + length = seq_len + 1: the last byte is drawn from the logits
  # of the last position, by both decoders alike.
  whole = sample.generate(model, prompt, 60, seed=5)
  assert whole.shape == (2, 65)
  np.testing.assert_array_equal(
      whole, sample.generate(model, prompt, 60, seed=5, use_cache=False))
  with pytest.raises(ValueError, match="prompt tokens"):
    sample.generate(model, np.full((1, 3), 300), 2)


@pytest.mark.parametrize("layout", [
    layouts.fixed(96, 16, stride=32, summary=8, num_heads=2),
    layouts.fixed(96, 16, stride=32, summary=8, num_heads=3,
                  num_summary_patterns=3, part="summary"),
    layouts.strided(80, 16, stride=12, num_heads=2),
    layouts.per_head(layouts.strided(96, 16, stride=16, num_heads=1,
                                     part="local"),
                     layouts.strided(96, 16, stride=16, num_heads=2,
                                     part="stride")),
    layouts.causal(64, 16, num_heads=1),
    # Two table heads for four heads: head h reads table head h % 2.
    layouts.fixed(96, 16, stride=32, summary=16, num_heads=4,
                  num_summary_patterns=2),
], ids=["fixed", "fixed_summary_only", "strided_ragged", "multihead",
        "dense", "fixed_shared_tables"])
def test_attended_keys_are_the_row_of_the_layout(layout):
  dense = layout.to_dense()  # (heads, n, n): the token truth
  heads, n = dense.shape[:2]
  find = tf.function(lambda t: ops.attended_keys(layout, t))
  for position in range(n):
    keys, valid = (x.numpy() for x in find(tf.constant(position)))
    assert keys.shape[0] in (1, heads)  # 1: every head has the same set
    keys, valid = (np.broadcast_to(x, (heads, x.shape[1]))
                   for x in (keys, valid))
    for h in range(heads):
      chosen = keys[h][valid[h]]
      assert len(set(chosen.tolist())) == chosen.size  # each key once
      np.testing.assert_array_equal(np.sort(chosen),
                                    np.flatnonzero(dense[h, position]))


def test_a_step_reads_the_sparse_set_not_the_whole_prefix():
  n = 4096
  keys, _ = ops.attended_keys(layouts.fixed(n, 32, 128, 32, 4),
                              tf.constant(n - 1))
  # The own window's 4 blocks + the summary block of the 31 earlier
  # windows: 35 of the 128 blocks a dense cache would read, the same for
  # every head.
  assert keys.shape == (1, 35 * 32)
  keys, _ = ops.attended_keys(layouts.strided(n, 32, 128, 4),
                              tf.constant(n - 1))
  assert keys.shape[1] <= 8 * 32


def _random_model(pattern, integration="merged", qk_ratio=1.0,
                  num_heads=2):
  model = models.SparseTransformer(
      seq_len=96, width=24, num_layers=2, num_heads=num_heads,
      pattern=pattern, integration=integration, stride=16, summary_size=4,
      block_size=16, qk_ratio=qk_ratio)
  model.build()
  rng = np.random.default_rng()
  # Larger than initial weights so that attention is far from uniform.
  model.set_weights([w + rng.normal(0, 0.3, w.shape).astype(w.dtype)
                     for w in model.get_weights()])
  return model, rng


@pytest.mark.parametrize("pattern,integration,qk_ratio,num_heads", [
    ("fixed", "merged", 1.0, 2),
    ("fixed", "interleaved", 0.5, 3),
    ("strided", "merged", 1.0, 2),
    ("strided", "multihead", 1.0, 2),
    ("dense", "merged", 1.0, 1),
])
def test_cached_logits_equal_the_full_forward_at_every_position(
    pattern, integration, qk_ratio, num_heads):
  model, rng = _random_model(pattern, integration, qk_ratio, num_heads)
  tokens = rng.integers(0, 256, (3, model.seq_len)).astype(np.int32)
  full = model(tokens).numpy()  # (3, n, 256)
  cached = sample.cached_logits(model, tokens).numpy()
  for position in range(model.seq_len):
    np.testing.assert_allclose(cached[:, position], full[:, position],
                               rtol=1e-4, atol=1e-4,
                               err_msg=f"position {position}")


def test_cached_decoding_under_mixed_float16_keeps_scores_in_float32():
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    model, rng = _random_model("fixed")
    tokens = rng.integers(0, 256, (2, model.seq_len)).astype(np.int32)
    full = model(tokens).numpy()
    caches = model.initial_cache(2)
    assert all(c.dtype == tf.float32 for pair in caches for c in pair)
    cached = sample.cached_logits(model, tokens)
    assert cached.dtype == tf.float32
    # Both run float16 projections: equal to float16 rounding.
    np.testing.assert_allclose(cached.numpy(), full,
                               atol=0.05 * np.abs(full).max())
  finally:
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("pattern", ["fixed", "strided", "dense"])
def test_cached_and_full_forward_generation_draw_the_same_bytes(pattern):
  model, rng = _random_model(pattern)
  prompt = rng.integers(0, 256, (2, 9))
  seed = int(rng.integers(1 << 30))
  cached = sample.generate(model, prompt, 40, temperature=0.9, top_k=50,
                           seed=seed)
  full = sample.generate(model, prompt, 40, temperature=0.9, top_k=50,
                         seed=seed, use_cache=False)
  np.testing.assert_array_equal(cached, full)
  np.testing.assert_array_equal(cached[:, :9], prompt)


def _saved_run(tmp_path, kind, embedding_axes=None, seq_len=64):
  model = models.SparseTransformer(seq_len=seq_len, width=16, num_layers=1,
                                   num_heads=2, stride=16, summary_size=4,
                                   block_size=16,
                                   embedding_axes=embedding_axes)
  model.build()
  path = str(tmp_path / "model.keras")
  model.save(path)
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"data": {"kind": kind}}, f)
  return path


def test_cli_writes_text_continuing_the_prompt(tmp_path):
  path = _saved_run(tmp_path, "text")
  out = tmp_path / "sample.txt"
  assert sample.main(["--model", path, "--prompt", "def f(x):",
                      "--length", "20", "--batch", "2", "--seed", "1",
                      "--top-p", "0.9", "--output", str(out)]) == 0
  # A header per sample with its byte count: samples holding newlines (or
  # any byte) are read back exactly.
  data, rows = out.read_bytes(), []
  while data:
    header, data = data.split(b"\n", 1)
    match = re.fullmatch(rb"=== sample (\d+)/2: (\d+) bytes ===", header)
    assert match and int(match.group(1)) == len(rows) + 1, header
    size = int(match.group(2))
    rows.append(data[:size])
    assert data[size:size + 1] == b"\n"
    data = data[size + 1:]
  assert len(rows) == 2 and all(len(r) == 9 + 20 for r in rows)
  assert all(r.startswith(b"def f(x):") for r in rows)
  with pytest.raises(SystemExit):  # does not fit the context
    sample.main(["--model", path, "--length", "80", "--output", str(out)])


def test_cli_writes_an_image_grid_and_wav(tmp_path):
  import matplotlib.image  # pylint: disable=import-outside-toplevel
  path = _saved_run(tmp_path, "cifar10", embedding_axes=(4, 4, 3),
                    seq_len=48)
  prompt = np.random.default_rng().integers(0, 256, (4, 4, 3), np.uint8)
  matplotlib.image.imsave(tmp_path / "prompt.png", prompt)
  out = tmp_path / "grid.png"
  sample.main(["--model", path, "--prompt-image", str(tmp_path / "prompt.png"),
               "--prompt-rows", "2", "--length", "23", "--batch", "4",
               "--output", str(out)])
  grid = matplotlib.image.imread(out)
  assert grid.shape[:2] == (2 * 5, 2 * 5)  # 2 x 2 images of 4 x 4, 1 px gap
  # The first two rows of every image are the prompt's.
  np.testing.assert_allclose(grid[:2, :4, :3] * 255, prompt[:2], atol=1)
  np.testing.assert_allclose(grid[5:7, 5:9, :3] * 255, prompt[:2], atol=1)

  (tmp_path / "audio_run").mkdir()
  path = _saved_run(tmp_path / "audio_run", "audio")
  out = tmp_path / "audio.wav"
  sample.main(["--model", path, "--length", "30", "--batch", "2",
               "--output", str(out)])
  with wave.open(str(out)) as f:
    assert (f.getframerate(), f.getsampwidth(), f.getnchannels()) == (
        12000, 2, 1)
    assert f.getnframes() == 2 * (31 + 3000)
    pcm = np.frombuffer(f.readframes(f.getnframes()), "<i2")
  # Each clip starts from silence (mu-law 128), not a full-scale click.
  assert audio.mu_law_encode(np.zeros(1))[0] == audio.SILENCE
  assert abs(int(pcm[0])) <= 3 and abs(int(pcm[31 + 3000])) <= 3


def test_cli_samples_every_value_of_an_image(tmp_path):
  # --length = rows * cols * channels after the start byte fills the whole
  # image; with the logits' bias on byte 200, every drawn value is 200 (an
  # undrawn one would be the grid's 0).
  import matplotlib.image  # pylint: disable=import-outside-toplevel
  model = models.SparseTransformer(seq_len=48, width=16, num_layers=1,
                                   num_heads=2, stride=16, summary_size=4,
                                   block_size=16, embedding_axes=(4, 4, 3))
  model.build()
  bias = np.full(256, -1e4, np.float32)
  bias[200] = 0.0
  model.logits.bias.assign(bias)
  path = str(tmp_path / "model.keras")
  model.save(path)
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"data": {"kind": "cifar10"}}, f)
  out = tmp_path / "image.png"
  assert sample.main(["--model", path, "--length", "48", "--output",
                      str(out)]) == 0
  grid = np.round(matplotlib.image.imread(out)[..., :3] * 255)
  assert grid.shape == (5, 5, 3)  # one 4 x 4 image and its 1 px border
  assert (grid[:4, :4] == 200).all()
  with pytest.raises(SystemExit):  # one more than the image holds
    sample.main(["--model", path, "--length", "49", "--output", str(out)])
