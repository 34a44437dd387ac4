// CPU core of fused block-sparse attention: small register-blocked GEMMs over
// bs x bs tiles, an online softmax (flash-attention style) in float32, and a
// backward pass that recomputes probabilities from the saved log-sum-exp.
//
// Compiled once per instruction set (custom_ops/BUILD): ST_KERAS_CPU_ISA names
// the variant and is the namespace of its copy, so the copies' symbols do not
// collide. Everything is internal except the variant's table, kCpuCore.
#include "custom_ops/cc/kernels/block_sparse_attention_core.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>

#ifndef ST_KERAS_CPU_ISA
#error "compile with -DST_KERAS_CPU_ISA=<variant> (custom_ops/BUILD does)"
#endif
#define ST_KERAS_STRINGIFY(x) #x
#define ST_KERAS_NAME(x) ST_KERAS_STRINGIFY(x)

namespace st_keras {
namespace ST_KERAS_CPU_ISA {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// One SIMD register of floats: 16 lanes in the AVX-512 variant, 8 in the
// AVX2 one. Loads and stores go through an alias of the same type with
// 4-byte alignment: no alignment is assumed.
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

// C[R x N] = alpha * (op(A)[R x K] * B[K x N]), or C += op(A) * B when
// kAccumulate (alpha is then 1), with K >= 1, row-major with leading
// dimensions; op(A) = A, or A^T when kTransA (A is then stored [K x R]). The
// product is rounded before alpha scales it. Vectorised over N: kRows rows
// of op(A) and kVecs registers of C per pass.
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
                      int64_t ldb, float* C, int64_t ldc, float alpha) {
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
    for (int v = 0; v < kVecs; ++v) {
      Store(C + r * ldc + kLanes * v, kAccumulate ? acc[r][v]
                                                  : acc[r][v] * alpha);
    }
  }
}

template <int kRows, bool kAccumulate, bool kTransA>
inline void GemmRows(int64_t K, int64_t N, const float* A, int64_t lda,
                     const float* B, int64_t ldb, float* C, int64_t ldc,
                     float alpha) {
  int64_t n = 0;
  for (; n + 2 * kLanes <= N; n += 2 * kLanes) {
    GemmPanel<kRows, 2, kAccumulate, kTransA>(K, A, lda, B + n, ldb, C + n,
                                              ldc, alpha);
  }
  for (; n + kLanes <= N; n += kLanes) {
    GemmPanel<kRows, 1, kAccumulate, kTransA>(K, A, lda, B + n, ldb, C + n,
                                              ldc, alpha);
  }
  for (; n < N; ++n) {  // scalar tail when N is not a multiple of kLanes
    for (int r = 0; r < kRows; ++r) {
      float s = kAccumulate ? C[r * ldc + n] : 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        s += AElement<kTransA>(A, lda, r, k) * B[k * ldb + n];
      }
      C[r * ldc + n] = kAccumulate ? s : s * alpha;
    }
  }
}

template <bool kAccumulate, bool kTransA = false>
void Gemm(int64_t R, int64_t K, int64_t N, const float* A, int64_t lda,
          const float* B, int64_t ldb, float* C, int64_t ldc,
          float alpha = 1.0f) {
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
        K, N, ARows<kTransA>(A, lda, r), lda, B, ldb, C + r * ldc, ldc,
        alpha);
  }
  if (split) {
    for (; r < R; r += kMainRows - 1) {
      GemmRows<kMainRows - 1, kAccumulate, kTransA>(
          K, N, ARows<kTransA>(A, lda, r), lda, B, ldb, C + r * ldc, ldc,
          alpha);
    }
  }
  for (; r + 4 <= R; r += 4) {
    GemmRows<4, kAccumulate, kTransA>(K, N, ARows<kTransA>(A, lda, r), lda, B,
                                      ldb, C + r * ldc, ldc, alpha);
  }
  for (; r < R; ++r) {
    GemmRows<1, kAccumulate, kTransA>(K, N, ARows<kTransA>(A, lda, r), lda, B,
                                      ldb, C + r * ldc, ldc, alpha);
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

// Whether none of x[0 .. count) is inf or NaN (exponent bits all ones); an
// integer max the compiler vectorises.
bool AllFinite(const float* x, int64_t count) {
  constexpr uint32_t kExponent = 0x7F800000;
  uint32_t top = 0;
  for (int64_t i = 0; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof(bits));
    top = std::max(top, bits & kExponent);
  }
  return top != kExponent;
}

