// CPU core of fused block-sparse attention: small register-blocked GEMMs over
// bs x bs tiles, an online softmax (flash-attention style) in float32, and a
// backward pass that recomputes probabilities from the saved log-sum-exp.
#include "custom_ops/cc/kernels/block_sparse_attention_core.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace st_keras {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One SIMD register of floats: 16 lanes with AVX-512, 8 otherwise (AVX2, or
// split by the compiler on older targets). Loads and stores go through an
// alias of the same type with 4-byte alignment: no alignment is assumed.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float UnalignedVec
    __attribute__((vector_size(kLanes * sizeof(float)), aligned(4),
                   may_alias));

inline Vec Load(const float* p) {
  return *reinterpret_cast<const UnalignedVec*>(p);
}
inline void Store(float* p, const Vec& v) {
  *reinterpret_cast<UnalignedVec*>(p) = v;
}

// C[R x N] (+)= op(A)[R x K] * B[K x N] with K >= 1, row-major with leading
// dimensions; op(A) = A, or A^T when kTransA (A is then stored [K x R]).
// Vectorised over N: kRows rows of op(A) and kVecs registers of C per pass.
template <bool kTransA>
inline float AElement(const float* A, int64_t lda, int r, int64_t k) {
  return kTransA ? A[k * lda + r] : A[r * lda + k];
}

template <bool kTransA>
inline const float* ARows(const float* A, int64_t lda, int64_t r) {
  return kTransA ? A + r : A + r * lda;
}

template <int kRows, int kVecs, bool kAccumulate, bool kTransA>
inline void GemmPanel(int64_t K, const float* A, int64_t lda, const float* B,
                      int64_t ldb, float* C, int64_t ldc) {
  Vec acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      acc[r][v] = kAccumulate ? Load(C + r * ldc + kLanes * v) : Vec{};
    }
  }
  int64_t k = 0;
  do {  // K >= 1: no path skips the loop, so acc stays in registers
    Vec b[kVecs];
    for (int v = 0; v < kVecs; ++v) b[v] = Load(B + k * ldb + kLanes * v);
    for (int r = 0; r < kRows; ++r) {
      const float a = AElement<kTransA>(A, lda, r, k);
      for (int v = 0; v < kVecs; ++v) acc[r][v] += a * b[v];
    }
  } while (++k < K);
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) Store(C + r * ldc + kLanes * v, acc[r][v]);
  }
}

template <int kRows, bool kAccumulate, bool kTransA>
inline void GemmRows(int64_t K, int64_t N, const float* A, int64_t lda,
                     const float* B, int64_t ldb, float* C, int64_t ldc) {
  int64_t n = 0;
  for (; n + 2 * kLanes <= N; n += 2 * kLanes) {
    GemmPanel<kRows, 2, kAccumulate, kTransA>(K, A, lda, B + n, ldb, C + n,
                                              ldc);
  }
  for (; n + kLanes <= N; n += kLanes) {
    GemmPanel<kRows, 1, kAccumulate, kTransA>(K, A, lda, B + n, ldb, C + n,
                                              ldc);
  }
  for (; n < N; ++n) {  // scalar tail when N is not a multiple of kLanes
    for (int r = 0; r < kRows; ++r) {
      float s = kAccumulate ? C[r * ldc + n] : 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        s += AElement<kTransA>(A, lda, r, k) * B[k * ldb + n];
      }
      C[r * ldc + n] = s;
    }
  }
}

