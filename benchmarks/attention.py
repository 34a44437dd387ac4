"""Attention benchmark: st_keras block-sparse attention against its peers on CPU.

Times the forward pass and forward + backward pass, and measures peak memory,
of these implementations side by side in one run:

* ``custom_op``: `st_keras.ops.block_sparse_attention`, fused C++ op.
* ``pure_tf``: the same function in stock TensorFlow ops (gather + mask).
* ``tf_dense``: dense TensorFlow attention (einsum, mask, softmax, einsum)
  with the pattern's exact token mask, built with tf ops from the formulas.
* ``keras_mha``: `keras.layers.MultiHeadAttention(use_causal_mask=True)`
  (dense causal, includes the q/k/v/output projections).
* ``torch_sdpa``: `torch.nn.functional.scaled_dot_product_attention`
  (dense, is_causal=True).
* ``torch_flex``: compiled `flex_attention` with a block mask from the same
  pattern formula (forward only on CPU).

Patterns: the paper's fixed (l=128, c=32) and strided (l=128) causal
patterns, block 32; B=1, H=4, head_dim=64, float32. Before timing, a check at
n=512 asserts that every peer's mask equals `Layout.to_dense()` and that the
outputs (and the op's gradients) agree.

Every measurement runs in its own child process (forked from a fork server
that has only imported the libraries), so an OOM or a crash costs one table
cell and peak RSS is clean; the parent kills a child past its time or memory
limit.

Usage (from the repository root):
  python -m benchmarks.attention          # full run
  python -m benchmarks.attention --quick  # ~1 min
  ... --patterns fixed --impls custom_op,torch_flex --max-n 8192 --reps 3

The full run writes its section of BENCHMARKS.md (between the markers
SECTION_BEGIN / SECTION_END) and docs/attention_benchmark.png; --quick only
prints the tables unless --output is given. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time

from benchmarks import common
from benchmarks.common import GIB
from benchmarks.common import MIB
from benchmarks.common import proc_status_bytes

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# Problem sizes.
BATCH, HEADS, HEAD_DIM = 1, 4, 64
MODEL_DIM = HEADS * HEAD_DIM  # keras MHA input width
BLOCK, STRIDE, SUMMARY = 32, 128, 32
PATTERNS = ("fixed", "strided")
N_ALL = (1024, 2048, 4096, 8192, 16384)
N_OP_ONLY = (32768, 65536)  # EXTENDED_IMPLS only
N_QUICK = (1024, 2048)
VERIFY_N = 512

# Implementations, in table order.
IMPLS = ("custom_op", "pure_tf", "tf_dense", "keras_mha", "torch_sdpa",
         "torch_flex")
LABELS = {
    "custom_op": "st_keras custom_op",
    "pure_tf": "st_keras pure_tf",
    "tf_dense": "TF dense + pattern mask",
    "keras_mha": "keras MHA, causal (+proj.)",
    "torch_sdpa": "torch SDPA, causal",
    "torch_flex": "torch flex_attention",
}
# --quick skips torch.compile (about 25 s a shape with a cold cache).
QUICK_IMPLS = tuple(i for i in IMPLS if i != "torch_flex")
CAUSAL_IMPLS = ("keras_mha", "torch_sdpa")  # pattern-independent: run once per n
EXTENDED_IMPLS = ("custom_op", "pure_tf")  # also run at N_OP_ONLY (memory guard)
FORWARD_ONLY_IMPLS = ("torch_flex",)
MODES = ("fwd", "fwd_bwd")
MODE_TITLES = {"fwd": "forward", "fwd_bwd": "forward + backward"}
FLOPS_PER_PAIR_DIM = {"fwd": 4, "fwd_bwd": 10}

# Timing and isolation.
DEFAULT_REPS, QUICK_REPS = 5, 3
MIN_RUNS = 3  # a measurement may stop after this many runs ...
RUN_BUDGET_S = 30.0  # ... once its timed runs took this long
# Outside --quick, quick calls are repeated past `reps` until their timed
# calls span this long (at most MAX_RUNS calls), so that their median covers
# as long a stretch of this shared machine's noise as a slow peer's does.
MIN_TIMED_S, MAX_RUNS = 6.0, 40
SECOND_WARMUP_BELOW_S = 5.0  # a second warm-up call when the first was quick
DEFAULT_TIMEOUT_S = 600
MEMORY_GUARD_GIB = 16.0  # skip a config whose estimated peak is larger
MEMORY_KILL_GIB = 20.0  # kill a child whose RSS grows past this
POLL_S = 0.1
TORCH_THREADS = 2
MATMUL_N, MATMUL_RUNS = 2048, 15
ATOL = 1e-4

# Peak memory of the O(n^2)-memory paths as a multiple of their big tensors
# (dense: the float32 scores; pure_tf: gathered k, v and scores). Measured on
# the development machine at n = 2048 .. 8192: dense 1.05 (fwd) and 3.1
# (fwd_bwd), pure_tf 0.65-0.95 and 2.0; rounded up here.
PEAK_FACTORS = {
    ("tf_dense", "fwd"): 1.5, ("tf_dense", "fwd_bwd"): 3.5,
    ("keras_mha", "fwd"): 1.5, ("keras_mha", "fwd_bwd"): 3.5,
    ("pure_tf", "fwd"): 1.2, ("pure_tf", "fwd_bwd"): 2.5,
}

SECTION_BEGIN = "<!-- attention:begin -->"
SECTION_END = "<!-- attention:end -->"
DEFAULT_OUTPUT = common.BENCHMARKS_MD
DEFAULT_PLOT = os.path.join(common.REPO_ROOT, "docs", "attention_benchmark.png")


class Unavailable(Exception):
  """A measurement that cannot run here; its message is the table status."""


# ----------------------------------------------------------------------------
# Patterns (shared by numpy, TensorFlow and PyTorch code).


def pattern_allows(pattern, i, j):
  """The causal token rule of a pattern.

  Args:
    pattern: "fixed", "strided" or "causal".
    i: query positions; numpy, tf or torch integer array/tensor.
    j: key positions, broadcastable against i.

  Returns:
    Boolean array/tensor of the broadcast shape: whether query i attends j.
  """
  causal = j <= i
  if pattern == "fixed":
    same_window = j // STRIDE == i // STRIDE
    summary = j % STRIDE >= STRIDE - SUMMARY
    return causal & (same_window | summary)
  if pattern == "strided":
    return causal & ((i - j < STRIDE) | ((i - j) % STRIDE == 0))
  if pattern == "causal":
    return causal
  raise ValueError(f"unknown pattern {pattern!r}")


def make_layout(pattern, n):
  """Builds the st_keras layout of a pattern.

  Args:
    pattern: "fixed", "strided" or "causal".
    n: sequence length.

  Returns:
    An `st_keras.layouts.Layout` for HEADS heads.
  """
  from st_keras import layouts
  if pattern == "fixed":
    return layouts.fixed(n, block_size=BLOCK, stride=STRIDE, summary=SUMMARY,
                         num_heads=HEADS)
  if pattern == "strided":
    return layouts.strided(n, block_size=BLOCK, stride=STRIDE,
                           num_heads=HEADS)
  return layouts.causal(n, block_size=BLOCK, num_heads=HEADS)


def causal_pairs(n):
  """Returns the (query, key) pairs of dense causal attention over all heads."""
  return HEADS * n * (n + 1) // 2


def measure(run, reps, min_timed_s=0.0):
  """Times a callable and records its peak memory.

  One or two warm-up calls (tracing, compilation), then `reps` timed calls,
  more (up to MAX_RUNS) while the timed calls took less than MIN_TIMED_S;
  stops early after MIN_RUNS calls once the timed calls took RUN_BUDGET_S.
  Peak memory is VmHWM minus the RSS after the warm-up. Python's garbage
  collector is off during the timed calls, as in `timeit`: its full passes
  over the framework's millions of objects would otherwise land in whichever
  call happens to trigger them.

  Args:
    run: zero-argument callable that blocks until its work is done.
    reps: number of timed calls wanted.
    min_timed_s: keep timing (up to MAX_RUNS calls) until the timed calls
      span this long.

  Returns:
    dict with status "ok", ms (median), runs, peak_mib, warmup_s.
  """
  start = time.perf_counter()
  run()
  warmup_s = time.perf_counter() - start
  if warmup_s < SECOND_WARMUP_BELOW_S:
    run()
  common.release_free_memory()
  baseline = proc_status_bytes("VmRSS")
  common.reset_peak_rss()
  times = []
  gc.disable()
  try:
    while len(times) < reps or (sum(times) < min_timed_s and
                                len(times) < MAX_RUNS):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
      if len(times) >= MIN_RUNS and sum(times) > RUN_BUDGET_S:
        break
  finally:
    gc.enable()
  peak = proc_status_bytes("VmHWM") - baseline
  return {"status": "ok", "ms": 1e3 * statistics.median(times),
          "runs": len(times), "peak_mib": max(peak, 0) / MIB,
          "warmup_s": warmup_s}


# ----------------------------------------------------------------------------
# Child side: TensorFlow implementations.


def random_inputs(n, seed=0):
  """Returns float32 numpy q, k, v, dout, each [BATCH, HEADS, n, HEAD_DIM]."""
  import numpy as np
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((BATCH, HEADS, n, HEAD_DIM), np.float32)
          for _ in range(4)]


def token_mask_tf(pattern, n):
  """Builds a pattern's token mask with tf ops (no n x n numpy detour).

  Args:
    pattern: "fixed", "strided" or "causal".
    n: sequence length.

  Returns:
    tf.bool [n, n], [query, key]; the same for every head.
  """
  import tensorflow as tf
  i = tf.range(n)[:, None]  # (n, 1) query positions
  j = tf.range(n)[None, :]  # (1, n) key positions
  return pattern_allows(pattern, i, j)  # (n, n)


def dense_masked_attention(q, k, v, mask):
  """Dense softmax attention restricted by a token mask, stock TF ops.

  Args:
    q, k, v: float32 [B, H, n, d].
    mask: bool [n, n], True where query i may attend key j.

  Returns:
    float32 [B, H, n, d].
  """
  import tensorflow as tf
  scale = 1.0 / math.sqrt(q.shape[-1])
  scores = tf.einsum("bhid,bhjd->bhij", q * scale, k)  # (B, H, n, n)
  scores = tf.where(mask, scores, -1e30)  # (B, H, n, n), mask broadcast
  probs = tf.nn.softmax(scores, axis=-1)  # (B, H, n, n)
  return tf.einsum("bhij,bhjd->bhid", probs, v)  # (B, H, n, d)


def sparse_forward(impl, layout):
  """Returns f(q, k, v) -> [B, H, n, d] through st_keras with `impl`.

  Raises:
    Unavailable: the custom op was asked for and its library did not load.
  """
  from st_keras import ops
  if impl == "custom_op" and not ops.custom_op_available():
    raise Unavailable(f"op library not loaded ({ops.load_error()})")
  return lambda q, k, v: ops.block_sparse_attention(q, k, v, layout,
                                                    implementation=impl)


def make_mha():
  """Returns a built keras MultiHeadAttention(num_heads=HEADS, key_dim=HEAD_DIM)."""
  import keras
  layer = keras.layers.MultiHeadAttention(num_heads=HEADS, key_dim=HEAD_DIM)
  layer.build((BATCH, None, MODEL_DIM), (BATCH, None, MODEL_DIM))
  return layer


def tf_runner(forward, tensors, dout, mode, variables=()):
  """Wraps a TF forward function in tf.function for one timing mode.

  Args:
    forward: f(*tensors) -> output tensor.
    tensors: the eager input tensors.
    dout: output gradient, the output's shape (fwd_bwd only).
    mode: "fwd" or "fwd_bwd" (gradients w.r.t. tensors and variables).
    variables: extra variables to differentiate, e.g. layer weights.

  Returns:
    A zero-argument callable that runs the step and waits for its results.
  """
  import tensorflow as tf
  if mode == "fwd":
    step = tf.function(forward)
    return lambda: step(*tensors).numpy()

  @tf.function
  def step_with_grads(*args):
    with tf.GradientTape() as tape:
      tape.watch(args)
      out = forward(*args)
    return tape.gradient(out, list(args) + list(variables),
                         output_gradients=dout)

  return lambda: [g.numpy() for g in step_with_grads(*tensors)]


# ----------------------------------------------------------------------------
# Child side: PyTorch implementations.


def import_torch():
  """Imports torch with TORCH_THREADS threads.

  Returns:
    The torch module.

  Raises:
    Unavailable: torch is not installed.
  """
  try:
    import torch
  except ImportError as err:
    raise Unavailable("torch not installed") from err
  torch.set_num_threads(TORCH_THREADS)
  return torch


def flex_forward(torch, pattern, n):
  """Compiled flex_attention with a block mask from the pattern formula.

  Args:
    torch: the torch module.
    pattern: "fixed" or "strided".
    n: sequence length.

  Returns:
    (f(q, k, v) -> [B, H, n, d], mask_mod).
  """
  from torch.nn.attention import flex_attention as fa

  def mask_mod(b, h, q_idx, kv_idx):
    del b, h  # the pattern is the same for every batch entry and head
    return pattern_allows(pattern, q_idx, kv_idx)

  block_mask = fa.create_block_mask(mask_mod, None, None, n, n, device="cpu",
                                    BLOCK_SIZE=BLOCK)
  compiled = torch.compile(fa.flex_attention, dynamic=False)
  return (lambda q, k, v: compiled(q, k, v, block_mask=block_mask)), mask_mod


def torch_runner(torch, forward, tensors, dout, mode):
  """Returns a zero-argument callable running a torch step in one mode.

  Args:
    torch: the torch module.
    forward: f(*tensors) -> output tensor.
    tensors: input tensors.
    dout: output gradient (fwd_bwd only).
    mode: "fwd" (under no_grad) or "fwd_bwd" (gradients w.r.t. tensors).
  """
  if mode == "fwd":
    def run_forward():
      with torch.no_grad():
        forward(*tensors)
    return run_forward
  leaves = [t.detach().requires_grad_() for t in tensors]
  return lambda: torch.autograd.grad(forward(*leaves), leaves, dout)


# ----------------------------------------------------------------------------
# Child side: jobs.


def build_runner(impl, pattern, n, mode):
  """Prepares inputs and the step of one measurement.

  Args:
    impl: one of IMPLS.
    pattern: "fixed", "strided" or "causal" (causal impls).
    n: sequence length.
    mode: "fwd" or "fwd_bwd".

  Returns:
    A zero-argument callable for `measure`.
  """
  arrays = random_inputs(n)
  if impl in ("torch_sdpa", "torch_flex"):
    torch = import_torch()
    q, k, v, dout = (torch.from_numpy(a) for a in arrays)
    if impl == "torch_flex":
      forward, _ = flex_forward(torch, pattern, n)
    else:
      forward = functools.partial(
          torch.nn.functional.scaled_dot_product_attention, is_causal=True)
    return torch_runner(torch, forward, (q, k, v), dout, mode)
  import numpy as np
  import tensorflow as tf
  q, k, v, dout = (tf.constant(a) for a in arrays)
  if impl == "keras_mha":
    # Grappler would constant-fold the layer's n x n causal mask on the first
    # call (24 s at n=8192); computing it per call costs little.
    tf.config.optimizer.set_experimental_options({"constant_folding": False})
    layer = make_mha()
    rng = np.random.default_rng(1)
    x, dy = (tf.constant(rng.standard_normal((BATCH, n, MODEL_DIM), np.float32))
             for _ in range(2))  # (B, n, MODEL_DIM)

    def self_attention(x):
      return layer(x, x, use_causal_mask=True)  # (B, n, MODEL_DIM)

    return tf_runner(self_attention, [x], dy, mode, layer.trainable_weights)
  if impl == "tf_dense":
    mask = token_mask_tf(pattern, n)  # (n, n), an input: built before timing
    forward = functools.partial(dense_masked_attention, mask=mask)
  else:
    forward = sparse_forward(impl, make_layout(pattern, n))
  return tf_runner(forward, [q, k, v], dout, mode)


def time_job(spec):
  """Runs one timing measurement described by spec (impl, pattern, n, mode, reps)."""
  run = build_runner(spec["impl"], spec["pattern"], spec["n"], spec["mode"])
  return measure(run, spec["reps"], spec["min_timed_s"])


def matmul_job(spec):
  """Measures the float32 tf.matmul rate on MATMUL_N x MATMUL_N matrices.

  Returns:
    dict with status, gflops (median), runs.
  """
  del spec
  import tensorflow as tf
  a = tf.random.normal([MATMUL_N, MATMUL_N])
  b = tf.random.normal([MATMUL_N, MATMUL_N])
  for _ in range(2):
    tf.matmul(a, b).numpy()
  times = []
  for _ in range(MATMUL_RUNS):
    start = time.perf_counter()
    tf.matmul(a, b).numpy()
    times.append(time.perf_counter() - start)
  return {"status": "ok", "runs": MATMUL_RUNS,
          "gflops": 2 * MATMUL_N**3 / statistics.median(times) / 1e9}


class Checks:
  """Collects verification results; every check asserts before it is recorded."""

  def __init__(self):
    self.lines = []

  def equal(self, name, got, want):
    """Asserts two boolean masks are identical."""
    import numpy as np
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    mismatches = int(np.count_nonzero(got != want))
    assert mismatches == 0, f"{name}: {mismatches} mask entries differ"
    self.lines.append(f"{name}: identical")

  def close(self, name, got, want):
    """Asserts two float arrays agree within ATOL (absolute and relative)."""
    import numpy as np
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=ATOL, atol=ATOL, err_msg=name)
    self.lines.append(f"{name}: max |diff| {np.max(np.abs(got - want)):.1e}")

  def torch_if(self, impls, wanted):
    """Returns torch when one of `wanted` is selected and torch imports.

    Args:
      impls: selected implementations.
      wanted: implementations that need torch here.

    Returns:
      The torch module, or None (noted in the lines when torch is missing).
    """
    if not set(impls) & set(wanted):
      return None
    try:
      return import_torch()
    except Unavailable as err:
      note = f"torch checks skipped: {err}"
      if note not in self.lines:
        self.lines.append(note)
      return None


def verify_pattern(checks, pattern, impls, arrays):
  """Checks masks and outputs of every selected implementation on one pattern.

  Args:
    checks: a `Checks`.
    pattern: "fixed" or "strided".
    impls: selected implementations.
    arrays: numpy q, k, v, dout [B, H, VERIFY_N, d].
  """
  import numpy as np
  import tensorflow as tf
  n = VERIFY_N
  layout = make_layout(pattern, n)
  truth = layout.to_dense()  # (H, n, n)
  mask = token_mask_tf(pattern, n)  # (n, n)
  checks.equal(f"{pattern}: TF formula mask == to_dense()",
               np.broadcast_to(mask.numpy(), truth.shape), truth)
  q, k, v, dout = (tf.constant(a) for a in arrays)
  from st_keras import ops
  use_op = "custom_op" in impls and ops.custom_op_available()
  sparse = "custom_op" if use_op else "pure_tf"
  attend = sparse_forward(sparse, layout)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch([q, k, v])
    out_sparse = attend(q, k, v)  # (B, H, n, d)
    out_dense = dense_masked_attention(q, k, v, mask)  # (B, H, n, d)
  ref = out_sparse.numpy()
  checks.close(f"{pattern}: {sparse} vs TF dense masked, output", ref,
               out_dense.numpy())
  got = tape.gradient(out_sparse, [q, k, v], output_gradients=dout)
  want = tape.gradient(out_dense, [q, k, v], output_gradients=dout)
  for name, g, w in zip("qkv", got, want):
    checks.close(f"{pattern}: {sparse} vs TF dense masked, d{name}",
                 g.numpy(), w.numpy())
  if sparse == "custom_op" and "pure_tf" in impls:
    checks.close(f"{pattern}: custom_op vs pure_tf, output", ref,
                 sparse_forward("pure_tf", layout)(q, k, v).numpy())
  torch = checks.torch_if(impls, ("torch_sdpa", "torch_flex"))
  if torch is None:
    return
  tq, tk, tv = (torch.from_numpy(a) for a in arrays[:3])
  dense_mask = torch.from_numpy(truth)[None]  # (1, H, n, n)
  checks.close(f"{pattern}: {sparse} vs torch SDPA with to_dense() mask",
               ref, torch.nn.functional.scaled_dot_product_attention(
                   tq, tk, tv, attn_mask=dense_mask).numpy())
  if "torch_flex" in impls:
    from torch.nn.attention.flex_attention import create_mask
    forward, mask_mod = flex_forward(torch, pattern, n)
    flex_mask = create_mask(mask_mod, 1, 1, n, n, device="cpu")  # (1, 1, n, n)
    checks.equal(f"{pattern}: flex mask_mod == to_dense()",
                 np.broadcast_to(flex_mask.numpy()[0], truth.shape), truth)
    with torch.no_grad():
      checks.close(f"{pattern}: {sparse} vs torch flex_attention, output",
                   ref, forward(tq, tk, tv).numpy())


def verify_causal(checks, impls, arrays):
  """Checks the causal peers' masks (and SDPA's output) at VERIFY_N.

  Args:
    checks: a `Checks`.
    impls: selected implementations.
    arrays: numpy q, k, v, dout [B, H, VERIFY_N, d].
  """
  import numpy as np
  import tensorflow as tf
  n = VERIFY_N
  truth = make_layout("causal", n).to_dense()  # (H, n, n)
  mask = token_mask_tf("causal", n)  # (n, n)
  checks.equal("causal: TF formula mask == layouts.causal().to_dense()",
               np.broadcast_to(mask.numpy(), truth.shape), truth)
  if "keras_mha" in impls:
    layer = make_mha()
    x = tf.constant(np.random.default_rng(1).standard_normal(
        (BATCH, n, MODEL_DIM), np.float32))  # (B, n, MODEL_DIM)
    _, probs = layer(x, x, use_causal_mask=True,
                     return_attention_scores=True)  # (B, H, n, n)
    checks.equal("causal: keras MHA attention support == causal to_dense()",
                 probs.numpy()[0] > 0, truth)
  torch = checks.torch_if(impls, ("torch_sdpa",))
  if torch is not None:
    tq, tk, tv = (torch.from_numpy(a) for a in arrays[:3])
    q, k, v = (tf.constant(a) for a in arrays[:3])
    checks.close("causal: torch SDPA is_causal vs TF dense causal, output",
                 torch.nn.functional.scaled_dot_product_attention(
                     tq, tk, tv, is_causal=True).numpy(),
                 dense_masked_attention(q, k, v, mask).numpy())


def library_versions():
  """Returns {name: version} of the libraries the benchmark uses."""
  import keras
  import numpy as np
  import tensorflow as tf
  versions = {"Python": platform.python_version(), "TensorFlow": tf.__version__,
              "Keras": keras.__version__, "NumPy": np.__version__}
  try:
    versions["PyTorch"] = import_torch().__version__
  except Unavailable:
    versions["PyTorch"] = "not installed"
  return versions


def prepare_job(spec):
  """Verifies the implementations at VERIFY_N and sizes every planned config.

  Args:
    spec: dict with patterns, impls and ns (the lengths to size).

  Returns:
    dict with status, checks (lines), versions, op_error, and sizes:
    {"pattern/n": {"pairs": int, "gather_bytes": int}} where gather_bytes is
    the pure-TF path's gathered keys, values and scores.
  """
  import numpy as np

  from st_keras import ops
  checks = Checks()
  arrays = random_inputs(VERIFY_N)
  for pattern in spec["patterns"]:
    verify_pattern(checks, pattern, spec["impls"], arrays)
  verify_causal(checks, spec["impls"], arrays)
  sizes = {}
  for pattern in spec["patterns"]:
    for n in spec["ns"]:
      layout = make_layout(pattern, n)
      gather = 0
      for comp in layout.components:
        width = int(np.diff(comp.row_ptr).max()) * BLOCK  # padded keys per row
        # k and v gathered (B, H, nb, width, d) and scores (B, H, nb, bs, width)
        gather += (BATCH * HEADS * (n // BLOCK) * width *
                   (2 * HEAD_DIM + BLOCK) * 4)
      sizes[f"{pattern}/{n}"] = {"pairs": layout.num_pairs(),
                                 "gather_bytes": gather}
  return {"status": "ok", "checks": checks.lines, "sizes": sizes,
          "versions": library_versions(),
          "op_error": ops.load_error()}


JOBS = {"time": time_job, "matmul": matmul_job, "prepare": prepare_job}


def child_main(spec, conn):
  """Entry point of a measurement process: runs a job, sends its result dict.

  Args:
    spec: dict with "job" (a key of JOBS) and the job's fields.
    conn: the sending end of a multiprocessing pipe.
  """
  try:
    result = JOBS[spec["job"]](spec)
  except Unavailable as err:
    result = {"status": str(err)}
  except MemoryError:
    result = {"status": "OOM"}
  except Exception as err:  # noqa: BLE001 -- reported, never fatal here
    oom = type(err).__name__ == "ResourceExhaustedError"
    result = {"status": "OOM" if oom else "error",
              "error": f"{type(err).__name__}: {err}"[:2000]}
  conn.send(result)
  conn.close()


# ----------------------------------------------------------------------------
# Parent side: running children.


def fork_context():
  """Returns a forkserver context whose server has imported the libraries."""
  ctx = multiprocessing.get_context("forkserver")
  ctx.set_forkserver_preload(["__main__", "numpy", "tensorflow", "keras",
                              "st_keras.ops", "torch",
                              "torch.nn.attention.flex_attention"])
  return ctx


def run_isolated(ctx, spec, timeout_s):
  """Runs a job in a fresh child process under time and memory limits.

  Args:
    ctx: the multiprocessing context.
    spec: the job description for `child_main`.
    timeout_s: wall-clock limit.

  Returns:
    The child's result dict, or {"status": "timeout" | "OOM (...)" |
    "crashed (...)"} when it did not report.
  """
  receiver, sender = ctx.Pipe(duplex=False)
  proc = ctx.Process(target=child_main, args=(spec, sender))
  proc.start()
  sender.close()
  deadline = time.monotonic() + timeout_s
  result = None
  while result is None:
    if receiver.poll(POLL_S):
      try:
        result = receiver.recv()
      except EOFError:  # died without reporting
        break
    elif proc_status_bytes("VmRSS", proc.pid) > MEMORY_KILL_GIB * GIB:
      proc.kill()
      result = {"status": f"OOM (> {MEMORY_KILL_GIB:.0f} GiB)"}
    elif time.monotonic() > deadline:
      proc.kill()
      result = {"status": "timeout"}
  proc.join()
  receiver.close()
  if result is None:
    code = proc.exitcode
    result = {"status": "OOM (killed)" if code == -9 else f"crashed ({code})"}
  return result


def estimate_peak_bytes(impl, n, mode, size):
  """Rough peak memory of the O(n^2)-memory paths, for the memory guard.

  Args:
    impl: implementation name.
    n: sequence length.
    mode: "fwd" or "fwd_bwd".
    size: the prepare job's size entry of the pattern (None for causal).

  Returns:
    Estimated bytes, or 0 for paths with O(n) memory.
  """
  factor = PEAK_FACTORS.get((impl, mode), 0.0)
  if impl == "pure_tf":
    return factor * size["gather_bytes"]
  return factor * BATCH * HEADS * n * n * 4  # x the float32 scores


def planned_ns(impl, ns, op_ns):
  """Returns the lengths an implementation is measured at."""
  return tuple(ns) + (tuple(op_ns) if impl in EXTENDED_IMPLS else ())


def plan(patterns, impls, ns, op_ns):
  """Lists the measurements, interleaved by n so peers run close in time.

  Args:
    patterns: selected patterns.
    impls: selected implementations.
    ns: lengths for every implementation.
    op_ns: extra lengths for EXTENDED_IMPLS alone.

  Returns:
    List of (impl, pattern_key, n, mode); pattern_key is "causal" for the
    causal peers (measured once, shown under every pattern).
  """
  keys = []
  for n in sorted(set(ns) | set(op_ns)):
    for impl in impls:
      if n not in planned_ns(impl, ns, op_ns):
        continue
      pattern_keys = ["causal"] if impl in CAUSAL_IMPLS else patterns
      modes = ("fwd",) if impl in FORWARD_ONLY_IMPLS else MODES
      keys += [(impl, p, n, m) for p in pattern_keys for m in modes]
  return keys


def run_all(ctx, keys, sizes, reps, min_timed_s, timeout_s):
  """Runs every planned measurement, skipping configs past the memory guard.

  Args:
    ctx: the multiprocessing context.
    keys: from `plan`.
    sizes: the prepare job's sizes.
    reps: timed runs per measurement.
    min_timed_s: see `measure`.
    timeout_s: per-measurement limit.

  Returns:
    {key: result dict}.
  """
  results = {}
  for index, (impl, pattern, n, mode) in enumerate(keys, 1):
    key = (impl, pattern, n, mode)
    estimate = estimate_peak_bytes(impl, n, mode, sizes.get(f"{pattern}/{n}"))
    started = time.monotonic()
    if estimate > MEMORY_GUARD_GIB * GIB:
      results[key] = {"status": f"skipped (est. {estimate / GIB:.0f} GiB)"}
    else:
      results[key] = run_isolated(
          ctx, {"job": "time", "impl": impl, "pattern": pattern, "n": n,
                "mode": mode, "reps": reps, "min_timed_s": min_timed_s},
          timeout_s)
    res = results[key]
    summary = (f"{res['ms']:.1f} ms, {res['peak_mib']:.1f} MiB, "
               f"{res['runs']} runs, warm-up {res['warmup_s']:.1f} s"
               if res["status"] == "ok"
               else res["status"] + (f": {res['error']}" if "error" in res
                                     else ""))
    print(f"[{index}/{len(keys)}] {pattern:7s} n={n:<6d} {impl:10s} "
          f"{mode:7s} {summary} ({time.monotonic() - started:.0f} s)",
          file=sys.stderr, flush=True)
  return results


# ----------------------------------------------------------------------------
# Parent side: report.


def _fmt_ms(ms):
  """Formats milliseconds with about three significant digits."""
  if ms >= 100:
    return f"{ms:,.0f}"
  return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def pairs_of(impl, pattern, n, sizes):
  """Attended pairs an implementation computes: the pattern's, or causal."""
  if impl in CAUSAL_IMPLS:
    return causal_pairs(n)
  return sizes[f"{pattern}/{n}"]["pairs"]


