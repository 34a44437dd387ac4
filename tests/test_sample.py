"""Sampling: logit filters and seeded generation."""

import numpy as np
import pytest

from st_keras import models
from st_keras import sample


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


def test_generate_keeps_the_prompt_and_is_seeded():
  rng = np.random.default_rng()
  model = models.SparseTransformer(seq_len=64, width=16, num_layers=2,
                                   num_heads=2, stride=16, summary=4,
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
    sample.generate(model, prompt, 60)
  with pytest.raises(ValueError, match="prompt tokens"):
    sample.generate(model, np.full((1, 3), 300), 2)