template <bool kAccumulate, bool kTransA = false>
void Gemm(int64_t R, int64_t K, int64_t N, const float* A, int64_t lda,
          const float* B, int64_t ldb, float* C, int64_t ldc) {
  // kMainRows rows x 2 registers of accumulators fill most of the register
  // file: 16 registers with AVX2, 32 with AVX-512. R is cut into panels of
  // kMainRows and kMainRows - 1 rows where it can be (32 = 6 + 6 + 5 + 5 +
  // 5 + 5 with AVX2): a panel with fewer accumulators than FMA latency x
  // throughput stalls on its dependency chains.
  constexpr int kMainRows = kLanes == 16 ? 8 : 6;
  const int64_t panels = (R + kMainRows - 1) / kMainRows;
  const bool split = R >= panels * (kMainRows - 1);
  const int64_t full_panels =
      split ? R - panels * (kMainRows - 1) : R / kMainRows;
  int64_t r = 0;
  for (; r < full_panels * kMainRows; r += kMainRows) {
    GemmRows<kMainRows, kAccumulate, kTransA>(
        K, N, ARows<kTransA>(A, lda, r), lda, B, ldb, C + r * ldc, ldc);
  }
  if (split) {
    for (; r < R; r += kMainRows - 1) {
      GemmRows<kMainRows - 1, kAccumulate, kTransA>(
          K, N, ARows<kTransA>(A, lda, r), lda, B, ldb, C + r * ldc, ldc);
    }
  }
  for (; r + 4 <= R; r += 4) {
    GemmRows<4, kAccumulate, kTransA>(K, N, ARows<kTransA>(A, lda, r), lda, B,
                                      ldb, C + r * ldc, ldc);
  }
  for (; r < R; ++r) {
    GemmRows<1, kAccumulate, kTransA>(K, N, ARows<kTransA>(A, lda, r), lda, B,
                                      ldb, C + r * ldc, ldc);
  }
}

typedef int32_t IntVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec Broadcast(float x) { return Vec{} + x; }

inline float HorizontalMax(const Vec& v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

inline float HorizontalSum(const Vec& v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// exp(x) for x <= 0 lane-wise, about 1 ulp; x < -87 (and -inf) gives exactly
// 0, NaN stays NaN. 2^t with t = x log2(e) split as integer + [-0.5, 0.5]
// and a degree-7 polynomial.
inline Vec ExpNonPositive(const Vec& x_in) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2 = 0.69314718055994531f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: round to nearest
  const Vec lo = Broadcast(-87.0f);
  const IntVec tiny = x_in < lo;
  const Vec x = tiny ? lo : x_in;  // NaN compares false and stays NaN
  const Vec t = x * kLog2e;
  const Vec shifted = t + kRound;
  const Vec f = (t - (shifted - kRound)) * kLn2;  // |f| <= ln2 / 2
  Vec p = Broadcast(1.0f / 5040.0f);
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  IntVec bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  constexpr int32_t kRoundBits = 0x4B400000;  // bit pattern of kRound
  const IntVec exponent = (bits - kRoundBits + 127) << 23;
  Vec pow2;
  std::memcpy(&pow2, &exponent, sizeof(pow2));
  return tiny ? Vec{} : p * pow2;
}

// Sets scores of keys outside the token mask or past the key length to -inf.
// s is [bs, bs] indexed [query][key].
void MaskTile(const AttentionShape& shape, const LayoutTables& lay, int64_t b,
              int64_t h, int64_t key_block, int32_t mask, float* s) {
  const int64_t bs = lay.block_size;
  if (mask >= 0) {
    const uint8_t* m = lay.masks + mask * bs * bs;
    for (int64_t i = 0; i < bs; ++i) {
      for (int64_t j = 0; j < bs; ++j) {
        float& x = s[i * bs + j];
        x = m[i * bs + j] ? x : kNegInf;
      }
    }
  }
  if (shape.key_lengths != nullptr) {
    const int32_t len = shape.key_lengths[b];
    for (int64_t j = 0; j < bs; ++j) {
      const int64_t p = key_block * bs + j;
      const int64_t pos = shape.key_positions != nullptr
                              ? shape.key_positions[h * shape.seq_len + p]
                              : p;
      if (pos < len) continue;
      for (int64_t i = 0; i < bs; ++i) s[i * bs + j] = kNegInf;
    }
  }
}

bool TileNeedsMask(const AttentionShape& shape, int32_t mask) {
  return mask >= 0 || shape.key_lengths != nullptr;
}

// Consecutive query blocks are grouped so that a key tile shared by several
// of them is multiplied once, as one taller GEMM, while it sits in L1. Groups
// hold at most kGroupRows query rows (and at least one block).
constexpr int64_t kGroupRows = 128;

int64_t GroupBlocks(int64_t block_size) {
  return std::max<int64_t>(1, kGroupRows / block_size);
}

// One online-softmax step for `rows` rows of raw scores s [rows, bs]: updates
// the running max m and sum l, rescales acc [rows, d] and leaves the
// unnormalised probabilities exp(scale * s - m) in s.
void OnlineSoftmaxRows(int64_t rows, int64_t bs, int64_t d, float scale,
                       float* s, float* m, float* l, float* acc) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * bs;
    Vec vmax = Load(row);
    for (int64_t j = kLanes; j < bs; j += kLanes) {
      const Vec x = Load(row + j);
      vmax = x > vmax ? x : vmax;
    }
    const float m_new = std::max(m[i], HorizontalMax(vmax) * scale);
    if (m_new == kNegInf) {  // nothing attended yet in this row
      std::fill(row, row + bs, 0.0f);
      continue;
    }
    // The running max rarely moves once a row has seen a few tiles.
    const float alpha = m_new == m[i] ? 1.0f : std::exp(m[i] - m_new);
    const Vec shift = Broadcast(m_new);
    Vec vsum{};
    for (int64_t j = 0; j < bs; j += kLanes) {
      const Vec p = ExpNonPositive(Load(row + j) * scale - shift);
      Store(row + j, p);
      vsum += p;
    }
    l[i] = l[i] * alpha + HorizontalSum(vsum);
    m[i] = m_new;
    if (alpha != 1.0f) {
      float* a = acc + i * d;
      for (int64_t c = 0; c < d; ++c) a[c] *= alpha;
    }
  }
}

}  // namespace

