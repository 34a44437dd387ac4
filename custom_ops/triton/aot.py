"""Compiles the Triton kernels ahead of time into one C++ source file.

The Bazel build runs this (with `--config=cuda`) to make
`compiled_kernels.cc`: for every kernel of `kernels.py`, dtype, block size,
head_dim and GPU architecture, the cubin, its entry point, launch settings,
shared memory and PTX parameter types, as `compiled_kernels.h` declares. No
GPU is needed: Triton's compiler and its bundled ptxas run on the CPU.

    python custom_ops/triton/aot.py --kernels custom_ops/triton/kernels.py \
        --out compiled_kernels.cc [--jobs 2] [--spec KERNEL:DTYPE:BLOCK:DIM:ARCH]

Run it in a process without TensorFlow: Triton's compiler and TensorFlow
each carry an LLVM, and the two abort in one process.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import os
import re
import sys
import tempfile
from typing import Dict, List, Tuple

# The architectures built; the dtypes, block sizes and head dims are
# kernels.py's GPU_* sets, where its LAUNCH table has an entry.
ARCHS = (80, 90)  # sm_80 (A100; also runs on 8.x) and sm_90a (H100, H200)
DTYPES = {"float32": ("fp32", 0), "float16": ("fp16", 1),
          "bfloat16": ("bf16", 2)}  # name -> (Triton type, launcher DType)
TILE_KERNELS = ("bsa_forward", "bsa_backward_dkdv", "bsa_backward_dq")
DELTA_KERNEL = "bsa_backward_delta"

# Parameter types by name; the tensors of the input dtype take "T".
PARAM_TYPES = {
    "Lse": "*fp32", "Stats": "*fp32", "Delta": "*fp32", "DLse": "*fp32",
    "RowPtr": "*i32", "ColIdx": "*i32", "MaskIdx": "*i32", "ColPtr": "*i32",
    "RowIdx": "*i32", "ColMaskIdx": "*i32", "KeyLengths": "*i32",
    "KeyPositions": "*i32", "Masks": "*u8", "scale": "fp32", "n": "i32",
    "num_heads": "i32", "table_heads": "i32", "has_key_lengths": "i32",
    "has_key_positions": "i32",
    "original_order": "i32", "accumulate": "i32", "rows": "i32",
}
TENSORS = ("Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV")
# Arguments the launcher guarantees to be multiples of 16 (pointers: 16-byte
# aligned): Triton vectorises loads with them.
DIVISIBLE = ("n", "rows")


@dataclasses.dataclass(frozen=True)
class Spec:
  """One specialisation to compile."""
  kernel: str
  dtype: str
  block: int     # BLOCK, or ROWS for the delta kernel
  head_dim: int
  arch: int


def load_kernels(path: str):
  """Imports kernels.py from its path (it is not part of a package)."""
  spec = importlib.util.spec_from_file_location("st_keras_triton_kernels",
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def specs(kernels) -> List[Spec]:
  """Every specialisation the build compiles."""
  out = []
  for arch in ARCHS:
    for dtype, (short, _) in DTYPES.items():
      for head_dim in kernels.GPU_HEAD_DIMS:
        if (head_dim, short) in kernels.LAUNCH[DELTA_KERNEL]:
          out.append(Spec(DELTA_KERNEL, dtype, kernels.DELTA_ROWS, head_dim,
                          arch))
        for kernel in TILE_KERNELS:
          for block in kernels.GPU_BLOCK_SIZES:
            if (block, head_dim, short) in kernels.LAUNCH[kernel]:
              out.append(Spec(kernel, dtype, block, head_dim, arch))
  return out


def launch_options(kernels, spec: Spec) -> dict:
  """The kernel's launch options for `spec` (kernels.LAUNCH)."""
  short = DTYPES[spec.dtype][0]
  key = ((spec.head_dim, short) if spec.kernel == DELTA_KERNEL else
         (spec.block, spec.head_dim, short))
  return dict(kernels.LAUNCH[spec.kernel][key])


def _signature(fn, spec: Spec) -> Tuple[Dict[str, str], Dict[str, int],
                                        dict]:
  """(signature, constexprs, attrs) of `fn` for ASTSource."""
  tensor = "*" + DTYPES[spec.dtype][0]
  constexprs = {"HEAD_DIM": spec.head_dim}
  constexprs["ROWS" if spec.kernel == DELTA_KERNEL else "BLOCK"] = spec.block
  signature, attrs = {}, {}
  for index, name in enumerate(fn.arg_names):
    if name in constexprs:
      signature[name] = "constexpr"
      continue
    kind = tensor if name in TENSORS else PARAM_TYPES.get(name)
    if kind is None:
      raise ValueError(f"{fn.__name__}: no type for parameter {name!r}")
    signature[name] = kind
    if kind.startswith("*") or name in DIVISIBLE:
      attrs[(index,)] = [["tt.divisibility", 16]]
  return signature, constexprs, attrs


