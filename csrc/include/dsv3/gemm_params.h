#pragma once
// Parameters of the FP8 block-scaled GEMM (out = (a * a_scales) @ (b * b_scales)^T, fp32 accumulation) and the
// invariants every backend relies on. dsv3.ops has checked dtypes, devices, shapes, contiguity and alignment.

#include <cstdint>

#include "dsv3/check.h"
#include "dsv3/dtype.h"

namespace dsv3 {

constexpr int64_t kScaleBlock = 128;  // channels per activation scale, rows/cols per weight scale tile

struct Fp8GemmParams {
  const uint8_t* a;       // [m, k] e4m3, row-major
  const float* a_scales;  // [m, ceil(k / 128)]: per token, per 128 channels
  const uint8_t* b;       // [n, k] e4m3, row-major (the weight, "NT": out = a @ b^T)
  const float* b_scales;  // [ceil(n / 128), ceil(k / 128)]: per 128x128 tile
  uint16_t* out;          // [m, n] bf16, row-major
  int64_t m;
  int64_t n;
  int64_t k;
};

// out = quant(x) @ (b * b_scales)^T: the activations are quantized per token and 128 channels on the way in (the
// per_token_group_quant_fp8 rules, non-UE8M0 scales), so the linear layer's input never exists in FP8 outside the op.
struct Fp8LinearParams {
  const void* x;  // [m, k] row-major, dtype x_dtype (bf16, fp16 or fp32); k a multiple of 128
  DType x_dtype;
  const uint8_t* b;       // [n, k] e4m3, row-major
  const float* b_scales;  // [ceil(n / 128), ceil(k / 128)]
  uint16_t* out;          // [m, n] bf16, row-major
  int64_t m;
  int64_t n;
  int64_t k;
};

inline int64_t scale_blocks(int64_t extent) { return (extent + kScaleBlock - 1) / kScaleBlock; }

inline void validate(const Fp8GemmParams& p) {
  DSV3_CHECK(p.m >= 0 && p.n >= 0 && p.k >= 0, "negative GEMM shape m=", p.m, " n=", p.n, " k=", p.k);
  DSV3_CHECK(p.m * p.n == 0 || (p.out && (p.k == 0 || (p.a && p.a_scales && p.b && p.b_scales))),
             "a/b/scales/out: null pointer for a non-empty GEMM");
}

inline void validate(const Fp8LinearParams& p) {
  DSV3_CHECK(p.x_dtype == DType::kBFloat16 || p.x_dtype == DType::kFloat16 || p.x_dtype == DType::kFloat32,
             "x: expected bfloat16, float16 or float32, got ", dtype_name(p.x_dtype));
  DSV3_CHECK(p.m >= 0 && p.n >= 0 && p.k >= 0, "negative linear shape m=", p.m, " n=", p.n, " k=", p.k);
  DSV3_CHECK(p.k % kScaleBlock == 0, "x: the input width must be a multiple of 128, got ", p.k);
  DSV3_CHECK(p.m * p.n == 0 || (p.out && (p.k == 0 || (p.x && p.b && p.b_scales))),
             "x/b/scales/out: null pointer for a non-empty linear layer");
}

}  // namespace dsv3