def table(pattern, mode, impls, ns, op_ns, results, sizes, matmul_gflops):
  """Renders one Markdown table (one pattern, one mode).

  Args:
    pattern: "fixed" or "strided".
    mode: "fwd" or "fwd_bwd".
    impls: selected implementations.
    ns, op_ns: planned lengths (see `plan`).
    results: {key: result}.
    sizes: the prepare job's sizes.
    matmul_gflops: the reference float32 matmul rate.

  Returns:
    List of Markdown lines.
  """
  lines = [f"| n | implementation | {MODE_TITLES[mode]} ms | GFLOP/s | "
           f"% of matmul | peak MiB | runs | peer / op |",
           "|---:|---|---:|---:|---:|---:|---:|---:|"]
  for n in sorted(set(ns) | set(op_ns)):
    op = results.get(("custom_op", pattern, n, mode), {})
    for impl in impls:
      if (n not in planned_ns(impl, ns, op_ns) or
          (mode != "fwd" and impl in FORWARD_ONLY_IMPLS)):
        continue
      key = (impl, "causal" if impl in CAUSAL_IMPLS else pattern, n, mode)
      res = results[key]
      if res["status"] != "ok":
        lines.append(f"| {n} | {LABELS[impl]} | {res['status']} | – | – | – "
                     f"| – | – |")
        continue
      gflops = (FLOPS_PER_PAIR_DIM[mode] * HEAD_DIM *
                pairs_of(impl, pattern, n, sizes) / res["ms"] / 1e6)
      ratio = (f"{res['ms'] / op['ms']:.2f}" if op.get("status") == "ok"
               else "n/a")
      lines.append(
          f"| {n} | {LABELS[impl]} | {_fmt_ms(res['ms'])} | {gflops:.1f} | "
          f"{100 * gflops / matmul_gflops:.0f}% | {res['peak_mib']:.1f} | "
          f"{res['runs']} | {ratio} |")
  return lines


