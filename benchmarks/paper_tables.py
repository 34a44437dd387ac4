"""The paper's Tables 2, 3 and 4 in miniature, trained and measured here.

- Table 2, text: the same small model trained for the same steps with dense,
  fixed (l=128, c=32, merged heads) and strided attention on the default
  corpus (the Python standard library's sources, split by file; the split is
  written to a manifest), with held-out bits per byte, time per step, peak
  memory and learning curves. The same on enwik8 when ST_ENWIK8 names the
  file. Time per step twice: the training runs' medians, and the three
  models in one process taking one step each in turn.
- Table 2, images: the same comparison on scikit-learn's handwritten digits,
  upsampled to 32x32 and written in the CIFAR-10 binary format by
  benchmarks/digits_to_cifar.py (stride 96: one image row).
- Table 3: held-out bits per byte of a fixed-pattern text model (Table 2's
  configuration, trained longer) as the evaluation context grows from 1/8 of
  the training context to all of it, scoring only the last 1/8 of every
  window, so each context predicts the same bytes
  (`st_keras.evaluate.context_sweep`).
- Table 4: for contexts 2^12 .. 2^20, the largest model of a size ladder
  whose training step (recomputation on) fits the memory budget and a time
  budget, strided (l = sqrt(n)) and dense attention.

Every training run is the real trainer (`python -m st_keras.train`) in its
own process, with peak memory read from /proc. Children run with
TF_ENABLE_ONEDNN_OPTS=1 (TensorFlow's oneDNN kernels, off by default in
this TensorFlow build) for every variant alike.

A run of some of the tables (--tables) keeps the others' results from the
output directory's results.json; each table records when it was run.

Usage:
  python -m benchmarks.paper_tables            # full: ~2 h, writes docs/
  python -m benchmarks.paper_tables --tables text,table3
  python -m benchmarks.paper_tables --tables ""   # redraw from results.json
  python -m benchmarks.paper_tables --quick --output-dir /tmp/tables
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import yaml

from benchmarks import common
from benchmarks import digits_to_cifar
from benchmarks import ngram
from benchmarks import training as training_bench
from benchmarks.common import GIB
from benchmarks.common import MIB
from benchmarks.common import REPO_ROOT
from benchmarks.common import proc_status_bytes

CHILD_ENV = {"TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
POLL_S = 0.5
PATTERNS = ("dense", "fixed", "strided")


@dataclasses.dataclass
class Settings:
  """Sizes of one mode of the script."""
  width: int
  num_layers: int
  num_heads: int
  text_context: int
  steps: int
  image_steps: int
  eval_every: int
  eval_batches: int
  learning_rate: float
  warmup_steps: int
  table3_steps: int         # training steps of the Table 3 model
  table3_batch: int         # and its windows per step
  table3_segments: int
  image_limit: int | None
  table4_log2: tuple
  table4_ladder: tuple      # (layers, width), smallest first
  table4_time_s: float      # a larger model must step within this
  table4_last_s: float      # the smallest model's limit
  text_path: str | None     # None: the default corpus
  timing_rounds: int = 30   # Table 2's interleaved timing: rounds
  timing_warmup: int = 5    # after this many steps of each model


FULL = Settings(width=128, num_layers=4, num_heads=4, text_context=4096,
                steps=600, image_steps=600, eval_every=50, eval_batches=8,
                learning_rate=1e-3, warmup_steps=60, table3_steps=4000,
                table3_batch=2, table3_segments=512,
                image_limit=None, table4_log2=(12, 20),
                table4_ladder=((2, 64), (2, 128), (4, 128), (8, 128),
                               (8, 256), (16, 256)),
                table4_time_s=60.0, table4_last_s=900.0, text_path=None)
QUICK = Settings(width=64, num_layers=2, num_heads=2, text_context=512,
                 steps=8, image_steps=4, eval_every=4, eval_batches=2,
                 learning_rate=1e-3, warmup_steps=2, table3_steps=8,
                 table3_batch=2, table3_segments=16,
                 image_limit=48, table4_log2=(10, 11),
                 table4_ladder=((1, 64), (2, 64)), table4_time_s=60.0,
                 table4_last_s=120.0,
                 # A small slice of the standard library: its json package.
                 text_path=os.path.dirname(json.__file__),
                 timing_rounds=2, timing_warmup=1)


def pattern_model(pattern: str, stride: int) -> dict:
  """The attention keys of the model section for one Table 2 variant."""
  return {"pattern": pattern, "integration": "merged", "stride": stride,
          "summary_size": 32, "block_size": 32}


# ----------------------------------------------------------------------------
# Children: a training run, the Table 3 evaluation, the corpus manifest.


def run_process(argv: list, timeout_s: float) -> dict:
  """Runs a command, polling its peak resident memory.

  Returns:
    {'returncode', 'stdout', 'stderr', 'peak_bytes', 'seconds'}.
  """
  start = time.monotonic()
  proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, **CHILD_ENV))
  peak = 0
  try:
    while proc.poll() is None:
      peak = max(peak, proc_status_bytes("VmHWM", proc.pid))
      if time.monotonic() - start > timeout_s:
        proc.kill()
      time.sleep(POLL_S)
  finally:
    out, err = proc.communicate()
  if proc.returncode != 0:
    tail = "\n".join(err.strip().splitlines()[-15:])
    raise RuntimeError(f"{' '.join(argv[:4])} ... exited with "
                       f"{proc.returncode}:\n{tail}")
  return {"returncode": proc.returncode, "stdout": out, "stderr": err,
          "peak_bytes": peak, "seconds": time.monotonic() - start}


def python_child(kind: str, spec: dict, timeout_s: float = 3600) -> dict:
  """Runs `CHILDREN[kind](spec)` in a fresh Python; returns its JSON."""
  run = run_process([sys.executable, "-m", "benchmarks.paper_tables",
                     "--child", kind, json.dumps(spec)], timeout_s)
  lines = [l for l in run["stdout"].splitlines() if l.startswith("{")]
  return json.loads(lines[-1])


def train_run(name: str, config: dict, root: str) -> dict:
  """Trains one Table 2 variant with the project's trainer.

  Args:
    name: run name (a directory under root).
    config: the full config dict (model, data, train sections).
    root: directory of the runs; an earlier run of that name is replaced.

  Returns:
    {'bits', 'ms_per_step' (mean), 'median_ms_per_step', 'peak_mib',
     'curve': [(step, valid bits)],
     'train_curve': [(step, train bits)], 'output_dir', 'wall_s',
     'steps'}.
  """
  out_dir = os.path.join(root, name)
  config = json.loads(json.dumps(config))
  config["train"]["output_dir"] = out_dir
  # A fresh run: a resumed one would time no steps.
  shutil.rmtree(out_dir, ignore_errors=True)
  os.makedirs(out_dir)
  config_path = os.path.join(out_dir, "table_config.yaml")
  with open(config_path, "w") as f:
    yaml.safe_dump(config, f)
  print(f"[tables] training {name} ...", flush=True)
  run = run_process([sys.executable, "-m", "st_keras.train", "--config",
                     config_path], timeout_s=4 * 3600)
  with open(os.path.join(out_dir, "summary.json")) as f:
    summary = json.load(f)
  metric = ("bits_per_dim" if config["data"]["kind"] == "cifar10" else
            "bits_per_byte")
  curve, train_curve = [], []
  with open(os.path.join(out_dir, "history.csv")) as f:
    for row in csv.DictReader(f):
      step = int(row["step"])
      curve.append((step, float(row["val_" + metric])))
      train_curve.append((step, float(row[metric])))
  tokens = config["data"]["batch_size"] * config["data"]["context"]
  result = {"bits": summary["valid_bits_per_byte"],
            "ms_per_step": 1e3 * tokens / summary["tokens_per_second"],
            "median_ms_per_step": summary["median_step_ms"],
            "peak_mib": run["peak_bytes"] / MIB, "curve": curve,
            "train_curve": train_curve, "output_dir": out_dir,
            "wall_s": run["seconds"], "steps": summary["steps"]}
  print(f"[tables] {name}: {result['bits']:.4f} bits, "
        f"{result['median_ms_per_step']:.0f} ms/step (median; mean "
        f"{result['ms_per_step']:.0f}), {result['peak_mib']:.0f} MiB",
        flush=True)
  return result


NGRAM_ORDERS = (1, 2, 3, 4)  # the baselines Table 3 prints


def table3_child(spec: dict) -> dict:
  """`context_sweep` of the run spec['run'] (the other keys: its args),
  over all held-out segments and, as 'within_file', over those whose
  longest window lies inside one held-out file, and, as
  'within_file_full', over those again in full windows
  (`context_sweep(full_windows=True)`, the run's separator ending the
  other segment's bytes); 'ngram_bits' holds the run's
  data's byte n-gram baselines, {order: bits per byte}."""
  from st_keras import evaluate  # pylint: disable=import-outside-toplevel
  from st_keras.data import kinds  # pylint: disable=import-outside-toplevel
  run = evaluate.load_run(spec["run"])
  starts = kinds.held_out_file_starts(run.config.data, run.valid)
  args = (run.model, run.valid, spec["contexts"], spec["scored"],
          spec["segments"], spec["batch"])
  result = evaluate.context_sweep(*args)
  result["within_file"] = evaluate.context_sweep(*args, starts=starts)
  result["within_file_full"] = evaluate.context_sweep(
      *args, starts=starts, full_windows=True,
      separator=run.config.data.separator)
  result["ngram_bits"] = {
      order: ngram.ngram_bits(run.splits["train"], run.valid, order)
      for order in NGRAM_ORDERS}
  return result


def step_time_child(spec: dict) -> dict:
  """Times the training steps of several models in one process, one step
  of each in turn: spec['configs'] {pattern: full config}, each model the
  trainer's (model, loss, metric and optimizer; `train_on_batch` runs the
  compiled train function `fit` runs) on one batch of random bytes (the
  time of a step does not depend on the bytes); spec['warmup'] untimed
  steps of each (here the first three or four steps of a model take up to
  1.8x a later one), then spec['rounds'] rounds of one timed step each.

  Returns:
    {'times_s': {pattern: [seconds of its step in each round]}}.
  """
  import keras
  import numpy as np

  from st_keras import config as config_lib
  from st_keras import models
  from st_keras import train as train_lib
  configs = {p: config_lib.from_dict(c) for p, c in spec["configs"].items()}
  first = next(iter(configs.values()))
  keras.mixed_precision.set_global_policy(first.train.precision)
  keras.utils.set_random_seed(first.train.seed)
  steps = {}
  for pattern, cfg in configs.items():
    model = train_lib.build_model(cfg)
    models.compile_for_training(model, train_lib.make_optimizer(cfg.train))
    rng = np.random.default_rng(cfg.train.seed)
    # (batch, context + 1) bytes: inputs and their next-byte targets.
    data = rng.integers(0, 256, (cfg.data.batch_size,
                                 cfg.data.context + 1), dtype=np.int32)
    steps[pattern] = functools.partial(model.train_on_batch, data[:, :-1],
                                       data[:, 1:])
    for _ in range(spec["warmup"]):
      steps[pattern]()
  times = {pattern: [] for pattern in configs}
  for _ in range(spec["rounds"]):
    for pattern, step in steps.items():
      start = time.perf_counter()
      step()
      times[pattern].append(time.perf_counter() - start)
  return {"times_s": times}


def interleaved_step_times(configs: dict, rounds: int, warmup: int) -> dict:
  """Times each pattern's training step in one process, the patterns'
  steps taking turns (`step_time_child`), so a slow spell of the shared
  machine falls on all of them alike: the training runs take one pattern
  after another for minutes each.

  Args:
    configs: {pattern: full config dict}; 'dense' among them.
    rounds: timed steps per pattern, one per round (at least 2).
    warmup: untimed steps of each model before them.

  Returns:
    {'rounds', 'warmup', 'median_ms': {pattern: median step}, 'ratio':
    {pattern: median over the rounds of dense's step / the pattern's},
    'ratio_quartiles': {pattern: [first, third quartile of those]}}.
  """
  if rounds < 2:
    raise ValueError(f"rounds must be at least 2 (quartiles), got {rounds}")
  times = python_child("step_time", {"configs": configs, "rounds": rounds,
                                     "warmup": warmup})["times_s"]
  result = {"rounds": rounds, "warmup": warmup, "median_ms": {}, "ratio": {},
            "ratio_quartiles": {}}
  for pattern, t in times.items():
    paired = [d / x for d, x in zip(times["dense"], t)]
    result["median_ms"][pattern] = 1e3 * statistics.median(t)
    result["ratio"][pattern] = statistics.median(paired)
    quartiles = statistics.quantiles(paired, n=4)
    result["ratio_quartiles"][pattern] = [quartiles[0], quartiles[-1]]
  return result


def manifest_child(spec: dict) -> dict:
  """The default corpus's train/valid split, written to spec['path']."""
  import hashlib

  from st_keras.data import text
  separator = text.DOCUMENT_SEPARATOR
  manifest = text.stdlib_manifest()
  splits = text.stdlib_splits(separator=separator)
  record = {"python": platform.python_version(), "root": manifest["root"][0],
            "rule": "a file is valid when crc32(relative path) % 1000 < 50",
            "separator": separator}
  for part, data in splits.items():
    record[part] = {"files": len(manifest[part]), "bytes": int(data.size),
                    "sha256": hashlib.sha256(data.tobytes()).hexdigest()}
  record["valid"]["paths"] = manifest["valid"]
  with open(spec["path"], "w") as f:
    json.dump(record, f, indent=1)
  summary = {k: record[k] for k in ("python", "root", "rule", "separator")}
  for part in ("train", "valid"):
    summary.update({f"{part}_files": record[part]["files"],
                    f"{part}_bytes": record[part]["bytes"]})
  return summary


CHILDREN = {"table3": table3_child, "manifest": manifest_child,
            "step_time": step_time_child}
TABLES = ("text", "table3", "images", "table4")  # --tables, in run order


# ----------------------------------------------------------------------------
# The tables.


def base_config(s: Settings, kind: str, context: int, steps: int) -> dict:
  """The config shared by the three variants of one Table 2 data set.

  The feed-forward and query-key projections are half-size, as in the
  paper's CIFAR-10 models: at this width the projections, not attention,
  are most of a step, and halving them lets the step time show the
  attention patterns' difference.
  """
  return {
      "model": {"width": s.width, "num_layers": s.num_layers,
                "num_heads": s.num_heads, "ff_multiplier": 2.0,
                "qk_ratio": 0.5, "dropout": 0.0},
      "data": {"kind": kind, "context": context, "batch_size": 1},
      "train": {"steps": steps, "learning_rate": s.learning_rate,
                "warmup_steps": s.warmup_steps,
                "checkpoint_every": s.eval_every,
                "eval_batches": s.eval_batches, "log_every": 0,
                "sample_bytes": 0, "seed": 0}}


def table2(s: Settings, kind: str, root: str, path: str | None = None,
           stride: int = 128) -> dict:
  """Dense, fixed and strided runs of one data set.

  Returns:
    {pattern: train_run result} plus 'config', 'stride' and
    'interleaved' (`interleaved_step_times` of the three variants).
  """
  context = 3072 if kind == "cifar10" else s.text_context
  steps = s.image_steps if kind == "cifar10" else s.steps
  config = base_config(s, kind, context, steps)
  if path:
    config["data"]["path"] = path
  runs = {"config": config, "stride": stride}
  variants = {}
  for pattern in PATTERNS:
    variants[pattern] = json.loads(json.dumps(config))
    variants[pattern]["model"].update(pattern_model(pattern, stride))
    runs[pattern] = train_run(f"{kind}_{pattern}", variants[pattern], root)
  print(f"[tables] {kind}: interleaved step timing ...", flush=True)
  runs["interleaved"] = interleaved_step_times(variants, s.timing_rounds,
                                               s.timing_warmup)
  return runs


def table3(s: Settings, root: str, path: str | None = None,
           trained: dict | None = None) -> dict:
  """Trains the Table 3 model and scores it at growing contexts.

  The model is Table 2's fixed-pattern text model trained for
  s.table3_steps steps of s.table3_batch windows: using long context is
  learned late, after the short-range statistics that Table 2's equal-step
  comparison measures, and one window per step, all of one file, makes
  noisy gradients.

  Args:
    s, root, path: the mode's sizes, the runs directory, the text.
    trained: None, or the 'run' of an earlier result of this function,
      whose model is scored again instead of training one.

  Returns:
    The table3 child's result plus contexts, scored, training_context,
    batch, separator (the run's data.separator) and 'run' (the
    `train_run` result).
  """
  n, k = s.text_context, s.text_context // 8
  config = base_config(s, "text", n, s.table3_steps)
  config["model"].update(pattern_model("fixed", 128))
  config["data"]["batch_size"] = s.table3_batch
  # Its learning curve is not plotted: a few checkpoints suffice, and each
  # costs an evaluation and a slow first step of the next interval.
  config["train"]["checkpoint_every"] = max(s.eval_every,
                                            s.table3_steps // 12)
  if path:
    config["data"]["path"] = path
  run = trained or train_run("text_fixed_table3", config, root)
  with open(os.path.join(run["output_dir"], "config.json")) as f:
    data = json.load(f)["data"]  # a rescored run's own
  # Runs made before data.separator existed read the files run together.
  batch, separator = data["batch_size"], data.get("separator")
  contexts = [k * m for m in (1, 2, 3, 4, 6, 8)]
  print("[tables] table 3 ...", flush=True)
  result = python_child("table3", {
      "run": run["output_dir"],
      "contexts": contexts, "scored": k, "segments": s.table3_segments,
      "batch": 4})
  result.update(contexts=contexts, scored=k, training_context=n,
                batch=batch, separator=separator, run=run)
  return result


# A prediction from another model of the ladder is rougher than one from the
# same model: such a model is skipped only when over this times the budget.
UNMEASURED_MARGIN = 1.5


def predicted_step(reference: dict, layers: int, width: int, n: int,
                   power: float) -> tuple:
  """A training step's time and peak memory predicted from a measured one.

  Time grows as n^power (1.5 strided, 2 dense: attention dominates at long
  n) and memory as n; both scale with layers x width against the reference
  model (the attention's cost and the stored block inputs are linear in
  both).

  Args:
    reference: a measured row (n, layers, width, step_s, peak_mib).
    layers, width: the model to predict.
    n: the context to predict.
    power: the exponent of n in the step time.

  Returns:
    (seconds, bytes).
  """
  grow = n / reference["n"]
  size = layers * width / (reference["layers"] * reference["width"])
  return (reference["step_s"] * grow ** power * size,
          reference["peak_mib"] * MIB * grow * size)


def table4(s: Settings) -> dict:
  """The largest model of the ladder per context, strided and dense.

  For each n (ascending) the search starts at the model chosen for the
  previous n and steps down the ladder while a step, or its prediction
  (`predicted_step`), is over budget. A model not yet measured is
  predicted from the column's latest measurement and skipped only when
  over UNMEASURED_MARGIN times the budget. The smallest model only has to
  complete (within table4_last_s); a larger one must also step within
  table4_time_s. A column ends when even the smallest model fails, or is
  predicted to.
  """
  budget = 0.8 * common.meminfo_kib("MemTotal") * 1024
  ladder = s.table4_ladder
  results = {"budget_gib": budget / GIB, "rows": {}}
  for pattern, power in (("strided", 1.5), ("dense", 2.0)):
    index, seen, alive = len(ladder) - 1, {}, True
    for log2_n in range(s.table4_log2[0], s.table4_log2[1] + 1):
      n = 2 ** log2_n
      row = results["rows"].setdefault(n, {})
      while alive:
        layers, width = ladder[index]
        smallest = index == 0
        limit = s.table4_last_s if smallest else s.table4_time_s
        # The model's own last measurement, else the column's latest.
        own = seen.get(index)
        last = own or (max(seen.values(), key=lambda r: r["n"]) if seen
                       else None)
        if last:
          predicted_s, predicted_bytes = predicted_step(last, layers, width,
                                                        n, power)
          margin = 1.0 if own else UNMEASURED_MARGIN
          max_s, max_bytes = margin * limit, margin * budget
          if predicted_s > max_s or predicted_bytes > max_bytes:
            if smallest:
              row[pattern] = {"status": f"predicted {predicted_s:,.0f} s, "
                              f"{predicted_bytes / GIB:.1f} GiB: over "
                              f"{max_s:.0f} s or {max_bytes / GIB:.1f} GiB"}
              alive = False
            else:
              index -= 1
            continue
        spec = dict(pattern=pattern, n=n, recompute=True, batch=1,
                    width=width, num_layers=layers,
                    steps=1 if n <= 2 ** 16 else 0)
        r = training_bench.run_child(spec, timeout_s=limit + 120,
                                     env=CHILD_ENV)
        print(f"[tables] table 4 {pattern} n={n} {layers}x{width}: "
              f"{r.get('step_s', r['status'])}", flush=True)
        if r["status"] == "ok":  # the first step's footprint counts
          r["peak_mib"] = max(r["peak_mib"], r["first_peak_mib"])
        fits = (r["status"] == "ok" and r["peak_mib"] * MIB <= budget and
                r["step_s"] <= limit)
        if fits:
          r.update(n=n, layers=layers, width=width, first_step=n > 2 ** 16)
          seen[index] = r
          row[pattern] = r
          break
        if smallest:
          row[pattern] = {"status": r["status"] if r["status"] != "ok" else
                          f"over {limit:.0f} s"}
          alive = False
        else:
          index -= 1
  return results


# ----------------------------------------------------------------------------
# Plots and RESULTS.md.


def _pyplot():
  """matplotlib.pyplot without a display."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _style(ax, xlabel: str, ylabel: str, log2x: bool = False,
           legend: bool = False):
  """Labels, grid, optional log2 x axis and legend of one axes."""
  if log2x:
    ax.set_xscale("log", base=2)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  if legend:
    ax.legend(fontsize=7)


def _save(plt, fig, path: str) -> str:
  """Writes and closes a figure; returns path."""
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_curves(path: str, runs: dict, title: str, unit: str) -> str:
  """Held-out (solid) and training (dotted) curves of the three variants."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
  for pattern in PATTERNS:
    steps, bits = zip(*runs[pattern]["curve"])
    ax.plot(steps, bits, marker="o", markersize=3, label=f"{pattern} (valid)")
    steps, bits = zip(*runs[pattern]["train_curve"])
    ax.plot(steps, bits, linestyle=":", color=ax.lines[-1].get_color(),
            label=f"{pattern} (train)")
  ax.set_title(title, fontsize=9)
  _style(ax, "training step", unit, legend=True)
  return _save(plt, fig, path)


def table3_results(t3: dict) -> list:
  """(label, `context_sweep` result) of each sweep of a Table 3 result: all
  held-out segments, and those inside one file, in windows of c bytes and in
  full windows, when measured."""
  results = [("all segments", t3)]
  for key, label in (("within_file", "within one file"),
                     ("within_file_full", "within one file, full windows")):
    if key in t3:
      results.append((label, t3[key]))
  return results


def table3_sweeps(t3: dict) -> list:
  """(label, bits per context) of each sweep of a Table 3 result."""
  return [(label, [r["bits"][str(c)] for c in t3["contexts"]])
          for label, r in table3_results(t3)]


def table3_changes(result: dict, contexts: list) -> list:
  """(context before, context, change in bits, its paired standard error or
  None where not measured) for each step of a Table 3 sweep."""
  se = result.get("step_se", {})
  return [(before, c, result["bits"][str(c)] - result["bits"][str(before)],
           se.get(str(c))) for before, c in zip(contexts, contexts[1:])]


def table3_steps_markdown(t3: dict) -> list:
  """Lines of a table of each sweep's change from one context to the next,
  with its paired standard error; none for results measured without."""
  results = table3_results(t3)
  if not all("step_se" in r for _, r in results):
    return []
  segments = t3["scored_bytes"] // t3["scored"]
  lines = ["", f"Change from the context before, with its standard error "
           f"over the {segments} segments (paired: both contexts score the "
           f"same bytes):", "",
           "| contexts | " + " | ".join(label for label, _ in results) +
           " |", "|---|" + "---:|" * len(results)]
  columns = [table3_changes(r, t3["contexts"]) for _, r in results]
  for steps in zip(*columns):
    before, c = steps[0][:2]
    cells = [f"{change:+.4f} ± {se:.4f}" for _, _, change, se in steps]
    lines.append(f"| {before:,} -> {c:,} | " + " | ".join(cells) + " |")
  return lines


def plot_table3(path: str, t3: dict) -> str:
  """Bits per byte against evaluation context, one line per sweep."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
  for label, bits in table3_sweeps(t3):
    ax.plot(t3["contexts"], bits, marker="o", label=label)
  ax.set_title("Table 3 in miniature: fixed pattern, held-out text",
               fontsize=9)
  _style(ax, "evaluation context (bytes)",
         "bits per byte (last 1/8 of each window)", log2x=True, legend=True)
  return _save(plt, fig, path)


def plot_table4(path: str, t4: dict) -> str:
  """Parameters and time per step of the chosen models against n."""
  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=110)
  for pattern in ("strided", "dense"):
    points = [(n, row[pattern]) for n, row in sorted(t4["rows"].items())
              if row.get(pattern, {}).get("status") == "ok"]
    if points:
      ns = [n for n, _ in points]
      left.plot(ns, [r["params"] for _, r in points], marker="o",
                label=pattern)
      right.plot(ns, [r["step_s"] for _, r in points], marker="o",
                 label=pattern)
  for ax, label in ((left, "parameters of the largest model"),
                    (right, "seconds per training step")):
    ax.set_yscale("log")
    _style(ax, "context n", label, log2x=True, legend=True)
  fig.suptitle("Table 4 in miniature: longest sequences, recompute on",
               fontsize=9)
  return _save(plt, fig, path)


def seconds(value: float) -> str:
  """Seconds with about three significant digits."""
  return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def ngram_sentence(baselines: dict, models: dict) -> str:
  """Where models' bits stand among the byte n-gram baselines.

  Args:
    baselines: {order (int or its JSON string): bits per byte}.
    models: {name: held-out bits per byte}.

  Returns:
    A sentence for RESULTS.md.
  """
  bits = {int(order): b for order, b in baselines.items()}
  orders = sorted(bits)
  places = []
  for name, value in models.items():
    beaten = [o for o in orders if bits[o] > value]
    if not beaten:
      place = "worse than every one of them"
    elif len(beaten) == len(orders):
      place = "better than every one of them"
    else:
      place = (f"between the {max(beaten) - 1}- and {max(beaten)}-byte "
               f"context models")
    places.append(f"{name} ({value:.4f}): {place}")
  return ("For scale, byte n-gram models fitted on the training bytes "
          f"(add-{ngram.ALPHA} smoothing, `benchmarks/ngram.py`) score " +
          " / ".join(f"{bits[o]:.4f}" for o in orders) +
          " held-out bits per byte with " +
          " / ".join(str(o - 1) for o in orders) +
          " bytes of context. " + "; ".join(places) + ".")


def is_monotone(values: list) -> bool:
  """Whether values never increase."""
  return all(b <= a for a, b in zip(values, values[1:]))


# A rise of the Table 3 curve counts as measured when it is over this many
# of its paired standard errors; a smaller one is within the noise.
RISE_STANDARD_ERRORS = 2.0


def table3_rises(result: dict, contexts: list) -> list:
  """Where a Table 3 sweep's bits rise from one context to the next.

  Args:
    result: a `context_sweep` result (bits, and step_se where measured).
    contexts: the sweep's contexts, ascending.

  Returns:
    The `table3_changes` entries whose change is positive, each with a
    fifth item: whether the rise is over RISE_STANDARD_ERRORS standard
    errors (without one, every rise is).
  """
  return [(before, c, change, se,
           se is None or change > RISE_STANDARD_ERRORS * se)
          for before, c, change, se in table3_changes(result, contexts)
          if change > 0]


def table3_verdict(label: str, bits: list, rises: list) -> str:
  """'label yes (first -> last)' for a sweep without rises, else 'label no'
  with each rise (`table3_rises`), its standard error and whether it is
  within the noise."""
  span = f"{bits[0]:.4f} -> {bits[-1]:.4f}"
  if not rises:
    return f"{label} yes ({span})"
  steps = []
  for before, c, change, se, measured in rises:
    step = f"{before:,} -> {c:,} {change:+.4f}"
    if se is not None:
      step += (f" ± {se:.4f}" + ("" if measured else
               f", under {RISE_STANDARD_ERRORS:g} standard errors"))
    steps.append(step)
  return f"{label} no ({span}; rises {', '.join(steps)})"


def table2_markdown(title: str, runs: dict, unit: str, plot: str,
                    paper: str) -> list:
  """Table 2 rows for one data set."""
  model, train = runs["config"]["model"], runs["config"]["train"]
  data = runs["config"]["data"]
  dense = runs["dense"]
  lines = [f"### {title}", "",
           f"Model: {model['num_layers']} layers, width {model['width']}, "
           f"{model['num_heads']} heads, feed-forward x"
           f"{model['ff_multiplier']:g} and query-key x{model['qk_ratio']:g} "
           f"of the width, context {data['context']}, "
           f"batch {data['batch_size']}; {train['steps']} steps of AdamW "
           f"(lr {train['learning_rate']}, {train['warmup_steps']} warm-up "
           f"steps, cosine decay), seed {train['seed']}, float32, no "
           f"dropout. Patterns: block 32, merged heads, stride "
           f"{runs['stride']}, summary c=32 for fixed.", "",
           f"| attention | held-out {unit} | ms / step, median | mean | "
           f"dense / this (median) | interleaved ms / step | dense / this "
           f"(interleaved) | peak MiB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  timing = runs.get("interleaved")  # absent in runs made before it existed
  for pattern in PATTERNS:
    r = runs[pattern]
    median = r["median_ms_per_step"]
    paired = ("- | -" if timing is None else
              f"{timing['median_ms'][pattern]:,.0f} | "
              f"{timing['ratio'][pattern]:.2f}")
    lines.append(f"| {pattern} | {r['bits']:.4f} | {median:,.0f} | "
                 f"{r['ms_per_step']:,.0f} | "
                 f"{dense['median_ms_per_step'] / median:.2f} | {paired} | "
                 f"{r['peak_mib']:,.0f} |")
  if timing is not None:
    lines += ["", f"Interleaved: the three models in one process, after "
              f"{timing['warmup']} warm-up steps each, take turns for "
              f"{timing['rounds']} rounds of one training step each "
              f"(`train_on_batch`, the trainer's compiled step); the median "
              f"step, and the median over the rounds of dense's step over "
              f"the pattern's in the same round. The training runs take one "
              f"pattern after another for minutes each, so a slow spell of "
              f"the VM can fall on one of them; the interleaved steps share "
              f"it."]
  lines += ["", f"![learning curves]({plot})", "", paper, ""]
  return lines


def speed_sentence(runs: dict) -> str:
  """How much less time a fixed step takes than a dense one."""
  ratio = (runs["dense"]["median_ms_per_step"] /
           runs["fixed"]["median_ms_per_step"])
  text = f"{ratio:.2f}x less time per step in the training runs"
  if "interleaved" in runs:
    timing = runs["interleaved"]
    low, high = timing["ratio_quartiles"]["fixed"]
    text += (f", {timing['ratio']['fixed']:.2f}x interleaved (quartiles of "
             f"the {timing['rounds']} rounds {low:.2f}-{high:.2f})")
  return text


def render(meta: dict, sections: dict, plots: dict) -> str:
  """docs/RESULTS.md."""
  lines = ["# The paper's tables in miniature", "",
           "Produced by `python -m benchmarks.paper_tables`; do not edit by "
           "hand.", "",
           f"- Command: `{meta['command']}` (a table at a time: "
           f"`--tables NAME`)",
           "- Runs, a table at a time:"] + [
               f"  - {name} {r['date']} ({r['minutes']:.0f} min"
               + (f"; scored again {r['rescored']['date']}, "
                  f"{r['rescored']['minutes']:.0f} min" if "rescored" in r
                  else "") + f"). Machine: {r['machine']}"
               for name, r in sections["runs"].items()] + [
           "- TensorFlow children run with TF_ENABLE_ONEDNN_OPTS=1 for every "
           "variant; time per step is the trainer's median (and mean) over "
           "all steps but the first of each checkpoint interval (the median "
           "is not moved by the stalls of this shared VM); peak memory is the "
           "training process's peak resident set (VmHWM), evaluation "
           "included.", ""]
  if "manifest" in sections:
    m = sections["manifest"]
    lines += [f"Default corpus: the .py files of Python {m['python']}'s "
              f"standard library ({m['root']}), split by file: "
              f"{m['train_files']} files / {m['train_bytes']:,} bytes train, "
              f"{m['valid_files']} files / {m['valid_bytes']:,} bytes valid "
              f"({m['rule']}" + (
                  "" if m.get("separator") is None else
                  f"; each file after a separator byte, "
                  f"0x{m['separator']:02X}, counted in the bytes") +
              f"); the file list and checksums are in "
              f"[{meta['manifest']}]({meta['manifest']}).", ""]
  lines += ["## Table 2: dense vs sparse attention at equal steps", ""]
  if "text" in sections:
    t = sections["text"]
    gap = t["fixed"]["bits"] - t["dense"]["bits"]
    lines += table2_markdown(
        "Text: Python standard library", t, "bits per byte", plots["text"],
        f"Fixed vs dense: {gap:+.4f} bits per byte, {speed_sentence(t)}. "
        f"The paper (enwik8, 30 layers, context 12,288): dense "
        f"1.00 / fixed 0.99 / strided 1.13 bits per byte at 1.31 / 0.55 / "
        f"0.35 s per iteration, i.e. fixed 2.4x faster than dense and as "
        f"good; strided, made for periodic data, is worse on text.")
  if "enwik8" in sections:
    lines += table2_markdown(
        "Text: enwik8", sections["enwik8"], "bits per byte", plots["enwik8"],
        "The paper: dense 1.00 / fixed 0.99 / strided 1.13 bits per byte.")
  if "images" in sections:
    lines += table2_markdown(
        "Images: scikit-learn digits as 32x32x3 CIFAR-10 records",
        sections["images"], "bits per dim", plots["images"],
        "Data: benchmarks/digits_to_cifar.py (1,797 handwritten digits, "
        "bilinear "
        "8x8 -> 32x32, grey repeated in the three channels; 297 held out). "
        "The paper (CIFAR-10): dense 2.82 / fixed 2.85 / strided 2.80 bits "
        "per dim at 0.54 / 0.47 / 0.38 s per iteration: on images strided "
        "is the best and fastest. Our digits are far more predictable than "
        "CIFAR-10 photographs, so the absolute bits per dim are much lower.")
  if "table3" in sections:
    t3 = sections["table3"]
    sweeps = table3_sweeps(t3)
    lines += ["## Table 3: held-out bits per byte vs evaluation context", "",
              f"A fixed-pattern text model of Table 2's configuration "
              f"(training context {t3['training_context']}) trained for "
              f"{t3['run']['steps']} steps of {t3['batch']} windows, to "
              f"{t3['run']['bits']:.4f} "
              f"held-out bits per byte. Each scored byte is predicted once "
              f"per context: a window of c bytes ends just before it and "
              f"only the last {t3['scored']} positions of each window are "
              f"scored, so every context scores the same bytes.", "",
              f"- All segments: {t3['scored_bytes']:,} bytes, segment ends "
              f"spread evenly over the held-out bytes. " +
              ("The files are concatenated without a separator, so a long "
               "window may reach back into the file before."
               if t3.get("separator") is None else
               f"The files are concatenated, each after a separator byte "
               f"(0x{t3['separator']:02X}), so a long window may reach back "
               f"past it into the file before.")]
    if "within_file" in t3:
      lines += [f"- Within one file: {t3['within_file']['scored_bytes']:,} "
                f"bytes, segment ends spread evenly over those whose "
                f"{t3['training_context']:,}-byte window lies inside one "
                f"held-out file, so every byte a longer context adds is of "
                f"the scored bytes' own file, as in one long text like "
                f"enwik8."]
    if "within_file_full" in t3:
      n = t3["training_context"]
      lines += [f"- Within one file, full windows: the same bytes, read in "
                f"windows of {n:,} bytes whose last c bytes are their own "
                f"context and whose first {n:,}-c are another segment's" +
                ("" if t3["within_file_full"].get("separator") is None else
                 ", the last of them replaced by the separator byte") +
                f", like a training window that crosses into a new file. In "
                f"the columns before, a longer context also moves the "
                f"scored bytes to later positions and gives them more keys; "
                f"here they keep the window's last {t3['scored']} positions "
                f"and only how much of the window is their own text "
                f"differs."]
    lines += ["", "| evaluation context | " + " | ".join(
        label for label, _ in sweeps) + " |", "|---:|" + "---:|" * len(sweeps)]
    lines += [f"| {c:,} | " + " | ".join(f"{bits[i]:.4f}" for _, bits in
                                          sweeps) + " |"
              for i, c in enumerate(t3["contexts"])]
    lines += table3_steps_markdown(t3)
    rises = {label: table3_rises(r, t3["contexts"])
             for label, r in table3_results(t3)}
    lines += ["", f"![table 3]({plots['table3']})", "",
              "Monotone non-increasing: " + "; ".join(
                  table3_verdict(label, bits, rises[label])
                  for label, bits in sweeps) +
              ". The paper (enwik8): 0.9952 at 6,144 bytes of context, "
              "0.9908 at 12,160: more context, fewer bits."]
    if "within_file_full" in t3:
      lines[-1] += (" The paper's contexts are minimum contexts within "
                    "windows of its full training length (12,288 bytes), so "
                    "its condition is that of the full windows here: the "
                    "model always reads as many bytes as it was trained on, "
                    "and only how many of them are the scored bytes' own "
                    "preceding text varies.")
    if "ngram_bits" in t3:
      models = {"The Table 3 model": t3["run"]["bits"]}
      if "text" in sections:
        models.update({f"Table 2's {p}": sections["text"][p]["bits"]
                       for p in PATTERNS})
      lines += ["", ngram_sentence(t3["ngram_bits"], models)]
      best = min(t3["ngram_bits"].values())
      if t3["run"]["bits"] > best:
        lines[-1] += (" The model has not yet learned all that a few bytes "
                      "of context give a count model: on this budget the "
                      "curve measures an undertrained model's context use, "
                      "not the reach of its pattern.")
    # The rises over the noise, per sweep.
    measured = {label: [rise for rise in r if rise[-1]]
                for label, r in rises.items()}
    full_label = "within one file, full windows"
    if measured.get(full_label) == [] and measured.get("within one file"):
      noise = ("" if not rises[full_label] else
               f" by more than {RISE_STANDARD_ERRORS:g} standard errors")
      lines += ["", "In windows of c bytes the longest contexts cost bits; "
                "in full windows, with the scored bytes' positions held, "
                f"no more of their own context costs bits{noise}. So the "
                "rise is what the later positions a longer window gives "
                "the scored bytes cost this model, not their longer "
                "context."]
    if not all(is_monotone(bits) for _, bits in sweeps):
      lines += ["", "Where more context costs bits, "
                "`python -m benchmarks.context_use`, given this run and "
                "Table 2's "
                "text runs, shows whether the models use their context at "
                "all: its sweeps in windows of c bytes and in full windows "
                "and the per-position profile of each model, the dense one "
                "included (BENCHMARKS.md, \"Context use of trained "
                "text models\")."]
    lines += [""]
  if "table4" in sections:
    t4 = sections["table4"]
    lines += ["## Table 4: longest sequences, one training step", "",
              f"Models of the ladder {meta['ladder']} (layers x width, 4 "
              f"heads, FF x4, batch 1, recompute on). For each n the "
              f"largest that steps within the memory budget "
              f"({t4['budget_gib']:.1f} GiB, 80% of RAM) and "
              f"{meta['time_s']:.0f} s; the smallest need only complete "
              f"(within {meta['last_s']:.0f} s). Strided: l = sqrt(n), "
              f"block min(64, l). Dense: the same fused op over every causal "
              f"tile (linear memory, quadratic time). Steps for n <= 65,536 "
              f"are the second step; above, the first (tracing included). "
              f"Peak MiB: the first step's peak resident memory above the "
              f"process's before it.",
              "", "| n | strided model | params | s / step | peak MiB | "
              "dense model | params | s / step | peak MiB |",
              "|---:|---|---:|---:|---:|---|---:|---:|---:|"]
    for n, row in sorted(t4["rows"].items()):
      cells = []
      for pattern in ("strided", "dense"):
        r = row.get(pattern)
        if r is None:
          cells += ["–"] * 4
        elif r["status"] != "ok":
          cells += [r["status"], "–", "–", "–"]
        else:
          # Runs without first_peak_mib measured the second step's peak
          # only, which the allocator's reuse hides: not shown.
          peak = (f"{r['peak_mib']:,.0f}" if r.get("first_step") or
                  "first_peak_mib" in r else "n/a")
          cells += [f"{r['layers']} x {r['width']}", f"{r['params']:,}",
                    seconds(r["step_s"]), peak]
      lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    lines += ["", f"![table 4]({plots['table4']})", "",
              "The paper trained strided models on sequences of 65,536 to "
              "1,048,576 bytes on V100s, shrinking the model as the sequence "
              "grew (a 3M-parameter model at 1,048,576, 2.99 bits per byte); "
              "here the same trade-off appears on a 2-core CPU.", ""]
  return "\n".join(lines)


def write_results(path: str, sections: dict):
  """Writes results.json through a temporary file, so an interrupted
  write leaves the previous one whole."""
  with open(path + ".tmp", "w") as f:
    json.dump(sections, f, indent=1, default=str)
  os.replace(path + ".tmp", path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes (about a minute), for tests")
  parser.add_argument("--output-dir", help="where RESULTS.md and the plots "
                      "go (default: docs/; required with --quick)")
  parser.add_argument("--runs-dir", help="training runs (default: "
                      "<output-dir>/runs with --quick, runs/paper_tables "
                      "otherwise)")
  parser.add_argument("--tables", default=",".join(TABLES),
                      help="comma-separated subset of "
                      f"{','.join(TABLES)}; the others keep their results "
                      "from the output directory's results.json (an empty "
                      "list only redraws RESULTS.md and the plots)")
  parser.add_argument("--rescore-table3", action="store_true",
                      help="score Table 3 again on the model its last run "
                      "trained (in results.json and the runs directory) "
                      "instead of training it again")
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
    return 0
  if args.quick and not args.output_dir:
    parser.error("--quick needs --output-dir (it must not overwrite docs/)")
  tables = set(filter(None, args.tables.split(",")))
  unknown = tables - set(TABLES)
  if unknown:
    parser.error(f"--tables: unknown {sorted(unknown)}; choose from "
                 f"{','.join(TABLES)}")
  s = QUICK if args.quick else FULL
  out = os.path.abspath(args.output_dir or os.path.join(REPO_ROOT, "docs"))
  runs_root = os.path.abspath(args.runs_dir or (
      os.path.join(out, "runs") if args.quick else
      os.path.join(REPO_ROOT, "runs", "paper_tables")))
  results_path = os.path.join(out, "results.json")
  if not tables and not os.path.exists(results_path):
    parser.error(f"--tables is empty (redraw only) but {results_path} does "
                 f"not exist")
  trained = None  # the Table 3 run to score again
  if args.rescore_table3:
    if "table3" in tables and os.path.exists(results_path):
      with open(results_path) as f:
        trained = json.load(f).get("table3", {}).get("run")
    if not trained or not os.path.exists(
        os.path.join(trained["output_dir"], "model.keras")):
      parser.error("--rescore-table3 needs --tables with table3 and a "
                   f"trained Table 3 run in {results_path}")
  os.makedirs(out, exist_ok=True)
  sections = {}
  if tables != set(TABLES) and os.path.exists(results_path):
    with open(results_path) as f:
      sections = json.load(f)  # the tables not run now keep their results
    if "table4" in sections:  # JSON keys are strings; n is an int
      rows = sections["table4"]["rows"]
      sections["table4"]["rows"] = {int(n): row for n, row in rows.items()}
  sections.setdefault("runs", {})
  plots = {}
  manifest = "results_stdlib_manifest.json"
  for table in TABLES:
    if table not in tables:
      continue
    start = time.monotonic()
    if table == "text":
      sections["manifest"] = python_child(
          "manifest", {"path": os.path.join(out, manifest)})
      sections["text"] = table2(s, "text", runs_root, path=s.text_path)
      enwik8 = os.environ.get("ST_ENWIK8")
      if enwik8:
        sections["enwik8"] = table2(s, "enwik8", runs_root, path=enwik8)
      else:
        sections.pop("enwik8", None)
    elif table == "table3":
      sections["table3"] = table3(s, runs_root, path=s.text_path,
                                  trained=trained)
    elif table == "images":
      digits = os.path.join(runs_root, "digits-cifar")
      digits_to_cifar.write_dataset(
          digits, **({"test": 16, "limit": s.image_limit} if s.image_limit
                     else {}))
      sections["images"] = table2(s, "cifar10", runs_root, path=digits,
                                  stride=96)
    else:
      sections["table4"] = table4(s)
    run = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "minutes": (time.monotonic() - start) / 60,
           "machine": common.machine_description()}
    if table == "table3" and trained:  # the training run's entry stays
      sections["runs"][table]["rescored"] = run
    else:
      sections["runs"][table] = run
    write_results(results_path, sections)  # a later failure keeps this one
  # Plots are drawn from the results, so kept tables keep theirs too.
  for name, title, unit in (
      ("text", "Python stdlib text", "bits per byte"),
      ("enwik8", "enwik8", "bits per byte"),
      ("images", "digits as CIFAR-10 records", "bits per dim")):
    if name in sections:
      plots[name] = plot_curves(
          os.path.join(out, f"results_table2_{name}.png"), sections[name],
          f"Table 2 in miniature: {title}", unit)
  if "table3" in sections:
    plots["table3"] = plot_table3(os.path.join(out, "results_table3.png"),
                                  sections["table3"])
  if "table4" in sections:
    plots["table4"] = plot_table4(os.path.join(out, "results_table4.png"),
                                  sections["table4"])
  # Markdown links are relative to RESULTS.md.
  plots = {k: os.path.basename(v) for k, v in plots.items()}
  meta = {"command": common.command("paper_tables",
                                    ["--quick"] if args.quick else []),
          "manifest": manifest,
          "ladder": ", ".join(f"{l} x {w}" for l, w in s.table4_ladder),
          "time_s": s.table4_time_s, "last_s": s.table4_last_s}
  text = render(meta, sections, plots)
  with open(os.path.join(out, "RESULTS.md"), "w") as f:
    f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
