"""The README's Python quick start runs as written, so the user's page cannot
drift from the library."""

import os
import re

import numpy as np

from st_keras import ops

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "README.md")


def _python_blocks():
  with open(README, encoding="utf-8") as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.DOTALL)


def test_the_quick_start_runs_as_written():
  blocks = _python_blocks()
  assert len(blocks) >= 3, "the quick start lost its examples"
  # The page presents the fused op: it is what the default choice runs here.
  assert ops.resolve_implementation() == "custom_op", ops.load_error()
  scope = {}
  # One namespace, as a reader pastes the blocks into one session.
  exec(compile("\n".join(blocks), README, "exec"), scope)  # pylint: disable=exec-used
  # The names the text promises, with the shapes its comments give, and the
  # op's output equal to the pure-TensorFlow twin's on the same inputs.
  out = scope["out"].numpy()
  assert out.shape == (1, 4, 8192, 64)
  twin = ops.block_sparse_attention(scope["q"], scope["k"], scope["v"],
                                    scope["lay"], implementation="pure_tf")
  np.testing.assert_allclose(out, twin.numpy(), rtol=1e-5, atol=1e-5)
  assert tuple(scope["x"].shape) == (None, None, 256)
  assert scope["model"].optimizer is not None
