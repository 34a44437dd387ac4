// Input validation of the fused block-sparse attention kernels.
#include "custom_ops/cc/kernels/block_sparse_attention_inputs.h"

#include <cmath>

#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace tensorflow {
namespace st_keras_ops {
namespace {

// Index of key_lengths, the first layout input, in each op.
constexpr int kForwardLayoutInput = 3;
constexpr int kGradLayoutInput = 7;

// Checks the tile table: ptr [table_heads * nb + 1] nondecreasing from 0 to
// nnz, idx in [0, nb), mask ids in [-1, num_masks).
absl::Status CheckTileTable(const char* ptr_name, const Tensor& ptr,
                      const char* idx_name, const Tensor& idx,
                      const char* mask_name, const Tensor& mask_idx,
                      int64_t rows, int64_t nb, int64_t num_masks) {
  if (ptr.dims() != 1 || ptr.dim_size(0) != rows + 1) {
    return InvalidArg(
        ptr_name, " must have shape [table_heads * num_blocks + 1] = [",
        rows + 1, "], got ", ptr.shape().DebugString(),
        " (is the layout built for this seq_len?)");
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

// Checks q, k, v and the layout inputs starting at `first_layout_input`.
absl::Status ParseInputs(OpKernelContext* ctx, int first_layout_input,
                         float scale, Inputs* in) {
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
  // The tables' head count T: row_ptr is [T * nb + 1], T dividing H.
  const Tensor& row_ptr = ctx->input(i0 + 2);
  const int64_t slots = row_ptr.dims() == 1 ? row_ptr.dim_size(0) - 1 : -1;
  if (slots < nb || slots % nb != 0 || H % (slots / nb) != 0) {
    return InvalidArg(
        "row_ptr must have shape [table_heads * num_blocks + 1] with "
        "table_heads dividing heads = ", H, " (num_blocks = ", nb, "), got ",
        row_ptr.shape().DebugString(),
        " (is the layout built for this seq_len and num_heads?)");
  }
  const int64_t T = slots / nb;
  if (!(key_positions.NumElements() == 0 ||
        (key_positions.dims() == 2 && key_positions.dim_size(0) == T &&
         key_positions.dim_size(1) == n))) {
    return InvalidArg(
        "key_positions must have shape [table_heads, n] = [", T, ", ", n,
        "] or be empty, got ", key_positions.shape().DebugString());
  }
  const int64_t M = masks.dim_size(0);
  TF_RETURN_IF_ERROR(CheckTileTable(
      "row_ptr", row_ptr, "col_idx", ctx->input(i0 + 3),
      "mask_idx", ctx->input(i0 + 4), T * nb, nb, M));
  TF_RETURN_IF_ERROR(CheckTileTable(
      "col_ptr", ctx->input(i0 + 6), "row_idx", ctx->input(i0 + 7),
      "col_mask_idx", ctx->input(i0 + 8), T * nb, nb, M));
  in->nnz = ctx->input(i0 + 3).NumElements();
  if (ctx->input(i0 + 7).NumElements() != in->nnz) {
    return InvalidArg("row_idx must list the ", in->nnz, " tiles col_idx ",
                      "lists, got ", ctx->input(i0 + 7).NumElements());
  }

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
  lay.table_heads = static_cast<int>(T);
  lay.num_blocks = static_cast<int>(nb);
  lay.block_size = static_cast<int>(bs);
  lay.num_masks = M;
  lay.row_ptr = ctx->input(i0 + 2).flat<int32_t>().data();
  lay.col_idx = ctx->input(i0 + 3).flat<int32_t>().data();
  lay.mask_idx = ctx->input(i0 + 4).flat<int32_t>().data();
  lay.masks = masks.flat<uint8_t>().data();
  lay.col_ptr = ctx->input(i0 + 6).flat<int32_t>().data();
  lay.row_idx = ctx->input(i0 + 7).flat<int32_t>().data();
  lay.col_mask_idx = ctx->input(i0 + 8).flat<int32_t>().data();
  return absl::OkStatus();
}

// ParseInputs for the gradient op, plus the shapes of out, stats, dout and
// dlse.
absl::Status ParseGradInputs(OpKernelContext* ctx, float scale, Inputs* in) {
  TF_RETURN_IF_ERROR(ParseInputs(ctx, kGradLayoutInput, scale, in));
  const Tensor& q = ctx->input(0);
  const Tensor& out = ctx->input(3);
  const Tensor& stats = ctx->input(4);
  const Tensor& dout = ctx->input(5);
  const Tensor& dlse = ctx->input(6);
  const TensorShape lse_shape({q.dim_size(0), q.dim_size(1), q.dim_size(2)});
  TensorShape stats_shape = lse_shape;
  stats_shape.AddDim(2);
  if (out.shape() != q.shape() || dout.shape() != q.shape()) {
    return InvalidArg("out and dout must have the shape of q ",
                      q.shape().DebugString(), ", got ",
                      out.shape().DebugString(), " and ",
                      dout.shape().DebugString());
  }
  if (stats.shape() != stats_shape) {
    return InvalidArg("stats must have shape [batch, heads, n, 2] = ",
                      stats_shape.DebugString(), ", got ",
                      stats.shape().DebugString());
  }
  if (dlse.shape() != lse_shape) {
    return InvalidArg("dlse must have shape [batch, heads, n] = ",
                      lse_shape.DebugString(), ", got ",
                      dlse.shape().DebugString());
  }
  return absl::OkStatus();
}

}  // namespace

BlockSparseAttentionKernel::BlockSparseAttentionKernel(
    OpKernelConstruction* ctx)
    : OpKernel(ctx) {
  OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
  OP_REQUIRES(ctx, std::isfinite(scale_) && scale_ > 0.0f,
              InvalidArg("scale must be positive and finite, got ", scale_));
}

absl::Status BlockSparseAttentionKernel::Start(
    OpKernelContext* ctx, Inputs* in, ForwardOutputs* outputs) const {
  TF_RETURN_IF_ERROR(ParseInputs(ctx, kForwardLayoutInput, scale_, in));
  const Tensor& q = ctx->input(0);
  TensorShape lse_shape({q.dim_size(0), q.dim_size(1), q.dim_size(2)});
  TensorShape stats_shape = lse_shape;
  stats_shape.AddDim(2);
  TF_RETURN_IF_ERROR(ctx->allocate_output(0, q.shape(), &outputs->out));
  TF_RETURN_IF_ERROR(ctx->allocate_output(1, lse_shape, &outputs->lse));
  return ctx->allocate_output(2, stats_shape, &outputs->stats);
}

absl::Status BlockSparseAttentionKernel::Start(
    OpKernelContext* ctx, Inputs* in, GradOutputs* outputs) const {
  TF_RETURN_IF_ERROR(ParseGradInputs(ctx, scale_, in));
  const TensorShape& shape = ctx->input(0).shape();
  TF_RETURN_IF_ERROR(ctx->allocate_output(0, shape, &outputs->dq));
  TF_RETURN_IF_ERROR(ctx->allocate_output(1, shape, &outputs->dk));
  return ctx->allocate_output(2, shape, &outputs->dv);
}

}  // namespace st_keras_ops
}  // namespace tensorflow
