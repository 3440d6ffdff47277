// Causal attention of fresh prompts for the CPU engine (prefill with no cached prefix).
//
// q [T, Hq, D], k and v [T, Hkv, D] (any token and head strides, D contiguous, one dtype):
// sequence s owns rows cu_seqlens[s] .. cu_seqlens[s + 1] and its query at position p attends
// over its keys 0..p. Returns [T, Hq, D] in q's dtype.
//
// Flash-attention order: a work item is a tile of TILE_ROWS query positions of one sequence for
// all the query heads of one KV head (GQA: the K/V tile is read and widened once for the G
// heads); keys go by in blocks of 16 up to the tile's last position, with an online softmax in
// float32, so no [L, L] score matrix is ever built and blocks above the diagonal are never
// computed. Scores and the weighted sum are float32 register tiles (GCC vector extensions: one
// 512-bit register per 16 keys or 16 head dims on AVX-512, two 256-bit ones on AVX2).
// torch's CPU flash SDPA has no causal block skipping below 512 keys and runs a [G*R, L]
// masked tile per call: ~65 GFLOP/s at SmolLM2-135M's prefill shape on 2 cores.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu_widen.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace {

using tandem_cpu::widen;

typedef float v16f __attribute__((vector_size(64)));  // 16 float32 lanes

constexpr int64_t KEYS = 16;        // keys per block: the lanes of one score vector
constexpr int64_t TILE_ROWS = 32;   // query positions per work item (times G heads)
constexpr float MASKED = -1e30f;    // a masked score (finite: -ffast-math assumes no infinities)

