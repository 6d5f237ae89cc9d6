#pragma once
// CPU building blocks for rows of FP8 data: element access for the float input types, and the vectorizable
// amax / quantize / dequantize loops shared by the quantization ops and the FP8 KV cache.

#include <cstdint>
#include <type_traits>

#include "dsv3/check.h"
#include "dsv3/dtype.h"
#include "dsv3/fp8.h"
#include "dsv3/half_types.h"

namespace dsv3::cpu {

template <DType kType>
struct Element;
template <>
struct Element<DType::kFloat32> {
  using Storage = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};
template <>
struct Element<DType::kBFloat16> {
  using Storage = uint16_t;
  static float load(uint16_t v) { return bf16_to_float(v); }
  static uint16_t store(float v) { return float_to_bf16(v); }
};
template <>
struct Element<DType::kFloat16> {
  using Storage = uint16_t;
  static float load(uint16_t v) { return fp16_to_float(v); }
  static uint16_t store(float v) { return float_to_fp16(v); }
};

// Calls fn.template operator()<kType>() for the runtime dtype.
template <typename Fn>
void dispatch_float_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      return fn(std::integral_constant<DType, DType::kFloat32>{});
    case DType::kBFloat16:
      return fn(std::integral_constant<DType, DType::kBFloat16>{});
    case DType::kFloat16:
      return fn(std::integral_constant<DType, DType::kFloat16>{});
    default:
      throw_invalid_argument("unsupported dtype ", dtype_name(dtype));
  }
}

// NaN-propagating amax of n values. Magnitudes are compared as integers: for sign-cleared IEEE floats the unsigned
// bit patterns order like the values, and every NaN pattern sorts above inf, so a plain (vectorizable) unsigned max
// returns NaN whenever the group holds one.
template <DType kType>
float group_amax(const typename Element<kType>::Storage* x, int64_t n) {
  uint32_t amax_bits = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t magnitude = float_bits(Element<kType>::load(x[i])) & 0x7FFFFFFFu;
    amax_bits = magnitude > amax_bits ? magnitude : amax_bits;
  }
  return bits_to_float(amax_bits);
}

template <DType kType>
void quantize_row(const typename Element<kType>::Storage* x, uint8_t* q, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) q[i] = float_to_e4m3(scale_and_clamp(Element<kType>::load(x[i]), scale));
}

template <DType kType>
void dequantize_row(const uint8_t* q, typename Element<kType>::Storage* out, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) out[i] = Element<kType>::store(e4m3_to_float(q[i]) * scale);
}

}  // namespace dsv3::cpu
