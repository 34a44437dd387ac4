"""custom_op_library: a TensorFlow custom-op shared library (like tensorflow/addons' macro).

Compiles against the headers of the installed TensorFlow wheel (@local_config_tf) with the
flags its tf.sysconfig.get_compile_flags() gives (the C++ standard, ABI and Eigen alignment of
the wheel), and links libtensorflow_framework.so.2.
"""

load("@local_config_tf//:tf_flags.bzl", "TF_COMPILE_FLAGS")

# The instruction sets the CPU core is compiled for, by variant name (the C++ namespace of
# that copy of block_sparse_attention_core.cc; block_sparse_attention_cpu_dispatch.cc checks
# the same x86-64 levels with __builtin_cpu_supports before running one). "avx2" is the
# baseline, which the rest of the op library is compiled for too.
CPU_ISA_COPTS = {
    # x86-64-v3: AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE (Haswell, Zen and later).
    "avx2": ["-march=x86-64-v3"],
    # x86-64-v4: x86-64-v3 plus AVX512F/BW/CD/DQ/VL (Skylake-SP, Zen 4 and later).
    "avx512": ["-march=x86-64-v4"],
}

TF_COPTS = TF_COMPILE_FLAGS + [
    "-O3",
    "-fPIC",
]

# The GPU launcher and its C ABI library run on machines other than the build's (a GPU host):
# the default x86-64 target. The ABI flags are TensorFlow's, as the op library links it.
GPU_COPTS = TF_COMPILE_FLAGS + [
    "-O2",
    "-fPIC",
]

def custom_op_library(name, srcs = [], deps = [], copts = [], linkopts = [], **kwargs):
    """Builds `name` (e.g. "_foo_ops.so") as a shared library loadable by tf.load_op_library.

    Its sources are compiled for the baseline CPU (CPU_ISA_COPTS["avx2"])."""
    native.cc_binary(
        name = name,
        srcs = srcs,
        copts = TF_COPTS + CPU_ISA_COPTS["avx2"] + copts,
        linkshared = 1,
        linkstatic = 1,
        linkopts = linkopts,
        deps = deps + [
            "@local_config_tf//:libtensorflow_framework",
            "@local_config_tf//:tf_header_lib",
        ],
        **kwargs
    )
