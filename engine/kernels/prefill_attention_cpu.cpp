// Causal attention of prompts for the CPU engine, in two ops:
//
// - prefill_attention: fresh prompts (no cached prefix). q [T, Hq, D], k and v [T, Hkv, D]
//   (any token and head strides, D contiguous, one dtype): sequence s owns rows
//   cu_seqlens[s] .. cu_seqlens[s + 1] and its query at position p attends over keys 0..p.
// - paged_prefill_attention: any batch over one layer's paged cache [N, 2, block_size, Hkv, D]
//   (the step's own K/V already stored): sequence s has seq_lens[s] tokens, its queries
//   (rows query_start_loc[s] .. [s + 1]) are the last ones: a prompt over a cached prefix, a
//   chunk of a long prompt, decodes mixed in.
// Both return [T, Hq, D] in q's dtype.
//
// Flash-attention order: a work item is a tile of TILE_ROWS query positions of one sequence for
// all the query heads of one KV head (GQA: each K/V block is read and widened once for the G
// heads); keys go by in blocks of 16 up to the tile's last position, with an online softmax in
// float32, so no [L, L] score matrix is ever built and blocks above the diagonal are never
// computed. Scores and weighted sums are float32 register tiles (GCC vector extensions: one
// 512-bit register per 16 rows on AVX-512, two 256-bit ones on AVX2), their products VDPBF16PS
// for bf16 on AVX512-BF16. Two lane groups (32 rows) that both see a key block take it
// together: each broadcast key or value feeds both groups' FMAs, which halves the loads per
// FMA that bound one group alone. Queries come in and weighted sums go out through 16 x 16
// register transposes, and float32 K/V rows are read where they lie (no copy per key block):
// before that, the scalar transposing loads and the copies took about as long as the FMAs.
// torch's CPU flash SDPA has no causal block skipping below 512 keys and runs a masked
// [G*R, L] tile per call: ~65-85 GFLOP/s at SmolLM2-135M's prefill shape (16 x 512) on 2
// cores; this kernel ~220 (fp32) and ~290 (bf16) one group at a time with scalar transposes,
// ~260 and ~330 now (interleaved A/B medians on a noisy VM).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu_widen.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

using tandem_cpu::widen;

typedef float v16f __attribute__((vector_size(64)));  // 16 float32 lanes

constexpr int64_t KEYS = 16;        // keys per block: one score vector (16 rows) per key
constexpr int64_t TILE_ROWS = 32;   // query positions per work item (times G heads)
constexpr float MASKED = -1e30f;    // a masked score (finite: -ffast-math assumes no infinities)

// A work item: query rows first_row .. first_row + rows - 1 of sequence seq, at positions
// context + first_row + ..., for the query heads of one KV head.
struct Item {
  int64_t seq, kv_head, first_row, rows, context, cost;
};

// Where a key's K and V rows are: the prompt's own k, v [T, Hkv, D] (fresh prompts) ...
template <typename T>
struct StepKeys {
  const T* k;
  const T* v;
  const int32_t* starts;
  int64_t k_tok, k_head, v_tok, v_head, num_kv_heads;

  StepKeys(const at::Tensor& k_, const at::Tensor& v_, const int32_t* starts_)
      : k(k_.data_ptr<T>()), v(v_.data_ptr<T>()), starts(starts_), k_tok(k_.stride(0)),
        k_head(k_.stride(1)), v_tok(v_.stride(0)), v_head(v_.stride(1)),
        num_kv_heads(k_.size(1)) {}
  const T* key(int64_t seq, int64_t pos, int64_t head) const {
    return k + (starts[seq] + pos) * k_tok + head * k_head;
  }
  const T* value(int64_t seq, int64_t pos, int64_t head) const {
    return v + (starts[seq] + pos) * v_tok + head * v_head;
  }
};

// ... or one layer's paged cache [N, 2, block_size, Hkv, D] through the block tables (a prompt
// over a cached prefix, a chunk of a long prompt, a mixed batch's sequences).
template <typename T>
struct PagedKeys {
  const T* kv;
  const int32_t* tables;
  int64_t block_stride, v_stride, row_stride, head_stride, block_size, table_stride,
      num_kv_heads;

