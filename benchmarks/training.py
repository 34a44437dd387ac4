"""Training-step benchmark of the SparseTransformer: sparse vs dense attention.

Three measurements, each training step in a fresh child process (peak memory
from VmHWM, reset after the warm-up step):

1. throughput: the demo model (width 128, 2 layers, 4 heads) at context
   4096, fixed pattern (l=128, c=32, block 32) vs the same model with dense
   causal attention, tokens per second of a training step (children of the
   two alternate, so a slow spell of a shared machine hits both);
2. recompute: peak memory of one training step at context 16384 with and
   without recomputation of the residual blocks;
3. longest context: one training step of a 2-layer, width-128 model at
   contexts 2^12 .. 2^20, strided pattern (l = sqrt(n)) vs dense, until a
   step fails (memory) or exceeds the time limit.

Usage:
  python -m benchmarks.training [--quick] [--output BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

from benchmarks import common
from benchmarks.common import GIB
from benchmarks.common import MIB
from benchmarks.common import proc_status_bytes

SECTION_BEGIN = "<!-- training:begin -->"
SECTION_END = "<!-- training:end -->"
DEMO = dict(width=128, num_layers=2, num_heads=4)
MEMORY_KILL_GIB = 21.0
POLL_S = 0.2


def model_kwargs(pattern, n, recompute, width=DEMO["width"],
                 num_layers=DEMO["num_layers"]):
  """SparseTransformer arguments of a benchmark configuration."""
  kwargs = dict(DEMO, seq_len=n, pattern=pattern, recompute=recompute,
                block_size=32, stride=128, summary_size=32, width=width,
                num_layers=num_layers)
  if pattern == "strided":
    stride = 2 ** round(math.log2(math.sqrt(n)))
    kwargs.update(stride=stride, block_size=min(64, stride))
  return kwargs


def child(spec):
  """Builds the model and times `spec['steps']` training steps after one
  warm-up step; prints a JSON result line."""
  import keras
  import numpy as np
  import tensorflow as tf

  from st_keras import models
  n, batch = spec["n"], spec["batch"]
  size = {key: spec[key] for key in ("width", "num_layers") if key in spec}
  model = models.SparseTransformer(**model_kwargs(spec["pattern"], n,
                                                  spec["recompute"], **size))
  model.build()
  optimizer = keras.optimizers.AdamW(1e-4)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

  @tf.function
  def step(x, y):
    with tf.GradientTape() as tape:
      loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply(grads, model.trainable_variables)
    return loss

  rng = np.random.default_rng(0)
  data = rng.integers(0, 256, (batch, n + 1)).astype(np.int32)
  x, y = tf.constant(data[:, :-1]), tf.constant(data[:, 1:])

  def timed_step():
    start = time.perf_counter()
    loss = float(step(x, y))
    return time.perf_counter() - start, loss

  def fresh_baseline():  # RSS now, with the peak reset to it
    common.release_free_memory()
    rss = proc_status_bytes("VmRSS")
    common.reset_peak_rss()
    return rss

  # steps == 0: the single (first) step is the measurement, tracing included.
  # first_peak_mib: the first step's peak above the RSS before it (later
  # steps reuse what the allocator kept, so their peak says less).
  baseline = fresh_baseline()
  if spec["steps"] > 0:
    _, loss = timed_step()
    first_peak = proc_status_bytes("VmHWM") - baseline
    baseline = fresh_baseline()
  times = []
  for _ in range(max(1, spec["steps"])):
    seconds, loss = timed_step()
    times.append(seconds)
  peak = proc_status_bytes("VmHWM") - baseline
  if spec["steps"] == 0:
    first_peak = peak
  print(json.dumps({"status": "ok", "step_s": statistics.median(times),
                    "times_s": times,
                    "peak_mib": max(peak, 0) / MIB,
                    "first_peak_mib": max(first_peak, 0) / MIB, "loss": loss,
                    "params": model.count_params(), "tokens": batch * n}))


def run_child(spec, timeout_s, env=None):
  """Runs one configuration in a fresh Python; kills it past the memory or
  time limit.

  Args:
    spec: the configuration (see `child`).
    timeout_s: wall-clock limit.
    env: extra environment variables of the child.

  Returns:
    The child's result dict, or {'status': why it failed}.
  """
  proc = subprocess.Popen(
      [sys.executable, "-m", "benchmarks.training", "--child",
       json.dumps(spec)],
      cwd=common.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True,
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
  deadline = time.monotonic() + timeout_s
  status = None
  while proc.poll() is None:
    if proc_status_bytes("VmRSS", proc.pid) > MEMORY_KILL_GIB * GIB:
      proc.kill()
      status = f"out of memory (> {MEMORY_KILL_GIB:.0f} GiB)"
    elif time.monotonic() > deadline:
      proc.kill()
      status = f"over {timeout_s:.0f} s"
    time.sleep(POLL_S)
  out, err = proc.communicate()
  if status:
    return {"status": status}
  lines = [l for l in out.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    oom = "ResourceExhausted" in err or "MemoryError" in err or (
        proc.returncode == -9)
    return {"status": "out of memory" if oom else
            f"failed ({proc.returncode}): {err.strip().splitlines()[-1:]}"}
  return json.loads(lines[-1])


def log(spec, result):
  what = (f"{spec['pattern']:7s} n={spec['n']:<8d} recompute="
          f"{int(spec['recompute'])}")
  if result["status"] == "ok":
    print(f"[training] {what}: {1e3 * result['step_s']:.0f} ms/step, "
          f"{result['peak_mib']:.0f} MiB", flush=True)
  else:
    print(f"[training] {what}: {result['status']}", flush=True)


def measure(pattern, n, recompute, steps, batch=1, timeout_s=1800):
  spec = dict(pattern=pattern, n=n, recompute=recompute, steps=steps,
              batch=batch)
  result = run_child(spec, timeout_s)
  log(spec, result)
  return result


def measure_rounds(patterns, n, steps, rounds):
  """Times `patterns` at context n in `rounds` interleaved rounds of fresh
  children (a, b, a, b, ...), so a slow spell of a shared machine falls on
  every pattern alike.

  Args:
    patterns: pattern names.
    n: context length.
    steps: timed steps per child.
    rounds: children per pattern.

  Returns:
    {pattern: result}: the last child's result with step_s the median of
    every child's timed steps, or the pattern's first failure.
  """
  children = {pattern: [] for pattern in patterns}
  for _ in range(rounds):
    for pattern in patterns:
      children[pattern].append(measure(pattern, n, False, steps))
  results = {}
  for pattern, runs in children.items():
    failed = [r for r in runs if r["status"] != "ok"]
    times = [t for r in runs if r["status"] == "ok" for t in r["times_s"]]
    results[pattern] = failed[0] if failed else dict(
        runs[-1], times_s=times, step_s=statistics.median(times))
  return results


def fmt(result, key, scale=1.0, digits=0):
  if result["status"] != "ok":
    return result["status"]
  return f"{result[key] * scale:,.{digits}f}"


def render(args, throughput, memory, longest, seconds):
  lines = [SECTION_BEGIN, "## Training steps: sparse vs dense attention (CPU)",
           "",
           f"- Command: `{common.command('training', args.argv)}`",
           f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
           f"wall time {seconds / 60:.1f} min",
           f"- Machine: {common.machine_description()}",
           "- Model: width 128, 2 layers, 4 heads, FF x4, batch 1, AdamW, "
           "float32; one step = forward, backward and update; median of "
           f"{args.steps} steps after a warm-up step (throughput: of "
           f"{args.rounds} interleaved children per pattern, {args.steps} "
           "steps each); peak memory above the RSS after the warm-up.", "",
           f"### Throughput at context {args.throughput_n}", "",
           "| attention | ms / step | tokens / s | peak MiB | dense / sparse |",
           "|---|---:|---:|---:|---:|"]
  dense = throughput["dense"]
  for name, label in (("fixed", "fixed (l=128, c=32, block 32)"),
                      ("dense", "dense causal (same op, all tiles)")):
    r = throughput[name]
    ratio = (f"{dense['step_s'] / r['step_s']:.2f}"
             if r["status"] == dense["status"] == "ok" else "–")
    tps = (f"{r['tokens'] / r['step_s']:,.0f}" if r["status"] == "ok"
           else "–")
    lines.append(f"| {label} | {fmt(r, 'step_s', 1e3)} | {tps} | "
                 f"{fmt(r, 'peak_mib')} | {ratio} |")
  lines += ["", f"### Recomputation at context {args.memory_n} (fixed "
            "pattern)", "",
            "| recompute | ms / step | peak MiB |", "|---|---:|---:|"]
  for flag in (False, True):
    r = memory[flag]
    lines.append(f"| {'on' if flag else 'off'} | {fmt(r, 'step_s', 1e3)} | "
                 f"{fmt(r, 'peak_mib')} |")
  lines += ["", "### Longest context: one training step, 2 layers, width "
            "128, recompute on", "",
            "One step, the first (tracing included; peak memory above the "
            "RSS before it). Strided uses l = sqrt(n) (rounded to a power "
            "of two), block min(64, l); dense is the same op over every "
            "causal tile, so its memory stays linear and time is its limit. "
            f"A failed step or one over {args.timeout:.0f} s ends its "
            "column.", "",
            "| n | strided ms / step | strided peak MiB | dense ms / step | "
            "dense peak MiB |", "|---:|---:|---:|---:|---:|"]
  for n in sorted(longest):
    s, d = longest[n].get("strided"), longest[n].get("dense")
    cells = []
    for r in (s, d):
      cells += (["–", "–"] if r is None else
                [fmt(r, "step_s", 1e3), fmt(r, "peak_mib")])
    lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
  lines += ["", SECTION_END, ""]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--quick", action="store_true",
                      help="small sizes (a few minutes); prints, writes "
                      "nothing unless --output is given")
  parser.add_argument("--output", help="Markdown file whose training "
                      "section is replaced (default BENCHMARKS.md)")
  parser.add_argument("--steps", type=int, default=10,
                      help="timed steps per child (after a warm-up step)")
  parser.add_argument("--rounds", type=int, default=2,
                      help="interleaved children per pattern of the "
                      "throughput measurement")
  parser.add_argument("--max-log2-n", type=int, default=20)
  parser.add_argument("--timeout", type=float, default=900,
                      help="seconds per longest-context step")
  args = parser.parse_args(argv)
  args.argv = sys.argv[1:] if argv is None else list(argv)
  if args.child:
    child(json.loads(args.child))
    return 0
  args.throughput_n = 1024 if args.quick else 4096
  args.memory_n = 2048 if args.quick else 16384
  top = 13 if args.quick else args.max_log2_n
  if args.output is None and not args.quick:
    args.output = common.BENCHMARKS_MD
  start = time.perf_counter()
  throughput = measure_rounds(("fixed", "dense"), args.throughput_n,
                              args.steps, args.rounds)
  memory = {flag: measure("fixed", args.memory_n, flag, args.steps)
            for flag in (False, True)}
  longest, alive = {}, {"strided": True, "dense": True}
  for log2_n in range(12, top + 1):
    n = 2 ** log2_n
    longest[n] = {}
    for pattern in ("strided", "dense"):
      if alive[pattern]:
        r = measure(pattern, n, True, 0, timeout_s=args.timeout)
        longest[n][pattern] = r
        alive[pattern] = r["status"] == "ok"
  section = render(args, throughput, memory, longest,
                   time.perf_counter() - start)
  print(section)
  if args.output:
    common.write_section(args.output, section, SECTION_BEGIN, SECTION_END)
  return 0


if __name__ == "__main__":
  sys.exit(main())