struct Item {
  int64_t seq, kv_head, first_row, rows, cost;
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

// The work of one thread: tiles, each over its own keys. CHUNKS = D / 16. In a tile, score rows
// go 16 to a lane group (one head, 16 consecutive positions; each head's rows padded to a
// multiple of 16), so scores, the running max and sum and the mask are all lane-wise and the
// softmax needs no reduction across lanes.
template <typename T, int64_t CHUNKS>
void run_items(const std::vector<Item>& items, const at::Tensor& q, const at::Tensor& k,
               const at::Tensor& v, const int32_t* starts, float scale, at::Tensor& out) {
  constexpr int64_t D = CHUNKS * 16;
  const int64_t num_heads = q.size(1), group = num_heads / k.size(1);
  const int64_t q_tok = q.stride(0), q_head = q.stride(1);
  const int64_t k_tok = k.stride(0), k_head = k.stride(1);
  const int64_t v_tok = v.stride(0), v_head = v.stride(1);
  const T* q_data = q.data_ptr<T>();
  const T* k_data = k.data_ptr<T>();
  const T* v_data = v.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  const int64_t max_lanes = group * TILE_ROWS / 16;  // lane groups of a full tile
  std::vector<v16f> queries_t(max_lanes * D);      // [lane group][D]: 16 rows' q_d, scaled
  std::vector<float> keys(KEYS * D), values(KEYS * D);  // [16 keys][D], widened
  std::vector<v16f> probs(KEYS);                   // [key]: 16 rows' probabilities
  std::vector<v16f> top(max_lanes), total(max_lanes);
  std::vector<v16f> acc(max_lanes * D);            // [lane group][D]: 16 rows' sums
  for (const Item& it : items) {
    const int64_t base = starts[it.seq], rows = it.rows, first = it.first_row;
    const int64_t lanes_per_head = (rows + 15) / 16, lane_groups = group * lanes_per_head;
    float* qt = reinterpret_cast<float*>(queries_t.data());
    for (int64_t g = 0; g < group; ++g) {
      for (int64_t r = 0; r < lanes_per_head * 16; ++r) {
        float* dst = qt + (g * lanes_per_head + r / 16) * D * 16 + r % 16;
        if (r >= rows) {
          for (int64_t d = 0; d < D; ++d) dst[d * 16] = 0.f;
          continue;
        }
        const T* src = q_data + (base + first + r) * q_tok + (it.kv_head * group + g) * q_head;
        for (int64_t d = 0; d < D; ++d) dst[d * 16] = widen(src[d]) * scale;
      }
    }
    for (int64_t l = 0; l < lane_groups; ++l) {
      top[l] = splat(MASKED);
      total[l] = v16f{};
    }
    for (int64_t i = 0; i < lane_groups * D; ++i) acc[i] = v16f{};
    const int64_t end = first + rows;  // keys 0 .. end - 1 are seen by some row
    for (int64_t key0 = 0; key0 < end; key0 += KEYS) {
      const int64_t nk = std::min(KEYS, end - key0);
      for (int64_t j = 0; j < KEYS; ++j) {
        float* kd = keys.data() + j * D;
        float* vd = values.data() + j * D;
        if (j >= nk) {
          std::fill(kd, kd + D, 0.f);
          std::fill(vd, vd + D, 0.f);
          continue;
        }
        const T* kr = k_data + (base + key0 + j) * k_tok + it.kv_head * k_head;
        const T* vr = v_data + (base + key0 + j) * v_tok + it.kv_head * v_head;
        for (int64_t d = 0; d < D; ++d) kd[d] = widen(kr[d]);
        for (int64_t d = 0; d < D; ++d) vd[d] = widen(vr[d]);
      }
      for (int64_t l = 0; l < lane_groups; ++l) {
        const int64_t row0 = (l % lanes_per_head) * 16;  // the group's first row in the tile
        const int64_t pos0 = first + row0;               // its lanes' positions: pos0 + lane
        if (key0 > pos0 + 15) continue;                  // all 16 rows above the diagonal
        const v16f* ql = queries_t.data() + l * D;
        v16f s[KEYS];
        for (int64_t j0 = 0; j0 < KEYS; j0 += 8) {  // scores: 16 rows x 8 keys at a time
          const float* kj = keys.data() + j0 * D;
          v16f s0{}, s1{}, s2{}, s3{}, s4{}, s5{}, s6{}, s7{};
          for (int64_t d = 0; d < D; ++d) {
            const v16f qd = ql[d];
            s0 += kj[d] * qd;
            s1 += kj[D + d] * qd;
            s2 += kj[2 * D + d] * qd;
            s3 += kj[3 * D + d] * qd;
            s4 += kj[4 * D + d] * qd;
            s5 += kj[5 * D + d] * qd;
            s6 += kj[6 * D + d] * qd;
            s7 += kj[7 * D + d] * qd;
          }
          s[j0] = s0; s[j0 + 1] = s1; s[j0 + 2] = s2; s[j0 + 3] = s3;
          s[j0 + 4] = s4; s[j0 + 5] = s5; s[j0 + 6] = s6; s[j0 + 7] = s7;
        }
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
          probs[j] = vexp(s[j] - new_top);
          sum += probs[j];
        }
        top[l] = new_top;
        total[l] = total[l] * rescale + sum;
        // acc[d] += sum_j v_j[d] * p_j: 16 rows a vector, as the scores
        v16f* a = acc.data() + l * D;
        for (int64_t d = 0; d < D; d += 8) {  // 8 head dims at a time: each p_j loaded once
          v16f x[8];
          for (int64_t e = 0; e < 8; ++e) x[e] = a[d + e] * rescale;
          for (int64_t j = 0; j < KEYS; ++j) {
            const v16f pj = probs[j];
            const float* vj = values.data() + j * D + d;
            for (int64_t e = 0; e < 8; ++e) x[e] += vj[e] * pj;
          }
          for (int64_t e = 0; e < 8; ++e) a[d + e] = x[e];
        }
      }
    }
    for (int64_t l = 0; l < lane_groups; ++l) {
      const int64_t g = l / lanes_per_head, row0 = (l % lanes_per_head) * 16;
      for (int64_t lane = 0; lane < 16 && row0 + lane < rows; ++lane) {
        T* dst = out_data +
                 ((base + first + row0 + lane) * num_heads + it.kv_head * group + g) * D;
        const v16f* a = acc.data() + l * D;
        const float inv = 1.f / total[l][lane];
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(a[d][lane] * inv);
      }
    }
  }
}