void TransposeTiles(const float* src, int64_t groups, int64_t num_blocks,
                    int64_t block_size, int64_t head_dim, float* dst,
                    const ParallelFor& parallel_for) {
  const int64_t tile = block_size * head_dim;
  parallel_for(groups * num_blocks, 2 * tile, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* s = src + t * tile;  // [bs, d]
      float* o = dst + t * tile;        // [d, bs]
      for (int64_t i = 0; i < block_size; ++i) {
        for (int64_t c = 0; c < head_dim; ++c) {
          o[c * block_size + i] = s[i * head_dim + c];
        }
      }
    }
  });
}

void RowDeltas(const float* dout, const float* out, const float* dlse,
               int64_t rows, int64_t head_dim, float* delta,
               const ParallelFor& parallel_for) {
  parallel_for(rows, 2 * head_dim, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float s = 0.0f;
      for (int64_t c = 0; c < head_dim; ++c) {
        s += dout[r * head_dim + c] * out[r * head_dim + c];
      }
      delta[r] = s - (dlse != nullptr ? dlse[r] : 0.0f);
    }
  });
}

void BlockSparseAttentionForward(const ForwardArgs& args,
                                 const ParallelFor& parallel_for) {
  const AttentionShape& shape = args.shape;
  const LayoutTables& lay = args.layout;
  const int64_t H = shape.heads, n = shape.seq_len, d = shape.head_dim;
  const int64_t bs = lay.block_size, nb = lay.num_blocks;
  const int64_t G = GroupBlocks(bs);
  const int64_t groups = (nb + G - 1) / G;
  const int64_t nnz = lay.row_ptr[H * nb];
  const int64_t tiles_per_group =
      std::max<int64_t>(1, nnz / std::max<int64_t>(1, H * groups));
  const int64_t cost = tiles_per_group * bs * bs * (4 * d + 20);

  // Unit: (batch, head, group of G query blocks). The rows of the group walk
  // their tile lists together in key-block order; at each key block the
  // query blocks that attend it form runs of consecutive blocks, and each
  // run is one GEMM of up to G * bs rows.
  parallel_for(shape.batch * H * groups, cost, [&](int64_t begin,
                                                   int64_t end) {
    std::vector<float> s(G * bs * bs), acc(G * bs * d), m(G * bs), l(G * bs);
    std::vector<int32_t> cursor(G), stop(G);
    std::vector<char> active(G);
    for (int64_t unit = begin; unit < end; ++unit) {
      // Later groups attend more key blocks; alternating light and heavy
      // groups keeps any contiguous range of units near the average cost.
      const int64_t slot = unit % groups;
      const int64_t group = slot % 2 == 0 ? slot / 2 : groups - 1 - slot / 2;
      const int64_t bh = unit / groups;
      const int64_t b = bh / H, h = bh % H;
      const int64_t qb0 = group * G;
      const int64_t g_count = std::min(G, nb - qb0);
      const float* q = args.q + (bh * n + qb0 * bs) * d;  // [g_count*bs, d]
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      for (int64_t g = 0; g < g_count; ++g) {
        cursor[g] = lay.row_ptr[h * nb + qb0 + g];
        stop[g] = lay.row_ptr[h * nb + qb0 + g + 1];
      }
      while (true) {
        int64_t kb = -1;
        for (int64_t g = 0; g < g_count; ++g) {
          if (cursor[g] < stop[g] && (kb < 0 || lay.col_idx[cursor[g]] < kb)) {
            kb = lay.col_idx[cursor[g]];
          }
        }
        if (kb < 0) break;
        for (int64_t g = 0; g < g_count; ++g) {
          active[g] = cursor[g] < stop[g] && lay.col_idx[cursor[g]] == kb;
        }
        const float* kt = args.kt + (bh * nb + kb) * d * bs;  // [d, bs]
        const float* v = args.v + (bh * n + kb * bs) * d;     // [bs, d]
        for (int64_t g0 = 0; g0 < g_count;) {
          if (!active[g0]) {
            ++g0;
            continue;
          }
          int64_t g1 = g0 + 1;
          while (g1 < g_count && active[g1]) ++g1;
          const int64_t rows = (g1 - g0) * bs;
          float* s_run = s.data();                     // [rows, bs]
          float* acc_run = acc.data() + g0 * bs * d;   // [rows, d]
          // Raw scores q.k; the scale (> 0) is applied inside the softmax.
          Gemm<false>(rows, d, bs, q + g0 * bs * d, d, kt, bs, s_run, bs);
          for (int64_t g = g0; g < g1; ++g) {
            const int32_t mask = lay.mask_idx[cursor[g]];
            if (TileNeedsMask(shape, mask)) {
              MaskTile(shape, lay, b, h, kb, mask,
                       s_run + (g - g0) * bs * bs);
            }
            ++cursor[g];
          }
          OnlineSoftmaxRows(rows, bs, d, shape.scale, s_run,
                            m.data() + g0 * bs, l.data() + g0 * bs, acc_run);
          Gemm<true>(rows, bs, d, s_run, bs, v, d, acc_run, d);
          g0 = g1;
        }
      }
      float* out = args.out + (bh * n + qb0 * bs) * d;
      float* lse = args.lse + bh * n + qb0 * bs;
      for (int64_t i = 0; i < g_count * bs; ++i) {
        const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
        for (int64_t c = 0; c < d; ++c) out[i * d + c] = acc[i * d + c] * inv;
        lse[i] = l[i] > 0.0f ? m[i] + std::log(l[i]) : kNegInf;
      }
    }
  });
}