def sizes_table(patterns, ns, op_ns, sizes):
  """Renders the attended pairs and density of each pattern and length."""
  lines = ["| n | pattern | attended pairs (all heads) | density | "
           "causal pairs |", "|---:|---|---:|---:|---:|"]
  for n in sorted(set(ns) | set(op_ns)):
    for pattern in patterns:
      pairs = sizes[f"{pattern}/{n}"]["pairs"]
      lines.append(f"| {n} | {pattern} | {pairs:,} | "
                   f"{pairs / (HEADS * n * n):.4f} | {causal_pairs(n):,} |")
  return lines


def notes(reps):
  """Returns the Markdown notes that explain the tables."""
  return [
      "Notes:",
      "",
      f"- Time: median of {reps} timed calls after one or two warm-up "
      f"calls (tracing, compilation), more calls (up to {MAX_RUNS}) while "
      f"the timed calls span less than {MIN_TIMED_S:.0f} s, so a quick call's "
      "median covers as long a stretch of this shared machine's noise as a "
      f"slow one's; a measurement stops after {MIN_RUNS} calls once its "
      f"timed calls exceed {RUN_BUDGET_S:.0f} s ('runs' column). Each "
      "(implementation, pattern, n, mode) runs in a fresh process forked "
      "from a server that has only imported the libraries.",
      "- forward: inference (no tape / `torch.no_grad`). forward + backward: "
      "forward plus gradients w.r.t. q, k, v for a random output gradient "
      "(keras MHA: w.r.t. its input and its projection weights).",
      "- GFLOP/s counts useful work on attended (query, key) pairs: forward "
      "4 x pairs x head_dim, forward + backward 10 x pairs x head_dim "
      "(a strict count of the backward's four matmuls would give 12, 14 with "
      "recomputed scores, so fwd+bwd rates are conservative). Pairs are the "
      "pattern's for st_keras, TF dense and flex, and the dense causal "
      "H n (n+1) / 2 for keras MHA and SDPA. TF dense and keras MHA compute "
      "all n^2 scores anyway. '% of matmul' divides by the tf.matmul rate "
      "above.",
      "- keras MHA (num_heads=4, key_dim=64, inputs [1, n, 256], "
      "use_causal_mask=True) includes its q/k/v/output projections in its "
      "time (not in its flops). It runs with Grappler constant folding off: "
      "otherwise the first call folds the n x n causal mask (24 s at "
      "n=8192, minutes at 16384; steady-state time the same within noise), "
      "so its peak includes that per-call mask. "
      "keras MHA and SDPA are dense causal, so they are measured once per n "
      "and repeated in both patterns' tables.",
      "- TF dense uses the pattern's exact token mask, built with tf ops from "
      "the formula and passed in as a precomputed [n, n] bool input (not "
      "timed, not in its peak). flex_attention: `torch.compile(flex_attention,"
      f" dynamic=False)` with `create_block_mask(mask_mod, BLOCK_SIZE={BLOCK})`"
      " (the same tile as st_keras), mask_mod = the same formula; block mask "
      "and compilation happen before timing; forward only (no CPU backward "
      f"benchmarked). torch runs {TORCH_THREADS} threads.",
      "- peak MiB: the process's VmHWM minus its RSS after inputs, layout, "
      "warm-up and `malloc_trim` (VmHWM reset through /proc/self/clear_refs), "
      "so tracing and compilation are excluded and outputs, gradients and "
      "framework workspace included.",
      "- peer / op: the row's time divided by st_keras custom_op's at the "
      "same pattern, n and mode: > 1 means the op is faster.",
      "- Beyond n=16384 only st_keras runs (pure_tf where it fits). "
      f"A config whose estimated peak exceeds {MEMORY_GUARD_GIB:.0f} GiB is "
      f"skipped ('skipped (est. X GiB)'); a child past {MEMORY_KILL_GIB:.0f} "
      "GiB RSS is killed ('OOM'); others may read 'timeout' or 'crashed'.",
      "- The machine is shared and noisy: compare ratios within this run "
      "rather than absolute times across runs.",
  ]


