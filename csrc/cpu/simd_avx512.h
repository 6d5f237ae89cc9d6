#pragma once
// AVX-512 helpers shared by the CPU kernels (include only where __AVX512F__ is defined). They use the zero-masking
// forms of intrinsics with a full mask where GCC 12's unmasked ones trip -Wmaybe-uninitialized inside its own headers.

#include <immintrin.h>

#include <cstdint>

namespace dsv3::cpu::avx512 {

constexpr __mmask16 kAll = 0xFFFF;
constexpr __mmask8 kAll8 = 0xFF;

// Sum of the 16 lanes.
inline float horizontal_sum(__m512 v) {
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(kAll, v, v, 0x4E));
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(kAll, v, v, 0xB1));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(kAll, v, 0x4E));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(kAll, v, 0xB1));
  return _mm512_cvtss_f32(v);
}

// 16 bf16 values (exact) as fp32.
inline __m512 widen_bf16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, _mm512_maskz_cvtepu16_epi32(kAll, bits), 16));
}

inline __m512 load_bf16(const uint16_t* src) {
  return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
}

// 16 fp32 values rounded to bf16 as float_to_bf16 does (nearest even, NaN made quiet, subnormals kept: unlike
// vcvtneps2bf16, which flushes them).
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i high = _mm512_maskz_srli_epi32(kAll, u, 16);
  const __m512i lsb = _mm512_and_si512(high, _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_maskz_srli_epi32(kAll, _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __m512i quiet = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_maskz_cvtepi32_epi16(kAll, _mm512_mask_mov_epi32(rounded, nan, quiet));
}

// 16 pairs (bf16(even[i]), bf16(odd[i])) as 32-bit lanes, even in the low half: two rows of bf16 values interleaved,
// as tile operands pair consecutive K values.
inline __m512i to_bf16_pairs(__m512 even, __m512 odd) {
  const __m512i low = _mm512_maskz_cvtepu16_epi32(kAll, to_bf16(even));
  const __m512i high = _mm512_maskz_cvtepu16_epi32(kAll, to_bf16(odd));
  return _mm512_or_si512(low, _mm512_maskz_slli_epi32(kAll, high, 16));
}

// 16 fp32 values encoded to e4m3 exactly as dsv3/fp8.h's float_to_e4m3 (the same branch-free candidates and
// selections, one lane each): nearest even, finite overflow saturating to +-448, NaN to 0x7F with its sign.
inline __m128i to_e4m3(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i sign = _mm512_and_si512(_mm512_maskz_srli_epi32(kAll, u, 24), _mm512_set1_epi32(0x80));
  const __m512i magnitude = _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF));
  const __m512i odd = _mm512_and_si512(_mm512_maskz_srli_epi32(kAll, magnitude, 20), _mm512_set1_epi32(1));
  const __m512i rebiased = _mm512_add_epi32(magnitude, _mm512_set1_epi32(static_cast<int>((7u - 127u) << 23)));
  const __m512i normal =
      _mm512_maskz_srli_epi32(kAll, _mm512_add_epi32(_mm512_add_epi32(rebiased, _mm512_set1_epi32(0x7FFFF)), odd), 20);
  const __m512 shifted = _mm512_add_ps(_mm512_castsi512_ps(magnitude), _mm512_set1_ps(16384.0f));
  const __m512i subnormal = _mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_set1_epi32(0x46800000));
  const __mmask16 is_subnormal = _mm512_cmplt_epu32_mask(magnitude, _mm512_set1_epi32(0x3C800000));
  const __mmask16 is_saturated = _mm512_cmpge_epu32_mask(magnitude, _mm512_set1_epi32(0x43E80000));
  const __mmask16 is_nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7F800000));
  __m512i result = _mm512_mask_mov_epi32(normal, is_subnormal, subnormal);
  result = _mm512_mask_mov_epi32(result, is_saturated, _mm512_set1_epi32(0x7E));
  result = _mm512_mask_mov_epi32(result, is_nan, _mm512_set1_epi32(0x7F));
  return _mm512_maskz_cvtepi32_epi8(kAll, _mm512_or_si512(result, sign));
}

// Transposes a 16 x 16 matrix of 32-bit elements held as 16 row vectors: afterwards rows[i] holds column i. Four
// rounds of two-input shuffles: 32-bit and 64-bit interleaves within 128-bit lanes, then two rounds of 128-bit lane
// selection.
inline void transpose_16x16_epi32(__m512i rows[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_maskz_unpacklo_epi32(kAll, rows[i], rows[i + 1]);
    t[i + 1] = _mm512_maskz_unpackhi_epi32(kAll, rows[i], rows[i + 1]);
  }
  // u[4i + j], 128-bit lane l: column 4l + j of rows 4i..4i+3.
  __m512i u[16];
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_maskz_unpacklo_epi64(kAll8, t[i], t[i + 2]);
    u[i + 1] = _mm512_maskz_unpackhi_epi64(kAll8, t[i], t[i + 2]);
    u[i + 2] = _mm512_maskz_unpacklo_epi64(kAll8, t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_maskz_unpackhi_epi64(kAll8, t[i + 1], t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    // even / odd: lanes 0 and 2 / 1 and 3 of u[j], u[4 + j] (low) and of u[8 + j], u[12 + j] (high).
    const __m512i even_low = _mm512_maskz_shuffle_i32x4(kAll, u[j], u[4 + j], 0x88);
    const __m512i odd_low = _mm512_maskz_shuffle_i32x4(kAll, u[j], u[4 + j], 0xDD);
    const __m512i even_high = _mm512_maskz_shuffle_i32x4(kAll, u[8 + j], u[12 + j], 0x88);
    const __m512i odd_high = _mm512_maskz_shuffle_i32x4(kAll, u[8 + j], u[12 + j], 0xDD);
    rows[j] = _mm512_maskz_shuffle_i32x4(kAll, even_low, even_high, 0x88);
    rows[4 + j] = _mm512_maskz_shuffle_i32x4(kAll, odd_low, odd_high, 0x88);
    rows[8 + j] = _mm512_maskz_shuffle_i32x4(kAll, even_low, even_high, 0xDD);
    rows[12 + j] = _mm512_maskz_shuffle_i32x4(kAll, odd_low, odd_high, 0xDD);
  }
}

// exp(x) within 2 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r from its degree-6 Taylor polynomial (truncation error
// below 1.2e-7 relative), then scaled by 2^n with vscalefps, which rounds to 0 below the subnormal range and to inf
// above fp32's. x is clamped to [-104, 89] first, so that n * ln2 below stays exact and -inf gives 0 rather than
// (-inf) - (-inf) = NaN; NaN passes through the clamp (vmaxps / vminps return their second operand on NaN).
inline __m512 exp(__m512 x) {
  x = _mm512_maskz_min_ps(kAll, _mm512_set1_ps(89.0f), _mm512_maskz_max_ps(kAll, _mm512_set1_ps(-104.0f), x));
  const __m512 n = _mm512_maskz_roundscale_ps(kAll, _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2 = 0.693359375 (9 significant bits, so n * it is exact) - 2.12194440e-4
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(kAll, p, n);
}

}  // namespace dsv3::cpu::avx512
