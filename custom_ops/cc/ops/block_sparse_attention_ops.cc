// Op definitions of fused block-sparse attention (forward and gradient).
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tensorflow {
namespace {

using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

// Layout table inputs shared by both ops; see st_keras/layouts.py.
#define ST_KERAS_LAYOUT_INPUTS         \
  Input("key_lengths: int32")          \
      .Input("key_positions: int32")   \
      .Input("row_ptr: int32")         \
      .Input("col_idx: int32")         \
      .Input("mask_idx: int32")        \
      .Input("masks: uint8")           \
      .Input("col_ptr: int32")         \
      .Input("row_idx: int32")         \
      .Input("col_mask_idx: int32")

REGISTER_OP("SparseTransformer>BlockSparseAttention")
    .Input("q: T")
    .Input("k: T")
    .Input("v: T")
    .ST_KERAS_LAYOUT_INPUTS
    .Output("out: T")
    .Output("lse: float")
    .Output("stats: float")
    .Attr("T: {float, half, bfloat16}")
    .Attr("scale: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle q;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &q));
      ShapeHandle lse;
      TF_RETURN_IF_ERROR(c->Subshape(q, 0, 3, &lse));
      ShapeHandle stats;
      TF_RETURN_IF_ERROR(c->Concatenate(lse, c->Vector(2), &stats));
      c->set_output(0, q);
      c->set_output(1, lse);
      c->set_output(2, stats);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Fused block-sparse attention: softmax(scale * q k^T restricted to the layout) v.

q, k, v: [batch, heads, n, head_dim].
key_lengths: [batch] keys at original positions >= key_lengths[b] are ignored,
  or an empty tensor for none.
key_positions: [table_heads, n] original position of each (permuted) key, or
  empty for the identity.
row_ptr, col_idx, mask_idx: row-major tile table of the layout; row_ptr is
  [table_heads * n / block_size + 1] with table_heads dividing heads, and
  head h reads the tables of table head h % table_heads.
masks: [num_masks, block_size, block_size] token masks of partial tiles.
col_ptr, row_idx, col_mask_idx: the same tiles by key block (the GPU
  kernels' backward pass walks them).
out: [batch, heads, n, head_dim]; rows with no allowed key are zero.
lse: [batch, heads, n] float32 log-sum-exp of each row's scores (-inf if none).
stats: [batch, heads, n, 2] float32 each row's max score m and log l, l the
  sum of exp(score - m) (-inf, -inf if none): what the gradient op takes, as
  lse = m + log l loses log l where |m| is large. Not differentiable.
)doc");

REGISTER_OP("SparseTransformer>BlockSparseAttentionGrad")
    .Input("q: T")
    .Input("k: T")
    .Input("v: T")
    .Input("out: T")
    .Input("stats: float")
    .Input("dout: T")
    .Input("dlse: float")
    .ST_KERAS_LAYOUT_INPUTS
    .Output("dq: T")
    .Output("dk: T")
    .Output("dv: T")
    .Attr("T: {float, half, bfloat16}")
    .Attr("scale: float")
    .SetShapeFn([](InferenceContext* c) {
      for (int i = 0; i < 3; ++i) {
        ShapeHandle x;
        TF_RETURN_IF_ERROR(c->WithRank(c->input(i), 4, &x));
        c->set_output(i, x);
      }
      return absl::OkStatus();
    })
    .Doc(R"doc(
Gradient of SparseTransformer>BlockSparseAttention with respect to q, k, v,
given the upstream gradients of out and lse (dout and dlse). Scores are
recomputed from q, k and the saved stats.
)doc");

#undef ST_KERAS_LAYOUT_INPUTS

}  // namespace
}  // namespace tensorflow
