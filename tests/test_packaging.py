"""The wheel as a user installs it: built from this tree, installed into a
fresh virtual environment, and run from a directory outside the repository."""

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in the fresh environment, from a directory outside the repository.
SMOKE = """
import os, sys
import numpy as np
import st_keras
from st_keras import config, layouts, ops
assert st_keras.__file__.startswith(sys.prefix), st_keras.__file__
assert config.load("demo_text").model.pattern == "fixed"
ops.set_implementation("custom_op")  # an error if the .so did not load
lay = layouts.fixed(64, 16, 32, 8, num_heads=2)
rng = np.random.default_rng(7)
q, k, v = (rng.standard_normal((1, 2, 64, 16)).astype(np.float32)
           for _ in range(3))
fused = ops.block_sparse_attention(q, k, v, lay).numpy()
plain = ops.block_sparse_attention(q, k, v, lay, implementation="pure_tf")
np.testing.assert_allclose(fused, plain.numpy(), rtol=1e-5, atol=1e-5)
import matplotlib  # a declared dependency: st-sample draws image grids
print("ok", ops.library_path())
"""


def _run(args, **kwargs):
  result = subprocess.run(args, capture_output=True, text=True, timeout=900,
                          **kwargs)
  assert result.returncode == 0, (args, result.stdout[-3000:],
                                  result.stderr[-3000:])
  return result.stdout


def _build_wheel(tmp_path_factory, with_library, env=None):
  """A wheel built from a copy of the tracked files (and, `with_library`, the
  op library already built by tools/setup.sh, so the build only packs),
  leaving no build/ here."""
  source = tmp_path_factory.mktemp("source")
  tracked = _run(["git", "ls-files"], cwd=REPO).split("\n")
  built = [os.path.join("st_keras", "lib", name) for name in
           os.listdir(os.path.join(REPO, "st_keras", "lib"))
           if name.endswith(".so")] if with_library else []
  for name in filter(None, tracked + built):
    if os.path.isfile(os.path.join(REPO, name)):
      os.makedirs(os.path.dirname(source / name), exist_ok=True)
      shutil.copy2(os.path.join(REPO, name), source / name)
  out = tmp_path_factory.mktemp("wheel")
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps",
        "--no-build-isolation", "--wheel-dir", str(out), str(source)],
       env=dict(os.environ, **(env or {})))
  (path,) = out.glob("st_keras-*.whl")
  return path


def _install_fresh(wheel, tmp_path):
  """Installs `wheel` into a fresh virtual environment; returns its python
  and site-packages. The dependencies come from this environment (no
  downloads in a test): its site-packages is appended to the fresh one's
  path, after it, so the st_keras found first is the installed wheel's."""
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", str(venv)])
  python = str(venv / "bin" / "python")
  fresh_site = _run([python, "-c", "import sysconfig; "
                     "print(sysconfig.get_paths()['purelib'])"]).strip()
  with open(os.path.join(fresh_site, "deps.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
    f.writelines(p + "\n" for p in site.getsitepackages())
  _run([python, "-m", "pip", "install", "--no-deps", "--no-index",
        str(wheel)])
  return python, fresh_site


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  return _build_wheel(tmp_path_factory, with_library=True)


def test_wheel_holds_the_op_library_and_the_configs(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  assert "st_keras/lib/_st_keras_ops.so" in names
  assert "st_keras/configs/demo_text.yaml" in names
  metadata = zipfile.ZipFile(wheel).read(
      next(n for n in names if n.endswith("METADATA"))).decode()
  for requirement in ("tensorflow-cpu==2.21.0", "keras==3.15.1",
                      "matplotlib", "PyYAML"):
    assert f"Requires-Dist: {requirement}" in metadata
  # Not a pure-Python wheel: it carries a native library.
  assert "-py3-none-any" not in wheel.name


def test_wheel_runs_the_op_in_a_fresh_environment(wheel, tmp_path):
  python, fresh_site = _install_fresh(wheel, tmp_path)
  out = _run([python, "-c", SMOKE], cwd=tmp_path,
             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert "ok " + fresh_site in out
  assert _run([os.path.join(os.path.dirname(python), "st-train"),
               "--help"]).count("demo_text")


# Runs where the package was installed without the op library.
PURE_SMOKE = """
import warnings
import numpy as np
from st_keras import layouts, ops
lay = layouts.fixed(64, 16, 32, 8, num_heads=2)
q = k = v = np.random.default_rng(3).standard_normal((1, 2, 64, 16)).astype(
    np.float32)
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  out = ops.block_sparse_attention(q, k, v, lay).numpy()
assert np.isfinite(out).all() and out.shape == (1, 2, 64, 16)
assert any("falling back" in str(w.message) for w in caught), caught
try:
  ops.block_sparse_attention(q, k, v, lay, implementation="custom_op")
except RuntimeError as err:
  print("refused:", err)
"""


def test_a_wheel_without_the_op_library_runs_pure_tensorflow(
    tmp_path_factory, tmp_path):
  # ST_KERAS_BUILD_OPS=0: no library shipped (the source copy has none), a
  # pure-Python wheel, and no Bazel run (the bazel found first fails).
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  (fake_bin / "bazel").write_text("#!/bin/sh\necho bazel ran >&2\nexit 3\n")
  (fake_bin / "bazel").chmod(0o755)
  pure = _build_wheel(tmp_path_factory, with_library=False,
                      env={"ST_KERAS_BUILD_OPS": "0",
                           "PATH": f"{fake_bin}:{os.environ['PATH']}"})
  names = zipfile.ZipFile(pure).namelist()
  assert not [n for n in names if n.endswith(".so")], names
  assert "st_keras/configs/demo_text.yaml" in names
  assert pure.name.endswith("-py3-none-any.whl"), pure.name
  python, _ = _install_fresh(pure, tmp_path)
  out = _run([python, "-c", PURE_SMOKE], cwd=tmp_path,
             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert "refused: the block-sparse attention op library failed to load" in out


def test_contradicting_build_flags_are_refused():
  result = subprocess.run(
      [sys.executable, "setup.py", "--name"], cwd=REPO, capture_output=True,
      text=True, env=dict(os.environ, ST_KERAS_BUILD_OPS="0",
                          ST_KERAS_REBUILD_OPS="1"))
  assert result.returncode != 0
  assert "contradict" in result.stderr
  result = subprocess.run(
      [sys.executable, "setup.py", "--name"], cwd=REPO, capture_output=True,
      text=True, env=dict(os.environ, ST_KERAS_BUILD_OPS="no"))
  assert result.returncode != 0
  assert "ST_KERAS_BUILD_OPS must be 0 or 1, got 'no'" in result.stderr
