#pragma once
// FP8 e4m3 numerics shared by the CPU and CUDA kernels: one definition of the scale rule and the rounding, so both
// backends reproduce dsv3.reference.quant bit for bit.
//
// e4m3 ("fn" variant): 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; 0x7F/0xFF are NaN; the largest
// finite magnitude is 448 (0x7E); subnormals are multiples of 2^-9 below 2^-6.

#include <cstdint>
#include <cstring>

#include "dsv3/macros.h"

#if defined(__CUDACC__)
#include <cuda_fp8.h>
#endif

namespace dsv3 {

constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;

DSV3_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

DSV3_HOST_DEVICE float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// max that propagates NaN from either side (fmaxf would drop it, and a NaN in a group must reach its scale).
DSV3_HOST_DEVICE float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// Smallest power of two >= scale for positive finite normal scales; NaN and inf pass through.
DSV3_HOST_DEVICE float round_scale_ue8m0(float scale) {
  const uint32_t u = float_bits(scale);
  const uint32_t exponent = (u >> 23) & 0xFFu;
  if (exponent == 0xFFu) return scale;
  const uint32_t mantissa = u & 0x7FFFFFu;
  return bits_to_float((exponent + (mantissa != 0 ? 1u : 0u)) << 23);
}

// Group scale from the group's amax: max(amax, 1e-4) / 448, optionally rounded up to a power of two. A NaN amax
// stays NaN (comparison-based max, not fmaxf).
DSV3_HOST_DEVICE float scale_from_amax(float amax, bool ue8m0) {
  const float floored = amax < kAmaxFloor ? kAmaxFloor : amax;
  const float scale = floored / kFp8Max;
  return ue8m0 ? round_scale_ue8m0(scale) : scale;
}

// x / scale clamped to the e4m3 range; NaN stays NaN (comparisons, not fminf/fmaxf).
DSV3_HOST_DEVICE float scale_and_clamp(float x, float scale) {
  const float v = x / scale;
  return v > kFp8Max ? kFp8Max : (v < -kFp8Max ? -kFp8Max : v);
}

// Round-to-nearest-even encoding of an fp32 value to e4m3, saturating finite overflow to +-448 and mapping NaN to
// 0x7F (with the sign). Bit-exact with the hardware cvt.rn.satfinite.e4m3 used on the GPU.
DSV3_HOST_DEVICE uint8_t float_to_e4m3(float x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
#else
  // Branch-free: all candidates are computed and picked with bit masks, so loops over this vectorize.
  const uint32_t u = float_bits(x);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t magnitude = u & 0x7FFFFFFFu;
  // Normal range: rebias the exponent (127 -> 7) and round the 20 dropped mantissa bits to nearest-even.
  const uint32_t normal =
      (magnitude + (static_cast<uint32_t>(7 - 127) << 23) + 0x7FFFFu + ((magnitude >> 20) & 1u)) >> 20;
  // Below 2^-6: one fp32 ulp of 16384 + |x| is 2^-9, the e4m3 subnormal step, so the addition rounds |x| to the
  // nearest step (ties to even) and the step count is the encoding; 8 steps encode 2^-6 itself. 0x46800000 = 16384.
  const uint32_t subnormal = float_bits(bits_to_float(magnitude) + 16384.0f) - 0x46800000u;
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(magnitude < 0x3C800000u);
  const uint32_t is_saturated = 0u - static_cast<uint32_t>(magnitude >= 0x43E80000u);  // >= 464, inf: past 448's
  const uint32_t is_nan = 0u - static_cast<uint32_t>(magnitude > 0x7F800000u);
  uint32_t result = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  result = (0x7Eu & is_saturated) | (result & ~is_saturated);
  result = (0x7Fu & is_nan) | (result & ~is_nan);
  return static_cast<uint8_t>(sign | result);
#endif
}

// Exact e4m3 -> fp32, branch-free like float_to_e4m3.
DSV3_HOST_DEVICE float e4m3_to_float(uint8_t bits) {
  const uint32_t b = bits;
  const uint32_t sign = (b & 0x80u) << 24;
  const uint32_t exponent = (b >> 3) & 0xFu;
  const uint32_t mantissa = b & 0x7u;
  const uint32_t normal = sign | ((exponent + 127u - 7u) << 23) | (mantissa << 20);
  const uint32_t subnormal = sign | float_bits(static_cast<float>(mantissa) * 0.001953125f);  // mantissa * 2^-9
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(exponent == 0);
  const uint32_t is_nan = 0u - static_cast<uint32_t>((b & 0x7Fu) == 0x7Fu);
  uint32_t result = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  result = ((sign | 0x7FC00000u) & is_nan) | (result & ~is_nan);
  return bits_to_float(result);
}

}  // namespace dsv3
