// C ABI over the GPU launcher (block_sparse_attention_c_api.h).
#include "custom_ops/cc/kernels/block_sparse_attention_c_api.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "custom_ops/cc/kernels/block_sparse_attention_gpu.h"

namespace {

namespace gpu = ::st_keras::gpu;

int Report(const std::string& message, char* error, size_t error_size) {
  if (message.empty()) return 0;
  if (error != nullptr && error_size > 0) {
    const size_t n = std::min(message.size(), error_size - 1);
    std::memcpy(error, message.data(), n);
    error[n] = '\0';
  }
  return 1;
}

// The launcher's problem of `p` into `out`, or an error message.
std::string Convert(const st_bsa_gpu_problem* problem, gpu::Problem* out) {
  if (problem == nullptr) return "problem is null";
  const st_bsa_gpu_problem& p = *problem;
  if (p.batch < 1 || p.heads < 1 || p.seq_len < 1 || p.head_dim < 1) {
    return "batch, heads, seq_len and head_dim must be positive";
  }
  if (!::st_keras::IsSupportedBlockSize(p.block_size) ||
      p.seq_len % p.block_size != 0) {
    return "block_size " + std::to_string(p.block_size) +
           " must be 16, 32, 64 or 128 and divide seq_len " +
           std::to_string(p.seq_len);
  }
  if (p.table_heads < 1 || p.heads % p.table_heads != 0) {
    return "table_heads must divide heads = " + std::to_string(p.heads) +
           ", got " + std::to_string(p.table_heads);
  }
  if (p.dtype < 0 || p.dtype > 2) {
    return "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
           std::to_string(p.dtype);
  }
  if (!(p.scale > 0.0f) || !std::isfinite(p.scale)) {
    return "scale must be positive and finite";
  }
  // In the order AttentionShape and LayoutTables declare their fields.
  out->shape = {p.batch, p.heads, p.seq_len, p.head_dim, p.scale,
                p.key_lengths, p.key_positions};
  out->layout = {static_cast<int>(p.heads), static_cast<int>(p.table_heads),
                 static_cast<int>(p.seq_len / p.block_size), p.block_size,
                 p.num_masks, p.row_ptr, p.col_idx, p.mask_idx, p.masks,
                 p.col_ptr, p.row_idx, p.col_mask_idx};
  out->io = {p.original_order != 0, p.accumulate != 0};
  out->dtype = static_cast<gpu::DType>(p.dtype);
  return "";
}

}  // namespace

extern "C" int st_bsa_gpu_forward(const st_bsa_gpu_problem* problem,
                                  const void* q, const void* k, const void* v,
                                  void* out, float* lse, float* stats,
                                  void* stream, char* error,
                                  size_t error_size) {
  gpu::Problem p;
  std::string message = Convert(problem, &p);
  if (message.empty()) {
    message = gpu::Forward({p, q, k, v, out, lse, stats}, stream);
  }
  return Report(message, error, error_size);
}

extern "C" int st_bsa_gpu_backward(const st_bsa_gpu_problem* problem,
                                   const void* q, const void* k, const void* v,
                                   const void* out, const float* stats,
                                   const void* dout, const float* dlse,
                                   float* delta, void* dq, void* dk, void* dv,
                                   void* stream, char* error,
                                   size_t error_size) {
  gpu::Problem p;
  std::string message = Convert(problem, &p);
  if (message.empty() && (problem->col_ptr == nullptr ||
                          problem->row_idx == nullptr ||
                          problem->col_mask_idx == nullptr)) {
    message = "the backward pass needs the column-major table (col_ptr, "
              "row_idx, col_mask_idx)";
  }
  if (message.empty()) {
    message = gpu::Backward(
        {p, q, k, v, out, stats, dout, dlse, delta, dq, dk, dv}, stream);
  }
  return Report(message, error, error_size);
}

extern "C" int st_bsa_gpu_self_check(char* error, size_t error_size) {
  return Report(gpu::CheckCompiledKernels(), error, error_size);
}
