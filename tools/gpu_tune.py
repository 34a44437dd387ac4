"""Launch-setting sweep of the Triton kernels on a GPU: each tile kernel
alone, per (num_warps, num_stages) and block size, on the fixed and strided
patterns, with the compiler's register and spill counts; then the
whole-layout forward (components merged in the kernels) per forward setting,
at n and 4n. Its tables are what custom_ops/triton/kernels.py's LAUNCH
settings are chosen from.

    python3 tools/gpu_tune.py --out DIR         # a GPU machine, no TensorFlow
    GPU_CHECK_DRY_RUN=1 python3 tools/gpu_tune.py --out DIR   # CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check  # pylint: disable=wrong-import-position  (sets up the interpreter in a dry run)
import torch  # pylint: disable=wrong-import-position
import triton  # pylint: disable=wrong-import-position

from custom_ops.triton import kernels  # pylint: disable=wrong-import-position
from custom_ops.triton import launch  # pylint: disable=wrong-import-position

VARIANTS = {  # (num_warps, num_stages) tried per tile kernel
    "bsa_forward": [(4, 2), (4, 3), (4, 4), (8, 2), (8, 3)],
    "bsa_backward_dkdv": [(4, 1), (4, 2), (4, 3), (8, 1), (8, 2), (8, 3)],
    "bsa_backward_dq": [(4, 1), (4, 2), (4, 3), (8, 1), (8, 2), (8, 3)],
}


def component_inputs(layout, comp_index, batch, head_dim, dtype, device):
  """Tensors and tables to launch every kernel on one component."""
  heads, n = layout.num_heads, layout.seq_len
  tables = launch.component_tables(layout.components[comp_index],
                                   layout.num_blocks, device)
  q, k, v, dout = (torch.randn(batch, heads, n, head_dim, device=device,
                               dtype=dtype) for _ in range(4))
  out, _, stats = launch.forward(q, k, v, tables, head_dim ** -0.5)
  delta = torch.randn(batch * heads * n, device=device)
  outputs = [torch.empty_like(q) for _ in range(3)]
  lse = torch.empty(batch, heads, n, device=device)
  return dict(q=q, k=k, v=v, dout=dout, out=out, stats=stats, delta=delta,
              lse=lse, outputs=outputs, tables=tables,
              lengths=torch.zeros(0, dtype=torch.int32, device=device))


def launcher(name, x, block, head_dim, warps, stages):
  """A function launching kernel `name` once on the inputs x."""
  t = x["tables"]
  n, heads = x["q"].shape[2], x["q"].shape[1]
  grid = (n // block, x["q"].shape[0] * heads)
  table_heads = (t["row_ptr"].numel() - 1) // (n // block)
  # No key lengths; kernel order, no accumulation (one component alone).
  flags = (head_dim ** -0.5, n, heads, table_heads, 0,
           int(t["key_positions"].numel() > 0), 0, 0)
  common = dict(BLOCK=block, HEAD_DIM=head_dim, num_warps=warps,
                num_stages=stages)
  if name == "bsa_forward":
    args = (x["q"], x["k"], x["v"], x["outputs"][0], x["lse"], x["stats"],
            t["row_ptr"], t["col_idx"], t["mask_idx"], t["masks"],
            x["lengths"], t["key_positions"])
  elif name == "bsa_backward_dkdv":
    args = (x["q"], x["k"], x["v"], x["dout"], x["stats"], x["delta"],
            x["outputs"][1], x["outputs"][2], t["col_ptr"], t["row_idx"],
            t["col_mask_idx"], t["masks"], x["lengths"], t["key_positions"])
  else:
    args = (x["q"], x["k"], x["v"], x["dout"], x["stats"], x["delta"],
            x["outputs"][0], t["row_ptr"], t["col_idx"], t["mask_idx"],
            t["masks"], x["lengths"], t["key_positions"])
  kernel = getattr(kernels, name)
  options = dict(kernels.LAUNCH[name][(block, head_dim,
                                       launch.DTYPES[x["q"].dtype])])
  options.pop("num_warps"), options.pop("num_stages")
  return lambda: kernel[grid](*args, *flags, **common, **options)


def layout_forward_rows(layouts, n_values, block, batch, heads, head_dim,
                        dtype, device, variants, deadline) -> list:
  """The whole-layout forward (launch.attention: components merged in the
  kernels, original order) per bsa_forward (num_warps, num_stages): its
  per-tile loads go through the permutation, which may want more stages
  than the kernel-order sweep above shows."""
  key = (block, head_dim, launch.DTYPES[dtype])
  saved = dict(kernels.LAUNCH["bsa_forward"][key])
  rows = []
  try:
    for warps, stages in variants:
      row = {"kernel": "layout_forward", "block": block, "num_warps": warps,
             "num_stages": stages}
      kernels.LAUNCH["bsa_forward"][key] = dict(saved, num_warps=warps,
                                                num_stages=stages)
      for n in n_values:
        if time.monotonic() > deadline:
          break
        q, k, v = (torch.randn(batch, heads, n, head_dim, device=device,
                               dtype=dtype) for _ in range(3))
        for pattern, lay in (
            ("fixed", layouts.fixed(n, block, 128, 32, heads)),
            ("strided", layouts.strided(n, block, 128, heads))):
          fn = lambda lay=lay, q=q, k=k, v=v: launch.attention(q, k, v, lay)  # pylint: disable=unnecessary-lambda-assignment
          with torch.no_grad():
            fn()
            row[f"{pattern}_n{n}_ms"] = gpu_check.bench(fn, device)
      rows.append(row)
      print(json.dumps(row), flush=True)
  finally:
    kernels.LAUNCH["bsa_forward"][key] = saved
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "gpu_tune_out"))
  parser.add_argument("--minutes", type=float, default=4.0,
                      help="stop starting kernel rows after this long (the "
                           "layout rows get 1.5 minutes more)")
  parser.add_argument("--blocks", default="64,128,32",
                      help="block sizes swept, comma-separated")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  dry = gpu_check.DRY_RUN
  device = "cpu" if dry else "cuda"
  start = time.monotonic()
  if dry:
    n, batch, heads, head_dim, dtype = 128, 1, 2, 32, torch.float32
    blocks, variants = (32,), {k: v[:1] for k, v in VARIANTS.items()}
  else:
    n, batch, heads, head_dim, dtype = 16384, 2, 16, 64, torch.bfloat16
    blocks = tuple(int(b) for b in args.blocks.split(","))
    variants = VARIANTS
  layouts = gpu_check.layouts
  rows = []
  for block in blocks:
    patterns = {"fixed": layouts.fixed(n, block, 128 if not dry else 64,
                                       32 if not dry else 16, heads),
                "strided": layouts.strided(n, block, 128 if not dry else 64,
                                           heads)}
    inputs = {(p, i): component_inputs(lay, i, batch, head_dim, dtype, device)
              for p, lay in patterns.items()
              for i in range(len(lay.components))}
    for name, tried in variants.items():
      for warps, stages in tried:
        if time.monotonic() - start > 60 * args.minutes:
          break
        row = {"kernel": name, "block": block, "num_warps": warps,
               "num_stages": stages}
        try:
          for (pattern, index), x in inputs.items():
            fn = launcher(name, x, block, head_dim, warps, stages)
            compiled = fn()
            row[f"{pattern}{index}_ms"] = gpu_check.bench(fn, device)
            row["regs"] = getattr(compiled, "n_regs", None)
            row["spills"] = getattr(compiled, "n_spills", None)
        except Exception as e:  # pylint: disable=broad-except
          row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
  layout_n = (128,) if dry else (n, 4 * n)
  layout_rows = layout_forward_rows(
      layouts, layout_n, blocks[0], batch, heads, head_dim, dtype, device,
      variants["bsa_forward"], start + 60 * (args.minutes + 1.5))
  with open(os.path.join(args.out, "gpu_tune.json"), "w") as f:
    json.dump({"n": n, "batch": batch, "heads": heads, "head_dim": head_dim,
               "dtype": str(dtype), "device": torch.cuda.get_device_name()
               if not dry else "cpu", "triton": triton.__version__,
               "rows": rows, "layout_rows": layout_rows}, f, indent=1)
  print("kernel              block warps stages   fixed ms  strided ms  "
        "regs spills")
  for r in rows:
    fixed = sum(v for k, v in r.items() if k.startswith("fixed"))
    strided = sum(v for k, v in r.items() if k.startswith("strided"))
    print(f"{r['kernel']:20s} {r['block']:4d} {r['num_warps']:5d} "
          f"{r['num_stages']:6d} {fixed:10.3f} {strided:11.3f} "
          f"{r.get('regs')} {r.get('spills')} {r.get('error', '')[:60]}")
  for r in layout_rows:
    print(f"{r['kernel']:20s} {r['block']:4d} {r['num_warps']:5d} "
          f"{r['num_stages']:6d} " + " ".join(
              f"{k[:-3]} {v:.3f}" for k, v in r.items() if k.endswith("_ms")))
  return 0


if __name__ == "__main__":
  sys.exit(main())