def _ptx_params(ptx: str, entry: str) -> str:
  """The entry's parameter types from its PTX: 'u64,f32,u32,...'."""
  match = re.search(rf"\.entry\s+{re.escape(entry)}\s*\((.*?)\)", ptx, re.S)
  if match is None:
    raise ValueError(f"no .entry {entry} in the PTX")
  return ",".join(p.split()[1].lstrip(".")
                  for p in match.group(1).split(",") if p.strip())


def compile_one(kernels_path: str, spec: Spec) -> dict:
  """Compiles one specialisation; returns what compiled_kernels.cc holds."""
  import triton  # pylint: disable=import-outside-toplevel
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel
  from triton.compiler import ASTSource  # pylint: disable=import-outside-toplevel
  kernels = load_kernels(kernels_path)
  fn = getattr(kernels, spec.kernel)
  signature, constexprs, attrs = _signature(fn, spec)
  options = launch_options(kernels, spec)
  compiled = triton.compile(
      ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                attrs=attrs),
      target=GPUTarget("cuda", spec.arch, 32), options=options)
  meta = compiled.metadata
  if spec.kernel in TILE_KERNELS and not re.search(r"\bmul\.rn(\.ftz)?\.f32",
                                                   compiled.asm["ptx"]):
    raise RuntimeError(f"{spec}: no mul.rn.f32 in the PTX: the scores' "
                       f"rounding (kernels._scores) was lost")
  return {
      "spec": spec, "entry": meta.name, "cubin": compiled.asm["cubin"],
      "num_warps": meta.num_warps, "shared": meta.shared,
      "global_scratch": getattr(meta, "global_scratch_size", 0) or 0,
      "profile_scratch": getattr(meta, "profile_scratch_size", 0) or 0,
      "params": _ptx_params(compiled.asm["ptx"], meta.name),
  }


def _bytes_literal(data: bytes, width: int = 32) -> str:
  """`data` as adjacent C string literals of hex escapes."""
  lines = []
  for start in range(0, len(data), width):
    chunk = "".join(f"\\x{b:02x}" for b in data[start:start + width])
    lines.append(f'    "{chunk}"')
  return "\n".join(lines)


def render(results: List[dict]) -> str:
  """The source of compiled_kernels.cc."""
  out = ["// Generated by custom_ops/triton/aot.py: do not edit.",
         '#include "custom_ops/cc/kernels/compiled_kernels.h"', "",
         "namespace st_keras {", "namespace gpu {", "namespace {", ""]
  for i, r in enumerate(results):
    out.append(f"const char kCubin{i}[] =\n{_bytes_literal(r['cubin'])};")
  out += ["", "}  // namespace", "",
          "const CompiledKernel kCompiledKernels[] = {"]
  for i, r in enumerate(results):
    s = r["spec"]
    out.append(
        f'    {{"{s.kernel}", {DTYPES[s.dtype][1]}, {s.block}, {s.head_dim}, '
        f'{s.arch}, "{r["entry"]}", kCubin{i}, {len(r["cubin"])}, '
        f'{r["num_warps"]}, {r["shared"]}, {r["global_scratch"]}, '
        f'{r["profile_scratch"]}, "{r["params"]}"}},')
  out += ["};", "", f"const int kNumCompiledKernels = {len(results)};", "",
          "}  // namespace gpu", "}  // namespace st_keras", ""]
  return "\n".join(out)


def _parse_spec(parser: argparse.ArgumentParser, text: str) -> Spec:
  """A --spec value as a Spec (parser.error when malformed)."""
  parts = text.split(":")
  if (len(parts) != 5 or parts[1] not in DTYPES or
      not all(p.isdigit() for p in parts[2:])):
    parser.error(f"--spec {text!r} must look like "
                 "bsa_forward:float16:64:64:90")
  return Spec(parts[0], parts[1], *(int(p) for p in parts[2:]))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kernels", required=True, help="kernels.py")
  parser.add_argument("--out", required=True, help="the .cc to write")
  parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--spec", action="append", default=[],
                      metavar="KERNEL:DTYPE:BLOCK:HEAD_DIM:ARCH",
                      help="compile only these specialisations (repeatable)")
  args = parser.parse_args(argv)
  kernels_path = os.path.abspath(args.kernels)
  todo = specs(load_kernels(kernels_path))
  if args.spec:
    todo = [_parse_spec(parser, text) for text in args.spec]
  # Triton caches what it compiles; a private cache keeps builds apart.
  with tempfile.TemporaryDirectory() as cache:
    os.environ["TRITON_CACHE_DIR"] = cache
    # LAUNCH asks for fusion itself; this only silences Triton 3.9's warning
    # that its default will change.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
      results = list(pool.map(compile_one, [kernels_path] * len(todo), todo))
  with open(args.out, "w") as f:
    f.write(render(results))
  print(f"[aot] {len(results)} kernels compiled to {args.out}",
        file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
