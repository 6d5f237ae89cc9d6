// FP8 quantization on the CPU: bit-exact with dsv3.reference.quant (same fp32 operations in the same order; the
// build disables FMA contraction).

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/cpu_ops.h"
#include "cpu/fp8_rows.h"

namespace dsv3::cpu {
namespace {

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
