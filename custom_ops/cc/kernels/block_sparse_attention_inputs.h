// Input validation shared by the CPU and GPU TensorFlow kernels of fused
// block-sparse attention: shapes, the layout tables (read on the host, where
// the GPU kernels keep them as HostMemory inputs) and the scale.
#ifndef ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_INPUTS_H_
#define ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_INPUTS_H_

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "custom_ops/cc/kernels/block_sparse_attention_params.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace tensorflow {
namespace st_keras_ops {

template <typename... Args>
absl::Status InvalidArg(const Args&... args) {
  return absl::InvalidArgumentError(absl::StrCat(args...));
}

// Validated inputs common to both ops; the pointers are host memory.
struct Inputs {
  ::st_keras::AttentionShape shape;
  ::st_keras::LayoutTables layout;
  int64_t nnz = 0;  // tiles in the layout
};

// The outputs of the forward op: out [B, H, n, d] (q's dtype), lse
// [B, H, n] and stats [B, H, n, 2] (float32).
struct ForwardOutputs {
  Tensor* out = nullptr;
  Tensor* lse = nullptr;
  Tensor* stats = nullptr;
};

// The outputs of the gradient op: dq, dk and dv, each of q's shape.
struct GradOutputs {
  Tensor* dq = nullptr;
  Tensor* dk = nullptr;
  Tensor* dv = nullptr;
};

// What every kernel of the two ops shares, on any device: the checked
// `scale` attribute, and the start of Compute, which checks q, k, v (and for
// the gradient op out, stats, dout and dlse) and the layout inputs, then
// allocates the outputs. The layout inputs are key_lengths, key_positions,
// row_ptr, col_idx, mask_idx, masks, col_ptr, row_idx and col_mask_idx.
class BlockSparseAttentionKernel : public OpKernel {
 public:
  explicit BlockSparseAttentionKernel(OpKernelConstruction* ctx);

 protected:
  // The forward op's start.
  absl::Status Start(OpKernelContext* ctx, Inputs* in,
                     ForwardOutputs* outputs) const;
  // The gradient op's start.
  absl::Status Start(OpKernelContext* ctx, Inputs* in,
                     GradOutputs* outputs) const;

  float scale_ = 0.0f;
};

// The kernel of the forward op (Outputs = ForwardOutputs) or the gradient
// op (GradOutputs) whose pass is kRun (a device's): Compute starts, then runs
// the pass unless q is empty. kRun gets the checked inputs (host pointers; a
// device may point them at its copies) and the allocated outputs.
template <typename Outputs,
          absl::Status (*kRun)(OpKernelContext*, Inputs*, const Outputs&)>
class BlockSparseAttentionPass : public BlockSparseAttentionKernel {
 public:
  using BlockSparseAttentionKernel::BlockSparseAttentionKernel;

  void Compute(OpKernelContext* ctx) override {
    Inputs in;
    Outputs outputs;
    OP_REQUIRES_OK(ctx, Start(ctx, &in, &outputs));
    if (ctx->input(0).NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, kRun(ctx, &in, outputs));
  }
};

}  // namespace st_keras_ops
}  // namespace tensorflow

#endif  // ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_INPUTS_H_
