// Decode attention for the CPU engine, straight from the paged KV cache.
//
// One query token per sequence: q [S, Hq, D] attends over the first seq_lens[s] positions of
// sequence s, whose K/V live in the blocks block_tables[s, :] of one layer's cache
// kv_layer [N, 2, block_size, Hkv, D] (any strides, D contiguous). The Hq / Hkv query heads
// of a KV head are computed together, so each K and V row is read from memory once.
// Work items are (sequence, KV head) pairs spread over ATen's intra-op threads; scores,
// softmax and the weighted sum are in float32, the output in q's dtype. This is the kernel
// torch's SDPA lacks for decode: its flash path pays per-(sequence, head) tiling for a single
// query row, and needs the K/V gathered into a dense tensor first.
//
// A batch's K/V (26 MB a layer at SmolLM2-135M's shape, batch 128, 136 tokens, float32) come
// from memory in scattered blocks, which the hardware prefetcher follows poorly: each thread
// prefetches the next item's rows, one row per row it reads of its own, so the next sequence's
// loads overlap this one's arithmetic (there: 1.9 -> 1.3 ms a layer, medians of an interleaved
// A/B; bf16 1.3 -> 0.8; the same K/V already in cache take 0.5 ms).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu_widen.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using tandem_cpu::widen;

constexpr int64_t CACHE_LINE = 64;

// Asks for rows x row_bytes bytes at `first` (rows row_stride_bytes apart) to be brought
// towards the core; returns at once.
inline void prefetch_rows(const void* first, int64_t rows, int64_t row_bytes,
                          int64_t row_stride_bytes) {
  const char* row = static_cast<const char*>(first);
  for (int64_t r = 0; r < rows; ++r, row += row_stride_bytes) {
    for (int64_t b = 0; b < row_bytes; b += CACHE_LINE) __builtin_prefetch(row + b, 0, 2);
  }
}

