"""Does a trained byte model use its context? Held-out bits by position.

For each trained text run (an output directory of `st_keras.train`), two
measurements on the run's held-out bytes:

1. the Table 3 sweep (`st_keras.evaluate.context_sweep`): the same bytes
   scored with contexts from 1/8 of the training context to all of it;
2. the same sweep in full windows (`context_sweep(full_windows=True)`):
   the scored bytes keep the window's last positions and only how much of
   the window is their own context differs. Where the first sweep rises
   and this one does not, the rise is the scored bytes' later positions,
   not their longer context;
3. the position profile (`st_keras.evaluate.position_profile`): mean bits
   per byte over bands of positions of
   whole training-length windows, the same windows for every run. A model
   that uses long context predicts later positions better; one that does
   not is flat after the first band, and its profile follows the content of
   the windows, so models that differ only in attention have alike profiles.

Usage:
  python -m benchmarks.context_use RUN [RUN ...] [--segments 256]
      [--windows 256] [--band 512] [--output BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks import common
from st_keras import evaluate

SECTION_BEGIN = "<!-- context_use:begin -->"
SECTION_END = "<!-- context_use:end -->"


def describe(run_dir: str) -> dict:
  """Name, attention pattern, steps and context of a run.

  Args:
    run_dir: a trained run (config.json and summary.json).

  Returns:
    {'name', 'pattern', 'steps', 'context'}.
  """
  with open(os.path.join(run_dir, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(run_dir, "summary.json")) as f:
    steps = json.load(f)["steps"]
  return {"name": os.path.basename(os.path.normpath(run_dir)),
          "pattern": config["model"]["pattern"], "steps": steps,
          "context": config["data"]["context"]}


def measure(runs: list, segments: int, windows: int, band: int) -> dict:
  """The sweep and the profile of every run.

  Args:
    runs: trained text run directories of one training context.
    segments: held-out segments of the sweeps.
    windows: windows of the position profile.
    band: positions per band of the profile.

  Returns:
    {'runs': [describe(run) + 'sweep', 'full': {context: bits},
               'profile': [bits]],
     'contexts', 'scored', 'band', 'segments', 'windows'}.
  """
  described = [describe(run) for run in runs]
  context = described[0]["context"]
  if any(d["context"] != context for d in described):
    raise ValueError("the runs must share one training context, got "
                     f"{[d['context'] for d in described]}")
  scored = context // 8
  contexts = [scored * m for m in (1, 2, 3, 4, 6, 8)]
  for run, d in zip(runs, described):
    print(f"[context_use] {d['name']} ...", flush=True)
    loaded = evaluate.load_run(run)
    model, valid = loaded.model, loaded.valid
    d["profile"] = evaluate.position_profile(model, valid, windows,
                                             band)  # checks band
    for key, full in (("sweep", False), ("full", True)):
      d[key] = evaluate.context_sweep(
          model, valid, contexts, scored, segments, full_windows=full,
          separator=loaded.config.data.separator)["bits"]
  return {"runs": described, "contexts": contexts, "scored": scored,
          "band": band, "segments": segments, "windows": windows}


def sweep_rows(result: dict, key: str) -> list:
  """Markdown rows of one sweep of every run.

  Args:
    result: a `measure` result.
    key: 'sweep' (windows of c bytes) or 'full' (full windows).

  Returns:
    One '| context | bits | ... |' line per context.
  """
  return [f"| {c:,} | " + " | ".join(
      f"{r[key][str(c)]:.4f}" for r in result["runs"]) + " |"
          for c in result["contexts"]]


def render(result: dict, command: str, minutes: float) -> str:
  """The BENCHMARKS.md section of one measurement.

  Args:
    result: a `measure` result.
    command: the command that made it.
    minutes: its wall time.

  Returns:
    The section, markers included.
  """
  runs = result["runs"]
  names = " | ".join(f"{r['name']} ({r['pattern']}, {r['steps']} steps)"
                     for r in runs)
  rule = "|---:|" + "---:|" * len(runs)
  lines = [
      SECTION_BEGIN, "## Context use of trained text models", "",
      f"- Command: `{command}`",
      f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
      f"wall time {minutes:.1f} min",
      f"- Machine: {common.machine_description()}", "",
      f"Table 3's sweep: {result['segments']} held-out segments, the last "
      f"{result['scored']} bytes of each scored with every context "
      "(bits per byte), in windows of c bytes:", "",
      f"| context | {names} |", rule]
  lines += sweep_rows(result, "sweep")
  n = runs[0]["context"]
  lines += [
      "", f"The same sweep in full windows: {n:,} bytes whose last c are "
      f"the scored bytes' own context and whose first {n:,}-c are another "
      f"segment's, so every context scores the same bytes at the same, "
      f"last {result['scored']} positions:", "",
      f"| context | {names} |", rule]
  lines += sweep_rows(result, "full")
  lines += [
      "", f"Position profile: {result['windows']} whole windows, mean bits "
      f"per byte of each band of {result['band']} positions:", "",
      f"| positions | {names} |", rule]
  band = result["band"]
  for b in range(len(runs[0]["profile"])):
    lines.append(f"| {b * band:,}-{(b + 1) * band - 1:,} | " + " | ".join(
        f"{r['profile'][b]:.4f}" for r in runs) + " |")
  return "\n".join(lines + ["", SECTION_END, ""])


def main(argv=None) -> int:
  """Measures the runs and writes the section; returns the exit status."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="+", help="trained text run directories")
  parser.add_argument("--segments", type=int, default=256,
                      help="held-out segments of the sweep")
  parser.add_argument("--windows", type=int, default=256,
                      help="windows of the position profile")
  parser.add_argument("--band", type=int, default=512,
                      help="positions per band of the profile")
  parser.add_argument("--output", default=common.BENCHMARKS_MD,
                      help="Markdown file whose context-use section is "
                      "replaced")
  args = parser.parse_args(argv)
  for name in ("segments", "windows", "band"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be positive, got {getattr(args, name)}")
  missing = [run for run in args.runs
             if not os.path.exists(os.path.join(run, "model.keras"))]
  if missing:
    parser.error(f"not trained runs (no model.keras): {missing}")
  start = time.monotonic()
  try:
    result = measure(args.runs, args.segments, args.windows, args.band)
  except ValueError as e:
    parser.error(str(e))
  command = common.command(
      "context_use",
      [os.path.relpath(run, common.REPO_ROOT) for run in args.runs] +
      ["--segments", str(args.segments), "--windows", str(args.windows),
       "--band", str(args.band)])
  section = render(result, command, (time.monotonic() - start) / 60)
  common.write_section(args.output, section, SECTION_BEGIN, SECTION_END)
  print(section)
  return 0


if __name__ == "__main__":
  sys.exit(main())
