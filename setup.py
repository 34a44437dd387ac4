"""Packaging for st_keras.

The op library st_keras/lib/_st_keras_ops.so is built by Bazel (the only builder) through
tools/build_ops.sh when it is missing, with the TensorFlow of the Python that builds:
`pip install .` builds in an isolated environment whose requirements (pyproject.toml) include
the pinned tensorflow-cpu; `pip install --no-build-isolation .` builds with the current
environment's.
Set ST_KERAS_REBUILD_OPS=1 to force a rebuild, or ST_KERAS_BUILD_OPS=0 to build no op library
(no Bazel needed): the package then runs the pure-TensorFlow implementation, and the wheel is
pure Python.
"""

import os
import subprocess
import sys

from setuptools import Distribution
from setuptools import find_packages
from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
OPS_SO = os.path.join(HERE, "st_keras", "lib", "_st_keras_ops.so")


def _flag(name, default):
    """The environment variable `name` as a bool ("1" or "0"), `default` when unset."""
    value = os.environ.get(name)
    if value not in (None, "0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return default if value is None else value == "1"


BUILD_OPS = _flag("ST_KERAS_BUILD_OPS", default=True)
REBUILD_OPS = _flag("ST_KERAS_REBUILD_OPS", default=False)
if REBUILD_OPS and not BUILD_OPS:
    raise SystemExit("ST_KERAS_REBUILD_OPS=1 and ST_KERAS_BUILD_OPS=0 contradict each other")


def build_op_library(python=sys.executable):
    """Runs tools/build_ops.sh (Bazel) with `python`'s TensorFlow."""
    env = dict(os.environ, PYTHON_BIN_PATH=python)
    subprocess.run(["bash", os.path.join(HERE, "tools", "build_ops.sh")], env=env, check=True)


class BuildPyWithOps(build_py):
    """build_py that first makes sure the Bazel-built op library exists."""

    def run(self):
        if BUILD_OPS and (REBUILD_OPS or not os.path.isfile(OPS_SO)):
            build_op_library()
        # data_files is computed lazily; drop any cached value so the fresh .so is picked up.
        self.__dict__.pop("data_files", None)
        super().run()


class BinaryDistribution(Distribution):
    """The wheel carries a native library (unless ST_KERAS_BUILD_OPS=0): tag it for the
    platform, not as pure Python."""

    def has_ext_modules(self):
        return BUILD_OPS


setup(
    name="st_keras",
    version="0.1.0",
    description="Sparse Transformer (block-sparse attention) for Keras 3 / TensorFlow",
    license="Apache-2.0",
    packages=find_packages(include=["st_keras", "st_keras.*"]),
    package_data={"st_keras": (["lib/*.so"] if BUILD_OPS else [])
                  + ["configs/*.yaml", "configs/README.md"]},
    include_package_data=False,
    python_requires=">=3.11",
    # One source for the pins: requirements.txt (the development environment) lists these too.
    install_requires=["tensorflow-cpu==2.21.0", "keras==3.15.1", "tensorboard", "numpy",
                      "PyYAML", "matplotlib"],
    entry_points={"console_scripts": [
        "st-train = st_keras.train:main",
        "st-sample = st_keras.sample:main",
        "st-export = st_keras.export:main",
        "st-eval = st_keras.evaluate:main",
    ]},
    cmdclass={"build_py": BuildPyWithOps},
    distclass=BinaryDistribution,
    zip_safe=False,
)