  PagedKeys(const at::Tensor& kv_, const at::Tensor& tables_)
      : kv(kv_.data_ptr<T>()), tables(tables_.data_ptr<int32_t>()), block_stride(kv_.stride(0)),
        v_stride(kv_.stride(1)), row_stride(kv_.stride(2)), head_stride(kv_.stride(3)),
        block_size(kv_.size(2)), table_stride(tables_.stride(0)), num_kv_heads(kv_.size(3)) {}
  const T* key(int64_t seq, int64_t pos, int64_t head) const {
    return kv + tables[seq * table_stride + pos / block_size] * block_stride +
           (pos % block_size) * row_stride + head * head_stride;
  }
  const T* value(int64_t seq, int64_t pos, int64_t head) const {
    return key(seq, pos, head) + v_stride;
  }
};

typedef int32_t v16i __attribute__((vector_size(64)));

inline v16f splat(float x) { return v16f{} + x; }

// exp of 16 lanes, x <= 0 (softmax's arguments): 2^n * e^r with |r| <= ln2 / 2, a degree-6
// Taylor polynomial (relative error ~1e-7); below -87 it returns ~1e-38 instead of underflowing.
inline v16f vexp(v16f x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;
  const v16f t = x * 1.44269504088896341f;
  const v16i n = __builtin_convertvector(t + (t >= splat(0.f) ? splat(0.5f) : splat(-0.5f)), v16i);
  const v16f nf = __builtin_convertvector(n, v16f);
  const v16f r = x - nf * 0.693145751953125f - nf * 1.428606765330187e-06f;
  v16f p = splat(1.f / 720.f);
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  return (v16f)((v16i)p + (n << 23));
}

inline v16f vmax(v16f a, v16f b) { return a > b ? a : b; }

