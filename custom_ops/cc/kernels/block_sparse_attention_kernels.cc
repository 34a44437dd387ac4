// TensorFlow CPU kernels of fused block-sparse attention: input validation,
// dtype conversion to float32, every allocation (as TensorFlow tensors, so a
// failure is an error status) and the thread pool; the math is in
// block_sparse_attention_core.cc.
#define EIGEN_USE_THREADS

#include <cmath>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "custom_ops/cc/kernels/block_sparse_attention_core.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tensorflow {
namespace st_keras_ops {
namespace {

using CPUDevice = Eigen::ThreadPoolDevice;

template <typename... Args>
absl::Status InvalidArg(const Args&... args) {
  return absl::InvalidArgumentError(absl::StrCat(args...));
}

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

// Checks the tile table: ptr [heads * nb + 1] nondecreasing from 0 to nnz,
// idx in [0, nb), mask ids in [-1, num_masks).
absl::Status CheckTileTable(const char* ptr_name, const Tensor& ptr,
                      const char* idx_name, const Tensor& idx,
                      const char* mask_name, const Tensor& mask_idx,
                      int64_t rows, int64_t nb, int64_t num_masks) {
  if (ptr.dims() != 1 || ptr.dim_size(0) != rows + 1) {
    return InvalidArg(
        ptr_name, " must have shape [heads * num_blocks + 1] = [", rows + 1,
        "], got ", ptr.shape().DebugString(),
        " (is the layout built for this seq_len and num_heads?)");
  }
  const int64_t nnz = idx.NumElements();
  if (idx.dims() != 1 || mask_idx.dims() != 1 ||
      mask_idx.NumElements() != nnz) {
    return InvalidArg(idx_name, " and ", mask_name,
                                   " must be vectors of one length, got ",
                                   idx.shape().DebugString(), " and ",
                                   mask_idx.shape().DebugString());
  }
  auto p = ptr.flat<int32_t>();
  if (p(0) != 0 || p(rows) != nnz) {
    return InvalidArg(ptr_name, " must run from 0 to ", nnz,
                                   ", got ", p(0), " .. ", p(rows));
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (p(r + 1) < p(r)) {
      return InvalidArg(ptr_name, " must be nondecreasing");
    }
  }
  auto ix = idx.flat<int32_t>();
  auto mx = mask_idx.flat<int32_t>();
  for (int64_t e = 0; e < nnz; ++e) {
    if (ix(e) < 0 || ix(e) >= nb) {
      return InvalidArg(idx_name, "[", e, "] = ", ix(e),
                                     " is outside [0, ", nb, ")");
    }
    if (mx(e) < -1 || mx(e) >= num_masks) {
      return InvalidArg(mask_name, "[", e, "] = ", mx(e),
                                     " is outside [-1, ", num_masks, ")");
    }
  }
  return absl::OkStatus();
}

// Validated inputs common to both ops. `first_layout_input` is the index of
// key_lengths; the five other layout inputs follow it.
struct Inputs {
  ::st_keras::AttentionShape shape;
  ::st_keras::LayoutTables layout;
};

absl::Status ParseInputs(OpKernelContext* ctx, int first_layout_input, float scale,
                   Inputs* in) {
  const Tensor& q = ctx->input(0);
  const Tensor& k = ctx->input(1);
  const Tensor& v = ctx->input(2);
  if (q.dims() != 4) {
    return InvalidArg(
        "q must have rank 4 [batch, heads, n, head_dim], got shape ",
        q.shape().DebugString());
  }
  if (k.shape() != q.shape() || v.shape() != q.shape()) {
    return InvalidArg(
        "q, k and v must have one shape, got q ", q.shape().DebugString(),
        ", k ", k.shape().DebugString(), ", v ", v.shape().DebugString());
  }
  const int64_t B = q.dim_size(0), H = q.dim_size(1), n = q.dim_size(2),
                d = q.dim_size(3);
  if (d <= 0) return InvalidArg("head_dim must be positive");
  const int i0 = first_layout_input;
  const Tensor& key_lengths = ctx->input(i0);
  const Tensor& key_positions = ctx->input(i0 + 1);
  const Tensor& masks = ctx->input(i0 + 5);
  if (masks.dims() != 3 || masks.dim_size(1) != masks.dim_size(2) ||
      masks.dim_size(1) <= 0) {
    return InvalidArg(
        "masks must have shape [num_masks, block_size, block_size], got ",
        masks.shape().DebugString());
  }
  const int64_t bs = masks.dim_size(1);
  if (!::st_keras::IsSupportedBlockSize(bs)) {
    return InvalidArg("block size (masks.shape[1]) must be one of 16, 32, 64, "
                      "128, got ", bs);
  }
  if (n % bs != 0) {
    return InvalidArg("sequence length n = ", n,
                                   " is not a multiple of the block size ",
                                   bs);
  }
  const int64_t nb = n / bs;
  if (!(key_lengths.dims() == 1 &&
        (key_lengths.dim_size(0) == 0 || key_lengths.dim_size(0) == B))) {
    return InvalidArg("key_lengths must have shape [batch] = [",
                                   B, "] or be empty, got ",
                                   key_lengths.shape().DebugString());
  }
  if (!(key_positions.NumElements() == 0 ||
        (key_positions.dims() == 2 && key_positions.dim_size(0) == H &&
         key_positions.dim_size(1) == n))) {
    return InvalidArg(
        "key_positions must have shape [heads, n] = [", H, ", ", n,
        "] or be empty, got ", key_positions.shape().DebugString());
  }
  const int64_t M = masks.dim_size(0);
  TF_RETURN_IF_ERROR(CheckTileTable(
      "row_ptr", ctx->input(i0 + 2), "col_idx", ctx->input(i0 + 3),
      "mask_idx", ctx->input(i0 + 4), H * nb, nb, M));

  in->shape.batch = B;
  in->shape.heads = H;
  in->shape.seq_len = n;
  in->shape.head_dim = d;
  in->shape.scale = scale;
  in->shape.key_lengths =
      key_lengths.NumElements() ? key_lengths.flat<int32_t>().data() : nullptr;
  in->shape.key_positions = key_positions.NumElements()
                                ? key_positions.flat<int32_t>().data()
                                : nullptr;
  auto& lay = in->layout;
  lay.num_heads = static_cast<int>(H);
  lay.num_blocks = static_cast<int>(nb);
  lay.block_size = static_cast<int>(bs);
  lay.num_masks = M;
  lay.row_ptr = ctx->input(i0 + 2).flat<int32_t>().data();
  lay.col_idx = ctx->input(i0 + 3).flat<int32_t>().data();
  lay.mask_idx = ctx->input(i0 + 4).flat<int32_t>().data();
  lay.masks = masks.flat<uint8_t>().data();
  return absl::OkStatus();
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

template <typename T>
class BlockSparseAttentionOp : public OpKernel {
 public:
  explicit BlockSparseAttentionOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
    OP_REQUIRES(ctx, std::isfinite(scale_) && scale_ > 0.0f,
                InvalidArg("scale must be positive and finite, got ", scale_));
  }

  void Compute(OpKernelContext* ctx) override {
    Inputs in;
    OP_REQUIRES_OK(ctx, ParseInputs(ctx, /*first_layout_input=*/3, scale_,
                                    &in));
    const Tensor& q = ctx->input(0);
    Tensor* out = nullptr;
    Tensor* lse = nullptr;
    Tensor* stats = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, q.shape(), &out));
    TensorShape lse_shape({q.dim_size(0), q.dim_size(1), q.dim_size(2)});
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, lse_shape, &lse));
    TensorShape stats_shape = lse_shape;
    stats_shape.AddDim(2);
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, stats_shape, &stats));
    if (q.NumElements() == 0) return;

    Tensor q32, k32, v32, out32, kt, workspace;
    ::st_keras::ForwardArgs args;
    args.shape = in.shape;
    args.layout = in.layout;
    const float* k = nullptr;
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, q, &q32, &args.q));
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, ctx->input(1), &k32, &k));
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, ctx->input(2), &v32, &args.v));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(DT_FLOAT, q.shape(), &kt));
    OP_REQUIRES_OK(ctx, FloatOutput<T>(ctx, out, &out32, &args.out));
    OP_REQUIRES_OK(ctx, AllocateWorkspace(
                            ctx,
                            ::st_keras::ForwardWorkspaceFloats(in.shape,
                                                               in.layout),
                            &workspace));
    args.lse = lse->flat<float>().data();
    args.stats = stats->flat<float>().data();
    args.workspace = workspace.flat<float>().data();
    auto parallel_for = MakeParallelFor(ctx);
    const int64_t bh = in.shape.batch * in.shape.heads;
    ::st_keras::TransposeTiles(k, bh, in.layout.num_blocks,
                               in.layout.block_size, in.shape.head_dim,
                               kt.flat<float>().data(), parallel_for);
    args.kt = kt.flat<float>().data();
    ::st_keras::BlockSparseAttentionForward(args, parallel_for);
    FinishOutput<T>(ctx, out32, out);
  }

 private:
  float scale_;
};

