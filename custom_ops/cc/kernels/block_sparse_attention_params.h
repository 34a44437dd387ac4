// Device-neutral parameters of fused block-sparse attention, shared by the
// CPU core (block_sparse_attention_core.h) and the GPU launcher
// (block_sparse_attention_gpu.h). Pointers point into the memory of the
// device that runs the kernel.
//
// Layout tables (see st_keras/layouts.py, `Component`) describe T "table
// heads", T dividing the number of heads: head h reads table head t = h % T
// (heads that share a pattern share its tables). For table head t and query
// block r, tiles are entries row_ptr[t*nb + r] .. row_ptr[t*nb + r + 1] of
// col_idx (key block) and mask_idx (-1: full tile, else a [bs, bs] uint8 mask
// in `masks`, indexed [query][key]), key blocks increasing. The column-major
// table lists the same tiles by key block: for table head t and key block c,
// entries col_ptr[t*nb + c] .. col_ptr[t*nb + c + 1] of row_idx (query block)
// and col_mask_idx (the tile's mask id), query blocks increasing.
#ifndef ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_PARAMS_H_
#define ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_PARAMS_H_

#include <cstdint>

namespace st_keras {

// Block sizes the kernels support: 16, 32, 64 and 128.
inline bool IsSupportedBlockSize(int64_t block_size) {
  return block_size == 16 || block_size == 32 || block_size == 64 ||
         block_size == 128;
}

struct LayoutTables {
  int num_heads = 0;   // heads of the layout (== heads of q)
  int table_heads = 0;  // T, dividing num_heads: head h reads table head h % T
  int num_blocks = 0;  // nb = n / block_size
  int block_size = 0;  // bs, a supported block size
  int64_t num_masks = 0;
  const int32_t* row_ptr = nullptr;       // [table_heads * nb + 1]
  const int32_t* col_idx = nullptr;       // [nnz]
  const int32_t* mask_idx = nullptr;      // [nnz]
  const uint8_t* masks = nullptr;         // [num_masks, bs, bs]
  // The column-major table; needed by the GPU backward pass only.
  const int32_t* col_ptr = nullptr;       // [table_heads * nb + 1]
  const int32_t* row_idx = nullptr;       // [nnz]
  const int32_t* col_mask_idx = nullptr;  // [nnz]
};

struct AttentionShape {
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t seq_len = 0;  // n, a multiple of the block size
  int64_t head_dim = 0;
  // Positive and finite. Scores are scale times q.k, rounded once before
  // the softmax's max and differences, which are then exact.
  float scale = 1.0f;
  // Optional per-example key lengths [batch]: key at original position j of
  // example b is attended only when j < key_lengths[b].
  const int32_t* key_lengths = nullptr;
  // Optional original position of each kernel key position, [table_heads,
  // n] (the layout's token permutation; head h reads row h % table_heads);
  // identity when null.
  const int32_t* key_positions = nullptr;
};

}  // namespace st_keras

#endif  // ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_PARAMS_H_
