// RoPE and the KV cache write of one decoder layer, in one pass over the step's tokens.
//
// qkv [T, (Hq + 2 Hkv) D] is the fused projection's output (rows may be strided, D contiguous):
// q heads, then k heads, then v heads. Each q and k head is rotated in place by its token's
// angles (cos, sin [T, D] in qkv's dtype, sin signed: its first half is -sin), and the rotated
// K and the V of token t are written to its cache slot slot_mapping[t] of kv_layer
// [N, 2, block_size, Hkv, D] (block slot / block_size, row slot % block_size; any block
// stride, so a layer-group view works too), rounded to the cache's dtype.
//
// The rotation rounds as engine.model.rope.apply_rope does, `x * cos` rounded to qkv's dtype
// and then the other half's product added in float32 and rounded, so the kernels on and off
// give the same bits in bf16 (HF rounds each of its three ops: within one rounding step).
// torch's path is three elementwise ops over q and k, two casts and two index copies: seven
// passes and dispatches per layer, where this is one.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu_widen.h"

#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

using tandem_cpu::widen;

constexpr int64_t MAX_HEAD_DIM = 512;

// x rounded to C (identity for float32)
template <typename C>
inline float rounded(float x) {
  if constexpr (std::is_same_v<C, float>) {
    return x;
  } else {
    return widen(static_cast<C>(x));
  }
}

// one head of D values rotated in place by the token's cos and signed sin (widened)
template <typename C>
inline void rotate(C* x, const float* cos, const float* sin, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  float in[MAX_HEAD_DIM];
  for (int64_t d = 0; d < head_dim; ++d) in[d] = widen(x[d]);
  for (int64_t d = 0; d < half; ++d) {
    x[d] = static_cast<C>(rounded<C>(in[d] * cos[d]) + in[d + half] * sin[d]);
  }
  for (int64_t d = half; d < head_dim; ++d) {
    x[d] = static_cast<C>(rounded<C>(in[d] * cos[d]) + in[d - half] * sin[d]);
  }
}

template <typename C, typename K>
void rotate_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                  const at::Tensor& kv, const int64_t* slots, int64_t num_heads,
                  int64_t num_kv_heads) {
  const int64_t tokens = qkv.size(0), head_dim = kv.size(4), block_size = kv.size(2);
  const int64_t row_stride = qkv.stride(0), cos_stride = cos.stride(0), sin_stride = sin.stride(0);
  const int64_t block_stride = kv.stride(0), v_stride = kv.stride(1), slot_stride = kv.stride(2),
                head_stride = kv.stride(3);
  C* qkv_data = qkv.data_ptr<C>();
  const C* cos_data = cos.data_ptr<C>();
  const C* sin_data = sin.data_ptr<C>();
  K* kv_data = kv.data_ptr<K>();
  at::parallel_for(0, tokens, 32, [&](int64_t begin, int64_t end) {
    std::vector<float> c(head_dim), s(head_dim);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t d = 0; d < head_dim; ++d) c[d] = widen(cos_data[t * cos_stride + d]);
      for (int64_t d = 0; d < head_dim; ++d) s[d] = widen(sin_data[t * sin_stride + d]);
      C* row = qkv_data + t * row_stride;
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
        rotate<C>(row + h * head_dim, c.data(), s.data(), head_dim);
      }
      const int64_t slot = slots[t];
      K* key = kv_data + (slot / block_size) * block_stride + (slot % block_size) * slot_stride;
      const C* k_src = row + num_heads * head_dim;
      const C* v_src = k_src + num_kv_heads * head_dim;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        K* k_dst = key + h * head_stride;
        K* v_dst = k_dst + v_stride;
        for (int64_t d = 0; d < head_dim; ++d) k_dst[d] = static_cast<K>(widen(k_src[h * head_dim + d]));
        for (int64_t d = 0; d < head_dim; ++d) v_dst[d] = static_cast<K>(widen(v_src[h * head_dim + d]));
      }
    }
  });
}

void rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                const at::Tensor& kv_layer, const at::Tensor& slot_mapping, int64_t num_heads,
                int64_t num_kv_heads) {
  for (const at::Tensor* t : {&qkv, &cos, &sin, &kv_layer, &slot_mapping}) {
    TORCH_CHECK(t->device().is_cpu(), "rope_store: CPU tensors only");
  }
  TORCH_CHECK(kv_layer.dim() == 5 && kv_layer.size(1) == 2 && kv_layer.stride(4) == 1,
              "rope_store: kv_layer must be [N, 2, block_size, Hkv, D] with D contiguous, got ",
              kv_layer.sizes());
  const int64_t head_dim = kv_layer.size(4), tokens = slot_mapping.size(0);
  TORCH_CHECK(num_kv_heads == kv_layer.size(3), "rope_store: num_kv_heads ", num_kv_heads,
              " but kv_layer has ", kv_layer.size(3));
  TORCH_CHECK(num_heads > 0 && num_heads % num_kv_heads == 0, "rope_store: num_heads ",
              num_heads, " is not a positive multiple of num_kv_heads ", num_kv_heads);
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= MAX_HEAD_DIM, "rope_store: head_dim ", head_dim,
              " must be even and at most ", MAX_HEAD_DIM);
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.is_contiguous(),
              "rope_store: slot_mapping must be contiguous 1-D int64");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(0) == tokens &&
                  qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim && qkv.stride(1) == 1,
              "rope_store: qkv must be [T, (Hq + 2 Hkv) D] = [", tokens, ", ",
              (num_heads + 2 * num_kv_heads) * head_dim, "] with its last dim contiguous, got ",
              qkv.sizes(), " strides ", qkv.strides());
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == tokens && t->size(1) == head_dim &&
                    t->stride(1) == 1,
                "rope_store: cos and sin must be [T, D] = [", tokens, ", ", head_dim,
                "] with D contiguous, got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == qkv.scalar_type(), "rope_store: cos/sin dtype ",
                t->scalar_type(), " differs from qkv's ", qkv.scalar_type());
  }
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t num_slots = kv_layer.size(0) * kv_layer.size(2);
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "rope_store: slot_mapping[", t, "] = ",
                slots[t], " is outside the layer's ", num_slots, " slots");
  }
  const auto compute = qkv.scalar_type(), cache = kv_layer.scalar_type();
  if (compute == at::kFloat && cache == at::kFloat) {
    rotate_store<float, float>(qkv, cos, sin, kv_layer, slots, num_heads, num_kv_heads);
  } else if (compute == at::kBFloat16 && cache == at::kBFloat16) {
    rotate_store<c10::BFloat16, c10::BFloat16>(qkv, cos, sin, kv_layer, slots, num_heads,
                                               num_kv_heads);
  } else if (compute == at::kHalf && cache == at::kHalf) {
    rotate_store<c10::Half, c10::Half>(qkv, cos, sin, kv_layer, slots, num_heads, num_kv_heads);
  } else if (compute == at::kFloat && cache == at::kBFloat16) {
    rotate_store<float, c10::BFloat16>(qkv, cos, sin, kv_layer, slots, num_heads, num_kv_heads);
  } else if (compute == at::kFloat && cache == at::kHalf) {
    rotate_store<float, c10::Half>(qkv, cos, sin, kv_layer, slots, num_heads, num_kv_heads);
  } else {
    TORCH_CHECK(false, "rope_store: qkv dtype ", compute, " over a ", cache,
                " cache is not supported (equal dtypes, or float32 over bfloat16/float16)");
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("rope_store(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor(b!) kv_layer, "
        "Tensor slot_mapping, int num_heads, int num_kv_heads) -> ()",
        &rope_store);
}
