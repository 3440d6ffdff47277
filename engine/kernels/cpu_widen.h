// float32 from the cache and activation dtypes, for the C++ CPU kernels (cpu_ops.py). The
// bfloat16 case is the bit shift itself, so that the compiler vectorizes it in the kernels'
// loops.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace tandem_cpu {

inline float widen(float x) { return x; }
inline float widen(c10::Half x) { return static_cast<float>(x); }
inline float widen(c10::BFloat16 x) {
  uint32_t wide = static_cast<uint32_t>(x.x) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

}  // namespace tandem_cpu
