// FP8 quantization on the CPU: bit-exact with dsv3.reference.quant (same fp32 operations in the same order; the
// build disables FMA contraction).

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/cpu_ops.h"
#include "dsv3/fp8.h"
#include "dsv3/half_types.h"

namespace dsv3::cpu {
namespace {

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

template <DType kType>
void quantize_token_groups(const TokenGroupQuantParams& p) {
  const auto* x = static_cast<const typename Element<kType>::Storage*>(p.x);
  const int64_t groups_per_row = p.k / p.group_size;
  const int64_t total_groups = p.rows * groups_per_row;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < total_groups; ++g) {
    const int64_t offset = g * p.group_size;  // groups tile each row exactly, so group g starts at g * group_size
    const float scale = scale_from_amax(group_amax<kType>(x + offset, p.group_size), p.ue8m0);
    quantize_row<kType>(x + offset, p.q + offset, p.group_size, scale);
    p.scales[g] = scale;
  }
}

template <DType kType>
void quantize_blocks(const BlockQuantParams& p) {
  const auto* w = static_cast<const typename Element<kType>::Storage*>(p.w);
  const int64_t block_rows = (p.n + p.block - 1) / p.block;
  const int64_t block_cols = (p.k + p.block - 1) / p.block;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < block_rows * block_cols; ++b) {
    const int64_t row0 = (b / block_cols) * p.block, row1 = std::min(p.n, row0 + p.block);
    const int64_t col0 = (b % block_cols) * p.block, col1 = std::min(p.k, col0 + p.block);
    float amax = 0.0f;
    for (int64_t r = row0; r < row1; ++r) amax = nan_max(amax, group_amax<kType>(w + r * p.k + col0, col1 - col0));
    const float scale = scale_from_amax(amax, false);
    for (int64_t r = row0; r < row1; ++r)
      quantize_row<kType>(w + r * p.k + col0, p.q + r * p.k + col0, col1 - col0, scale);
    p.scale_inv[b] = scale;
  }
}

template <DType kType>
void dequantize_blocks(const BlockDequantParams& p) {
  auto* out = static_cast<typename Element<kType>::Storage*>(p.out);
  const int64_t block_cols = (p.k + p.block - 1) / p.block;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < p.n; ++r) {
    const float* row_scales = p.scale_inv + (r / p.block) * block_cols;
    for (int64_t b = 0; b < block_cols; ++b) {
      const int64_t col0 = b * p.block, cols = std::min(p.block, p.k - col0);
      dequantize_row<kType>(p.q + r * p.k + col0, out + r * p.k + col0, cols, row_scales[b]);
    }
  }
}

}  // namespace

void per_token_group_quant_fp8(const TokenGroupQuantParams& params) {
  validate(params);
  dispatch_float_type(params.x_dtype, [&](auto type) { quantize_token_groups<decltype(type)::value>(params); });
}

void per_block_quant_fp8(const BlockQuantParams& params) {
  validate(params);
  dispatch_float_type(params.w_dtype, [&](auto type) { quantize_blocks<decltype(type)::value>(params); });
}

void dequant_fp8_block(const BlockDequantParams& params) {
  validate(params);
  dispatch_float_type(params.out_dtype, [&](auto type) { dequantize_blocks<decltype(type)::value>(params); });
}

}  // namespace dsv3::cpu
