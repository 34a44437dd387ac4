// TensorFlow GPU kernels of fused block-sparse attention: thin glue over the
// framework-free launcher (block_sparse_attention_gpu.h). The layout inputs
// are HostMemory: they are validated on the host, as on the CPU, then copied
// to one device buffer on the op's stream.
#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "custom_ops/cc/kernels/block_sparse_attention_gpu.h"
#include "custom_ops/cc/kernels/block_sparse_attention_inputs.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "xla/stream_executor/stream.h"

namespace tensorflow {
namespace st_keras_ops {
namespace {

namespace gpu = ::st_keras::gpu;

template <typename T>
constexpr gpu::DType kDType = gpu::DType::kFloat32;
template <>
constexpr gpu::DType kDType<Eigen::half> = gpu::DType::kFloat16;
template <>
constexpr gpu::DType kDType<Eigen::bfloat16> = gpu::DType::kBFloat16;

void* Stream(OpKernelContext* ctx) {
  return ctx->op_device_context()->stream()->platform_specific_handle().stream;
}

absl::Status Check(const std::string& error) {
  return error.empty() ? absl::OkStatus() : absl::InternalError(error);
}

// Copies the layout tables (and key lengths and positions) of `in` to device
// memory and points `in` at the copies. Each int32 table starts at a
// multiple of 4 elements: the kernels assume 16-byte aligned pointers.
absl::Status CopyTablesToDevice(OpKernelContext* ctx, bool backward,
                                Inputs* in, Tensor* ints, Tensor* masks) {
  auto& lay = in->layout;
  auto& shape = in->shape;
  const int64_t rows = int64_t{lay.table_heads} * lay.num_blocks + 1;
  std::vector<std::pair<const int32_t**, int64_t>> tables = {
      {&lay.row_ptr, rows}, {&lay.col_idx, in->nnz},
      {&lay.mask_idx, in->nnz}};
  if (backward) {
    tables.insert(tables.end(), {{&lay.col_ptr, rows},
                                 {&lay.row_idx, in->nnz},
                                 {&lay.col_mask_idx, in->nnz}});
  } else {
    lay.col_ptr = lay.row_idx = lay.col_mask_idx = nullptr;
  }
  if (shape.key_lengths != nullptr) {
    tables.push_back({&shape.key_lengths, shape.batch});
  }
  if (shape.key_positions != nullptr) {
    tables.push_back(
        {&shape.key_positions, int64_t{lay.table_heads} * shape.seq_len});
  }
  std::vector<int64_t> offsets;
  int64_t total = 0;
  for (const auto& table : tables) {
    offsets.push_back(total);
    total += (table.second + 3) / 4 * 4;
  }
  AllocatorAttributes host;
  host.set_on_host(true);
  Tensor staging;
  TF_RETURN_IF_ERROR(ctx->allocate_temp(DT_INT32, TensorShape({total}),
                                        &staging, host));
  TF_RETURN_IF_ERROR(ctx->allocate_temp(DT_INT32, TensorShape({total}), ints));
  int32_t* host_data = staging.flat<int32_t>().data();
  int32_t* device_data = ints->flat<int32_t>().data();
  for (size_t i = 0; i < tables.size(); ++i) {
    std::copy(*tables[i].first, *tables[i].first + tables[i].second,
              host_data + offsets[i]);
    *tables[i].first = device_data + offsets[i];
  }
  void* stream = Stream(ctx);
  TF_RETURN_IF_ERROR(Check(gpu::CopyToDevice(
      device_data, host_data, total * sizeof(int32_t), stream)));
  const int64_t mask_bytes =
      lay.num_masks * lay.block_size * lay.block_size;
  TF_RETURN_IF_ERROR(
      ctx->allocate_temp(DT_UINT8, TensorShape({mask_bytes}), masks));
  uint8_t* device_masks = masks->flat<uint8_t>().data();
  TF_RETURN_IF_ERROR(Check(
      gpu::CopyToDevice(device_masks, lay.masks, mask_bytes, stream)));
  lay.masks = device_masks;
  return absl::OkStatus();
}

// The forward pass.
template <typename T>
absl::Status GpuForward(OpKernelContext* ctx, const Inputs& in,
                        const ForwardOutputs& outputs) {
  const gpu::ForwardArgs args{{in.shape, in.layout, {}, kDType<T>},
                              ctx->input(0).data(),
                              ctx->input(1).data(),
                              ctx->input(2).data(),
                              outputs.out->data(),
                              outputs.lse->flat<float>().data(),
                              outputs.stats->flat<float>().data()};
  return Check(gpu::Forward(args, Stream(ctx)));
}

// The backward pass.
template <typename T>
absl::Status GpuBackward(OpKernelContext* ctx, const Inputs& in,
                         const GradOutputs& outputs) {
  Tensor delta;  // the launcher's scratch, [B, H, n] as dlse
  TF_RETURN_IF_ERROR(
      ctx->allocate_temp(DT_FLOAT, ctx->input(6).shape(), &delta));
  // Inputs q, k, v, out, stats, dout, dlse.
  const gpu::BackwardArgs args{{in.shape, in.layout, {}, kDType<T>},
                               ctx->input(0).data(),
                               ctx->input(1).data(),
                               ctx->input(2).data(),
                               ctx->input(3).data(),
                               ctx->input(4).flat<float>().data(),
                               ctx->input(5).data(),
                               ctx->input(6).flat<float>().data(),
                               delta.flat<float>().data(),
                               outputs.dq->data(),
                               outputs.dk->data(),
                               outputs.dv->data()};
  return Check(gpu::Backward(args, Stream(ctx)));
}

// The pass kLaunch (GpuForward or GpuBackward) of a kernel, with the tables
// of `in` copied to the device.
template <typename Outputs, absl::Status (*kLaunch)(OpKernelContext*,
                                                    const Inputs&,
                                                    const Outputs&)>
absl::Status WithDeviceTables(OpKernelContext* ctx, Inputs* in,
                              const Outputs& outputs) {
  constexpr bool kBackward = std::is_same_v<Outputs, GradOutputs>;
  Tensor ints, masks;  // the copies; freed once the kernels are enqueued
  TF_RETURN_IF_ERROR(CopyTablesToDevice(ctx, kBackward, in, &ints, &masks));
  return kLaunch(ctx, *in, outputs);
}

// The layout inputs stay in host memory, where they are checked.
#define ST_KERAS_HOST_LAYOUT_INPUTS                                      \
  HostMemory("key_lengths")                                              \
      .HostMemory("key_positions")                                       \
      .HostMemory("row_ptr")                                             \
      .HostMemory("col_idx")                                             \
      .HostMemory("mask_idx")                                            \
      .HostMemory("masks")                                               \
      .HostMemory("col_ptr")                                             \
      .HostMemory("row_idx")                                             \
      .HostMemory("col_mask_idx")

#define REGISTER_GPU(T)                                                      \
  REGISTER_KERNEL_BUILDER(                                                   \
      Name("SparseTransformer>BlockSparseAttention")                         \
          .Device(DEVICE_GPU)                                                \
          .TypeConstraint<T>("T")                                            \
          .ST_KERAS_HOST_LAYOUT_INPUTS,                                      \
      BlockSparseAttentionPass<                                              \
          ForwardOutputs, WithDeviceTables<ForwardOutputs, GpuForward<T>>>); \
  REGISTER_KERNEL_BUILDER(                                                   \
      Name("SparseTransformer>BlockSparseAttentionGrad")                     \
          .Device(DEVICE_GPU)                                                \
          .TypeConstraint<T>("T")                                            \
          .ST_KERAS_HOST_LAYOUT_INPUTS,                                      \
      BlockSparseAttentionPass<                                              \
          GradOutputs, WithDeviceTables<GradOutputs, GpuBackward<T>>>);

REGISTER_GPU(float);
REGISTER_GPU(Eigen::half);
REGISTER_GPU(Eigen::bfloat16);
#undef REGISTER_GPU
#undef ST_KERAS_HOST_LAYOUT_INPUTS

}  // namespace
}  // namespace st_keras_ops
}  // namespace tensorflow
