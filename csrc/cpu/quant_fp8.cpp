// FP8 quantization on the CPU: bit-exact with dsv3.reference.quant (same fp32 operations in the same order; the
// build disables FMA contraction).

#include <algorithm>
#include <array>
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

const std::array<float, 256>& e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = e4m3_to_float(static_cast<uint8_t>(i));
    return t;
  }();
  return table;
}

template <DType kType>
void quantize_token_groups(const TokenGroupQuantParams& p) {
  using E = Element<kType>;
  const auto* x = static_cast<const typename E::Storage*>(p.x);
  const int64_t groups_per_row = p.k / p.group_size;
  const int64_t total_groups = p.rows * groups_per_row;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < total_groups; ++g) {
    const int64_t offset = g * p.group_size;  // groups tile each row exactly, so group g starts at g * group_size
    float amax = 0.0f;
    for (int64_t i = 0; i < p.group_size; ++i) amax = nan_max(amax, std::fabs(E::load(x[offset + i])));
    const float scale = scale_from_amax(amax, p.ue8m0);
    for (int64_t i = 0; i < p.group_size; ++i)
      p.q[offset + i] = float_to_e4m3(scale_and_clamp(E::load(x[offset + i]), scale));
    p.scales[g] = scale;
  }
}

template <DType kType>
void quantize_blocks(const BlockQuantParams& p) {
  using E = Element<kType>;
  const auto* w = static_cast<const typename E::Storage*>(p.w);
  const int64_t block_rows = (p.n + p.block - 1) / p.block;
  const int64_t block_cols = (p.k + p.block - 1) / p.block;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < block_rows * block_cols; ++b) {
    const int64_t row0 = (b / block_cols) * p.block, row1 = std::min(p.n, row0 + p.block);
    const int64_t col0 = (b % block_cols) * p.block, col1 = std::min(p.k, col0 + p.block);
    float amax = 0.0f;
    for (int64_t r = row0; r < row1; ++r)
      for (int64_t c = col0; c < col1; ++c) amax = nan_max(amax, std::fabs(E::load(w[r * p.k + c])));
    const float scale = scale_from_amax(amax, false);
    for (int64_t r = row0; r < row1; ++r)
      for (int64_t c = col0; c < col1; ++c)
        p.q[r * p.k + c] = float_to_e4m3(scale_and_clamp(E::load(w[r * p.k + c]), scale));
    p.scale_inv[b] = scale;
  }
}

template <DType kType>
void dequantize_blocks(const BlockDequantParams& p) {
  using E = Element<kType>;
  auto* out = static_cast<typename E::Storage*>(p.out);
  const auto& table = e4m3_table();
  const int64_t block_cols = (p.k + p.block - 1) / p.block;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < p.n; ++r) {
    const float* row_scales = p.scale_inv + (r / p.block) * block_cols;
    for (int64_t c = 0; c < p.k; ++c) out[r * p.k + c] = E::store(table[p.q[r * p.k + c]] * row_scales[c / p.block]);
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
