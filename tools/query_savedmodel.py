"""Runs one `score` and one `generate` request against an exported SavedModel,
loaded with plain TensorFlow (no st_keras model code), and prints the results.

Usage:
  python tools/query_savedmodel.py SAVEDMODEL_DIR [--text FILE] [--length N]
"""

import argparse
import sys

import numpy as np
import tensorflow as tf


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("path", help="the SavedModel directory (BASE/VERSION)")
  parser.add_argument("--text", default=__file__,
                      help="file whose first bytes are scored and prompted")
  parser.add_argument("--length", type=int, default=200,
                      help="bytes to generate")
  parser.add_argument("--seed", type=int, default=1)
  args = parser.parse_args(argv)
  served = tf.saved_model.load(args.path)
  with open(args.text, "rb") as f:
    data = np.frombuffer(f.read(512), np.uint8).astype(np.int32)
  score = served.signatures["score"](
      tokens=tf.constant(data[None]), lengths=tf.constant([data.size]))
  print(f"[serving] score: {float(score['bits_per_byte'][0]):.3f} bits per "
        f"byte over the first {data.size} bytes of {args.text}")
  prompt = data[:64]
  out = served.signatures["generate"](
      prompt=tf.constant(prompt[None]), length=tf.constant(args.length),
      temperature=tf.constant(0.8), seed=tf.constant(args.seed, tf.int64))
  text = out["tokens"].numpy()[0].astype(np.uint8).tobytes()
  print(f"[serving] generate ({prompt.size}-byte prompt + {args.length} "
        f"bytes, temperature 0.8, seed {args.seed}):")
  print(text.decode("utf-8", errors="replace"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
