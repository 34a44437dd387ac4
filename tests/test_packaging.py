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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  # Built from a copy of the tracked files and the op library (already
  # built by tools/setup.sh, so this only packs), leaving no build/ here.
  source = tmp_path_factory.mktemp("source")
  tracked = _run(["git", "ls-files"], cwd=REPO).split("\n")
  built = [os.path.join("st_keras", "lib", name) for name in
           os.listdir(os.path.join(REPO, "st_keras", "lib"))
           if name.endswith(".so")]
  for name in filter(None, tracked + built):
    if os.path.isfile(os.path.join(REPO, name)):
      os.makedirs(os.path.dirname(source / name), exist_ok=True)
      shutil.copy2(os.path.join(REPO, name), source / name)
  out = tmp_path_factory.mktemp("wheel")
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps",
        "--no-build-isolation", "--wheel-dir", str(out), str(source)])
  (path,) = out.glob("st_keras-*.whl")
  return path


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
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", str(venv)])
  python = str(venv / "bin" / "python")
  # The dependencies come from this environment (no downloads in a test):
  # its site-packages is appended to the fresh one's path, after it, so the
  # st_keras found first is the installed wheel's.
  fresh_site = _run([python, "-c", "import sysconfig; "
                     "print(sysconfig.get_paths()['purelib'])"]).strip()
  with open(os.path.join(fresh_site, "deps.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
    f.writelines(p + "\n" for p in site.getsitepackages())
  _run([python, "-m", "pip", "install", "--no-deps", "--no-index",
        str(wheel)])
  out = _run([python, "-c", SMOKE], cwd=tmp_path,
             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert "ok " + fresh_site in out
  assert _run([str(venv / "bin" / "st-train"), "--help"]).count("demo_text")
