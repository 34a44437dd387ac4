// TensorFlow CPU kernels of fused block-sparse attention: dtype conversion
// to float32, every allocation (as TensorFlow tensors, so a
// failure is an error status) and the thread pool; the math is in
// block_sparse_attention_core.cc, in the variant ChosenCpuCore() picks for
// this CPU.
#define EIGEN_USE_THREADS

#include <type_traits>

#include "absl/status/status.h"
#include "custom_ops/cc/kernels/block_sparse_attention_core.h"
#include "custom_ops/cc/kernels/block_sparse_attention_inputs.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tensorflow {
namespace st_keras_ops {
namespace {

using CPUDevice = Eigen::ThreadPoolDevice;

thread::ThreadPool* Workers(OpKernelContext* ctx) {
  return ctx->device()->tensorflow_cpu_worker_threads()->workers;
}

// Worker ids are those of ParallelForWithWorkerId: 0 for the calling thread,
// 1 .. NumThreads() for the pool's.
::st_keras::ParallelFor MakeParallelFor(OpKernelContext* ctx) {
  thread::ThreadPool* workers = Workers(ctx);
  return [workers](int64_t total, int64_t cost,
                   const std::function<void(int64_t, int64_t, int)>& fn) {
    workers->ParallelForWithWorkerId(
        total, thread::ThreadPool::SchedulingParams::Adaptive(cost), fn);
  };
}

// Scratch of `floats_per_worker` floats for each worker MakeParallelFor can
// run: [NumThreads() + 1, floats_per_worker].
absl::Status AllocateWorkspace(OpKernelContext* ctx, int64_t floats_per_worker,
                               Tensor* workspace) {
  TensorShape shape;
  TF_RETURN_IF_ERROR(TensorShape::BuildTensorShape(
      {Workers(ctx)->NumThreads() + 1, floats_per_worker}, &shape));
  return ctx->allocate_temp(DT_FLOAT, shape, workspace);
}

// A float32 view of `t`: the tensor itself for float, else a converted copy
// in `scratch`.
template <typename T>
absl::Status AsFloat(OpKernelContext* ctx, const Tensor& t, Tensor* scratch,
               const float** out) {
  if constexpr (std::is_same_v<T, float>) {
    *out = t.flat<float>().data();
  } else {
    TF_RETURN_IF_ERROR(ctx->allocate_temp(DT_FLOAT, t.shape(), scratch));
    scratch->flat<float>().device(ctx->eigen_device<CPUDevice>()) =
        t.flat<T>().template cast<float>();
    *out = scratch->flat<float>().data();
  }
  return absl::OkStatus();
}

// A float32 buffer for output `t`: the tensor itself for float, else
// `scratch`, copied back by `FinishOutput`.
template <typename T>
absl::Status FloatOutput(OpKernelContext* ctx, Tensor* t, Tensor* scratch,
                   float** out) {
  if constexpr (std::is_same_v<T, float>) {
    *out = t->flat<float>().data();
  } else {
    TF_RETURN_IF_ERROR(ctx->allocate_temp(DT_FLOAT, t->shape(), scratch));
    *out = scratch->flat<float>().data();
  }
  return absl::OkStatus();
}

template <typename T>
void FinishOutput(OpKernelContext* ctx, const Tensor& scratch, Tensor* t) {
  if constexpr (!std::is_same_v<T, float>) {
    t->flat<T>().device(ctx->eigen_device<CPUDevice>()) =
        scratch.flat<float>().template cast<T>();
  }
}

// The forward pass: q, k, v in float32, the op's outputs.
template <typename T>
absl::Status CpuForward(OpKernelContext* ctx, const ::st_keras::CpuCore& core,
                        const Inputs& in, const ForwardOutputs& outputs) {
  const Tensor& q = ctx->input(0);
  Tensor q32, k32, v32, out32, kt, workspace;
  ::st_keras::ForwardArgs args;
  args.shape = in.shape;
  args.layout = in.layout;
  const float* k = nullptr;
  TF_RETURN_IF_ERROR(AsFloat<T>(ctx, q, &q32, &args.q));
  TF_RETURN_IF_ERROR(AsFloat<T>(ctx, ctx->input(1), &k32, &k));
  TF_RETURN_IF_ERROR(AsFloat<T>(ctx, ctx->input(2), &v32, &args.v));
  TF_RETURN_IF_ERROR(ctx->allocate_temp(DT_FLOAT, q.shape(), &kt));
  TF_RETURN_IF_ERROR(FloatOutput<T>(ctx, outputs.out, &out32, &args.out));
  TF_RETURN_IF_ERROR(AllocateWorkspace(
      ctx, core.forward_workspace_floats(in.shape, in.layout), &workspace));
  args.lse = outputs.lse->flat<float>().data();
  args.stats = outputs.stats->flat<float>().data();
  args.workspace = workspace.flat<float>().data();
  auto parallel_for = MakeParallelFor(ctx);
  const int64_t bh = in.shape.batch * in.shape.heads;
  core.transpose_tiles(k, bh, in.layout.num_blocks, in.layout.block_size,
                       in.shape.head_dim, kt.flat<float>().data(),
                       parallel_for);
  args.kt = kt.flat<float>().data();
  core.forward(args, parallel_for);
  FinishOutput<T>(ctx, out32, outputs.out);
  return absl::OkStatus();
}

// The backward pass: q, k, v, out, dout in float32, delta, dq, dk, dv.
template <typename T>
absl::Status CpuBackward(OpKernelContext* ctx, const ::st_keras::CpuCore& core,
                         const Inputs& in, const GradOutputs& outputs) {
  const Tensor& q = ctx->input(0);
  const Tensor& stats = ctx->input(4);
  const Tensor& dlse = ctx->input(6);
  ::st_keras::BackwardArgs args;
  args.shape = in.shape;
  args.layout = in.layout;
  Tensor q32, k32, v32, out32, dout32, kt, vt, delta, dq32, dk32, dv32;
  Tensor workspace;
  const float* out = nullptr;
  const float* v = nullptr;
  TF_RETURN_IF_ERROR(AsFloat<T>(ctx, q, &q32, &args.q));
  TF_RETURN_IF_ERROR(AsFloat<T>(ctx, ctx->input(1), &k32, &args.k));
  TF_RETURN_IF_ERROR(AsFloat<T>(ctx, ctx->input(2), &v32, &v));
  TF_RETURN_IF_ERROR(AsFloat<T>(ctx, ctx->input(3), &out32, &out));
  TF_RETURN_IF_ERROR(AsFloat<T>(ctx, ctx->input(5), &dout32, &args.dout));
  TF_RETURN_IF_ERROR(ctx->allocate_temp(DT_FLOAT, q.shape(), &kt));
  TF_RETURN_IF_ERROR(ctx->allocate_temp(DT_FLOAT, q.shape(), &vt));
  TF_RETURN_IF_ERROR(ctx->allocate_temp(DT_FLOAT, dlse.shape(), &delta));
  TF_RETURN_IF_ERROR(FloatOutput<T>(ctx, outputs.dq, &dq32, &args.dq));
  TF_RETURN_IF_ERROR(FloatOutput<T>(ctx, outputs.dk, &dk32, &args.dk));
  TF_RETURN_IF_ERROR(FloatOutput<T>(ctx, outputs.dv, &dv32, &args.dv));
  TF_RETURN_IF_ERROR(AllocateWorkspace(
      ctx, core.backward_workspace_floats(in.shape, in.layout), &workspace));
  args.workspace = workspace.flat<float>().data();

  auto parallel_for = MakeParallelFor(ctx);
  const int64_t bh = in.shape.batch * in.shape.heads;
  const int64_t nb = in.layout.num_blocks, bs = in.layout.block_size;
  const int64_t d = in.shape.head_dim;
  core.transpose_tiles(args.k, bh, nb, bs, d, kt.flat<float>().data(),
                       parallel_for);
  core.transpose_tiles(v, bh, nb, bs, d, vt.flat<float>().data(),
                       parallel_for);
  core.row_deltas(args.dout, out, dlse.flat<float>().data(),
                  bh * in.shape.seq_len, d, delta.flat<float>().data(),
                  parallel_for);
  args.kt = kt.flat<float>().data();
  args.vt = vt.flat<float>().data();
  args.stats = stats.flat<float>().data();
  args.delta = delta.flat<float>().data();
  core.backward(args, parallel_for);
  FinishOutput<T>(ctx, dq32, outputs.dq);
  FinishOutput<T>(ctx, dk32, outputs.dk);
  FinishOutput<T>(ctx, dv32, outputs.dv);
  return absl::OkStatus();
}

// The pass kPass (CpuForward or CpuBackward) of a kernel, on the core
// variant this process runs (ChosenCpuCore); an error when none can run on
// this CPU, or ST_KERAS_CPU_ISA forces one it cannot run.
template <typename Outputs,
          absl::Status (*kPass)(OpKernelContext*, const ::st_keras::CpuCore&,
                                const Inputs&, const Outputs&)>
absl::Status OnCpuCore(OpKernelContext* ctx, Inputs* in,
                       const Outputs& outputs) {
  const ::st_keras::CpuCoreChoice& choice = ::st_keras::ChosenCpuCore();
  if (choice.core == nullptr) {
    return absl::FailedPreconditionError(choice.error);
  }
  return kPass(ctx, *choice.core, *in, outputs);
}

#define REGISTER_CPU(T)                                                 \
  REGISTER_KERNEL_BUILDER(                                              \
      Name("SparseTransformer>BlockSparseAttention")                    \
          .Device(DEVICE_CPU)                                           \
          .TypeConstraint<T>("T"),                                      \
      BlockSparseAttentionPass<                                         \
          ForwardOutputs, OnCpuCore<ForwardOutputs, CpuForward<T>>>);   \
  REGISTER_KERNEL_BUILDER(                                              \
      Name("SparseTransformer>BlockSparseAttentionGrad")                \
          .Device(DEVICE_CPU)                                           \
          .TypeConstraint<T>("T"),                                      \
      BlockSparseAttentionPass<                                         \
          GradOutputs, OnCpuCore<GradOutputs, CpuBackward<T>>>);

REGISTER_CPU(float);
REGISTER_CPU(Eigen::half);
REGISTER_CPU(Eigen::bfloat16);
#undef REGISTER_CPU

}  // namespace
}  // namespace st_keras_ops
}  // namespace tensorflow
