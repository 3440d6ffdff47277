// RMSNorm for the CPU engine in one pass over each row, as Hugging Face computes it.
//
// x [T, H] (rows may be strided, H contiguous), weight [H] of x's dtype: the mean of squares and
// the scaling in float32. float32 x: x * rstd * weight. bfloat16 / float16 x: the normalized row
// is rounded to x's dtype first, then multiplied by the weight and rounded again (HF's
// `weight * (x.float() * rstd).to(dtype)`, bit for bit but for the order of the row's sum).
// torch's CPU `rms_norm` is a composite of ~9 passes (pow, mean, add, rsqrt, casts, muls) whose
// float32 temporaries of a 4,096-row prompt fall out of cache; here each row is read once and
// written once, rows spread over torch's intra-op threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu_widen.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using tandem_cpu::widen;

template <typename T>
void normalize(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  const int64_t rows = x.size(0), hidden = x.size(1), row_stride = x.stride(0);
  const T* x_data = x.data_ptr<T>();
  const T* w_data = weight.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  const float eps_f = static_cast<float>(eps);
  const float inv_hidden = 1.f / static_cast<float>(hidden);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> w(hidden);
    for (int64_t d = 0; d < hidden; ++d) w[d] = widen(w_data[d]);
    for (int64_t row = begin; row < end; ++row) {
      const T* src = x_data + row * row_stride;
      T* dst = out_data + row * hidden;
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t d = 0; d < hidden; ++d) squares += widen(src[d]) * widen(src[d]);
      const float rstd = 1.f / std::sqrt(squares * inv_hidden + eps_f);
      if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
        for (int64_t d = 0; d < hidden; ++d) dst[d] = src[d] * rstd * w[d];
      } else {
        for (int64_t d = 0; d < hidden; ++d) {
          const T normed = static_cast<T>(widen(src[d]) * rstd);  // rounded, as HF rounds
          dst[d] = static_cast<T>(w[d] * widen(normed));
        }
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x must be [T, H], H contiguous");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "rms_norm: weight must be [H] and contiguous");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight dtype ",
              weight.scalar_type(), " differs from x's ", x.scalar_type());
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  switch (x.scalar_type()) {
    case at::kFloat: normalize<float>(x, weight, eps, out); break;
    case at::kBFloat16: normalize<c10::BFloat16>(x, weight, eps, out); break;
    case at::kHalf: normalize<c10::Half>(x, weight, eps, out); break;
    default: TORCH_CHECK(false, "rms_norm: dtype ", x.scalar_type(), " not supported");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
}
