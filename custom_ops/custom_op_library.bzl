"""custom_op_library: a TensorFlow custom-op shared library (like tensorflow/addons' macro).

Compiles against the headers of the installed TensorFlow wheel (@local_config_tf) with the
flags its tf.sysconfig.get_compile_flags() gives (the C++ standard, ABI and Eigen alignment of
the wheel), and links libtensorflow_framework.so.2.
"""

load("@local_config_tf//:tf_flags.bzl", "TF_COMPILE_FLAGS")

TF_COPTS = TF_COMPILE_FLAGS + [
    "-O3",
    "-march=native",
    # The Eigen that TF 2.21 ships does not compile its AVX512-FP16 packet
    # math (PacketMathFP16.h: predux_half_dowto4 has no primary template),
    # which it enables when -march=native defines __AVX512FP16__ (Sapphire
    # Rapids and later Xeons). Undefining the macro keeps Eigen off that
    # path with every compiler; -mno-avx512fp16 would fail before GCC 12.
    "-U__AVX512FP16__",
    "-fPIC",
]

# The GPU launcher and its C ABI library run on machines other than the build's (a GPU host):
# no -march=native. The ABI flags are TensorFlow's, as the op library links it.
GPU_COPTS = TF_COMPILE_FLAGS + [
    "-O2",
    "-fPIC",
]

def custom_op_library(name, srcs = [], deps = [], copts = [], linkopts = [], **kwargs):
    """Builds `name` (e.g. "_foo_ops.so") as a shared library loadable by tf.load_op_library."""
    native.cc_binary(
        name = name,
        srcs = srcs,
        copts = TF_COPTS + copts,
        linkshared = 1,
        linkstatic = 1,
        linkopts = linkopts,
        deps = deps + [
            "@local_config_tf//:libtensorflow_framework",
            "@local_config_tf//:tf_header_lib",
        ],
        **kwargs
    )
