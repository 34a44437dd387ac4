"""Splits the suite into two pytest processes (tools/test.sh runs both).

Triton imported into a process that has already loaded TensorFlow aborts it
(each carries an LLVM), so the tests that import Triton, in tests/
triton_kernels/, are collected only when a run asks for that folder:

    pytest tests                      # everything else
    pytest tests/triton_kernels       # the Triton kernels (interpreter)
"""

import pathlib

TRITON_TESTS = pathlib.Path(__file__).parent / "triton_kernels"


def _asks_for_triton_tests(config) -> bool:
  for arg in config.args:
    path = pathlib.Path(arg.split("::")[0]).resolve()
    if path == TRITON_TESTS or TRITON_TESTS in path.parents:
      return True
  return False


def pytest_ignore_collect(collection_path, config):
  if collection_path == TRITON_TESTS:
    return not _asks_for_triton_tests(config)
  return None