void BlockSparseAttentionBackward(const BackwardArgs& args,
                                  const ParallelFor& parallel_for) {
  const AttentionShape& shape = args.shape;
  const LayoutTables& lay = args.layout;
  const int64_t H = shape.heads, n = shape.seq_len, d = shape.head_dim;
  const int64_t bs = lay.block_size, nb = lay.num_blocks;
  const int64_t G = GroupBlocks(bs);
  const int64_t nnz = lay.col_ptr[H * nb];
  const int64_t cost =
      std::max<int64_t>(1, nnz / H) * bs * bs * (10 * d + 30);
  const float scale = shape.scale;

  // Unit: (batch, head), so that dQ is accumulated by one thread. For each
  // key block, the query blocks of its column are cut into runs of at most
  // G consecutive blocks; a run is handled with tall GEMMs (rows = queries)
  // for S, dP and dQ and long ones (depth = queries) for dK and dV.
  parallel_for(shape.batch * H, cost, [&](int64_t begin, int64_t end) {
    // p: probabilities, then dp: dP and dS; both [rows, bs] = [query, key].
    std::vector<float> p(G * bs * bs), dp(G * bs * bs);
    std::vector<float> dk_acc(bs * d), dv_acc(bs * d);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      float* dq = args.dq + bh * n * d;
      std::fill(dq, dq + n * d, 0.0f);
      for (int64_t kb = 0; kb < nb; ++kb) {
        const float* k = args.k + (bh * n + kb * bs) * d;       // [bs, d]
        const float* kt = args.kt + (bh * nb + kb) * d * bs;    // [d, bs]
        const float* vt = args.vt + (bh * nb + kb) * d * bs;    // [d, bs]
        std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
        std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
        const int32_t e_end = lay.col_ptr[h * nb + kb + 1];
        for (int32_t e0 = lay.col_ptr[h * nb + kb]; e0 < e_end;) {
          int32_t e1 = e0 + 1;
          while (e1 < e_end && e1 - e0 < G &&
                 lay.row_idx[e1] == lay.row_idx[e1 - 1] + 1) {
            ++e1;
          }
          const int64_t rows = (e1 - e0) * bs;
          const int64_t row0 = bh * n + lay.row_idx[e0] * bs;
          const float* q = args.q + row0 * d;         // [rows, d]
          const float* dout = args.dout + row0 * d;   // [rows, d]
          const float* lse = args.lse + row0;         // [rows]
          const float* delta = args.delta + row0;     // [rows]
          Gemm<false>(rows, d, bs, q, d, kt, bs, p.data(), bs);  // raw S
          for (int32_t e = e0; e < e1; ++e) {
            const int32_t mask = lay.col_mask_idx[e];
            if (TileNeedsMask(shape, mask)) {
              MaskTile(shape, lay, b, h, kb, mask,
                       p.data() + (e - e0) * bs * bs);
            }
          }
          for (int64_t i = 0; i < rows; ++i) {
            // Rows with lse = -inf attended nothing: probability 0.
            float* row = p.data() + i * bs;
            if (lse[i] == kNegInf) {
              std::fill(row, row + bs, 0.0f);
              continue;
            }
            const Vec shift = Broadcast(lse[i]);
            for (int64_t j = 0; j < bs; j += kLanes) {
              Store(row + j, ExpNonPositive(Load(row + j) * scale - shift));
            }
          }
          // dV += P^T dO.
          Gemm<true, true>(bs, rows, d, p.data(), bs, dout, d, dv_acc.data(),
                           d);
          Gemm<false>(rows, d, bs, dout, d, vt, bs, dp.data(), bs);  // dP
          for (int64_t i = 0; i < rows; ++i) {
            const Vec delta_i = Broadcast(delta[i]);
            for (int64_t j = 0; j < bs; j += kLanes) {
              const int64_t x = i * bs + j;
              Store(dp.data() + x,
                    Load(p.data() + x) * (Load(dp.data() + x) - delta_i));
            }
          }
          // dK += dS^T Q and dQ += dS K (both without the scale yet).
          Gemm<true, true>(bs, rows, d, dp.data(), bs, q, d, dk_acc.data(), d);
          Gemm<true>(rows, bs, d, dp.data(), bs, k, d, args.dq + row0 * d, d);
          e0 = e1;
        }
        float* dk = args.dk + (bh * n + kb * bs) * d;
        float* dv = args.dv + (bh * n + kb * bs) * d;
        for (int64_t x = 0; x < bs * d; ++x) {
          dk[x] = dk_acc[x] * scale;
          dv[x] = dv_acc[x];
        }
      }
      for (int64_t x = 0; x < n * d; ++x) dq[x] *= scale;
    }
  });
}

}  // namespace st_keras
