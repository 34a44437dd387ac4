/* C ABI of the GPU kernels of fused block-sparse attention, for callers
 * without TensorFlow (PyTorch through ctypes: tools/gpu_check.py).
 *
 * Every pointer is device memory and every tensor contiguous: q, k, v, out
 * and the gradients [batch, heads, seq_len, head_dim] of `dtype` (0 float32,
 * 1 float16, 2 bfloat16); lse, dlse and delta [batch, heads, seq_len] and
 * stats [batch, heads, seq_len, 2] float32. The layout tables are those of
 * st_keras/layouts.py (row- and column-major), int32, and masks uint8
 * [num_masks, block_size, block_size]. The tables describe table_heads
 * heads T, T dividing heads: head h reads table head h % T (heads that
 * share a pattern share its tables). key_lengths ([batch]) and
 * key_positions ([table_heads, seq_len]) may be null.
 *
 * Each function returns 0 on success, else 1 with a message in
 * error[0 .. error_size). `stream` is a CUstream (null: the legacy default
 * stream of the current context). The functions check what they can without
 * reading device memory (sizes, supported block sizes and head_dim); the
 * tables themselves must be valid.
 */
#ifndef ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_C_API_H_
#define ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_C_API_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  int64_t batch, heads, seq_len, head_dim;
  int32_t block_size;
  int32_t dtype;
  float scale;
  int64_t table_heads;         /* T, dividing heads */
  const int32_t* row_ptr;      /* [T * seq_len / block_size + 1] */
  const int32_t* col_idx;      /* [nnz] */
  const int32_t* mask_idx;     /* [nnz] */
  const int32_t* col_ptr;      /* backward only */
  const int32_t* row_idx;      /* backward only */
  const int32_t* col_mask_idx; /* backward only */
  const uint8_t* masks;
  int64_t num_masks;
  const int32_t* key_lengths;
  const int32_t* key_positions;
  /* Nonzero: the tensors are in original token order, kernel position p of
   * head h at row key_positions[(h % T) * seq_len + p] (needs
   * key_positions). */
  int32_t original_order;
  /* Nonzero: the forward continues the softmax from out and stats (an
   * earlier component of the layout over the same rows), the backward adds
   * to dq, dk and dv and reads delta as the earlier call wrote it. */
  int32_t accumulate;
} st_bsa_gpu_problem;

/* out, lse and stats from q, k, v. */
int st_bsa_gpu_forward(const st_bsa_gpu_problem* problem, const void* q,
                       const void* k, const void* v, void* out, float* lse,
                       float* stats, void* stream, char* error,
                       size_t error_size);

/* dq, dk, dv from the forward's inputs, out and stats and the upstream
 * gradients dout and dlse; delta is a [batch, heads, seq_len] float32
 * workspace that receives rowsum(dout * out) - dlse (with accumulate, it
 * holds it already). */
int st_bsa_gpu_backward(const st_bsa_gpu_problem* problem, const void* q,
                        const void* k, const void* v, const void* out,
                        const float* stats, const void* dout,
                        const float* dlse, float* delta, void* dq, void* dk,
                        void* dv, void* stream, char* error,
                        size_t error_size);

/* Checks, without a GPU, that every compiled kernel takes the arguments the
 * launcher passes and fits its architecture's shared memory. */
int st_bsa_gpu_self_check(char* error, size_t error_size);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif  /* ST_KERAS_CUSTOM_OPS_CC_KERNELS_BLOCK_SPARSE_ATTENTION_C_API_H_ */
