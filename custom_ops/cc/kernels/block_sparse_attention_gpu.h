// Framework-free GPU launcher of fused block-sparse attention.
//
// Launches the Triton kernels compiled ahead of time (compiled_kernels.h) on
// a given CUDA stream through the CUDA driver API. libcuda.so.1 is opened at
// the first call (dlopen), so a library that links this still loads, and
// runs its CPU kernels, on a machine without a driver: the calls then return
// an error message instead.
//
// Every pointer is device memory (the layout tables included), and every
// tensor is contiguous: q, k, v, out and the gradients [B, H, n, head_dim] of
// `dtype`; lse, dlse and delta [B, H, n] and stats [B, H, n, 2] float32.
#ifndef ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_GPU_H_
#define ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_GPU_H_

#include <cstddef>
#include <string>

#include "custom_ops/cc/kernels/block_sparse_attention_params.h"

namespace st_keras {
namespace gpu {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// How a launch addresses the tensors of one component of a layout.
struct ComponentIo {
  // The tensors are in original token order: kernel position p of head h is
  // row shape.key_positions[(h % table_heads) * n + p] (which must be
  // given), instead of
  // the component's kernel order.
  bool original_order = false;
  // Forward: continue the softmax from out and stats (a previous component
  // over the same rows), merging the two; backward: add to dq, dk, dv, and
  // take delta as the previous component's call left it (the same out,
  // dout and dlse give the same delta).
  bool accumulate = false;
};

// What a pass is given besides its tensors.
struct Problem {
  AttentionShape shape;
  LayoutTables layout;  // forward: the row-major table; backward: both
  ComponentIo io;
  DType dtype = DType::kFloat32;
};

struct ForwardArgs : Problem {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;    // -inf for a row with no allowed key
  float* stats = nullptr;  // (row max m, log l), l = sum exp(s - m)
};

struct BackwardArgs : Problem {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;
  const float* stats = nullptr;  // from the forward pass
  const void* dout = nullptr;
  const float* dlse = nullptr;
  float* delta = nullptr;  // rowsum(dout * out) - dlse, written (or read: io)
  void* dq = nullptr;      // overwritten (or added to: io)
  void* dk = nullptr;      // overwritten (or added to: io)
  void* dv = nullptr;      // overwritten (or added to: io)
};

// Whether kernels were compiled for this dtype, block size and head_dim
// (for some architecture). Others are rejected with an error message.
bool HasKernels(DType dtype, int64_t block_size, int64_t head_dim);

// Each returns "" on success, else what went wrong. `stream` is a CUstream
// (nullptr: the legacy default stream of the current context).
std::string Forward(const ForwardArgs& args, void* stream);
std::string Backward(const BackwardArgs& args, void* stream);
// An asynchronous copy of host memory to the device on `stream`.
std::string CopyToDevice(void* device, const void* host, size_t bytes,
                         void* stream);

// Checks, without a GPU, that every compiled kernel takes the parameters the
// launcher passes (count, order, types), needs no scratch memory and fits
// the shared memory of its architecture. Returns "" when all do.
std::string CheckCompiledKernels();

}  // namespace gpu
}  // namespace st_keras

#endif  // ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_GPU_H_
