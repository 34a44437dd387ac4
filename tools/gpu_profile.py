"""Where the time of our attention goes on a GPU: torch.profiler over the
forward and the forward+backward of one configuration, the kernels and the
PyTorch glue around them (permutations, merge of components), as a table of
device time per operation.

    python3 tools/gpu_profile.py --out DIR [--pattern fixed] [--n 16384]
        [--head-dim 64]                      # a GPU machine, no TensorFlow
    GPU_CHECK_DRY_RUN=1 python3 tools/gpu_profile.py --out DIR   # CPU, tiny

Writes DIR/gpu_profile.txt and prints the tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check  # pylint: disable=wrong-import-position  (sets up the interpreter in a dry run)
import torch  # pylint: disable=wrong-import-position
from torch import profiler  # pylint: disable=wrong-import-position

from custom_ops.triton import launch  # pylint: disable=wrong-import-position


def profile(fn, device: str, steps: int) -> str:
  """The profiler's table of `steps` calls of fn (after one warm-up)."""
  fn()
  activities = [profiler.ProfilerActivity.CPU]
  if device == "cuda":
    activities.append(profiler.ProfilerActivity.CUDA)
    torch.cuda.synchronize()
  with profiler.profile(activities=activities) as prof:
    for _ in range(steps):
      fn()
    if device == "cuda":
      torch.cuda.synchronize()
  sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
  return prof.key_averages().table(sort_by=sort, row_limit=18,
                                   max_name_column_width=48)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "gpu_profile_out"))
  parser.add_argument("--pattern", choices=("fixed", "strided"),
                      default="fixed")
  parser.add_argument("--n", type=int, default=16384)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  dry = gpu_check.DRY_RUN
  device = "cpu" if dry else "cuda"
  n, batch, heads, block = (128, 1, 2, 32) if dry else (args.n, 2, 16, 64)
  head_dim = 32 if dry else args.head_dim
  dtype = torch.float32 if dry else torch.bfloat16
  stride, summary = (64, 16) if dry else (128, 32)
  layouts = gpu_check.layouts
  layout = (layouts.fixed(n, block, stride, summary, heads)
            if args.pattern == "fixed" else
            layouts.strided(n, block, stride, heads))
  q, k, v, dout = (torch.randn(batch, heads, n, head_dim, device=device,
                               dtype=dtype) for _ in range(4))
  for x in (q, k, v):
    x.requires_grad_(True)
  log = {}
  with tempfile.TemporaryDirectory() as build_dir:
    backend = gpu_check.make_backend(build_dir, log)
    attend = lambda: launch.attention(q, k, v, layout, backend=backend)  # pylint: disable=unnecessary-lambda-assignment

    def fwd():
      with torch.no_grad():
        attend()

    def fwd_bwd():
      torch.autograd.grad(attend(), (q, k, v), dout)

    title = (f"{args.pattern} n={n} head_dim={head_dim} batch={batch} "
             f"heads={heads} block={block} {dtype} on "
             f"{torch.cuda.get_device_name() if not dry else 'cpu'}, "
             f"{log['backend']}, {args.steps} calls")
    text = "\n\n".join(
        f"== {name}: {title}\n{profile(fn, device, 1 if dry else args.steps)}"
        for name, fn in (("forward", fwd), ("forward+backward", fwd_bwd)))
  with open(os.path.join(args.out, "gpu_profile.txt"), "w") as f:
    f.write(text + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
