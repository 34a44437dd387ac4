"""Independent float64 references for the tests: dense masked attention in numpy.

Nothing here uses st_keras: the masks come from `to_dense()` (itself checked
against the paper's formulas in test_layouts.py) or from the formulas below.
"""

import numpy as np


def fixed_mask(n, stride, summary, num_heads, num_summary_patterns, part,
               causal):
  """The paper's fixed pattern, token level: bool [heads, n, n]."""
  i = np.arange(n)[:, None]
  j = np.arange(n)[None, :]
  heads = []
  for h in range(num_heads):
    slot = h % num_summary_patterns
    a1 = i // stride == j // stride
    r = j % stride
    a2 = (r >= stride - summary * (slot + 1)) & (r < stride - summary * slot)
    mask = {"local": a1, "summary": a2, "both": a1 | a2}[part]
    mask = mask & (j <= i) if causal else mask
    heads.append(np.broadcast_to(mask, (n, n)))
  return np.stack(heads)


def strided_mask(n, stride, num_heads, part, causal):
  """The paper's strided pattern, token level: bool [heads, n, n]."""
  i = np.arange(n)[:, None]
  j = np.arange(n)[None, :]
  if causal:
    a1 = (j <= i) & (i - j < stride)
    a2 = (j <= i) & ((i - j) % stride == 0)
  else:
    a1 = np.abs(i - j) < stride
    a2 = (i - j) % stride == 0
  mask = {"local": a1, "stride": a2, "both": a1 | a2}[part]
  return np.broadcast_to(mask, (num_heads, n, n)).copy()


def _full_mask(mask, batch, key_lengths):
  """[heads, n, n] (and key lengths) -> bool [batch, heads, n, n]."""
  full = np.broadcast_to(mask[None], (batch,) + mask.shape).copy()
  if key_lengths is not None:
    n = mask.shape[-1]
    for b, length in enumerate(key_lengths):
      full[b, :, :, max(0, min(n, length)):] = False
  return full


def attention(q, k, v, mask, scale, key_lengths=None):
  """Dense masked softmax attention in float64.

  Args:
    q, k, v: [batch, heads, n, d] arrays.
    mask: bool [heads, n, n].
    scale: score scale.
    key_lengths: optional [batch] ints.

  Returns:
    (out [batch, heads, n, d], probs [batch, heads, n, n]); rows with no
    allowed key are zero.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  full = _full_mask(mask, q.shape[0], key_lengths)
  s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
  s = np.where(full, s, -np.inf)
  top = s.max(axis=-1, keepdims=True)
  top = np.where(np.isfinite(top), top, 0.0)
  p = np.where(full, np.exp(s - top), 0.0)
  total = p.sum(axis=-1, keepdims=True)
  p = p / np.where(total > 0, total, 1.0)
  return np.einsum("bhqk,bhkd->bhqd", p, v), p


def attention_grads(q, k, v, mask, scale, dout, key_lengths=None):
  """Gradients of sum(attention(...) * dout) with respect to q, k and v.

  Returns:
    (dq, dk, dv), float64 arrays shaped like q.
  """
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
  _, p = attention(q, k, v, mask, scale, key_lengths)
  dv = np.einsum("bhqk,bhqd->bhkd", p, dout)
  dp = np.einsum("bhqd,bhkd->bhqk", dout, v)
  ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
  dq = np.einsum("bhqk,bhkd->bhqd", ds, k) * scale
  dk = np.einsum("bhqk,bhqd->bhkd", ds, q) * scale
  return dq, dk, dv
