// Device-neutral parameters of fused block-sparse attention, shared by the
// CPU core (block_sparse_attention_core.h) and the GPU launcher
// (block_sparse_attention_gpu.h). Pointers point into the memory of the
// device that runs the kernel.
//
// Layout tables (see st_keras/layouts.py, `Component`): for head h and query
// block r, tiles are entries row_ptr[h*nb + r] .. row_ptr[h*nb + r + 1] of
// col_idx (key block) and mask_idx (-1: full tile, else a [bs, bs] uint8 mask
// in `masks`, indexed [query][key]), key blocks increasing. The column-major
// table lists the same tiles by key block: for head h and key block c,
// entries col_ptr[h*nb + c] .. col_ptr[h*nb + c + 1] of row_idx (query block)
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
  int num_blocks = 0;  // nb = n / block_size
  int block_size = 0;  // bs, a supported block size
  int64_t num_masks = 0;
  const int32_t* row_ptr = nullptr;       // [num_heads * nb + 1]
  const int32_t* col_idx = nullptr;       // [nnz]
  const int32_t* mask_idx = nullptr;      // [nnz]
  const uint8_t* masks = nullptr;         // [num_masks, bs, bs]
  // The column-major table; needed by the GPU backward pass only.
  const int32_t* col_ptr = nullptr;       // [num_heads * nb + 1]
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
  // Optional original position of each kernel key position, [heads, n]
  // (the layout's token permutation); identity when null.
  const int32_t* key_positions = nullptr;
};

}  // namespace st_keras

#endif  // ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_PARAMS_H_
