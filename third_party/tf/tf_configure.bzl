"""Repository rule exposing the installed TensorFlow wheel's headers and framework library.

Runs the python named by PYTHON_BIN_PATH (tools/build_ops.sh sets it with --repo_env) and asks
tf.sysconfig where the headers and the framework library live and which flags a custom op
needs, then symlinks the files into the external repository @local_config_tf, which provides:
  @local_config_tf//:tf_header_lib             headers (include root: include/)
  @local_config_tf//:libtensorflow_framework   the framework library to link against
                                               (libtensorflow_framework.so.2)
  @local_config_tf//:python.sh                 runs that python (for build steps in Python,
                                               such as the Triton kernels' compilation)
  @local_config_tf//:tf_flags.bzl              TF_COMPILE_FLAGS: tf.sysconfig.get_compile_flags()
                                               without its -I (tf_header_lib has the headers),
                                               i.e. the C++ standard, ABI and Eigen alignment
                                               the wheel was built with
"""

_PYTHON_BIN_PATH = "PYTHON_BIN_PATH"

_QUERY = """
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf
print("TF_INCLUDE=" + tf.sysconfig.get_include())
for flag in tf.sysconfig.get_compile_flags():
    if not flag.startswith("-I"):
        print("TF_COMPILE_FLAG=" + flag)
# The framework library is named by the link flags: -L<dir> and -l:<file>.
for flag in tf.sysconfig.get_link_flags():
    if flag.startswith("-L"):
        print("TF_LIB_DIR=" + flag[2:])
    elif flag.startswith("-l:"):
        print("TF_FRAMEWORK=" + flag[3:])
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
    srcs = ["{framework}"],
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
    compile_flags = []
    for line in result.stdout.splitlines():
        if "=" in line:
            key, _, value = line.partition("=")
            if key.strip() == "TF_COMPILE_FLAG":
                compile_flags.append(value.strip())
            else:
                paths[key.strip()] = value.strip()
    if ("TF_INCLUDE" not in paths or "TF_LIB_DIR" not in paths or
        "TF_FRAMEWORK" not in paths or not compile_flags):
        fail("tf_configure: unexpected output from %s:\n%s" % (python, result.stdout))
    framework = paths["TF_LIB_DIR"] + "/" + paths["TF_FRAMEWORK"]
    if not ctx.path(framework).exists:
        fail("tf_configure: %s does not exist" % framework)
    ctx.symlink(paths["TF_INCLUDE"], "include")
    ctx.symlink(framework, paths["TF_FRAMEWORK"])
    # A script, not a symlink: a virtual environment's python finds its
    # packages only when run by its own path.
    ctx.file("python.sh", '#!/bin/sh\nexec "%s" "$@"\n' % python, executable = True)
    ctx.file("tf_flags.bzl", "TF_COMPILE_FLAGS = %r\n" % compile_flags)
    ctx.file("BUILD", _BUILD.format(framework = paths["TF_FRAMEWORK"]))
    ctx.file("WORKSPACE", 'workspace(name = "%s")\n' % ctx.name)

tf_configure = repository_rule(
    implementation = _tf_configure_impl,
    environ = [_PYTHON_BIN_PATH],
    local = True,
)
