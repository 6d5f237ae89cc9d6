#pragma once
// e4m3 codes to bf16 with AVX-512 VBMI (include only where __AVX512VBMI__ is defined); every e4m3 value is exact in
// bf16, NaN codes included. The low and high bytes of each value's bf16 pattern come from two 128-entry byte tables
// indexed by the code's 7 magnitude bits (two vpermb per table, which measured faster here than one vpermt2b), the
// sign bit is or-ed into the high byte, and unpacking the two byte vectors yields the 64 values of a chunk in a
// lane-interleaved order: [0-7, 16-23, 32-39, 48-55] then [8-15, 24-31, 40-47, 56-63]. A dot product whose operands
// are both decoded this way can use that order as it is; decode_in_order spends two more shuffles to restore it.
// E4m3Times256Decoder decodes the weights of a GEMM without tables where it can, to values 2^8 times too large.

#include <immintrin.h>

#include <cstdint>

#include "dsv3/fp8.h"
#include "dsv3/half_types.h"

namespace dsv3::cpu::avx512 {

// Tables of the values times 2^kLog2Scale (exact for every code: a power of two moves only the exponent).
template <int kLog2Scale>
class ScaledE4m3Decoder {
 public:
  ScaledE4m3Decoder() {
    static const Tables tables;
    low0_ = _mm512_load_si512(tables.low);
    low1_ = _mm512_load_si512(tables.low + 64);
    high0_ = _mm512_load_si512(tables.high);
    high1_ = _mm512_load_si512(tables.high + 64);
  }

  // 64 codes -> two vectors of 32 bf16 values, in the lane-interleaved order above.
  void decode(__m512i codes, __m512i& first, __m512i& second) const {
    // vpermb looks up 64 entries by the low 6 bits; codes with bit 6 set take the upper half of each table. (The
    // zero-masking forms with a full mask: GCC 12's unmasked vpermb intrinsic trips -Wmaybe-uninitialized.)
    constexpr __mmask64 kAll = ~__mmask64{0};
    const __mmask64 upper = _mm512_test_epi8_mask(codes, _mm512_set1_epi8(0x40));
    const __m512i low =
        _mm512_mask_permutexvar_epi8(_mm512_maskz_permutexvar_epi8(kAll, codes, low0_), upper, codes, low1_);
    const __m512i high =
        _mm512_mask_permutexvar_epi8(_mm512_maskz_permutexvar_epi8(kAll, codes, high0_), upper, codes, high1_);
    // high | (codes & 0x80): ternary-logic truth table 0xF8 for (A | (B & C)).
    const __m512i signed_high = _mm512_ternarylogic_epi32(high, codes, _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);
    first = _mm512_unpacklo_epi8(low, signed_high);
    second = _mm512_unpackhi_epi8(low, signed_high);
  }

  // 64 codes -> values 0-31 and 32-63, in order.
  void decode_in_order(__m512i codes, __m512i& first, __m512i& second) const {
    __m512i a, b;
    decode(codes, a, b);
    // word i of the result: index < 32 takes word i of a, 32 + i word i of b.
    const __m512i lower = _mm512_set_epi16(47, 46, 45, 44, 43, 42, 41, 40, 15, 14, 13, 12, 11, 10, 9, 8,  //
                                           39, 38, 37, 36, 35, 34, 33, 32, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i upper = _mm512_set_epi16(63, 62, 61, 60, 59, 58, 57, 56, 31, 30, 29, 28, 27, 26, 25, 24,  //
                                           55, 54, 53, 52, 51, 50, 49, 48, 23, 22, 21, 20, 19, 18, 17, 16);
    first = _mm512_permutex2var_epi16(a, lower, b);
    second = _mm512_permutex2var_epi16(a, upper, b);
  }

 private:
  struct Tables {
    alignas(64) uint8_t low[128];
    alignas(64) uint8_t high[128];
    Tables() {
      for (int code = 0; code < 128; ++code) {
        const float scale = static_cast<float>(int64_t{1} << kLog2Scale);
        const uint16_t bits = float_to_bf16(e4m3_to_float(static_cast<uint8_t>(code)) * scale);
        low[code] = static_cast<uint8_t>(bits & 0xFF);
        high[code] = static_cast<uint8_t>(bits >> 8);
      }
    }
  };
  __m512i low0_, low1_, high0_, high1_;
};

using E4m3Decoder = ScaledE4m3Decoder<0>;

// The values times 2^8, in decode()'s order, mostly without table look-ups: for a normal code s.eeee.mmm the bf16
// pattern s.1000eeee.mmm0000 (exponent field 128 + e, against e4m3's bias of 7) is its value times 2^8, and three
// operations per 32 codes build it: unpack with the code as the high byte, shift right arithmetically by 4 (the sign
// then fills bits 15-11, the exponent lands in bits 10-7 and the mantissa in 6-4), keep bits 15 and 10-4 and set bit
// 14. Zero, subnormal and NaN codes do not fit that pattern; a group of codes holding any goes through the tables.
// A group of 128 codes decodes in ~30% less time than through the tables (4.0 against 5.7 reference cycles per 64
// codes here), which matters where a GEMM decodes its whole weight per call; the caller scales the products back by
// kUnscale (exact).
class E4m3Times256Decoder : public ScaledE4m3Decoder<8> {
 public:
  static constexpr float kUnscale = 1.0f / 256;

  // One group of a row: `count` (<= 128) codes -> values at dst (64-byte aligned), zeros up to the next multiple of
  // 64 values.
  void group(const uint8_t* src, int64_t count, uint16_t* dst) const {
    if (count == 128) {
      const __m512i lower = _mm512_loadu_si512(src), upper = _mm512_loadu_si512(src + 64);
      if ((needs_tables(lower) | needs_tables(upper)) == 0) {
        shifted(lower, dst);
        shifted(upper, dst + 64);
        return;
      }
    }
    for (int64_t c = 0; c < count; c += 64) {
      const __m512i codes = c + 64 <= count ? _mm512_loadu_si512(src + c)
                                            : _mm512_maskz_loadu_epi8((__mmask64{1} << (count - c)) - 1, src + c);
      __m512i first, second;
      decode(codes, first, second);
      _mm512_store_si512(dst + c, first);
      _mm512_store_si512(dst + c + 32, second);
    }
  }

 private:
  // Flags magnitudes 0x7F (NaN) and 0-14: zero, the subnormals, and (sharing the one test) the smallest normals.
  static __mmask64 needs_tables(__m512i codes) {
    return _mm512_testn_epi8_mask(_mm512_add_epi8(codes, _mm512_set1_epi8(1)), _mm512_set1_epi8(0x70));
  }
  static void shifted(__m512i codes, uint16_t* dst) {
    const __m512i keep = _mm512_set1_epi16(static_cast<short>(0x87F0)), exponent_msb = _mm512_set1_epi16(0x4000);
    const __m512i first = _mm512_srai_epi16(_mm512_unpacklo_epi8(_mm512_setzero_si512(), codes), 4);
    const __m512i second = _mm512_srai_epi16(_mm512_unpackhi_epi8(_mm512_setzero_si512(), codes), 4);
    // (a & b) | c: ternary-logic truth table 0xEA
    _mm512_store_si512(dst, _mm512_ternarylogic_epi32(first, keep, exponent_msb, 0xEA));
    _mm512_store_si512(dst + 32, _mm512_ternarylogic_epi32(second, keep, exponent_msb, 0xEA));
  }
};

}  // namespace dsv3::cpu::avx512
