// Chooses the variant of the CPU core (block_sparse_attention_core.cc compiled
// per instruction set) that this process runs, the way oneDNN and PyTorch
// dispatch: the widest the CPU supports, unless ST_KERAS_CPU_ISA forces one.
// Compiled for the default x86-64 target, so that the checks themselves run
// on any x86-64 CPU.
#include <cstdlib>
#include <iterator>
#include <string>

#include "custom_ops/cc/kernels/block_sparse_attention_core.h"

namespace st_keras {
namespace {

constexpr char kIsaVariable[] = "ST_KERAS_CPU_ISA";

struct Variant {
  const CpuCore* core;
  // The CPU features its compile flags (custom_op_library.bzl's
  // CPU_ISA_COPTS) assume; __builtin_cpu_supports also checks that the OS
  // saves the wider registers.
  const char* needs;
  bool (*supported)();
};

// Widest first. __builtin_cpu_supports takes only string literals, hence a
// function per variant.
constexpr Variant kVariants[] = {
    {&avx512::kCpuCore,
     "x86-64-v4 (AVX512F, AVX512BW, AVX512CD, AVX512DQ, AVX512VL)",
     [] { return __builtin_cpu_supports("x86-64-v4") != 0; }},
    {&avx2::kCpuCore, "x86-64-v3 (AVX2, FMA, BMI1, BMI2, F16C, LZCNT, MOVBE)",
     [] { return __builtin_cpu_supports("x86-64-v3") != 0; }},
};

// The choice ST_KERAS_CPU_ISA=forced makes.
CpuCoreChoice Force(const std::string& forced) {
  CpuCoreChoice choice;
  std::string names;
  for (const Variant& variant : kVariants) {
    if (forced == variant.core->isa) {
      if (variant.supported()) {
        choice.core = variant.core;
      } else {
        choice.error = std::string(kIsaVariable) + "=" + forced +
                       " forces the CPU kernels' " + forced +
                       " variant, which needs " + variant.needs +
                       ": this CPU does not support it. Unset " +
                       kIsaVariable +
                       " to run the widest variant this CPU supports.";
      }
      return choice;
    }
    names += (names.empty() ? "" : ", ") + std::string(variant.core->isa);
  }
  choice.error = std::string(kIsaVariable) + "=" + forced +
                 " names no variant of the CPU kernels; they are " + names +
                 " (unset it to run the widest this CPU supports).";
  return choice;
}

CpuCoreChoice Choose() {
  __builtin_cpu_init();
  const char* forced = std::getenv(kIsaVariable);
  if (forced != nullptr && *forced != '\0') return Force(forced);
  CpuCoreChoice choice;
  for (const Variant& variant : kVariants) {
    if (variant.supported()) {
      choice.core = variant.core;
      return choice;
    }
  }
  choice.error = std::string("The CPU kernels need at least ") +
                 kVariants[std::size(kVariants) - 1].needs +
                 ", which this CPU does not support.";
  return choice;
}

}  // namespace

const CpuCoreChoice& ChosenCpuCore() {
  static const CpuCoreChoice choice = Choose();
  return choice;
}

}  // namespace st_keras

// For tests and diagnostics through ctypes (the op library exports it): the
// name of the variant this process runs ("avx2" or "avx512"), choosing it if
// no op has run yet, or NULL when none can run (the op then fails with the
// reason).
extern "C" __attribute__((visibility("default"))) const char*
st_keras_cpu_isa() {
  const st_keras::CpuCore* core = st_keras::ChosenCpuCore().core;
  return core != nullptr ? core->isa : nullptr;
}
