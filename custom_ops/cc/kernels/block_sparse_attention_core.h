// Framework-free CPU core of fused block-sparse attention.
//
// Everything here works on float32 buffers and plain pointers; the TensorFlow
// kernels (block_sparse_attention_kernels.cc) convert dtypes, allocate the
// buffers and hand in a parallel-for over TensorFlow's CPU thread pool.
//
// Layout tables (see st_keras/layouts.py, `Component`): for head h and query
// block r, tiles are entries row_ptr[h*nb + r] .. row_ptr[h*nb + r + 1] of
// col_idx (key block) and mask_idx (-1: full tile, else a [bs, bs] uint8 mask
// in `masks`, indexed [query][key]), key blocks increasing.
//
// Shapes: q, k, v, out are [batch, heads, n, head_dim] row-major; lse is
// [batch, heads, n]. "Tile-transposed" buffers hold, for every block of bs
// tokens, the [head_dim, bs] transpose: [batch, heads, nb, head_dim, bs].
#ifndef ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_CORE_H_
#define ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_CORE_H_

#include <cstdint>
#include <functional>

namespace st_keras {

// Runs fn(begin, end) over [0, total) in parallel; cost_per_unit is a rough
// count of floating-point operations per unit, for sharding.
using ParallelFor = std::function<void(
    int64_t total, int64_t cost_per_unit,
    const std::function<void(int64_t, int64_t)>& fn)>;

struct LayoutTables {
  int num_heads = 0;   // heads of the layout (== heads of q)
  int num_blocks = 0;  // nb = n / block_size
  int block_size = 0;  // bs
  int64_t num_masks = 0;
  const int32_t* row_ptr = nullptr;       // [num_heads * nb + 1]
  const int32_t* col_idx = nullptr;       // [nnz]
  const int32_t* mask_idx = nullptr;      // [nnz]
  const uint8_t* masks = nullptr;         // [num_masks, bs, bs]
};

struct AttentionShape {
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t seq_len = 0;  // n, a multiple of the block size
  int64_t head_dim = 0;
  float scale = 1.0f;
  // Optional per-example key lengths [batch]: key at original position j of
  // example b is attended only when j < key_lengths[b].
  const int32_t* key_lengths = nullptr;
  // Optional original position of each kernel key position, [heads, n]
  // (the layout's token permutation); identity when null.
  const int32_t* key_positions = nullptr;
};

struct ForwardArgs {
  AttentionShape shape;
  LayoutTables layout;
  const float* q = nullptr;   // [B, H, n, d]
  const float* kt = nullptr;  // tile-transposed keys [B, H, nb, d, bs]
  const float* v = nullptr;   // [B, H, n, d]
  float* out = nullptr;       // [B, H, n, d]
  float* lse = nullptr;       // [B, H, n]; -inf for rows with no key
};

struct BackwardArgs {
  AttentionShape shape;
  LayoutTables layout;
  const float* q = nullptr;      // [B, H, n, d]
  const float* k = nullptr;      // [B, H, n, d]
  const float* kt = nullptr;     // tile-transposed keys [B, H, nb, d, bs]
  const float* vt = nullptr;     // tile-transposed values [B, H, nb, d, bs]
  const float* dout = nullptr;   // [B, H, n, d]
  const float* lse = nullptr;    // [B, H, n] from the forward pass
  const float* delta = nullptr;  // [B, H, n]: rowsum(dout * out) - dlse
  float* dq = nullptr;           // [B, H, n, d], overwritten
  float* dk = nullptr;           // [B, H, n, d], overwritten
  float* dv = nullptr;           // [B, H, n, d], overwritten
};

// Writes, for each of `groups` sequences of n = num_blocks * bs rows of
// head_dim floats, the [head_dim, bs] transpose of every block of bs rows.
void TransposeTiles(const float* src, int64_t groups, int64_t num_blocks,
                    int64_t block_size, int64_t head_dim, float* dst,
                    const ParallelFor& parallel_for);

// delta[r] = sum_d dout[r, d] * out[r, d] - dlse[r] for `rows` rows.
void RowDeltas(const float* dout, const float* out, const float* dlse,
               int64_t rows, int64_t head_dim, float* delta,
               const ParallelFor& parallel_for);

// Online-softmax attention over the layout's tiles; parallel over
// (batch, head, group of consecutive query blocks).
void BlockSparseAttentionForward(const ForwardArgs& args,
                                 const ParallelFor& parallel_for);

// Gradients recomputing scores from q, k and the saved lse; walks the tiles
// in the forward's order, parallel over (batch, head).
void BlockSparseAttentionBackward(const BackwardArgs& args,
                                  const ParallelFor& parallel_for);

}  // namespace st_keras

#endif  // ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_CORE_H_
