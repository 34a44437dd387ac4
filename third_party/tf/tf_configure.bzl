"""Repository rule exposing the installed TensorFlow wheel's headers and framework library.

Runs the python named by PYTHON_BIN_PATH (tools/build_ops.sh sets it with --repo_env) and asks
tf.sysconfig where the headers and libtensorflow_framework.so.2 live, then symlinks them into
the external repository @local_config_tf, which provides:
  @local_config_tf//:tf_header_lib             headers (include root: include/)
  @local_config_tf//:libtensorflow_framework   libtensorflow_framework.so.2 to link against
  @local_config_tf//:python.sh                 runs that python (for build steps in Python,
                                               such as the Triton kernels' compilation)
"""

_PYTHON_BIN_PATH = "PYTHON_BIN_PATH"

_QUERY = """
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf
print("TF_INCLUDE=" + tf.sysconfig.get_include())
print("TF_LIB=" + tf.sysconfig.get_lib())
"""

_BUILD = """\
package(default_visibility = ["//visibility:public"])

cc_library(
    name = "tf_header_lib",
    hdrs = glob(["include/**"]),
    includes = ["include"],
)

cc_library(
    name = "libtensorflow_framework",
    srcs = ["libtensorflow_framework.so.2"],
)

exports_files(["python.sh"])
"""

def _tf_configure_impl(ctx):
    python = ctx.os.environ.get(_PYTHON_BIN_PATH, "")
    if not python:
        python = ctx.which("python3")
        if python == None:
            fail("tf_configure: set PYTHON_BIN_PATH (--repo_env=PYTHON_BIN_PATH=...) " +
                 "to a python that has tensorflow installed")
    result = ctx.execute([python, "-c", _QUERY], timeout = 300)
    if result.return_code != 0:
        fail("tf_configure: '%s' could not import tensorflow (exit %d):\n%s" %
             (python, result.return_code, result.stderr))
    paths = {}
    for line in result.stdout.splitlines():
        if "=" in line:
            key, _, value = line.partition("=")
            paths[key.strip()] = value.strip()
    if "TF_INCLUDE" not in paths or "TF_LIB" not in paths:
        fail("tf_configure: unexpected output from %s:\n%s" % (python, result.stdout))
    framework = paths["TF_LIB"] + "/libtensorflow_framework.so.2"
    if not ctx.path(framework).exists:
        fail("tf_configure: %s does not exist" % framework)
    ctx.symlink(paths["TF_INCLUDE"], "include")
    ctx.symlink(framework, "libtensorflow_framework.so.2")
    # A script, not a symlink: a virtual environment's python finds its
    # packages only when run by its own path.
    ctx.file("python.sh", '#!/bin/sh\nexec "%s" "$@"\n' % python, executable = True)
    ctx.file("BUILD", _BUILD)
    ctx.file("WORKSPACE", 'workspace(name = "%s")\n' % ctx.name)

tf_configure = repository_rule(
    implementation = _tf_configure_impl,
    environ = [_PYTHON_BIN_PATH],
    local = True,
)
