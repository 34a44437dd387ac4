"""The README's Python quick start runs as written, so the user's page cannot
drift from the library."""

import os
import re

import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "README.md")


def _python_blocks():
  with open(README, encoding="utf-8") as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.DOTALL)


def test_the_quick_start_runs_as_written():
  blocks = _python_blocks()
  assert len(blocks) >= 3, "the quick start lost its examples"
  scope = {}
  # One namespace, as a reader pastes the blocks into one session.
  exec(compile("\n".join(blocks), README, "exec"), scope)  # pylint: disable=exec-used
  # The names the text promises, with the shapes its comments give.
  assert tuple(scope["out"].shape) == (1, 4, 8192, 64)
  assert np.isfinite(scope["out"].numpy()).all()
  assert tuple(scope["x"].shape) == (None, None, 256)
  assert scope["model"].optimizer is not None
