"""The device check of the GPU kernels: correctness against float64, then
speed against PyTorch's FlexAttention and dense causal SDPA.

On a GPU machine with PyTorch and Triton and no TensorFlow (the kernels run
through their C ABI library, st_keras/lib/libst_bsa_gpu.so, rebuilt there
with custom_ops/triton/aot.py and g++ when it is missing or does not load):

    bash tools/gpu_check.sh --out DIR

On CPU, with tiny sizes, Triton's interpreter in place of the GPU and
PyTorch's CPU kernels as peers (the test suite runs this, so that the GPU
minutes are not spent on typos):

    GPU_CHECK_DRY_RUN=1 bash tools/gpu_check.sh --out DIR

Writes DIR/gpu_check.json (every check and timing) and prints a table last.
Exits 0 only when every correctness check passed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRY_RUN = os.environ.get("GPU_CHECK_DRY_RUN") == "1"
if DRY_RUN:  # before the kernels are decorated
  os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, REPO)

import numpy as np  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position

from custom_ops.triton import c_abi  # pylint: disable=wrong-import-position
from custom_ops.triton import launch  # pylint: disable=wrong-import-position


def _load_layouts():
  """The st_keras/layouts package by path (numpy only): the st_keras package
  imports TensorFlow where it is installed, as in the CPU dry run, and
  Triton aborts when it is imported beside TensorFlow."""
  path = os.path.join(REPO, "st_keras", "layouts")
  spec = importlib.util.spec_from_file_location(
      "st_keras_layouts", os.path.join(path, "__init__.py"),
      submodule_search_locations=[path])
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


layouts = _load_layouts()
C_ABI = os.path.join(REPO, "st_keras", "lib", "libst_bsa_gpu.so")
DTYPE_IDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# ----------------------------------------------------------------------------
# The C ABI library (block_sparse_attention_c_api.h) as a launch.py backend.


def build_c_abi(out_dir: str) -> str:
  """Compiles the kernels (aot.py, this machine's Triton) and the launcher
  (g++) into a C ABI library under out_dir; returns its path."""
  source = os.path.join(out_dir, "compiled_kernels.cc")
  library = os.path.join(out_dir, "libst_bsa_gpu.so")
  subprocess.run([sys.executable,
                  os.path.join(REPO, "custom_ops", "triton", "aot.py"),
                  "--kernels",
                  os.path.join(REPO, "custom_ops", "triton", "kernels.py"),
                  "--out", source, "--jobs", str(os.cpu_count() or 1)],
                 check=True)
  kernels_dir = os.path.join(REPO, "custom_ops", "cc", "kernels")
  subprocess.run(["g++", "-std=c++17", "-O2", "-fPIC", "-shared", "-I", REPO,
                  os.path.join(kernels_dir, "block_sparse_attention_gpu.cc"),
                  os.path.join(kernels_dir, "block_sparse_attention_c_api.cc"),
                  source, "-ldl", "-o", library], check=True)
  return library


class CAbi:
  """forward/backward of one component through libst_bsa_gpu.so, with
  launch.py's signatures (so `launch.attention(..., backend=CAbi(...))`).

  Args:
    path: the library.

  Raises:
    OSError: it does not load; RuntimeError: its self check fails.
  """

  def __init__(self, path: str):
    self.path = path
    self.lib = c_abi.Library(path)
    error = self.lib.self_check()
    if error:
      raise RuntimeError(f"{path}: self check failed: {error}")

  @staticmethod
  def _problem(q, tables, scale, key_lengths, original_order,
               accumulate) -> c_abi.Problem:
    batch, heads, n, head_dim = q.shape
    block = tables["masks"].shape[-1]
    ptr = lambda t: t.data_ptr() if t is not None and t.numel() else None  # pylint: disable=unnecessary-lambda-assignment
    return c_abi.Problem(
        batch=batch, heads=heads, seq_len=n, head_dim=head_dim,
        block_size=block, dtype=DTYPE_IDS[q.dtype], scale=scale,
        table_heads=(tables["row_ptr"].numel() - 1) // (n // block),
        row_ptr=ptr(tables["row_ptr"]),
        col_idx=ptr(tables["col_idx"]), mask_idx=ptr(tables["mask_idx"]),
        col_ptr=ptr(tables["col_ptr"]), row_idx=ptr(tables["row_idx"]),
        col_mask_idx=ptr(tables["col_mask_idx"]),
        masks=ptr(tables["masks"]), num_masks=tables["masks"].shape[0],
        key_lengths=ptr(key_lengths),
        key_positions=ptr(tables["key_positions"]),
        original_order=int(original_order), accumulate=int(accumulate))

  @staticmethod
  def _check(error: str) -> None:
    if error:
      raise RuntimeError(error)

  @staticmethod
  def _stream():
    return (torch.cuda.current_stream().cuda_stream
            if torch.cuda.is_available() else None)

  def forward(self, q, k, v, tables, scale, key_lengths=None,
              original_order=False, results=None):
    q, k, v = (x.contiguous() for x in (q, k, v))
    accumulate = results is not None
    if results is None:
      results = launch.empty_results(q)
    self._check(self.lib.forward(
        self._problem(q, tables, scale, key_lengths, original_order,
                      accumulate),
        *(x.data_ptr() for x in (q, k, v, *results)), self._stream()))
    return results

  def backward(self, q, k, v, out, stats, dout, dlse, tables, scale,
               key_lengths=None, original_order=False, grads=None):
    batch, heads, n, _ = q.shape
    if dlse is None:
      dlse = torch.zeros(batch, heads, n, dtype=torch.float32,
                         device=q.device)
    out, dout = (x.to(q.dtype).contiguous() for x in (out, dout))
    dlse, stats = dlse.float().contiguous(), stats.contiguous()
    accumulate = grads is not None  # then delta is the earlier call's
    if grads is None:
      grads = tuple(torch.empty_like(q) for _ in range(3)) + (
          torch.empty(batch * heads * n, dtype=torch.float32,
                      device=q.device),)
    self._check(self.lib.backward(
        self._problem(q, tables, scale, key_lengths, original_order,
                      accumulate),
        *(x.data_ptr() for x in (q, k, v, out, stats, dout, dlse, grads[3],
                                 *grads[:3])), self._stream()))
    return grads


def dry_run_c_abi() -> str:
  """Loads the C ABI library (its self check runs) and calls its forward
  with host tensors: without a driver it must refuse them before touching
  them. Returns its message."""
  layout = layouts.fixed(128, 32, 64, 16, 2)
  tables = launch.component_tables(layout.components[0], layout.num_blocks,
                                   "cpu")
  q = torch.randn(1, 2, 128, 64, dtype=torch.float16)
  try:
    CAbi(C_ABI).forward(q, q, q, tables, 0.125)
  except RuntimeError as e:
    return str(e)
  return "ran without a GPU"


def make_backend(out_dir: str, log: dict):
  """The C ABI on a GPU (the installed library, else one built here); the
  Python launch of the kernels under the interpreter in a dry run."""
  if DRY_RUN:
    log["backend"] = "triton interpreter (dry run)"
    log["c_abi_dry_run"] = dry_run_c_abi()
    return launch
  try:
    backend = CAbi(C_ABI)
    log["backend"] = f"C ABI {C_ABI}"
  except (OSError, RuntimeError) as e:
    log["c_abi_load_error"] = f"{type(e).__name__}: {e}"
    backend = CAbi(build_c_abi(out_dir))
    log["backend"] = f"C ABI built here: {backend.path}"
  return backend


# ----------------------------------------------------------------------------
# Correctness.


def layout_cases(n: int, block: int, heads: int, rng) -> dict:
  """The layouts checked: fixed, strided, local, causal and a random one."""
  stride = 128 if n >= 512 else 64
  summary = 32 if stride == 128 else 16
  random = rng.random((heads, n, n)) < 0.1
  return {
      "fixed": layouts.fixed(n, block, stride, summary, heads),
      "strided": layouts.strided(n, block, stride, heads),
      "local": layouts.local(n, block, stride + block // 2, heads),
      "causal": layouts.causal(n, block, heads),
      "random": layouts.from_mask(random, block),
  }


def reference(q, k, v, mask, scale, key_lengths=None):
  """Dense masked attention in q's dtype (rows with no key give 0)."""
  scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
  allowed = mask[None]  # (1, H, n, n)
  if key_lengths is not None:
    positions = torch.arange(q.shape[2], device=q.device)
    allowed = allowed & (positions[None, None, None, :] <
                         key_lengths[:, None, None, None].long())
  scores = scores.masked_fill(~allowed, -math.inf)
  # Softmax in float32 for half inputs (as every kernel does), float64 in
  # the float64 reference.
  wide = torch.promote_types(scores.dtype, torch.float32)
  probs = torch.softmax(scores.to(wide), dim=-1).nan_to_num(0.0).to(q.dtype)
  return torch.einsum("bhqk,bhkd->bhqd", probs, v)


def check_case(name, layout, dtype, backend, device, rng, key_lengths=False):
  """Forward and gradients of one layout against float64, with the 2x rule:
  the error must be within twice that of a dense reference in `dtype`
  (plus a floor of a few units in the last place)."""
  batch, heads, n, head_dim = 2, layout.num_heads, layout.seq_len, 64
  gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
  inputs = [torch.randn(batch, heads, n, head_dim, generator=gen)
            for _ in range(4)]  # q, k, v, dout
  lengths = None
  if key_lengths:
    lengths = torch.tensor([n - int(rng.integers(1, n // 2)), n // 3],
                           dtype=torch.int32, device=device)
  mask = torch.from_numpy(layout.to_dense()).to(device)
  scale = 1.0 / math.sqrt(head_dim)
  results = {}
  for kind, run_dtype in (("ours", dtype), ("dense", dtype),
                          ("float64", torch.float64)):
    q, k, v, dout = (x.to(device, run_dtype).requires_grad_(i < 3)
                     for i, x in enumerate(inputs))
    if kind == "ours":
      out = launch.attention(q, k, v, layout, scale, lengths, backend=backend)
    else:
      out = reference(q, k, v, mask, scale, lengths)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    results[kind] = [x.detach().double() for x in (out, dq, dk, dv)]
  record = {"case": name, "dtype": str(dtype).split(".")[-1],
            "key_lengths": key_lengths, "n": n, "block": layout.block_size}
  ok = True
  eps = torch.finfo(torch.float32).eps  # the floor: a few float32 ulps
  for i, part in enumerate(("out", "dq", "dk", "dv")):
    want = results["float64"][i]
    ours = (results["ours"][i] - want).abs().max().item()
    dense = (results["dense"][i] - want).abs().max().item()
    bound = 2 * dense + 4 * eps * want.abs().max().item()
    finite = bool(torch.isfinite(results["ours"][i]).all())
    record[part] = {"error": ours, "dense_error": dense, "bound": bound}
    ok = ok and finite and ours <= bound
  record["ok"] = ok
  return record


def correctness(backend, device, dry_run: bool, rng) -> list:
  """Every correctness check; a failing or crashing case is a failed
  record, and the others still run."""
  if dry_run:  # the code paths only: the interpreter is slow
    sizes, dtypes = [(128, 32)], (torch.float16,)
  else:
    sizes, dtypes = [(1024, 64), (512, 32), (1024, 128)], (torch.bfloat16,
                                                           torch.float16)
  records = []
  for n, block in sizes:
    cases = layout_cases(n, block, 2, rng)
    if dry_run or (n, block) != sizes[0]:  # two layouts each
      cases = {k: cases[k] for k in ("fixed", "strided")}
    for name, layout in cases.items():
      for dtype in dtypes:
        for lengths in (False, True):
          if lengths and name in ("local", "random"):
            continue
          try:
            records.append(check_case(name, layout, dtype, backend, device,
                                      rng, lengths))
          except Exception as e:  # pylint: disable=broad-except
            records.append({"case": name, "dtype": str(dtype), "n": n,
                            "block": block, "ok": False,
                            "error": f"{type(e).__name__}: {e}",
                            "trace": traceback.format_exc()[-2000:]})
          if device == "cuda":
            torch.cuda.synchronize()
  return records


# ----------------------------------------------------------------------------
# Speed.


def attended_pairs(layout) -> int:
  """(query, key) pairs a layout attends, all heads, from its tables."""
  total = 0
  bs = layout.block_size
  for comp in layout.components:
    # Pairs of each mask, then bs * bs for a full tile (mask id -1).
    sums = np.append(comp.masks.reshape(-1, bs * bs).sum(axis=1), bs * bs)
    total += int(sums[comp.mask_idx].sum())
  return total


def mask_mod(pattern: str, stride: int, summary: int):
  """The FlexAttention mask of a pattern (the paper's token-level rule)."""
  if pattern == "fixed":
    def fixed(b, h, q, kv):  # pylint: disable=unused-argument
      same = q // stride == kv // stride
      summ = kv % stride >= stride - summary
      return (kv <= q) & (same | summ)
    return fixed
  def strided(b, h, q, kv):  # pylint: disable=unused-argument
    return (kv <= q) & (((q - kv) < stride) | ((q - kv) % stride == 0))
  return strided


def bench(fn, device) -> float:
  """Median milliseconds of fn() (device events on a GPU)."""
  if device == "cuda":
    import triton  # pylint: disable=import-outside-toplevel
    return float(triton.testing.do_bench(fn, warmup=25, rep=100,
                                         return_mode="median"))
  start = time.perf_counter()  # once: the dry run checks the code path
  fn()
  return 1e3 * (time.perf_counter() - start)


def matmul_rate(device, dtype) -> float:
  """Measured dense matmul rate in TFLOP/s (8192^3 on a GPU)."""
  size = 8192 if device == "cuda" else 256
  a, b = (torch.randn(size, size, device=device, dtype=dtype)
          for _ in range(2))
  ms = bench(lambda: a @ b, device)
  return 2 * size ** 3 / (ms * 1e-3) / 1e12


def time_config(pattern, n, head_dim, block, batch, heads, dtype, backend,
                device, flex) -> dict:
  """Forward and forward+backward of ours, FlexAttention and causal SDPA."""
  stride, summary = 128, 32
  layout = (layouts.fixed(n, block, stride, summary, heads)
            if pattern == "fixed" else
            layouts.strided(n, block, stride, heads))
  q, k, v, dout = (torch.randn(batch, heads, n, head_dim, device=device,
                               dtype=dtype) for _ in range(4))
  for x in (q, k, v):
    x.requires_grad_(True)
  pairs = batch * attended_pairs(layout)
  record = {"pattern": pattern, "n": n, "head_dim": head_dim, "block": block,
            "batch": batch, "heads": heads, "pairs": pairs}

  def run(name, attend):
    def fwd():
      with torch.no_grad():
        attend(q.detach(), k.detach(), v.detach())

    def fwd_bwd():
      torch.autograd.grad(attend(q, k, v), (q, k, v), dout)
    record[name] = {}
    for part, fn in (("fwd_ms", fwd), ("fwd_bwd_ms", fwd_bwd)):
      try:
        record[name][part] = bench(fn, device)
      except Exception as e:  # pylint: disable=broad-except
        record[name][part + "_error"] = f"{type(e).__name__}: {e}"[:300]

  run("ours", lambda q, k, v: launch.attention(q, k, v, layout,
                                                backend=backend))
  if flex is not None:
    flex_attention, create_block_mask = flex
    block_mask = create_block_mask(mask_mod(pattern, stride, summary), None,
                                   None, n, n, device=device)
    run("flex", lambda q, k, v: flex_attention(q, k, v,
                                               block_mask=block_mask))
  run("sdpa_causal", lambda q, k, v: torch.nn.functional.
      scaled_dot_product_attention(q, k, v, is_causal=True))
  return record


def speed(backend, device, dry_run: bool, deadline: float, log,
          head_dims=(64, 128)) -> list:
  """The timing grid, cut off at `deadline` (time.monotonic())."""
  dtype = torch.float32 if dry_run else torch.bfloat16
  flex = None
  try:
    from torch.nn.attention.flex_attention import create_block_mask  # pylint: disable=import-outside-toplevel
    from torch.nn.attention.flex_attention import flex_attention  # pylint: disable=import-outside-toplevel
    # One compiled flex per shape and grad mode: 24 here, over dynamo's
    # default of 8 recompilations (after which it runs flex unfused).
    for limit in ("recompile_limit", "cache_size_limit"):
      if hasattr(torch._dynamo.config, limit):  # pylint: disable=protected-access
        setattr(torch._dynamo.config, limit, 64)  # pylint: disable=protected-access
    compiled = flex_attention if dry_run else torch.compile(flex_attention,
                                                            dynamic=False)
    flex = (compiled, create_block_mask)
  except ImportError as e:
    log["flex_error"] = str(e)
  if dry_run:
    grid = [("strided", 128, 64, 32)]
    batch, heads = 1, 2
  else:
    # The figures first (n = 16384, then 65536), in case time runs
    # out.
    grid = [(p, n, d, 64) for d in head_dims for n in (16384, 65536, 4096)
            for p in ("fixed", "strided")]
    batch, heads = 2, 16
  records = []
  for pattern, n, head_dim, block in grid:
    if time.monotonic() > deadline:
      records.append({"pattern": pattern, "n": n, "head_dim": head_dim,
                      "skipped": "out of time"})
      continue
    records.append(time_config(pattern, n, head_dim, block, batch, heads,
                               dtype, backend, device, flex))
    if device == "cuda":
      torch.cuda.empty_cache()
  return records


def summarize(result: dict) -> str:
  """The table printed last."""
  lines = [f"device: {result['device']}  backend: {result['backend']}",
           f"correctness: {sum(r['ok'] for r in result['checks'])} of "
           f"{len(result['checks'])} passed"]
  for r in result["checks"]:
    if not r["ok"]:
      lines.append(f"  FAILED {r}"[:600])
  rate = result["matmul_tflops"]
  lines.append(f"dense matmul: {rate:.1f} TFLOP/s")
  lines.append("pattern   n      d   impl         fwd ms  fwd+bwd ms  "
               "fwd TFLOP/s  fwd x  fwd+bwd x")
  for r in result["timings"]:
    if "skipped" in r:
      lines.append(f"{r['pattern']:8s} {r['n']:6d} {r['head_dim']:3d}  "
                   f"skipped ({r['skipped']})")
      continue
    ours = r.get("ours", {})
    nan = float("nan")
    for impl in ("ours", "flex", "sdpa_causal"):
      t = r.get(impl)
      if t is None:
        continue
      fwd, both = t.get("fwd_ms", nan), t.get("fwd_bwd_ms", nan)
      tflops = 4 * r["pairs"] * r["head_dim"] / (fwd * 1e-3) / 1e12
      lines.append(f"{r['pattern']:8s} {r['n']:6d} {r['head_dim']:3d}  "
                   f"{impl:11s} {fwd:8.3f} {both:10.3f} {tflops:11.1f} "
                   f"{fwd / ours.get('fwd_ms', nan):6.2f} "
                   f"{both / ours.get('fwd_bwd_ms', nan):9.2f}")
      for key, error in t.items():
        if key.endswith("_error"):
          lines.append(f"    {impl} {key}: {error[:100]}")
  lines.append("(x: that implementation's time over ours; fwd TFLOP/s on "
               "our layout's attended pairs)")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"),
                      help="folder for gpu_check.json")
  parser.add_argument("--minutes", type=float, default=7.0,
                      help="stop starting timings after this long")
  parser.add_argument("--head-dims", default="64,128",
                      help="head_dim values timed, comma-separated")
  args = parser.parse_args(argv)
  start = time.monotonic()
  deadline = start + 60 * args.minutes
  os.makedirs(args.out, exist_ok=True)
  device = "cpu" if DRY_RUN else "cuda"
  if not DRY_RUN and not torch.cuda.is_available():
    print("no CUDA device: run on a GPU machine, or set GPU_CHECK_DRY_RUN=1",
          file=sys.stderr)
    return 2
  rng = np.random.default_rng(30)
  result = {"dry_run": DRY_RUN, "torch": torch.__version__,
            "python": platform.python_version(),
            "device": (torch.cuda.get_device_name() if device == "cuda"
                       else platform.processor() or "cpu")}
  import triton  # pylint: disable=import-outside-toplevel
  result["triton"] = triton.__version__
  with tempfile.TemporaryDirectory() as build_dir:
    backend = make_backend(build_dir, result)
    result["checks"] = correctness(backend, device, DRY_RUN, rng)
    result["matmul_tflops"] = matmul_rate(
        device, torch.float32 if DRY_RUN else torch.bfloat16)
    result["timings"] = speed(
        backend, device, DRY_RUN, deadline, result,
        tuple(int(d) for d in args.head_dims.split(",")))
  if DRY_RUN:  # the C ABI library loaded and refused host memory cleanly
    message = result["c_abi_dry_run"]
    result["checks"].append({"case": "c_abi without a driver",
                             "ok": message.startswith("no CUDA driver"),
                             "message": message})
  result["seconds"] = time.monotonic() - start
  path = os.path.join(args.out, "gpu_check.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(summarize(result))
  print(f"wrote {path} in {result['seconds']:.0f} s")
  return 0 if all(r["ok"] for r in result["checks"]) else 1


if __name__ == "__main__":
  sys.exit(main())
