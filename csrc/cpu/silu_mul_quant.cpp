// SiLU-and-mul fused with the per-token FP8 quantization on the CPU: each row's gate and up halves are read once and
// its codes and scales written, instead of an fp32 SiLU, a product, a bf16 copy and a separate quantization pass.

#include "cpu/silu_mul_quant.h"

#include <cmath>
#include <cstdint>

#include "cpu/cpu_ops.h"
#include "cpu/fp8_rows.h"
#include "dsv3/fp8.h"
#include "dsv3/half_types.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define DSV3_SILU_AVX512 1
#include <immintrin.h>

#include "cpu/simd_avx512.h"
#endif

namespace dsv3::cpu {
namespace {

constexpr int64_t kGroup = kSiluMulQuantGroup;
// Below this many outputs (~80 us of work for one core) the pass runs on the calling thread: waking the team costs
// tens of microseconds.
constexpr int64_t kParallelElements = int64_t{1} << 16;

#if defined(DSV3_SILU_AVX512)
// 16 values of bf16(silu(gate) * up), silu(g) = g / (1 + exp(-g)), from bf16 inputs.
__m256i silu_mul16(const uint16_t* gate, const uint16_t* up) {
  const __m512 g = avx512::load_bf16(gate), u = avx512::load_bf16(up);
  const __m512 e = avx512::exp(_mm512_sub_ps(_mm512_setzero_ps(), g));
  const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  return (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, u));  // round to nearest even, NaN stays NaN
}
#endif

}  // namespace

void silu_mul_quant_row(const uint16_t* row, int64_t inter, uint8_t* q, float* scales) {
  alignas(64) uint16_t values[kGroup];
  for (int64_t g0 = 0; g0 < inter; g0 += kGroup) {
    const uint16_t* gate = row + g0;
    const uint16_t* up = row + inter + g0;
#if defined(DSV3_SILU_AVX512)
    for (int64_t i = 0; i < kGroup; i += 16) _mm256_store_si256((__m256i*)(values + i), silu_mul16(gate + i, up + i));
#else
    for (int64_t i = 0; i < kGroup; ++i) {
      const float g = bf16_to_float(gate[i]);
      values[i] = float_to_bf16(g / (1.0f + std::exp(-g)) * bf16_to_float(up[i]));
    }
#endif
    const float scale = scale_from_amax(group_amax<DType::kBFloat16>(values, kGroup), false);
    quantize_row<DType::kBFloat16>(values, q + g0, kGroup, scale);
    scales[g0 / kGroup] = scale;
  }
}

void silu_and_mul_quant_fp8(const SiluMulQuantParams& p) {
  validate(p);
#pragma omp parallel for schedule(static) if (p.rows * p.inter >= kParallelElements)
  for (int64_t r = 0; r < p.rows; ++r) {
    silu_mul_quant_row(p.h + r * 2 * p.inter, p.inter, p.q + r * p.inter, p.scales + r * (p.inter / kGroup));
  }
}

}  // namespace dsv3::cpu
