"""The op library is portable: its CPU core is compiled for x86-64-v3 (AVX2,
FMA) and for x86-64-v4 (AVX-512), and runs the widest variant the CPU supports
or the one ST_KERAS_CPU_ISA forces (docs/INTERNALS.md, "Building and
packaging").

The variant is chosen once per process, so each run is a subprocess; it reads
the choice through the library's C function st_keras_cpu_isa (ctypes).
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from st_keras import layouts
from st_keras import ops
from tests import reference

REPO = pathlib.Path(__file__).resolve().parent.parent
ISA_VARIABLE = "ST_KERAS_CPU_ISA"
# The /proc/cpuinfo flags that x86-64-v4 adds to x86-64-v3: the AVX-512
# subsets the avx512 variant is compiled for (the dispatcher checks the level).
AVX512_FLAGS = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
SCALE = 0.25

# The layouts both variants run: the benchmark's fixed pattern shrunk (two key
# blocks per step at block 32), and a strided one at block 16 with a partial
# last stride and key lengths (masked tiles).
LAYOUTS = {
    "fixed_block_32": lambda: layouts.fixed(512, 32, stride=128, summary=32,
                                            num_heads=2),
    "strided_block_16": lambda: layouts.strided(224, 16, stride=48,
                                                num_heads=3),
}

# Runs in a subprocess: loads the op library, reports the variant it runs
# (or the op's error) as JSON and saves the outputs and gradients of each
# layout for the inputs in argv[1] to argv[2].
RUN = """
import ctypes, json, sys
import numpy as np
import tensorflow as tf
from st_keras import layouts, ops
from tests.test_op_portability import LAYOUTS, SCALE
ops.set_implementation("custom_op")
# TensorFlow loads the library first: its ops register as it loads.
assert ops.load_library() is not None, ops.load_error()
query = ctypes.CDLL(ops.library_path()).st_keras_cpu_isa
query.restype = ctypes.c_char_p
inputs = np.load(sys.argv[1])
results = {}
try:
  for name, make in sorted(LAYOUTS.items()):
    q, k, v, dout = (tf.constant(inputs[f"{name}_{x}"])
                     for x in ("q", "k", "v", "dout"))
    lengths = inputs[f"{name}_lengths"]
    with tf.GradientTape() as tape:
      tape.watch([q, k, v])
      out = ops.block_sparse_attention(q, k, v, make(), scale=SCALE,
                                       key_lengths=lengths)
      loss = tf.reduce_sum(out * dout)
    grads = tape.gradient(loss, [q, k, v])
    for label, x in zip(("out", "dq", "dk", "dv"), [out] + grads):
      results[f"{name}_{label}"] = x.numpy()
except tf.errors.FailedPreconditionError as e:
  variant = query()
  print(json.dumps({"variant": variant and variant.decode(),
                    "error": e.message}))
  sys.exit(0)