// The tiles of every sequence and KV head, dealt to the threads longest first (a tile's cost
// is its rows times the keys they see, so the last tiles of a prompt cost the most).
std::vector<std::vector<Item>> deal(const int32_t* starts, int64_t num_seqs, int64_t num_kv_heads,
                                    int64_t threads) {
  std::vector<Item> items;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t len = starts[s + 1] - starts[s];
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      for (int64_t first = 0; first < len; first += TILE_ROWS) {
        const int64_t rows = std::min(TILE_ROWS, len - first);
        items.push_back({s, h, first, rows, rows * (first + rows)});
      }
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  std::vector<std::vector<Item>> lists(threads);
  std::vector<int64_t> load(threads, 0);
  for (const Item& it : items) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    lists[t].push_back(it);
    load[t] += it.cost;
  }
  return lists;
}

template <typename T>
void run_for_head_dim(const std::vector<std::vector<Item>>& lists, const at::Tensor& q,
                      const at::Tensor& k, const at::Tensor& v, const int32_t* starts, float scale,
                      at::Tensor& out) {
  at::parallel_for(0, static_cast<int64_t>(lists.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      switch (q.size(2) / 16) {
        case 1: run_items<T, 1>(lists[t], q, k, v, starts, scale, out); break;
        case 2: run_items<T, 2>(lists[t], q, k, v, starts, scale, out); break;
        case 3: run_items<T, 3>(lists[t], q, k, v, starts, scale, out); break;
        case 4: run_items<T, 4>(lists[t], q, k, v, starts, scale, out); break;
        case 5: run_items<T, 5>(lists[t], q, k, v, starts, scale, out); break;
        case 6: run_items<T, 6>(lists[t], q, k, v, starts, scale, out); break;
        case 7: run_items<T, 7>(lists[t], q, k, v, starts, scale, out); break;
        case 8: run_items<T, 8>(lists[t], q, k, v, starts, scale, out); break;
        default: TORCH_CHECK(false, "prefill_attention: unsupported head_dim");
      }
    }
  });
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& cu_seqlens, double scale) {
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
  const int64_t head_dim = q.size(2);
  TORCH_CHECK(head_dim % 16 == 0 && head_dim > 0 && head_dim <= 128,
              "prefill_attention: head_dim ", head_dim, " is not a multiple of 16 up to 128");
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 &&
              cu_seqlens.is_contiguous() && cu_seqlens.size(0) >= 1,
              "prefill_attention: cu_seqlens must be int32 [S + 1]");
  const int32_t* starts = cu_seqlens.data_ptr<int32_t>();
  const int64_t num_seqs = cu_seqlens.size(0) - 1;
  TORCH_CHECK(starts[0] == 0 && starts[num_seqs] == q.size(0),
              "prefill_attention: cu_seqlens must run from 0 to T = ", q.size(0));
  for (int64_t s = 0; s < num_seqs; ++s) {
    TORCH_CHECK(starts[s + 1] >= starts[s], "prefill_attention: cu_seqlens must not decrease (at ",
                s, ")");
  }
  at::Tensor out = at::empty({q.size(0), q.size(1), head_dim}, q.options());
  const auto lists = deal(starts, num_seqs, k.size(1), at::get_num_threads());
  const float scale_f = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case at::kFloat: run_for_head_dim<float>(lists, q, k, v, starts, scale_f, out); break;
    case at::kBFloat16: run_for_head_dim<c10::BFloat16>(lists, q, k, v, starts, scale_f, out); break;
    case at::kHalf: run_for_head_dim<c10::Half>(lists, q, k, v, starts, scale_f, out); break;
    default: TORCH_CHECK(false, "prefill_attention: dtype ", q.scalar_type(), " not supported");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float scale) -> Tensor",
        &prefill_attention);
}
