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

// The launcher's shape and tables of `p`, or an error message.
std::string Convert(const st_bsa_gpu_problem& p, ::st_keras::AttentionShape* s,
                    ::st_keras::LayoutTables* t, gpu::ComponentIo* io,
                    gpu::DType* dtype) {
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
  s->batch = p.batch;
  s->heads = p.heads;
  s->seq_len = p.seq_len;
  s->head_dim = p.head_dim;
  s->scale = p.scale;
  s->key_lengths = p.key_lengths;
  s->key_positions = p.key_positions;
  t->num_heads = static_cast<int>(p.heads);
  t->table_heads = static_cast<int>(p.table_heads);
  t->num_blocks = static_cast<int>(p.seq_len / p.block_size);
  t->block_size = p.block_size;
  t->num_masks = p.num_masks;
  t->row_ptr = p.row_ptr;
  t->col_idx = p.col_idx;
  t->mask_idx = p.mask_idx;
  t->masks = p.masks;
  t->col_ptr = p.col_ptr;
  t->row_idx = p.row_idx;
  t->col_mask_idx = p.col_mask_idx;
  io->original_order = p.original_order != 0;
  io->accumulate = p.accumulate != 0;
  *dtype = static_cast<gpu::DType>(p.dtype);
  return "";
}

}  // namespace

extern "C" int st_bsa_gpu_forward(const st_bsa_gpu_problem* problem,
                                  const void* q, const void* k, const void* v,
                                  void* out, float* lse, float* stats,
                                  void* stream, char* error,
                                  size_t error_size) {
  gpu::ForwardArgs args;
  std::string message = problem == nullptr
                            ? "problem is null"
                            : Convert(*problem, &args.shape, &args.layout,
                                      &args.io, &args.dtype);
  if (message.empty()) {
    args.q = q;
    args.k = k;
    args.v = v;
    args.out = out;
    args.lse = lse;
    args.stats = stats;
    message = gpu::Forward(args, stream);
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
  gpu::BackwardArgs args;
  std::string message = problem == nullptr
                            ? "problem is null"
                            : Convert(*problem, &args.shape, &args.layout,
                                      &args.io, &args.dtype);
  if (message.empty() && (problem->col_ptr == nullptr ||
                          problem->row_idx == nullptr ||
                          problem->col_mask_idx == nullptr)) {
    message = "the backward pass needs the column-major table (col_ptr, "
              "row_idx, col_mask_idx)";
  }
  if (message.empty()) {
    args.q = q;
    args.k = k;
    args.v = v;
    args.out = out;
    args.stats = stats;
    args.dout = dout;
    args.dlse = dlse;
    args.delta = delta;
    args.dq = dq;
    args.dk = dk;
    args.dv = dv;
    message = gpu::Backward(args, stream);
  }
  return Report(message, error, error_size);
}

extern "C" int st_bsa_gpu_self_check(char* error, size_t error_size) {
  return Report(gpu::CheckCompiledKernels(), error, error_size);
}
