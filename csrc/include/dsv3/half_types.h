#pragma once
// Host-side bf16 / fp16 <-> fp32 conversions with round-to-nearest-even, matching torch's casts.

#include <cstdint>

#include "dsv3/fp8.h"

namespace dsv3 {

inline float bf16_to_float(uint16_t bits) { return bits_to_float(static_cast<uint32_t>(bits) << 16); }

// Round-to-nearest-even; NaN stays a (quiet) NaN. Branch-free so conversion loops vectorize.
inline uint16_t float_to_bf16(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t is_nan = 0u - static_cast<uint32_t>((u & 0x7FFFFFFFu) > 0x7F800000u);
  return static_cast<uint16_t>((((u >> 16) | 0x40u) & is_nan) | (rounded & ~is_nan));
}

inline float fp16_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1Fu;
  const uint32_t mantissa = bits & 0x3FFu;
  if (exponent == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // mantissa * 2^-24, exact
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 127u - 15u) << 23) | (mantissa << 13));
}

inline uint16_t float_to_fp16(float x) {
  uint32_t u = float_bits(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7FFFFFFFu;
  if (u > 0x7F800000u) return sign | 0x7E00u;   // NaN
  if (u >= 0x477FF000u) return sign | 0x7C00u;  // rounds to >= 65536: inf
  if (u < 0x38800000u) {
    // Below 2^-14: one fp32 ulp of 0.5 + |x| is 2^-24, the fp16 subnormal step (0x3F000000 = 0.5).
    const float shifted = bits_to_float(u) + 0.5f;
    return sign | static_cast<uint16_t>(float_bits(shifted) - 0x3F000000u);
  }
  const uint32_t odd = (u >> 13) & 1u;
  u += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + odd;
  return sign | static_cast<uint16_t>(u >> 13);
}

}  // namespace dsv3