template <typename T>
class BlockSparseAttentionGradOp : public OpKernel {
 public:
  explicit BlockSparseAttentionGradOp(OpKernelConstruction* ctx)
      : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
    OP_REQUIRES(ctx, std::isfinite(scale_) && scale_ > 0.0f,
                InvalidArg("scale must be positive and finite, got ", scale_));
  }

  void Compute(OpKernelContext* ctx) override {
    Inputs in;
    OP_REQUIRES_OK(ctx, ParseInputs(ctx, /*first_layout_input=*/7, scale_,
                                    &in));
    const Tensor& q = ctx->input(0);
    const Tensor& out = ctx->input(3);
    const Tensor& stats = ctx->input(4);
    const Tensor& dout = ctx->input(5);
    const Tensor& dlse = ctx->input(6);
    const TensorShape lse_shape({q.dim_size(0), q.dim_size(1),
                                 q.dim_size(2)});
    TensorShape stats_shape = lse_shape;
    stats_shape.AddDim(2);
    OP_REQUIRES(ctx, out.shape() == q.shape() && dout.shape() == q.shape(),
                InvalidArg(
                    "out and dout must have the shape of q ",
                    q.shape().DebugString(), ", got ",
                    out.shape().DebugString(), " and ",
                    dout.shape().DebugString()));
    OP_REQUIRES(ctx, stats.shape() == stats_shape,
                InvalidArg("stats must have shape [batch, heads, n, 2] = ",
                           stats_shape.DebugString(), ", got ",
                           stats.shape().DebugString()));
    OP_REQUIRES(ctx, dlse.shape() == lse_shape,
                InvalidArg("dlse must have shape [batch, heads, n] = ",
                           lse_shape.DebugString(), ", got ",
                           dlse.shape().DebugString()));
    Tensor *dq = nullptr, *dk = nullptr, *dv = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, q.shape(), &dq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, q.shape(), &dk));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, q.shape(), &dv));
    if (q.NumElements() == 0) return;

    ::st_keras::BackwardArgs args;
    args.shape = in.shape;
    args.layout = in.layout;
    Tensor q32, k32, v32, out32, dout32, kt, vt, delta, dq32, dk32, dv32;
    Tensor workspace;
    const float* out_f = nullptr;
    const float* v = nullptr;
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, q, &q32, &args.q));
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, ctx->input(1), &k32, &args.k));
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, ctx->input(2), &v32, &v));
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, out, &out32, &out_f));
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, dout, &dout32, &args.dout));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(DT_FLOAT, q.shape(), &kt));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(DT_FLOAT, q.shape(), &vt));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(DT_FLOAT, lse_shape, &delta));
    OP_REQUIRES_OK(ctx, FloatOutput<T>(ctx, dq, &dq32, &args.dq));
    OP_REQUIRES_OK(ctx, FloatOutput<T>(ctx, dk, &dk32, &args.dk));
    OP_REQUIRES_OK(ctx, FloatOutput<T>(ctx, dv, &dv32, &args.dv));
    OP_REQUIRES_OK(ctx, AllocateWorkspace(
                            ctx,
                            ::st_keras::BackwardWorkspaceFloats(in.shape,
                                                                in.layout),
                            &workspace));
    args.workspace = workspace.flat<float>().data();

    auto parallel_for = MakeParallelFor(ctx);
    const int64_t bh = in.shape.batch * in.shape.heads;
    const int64_t nb = in.layout.num_blocks, bs = in.layout.block_size;
    const int64_t d = in.shape.head_dim;
    ::st_keras::TransposeTiles(args.k, bh, nb, bs, d, kt.flat<float>().data(),
                               parallel_for);
    ::st_keras::TransposeTiles(v, bh, nb, bs, d, vt.flat<float>().data(),
                               parallel_for);
    ::st_keras::RowDeltas(args.dout, out_f, dlse.flat<float>().data(),
                          bh * in.shape.seq_len, d,
                          delta.flat<float>().data(), parallel_for);
    args.kt = kt.flat<float>().data();
    args.vt = vt.flat<float>().data();
    args.stats = stats.flat<float>().data();
    args.delta = delta.flat<float>().data();
    ::st_keras::BlockSparseAttentionBackward(args, parallel_for);
    FinishOutput<T>(ctx, dq32, dq);
    FinishOutput<T>(ctx, dk32, dk);
    FinishOutput<T>(ctx, dv32, dv);
  }

 private:
  float scale_;
};

#define REGISTER_CPU(T)                                                   \
  REGISTER_KERNEL_BUILDER(Name("SparseTransformer>BlockSparseAttention")  \
                              .Device(DEVICE_CPU)                         \
                              .TypeConstraint<T>("T"),                    \
                          BlockSparseAttentionOp<T>);                     \
  REGISTER_KERNEL_BUILDER(                                                \
      Name("SparseTransformer>BlockSparseAttentionGrad")                  \
          .Device(DEVICE_CPU)                                             \
          .TypeConstraint<T>("T"),                                        \
      BlockSparseAttentionGradOp<T>);

REGISTER_CPU(float);
REGISTER_CPU(Eigen::half);
REGISTER_CPU(Eigen::bfloat16);
#undef REGISTER_CPU

}  // namespace
}  // namespace st_keras_ops
}  // namespace tensorflow