// HEAD_DIM: the head size as a compile-time constant (0: read at run time), so that the loops
// over it compile to a few straight vector instructions for the common sizes.
template <typename QT, typename CT, int64_t HEAD_DIM>
void decode(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables,
            const at::Tensor& lens, double scale, at::Tensor& out) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1);
  const int64_t head_dim = HEAD_DIM > 0 ? HEAD_DIM : q.size(2);
  const int64_t block_size = kv.size(2), num_kv_heads = kv.size(3);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t block_stride = kv.stride(0), v_stride = kv.stride(1);
  const int64_t row_stride = kv.stride(2), head_stride = kv.stride(3);
  const int64_t q_seq_stride = q.stride(0), q_head_stride = q.stride(1);
  const int64_t table_stride = tables.stride(0);
  const QT* q_data = q.data_ptr<QT>();
  const CT* kv_data = kv.data_ptr<CT>();
  const int32_t* table_data = tables.data_ptr<int32_t>();
  const int32_t* len_data = lens.data_ptr<int32_t>();
  QT* out_data = out.data_ptr<QT>();
  const float scale_f = static_cast<float>(scale);

  // A work item is a sequence and a range of its KV heads: all of them (each K/V row of a
  // block is then read whole, in address order) unless there are too few sequences to keep
  // the threads busy, then one head per item.
  const int64_t parts = num_seqs >= 2 * at::get_num_threads() ? 1 : num_kv_heads;
  const int64_t heads_per_part = num_kv_heads / parts;
  at::parallel_for(0, num_seqs * parts, 1, [&](int64_t begin, int64_t end) {
    const int64_t item_heads = heads_per_part * group;  // query heads of one item
    std::vector<float> queries(item_heads * head_dim), acc(item_heads * head_dim);
    std::vector<float> scores, inv_sum(item_heads);
    // The next item's K rows of block b (V: v_stride further), or nullptr past its end or
    // the thread's range: prefetched row by row as this item reads its own, so that the
    // loads of the next sequence's scattered blocks overlap this one's arithmetic.
    const int64_t row_bytes = heads_per_part * head_stride * static_cast<int64_t>(sizeof(CT));
    const int64_t row_stride_bytes = row_stride * static_cast<int64_t>(sizeof(CT));
    auto next_block = [&](int64_t item, int64_t b, int64_t* rows) -> const CT* {
      if (item + 1 >= end) return nullptr;
      const int64_t next_seq = (item + 1) / parts, head0 = ((item + 1) % parts) * heads_per_part;
      *rows = std::min(block_size, len_data[next_seq] - b * block_size);
      if (*rows <= 0) return nullptr;
      return kv_data + table_data[next_seq * table_stride + b] * block_stride + head0 * head_stride;
    };
    // prefetches the next item's blocks from `from_block` on (those this item has no block
    // for, as it is shorter), K or V (offset 0 or v_stride)
    auto prefetch_rest = [&](int64_t item, int64_t from_block, int64_t offset) {
      int64_t rows = 0;
      for (int64_t b = from_block;; ++b) {
        const CT* block = next_block(item, b, &rows);
        if (block == nullptr) return;
        prefetch_rows(block + offset, rows, row_bytes, row_stride_bytes);
      }
    };
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / parts, first_head = (item % parts) * heads_per_part;
      const int64_t len = len_data[seq];
      const int64_t blocks = (len + block_size - 1) / block_size;
      const int32_t* table = table_data + seq * table_stride;
      scores.resize(std::max<int64_t>(item_heads * len, 1));
      for (int64_t qh = 0; qh < item_heads; ++qh) {
        const QT* src = q_data + seq * q_seq_stride + (first_head * group + qh) * q_head_stride;
        float* dst = queries.data() + qh * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = widen(src[d]) * scale_f;
      }
      // scores[qh, pos] = q_qh . k_pos: blocks outside, rows inside (no division per row),
      // each K row read once for the query heads that share it (upcast in registers)
      for (int64_t first = 0; first < len; first += block_size) {
        int64_t next_rows = 0;
        const CT* next_k = next_block(item, first / block_size, &next_rows);
        const CT* k_block = kv_data + table[first / block_size] * block_stride +
                            first_head * head_stride;
        const int64_t rows = std::min(block_size, len - first);
        for (int64_t r = 0; r < rows; ++r) {
          if (r < next_rows) prefetch_rows(next_k + r * row_stride, 1, row_bytes, 0);
          for (int64_t h = 0; h < heads_per_part; ++h) {
            const CT* k_row = k_block + r * row_stride + h * head_stride;
            for (int64_t g = 0; g < group; ++g) {
              const float* query = queries.data() + (h * group + g) * head_dim;
              float dot = 0.f;
#pragma omp simd reduction(+ : dot)
              for (int64_t d = 0; d < head_dim; ++d) dot += query[d] * widen(k_row[d]);
              scores[(h * group + g) * len + first + r] = dot;
            }
          }
        }
      }
      prefetch_rest(item, blocks, 0);
      for (int64_t qh = 0; qh < item_heads; ++qh) {
        float* s = scores.data() + qh * len;
        float top = std::numeric_limits<float>::lowest();
        for (int64_t pos = 0; pos < len; ++pos) top = std::max(top, s[pos]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t pos = 0; pos < len; ++pos) {
          s[pos] = std::exp(s[pos] - top);
          sum += s[pos];
        }
        inv_sum[qh] = len > 0 ? 1.f / sum : 0.f;
      }
      // out[qh] = sum_pos p[qh, pos] * v_pos, each V row read once
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t first = 0; first < len; first += block_size) {
        int64_t next_rows = 0;
        const CT* next_v = next_block(item, first / block_size, &next_rows);
        const CT* v_block = kv_data + table[first / block_size] * block_stride + v_stride +
                            first_head * head_stride;
        const int64_t rows = std::min(block_size, len - first);
        for (int64_t r = 0; r < rows; ++r) {
          if (r < next_rows) prefetch_rows(next_v + v_stride + r * row_stride, 1, row_bytes, 0);
          for (int64_t h = 0; h < heads_per_part; ++h) {
            const CT* v_row = v_block + r * row_stride + h * head_stride;
            for (int64_t g = 0; g < group; ++g) {
              const float p = scores[(h * group + g) * len + first + r];
              float* a = acc.data() + (h * group + g) * head_dim;
#pragma omp simd
              for (int64_t d = 0; d < head_dim; ++d) a[d] += p * widen(v_row[d]);
            }
          }
        }
      }
      prefetch_rest(item, blocks, v_stride);
      for (int64_t qh = 0; qh < item_heads; ++qh) {
        QT* dst = out_data + (seq * num_heads + first_head * group + qh) * head_dim;
        const float* a = acc.data() + qh * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<QT>(a[d] * inv_sum[qh]);
      }
    }
  });
}

