#pragma once
// Parameters of the FP8 block-scaled GEMM (out = (a * a_scales) @ (b * b_scales)^T, fp32 accumulation) and the
// invariants every backend relies on. dsv3.ops has checked dtypes, devices, shapes, contiguity and alignment.

#include <cstdint>

#include "dsv3/check.h"

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

inline int64_t scale_blocks(int64_t extent) { return (extent + kScaleBlock - 1) / kScaleBlock; }

inline void validate(const Fp8GemmParams& p) {
  DSV3_CHECK(p.m >= 0 && p.n >= 0 && p.k >= 0, "negative GEMM shape m=", p.m, " n=", p.n, " k=", p.k);
  DSV3_CHECK(p.m * p.n == 0 || (p.out && (p.k == 0 || (p.a && p.a_scales && p.b && p.b_scales))),
             "a/b/scales/out: null pointer for a non-empty GEMM");
}

}  // namespace dsv3
