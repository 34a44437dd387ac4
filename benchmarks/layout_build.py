"""Layout construction benchmark: building the paper's patterns up to n = 2^20.

Times `layouts.fixed(n, 32, stride=1024, summary=32, num_heads=8)` and
`layouts.strided(n, 32, stride=1024, num_heads=8)` for n = 2^14 .. 2^20
(stride 1024 at every n: n / 4 >= 4096 > 1024 from 2^14 on, so no n needs a
shorter one), and reports per build:

- seconds: median of --repeats builds (numpy only, no TensorFlow);
- peak MiB: tracemalloc's peak over one more build (numpy registers its
  buffers with tracemalloc, so this counts every array the build allocates,
  temporaries included);
- table MiB and tiles: the nbytes of the finished tables (row_ptr, col_idx,
  mask_idx, masks, perm) and their tiles, stored once for the heads that
  share them;
- column s: `Component.column_tables` of every component, which the ops
  compute lazily for the backward pass.

Beside it, PyTorch FlexAttention's `create_block_mask(mask_mod, B=None,
H=None, n, n, device="cpu")` (BLOCK_SIZE 128, its default; one mask shared
by all heads) for the same patterns, mask_mod written from the formulas of
`layouts.fixed` / `layouts.strided`, each n in a child process with a time
limit. It materialises the n x n mask, so an n whose mask would exceed
--flex-max-gib is not run, and once one n takes longer than --flex-limit
seconds the larger ones are not run either.

Writes docs/layout_build.json and the `layout_build` section of
BENCHMARKS.md.

Usage:
  python -m benchmarks.layout_build [--max-log2n 20] [--repeats 3]
      [--flex-limit 60] [--flex-max-gib 6] [--output BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc

from benchmarks import common
from benchmarks.common import MIB
from benchmarks.common import REPO_ROOT

BEGIN, END = "<!-- layout_build:begin -->", "<!-- layout_build:end -->"
BLOCK, STRIDE, SUMMARY, HEADS = 32, 1024, 32, 8
FLEX_BLOCK = 128
PATTERNS = ("fixed", "strided")


def build(layouts, pattern: str, n: int):
  """The benchmark's layout of `pattern` at n tokens.

  Args:
    layouts: the st_keras.layouts module (imported by `main`, not at the
      top: with TensorFlow installed st_keras imports it, and its LLVM
      aborts the FlexAttention child's).
    pattern: "fixed" or "strided".
    n: tokens.

  Returns:
    A `layouts.Layout`.
  """
  if pattern == "fixed":
    return layouts.fixed(n, BLOCK, stride=STRIDE, summary=SUMMARY,
                         num_heads=HEADS)
  return layouts.strided(n, BLOCK, stride=STRIDE, num_heads=HEADS)


def allows(pattern: str, i, j):
  """The token rule of layouts.fixed / layouts.strided (causal, one
  summary pattern) for torch or numpy query positions i and keys j."""
  if pattern == "fixed":
    return (j <= i) & ((i // STRIDE == j // STRIDE) |
                       (j % STRIDE >= STRIDE - SUMMARY))
  return (j <= i) & ((i - j < STRIDE) | ((i - j) % STRIDE == 0))


def measure_layout(layouts, pattern: str, n: int, repeats: int) -> dict:
  """Times and sizes one pattern's layout at n tokens (see `build`).

  Returns:
    dict: seconds (median), all_seconds, peak_mib (tracemalloc), table_mib,
    tiles, pairs, column_seconds.
  """
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    lay = build(layouts, pattern, n)
    times.append(time.perf_counter() - start)
  del lay
  tracemalloc.start()
  lay = build(layouts, pattern, n)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  arrays = [a for c in lay.components
            for a in (c.row_ptr, c.col_idx, c.mask_idx, c.masks, c.perm)
            if a is not None]
  start = time.perf_counter()
  for comp in lay.components:
    comp.column_tables(lay.num_blocks)
  column_seconds = time.perf_counter() - start
  return {"seconds": statistics.median(times), "all_seconds": times,
          "peak_mib": peak / MIB,
          "table_mib": sum(a.nbytes for a in arrays) / MIB,
          "tiles": sum(c.nnz for c in lay.components),
          "table_heads": [c.table_heads for c in lay.components],
          "pairs": lay.num_pairs(), "column_seconds": column_seconds}


def flex_child(pattern: str, n: int) -> dict:
  """create_block_mask for the pattern at n (run in a child process).

  Args:
    pattern: "fixed" or "strided".
    n: tokens.

  Returns:
    dict: seconds, peak_rss_mib (the process's), growth_mib (over the RSS
    before the call), torch (version), blocks (non-empty blocks).
  """
  import torch  # pylint: disable=g-import-not-at-top
  from torch.nn.attention import flex_attention as fa  # pylint: disable=g-import-not-at-top

  def mask_mod(b, h, q_idx, kv_idx):
    del b, h  # one mask for every batch entry and head
    return allows(pattern, q_idx, kv_idx)

  with open("/proc/self/statm") as statm:  # pages: size, resident, ...
    before = int(statm.read().split()[1]) * resource.getpagesize()
  start = time.perf_counter()
  mask = fa.create_block_mask(mask_mod, None, None, n, n, device="cpu",
                              BLOCK_SIZE=FLEX_BLOCK)
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB
  return {"seconds": seconds, "peak_rss_mib": peak / MIB,
          "growth_mib": max(0, peak - before) / MIB,
          "torch": torch.__version__,
          "blocks": int(mask.kv_num_blocks.sum()) + int(
              0 if mask.full_kv_num_blocks is None else
              mask.full_kv_num_blocks.sum())}


def measure_flex(pattern: str, sizes, limit: float, max_gib: float) -> dict:
  """create_block_mask at each n, in child processes, within the limits.

  Args:
    pattern: "fixed" or "strided".
    sizes: the n to run, increasing.
    limit: seconds; the child is stopped past it and larger n not run.
    max_gib: larger n are not run once their dense mask would need more
      (at the bytes per pair the last run n took).

  Returns:
    {n: result dict, or {"not_run": reason}}.
  """
  results, stopped = {}, None
  per_pair, measured_at = 9.0, None  # bytes per (query, key); bool + int64
  for n in sizes:
    need_gib = per_pair * n * n / 2.0**30
    if stopped:
      results[n] = {"not_run": stopped}
      continue
    if need_gib > max_gib:
      basis = (f"{per_pair:.1f} bytes per pair as measured at n = "
               f"{measured_at}" if measured_at else
               f"{per_pair:g} bytes per pair (bool mask, int64 indices)")
      results[n] = {"not_run": f"~{need_gib:.0f} GiB for its dense n x n "
                               f"mask at {basis}, over the {max_gib:g} GiB "
                               f"budget"}
      stopped = f"the dense mask exceeds {max_gib:g} GiB from n = {n}"
      continue
    command = [sys.executable, "-m", "benchmarks.layout_build",
               "--flex-child", pattern, str(n)]
    try:
      done = subprocess.run(command, capture_output=True, text=True,
                            timeout=limit, check=True, cwd=REPO_ROOT)
      results[n] = json.loads(done.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
      results[n] = {"not_run": f"stopped after {limit:g} s"}
      stopped = f"> {limit:g} s at n = {n}"
      continue
    except subprocess.CalledProcessError as err:
      results[n] = {"not_run": f"failed: {err.stderr.strip()[-200:]}"}
      stopped = f"failed at n = {n}"
      continue
    per_pair = max(per_pair, results[n]["growth_mib"] * MIB / (n * n))
    measured_at = n
    if results[n]["seconds"] > limit:
      stopped = f"> {limit:g} s at n = {n}"
  return results


def flex_cell(result: dict) -> str:
  """Returns the table cell of one `measure_flex` result."""
  if "not_run" in result:
    return f"not run: {result['not_run']}"
  return (f"{result['seconds']:.2f} s, peak RSS {result['peak_rss_mib']:.0f} "
          f"MiB (+{result['growth_mib']:.0f})")


def render(results: dict, command: str, flex_version: str) -> str:
  """Returns the BENCHMARKS.md section.

  Args:
    results: {pattern: {"layouts": {n: `measure_layout` dict}, "flex": {n:
      `measure_flex` result}}}.
    command: the command line that produced them.
    flex_version: torch's version, for the notes.
  """
  lines = [
      BEGIN, "## Layout construction (n up to 2^20)", "",
      f"Command: `{command}`, "
      f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
      f"{common.machine_description()}. Block {BLOCK}, stride {STRIDE} "
      "(every n), "
      f"summary {SUMMARY} (fixed, one summary pattern), {HEADS} heads, "
      "causal. numpy only.", "",
      "| pattern | n | build s | peak MiB (tracemalloc) | table MiB | tiles "
      f"stored (table heads) | column_tables s | FlexAttention "
      f"create_block_mask (block {FLEX_BLOCK}) |",
      "|---|---:|---:|---:|---:|---:|---:|---|"]
  for pattern in PATTERNS:
    for n, r in results[pattern]["layouts"].items():
      lines.append(
          f"| {pattern} | 2^{int(n).bit_length() - 1} | {r['seconds']:.3f} | "
          f"{r['peak_mib']:.0f} | {r['table_mib']:.1f} | {r['tiles']:,} "
          f"({'+'.join(map(str, r['table_heads']))}) | "
          f"{r['column_seconds']:.2f} | "
          f"{flex_cell(results[pattern]['flex'][n])} |")
  lines += [
      "", "- build s: median of the builds; peak MiB: tracemalloc's peak "
      "over one build (every numpy buffer, temporaries included); table "
      "MiB: nbytes of the finished tables. The heads share one pattern, so "
      "each component stores one table head (table heads 1): the tables do "
      "not grow with the number of heads.",
      "- column_tables s: the column-major copy the ops build lazily, for "
      "the backward pass (all components).",
      f"- FlexAttention: torch {flex_version}, `create_block_mask(mask_mod, "
      "None, None, n, n, device=\"cpu\")` in a child process, mask_mod from "
      "the same formulas; peak RSS of the child (torch imported), and its "
      "growth over the RSS before the call. It builds the dense n x n mask "
      "first, hence the memory limit.",
      END, ""]
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--min-log2n", type=int, default=14)
  parser.add_argument("--max-log2n", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--flex-limit", type=float, default=60.0,
                      help="seconds; larger n are not run past it")
  parser.add_argument("--flex-max-gib", type=float, default=6.0)
  parser.add_argument("--output", default="BENCHMARKS.md")
  parser.add_argument("--json", default="docs/layout_build.json")
  parser.add_argument("--flex-child", nargs=2, metavar=("PATTERN", "N"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.flex_child:
    print(json.dumps(flex_child(args.flex_child[0],
                                int(args.flex_child[1]))))
    return 0
  sizes = [2**k for k in range(args.min_log2n, args.max_log2n + 1)]
  has_torch = importlib.util.find_spec("torch") is not None
  from st_keras import layouts  # pylint: disable=g-import-not-at-top
  results = {}
  for pattern in PATTERNS:
    results[pattern] = {"layouts": {}}
    for n in sizes:
      results[pattern]["layouts"][n] = measure_layout(layouts, pattern, n,
                                                      args.repeats)
      print(pattern, n, results[pattern]["layouts"][n], flush=True)
    results[pattern]["flex"] = (
        measure_flex(pattern, sizes, args.flex_limit, args.flex_max_gib)
        if has_torch else
        {n: {"not_run": "torch is not installed"} for n in sizes})
    print(pattern, "flex", results[pattern]["flex"], flush=True)
  command = common.command("layout_build",
                           argv if argv is not None else sys.argv[1:])
  with open(os.path.join(REPO_ROOT, args.json), "w") as f:
    json.dump({"command": command, "machine": common.machine_description(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "results": results}, f, indent=1)
  versions = {r["torch"] for p in PATTERNS for r in results[p]["flex"].values()
              if "torch" in r}
  section = render(results, command, ", ".join(sorted(versions)) or "-")
  print(section)
  common.write_section(os.path.join(REPO_ROOT, args.output), section,
                       BEGIN, END)
  return 0


if __name__ == "__main__":
  sys.exit(main())