// One round of `transpose16`: swaps bit b of the row index with bit b of the lane index
// (S = 2^b), between rows i and i + S.
template <int S>
inline void swap_index_bit(v16f* r) {
  for (int i = 0; i < 16; ++i) {
    if (i & S) continue;
    const v16f a = r[i], b = r[i + S];
    if constexpr (S == 8) {
      r[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
      r[i + S] =
          __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    } else if constexpr (S == 4) {
      r[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
      r[i + S] =
          __builtin_shufflevector(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    } else if constexpr (S == 2) {
      r[i] = __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
      r[i + S] =
          __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    } else {
      r[i] = __builtin_shufflevector(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
      r[i + S] =
          __builtin_shufflevector(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    }
  }
}

// r[i][j] <- r[j][i] for a 16 x 16 float32 tile in 16 vectors: 64 two-source shuffles, where
// reading it column by column takes 256 lane extractions.
inline void transpose16(v16f* r) {
  swap_index_bit<8>(r);
  swap_index_bit<4>(r);
  swap_index_bit<2>(r);
  swap_index_bit<1>(r);
}

// 16 values widened to float32 lanes
template <typename T>
inline v16f load16(const T* p) {
  v16f v;
  for (int64_t i = 0; i < 16; ++i) v[i] = widen(p[i]);
  return v;
}
inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Scores and weighted sums in float32 FMAs on widened values: every dtype, every CPU (vector
// extensions compile to AVX-512, AVX2 or NEON). Lane group l holds 16 rows' queries transposed,
// [D][16 rows], pre-scaled; a key block is 16 K and V rows: float32 ones read where they lie,
// others widened into a buffer first.
template <typename T, int64_t D>
struct FloatMath {
  std::vector<v16f> queries;        // [lane group][D]
  std::vector<float> keys, values;  // [16 keys][D]: widened K and V rows (T not float32)
  std::vector<float> zeros;         // [D]: a padding key's K and V
  const float* key_rows[KEYS] = {};    // key j's K row (D values)
  const float* value_rows[KEYS] = {};  // and its V row
  float scale = 1.f;

  explicit FloatMath(int64_t lane_groups) : queries(lane_groups * D), keys(KEYS * D),
                                            values(KEYS * D), zeros(D, 0.f) {}

  // lane group l's 16 rows: rows[r] (D values) or, for padding, zeros; scaled, and transposed
  // 16 head dims at a time in registers
  void load_queries(int64_t l, const T* const* rows, float query_scale) {
    v16f* dst = queries.data() + l * D;
    for (int64_t c = 0; c < D; c += 16) {
      v16f t[16];
      for (int64_t r = 0; r < 16; ++r) t[r] = rows[r] ? load16(rows[r] + c) * query_scale : v16f{};
      transpose16(t);
      for (int64_t d = 0; d < 16; ++d) dst[c + d] = t[d];
    }
  }

  void load_key_value(int64_t j, const T* k_row, const T* v_row) {
    if constexpr (std::is_same_v<T, float>) {
      key_rows[j] = k_row ? k_row : zeros.data();
      value_rows[j] = v_row ? v_row : zeros.data();
    } else {
      float* kd = keys.data() + j * D;
      float* vd = values.data() + j * D;
      if (k_row) {
        for (int64_t d = 0; d < D; ++d) kd[d] = widen(k_row[d]);
      } else {
        std::fill(kd, kd + D, 0.f);
      }
      if (v_row) {
        for (int64_t d = 0; d < D; ++d) vd[d] = widen(v_row[d]);
      } else {
        std::fill(vd, vd + D, 0.f);
      }
      key_rows[j] = kd;
      value_rows[j] = vd;
    }
  }

  // s[j] = the 16 rows' scores against key j, 8 keys at a time (independent accumulators)
  void scores(int64_t l, v16f* s) const {
    const v16f* ql = queries.data() + l * D;
    for (int64_t j0 = 0; j0 < KEYS; j0 += 8) {
      const float* const* k = key_rows + j0;
      v16f a[8] = {};
      for (int64_t d = 0; d < D; ++d) {
        const v16f qd = ql[d];
        for (int64_t e = 0; e < 8; ++e) a[e] += k[e][d] * qd;
      }
      for (int64_t e = 0; e < 8; ++e) s[j0 + e] = a[e];
    }
  }

  // a[d] = a[d] * rescale + sum_j v_j[d] * p_j, 8 head dims at a time (each p_j loaded once)
  void accumulate(v16f* a, const v16f* probs, v16f rescale) const {
    for (int64_t d = 0; d < D; d += 8) {
      v16f x[8];
      for (int64_t e = 0; e < 8; ++e) x[e] = a[d + e] * rescale;
      for (int64_t j = 0; j < KEYS; ++j) {
        const v16f pj = probs[j];
        const float* vj = value_rows[j] + d;
        for (int64_t e = 0; e < 8; ++e) x[e] += vj[e] * pj;
      }
      for (int64_t e = 0; e < 8; ++e) a[d + e] = x[e];
    }
  }

  // `scores` of lane groups l and l + 1 at once: each key value, broadcast once, feeds both
  // groups' FMAs (16 FMAs to 10 loads, where one group alone has 8 to 9)
  void scores2(int64_t l, v16f* sa, v16f* sb) const {
    const v16f* qa = queries.data() + l * D;
    const v16f* qb = qa + D;
    for (int64_t j0 = 0; j0 < KEYS; j0 += 8) {
      const float* const* kj = key_rows + j0;
      v16f a[8] = {}, b[8] = {};
      for (int64_t d = 0; d < D; ++d) {
        const v16f x = qa[d], y = qb[d];
        for (int64_t e = 0; e < 8; ++e) {
          const v16f k = splat(kj[e][d]);
          a[e] += k * x;
          b[e] += k * y;
        }
      }
      for (int64_t e = 0; e < 8; ++e) {
        sa[j0 + e] = a[e];
        sb[j0 + e] = b[e];
      }
    }
  }

  // `accumulate` of two lane groups, each V value broadcast once for both
  void accumulate2(v16f* a, v16f* b, const v16f* pa, const v16f* pb, v16f ra, v16f rb) const {
    for (int64_t d = 0; d < D; d += 8) {
      v16f x[8], y[8];
      for (int64_t e = 0; e < 8; ++e) {
        x[e] = a[d + e] * ra;
        y[e] = b[d + e] * rb;
      }
      for (int64_t j = 0; j < KEYS; ++j) {
        const v16f pj = pa[j], qj = pb[j];
        const float* vj = value_rows[j] + d;
        for (int64_t e = 0; e < 8; ++e) {
          const v16f v = splat(vj[e]);
          x[e] += v * pj;
          y[e] += v * qj;
        }
      }
      for (int64_t e = 0; e < 8; ++e) {
        a[d + e] = x[e];
        b[d + e] = y[e];
      }
    }
  }
};

#if defined(__AVX512BF16__)
inline uint32_t bf16_pair(c10::BFloat16 lo, c10::BFloat16 hi) {
  return static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
}

// bfloat16 on a CPU with AVX512-BF16: VDPBF16PS multiplies bf16 pairs into float32 sums, twice
// the FMAs' work per instruction. Queries go in unscaled as [D / 2][16 rows] pairs of head dims
// (the scale multiplies the float32 scores, as torch's SDPA does); the probabilities are rounded
// to bf16 for the weighted sum (as torch's SDPA does), paired by key with V stored as
// [8 key pairs][D].
template <int64_t D>
struct Bf16Math {
  std::vector<uint32_t> queries;  // [lane group][D / 2][16 rows]
  std::vector<uint32_t> keys;     // [16 keys][D / 2]
  std::vector<uint32_t> values;   // [8 key pairs][D]
  float scale = 1.f;

  explicit Bf16Math(int64_t lane_groups) : queries(lane_groups * D * 8), keys(KEYS * D / 2),
                                           values(KEYS / 2 * D) {}

  void load_query(int64_t l, int64_t lane, const c10::BFloat16* src, float query_scale) {
    scale = query_scale;
    uint32_t* dst = queries.data() + l * D * 8 + lane;
    for (int64_t i = 0; i < D / 2; ++i) dst[i * 16] = src ? bf16_pair(src[2 * i], src[2 * i + 1]) : 0;
  }

  void load_queries(int64_t l, const c10::BFloat16* const* rows, float query_scale) {
    for (int64_t lane = 0; lane < 16; ++lane) load_query(l, lane, rows[lane], query_scale);
  }

  void load_key_value(int64_t j, const c10::BFloat16* k_row, const c10::BFloat16* v_row) {
    uint32_t* kd = keys.data() + j * D / 2;
    for (int64_t i = 0; i < D / 2; ++i) kd[i] = k_row ? bf16_pair(k_row[2 * i], k_row[2 * i + 1]) : 0;
    uint16_t* vd = reinterpret_cast<uint16_t*>(values.data() + (j / 2) * D) + (j % 2);
    for (int64_t d = 0; d < D; ++d) vd[2 * d] = v_row ? v_row[d].x : 0;
  }

  void scores(int64_t l, v16f* s) const {
    const uint32_t* ql = queries.data() + l * D * 8;
    for (int64_t j0 = 0; j0 < KEYS; j0 += 8) {
      __m512 acc[8];
      for (int64_t e = 0; e < 8; ++e) acc[e] = _mm512_setzero_ps();
      for (int64_t i = 0; i < D / 2; ++i) {
        const __m512bh qi = (__m512bh)_mm512_loadu_si512(ql + i * 16);
        for (int64_t e = 0; e < 8; ++e) {
          const __m512bh kj = (__m512bh)_mm512_set1_epi32(static_cast<int>(keys[(j0 + e) * D / 2 + i]));
          acc[e] = _mm512_dpbf16_ps(acc[e], qi, kj);
        }
      }
      for (int64_t e = 0; e < 8; ++e) s[j0 + e] = (v16f)acc[e] * scale;
    }
  }

  // pairs[jp] = (p_2jp, p_2jp+1) of the 16 rows, rounded to bf16
  static void to_pairs(const v16f* probs, __m512bh* pairs) {
    for (int64_t jp = 0; jp < KEYS / 2; ++jp) {
      const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh((__m512)probs[2 * jp]));
      const __m512i hi =
          _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh((__m512)probs[2 * jp + 1]));
      pairs[jp] = (__m512bh)_mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
    }
  }

  void accumulate(v16f* a, const v16f* probs, v16f rescale) const {
    __m512bh pairs[KEYS / 2];  // [key pair]: (p_2j, p_2j+1) of the 16 rows, rounded to bf16
    to_pairs(probs, pairs);
    for (int64_t d = 0; d < D; d += 8) {
      __m512 x[8];
      for (int64_t e = 0; e < 8; ++e) x[e] = (__m512)(a[d + e] * rescale);
      for (int64_t jp = 0; jp < KEYS / 2; ++jp) {
        const uint32_t* vj = values.data() + jp * D + d;
        for (int64_t e = 0; e < 8; ++e) {
          x[e] = _mm512_dpbf16_ps(x[e], pairs[jp],
                                  (__m512bh)_mm512_set1_epi32(static_cast<int>(vj[e])));
        }
      }
      for (int64_t e = 0; e < 8; ++e) a[d + e] = (v16f)x[e];
    }
  }

  // `scores` of lane groups l and l + 1: each key pair broadcast once for both groups
  void scores2(int64_t l, v16f* sa, v16f* sb) const {
    const uint32_t* qa = queries.data() + l * D * 8;
    const uint32_t* qb = qa + D * 8;
    for (int64_t j0 = 0; j0 < KEYS; j0 += 8) {
      __m512 a[8], b[8];
      for (int64_t e = 0; e < 8; ++e) a[e] = b[e] = _mm512_setzero_ps();
      for (int64_t i = 0; i < D / 2; ++i) {
        const __m512bh x = (__m512bh)_mm512_loadu_si512(qa + i * 16);
        const __m512bh y = (__m512bh)_mm512_loadu_si512(qb + i * 16);
        for (int64_t e = 0; e < 8; ++e) {
          const __m512bh k =
              (__m512bh)_mm512_set1_epi32(static_cast<int>(keys[(j0 + e) * D / 2 + i]));
          a[e] = _mm512_dpbf16_ps(a[e], x, k);
          b[e] = _mm512_dpbf16_ps(b[e], y, k);
        }
      }
      for (int64_t e = 0; e < 8; ++e) {
        sa[j0 + e] = (v16f)a[e] * scale;
        sb[j0 + e] = (v16f)b[e] * scale;
      }
    }
  }

  // `accumulate` of two lane groups, each V pair broadcast once for both
  void accumulate2(v16f* a, v16f* b, const v16f* pa, const v16f* pb, v16f ra, v16f rb) const {
    __m512bh pairs_a[KEYS / 2], pairs_b[KEYS / 2];
    to_pairs(pa, pairs_a);
    to_pairs(pb, pairs_b);
    for (int64_t d = 0; d < D; d += 8) {
      __m512 x[8], y[8];
      for (int64_t e = 0; e < 8; ++e) {
        x[e] = (__m512)(a[d + e] * ra);
        y[e] = (__m512)(b[d + e] * rb);
      }
      for (int64_t jp = 0; jp < KEYS / 2; ++jp) {
        const uint32_t* vj = values.data() + jp * D + d;
        for (int64_t e = 0; e < 8; ++e) {
          const __m512bh v = (__m512bh)_mm512_set1_epi32(static_cast<int>(vj[e]));
          x[e] = _mm512_dpbf16_ps(x[e], pairs_a[jp], v);
          y[e] = _mm512_dpbf16_ps(y[e], pairs_b[jp], v);
        }
      }
      for (int64_t e = 0; e < 8; ++e) {
        a[d + e] = (v16f)x[e];
        b[d + e] = (v16f)y[e];
      }
    }
  }
};
#endif

// The work of one thread: tiles, each over its own keys, with Math's scores and weighted sums.
// In a tile, score rows go 16 to a lane group (one head, 16 consecutive positions; each head's
// rows padded to a multiple of 16), so scores, the running max and sum and the mask are all
// lane-wise and the softmax needs no reduction across lanes.
template <typename T, int64_t D, typename Math, typename Keys>
void run_items(const std::vector<Item>& items, const at::Tensor& q, const Keys& keys,
               const int32_t* starts, float scale, at::Tensor& out) {
  const int64_t num_heads = q.size(1), group = num_heads / keys.num_kv_heads;
  const int64_t q_tok = q.stride(0), q_head = q.stride(1);
  const T* q_data = q.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  const int64_t max_lanes = group * TILE_ROWS / 16;  // lane groups of a full tile
  Math math(max_lanes);
  v16f probs[KEYS], probs2[KEYS];  // [key]: 16 rows' probabilities (of two lane groups)
  std::vector<v16f> top(max_lanes), total(max_lanes);
  std::vector<v16f> acc(max_lanes * D);  // [lane group][D]: 16 rows' weighted sums
  for (const Item& it : items) {
    const int64_t base = starts[it.seq], rows = it.rows, first = it.first_row;
    const int64_t lanes_per_head = (rows + 15) / 16, lane_groups = group * lanes_per_head;
    for (int64_t g = 0; g < group; ++g) {
      for (int64_t r0 = 0; r0 < lanes_per_head * 16; r0 += 16) {
        const T* lane_rows[16];  // the lane group's query rows; nullptr: padding
        for (int64_t r = 0; r < 16; ++r) {
          lane_rows[r] = r0 + r < rows ? q_data + (base + first + r0 + r) * q_tok +
                                             (it.kv_head * group + g) * q_head
                                       : nullptr;
        }
        math.load_queries(g * lanes_per_head + r0 / 16, lane_rows, scale);
      }
    }
    for (int64_t l = 0; l < lane_groups; ++l) {
      top[l] = splat(MASKED);
      total[l] = v16f{};
    }
    for (int64_t i = 0; i < lane_groups * D; ++i) acc[i] = v16f{};
    const int64_t end = it.context + first + rows;  // keys 0 .. end - 1 are seen by some row
    for (int64_t key0 = 0; key0 < end; key0 += KEYS) {
      const int64_t nk = std::min(KEYS, end - key0);
      for (int64_t j = 0; j < KEYS; ++j) {
        const bool real = j < nk;
        math.load_key_value(j, real ? keys.key(it.seq, key0 + j, it.kv_head) : nullptr,
                            real ? keys.value(it.seq, key0 + j, it.kv_head) : nullptr);
      }
      // lane group l sees this key block unless its 16 rows all sit above the diagonal
      auto sees_block = [&](int64_t l) {
        return key0 <= it.context + first + (l % lanes_per_head) * 16 + 15;
      };
      // masks l's scores s on the diagonal, and turns them into probabilities with the online
      // softmax (top and total updated); returns the factor l's sums are rescaled by
      auto softmax = [&](int64_t l, v16f* s, v16f* p) {
        const int64_t pos0 = it.context + first + (l % lanes_per_head) * 16;  // lane 0's position
        if (key0 + KEYS - 1 > pos0) {  // the diagonal: key key0 + j is masked above row's pos
          v16f pos = splat(static_cast<float>(pos0));
          for (int64_t lane = 0; lane < 16; ++lane) pos[lane] += static_cast<float>(lane);
          for (int64_t j = 0; j < KEYS; ++j) {
            s[j] = splat(static_cast<float>(key0 + j)) > pos ? splat(MASKED) : s[j];
          }
        }
        v16f block_top = s[0];
        for (int64_t j = 1; j < KEYS; ++j) block_top = vmax(block_top, s[j]);
        const v16f new_top = vmax(top[l], block_top);
        const v16f rescale = vexp(top[l] - new_top);
        v16f sum{};
        for (int64_t j = 0; j < KEYS; ++j) {
          p[j] = vexp(s[j] - new_top);
          sum += p[j];
        }
        top[l] = new_top;
        total[l] = total[l] * rescale + sum;
        return rescale;
      };
      for (int64_t l = 0; l < lane_groups;) {
        if (!sees_block(l)) {
          ++l;
          continue;
        }
        if (l + 1 < lane_groups && sees_block(l + 1)) {  // two lane groups share the key reads
          v16f sa[KEYS], sb[KEYS];
          math.scores2(l, sa, sb);
          const v16f ra = softmax(l, sa, probs), rb = softmax(l + 1, sb, probs2);
          math.accumulate2(acc.data() + l * D, acc.data() + (l + 1) * D, probs, probs2, ra, rb);
          l += 2;
          continue;
        }
        v16f s[KEYS];
        math.scores(l, s);
        const v16f rescale = softmax(l, s, probs);
        math.accumulate(acc.data() + l * D, probs, rescale);
        ++l;
      }
    }
    for (int64_t l = 0; l < lane_groups; ++l) {
      const int64_t g = l / lanes_per_head, row0 = (l % lanes_per_head) * 16;
      const v16f inv = 1.f / total[l];
      for (int64_t c = 0; c < D; c += 16) {  // 16 head dims of the 16 rows: [dim][row] -> [row][dim]
        v16f t[16];
        for (int64_t d = 0; d < 16; ++d) t[d] = acc[l * D + c + d] * inv;
        transpose16(t);
        for (int64_t lane = 0; lane < 16 && row0 + lane < rows; ++lane) {
          T* dst = out_data +
                   ((base + first + row0 + lane) * num_heads + it.kv_head * group + g) * D + c;
          for (int64_t d = 0; d < 16; ++d) dst[d] = static_cast<T>(t[lane][d]);
        }
      }
    }
  }
}

// bf16 on AVX512-BF16 takes Bf16Math, everything else FloatMath.
template <typename T, int64_t CHUNKS, typename Keys>
void run_head_dim(const std::vector<Item>& items, const at::Tensor& q, const Keys& keys,
                  const int32_t* starts, float scale, at::Tensor& out) {
  constexpr int64_t D = CHUNKS * 16;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return run_items<T, D, Bf16Math<D>>(items, q, keys, starts, scale, out);
  }
#endif
  run_items<T, D, FloatMath<T, D>>(items, q, keys, starts, scale, out);
}

// The tiles of every sequence and KV head, dealt to the threads longest first (a tile's cost
// is its rows times the keys they see, so the last tiles of a prompt cost the most).
std::vector<std::vector<Item>> deal(const int32_t* starts, const std::vector<int64_t>& contexts,
                                    int64_t num_kv_heads, int64_t threads) {
  std::vector<Item> items;
  for (int64_t s = 0; s < static_cast<int64_t>(contexts.size()); ++s) {
    const int64_t len = starts[s + 1] - starts[s], context = contexts[s];
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      for (int64_t first = 0; first < len; first += TILE_ROWS) {
        const int64_t rows = std::min(TILE_ROWS, len - first);
        items.push_back({s, h, first, rows, context, rows * (context + first + rows)});
      }
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  std::vector<std::vector<Item>> lists(std::max<int64_t>(threads, 1));
  std::vector<int64_t> load(lists.size(), 0);
  for (const Item& it : items) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    lists[t].push_back(it);
    load[t] += it.cost;
  }
  return lists;
}

template <template <typename> class KeysOf, typename... KeyArgs>
at::Tensor run(const char* op, const at::Tensor& q, const int32_t* starts,
               const std::vector<int64_t>& contexts, int64_t num_kv_heads, double scale,
               const KeyArgs&... key_args) {
  const int64_t head_dim = q.size(2);
  TORCH_CHECK(head_dim % 16 == 0 && head_dim > 0 && head_dim <= 128, op, ": head_dim ",
              head_dim, " is not a multiple of 16 up to 128");
  at::Tensor out = at::empty({q.size(0), q.size(1), head_dim}, q.options());
  const auto lists = deal(starts, contexts, num_kv_heads, at::get_num_threads());
  const float scale_f = static_cast<float>(scale);
  auto for_dtype = [&](auto zero) {
    using T = decltype(zero);
    const KeysOf<T> keys(key_args...);
    at::parallel_for(0, static_cast<int64_t>(lists.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        switch (head_dim / 16) {
          case 1: run_head_dim<T, 1>(lists[t], q, keys, starts, scale_f, out); break;
          case 2: run_head_dim<T, 2>(lists[t], q, keys, starts, scale_f, out); break;
          case 3: run_head_dim<T, 3>(lists[t], q, keys, starts, scale_f, out); break;
          case 4: run_head_dim<T, 4>(lists[t], q, keys, starts, scale_f, out); break;
          case 5: run_head_dim<T, 5>(lists[t], q, keys, starts, scale_f, out); break;
          case 6: run_head_dim<T, 6>(lists[t], q, keys, starts, scale_f, out); break;
          case 7: run_head_dim<T, 7>(lists[t], q, keys, starts, scale_f, out); break;
          default: run_head_dim<T, 8>(lists[t], q, keys, starts, scale_f, out); break;
        }
      }
    });
  };
  switch (q.scalar_type()) {
    case at::kFloat: for_dtype(float{}); break;
    case at::kBFloat16: for_dtype(c10::BFloat16{}); break;
    case at::kHalf: for_dtype(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": dtype ", q.scalar_type(), " not supported");
  }
  return out;
}

// cu [S + 1] int32 from 0 to T, not decreasing: the sequences' query rows.
const int32_t* query_starts(const char* op, const at::Tensor& cu, int64_t num_tokens) {
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.is_contiguous() &&
              cu.size(0) >= 1, op, ": cu_seqlens must be int32 [S + 1]");
  const int32_t* starts = cu.data_ptr<int32_t>();
  const int64_t num_seqs = cu.size(0) - 1;
  TORCH_CHECK(starts[0] == 0 && starts[num_seqs] == num_tokens, op,
              ": cu_seqlens must run from 0 to T = ", num_tokens);
  for (int64_t s = 0; s < num_seqs; ++s) {
    TORCH_CHECK(starts[s + 1] >= starts[s], op, ": cu_seqlens must not decrease (at ", s, ")");
  }
  return starts;
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& cu_seqlens, double scale) {
  const char* op = "prefill_attention";
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "prefill_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "prefill_attention: q must be [T, Hq, D], k and v [T, Hkv, D]");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "prefill_attention: the head dimension must be contiguous");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(2) == q.size(2),
              "prefill_attention: k and v must be [T, Hkv, D] with q's T and D");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "prefill_attention: Hq must be a multiple of Hkv");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "prefill_attention: q, k and v must have one dtype");
  const int32_t* starts = query_starts(op, cu_seqlens, q.size(0));
  const std::vector<int64_t> contexts(cu_seqlens.size(0) - 1, 0);  // fresh: nothing before
  return run<StepKeys>(op, q, starts, contexts, k.size(1), scale, k, v, starts);
}