def render_section(meta, patterns, impls, ns, op_ns, results, sizes,
                   plot_ref):
  """Renders the whole BENCHMARKS.md section.

  Args:
    meta: dict with command, date, wall_min, machine, versions, op_error,
      matmul ({"start": GFLOP/s, "end": GFLOP/s}), checks, errors, reps.
    patterns, impls, ns, op_ns: what was planned.
    results: {key: result}.
    sizes: the prepare job's sizes.
    plot_ref: relative path of the plot, or None.

  Returns:
    The section text, markers included.
  """
  reference = max(meta["matmul"].values())
  rates = ", ".join(f"{g:.1f} ({when})" for when, g in meta["matmul"].items())
  versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
  lines = [
      SECTION_BEGIN,
      "## Attention: st_keras block-sparse op vs. TensorFlow and PyTorch (CPU)",
      "",
      f"- Command: `{meta['command']}`",
      f"- Date: {meta['date']}; wall time {meta['wall_min']:.1f} min",
      f"- Machine: {meta['machine']}",
      f"- Versions: {versions}",
      f"- float32 matmul rate (tf.matmul {MATMUL_N}x{MATMUL_N}, median of "
      f"{MATMUL_RUNS}), GFLOP/s at the start and end of the run: {rates}; "
      f"'% of matmul' uses {reference:.1f}.",
      f"- Problem: B={BATCH}, H={HEADS}, head_dim={HEAD_DIM}, float32; fixed "
      f"pattern l={STRIDE}, c={SUMMARY}; strided l={STRIDE}; block {BLOCK}; "
      "causal, merged heads (A1 | A2).",
  ]
  if meta["op_error"]:
    lines.append(f"- The op library did not load: {meta['op_error']}")
  lines += ["", f"Checks at n={VERIFY_N} before timing (asserted, tolerance "
            f"{ATOL:g}):", ""]
  lines += [f"- {c}" for c in meta["checks"]]
  lines += ["", "Pattern sizes:", ""]
  lines += sizes_table(patterns, ns, op_ns, sizes)
  for pattern in patterns:
    for mode in MODES:
      lines += ["", f"### {pattern} pattern, {MODE_TITLES[mode]}", ""]
      lines += table(pattern, mode, impls, ns, op_ns, results, sizes,
                     reference)
  if plot_ref:
    lines += ["", f"![attention time vs n]({plot_ref})"]
  lines += [""] + notes(meta["reps"])
  if meta["errors"]:
    lines += ["", "Errors:", ""] + [f"- {e}" for e in meta["errors"]]
  lines.append(SECTION_END)
  return "\n".join(lines) + "\n"


