"""st_keras.evaluate: held-out bits, the context sweep and the position
profile against float64 references, and the st-eval command."""

import json
import math

import keras
import numpy as np
import pytest

from st_keras import config as config_lib
from st_keras import data
from st_keras import evaluate
from st_keras import models
from st_keras import run_dir
from st_keras import train
from st_keras.data import kinds

# tests/test_model.py's TINY model, as a run's config.
TINY_MODEL = dict(width=16, num_layers=2, num_heads=2, stride=16,
                  summary_size=4, block_size=16)
N = 64  # its context


def float64_bits(model, x, y):
  """Bits of predicting y (batch, n) int32 from x (batch, n) int32, from the
  model's logits in float64: (batch, n)."""
  logits = np.asarray(model(x), np.float64)           # (batch, n, 256)
  top = logits.max(-1, keepdims=True)
  log_p = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  return -np.take_along_axis(log_p, y[..., None], -1)[..., 0] / math.log(2.0)


@pytest.fixture
def tiny_run(tmp_path, rng):
  """A run directory of an untrained tiny model on random text: its
  config.json (as st-train writes it) and model.keras."""
  text = tmp_path / "text.bin"
  text.write_bytes(rng.integers(0, 32, 4000).astype(np.uint8).tobytes())
  cfg = config_lib.from_dict({
      "model": TINY_MODEL,
      "data": {"kind": "text", "path": str(text), "context": N,
               "valid_fraction": 0.4},
      "train": {"seed": int(rng.integers(1000))}})
  run = tmp_path / "run"
  run.mkdir()
  (run / run_dir.CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
  train.build_model(cfg).save(str(run / "model.keras"))
  return str(run)


def test_load_run_reads_the_model_config_and_data(tiny_run):
  run = evaluate.load_run(tiny_run)
  assert run.model.seq_len == N and run.kind.metric == "bits_per_byte"
  assert run.config.data.valid_fraction == 0.4
  # The held-out bytes: the last 40% of the file, after the separator.
  assert run.valid.size == int(4001 * 0.4)
  with pytest.raises(FileNotFoundError, match="nothing.keras"):
    evaluate.load_run(tiny_run, model_path=tiny_run + "/nothing.keras")


def test_held_out_bits_match_a_float64_reference(tiny_run):
  run = evaluate.load_run(tiny_run)
  valid = run.valid
  result = evaluate.held_out_bits(run.model, valid, batch=5)
  windows = (valid.size - 1) // N  # contiguous, the tail left out
  starts = np.arange(windows) * N
  x = np.stack([valid[s:s + N] for s in starts]).astype(np.int32)
  y = np.stack([valid[s + 1:s + N + 1] for s in starts]).astype(np.int32)
  assert result["windows"] == windows and result["tokens"] == windows * N
  assert result["bits"] == pytest.approx(
      float64_bits(run.model, x, y).mean(), rel=1e-5)
  # And the trainer's evaluation of its validation windows reads the same.
  models.compile_for_training(run.model, keras.optimizers.AdamW())
  trainer = run.model.evaluate(data.evaluation_windows(valid, N, 4),
                               verbose=0, return_dict=True)
  assert trainer["bits_per_byte"] == pytest.approx(result["bits"], rel=1e-5)


def test_held_out_bits_of_images_predict_every_byte(tiny_run, rng):
  model = evaluate.load_run(tiny_run).model
  images = rng.integers(0, 256, (7, N)).astype(np.uint8)
  result = evaluate.held_out_bits(model, images, batch=3)
  # Inputs: the start byte, then the image shifted right by one.
  x = np.concatenate([np.zeros((7, 1), np.uint8), images[:, :-1]], 1)
  assert (result["windows"], result["tokens"]) == (7, 7 * N)
  assert result["bits"] == pytest.approx(
      float64_bits(model, x.astype(np.int32),
                   images.astype(np.int32)).mean(), rel=1e-5)


@pytest.mark.parametrize("full_windows", [False, True])
def test_sweep_scores_the_same_bytes_at_every_context(tiny_run,
                                                      full_windows):
  run = evaluate.load_run(tiny_run)
  model, valid, separator = run.model, run.valid, run.config.data.separator
  contexts, k, segments = [16, 32, 48, 64], 16, 9
  sweep = evaluate.context_sweep(model, valid, contexts, k, segments,
                                 batch=4, full_windows=full_windows,
                                 separator=separator)
  ends = evaluate.segment_ends(valid.size, N + 1, segments)
  scored = np.stack([valid[e - k:e] for e in ends])    # (segments, k)
  assert sweep["scored_bytes"] == segments * k
  for c in contexts:
    rows = evaluate.sweep_windows(valid, ends, c, N if full_windows else None,
                                  separator)
    assert rows.shape == (segments, (N if full_windows else c) + 1)
    # The last k targets are the segments' last k bytes, at every context,
    # after c bytes of their own context.
    np.testing.assert_array_equal(rows[:, -k:], scored)
    np.testing.assert_array_equal(
        rows[:, -c - 1:], np.stack([valid[e - c - 1:e] for e in ends]))
    assert sweep["bits"][str(c)] == pytest.approx(
        float64_bits(model, rows[:, :-1], rows[:, 1:])[:, -k:].mean(),
        rel=1e-5)
  # Different contexts predict the same bytes differently.
  assert len({round(b, 6) for b in sweep["bits"].values()}) > 1


def test_sweep_at_the_full_context_is_the_held_out_evaluation(tiny_run):
  run = evaluate.load_run(tiny_run)
  windows = (run.valid.size - 1) // N
  valid = run.valid[:windows * N + 1]  # no tail: the windows tile it
  # Scoring all N positions of `windows` segments: the segment ends are the
  # ends of the evaluation windows.
  sweep = evaluate.context_sweep(run.model, valid, [N], N, windows, batch=3)
  full = evaluate.context_sweep(run.model, valid, [N], N, windows, batch=3,
                                full_windows=True, separator=28)
  plain = evaluate.held_out_bits(run.model, valid, batch=5)
  assert sweep["scored_bytes"] == plain["tokens"]
  assert sweep["bits"][str(N)] == pytest.approx(plain["bits"], rel=1e-5)
  assert full["bits"][str(N)] == sweep["bits"][str(N)]


def test_sweep_rejects_contexts_outside_the_model(tiny_run):
  run = evaluate.load_run(tiny_run)
  with pytest.raises(ValueError, match="contexts must be in 16..64"):
    evaluate.context_sweep(run.model, run.valid, [16, 128], 16, 4)
  with pytest.raises(ValueError, match="contexts must be in 32..64"):
    evaluate.context_sweep(run.model, run.valid, [16, 32], 32, 4)
  with pytest.raises(ValueError, match="needs a stream of bytes"):
    evaluate.context_sweep(run.model, run.valid.reshape(-1, 2), [16], 16, 4)


def test_position_profile_matches_a_float64_reference(tiny_run):
  run = evaluate.load_run(tiny_run)
  valid, windows, band = run.valid, 5, 16
  profile = evaluate.position_profile(run.model, valid, windows, band,
                                      batch=2)
  starts = np.linspace(0, valid.size - N - 1, windows).astype(np.int64)
  x = np.stack([valid[s:s + N] for s in starts]).astype(np.int32)
  y = np.stack([valid[s + 1:s + N + 1] for s in starts]).astype(np.int32)
  bands = float64_bits(run.model, x, y).mean(0).reshape(-1, band).mean(1)
  assert len(profile) == N // band
  np.testing.assert_allclose(profile, bands, rtol=1e-5)
  with pytest.raises(ValueError, match="--band must divide"):
    evaluate.position_profile(run.model, valid, windows, 24)


def test_segment_ends_spread_evenly_inside_files(rng):
  sizes = rng.integers(10, 400, 30)
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  size, window = int(sizes.sum()), 120
  ends = evaluate.segment_ends(size, window, 40, starts)
  assert ends.size == 40 and np.all(np.diff(ends) >= 0)
  # Every window [end - window, end) lies inside one file.
  file_of = np.searchsorted(starts, np.arange(size), side="right") - 1
  for e in ends:
    assert e <= size and file_of[e - window] == file_of[e - 1]
  # The first and last possible ends are taken.
  possible = [e for e in range(window, size + 1)
              if file_of[e - window] == file_of[e - 1]]
  assert (ends[0], ends[-1]) == (possible[0], possible[-1])
  # Without files: the whole held-out stream, from the first full window.
  plain = evaluate.segment_ends(size, window, 7)
  assert (plain[0], plain[-1]) == (window, size)
  with pytest.raises(ValueError, match="within one held-out file"):
    evaluate.segment_ends(size, window, len(possible) + 1, starts)


class CountingModel:
  """A stand-in model whose logits at position t are log(1 + the count of
  each byte among inputs 0..t): every byte of the window moves them."""
  seq_len = 64

  def __call__(self, x):
    import tensorflow as tf
    seen = tf.cumsum(tf.one_hot(x, 256), axis=1)  # (batch, n, 256)
    return tf.math.log1p(seen)


def counting_bits(x, y, k):
  """Independent float64 reference: the CountingModel's bits per byte on
  the last k targets y of inputs x."""
  logits = np.log1p(np.cumsum(np.eye(256)[x], axis=0))   # (n, 256)
  top = logits.max(axis=1, keepdims=True)
  log_p = logits - top - np.log(np.exp(logits - top).sum(axis=1,
                                                          keepdims=True))
  return -log_p[np.arange(y.size), y][-k:].mean() / math.log(2.0)


@pytest.mark.parametrize("full_windows,separator", [
    (False, None), (True, None), (True, 200)])
def test_context_sweep_matches_a_float64_reference(full_windows, separator,
                                                  rng):
  valid = rng.integers(0, 12, 3000).astype(np.uint8)
  contexts, k, segments = [16, 32, 48, 64], 16, 23
  sweep = evaluate.context_sweep(CountingModel(), valid, contexts, k,
                                     segments, batch=5,
                                     full_windows=full_windows,
                                     separator=separator)
  ends = evaluate.segment_ends(valid.size, 65, segments)
  others = np.roll(ends, segments // 2)
  per_context = []  # (segments,) bits per byte of each context
  for c in contexts:
    bits = []
    for e, o in zip(ends, others):
      row = valid[e - c - 1:e]
      if full_windows:  # another segment's bytes fill the window
        prefix = valid[o - 65:o - c - 1].copy()
        if separator is not None and prefix.size:  # and end in it
          prefix[-1] = separator
        row = np.concatenate([prefix, row])
        assert row.size == 65
      bits.append(counting_bits(row[:-1], row[1:], k))
    per_context.append(np.array(bits))
  assert sweep["scored_bytes"] == segments * k
  assert sweep.get("separator") == separator
  assert ("separator" in sweep) == full_windows
  for c, bits in zip(contexts, per_context):
    assert sweep["bits"][str(c)] == pytest.approx(bits.mean(), rel=1e-5)
  assert sorted(sweep["step_se"], key=int) == [str(c) for c in contexts[1:]]
  for c, before, after in zip(contexts[1:], per_context, per_context[1:]):
    se = np.std(after - before, ddof=1) / math.sqrt(segments)
    assert se > 0
    assert sweep["step_se"][str(c)] == pytest.approx(se, rel=1e-3)




def test_st_eval_writes_the_json(tiny_run, tmp_path, capsys):
  out = tmp_path / "result.json"
  assert evaluate.main(["--run", tiny_run, "--contexts", "16,32,64",
                        "--scored", "16", "--segments", "6", "--profile",
                        "--windows", "3", "--band", "16", "--output",
                        str(out)]) == 0
  result = json.loads(out.read_text())
  assert json.loads(capsys.readouterr().out) == result
  run = evaluate.load_run(tiny_run)
  assert (result["kind"], result["metric"], result["context"]) == (
      "text", "bits_per_byte", N)
  assert result["held_out"] == pytest.approx(
      evaluate.held_out_bits(run.model, run.valid), rel=1e-6)
  sweep = result["sweep"]
  assert (sweep["contexts"], sweep["scored"], sweep["segments"]) == (
      [16, 32, 64], 16, 6)
  assert sweep["bits"] == pytest.approx(evaluate.context_sweep(
      run.model, run.valid, [16, 32, 64], 16, 6)["bits"], rel=1e-6)
  assert "separator" not in sweep  # not in full windows
  assert result["profile"]["bits"] == pytest.approx(
      evaluate.position_profile(run.model, run.valid, 3, 16), rel=1e-6)
  assert result["model"].endswith("model.keras")


@pytest.mark.parametrize("args,message", [
    (["--contexts", "16,x"], "--contexts: must be comma-separated integers"),
    (["--contexts", "32,16"], "--contexts: must be positive and ascending"),
    (["--contexts", "16,128"], "--contexts: at most the model's context 64"),
    (["--contexts", "16", "--scored", "32"],
     "--scored: at most the smallest context 16"),
    (["--full-windows"], "--full-windows needs --contexts"),
    (["--band", "16"], "--band needs --profile"),
    (["--profile", "--band", "24"], "--band must divide the model's context"),
    (["--profile", "--windows", "0"], "--windows: must be >= 1"),
    (["--model", "missing.keras"], "--model: missing.keras does not exist"),
])
def test_st_eval_rejects_bad_arguments(tiny_run, capsys, args, message):
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--run", tiny_run] + args)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_st_eval_needs_a_run_directory(tmp_path, capsys):
  with pytest.raises(SystemExit):
    evaluate.main(["--run", str(tmp_path / "none")])
  assert "--run: " in capsys.readouterr().err


def test_evaluate_run_sweeps_within_files_in_full_windows(tiny_run):
  run = evaluate.load_run(tiny_run)
  result = evaluate.evaluate_run(run, [16, 64], segments=5, full_windows=True,
                                 within_file=True)
  assert "profile" not in result
  sweep = result["sweep"]
  # The run's separator ends the other segment's bytes.
  assert sweep["separator"] == run.config.data.separator == 28
  starts = kinds.held_out_file_starts(run.config.data, run.valid)
  expected = evaluate.context_sweep(run.model, run.valid, [16, 64], 16, 5,
                                    starts=starts, full_windows=True,
                                    separator=28)
  assert sweep["bits"] == expected["bits"]
  assert (sweep["scored"], sweep["scored_bytes"]) == (16, 5 * 16)
