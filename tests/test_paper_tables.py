"""benchmarks/paper_tables.py --quick end to end, and the digits converter."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import common
from benchmarks import digits_to_cifar
from benchmarks import paper_tables
from st_keras.data import images

REPO = common.REPO_ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bilinear_upsample(image, side):
  """Independent reference: half-pixel-centred bilinear, edges clamped."""
  n = image.shape[0]
  src = np.clip((np.arange(side) + 0.5) * n / side - 0.5, 0, n - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n - 1)
  w = src - lo
  rows = image[lo] * (1 - w)[:, None] + image[hi] * w[:, None]
  return rows[:, lo] * (1 - w) + rows[:, hi] * w


def test_digits_become_cifar_records(tmp_path):
  from sklearn.datasets import load_digits
  info = digits_to_cifar.write_dataset(str(tmp_path), test=7, limit=40)
  assert info == {"train": 33, "test": 7, "path": str(tmp_path)}
  train, train_labels = images.read_cifar10(str(tmp_path), "train")
  test, test_labels = images.read_cifar10(str(tmp_path), "test")
  assert train.shape == (33, 3072) and test.shape == (7, 3072)
  # Model order is (row, column, channel): the three channels are equal.
  pictures = np.concatenate([test, train]).reshape(-1, 32, 32, 3)
  assert (pictures == pictures[..., :1]).all()
  digits = load_digits()
  order = np.random.default_rng(digits_to_cifar.SEED).permutation(
      len(digits.images))[:40]
  np.testing.assert_array_equal(np.concatenate([test_labels, train_labels]),
                                digits.target[order])
  for picture, index in zip(pictures, order):
    expected = bilinear_upsample(digits.images[index] * 255.0 / 16.0, 32)
    assert np.abs(picture[..., 0] - expected).max() <= 2.0


def test_digits_converter_rejects_a_bad_split(tmp_path):
  with pytest.raises(ValueError, match="test must be in 1..9"):
    digits_to_cifar.write_dataset(str(tmp_path), test=10, limit=10)
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.digits_to_cifar",
       "--output", str(tmp_path), "--test", "0"],
      capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 2 and "test must be in" in result.stderr


def run_tables(*args, timeout=900):
  """Runs benchmarks/paper_tables.py with `args`; returns the process."""
  return subprocess.run(
      [sys.executable, "-m", "benchmarks.paper_tables"] + list(args),
      capture_output=True, text=True, cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def quick_tables(tmp_path_factory):
  out = tmp_path_factory.mktemp("tables")
  result = run_tables("--quick", "--output-dir", str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out / "results.json") as f:
    return out, json.load(f), (out / "RESULTS.md").read_text()


@pytest.mark.slow
def test_quick_tables_write_every_table(quick_tables):
  out, results, markdown = quick_tables
  for heading in ("## Table 2", "### Text: Python standard library",
                  "### Images: scikit-learn digits", "## Table 3",
                  "## Table 4", "Command: `python -m "
                  "benchmarks.paper_tables --quick`", "Machine: "):
    assert heading in markdown
  for name in ("results_table2_text.png", "results_table2_images.png",
               "results_table3.png", "results_table4.png"):
    with open(out / name, "rb") as f:
      assert f.read(8) == PNG_MAGIC, name
    assert f"]({name})" in markdown
  # Each table names the machine it ran on.
  machine = common.machine_description()
  for name, run in results["runs"].items():
    assert run["machine"] == machine, name
    assert f"  - {name} {run['date']} " in markdown
  assert f"Machine: {machine}" in markdown


@pytest.mark.slow
def test_quick_table2_trains_all_three_patterns(quick_tables):
  _, results, markdown = quick_tables
  for kind in ("text", "images"):
    runs = results[kind]
    for pattern in ("dense", "fixed", "strided"):
      r = runs[pattern]
      # Trained from 8 bits (uniform bytes) and timed.
      assert 0 < r["bits"] < 8.0 and r["ms_per_step"] > 0
      assert r["median_ms_per_step"] > 0
      assert r["peak_mib"] > 100
      steps = [step for step, _ in r["curve"]]
      assert steps == sorted(steps) and steps[-1] == r["steps"]
      assert all(math.isfinite(b) for _, b in r["curve"] + r["train_curve"])
      assert f"| {pattern} | {r['bits']:.4f} |" in markdown
      # The run trained the paper's half-size projections.
      with open(os.path.join(r["output_dir"], "config.json")) as f:
        model = json.load(f)["model"]
      assert (model["ff_multiplier"], model["qk_ratio"]) == (2.0, 0.5)
    assert runs["config"]["model"]["width"] == 64
    # Interleaved timing: every pattern stepped in each round.
    timing = runs["interleaved"]
    assert timing["rounds"] >= 2
    for pattern in ("dense", "fixed", "strided"):
      ratio = timing["ratio"][pattern]
      low, high = timing["ratio_quartiles"][pattern]
      assert timing["median_ms"][pattern] > 0 and low <= ratio <= high
      assert f"| {timing['median_ms'][pattern]:,.0f} | {ratio:.2f} |" in (
          markdown)
    assert timing["ratio"]["dense"] == 1.0
  timing = results["text"]["interleaved"]
  assert (f"{timing['ratio']['fixed']:.2f}x interleaved (quartiles of the "
          f"{timing['rounds']} rounds ") in markdown
  assert "feed-forward x2 and query-key x0.5 of the width" in markdown


def test_table2_markdown_reads_runs_without_interleaved_timing():
  run = {"bits": 3.5, "median_ms_per_step": 300.0, "ms_per_step": 310.0,
         "peak_mib": 1000.0}
  runs = {"config": {"model": {"num_layers": 4, "width": 128,
                               "num_heads": 4, "ff_multiplier": 2.0,
                               "qk_ratio": 0.5},
                     "data": {"context": 4096, "batch_size": 1},
                     "train": {"steps": 600, "learning_rate": 1e-3,
                               "warmup_steps": 60, "seed": 0}},
          "stride": 128, "dense": dict(run, median_ms_per_step=600.0),
          "fixed": run, "strided": run}
  lines = paper_tables.table2_markdown("T", runs, "bits", "p.png", "")
  assert "| fixed | 3.5000 | 300 | 310 | 2.00 | - | - | 1,000 |" in lines
  assert paper_tables.speed_sentence(runs) == (
      "2.00x less time per step in the training runs")
  runs["interleaved"] = {"rounds": 4, "warmup": 1,
                         "median_ms": {"dense": 500.0, "fixed": 200.0,
                                       "strided": 250.0},
                         "ratio": {"dense": 1.0, "fixed": 2.5,
                                   "strided": 2.0},
                         "ratio_quartiles": {"dense": [1.0, 1.0],
                                             "fixed": [2.4, 2.6],
                                             "strided": [1.9, 2.1]}}
  lines = paper_tables.table2_markdown("T", runs, "bits", "p.png", "")
  assert "| fixed | 3.5000 | 300 | 310 | 2.00 | 200 | 2.50 | 1,000 |" in lines
  assert paper_tables.speed_sentence(runs) == (
      "2.00x less time per step in the training runs, 2.50x interleaved "
      "(quartiles of the 4 rounds 2.40-2.60)")


def test_interleaved_step_times_pairs_the_rounds(monkeypatch):
  # dense's second round is slow, and so is fixed's: paired, the ratio
  # stays 2 in every round.
  times = {"dense": [0.4, 0.8, 0.4], "fixed": [0.2, 0.4, 0.2]}
  calls = []
  def fake_child(kind, spec, timeout_s=3600):
    calls.append((kind, spec))
    return {"times_s": times}
  monkeypatch.setattr(paper_tables, "python_child", fake_child)
  result = paper_tables.interleaved_step_times({"dense": {}, "fixed": {}},
                                               rounds=3, warmup=2)
  assert calls == [("step_time", {"configs": {"dense": {}, "fixed": {}},
                                  "rounds": 3, "warmup": 2})]
  assert result["ratio"] == {"dense": 1.0, "fixed": 2.0}
  assert result["ratio_quartiles"]["fixed"] == [2.0, 2.0]
  assert result["median_ms"] == {"dense": 400.0, "fixed": 200.0}
  with pytest.raises(ValueError, match="rounds must be at least 2"):
    paper_tables.interleaved_step_times({"dense": {}}, rounds=1, warmup=0)


@pytest.mark.slow
def test_quick_table3_scores_the_same_bytes(quick_tables):
  _, results, markdown = quick_tables
  t3 = results["table3"]
  assert t3["contexts"] == [64, 128, 192, 256, 384, 512]
  assert t3["scored_bytes"] == 16 * 64
  # Its own model: the fixed pattern, trained for table3_steps of
  # table3_batch windows.
  assert t3["run"]["steps"] == 8 and t3["run"]["output_dir"].endswith(
      "text_fixed_table3")
  with open(os.path.join(t3["run"]["output_dir"], "config.json")) as f:
    config = json.load(f)
  assert config["model"]["pattern"] == "fixed"
  assert config["data"]["batch_size"] == t3["batch"] == 2
  # The quick text (a directory of files) is read with the separator.
  assert config["data"]["separator"] == t3["separator"] == 0x1C
  assert "each after a separator byte (0x1C)" in markdown
  assert f"trained for 8 steps of 2 windows, to {t3['run']['bits']:.4f}" \
      in markdown
  assert all(0 < t3["bits"][str(c)] < 8.0 for c in t3["contexts"])
  # Different contexts give different predictions of the same bytes.
  assert len({round(v, 6) for v in t3["bits"].values()}) > 1
  assert "Monotone non-increasing: " in markdown
  # The same bytes again, from segments whose longest window is one file's.
  within = t3["within_file"]
  assert within["scored_bytes"] == 16 * 64
  assert all(0 < within["bits"][str(c)] < 8.0 for c in t3["contexts"])
  # And in full windows: at the full context, the same windows.
  full = t3["within_file_full"]
  assert full["scored_bytes"] == 16 * 64
  assert full["bits"]["512"] == pytest.approx(within["bits"]["512"],
                                              rel=1e-6)
  assert any(full["bits"][str(c)] != within["bits"][str(c)]
             for c in t3["contexts"][:-1])
  assert f"| 512 | {t3['bits']['512']:.4f} | " \
      f"{within['bits']['512']:.4f} | {full['bits']['512']:.4f} |" \
      in markdown
  assert "within one file, full windows" in markdown
  # Another segment's bytes end in the separator, as at a file crossing in
  # training.
  assert full["separator"] == 0x1C
  assert "the last of them replaced by the separator byte" in markdown
  # Each change between neighbouring contexts carries its standard error.
  for sweep in (t3, within, full):
    assert sorted(sweep["step_se"], key=int) == [
        str(c) for c in t3["contexts"][1:]]
    assert all(0 < se < 1 for se in sweep["step_se"].values())
  row = " | ".join(f"{r['bits']['128'] - r['bits']['64']:+.4f} ± "
                   f"{r['step_se']['128']:.4f}" for r in (t3, within, full))
  assert "over the 16 segments (paired" in markdown
  assert f"| 64 -> 128 | {row} |" in markdown
  # The data's byte n-gram baselines put the bits in scale: under the 8
  # bits of uniform bytes with no context, and fewer with more context.
  grams = [t3["ngram_bits"][str(order)] for order in (1, 2, 3, 4)]
  assert 3.0 < grams[0] < 8.0 and grams == sorted(grams, reverse=True)
  assert " / ".join(f"{b:.4f}" for b in grams) in markdown
  assert f"The Table 3 model ({t3['run']['bits']:.4f}): " in markdown


@pytest.mark.parametrize("full,se,verdict,positional", [
    # Full windows fall at every context: the rise of the short windows is
    # the later positions'.
    ([3.4, 3.2, 3.1, 3.08], None, "yes (3.4000 -> 3.0800)", ""),
    # Full windows rise once, within the noise: still the positions'.
    ([3.4, 3.2, 3.08, 3.081], 0.002,
     "no (3.4000 -> 3.0810; rises 256 -> 512 +0.0010 ± 0.0020, under 2 "
     "standard errors)", " by more than 2 standard errors"),
    # Full windows rise by more than the noise: more context costs bits.
    ([3.4, 3.0, 3.1, 3.08], 0.002,
     "no (3.4000 -> 3.0800; rises 128 -> 256 +0.1000 ± 0.0020)", None),
])
def test_table3_text_says_a_rise_is_positional_only_when_it_is(
    full, se, verdict, positional):
  contexts = [64, 128, 256, 512]
  start = [3.2, 3.1, 3.05, 3.08]  # rises at the longest context

  def sweep(bits):
    result = {"bits": {str(c): b for c, b in zip(contexts, bits)},
              "scored_bytes": 1024}
    if se is not None:
      result["step_se"] = {str(c): se for c in contexts[1:]}
    return result

  t3 = dict(sweep([3.3, 3.2, 3.1, 3.15]), contexts=contexts, scored=64,
            training_context=512, batch=2, run={"steps": 8, "bits": 3.1},
            within_file=sweep(start), within_file_full=sweep(full))
  markdown = paper_tables.render(
      {"command": "c", "manifest": "m.json"},
      {"runs": {"table3": {"date": "d", "minutes": 1.0, "machine": "cpu"}},
       "table3": t3}, {"table3": "t3.png"})
  assert "  - table3 d (1 min). Machine: cpu" in markdown
  # Results made before data.separator read the files run together.
  assert "The files are concatenated without a separator" in markdown
  assert "replaced by the separator byte" not in markdown
  assert f"| 512 | 3.1500 | 3.0800 | {full[-1]:.4f} |" in markdown
  within = "within one file no (3.2000 -> 3.0800; rises 256 -> 512 +0.0300"
  assert within in markdown
  assert f"; within one file, full windows {verdict}. " in markdown
  rise = ("in full windows, with the scored bytes' positions held, no more "
          "of their own context costs bits")
  if positional is None:
    assert rise not in markdown
  else:
    assert f"{rise}{positional}. So the rise is what the later" in markdown
  # Results measured without standard errors get no table of changes.
  assert ("Change from the context before" in markdown) == (se is not None)


def test_table4_predicts_steps_from_a_measured_model(rng):
  ref = {"n": 4096, "layers": 4, "width": 128,
         "step_s": float(rng.uniform(1, 10)),
         "peak_mib": float(rng.uniform(100, 1000))}
  seconds, size = paper_tables.predicted_step(ref, 4, 128, 4096, 2.0)
  assert seconds == pytest.approx(ref["step_s"])
  assert size == pytest.approx(ref["peak_mib"] * 2 ** 20)
  # Four times the context at half the layers and half the width.
  seconds, size = paper_tables.predicted_step(ref, 2, 64, 16384, 1.5)
  assert seconds == pytest.approx(ref["step_s"] * 4 ** 1.5 / 4)
  assert size == pytest.approx(ref["peak_mib"] * 2 ** 20 * 4 / 4)


@pytest.mark.slow
def test_quick_table4_steps_every_context(quick_tables):
  _, results, _ = quick_tables
  rows = results["table4"]["rows"]
  assert sorted(int(n) for n in rows) == [1024, 2048]
  for row in rows.values():
    for pattern in ("strided", "dense"):
      r = row[pattern]
      assert r["status"] == "ok" and r["step_s"] > 0
      assert (r["layers"], r["width"]) in ((1, 64), (2, 64))
      assert math.isfinite(r["loss"])


@pytest.mark.slow
def test_quick_tables_write_the_corpus_manifest(quick_tables):
  out, results, markdown = quick_tables
  with open(out / "results_stdlib_manifest.json") as f:
    manifest = json.load(f)
  from st_keras.data import text
  split = text.stdlib_manifest()
  assert manifest["valid"]["paths"] == split["valid"]
  assert manifest["train"]["files"] == len(split["train"])
  assert manifest["valid"]["bytes"] == text.stdlib_splits()["valid"].size
  assert results["manifest"]["separator"] == text.DOCUMENT_SEPARATOR
  # The bytes count one separator per file.
  assert manifest["valid"]["bytes"] == text.stdlib_splits(
      separator=None)["valid"].size + manifest["valid"]["files"]
  assert "each file after a separator byte, 0x1C, counted" in markdown


@pytest.mark.slow
def test_quick_tables_rerun_one_table_and_keep_the_others(quick_tables,
                                                          tmp_path):
  out, results, _ = quick_tables
  rerun = tmp_path / "rerun"
  rerun.mkdir()
  with open(rerun / "results.json", "w") as f:
    json.dump(results, f)
  result = run_tables("--quick", "--tables", "table3", "--output-dir",
                      str(rerun), timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(rerun / "results.json") as f:
    again = json.load(f)
  for kept in ("manifest", "text", "images", "table4"):
    assert again[kept] == results[kept], kept
  for kept in ("text", "images", "table4"):
    assert again["runs"][kept] == results["runs"][kept], kept
  assert again["runs"]["table3"]["date"] >= results["runs"]["table3"]["date"]
  assert again["table3"]["contexts"] == results["table3"]["contexts"]
  markdown = (rerun / "RESULTS.md").read_text()
  # Kept tables are rendered, plots redrawn from their results.
  for name in ("results_table2_text.png", "results_table2_images.png",
               "results_table3.png", "results_table4.png"):
    with open(rerun / name, "rb") as f:
      assert f.read(8) == PNG_MAGIC, name
  assert "## Table 3" in markdown and "### Images" in markdown
  # Table 4's rows, read back from JSON (string keys), are rendered.
  assert "## Table 4" in markdown and "| 2,048 |" in markdown
  assert all(f"{name} " in markdown for name in results["runs"])


@pytest.mark.slow
def test_quick_tables_rescore_table3_without_training(quick_tables,
                                                      tmp_path):
  _, results, _ = quick_tables
  with open(tmp_path / "results.json", "w") as f:
    json.dump(results, f)
  model = os.path.join(results["table3"]["run"]["output_dir"], "model.keras")
  trained_at = os.path.getmtime(model)
  result = run_tables("--quick", "--tables", "table3", "--rescore-table3",
                      "--output-dir", str(tmp_path), timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "[tables] training" not in result.stdout
  assert os.path.getmtime(model) == trained_at  # not trained again
  with open(tmp_path / "results.json") as f:
    again = json.load(f)
  assert again["table3"]["run"] == results["table3"]["run"]
  for key in ("within_file", "within_file_full"):
    for c, bits in results["table3"][key]["bits"].items():
      assert again["table3"][key]["bits"][c] == pytest.approx(bits, rel=1e-5)
  entry = again["runs"]["table3"]
  assert entry["date"] == results["runs"]["table3"]["date"]
  assert entry["rescored"]["date"] >= entry["date"]
  assert f"; scored again {entry['rescored']['date']}, " in (
      tmp_path / "RESULTS.md").read_text()


@pytest.mark.slow
def test_quick_tables_redraw_only(quick_tables, tmp_path):
  out, results, markdown = quick_tables
  with open(tmp_path / "results.json", "w") as f:
    json.dump(results, f)
  result = run_tables("--quick", "--tables", "", "--output-dir",
                      str(tmp_path), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  # Nothing is run again: the same results give the same page and plots
  # (Table 4's n, read back as JSON string keys, is a number again).
  assert (tmp_path / "RESULTS.md").read_text() == markdown
  for name in ("results_table2_text.png", "results_table2_images.png",
               "results_table3.png", "results_table4.png"):
    assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
  with open(tmp_path / "results.json") as f:
    assert json.load(f) == results
  t3 = results["table3"]
  monotone = True
  for sweep in (t3, t3["within_file"]):
    bits = [sweep["bits"][str(c)] for c in t3["contexts"]]
    monotone &= all(b <= a for a, b in zip(bits, bits[1:]))
  # A curve that is not monotone points to the measurement of why.
  assert ("`python -m benchmarks.context_use`" in markdown) == (
      not monotone)


def test_context_use_sweeps_and_profiles_trained_runs(quick_tables,
                                                      tmp_path):
  _, results, _ = quick_tables
  fixed = results["table3"]["run"]["output_dir"]
  dense = os.path.join(os.path.dirname(fixed), "text_dense")
  script = [sys.executable, "-m", "benchmarks.context_use"]

  def run(*args):
    return subprocess.run(
        script + [fixed, dense, "--output", str(tmp_path / "B.md")] +
        list(args), capture_output=True, text=True, cwd=REPO, timeout=600)

  result = run("--segments", "16", "--windows", "6", "--band", "128")
  assert result.returncode == 0, result.stderr[-3000:]
  markdown = (tmp_path / "B.md").read_text()
  assert "text_fixed_table3 (fixed, 8 steps) | text_dense (dense, 8 steps)" \
      in markdown
  sweep, full = markdown.split("The same sweep in full windows")

  def table(text):
    return {line.split(" | ")[0]: line.strip(" |").split(" | ")[1:]
            for line in text.splitlines() if line.startswith("| ")}

  rows, full = table(sweep), table(full.split("Position profile")[0])
  contexts = results["table3"]["contexts"]
  # The sweep of the Table 3 run is Table 3 (16 segments in --quick).
  for c in contexts:
    assert rows[f"| {c:,}"][0] == f"{results['table3']['bits'][str(c)]:.4f}"
    assert all(0 < float(v) < 8 for v in full[f"| {c:,}"])
  # At the full context both read the same windows; at shorter ones the
  # full windows place the scored bytes later, after a foreign prefix.
  assert full["| 512"] == rows["| 512"]
  assert any(full[f"| {c:,}"] != rows[f"| {c:,}"] for c in contexts[:-1])
  rows = table(markdown)
  # Four bands of 128 positions of the 512-byte windows, two runs each.
  bands = [rows[f"| {b * 128}-{b * 128 + 127}"] for b in range(4)]
  assert all(len(r) == 2 and all(0 < float(v) < 8 for v in r)
             for r in bands)
  bad = run("--band", "100")
  assert bad.returncode == 2
  assert "--band must divide the training context 512" in bad.stderr
  missing = subprocess.run(script + [str(tmp_path)],
                           capture_output=True, text=True, cwd=REPO)
  assert missing.returncode == 2 and "no model.keras" in missing.stderr


def test_tables_argument_errors(tmp_path):
  missing = tmp_path / "none"
  for args, message in ((["--quick"], "--quick needs --output-dir"),
                        (["--tables", "bogus", "--output-dir",
                          str(tmp_path)], "unknown ['bogus']"),
                        (["--tables", "", "--output-dir", str(missing)],
                         "does not exist"),
                        (["--tables", "text", "--rescore-table3",
                          "--output-dir", str(missing)],
                         "--rescore-table3 needs --tables with table3")):
    result = run_tables(*args, timeout=120)
    assert result.returncode == 2 and message in result.stderr, args
  assert not missing.exists()  # a refused redraw creates nothing
