// Framework-free CPU core of fused block-sparse attention.
//
// Everything here works on float32 buffers and plain pointers; the TensorFlow
// kernels (block_sparse_attention_kernels.cc) convert dtypes, allocate the
// buffers and hand in a parallel-for over TensorFlow's CPU thread pool.
//
// The shape and the layout tables are block_sparse_attention_params.h's;
// the CPU core walks the row-major table.
//
// Shapes: q, k, v, out are [batch, heads, n, head_dim] row-major; lse is
// [batch, heads, n]. "Tile-transposed" buffers hold, for every block of bs
// tokens, the [head_dim, bs] transpose: [batch, heads, nb, head_dim, bs].
//
// Nothing here allocates: the forward and backward passes take a workspace
// of {forward,backward}_workspace_floats() floats per worker of the
// parallel-for, which the caller allocates (and can fail to allocate) up
// front.
#ifndef ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_CORE_H_
#define ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_CORE_H_

#include <cstdint>
#include <functional>
#include <string>

#include "custom_ops/cc/kernels/block_sparse_attention_params.h"

namespace st_keras {

// Runs fn(begin, end, worker) over [0, total) in parallel; cost_per_unit is
// a rough count of floating-point operations per unit, for sharding. worker
// is in [0, workers) for the workers the caller allocated workspace for, and
// no two calls running at the same time get the same worker.
using ParallelFor = std::function<void(
    int64_t total, int64_t cost_per_unit,
    const std::function<void(int64_t, int64_t, int)>& fn)>;

struct ForwardArgs {
  AttentionShape shape;
  LayoutTables layout;
  const float* q = nullptr;   // [B, H, n, d]
  const float* kt = nullptr;  // tile-transposed keys [B, H, nb, d, bs]
  const float* v = nullptr;   // [B, H, n, d]
  float* out = nullptr;       // [B, H, n, d]
  float* lse = nullptr;       // [B, H, n]; -inf for rows with no key
  // [B, H, n, 2]: each row's max score m and log l, l = sum exp(s - m);
  // lse = m + log l rounds log l away where |m| is large, so the backward
  // pass takes these.
  float* stats = nullptr;
  float* workspace = nullptr;  // [workers, forward_workspace_floats()]
};

struct BackwardArgs {
  AttentionShape shape;
  LayoutTables layout;
  const float* q = nullptr;      // [B, H, n, d]
  const float* k = nullptr;      // [B, H, n, d]
  const float* kt = nullptr;     // tile-transposed keys [B, H, nb, d, bs]
  const float* vt = nullptr;     // tile-transposed values [B, H, nb, d, bs]
  const float* dout = nullptr;   // [B, H, n, d]
  const float* stats = nullptr;  // [B, H, n, 2] from the forward pass
  const float* delta = nullptr;  // [B, H, n]: rowsum(dout * out) - dlse
  float* dq = nullptr;           // [B, H, n, d], overwritten
  float* dk = nullptr;           // [B, H, n, d], overwritten
  float* dv = nullptr;           // [B, H, n, d], overwritten
  float* workspace = nullptr;    // [workers, backward_workspace_floats()]
};

// The core's entry points, as compiled for one instruction set:
// block_sparse_attention_core.cc is compiled once per variant of
// custom_ops/custom_op_library.bzl's CPU_ISA_COPTS, each copy in its own
// namespace, defining <isa>::kCpuCore. ChosenCpuCore() picks the one to run.
struct CpuCore {
  const char* isa;  // the variant's name: "avx2" or "avx512"

  // Writes, for each of `groups` sequences of n = num_blocks * bs rows of
  // head_dim floats, the [head_dim, bs] transpose of every block of bs rows.
  void (*transpose_tiles)(const float* src, int64_t groups,
                          int64_t num_blocks, int64_t block_size,
                          int64_t head_dim, float* dst,
                          const ParallelFor& parallel_for);

  // delta[r] = sum_d dout[r, d] * out[r, d] - dlse[r] for `rows` rows.
  void (*row_deltas)(const float* dout, const float* out, const float* dlse,
                     int64_t rows, int64_t head_dim, float* delta,
                     const ParallelFor& parallel_for);

  // Floats of workspace each worker of the forward (backward) pass needs.
  int64_t (*forward_workspace_floats)(const AttentionShape& shape,
                                      const LayoutTables& layout);
  int64_t (*backward_workspace_floats)(const AttentionShape& shape,
                                       const LayoutTables& layout);

  // Online-softmax attention over the layout's tiles; parallel over
  // (batch, head, group of consecutive query blocks). Non-finite inputs give
  // exactly the outputs exact arithmetic gives: a NaN score in an allowed
  // position makes its row NaN, and a non-finite value v[j, c] reaches
  // out[i, c] for exactly the rows i that attend key j (a row with no
  // allowed key stays zero).
  void (*forward)(const ForwardArgs& args, const ParallelFor& parallel_for);

  // Gradients recomputing scores from q, k and the saved stats; walks the
  // tiles in the forward's order, parallel over (batch, head). Masked-out
  // scores get probability and dS exactly 0, so NaN of a row or key reaches
  // the gradients through its allowed positions (the tile GEMMs still spread
  // it, as 0 * NaN, to the rows and keys that share a tile with it).
  void (*backward)(const BackwardArgs& args, const ParallelFor& parallel_for);
};

namespace avx2 {
extern const CpuCore kCpuCore;
}  // namespace avx2
namespace avx512 {
extern const CpuCore kCpuCore;
}  // namespace avx512

// The variant this process runs, chosen at the first call: the one that
// ST_KERAS_CPU_ISA names ("avx2" or "avx512"), else the widest this CPU
// supports. core is null when none can run (an unknown name, a forced
// variant this CPU lacks, or a CPU without AVX2 and FMA); error then says
// why.
struct CpuCoreChoice {
  const CpuCore* core = nullptr;
  std::string error;
};
const CpuCoreChoice& ChosenCpuCore();

}  // namespace st_keras

#endif  // ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_CORE_H_
