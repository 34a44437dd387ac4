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


# ----------------------------------------------------------------------------
# Shared fixtures.

import os  # noqa: E402  (the collection hooks above need nothing else)
import zlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SEED_VARIABLE = "ST_KERAS_TEST_SEED"


@pytest.fixture
def rng(request):
  """A numpy Generator seeded per test, its seed printed (shown when the
  test fails): rerun with ST_KERAS_TEST_SEED=<seed> to replay it, or set it
  to explore other inputs."""
  seed = int(os.environ.get(SEED_VARIABLE) or
             zlib.crc32(request.node.nodeid.encode()))
  print(f"random inputs: {SEED_VARIABLE}={seed}")
  return np.random.default_rng(seed)


@pytest.fixture(params=["custom_op", "pure_tf"])
def implementation(request):
  """Each attention implementation in turn (the fused op must load: its
  tests fail, not skip, when it does not)."""
  return request.param