def write_plot(path, patterns, impls, ns, op_ns, results):
  """Log-log plot of time vs n: one panel per pattern and mode.

  Args:
    path: PNG file to write.
    patterns, impls, ns, op_ns: what was planned.
    results: {key: result}.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(len(patterns), len(MODES), squeeze=False,
                           figsize=(12, 4.5 * len(patterns)))
  for row, pattern in enumerate(patterns):
    for col, mode in enumerate(MODES):
      ax = axes[row][col]
      for impl in impls:
        key_pattern = "causal" if impl in CAUSAL_IMPLS else pattern
        points = [(n, results[(impl, key_pattern, n, mode)]["ms"])
                  for n in planned_ns(impl, ns, op_ns)
                  if results.get((impl, key_pattern, n, mode),
                                 {}).get("status") == "ok"]
        if points:
          ax.plot(*zip(*points), marker="o", label=LABELS[impl],
                  color=f"C{IMPLS.index(impl)}")
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("sequence length n")
      ax.set_ylabel("ms (median)")
      ax.set_title(f"{pattern}, {MODE_TITLES[mode]}")
      ax.grid(True, which="both", alpha=0.3)
      ax.legend(fontsize=8)
  fig.suptitle(f"Attention on CPU: B={BATCH}, H={HEADS}, head_dim={HEAD_DIM},"
               f" float32")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------
# CLI.


def parse_args(argv):
  """Parses the command line; --quick fills in the options left unset."""
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help=f"n in {N_QUICK}, fixed pattern, {QUICK_REPS} "
                      "reps, no torch_flex (its compilation is slow) unless "
                      "--impls names it; prints the tables, writes nothing "
                      "unless --output is given")
  parser.add_argument("--reps", type=int,
                      help=f"timed runs per measurement (default "
                      f"{DEFAULT_REPS}, --quick {QUICK_REPS})")
  parser.add_argument("--patterns", help="comma-separated subset of "
                      f"{','.join(PATTERNS)}")
  parser.add_argument("--impls", help="comma-separated subset of "
                      f"{','.join(IMPLS)}")
  parser.add_argument("--max-n", type=int, help="largest sequence length")
  parser.add_argument("--output", help="Markdown file whose attention "
                      "section is replaced (default BENCHMARKS.md; --quick: "
                      "none)")
  parser.add_argument("--plot", help="PNG path of the plot (default "
                      "docs/attention_benchmark.png; written with the "
                      "section)")
  parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                      help="per-measurement limit in seconds")
  args = parser.parse_args(argv)
  args.patterns = _choices(parser, "--patterns", args.patterns,
                           ("fixed",) if args.quick else PATTERNS, PATTERNS)
  args.impls = _choices(parser, "--impls", args.impls,
                        QUICK_IMPLS if args.quick else IMPLS, IMPLS)
  args.reps = args.reps or (QUICK_REPS if args.quick else DEFAULT_REPS)
  if args.reps < 1:
    parser.error("--reps must be positive")
  max_n = args.max_n or math.inf
  args.ns = tuple(n for n in (N_QUICK if args.quick else N_ALL) if n <= max_n)
  args.op_ns = () if args.quick else tuple(n for n in N_OP_ONLY if n <= max_n)
  if not args.ns:
    parser.error(f"--max-n {args.max_n} leaves no sequence length")
  if args.output is None and not args.quick:
    args.output = DEFAULT_OUTPUT
  args.plot = args.plot or DEFAULT_PLOT
  return args


def _choices(parser, flag, value, default, allowed):
  """Splits a comma-separated option and checks it against `allowed`."""
  if value is None:
    return tuple(default)
  chosen = tuple(v.strip() for v in value.split(",") if v.strip())
  unknown = [v for v in chosen if v not in allowed]
  if unknown or not chosen:
    parser.error(f"{flag}: unknown {unknown or 'empty'}; choose from "
                 f"{','.join(allowed)}")
  return tuple(v for v in allowed if v in chosen)  # canonical order


def main(argv=None):
  """Runs the benchmark; returns the process exit status."""
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  start = time.monotonic()
  ctx = fork_context()
  all_ns = sorted(set(args.ns) | set(args.op_ns))
  print(f"[attention] verifying at n={VERIFY_N}, sizing n={all_ns}",
        file=sys.stderr, flush=True)
  prep = run_isolated(ctx, {"job": "prepare", "patterns": args.patterns,
                            "impls": args.impls, "ns": all_ns},
                      args.timeout)
  if prep["status"] != "ok":
    print(f"[attention] verification failed: {prep}", file=sys.stderr)
    return 1
  for line in prep["checks"]:
    print(f"[check] {line}", file=sys.stderr)
  first = run_isolated(ctx, {"job": "matmul"}, args.timeout)
  if first["status"] != "ok":
    print(f"[attention] matmul reference failed: {first}", file=sys.stderr)
    return 1
  keys = plan(args.patterns, args.impls, args.ns, args.op_ns)
  results = run_all(ctx, keys, prep["sizes"], args.reps,
                    0.0 if args.quick else MIN_TIMED_S, args.timeout)
  last = run_isolated(ctx, {"job": "matmul"}, args.timeout)
  matmul = {"start": first["gflops"]}
  if last["status"] == "ok":
    matmul["end"] = last["gflops"]
  meta = {
      "command": common.command("attention", argv),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M UTC"),
      "wall_min": (time.monotonic() - start) / 60,
      "machine": common.machine_description(),
      "versions": prep["versions"],
      "op_error": prep["op_error"],
      "matmul": matmul,
      "checks": prep["checks"],
      "errors": [f"{k[0]} {k[1]} n={k[2]} {k[3]}: {r['error']}"
                 for k, r in results.items() if "error" in r],
      "reps": args.reps,
  }
  plot_ref = None
  if args.output:
    write_plot(args.plot, args.patterns, args.impls, args.ns, args.op_ns,
               results)
    plot_ref = os.path.relpath(args.plot,
                               os.path.dirname(os.path.abspath(args.output)))
  section = render_section(meta, args.patterns, args.impls, args.ns,
                           args.op_ns, results, prep["sizes"], plot_ref)
  if args.output:
    common.write_section(args.output, section, SECTION_BEGIN, SECTION_END)
    print(f"[attention] wrote {args.output} and {args.plot}", file=sys.stderr)
  else:
    print(section)
  print(f"[attention] done in {meta['wall_min']:.1f} min", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