at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& kv_layer,
                                   const at::Tensor& block_tables,
                                   const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                                   double scale) {
  const char* op = "paged_prefill_attention";
  TORCH_CHECK(q.device().is_cpu() && kv_layer.device().is_cpu(),
              "paged_prefill_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1,
              "paged_prefill_attention: q must be [T, Hq, D], D contiguous");
  TORCH_CHECK(kv_layer.dim() == 5 && kv_layer.size(1) == 2 && kv_layer.stride(4) == 1,
              "paged_prefill_attention: kv_layer must be [N, 2, block_size, Hkv, D], "
              "D contiguous");
  TORCH_CHECK(kv_layer.size(4) == q.size(2),
              "paged_prefill_attention: head_dim of q and kv_layer differ");
  TORCH_CHECK(q.size(1) % kv_layer.size(3) == 0,
              "paged_prefill_attention: Hq must be a multiple of Hkv");
  TORCH_CHECK(q.scalar_type() == kv_layer.scalar_type(),
              "paged_prefill_attention: q must have the cache's dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
              block_tables.dim() == 2 && block_tables.stride(1) == 1 && seq_lens.dim() == 1 &&
              seq_lens.is_contiguous() && block_tables.size(0) == seq_lens.size(0) &&
              query_start_loc.size(0) == seq_lens.size(0) + 1,
              "paged_prefill_attention: block_tables [S, max_blocks] and seq_lens [S] must be "
              "int32, with query_start_loc [S + 1]");
  const int32_t* starts = query_starts(op, query_start_loc, q.size(0));
  const int64_t num_seqs = seq_lens.size(0), block_size = kv_layer.size(2);
  const int64_t capacity = block_tables.size(1) * block_size;
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  std::vector<int64_t> contexts(num_seqs);
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = starts[s + 1] - starts[s];
    TORCH_CHECK(lens[s] >= q_len && lens[s] <= capacity, "paged_prefill_attention: seq_lens[",
                s, "] = ", lens[s], " outside ", q_len, "..", capacity);
    contexts[s] = lens[s] - q_len;
    for (int64_t b = 0; b * block_size < lens[s]; ++b) {
      const int32_t id = tables[s * block_tables.stride(0) + b];
      TORCH_CHECK(id >= 0 && id < kv_layer.size(0), "paged_prefill_attention: block_tables[",
                  s, ", ", b, "] = ", id, " outside 0..", kv_layer.size(0) - 1);
    }
  }
  return run<PagedKeys>(op, q, starts, contexts, kv_layer.size(3), scale, kv_layer,
                        block_tables);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float scale) -> Tensor",
        &prefill_attention);
  m.def("paged_prefill_attention(Tensor q, Tensor kv_layer, Tensor block_tables, "
        "Tensor query_start_loc, Tensor seq_lens, float scale) -> Tensor",
        &paged_prefill_attention);
}