bool HasNaN(const float* x, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    if (std::isnan(x[i])) return true;
  }
  return false;
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
// s is one [bs, bs] tile, indexed [query][key], of a buffer with rows of
// `lds` floats.
void MaskTile(const AttentionShape& shape, const LayoutTables& lay, int64_t b,
              int64_t h, int64_t key_block, int32_t mask, float* s,
              int64_t lds) {
  const int64_t bs = lay.block_size;
  if (mask >= 0) {
    const uint8_t* m = lay.masks + mask * bs * bs;
    for (int64_t i = 0; i < bs; ++i) {
      for (int64_t j = 0; j < bs; ++j) {
        float& x = s[i * lds + j];
        x = m[i * bs + j] ? x : kNegInf;
      }
    }
  }
  if (shape.key_lengths != nullptr) {
    const int32_t len = shape.key_lengths[b];
    for (int64_t j = 0; j < bs; ++j) {
      const int64_t p = key_block * bs + j;
      const int64_t pos =
          shape.key_positions != nullptr
              ? shape.key_positions[h % lay.table_heads * shape.seq_len + p]
              : p;
      if (pos < len) continue;
      for (int64_t i = 0; i < bs; ++i) s[i * lds + j] = kNegInf;
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

// Up to kMergeColumns keys (whole blocks, at least one) attended by the same
// query blocks are taken in one step: their scores form one [rows, width]
// buffer, the softmax bookkeeping runs once per row for all of them, and the
// product with V (forward) or K (dQ) is one GEMM of depth `width`, so the
// accumulator rows are loaded and stored once per step, not once per block.
constexpr int64_t kMergeColumns = 64;

// The smallest supported block size bounds the blocks per group and step.
constexpr int64_t kMinBlockSize = 16;
constexpr int64_t kMaxGroupBlocks = kGroupRows / kMinBlockSize;
constexpr int64_t kMaxMergeBlocks = kMergeColumns / kMinBlockSize;

// Walks the tiles of up to kMaxGroupBlocks consecutive query blocks of one
// head together, in key-block order, one step of up to `max_merge` (at most
// kMaxMergeBlocks) key blocks at a time. In a step every key block is
// attended by the same query blocks (active(g)); those form runs of
// consecutive blocks, each run one GEMM. The state lives in fixed arrays: a
// walk allocates nothing.
class TileWalk {
 public:
  TileWalk(const LayoutTables& lay, int64_t max_merge)
      : lay_(lay), max_merge_(max_merge) {}

  // Starts on query blocks first_block .. first_block + group_blocks - 1 of
  // `head` (which reads table head head % table_heads).
  void Start(int64_t head, int64_t first_block, int64_t group_blocks) {
    group_blocks_ = group_blocks;
    const int64_t row =
        head % lay_.table_heads * lay_.num_blocks + first_block;
    for (int64_t g = 0; g < group_blocks; ++g) {
      cursor_[g] = lay_.row_ptr[row + g];
      stop_[g] = lay_.row_ptr[row + g + 1];
    }
    lead_key_ = FindNext(&lead_active_);
  }

  // Takes the next step; false when every tile has been visited.
  bool Next() {
    if (lead_key_ < 0) return false;
    std::swap(step_active_, lead_active_);
    count_ = 0;
    do {
      key_blocks_[count_] = lead_key_;
      for (int64_t g = 0; g < group_blocks_; ++g) {
        if (step_active_[g]) entry_[count_ * group_blocks_ + g] = cursor_[g]++;
      }
      ++count_;
      lead_key_ = FindNext(&lead_active_);
    } while (lead_key_ >= 0 && count_ < max_merge_ &&
             std::equal(lead_active_.begin(),
                        lead_active_.begin() + group_blocks_,
                        step_active_.begin()));
    return true;
  }

  int64_t count() const { return count_; }  // key blocks in this step
  int64_t key_block(int64_t c) const { return key_blocks_[c]; }
  bool active(int64_t g) const { return step_active_[g] != 0; }
  // Mask id of the tile (query block g of the group, key block c of the step).
  int32_t mask(int64_t c, int64_t g) const {
    return lay_.mask_idx[entry_[c * group_blocks_ + g]];
  }

  // Calls fn(g0, g1) for each run g0 .. g1 - 1 of active query blocks.
  template <typename Fn>
  void ForEachRun(const Fn& fn) const {
    for (int64_t g0 = 0; g0 < group_blocks_;) {
      if (!active(g0)) {
        ++g0;
        continue;
      }
      int64_t g1 = g0 + 1;
      while (g1 < group_blocks_ && active(g1)) ++g1;
      fn(g0, g1);
      g0 = g1;
    }
  }

 private:
  // The smallest key block at any cursor (-1 when none is left); sets which
  // query blocks have it next.
  int64_t FindNext(std::array<char, kMaxGroupBlocks>* has) const {
    int64_t kb = -1;
    for (int64_t g = 0; g < group_blocks_; ++g) {
      if (cursor_[g] < stop_[g] && (kb < 0 || lay_.col_idx[cursor_[g]] < kb)) {
        kb = lay_.col_idx[cursor_[g]];
      }
    }
    for (int64_t g = 0; g < group_blocks_; ++g) {
      (*has)[g] = kb >= 0 && cursor_[g] < stop_[g] &&
                  lay_.col_idx[cursor_[g]] == kb;
    }
    return kb;
  }

  const LayoutTables& lay_;
  const int64_t max_merge_;
  int64_t group_blocks_ = 0;
  int64_t count_ = 0;
  int64_t lead_key_ = -1;  // first key block of the next step, -1 at end
  std::array<int32_t, kMaxGroupBlocks> cursor_, stop_;
  std::array<int32_t, kMaxGroupBlocks * kMaxMergeBlocks> entry_;
  std::array<int64_t, kMaxMergeBlocks> key_blocks_;
  // Query blocks attending this step's key blocks, and the next step's.
  std::array<char, kMaxGroupBlocks> step_active_, lead_active_;
};

// The rows of the step's key blocks from `x` ([n, d] of one (batch, head)) as
// one [count * bs, d] matrix: x itself for a single block, else copied to buf.
const float* StepRows(const TileWalk& walk, const float* x, int64_t bs,
                      int64_t d, float* buf) {
  if (walk.count() == 1) return x + walk.key_block(0) * bs * d;
  for (int64_t c = 0; c < walk.count(); ++c) {
    const float* src = x + walk.key_block(c) * bs * d;
    std::copy(src, src + bs * d, buf + c * bs * d);
  }
  return buf;
}

// StepRows copied to buf with every inf or NaN replaced by 0 (the exact pass
// of a group with non-finite values); sets *replaced when one was.
const float* FiniteStepRows(const TileWalk& walk, const float* x, int64_t bs,
                            int64_t d, float* buf, bool* replaced) {
  *replaced = false;
  for (int64_t c = 0; c < walk.count(); ++c) {
    const float* src = x + walk.key_block(c) * bs * d;
    float* dst = buf + c * bs * d;
    for (int64_t e = 0; e < bs * d; ++e) {
      const bool finite = std::isfinite(src[e]);
      dst[e] = finite ? src[e] : 0.0f;
      *replaced |= !finite;
    }
  }
  return buf;
}

// For the rows of s [rows, width] (masked scores of the step, before the
// softmax), adds to poison [rows, d] the non-finite entries of the value rows
// of every key they attend (score not -inf): sum_j p_ij v_j with p_ij > 0
// has, in each column, exactly the inf or NaN that these sums have, for
// values that FiniteStepRows replaced by 0.
void AddNonFiniteValues(const TileWalk& walk, const float* x, int64_t bs,
                        int64_t d, int64_t rows, const float* s,
                        float* poison) {
  const int64_t width = walk.count() * bs;
  for (int64_t j = 0; j < width; ++j) {
    const float* xj = x + (walk.key_block(j / bs) * bs + j % bs) * d;
    if (AllFinite(xj, d)) continue;
    for (int64_t i = 0; i < rows; ++i) {
      if (s[i * width + j] == kNegInf) continue;
      for (int64_t c = 0; c < d; ++c) {
        if (!std::isfinite(xj[c])) poison[i * d + c] += xj[c];
      }
    }
  }
}

// s [rows, count * bs] = alpha times a [rows, d] times the step's
// tile-transposed blocks of xt ([nb, d, bs] of one (batch, head)), then
// masks the run's tiles when `mask` (query blocks g0 .. g1 - 1 of the group).
// With alpha = scale, s holds the scores scale * q.k rounded once, so the
// softmax's max and differences are exact.
void StepScores(const AttentionShape& shape, const LayoutTables& lay,
                const TileWalk& walk, int64_t b, int64_t h, int64_t g0,
                int64_t g1, const float* a, const float* xt, float alpha,
                bool mask, float* s) {
  const int64_t bs = lay.block_size, d = shape.head_dim;
  const int64_t rows = (g1 - g0) * bs, width = walk.count() * bs;
  for (int64_t c = 0; c < walk.count(); ++c) {
    const int64_t kb = walk.key_block(c);
    Gemm<false>(rows, d, bs, a, d, xt + kb * d * bs, bs, s + c * bs, width,
                alpha);
    if (!mask) continue;
    for (int64_t g = g0; g < g1; ++g) {
      const int32_t id = walk.mask(c, g);
      if (TileNeedsMask(shape, id)) {
        MaskTile(shape, lay, b, h, kb, id, s + (g - g0) * bs * width + c * bs,
                 width);
      }
    }
  }
}

// One online-softmax step for `rows` rows of (scaled) scores s [rows, width]
// (width a multiple of kLanes): updates the running max m and sum l,
// rescales acc [rows, d] and leaves the unnormalised probabilities
// exp(s - m) in s. m is the largest score that is not NaN, so every exponent
// is exactly <= 0; a NaN score makes the row NaN through its exp, or, where
// nothing else was attended so far, through l.
void OnlineSoftmaxRows(int64_t rows, int64_t width, int64_t d, float* s,
                       float* m, float* l, float* acc) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * width;
    Vec vmax = Broadcast(kNegInf);
    for (int64_t j = 0; j < width; j += kLanes) {
      const Vec x = Load(row + j);
      vmax = x > vmax ? x : vmax;  // NaN compares false: skipped
    }
    const float m_new = std::max(m[i], HorizontalMax(vmax));
    if (m_new == kNegInf) {  // nothing attended yet in this row
      if (HasNaN(row, width)) l[i] = kNaN;  // stays NaN: l * alpha + sum
      std::fill(row, row + width, 0.0f);
      continue;
    }
    // The running max rarely moves once a row has seen a few tiles.
    const float alpha = m_new == m[i] ? 1.0f : std::exp(m[i] - m_new);
    const Vec shift = Broadcast(m_new);
    Vec vsum{};
    for (int64_t j = 0; j < width; j += kLanes) {
      const Vec p = ExpNonPositive(Load(row + j) - shift);
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

// out = acc / l (+ poison, when not null), lse = m + log(l) and stats =
// (m, log l) for `rows` rows of d columns; a row with l = 0 attended
// nothing: zeros, lse -inf and stats (-inf, -inf). Returns whether out is
// all finite.
bool FinishRows(int64_t rows, int64_t d, const float* acc,
                const float* poison, const float* m, const float* l,
                float* out, float* lse, float* stats) {
  for (int64_t i = 0; i < rows; ++i) {
    float* o = out + i * d;
    const float log_l = std::log(l[i]);
    stats[2 * i] = m[i];
    stats[2 * i + 1] = log_l;
    if (l[i] == 0.0f) {
      std::fill(o, o + d, 0.0f);
      lse[i] = kNegInf;
      continue;
    }
    const float inv = 1.0f / l[i];
    for (int64_t c = 0; c < d; ++c) o[c] = acc[i * d + c] * inv;
    if (poison != nullptr) {
      for (int64_t c = 0; c < d; ++c) o[c] += poison[i * d + c];
    }
    lse[i] = m[i] + log_l;
  }
  return AllFinite(out, rows * d);
}

void TransposeTiles(const float* src, int64_t groups, int64_t num_blocks,
                    int64_t block_size, int64_t head_dim, float* dst,
                    const ParallelFor& parallel_for) {
  const int64_t tile = block_size * head_dim;
  parallel_for(groups * num_blocks, 2 * tile,
               [&](int64_t begin, int64_t end, int /*worker*/) {
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
  parallel_for(rows, 2 * head_dim,
               [&](int64_t begin, int64_t end, int /*worker*/) {
    for (int64_t r = begin; r < end; ++r) {
      float s = 0.0f;
      for (int64_t c = 0; c < head_dim; ++c) {
        s += dout[r * head_dim + c] * out[r * head_dim + c];
      }
      delta[r] = s - (dlse != nullptr ? dlse[r] : 0.0f);
    }
  });
}

// One pass over the layout's tiles for a shape: per (batch, head), groups
// of G query blocks whose tiles are walked M key blocks at a time. The two
// passes are its methods, so that they read these sizes by name.
class Pass {
 public:
  Pass(const AttentionShape& shape, const LayoutTables& layout)
      : shape(shape),
        lay(layout),
        H(shape.heads),
        n(shape.seq_len),
        d(shape.head_dim),
        bs(layout.block_size),
        nb(layout.num_blocks),
        G(std::clamp<int64_t>(kGroupRows / bs, 1, kMaxGroupBlocks)),
        M(std::clamp<int64_t>(kMergeColumns / bs, 1, kMaxMergeBlocks)),
        groups((nb + G - 1) / G) {}

  // Floats of workspace per worker: s, v_buf, acc, poison, m, l.
  int64_t ForwardWorkspaceFloats() const {
    const int64_t rows = G * bs, width = M * bs;
    return rows * width + width * d + 2 * rows * d + 2 * rows;
  }
  // Floats of workspace per worker: p, dp, k_buf.
  int64_t BackwardWorkspaceFloats() const {
    return 2 * (G * bs) * (M * bs) + (M * bs) * d;
  }

  void Forward(const ForwardArgs& args, const ParallelFor& parallel_for) const;
  void Backward(const BackwardArgs& args,
                const ParallelFor& parallel_for) const;

 private:
  // Tiles per table head: the table's total, row_ptr[T * nb], over T.
  int64_t TilesPerTableHead() const {
    return lay.row_ptr[lay.table_heads * nb] / lay.table_heads;
  }

  const AttentionShape& shape;
  const LayoutTables& lay;
  const int64_t H, n, d;       // heads, tokens, head dim
  const int64_t bs, nb;        // block size, blocks
  const int64_t G, M, groups;  // blocks a group, key blocks a step, groups
};

void Pass::Forward(const ForwardArgs& args,
                   const ParallelFor& parallel_for) const {
  const int64_t tiles_per_group =
      std::max<int64_t>(1, TilesPerTableHead() / groups);
  const int64_t cost = tiles_per_group * bs * bs * (4 * d + 20);
  const int64_t workspace = ForwardWorkspaceFloats();

  // Unit: (batch, head, group of G query blocks). Each step of the walk is
  // one online-softmax update of the group's active rows.
  parallel_for(shape.batch * H * groups, cost, [&](int64_t begin, int64_t end,
                                                   int worker) {
    float* s = args.workspace + worker * workspace;  // [G * bs, M * bs]
    float* v_buf = s + G * bs * M * bs;              // [M * bs, d]
    float* acc = v_buf + M * bs * d;                 // [G * bs, d]
    float* poison = acc + G * bs * d;                // [G * bs, d]
    float* m = poison + G * bs * d;                  // [G * bs]
    float* l = m + G * bs;                           // [G * bs]
    TileWalk walk(lay, M);
    for (int64_t unit = begin; unit < end; ++unit) {
      // Later groups attend more key blocks; alternating light and heavy
      // groups keeps any contiguous range of units near the average cost.
      const int64_t slot = unit % groups;
      const int64_t group = slot % 2 == 0 ? slot / 2 : groups - 1 - slot / 2;
      const int64_t bh = unit / groups;
      const int64_t b = bh / H, h = bh % H;
      const int64_t qb0 = group * G;
      const int64_t g_count = std::min(G, nb - qb0);
      const int64_t rows_total = g_count * bs;
      const float* q = args.q + (bh * n + qb0 * bs) * d;  // [rows_total, d]
      const float* kt = args.kt + bh * n * d;              // [nb, d, bs]
      const float* v_bh = args.v + bh * n * d;             // [n, d]
      float* out = args.out + (bh * n + qb0 * bs) * d;     // [rows_total, d]
      float* lse = args.lse + bh * n + qb0 * bs;           // [rows_total]
      float* stats = args.stats + 2 * (bh * n + qb0 * bs);  // [rows_total, 2]
      // A group whose output is not finite is computed again in an exact
      // pass: a value row with an inf or NaN would otherwise reach, as
      // 0 * NaN in the GEMM, rows that do not attend it.
      for (const bool exact : {false, true}) {
        std::fill(acc, acc + rows_total * d, 0.0f);
        std::fill(m, m + rows_total, kNegInf);
        std::fill(l, l + rows_total, 0.0f);
        if (exact) std::fill(poison, poison + rows_total * d, 0.0f);
        walk.Start(h, qb0, g_count);
        while (walk.Next()) {
          const int64_t width = walk.count() * bs;
          bool non_finite = false;
          // [width, d]
          const float* v =
              exact ? FiniteStepRows(walk, v_bh, bs, d, v_buf, &non_finite)
                    : StepRows(walk, v_bh, bs, d, v_buf);
          walk.ForEachRun([&](int64_t g0, int64_t g1) {
            const int64_t rows = (g1 - g0) * bs;
            float* acc_run = acc + g0 * bs * d;  // [rows, d]
            // Scores scale * q.k [rows, width].
            StepScores(shape, lay, walk, b, h, g0, g1, q + g0 * bs * d, kt,
                       shape.scale, /*mask=*/true, s);
            if (non_finite) {
              AddNonFiniteValues(walk, v_bh, bs, d, rows, s,
                                 poison + g0 * bs * d);
            }
            OnlineSoftmaxRows(rows, width, d, s, m + g0 * bs, l + g0 * bs,
                              acc_run);
            Gemm<true>(rows, width, d, s, width, v, d, acc_run, d);
          });
        }
        if (FinishRows(rows_total, d, acc, exact ? poison : nullptr, m, l,
                       out, lse, stats)) {
          break;
        }
      }
    }
  });
}

void Pass::Backward(const BackwardArgs& args,
                    const ParallelFor& parallel_for) const {
  const int64_t cost =
      std::max<int64_t>(1, TilesPerTableHead()) * bs * bs * (10 * d + 30);
  const float scale = shape.scale;
  const int64_t workspace = BackwardWorkspaceFloats();

  // Unit: (batch, head), so that one thread owns the head's dK and dV. The
  // walk is the forward's: per group of G query blocks, whose q, dO and dQ
  // stay in cache, steps of key blocks; per step and run, S and dP are tall
  // GEMMs (rows = queries), dK and dV of each key block long ones (depth =
  // queries) and dQ one GEMM of depth `width`.
  parallel_for(shape.batch * H, cost, [&](int64_t begin, int64_t end,
                                          int worker) {
    // p: scores, then probabilities; dp: dP, then dS; both [rows, width] =
    // [query, key]. k_buf: [M * bs, d].
    float* p = args.workspace + worker * workspace;
    float* dp = p + G * bs * M * bs;
    float* k_buf = dp + G * bs * M * bs;
    TileWalk walk(lay, M);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* kt = args.kt + bh * n * d;  // [nb, d, bs]
      const float* vt = args.vt + bh * n * d;  // [nb, d, bs]
      float* dq = args.dq + bh * n * d;        // [n, d]
      float* dk = args.dk + bh * n * d;        // [n, d]
      float* dv = args.dv + bh * n * d;        // [n, d]
      std::fill(dq, dq + n * d, 0.0f);
      std::fill(dk, dk + n * d, 0.0f);
      std::fill(dv, dv + n * d, 0.0f);
      for (int64_t group = 0; group < groups; ++group) {
        const int64_t qb0 = group * G;
        const int64_t g_count = std::min(G, nb - qb0);
        walk.Start(h, qb0, g_count);
        while (walk.Next()) {
          const int64_t width = walk.count() * bs;
          // [width, d]
          const float* k = StepRows(walk, args.k + bh * n * d, bs, d, k_buf);
          walk.ForEachRun([&](int64_t g0, int64_t g1) {
            const int64_t rows = (g1 - g0) * bs;
            const int64_t row0 = bh * n + (qb0 + g0) * bs;
            const float* q = args.q + row0 * d;         // [rows, d]
            const float* dout = args.dout + row0 * d;   // [rows, d]
            const float* stats = args.stats + 2 * row0;  // [rows, 2]
            const float* delta = args.delta + row0;     // [rows]
            StepScores(shape, lay, walk, b, h, g0, g1, q, kt, scale,
                       /*mask=*/true, p);
            StepScores(shape, lay, walk, b, h, g0, g1, dout, vt,
                       /*alpha=*/1.0f, /*mask=*/false, dp);
            const Vec neg_inf = Broadcast(kNegInf);
            for (int64_t i = 0; i < rows; ++i) {
              // Rows with l = 0 (log l = -inf) attended nothing: P = 0.
              float* p_row = p + i * width;
              float* ds_row = dp + i * width;
              if (stats[2 * i + 1] == kNegInf) {
                std::fill(p_row, p_row + width, 0.0f);
                std::fill(ds_row, ds_row + width, 0.0f);
                continue;
              }
              // P = exp((S - m) - log l): S - m is exact and <= 0, so the
              // exponent is <= 0 and as precise as S - m. dS = P (dP -
              // delta), times the scale that S = scale q.k carries into dQ
              // and dK. Masked-out scores (-inf) get P and dS exactly 0, even
              // where the stats, dP or delta are NaN.
              const Vec row_max = Broadcast(stats[2 * i]);
              const Vec log_l = Broadcast(stats[2 * i + 1]);
              const Vec delta_i = Broadcast(delta[i]);
              for (int64_t j = 0; j < width; j += kLanes) {
                const Vec s_j = Load(p_row + j);
                const IntVec masked = s_j == neg_inf;
                const Vec p_j =
                    masked ? Vec{} : ExpNonPositive((s_j - row_max) - log_l);
                const Vec ds_j = p_j * scale * (Load(ds_row + j) - delta_i);
                Store(p_row + j, p_j);
                Store(ds_row + j, masked ? Vec{} : ds_j);
              }
            }
            for (int64_t c = 0; c < walk.count(); ++c) {
              const int64_t x = walk.key_block(c) * bs * d;
              // dV += P^T dO and dK += dS^T Q.
              Gemm<true, true>(bs, rows, d, p + c * bs, width, dout, d,
                               dv + x, d);
              Gemm<true, true>(bs, rows, d, dp + c * bs, width, q, d, dk + x,
                               d);
            }
            // dQ += dS K.
            Gemm<true>(rows, width, d, dp, width, k, d,
                       dq + (qb0 + g0) * bs * d, d);
          });
        }
      }
    }
  });
}

}  // namespace

const CpuCore kCpuCore = {  // declared extern in the header
    ST_KERAS_NAME(ST_KERAS_CPU_ISA),
    TransposeTiles,
    RowDeltas,
    [](const AttentionShape& shape, const LayoutTables& layout) {
      return Pass(shape, layout).ForwardWorkspaceFloats();
    },
    [](const AttentionShape& shape, const LayoutTables& layout) {
      return Pass(shape, layout).BackwardWorkspaceFloats();
    },
    [](const ForwardArgs& args, const ParallelFor& parallel_for) {
      Pass(args.shape, args.layout).Forward(args, parallel_for);
    },
    [](const BackwardArgs& args, const ParallelFor& parallel_for) {
      Pass(args.shape, args.layout).Backward(args, parallel_for);
    },
};

}  // namespace ST_KERAS_CPU_ISA
}  // namespace st_keras
