"""The GPU build, checked without a GPU: the ahead-of-time compiled Triton
kernels, the launcher's argument lists, the C ABI library, and the op library
with GPU kernels loading in tensorflow-cpu.

tools/build_ops.sh builds the GPU kernels when its python can import triton
(requirements.txt installs it), so here they are expected exactly then."""

import importlib.util
import json
import os
import re
import struct
import subprocess
import sys

import pytest
import tensorflow as tf
from tensorflow.python.framework import kernels as tf_kernels

from custom_ops.triton import c_abi
from st_keras import ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C_ABI = os.path.join(REPO, "st_keras", "lib", "libst_bsa_gpu.so")
KERNELS = os.path.join(REPO, "custom_ops", "triton", "kernels.py")
AOT = os.path.join(REPO, "custom_ops", "triton", "aot.py")
GPU_BUILT = importlib.util.find_spec("triton") is not None


def test_gpu_kernels_are_built_when_triton_is_installed():
  assert GPU_BUILT, ("triton is in requirements.txt; without it the GPU "
                     "kernels are not built")
  assert os.path.isfile(C_ABI), f"{C_ABI} missing: rerun tools/build_ops.sh"


@pytest.mark.parametrize("op", [ops.OP_NAME, ops.GRAD_OP_NAME])
def test_op_library_registers_cpu_and_gpu_kernels(op):
  assert ops.custom_op_available(), ops.load_error()
  registered = tf_kernels.get_registered_kernels_for_op(op).kernel
  found = {(k.device_type, tf.dtypes.as_dtype(
      k.constraint[0].allowed_values.list.type[0]).name) for k in registered}
  devices = ("CPU", "GPU") if GPU_BUILT else ("CPU",)
  assert found == {(d, t) for d in devices
                   for t in ("float32", "float16", "bfloat16")}
  for kernel in registered:
    if kernel.device_type == "GPU":  # the tables are read on the host
      assert set(kernel.host_memory_arg) >= {"row_ptr", "col_idx", "masks",
                                             "col_ptr", "row_idx"}


def test_c_abi_checks_its_kernels_and_reports_errors_without_a_gpu():
  lib = c_abi.Library(C_ABI)
  # Every compiled kernel takes the arguments the launcher passes and fits
  # its architecture's shared memory.
  assert lib.self_check() == ""
  forward = lambda problem: lib.forward(problem, *[None] * 6)  # pylint: disable=unnecessary-lambda-assignment
  assert forward(None) == "problem is null"
  problem = c_abi.Problem(batch=2, heads=4, seq_len=256, head_dim=64,
                          block_size=64, dtype=c_abi.DTYPES["float16"],
                          scale=0.125, table_heads=3)
  assert "table_heads must divide heads = 4, got 3" in forward(problem)
  problem.table_heads = 2  # heads 0 and 2 share tables, as 1 and 3 do
  assert forward(problem).startswith("no CUDA driver"), forward(problem)
  assert lib.backward(problem, *[None] * 11).startswith(
      "the backward pass needs the column-major table")
  problem.head_dim = 48
  message = forward(problem)
  assert ("no GPU kernel for float16, block size 64 and head_dim 48" in
          message and "float16 block 64 head_dim 64 (sm_80, sm_90)" in
          message), message
  problem.head_dim, problem.block_size = 64, 24
  assert "block_size 24 must be 16, 32, 64 or 128" in forward(problem)
  problem.block_size, problem.scale = 64, float("inf")
  assert "scale must be positive and finite" in forward(problem)


def _cubin_sm(cubin: bytes) -> int:
  """The SM version a CUDA cubin (an ELF file) is built for, from its header's
  e_flags: the low byte in the first CUDA ELF ABI (OS ABI 0x33), the next
  byte in the second (0x41, which ptxas uses for sm_90a)."""
  assert cubin[:4] == b"\x7fELF" and cubin[7] in (0x33, 0x41)
  (flags,) = struct.unpack_from("<I", cubin, 48)  # e_flags of ELF64
  return (flags if cubin[7] == 0x33 else flags >> 8) & 0xFF