np.savez(sys.argv[2], **results)
print(json.dumps({"variant": query().decode(), "error": None}))
"""


def _cpu_has_avx512():
  """Read independently of the library: whether the AVX-512 variant can run."""
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("flags"):
        return AVX512_FLAGS <= set(line.split(":", 1)[1].split())
  raise AssertionError("/proc/cpuinfo lists no CPU flags")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """Seeded inputs for every layout, saved for the subprocesses."""
  rng = np.random.default_rng(20261204)
  arrays = {}
  for name, make in LAYOUTS.items():
    lay = make()
    shape = (2, lay.num_heads, lay.seq_len, 48)
    for x in ("q", "k", "v", "dout"):
      arrays[f"{name}_{x}"] = rng.standard_normal(shape).astype(np.float32)
    arrays[f"{name}_lengths"] = np.array([lay.seq_len, lay.seq_len - 37],
                                         np.int32)
  path = tmp_path_factory.mktemp("inputs") / "inputs.npz"
  np.savez(path, **arrays)
  return path, arrays


def _run(inputs_path, tmp_path, isa):
  """Runs RUN with ST_KERAS_CPU_ISA=isa (unset for None): (report, results)."""
  # st_keras and tests from this tree (an editable install may be another's).
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join(
                 filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  env.pop(ISA_VARIABLE, None)
  if isa is not None:
    env[ISA_VARIABLE] = isa
  out = tmp_path / f"results_{isa}.npz"
  result = subprocess.run(
      [sys.executable, "-c", RUN, str(inputs_path), str(out)], env=env,
      cwd=REPO, capture_output=True, text=True, timeout=600)
  # A crash (SIGILL from an instruction the CPU lacks) is a negative code.
  assert result.returncode == 0, (isa, result.returncode,
                                  result.stderr[-3000:])
  report = json.loads(result.stdout.strip().splitlines()[-1])
  return report, (dict(np.load(out)) if report["error"] is None else None)


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
  """The subprocess runs: by default and with each variant forced."""
  tmp_path = tmp_path_factory.mktemp("runs")
  return {isa: _run(inputs[0], tmp_path, isa)
          for isa in (None, "avx2", "avx512")}


def test_default_is_the_widest_variant_the_cpu_supports(runs):
  report, _ = runs[None]
  assert report["error"] is None
  assert report["variant"] == ("avx512" if _cpu_has_avx512()
                               else "avx2")


def test_forcing_avx2_runs_it(runs):
  assert runs["avx2"][0] == {"variant": "avx2", "error": None}


def test_forcing_avx512_runs_it_or_is_a_clear_error(runs):
  report, _ = runs["avx512"]
  if _cpu_has_avx512():
    assert report == {"variant": "avx512", "error": None}
  else:
    # The op fails with the reason, in a process that goes on running.
    assert report["variant"] is None
    assert f"{ISA_VARIABLE}=avx512" in report["error"]
    assert "x86-64-v4" in report["error"]
    assert "does not support it" in report["error"]


def test_unknown_variant_is_a_clear_error(inputs, tmp_path):
  report, _ = _run(inputs[0], tmp_path, "sse2")
  assert report["variant"] is None
  assert f"{ISA_VARIABLE}=sse2 names no variant" in report["error"]
  assert "avx512, avx2" in report["error"]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_variants_match_the_reference_and_each_other(runs, inputs, name):
  _, arrays = inputs
  q, k, v, dout = (arrays[f"{name}_{x}"] for x in ("q", "k", "v", "dout"))
  lengths = arrays[f"{name}_lengths"]
  mask = LAYOUTS[name]().to_dense()
  want = dict(zip(("out", "dq", "dk", "dv"), (
      reference.attention(q, k, v, mask, SCALE, lengths)[0],
      *reference.attention_grads(q, k, v, mask, SCALE, dout, lengths))))
  compared = [isa for isa in ("avx2", "avx512") if runs[isa][1] is not None]
  # The AVX2 variant runs on every CPU the library supports; AVX-512 only
  # where the CPU has it (else test_forcing_avx512_runs_it_or_is_a_clear_error
  # checks that it is reported unavailable).
  assert compared == (["avx2", "avx512"] if _cpu_has_avx512()
                      else ["avx2"])
  for isa in compared:
    got = runs[isa][1]
    for label, w in want.items():
      np.testing.assert_allclose(got[f"{name}_{label}"], w, atol=5e-5,
                                 rtol=1e-3, err_msg=f"{isa} {label}")
  if len(compared) == 2:
    for label in want:
      np.testing.assert_allclose(runs["avx2"][1][f"{name}_{label}"],
                                 runs["avx512"][1][f"{name}_{label}"],
                                 atol=2e-5, rtol=1e-4, err_msg=label)


def test_build_files_carry_no_march_native():
  # What is shipped must not be compiled for the build machine's CPU.
  for path in ["custom_ops/BUILD", "custom_ops/custom_op_library.bzl",
               ".bazelrc", "tools/build_ops.sh", "setup.py"]:
    assert "-march=native" not in (REPO / path).read_text(), path


def _instructions_by_function(library):
  """{demangled function name: [(raw bytes, instruction text)]} of .text."""
  text = subprocess.run(
      ["objdump", "-d", "-w", "-C", "-j", ".text", library],
      capture_output=True, text=True, check=True, timeout=600).stdout
  functions, current = {}, None
  for line in text.splitlines():
    header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
    if header:
      current = functions.setdefault(header.group(1), [])
    elif current is not None and line.count("\t") >= 2:
      _, raw, instruction = line.split("\t", 2)
      current.append((raw.split(), instruction))
  return functions


def _is_avx512(raw, instruction):
  """EVEX-encoded (first opcode byte 0x62, after any segment or address-size
  prefix) or on an opmask register: AVX-512 only."""
  opcode = next((b for b in raw if b not in
                 {"26", "2e", "36", "3e", "64", "65", "67"}), "")
  return opcode == "62" or re.search(r"%k[0-7]\b", instruction) is not None


@pytest.mark.skipif(shutil.which("objdump") is None,
                    reason="objdump (binutils) is not installed")
def test_only_the_avx512_variant_has_avx512_code():
  # Code shared by the variants (the TensorFlow kernels, the dispatcher, an
  # inline function both copies of the core emit) must run on the baseline:
  # AVX-512 instructions only in the st_keras::avx512 namespace (its
  # functions and what they instantiate).
  functions = _instructions_by_function(ops.library_path())
  assert any("st_keras::avx2::" in name for name in functions), (
      "no symbols of the core: is the library stripped?")
  avx512 = {name for name, code in functions.items()
            if any(_is_avx512(*i) for i in code)}
  assert avx512, "the AVX-512 variant was not compiled for AVX-512"
  assert all("st_keras::avx512::" in name for name in avx512), sorted(
      name for name in avx512 if "st_keras::avx512::" not in name)
  # The baseline variant uses AVX2's 256-bit FMAs.
  assert any("st_keras::avx2::" in name and
             any(re.match(r"vfmadd\w+ .*%ymm", i) for _, i in code)
             for name, code in functions.items())