template <typename QT, typename CT>
void decode_for_head_dim(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables,
                         const at::Tensor& lens, double scale, at::Tensor& out) {
  switch (q.size(2)) {
    case 64: return decode<QT, CT, 64>(q, kv, tables, lens, scale, out);
    case 128: return decode<QT, CT, 128>(q, kv, tables, lens, scale, out);
    default: return decode<QT, CT, 0>(q, kv, tables, lens, scale, out);
  }
}

template <typename QT>
void decode_for_cache(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables,
                      const at::Tensor& lens, double scale, at::Tensor& out) {
  switch (kv.scalar_type()) {
    case at::kFloat: return decode_for_head_dim<QT, float>(q, kv, tables, lens, scale, out);
    case at::kBFloat16:
      return decode_for_head_dim<QT, c10::BFloat16>(q, kv, tables, lens, scale, out);
    case at::kHalf: return decode_for_head_dim<QT, c10::Half>(q, kv, tables, lens, scale, out);
    default: TORCH_CHECK(false, "paged_decode: kv_layer dtype ", kv.scalar_type(),
                         " is not float32, bfloat16 or float16");
  }
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& kv_layer,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.device().is_cpu() && kv_layer.device().is_cpu(), "paged_decode: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "paged_decode: q must be [S, Hq, D], D contiguous");
  TORCH_CHECK(kv_layer.dim() == 5 && kv_layer.size(1) == 2 && kv_layer.stride(4) == 1,
              "paged_decode: kv_layer must be [N, 2, block_size, Hkv, D], D contiguous");
  TORCH_CHECK(kv_layer.size(4) == q.size(2), "paged_decode: head_dim of q and kv_layer differ");
  TORCH_CHECK(q.size(1) % kv_layer.size(3) == 0, "paged_decode: Hq must be a multiple of Hkv");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "paged_decode: block_tables and seq_lens must be int32");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.stride(1) == 1 &&
              block_tables.size(0) == q.size(0) && seq_lens.dim() == 1 &&
              seq_lens.size(0) == q.size(0) && seq_lens.is_contiguous(),
              "paged_decode: block_tables [S, max_blocks] and seq_lens [S] must match q's S");
  TORCH_CHECK(q.scalar_type() == kv_layer.scalar_type() || q.scalar_type() == at::kFloat,
              "paged_decode: q must have the cache's dtype or float32");
  const int64_t capacity = block_tables.size(1) * kv_layer.size(2);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  for (int64_t s = 0; s < seq_lens.size(0); ++s) {
    TORCH_CHECK(lens[s] >= 0 && lens[s] <= capacity, "paged_decode: seq_lens[", s, "] = ",
                lens[s], " outside 0..", capacity);
  }
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  switch (q.scalar_type()) {
    case at::kFloat: decode_for_cache<float>(q, kv_layer, block_tables, seq_lens, scale, out); break;
    case at::kBFloat16:
      decode_for_cache<c10::BFloat16>(q, kv_layer, block_tables, seq_lens, scale, out);
      break;
    case at::kHalf: decode_for_cache<c10::Half>(q, kv_layer, block_tables, seq_lens, scale, out); break;
    default: TORCH_CHECK(false, "paged_decode: q dtype ", q.scalar_type(), " not supported");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(tandem_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor kv_layer, Tensor block_tables, Tensor seq_lens, "
        "float scale) -> Tensor",
        &paged_decode);
}
