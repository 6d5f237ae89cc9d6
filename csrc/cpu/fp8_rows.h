#pragma once
// CPU building blocks for rows of FP8 data: element access for the float input types, and the vectorizable
// amax / quantize / dequantize loops shared by the quantization ops and the FP8 KV cache.

#include <cstdint>
#include <type_traits>

#include "dsv3/check.h"
#include "dsv3/dtype.h"
#include "dsv3/fp8.h"
#include "dsv3/half_types.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include "cpu/simd_avx512.h"
#endif

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

#if defined(__AVX512F__) && defined(__AVX512BW__)
// 16 consecutive elements (those in `mask`) as fp32; the others are zeros.
template <DType kType>
__m512 load16(const typename Element<kType>::Storage* x, __mmask16 mask) {
  if constexpr (kType == DType::kFloat32) {
    return _mm512_maskz_loadu_ps(mask, x);
  } else {
    const __m256i raw = _mm256_maskz_loadu_epi16(mask, x);
    if constexpr (kType == DType::kBFloat16) {
      return avx512::widen_bf16(raw);
    } else {
      return _mm512_maskz_cvtph_ps(avx512::kAll, raw);
    }
  }
}
#endif

// q = e4m3(scale_and_clamp(x, scale)) for n elements, 16 lanes at a time where the CPU has AVX-512 (the same fp32
// division, clamp and encoding as the scalar fp8.h functions, so the codes are bit-identical).
template <DType kType>
void quantize_row(const typename Element<kType>::Storage* x, uint8_t* q, int64_t n, float scale) {
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512 divisor = _mm512_set1_ps(scale), high = _mm512_set1_ps(kFp8Max), low = _mm512_set1_ps(-kFp8Max);
  for (; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? avx512::kAll : static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 v = _mm512_div_ps(load16<kType>(x + i, mask), divisor);
    v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, high, _CMP_GT_OQ), high);  // NaN compares false: stays NaN
    v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, low, _CMP_LT_OQ), low);
    _mm_mask_storeu_epi8(q + i, mask, avx512::to_e4m3(v));
  }
#endif
  for (; i < n; ++i) q[i] = float_to_e4m3(scale_and_clamp(Element<kType>::load(x[i]), scale));
}

template <DType kType>
void dequantize_row(const uint8_t* q, typename Element<kType>::Storage* out, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) out[i] = Element<kType>::store(e4m3_to_float(q[i]) * scale);
}

}  // namespace dsv3::cpu