def test_aot_compiles_cubins_for_each_architecture(tmp_path):
  # In a subprocess: Triton's compiler aborts beside TensorFlow's LLVM.
  out = tmp_path / "compiled_kernels.cc"
  env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
  result = subprocess.run(
      [sys.executable, AOT, "--kernels", KERNELS, "--out", str(out),
       "--spec", "bsa_forward:float16:64:64:80",
       "--spec", "bsa_backward_dq:bfloat16:32:128:90"],
      capture_output=True, text=True, timeout=600, check=False, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  source = out.read_text()
  assert "kNumCompiledKernels = 2;" in source
  rows = re.findall(r'\{"(\w+)", (\d), (\d+), (\d+), (\d+), "\w+", kCubin(\d), '
                    r'(\d+), (\d+), (\d+), (\d+), (\d+), "([\w,]+)"\}', source)
  assert [r[:5] for r in rows] == [("bsa_forward", "1", "64", "64", "80"),
                                   ("bsa_backward_dq", "2", "32", "128", "90")]
  for name, _, _, _, arch, index, size, warps, shared, scratch, profile, \
      params in rows:
    body = re.search(rf"kCubin{index}\[\] =\n(.*?);", source, re.S).group(1)
    cubin = bytes.fromhex("".join(re.findall(r"\\x([0-9a-f]{2})", body)))
    assert len(cubin) == int(size) and _cubin_sm(cubin) == int(arch)
    assert int(warps) >= 1 and 0 < int(shared) <= 163 * 1024
    assert scratch == profile == "0"
    # Tensors and tables (pointers), scale, n, heads, table heads, four
    # flags, and the two scratch pointers Triton appends.
    pointers = 12 if name == "bsa_forward" else 13
    assert params == ",".join(["u64"] * pointers + ["f32"] + ["u32"] * 7 +
                              ["u64"] * 2)


def _dry_run(tool, out):
  return subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", tool), "--out", str(out)],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
      env=dict(os.environ, GPU_CHECK_DRY_RUN="1"))


def test_device_check_dry_runs_on_cpu(tmp_path):
  result = _dry_run("gpu_check.py", tmp_path)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  report = json.loads((tmp_path / "gpu_check.json").read_text())
  assert report["dry_run"] and len(report["checks"]) >= 5
  assert all(check["ok"] for check in report["checks"])
  # The C ABI library loaded, checked itself and refused host memory.
  assert report["c_abi_dry_run"].startswith("no CUDA driver")
  (timing,) = report["timings"]
  for impl in ("ours", "sdpa_causal"):
    assert timing[impl]["fwd_ms"] > 0 and timing[impl]["fwd_bwd_ms"] > 0
  assert timing["pairs"] > 0
  assert "correctness: 5 of 5 passed" in result.stdout


def test_launch_sweep_dry_runs_on_cpu(tmp_path):
  result = _dry_run("gpu_tune.py", tmp_path)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  rows = json.loads((tmp_path / "gpu_tune.json").read_text())["rows"]
  assert {r["kernel"] for r in rows} == {
      "bsa_forward", "bsa_backward_dkdv", "bsa_backward_dq"}
  for row in rows:
    assert "error" not in row, row
    assert row["fixed0_ms"] > 0 and row["strided1_ms"] > 0


def test_profile_dry_runs_on_cpu(tmp_path):
  result = _dry_run("gpu_profile.py", tmp_path)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  text = (tmp_path / "gpu_profile.txt").read_text()
  # Both passes profiled, with the kernels' autograd function in each.
  assert "== forward:" in text and "== forward+backward:" in text
  assert text.count("LayoutAttention") >= 2
  assert "LayoutAttentionBackward" in text


def test_gpu_report_renders_the_committed_runs(tmp_path):
  checks = [os.path.join(REPO, "docs", "gpu", f"gpu_check_d{d}.json")
            for d in (64, 128)]
  previous = [os.path.join(REPO, "docs", "gpu", "d190c3f",
                           f"gpu_check_d{d}.json") for d in (64, 128)]
  out = tmp_path / "BENCHMARKS.md"
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.gpu_attention", "--date", "then",
       "--check", *checks, "--tune",
       os.path.join(REPO, "docs", "gpu", "gpu_tune.json"), "--previous",
       *previous, "--out", str(out)],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  text = out.read_text()
  (strided,) = [t for t in json.loads(open(checks[0]).read())["timings"]
                if t["pattern"] == "strided" and t["n"] == 16384]
  ratio = strided["flex"]["fwd_bwd_ms"] / strided["ours"]["fwd_bwd_ms"]
  assert (f"| strided, n = 16384: forward+backward at least 2x "
          f"FlexAttention | {ratio:.2f}x | {'yes' if ratio >= 2 else 'no'} |"
          in text)
  assert text.count("| st_keras (Triton, C ABI) |") == 12
  # Then and now: our fixed forward at n = 16384, head_dim 64, in both runs.
  (then,) = [t for t in json.loads(open(previous[0]).read())["timings"]
             if t["pattern"] == "fixed" and t["n"] == 16384]
  (now,) = [t for t in json.loads(open(checks[0]).read())["timings"]
            if t["pattern"] == "fixed" and t["n"] == 16384]
  assert (f"| fixed | 16384 | 64 | {then['ours']['fwd_ms']:.3f} | "
          f"{now['ours']['fwd_ms']:.3f} | "
          f"{then['ours']['fwd_ms'] / now['ours']['fwd_ms']:.2f}x |" in text)
  assert (tmp_path / "docs" / "gpu_attention.png").stat().st_size > 10000
