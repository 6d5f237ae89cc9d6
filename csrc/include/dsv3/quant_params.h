#pragma once
// Parameters of the FP8 quantization ops and the invariants every backend relies on. Pointers are raw device or host
// addresses handed over by dsv3.ops, which has already checked dtypes, devices, shapes and contiguity; validate()
// re-checks what a kernel needs to stay in bounds.

#include <cstdint>

#include "dsv3/check.h"
#include "dsv3/dtype.h"

namespace dsv3 {

struct TokenGroupQuantParams {
  const void* x;  // [rows, k] row-major, dtype x_dtype (bf16, fp16 or fp32)
  DType x_dtype;
  uint8_t* q;     // [rows, k] e4m3
  float* scales;  // [rows, k / group_size]
  int64_t rows;
  int64_t k;
  int64_t group_size;
  bool ue8m0;  // round scales up to powers of two
};

struct BlockQuantParams {
  const void* w;  // [n, k] row-major, dtype w_dtype (bf16, fp16 or fp32)
  DType w_dtype;
  uint8_t* q;        // [n, k] e4m3
  float* scale_inv;  // [ceil(n / block), ceil(k / block)]
  int64_t n;
  int64_t k;
  int64_t block;
};

struct BlockDequantParams {
  const uint8_t* q;        // [n, k] e4m3
  const float* scale_inv;  // [ceil(n / block), ceil(k / block)]
  void* out;               // [n, k], dtype out_dtype (bf16, fp16 or fp32)
  DType out_dtype;
  int64_t n;
  int64_t k;
  int64_t block;
};

// SiLU-and-mul fused with per_token_group_quant_fp8 (128-channel groups, fp32 scales): row r of h is [gate | up],
// each `inter` bf16 values, and its output the e4m3 codes and scales of bf16(silu(gate) * up), silu in fp32.
struct SiluMulQuantParams {
  const uint16_t* h;  // [rows, 2 * inter] bf16
  uint8_t* q;         // [rows, inter] e4m3
  float* scales;      // [rows, inter / 128]
  int64_t rows;
  int64_t inter;
};

constexpr int64_t kSiluMulQuantGroup = 128;

inline bool is_float_input(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kBFloat16 || dtype == DType::kFloat16;
}

inline void validate(const TokenGroupQuantParams& p) {
  DSV3_CHECK(is_float_input(p.x_dtype), "x: expected float32, bfloat16 or float16, got ", dtype_name(p.x_dtype));
  DSV3_CHECK(p.rows >= 0 && p.k >= 0, "x: negative shape [", p.rows, ", ", p.k, "]");
  DSV3_CHECK(p.group_size > 0, "group_size: expected a positive value, got ", p.group_size);
  DSV3_CHECK(p.k % p.group_size == 0, "x: last dimension ", p.k, " is not a multiple of group_size ", p.group_size);
  DSV3_CHECK(p.rows * p.k == 0 || (p.x && p.q && p.scales), "x/q/scales: null pointer for a non-empty tensor");
}

inline void validate(const SiluMulQuantParams& p) {
  DSV3_CHECK(p.rows >= 0 && p.inter >= 0, "h: negative shape [", p.rows, ", ", 2 * p.inter, "]");
  DSV3_CHECK(p.inter % kSiluMulQuantGroup == 0, "h: each half (", p.inter, " values) must be a multiple of ",
             kSiluMulQuantGroup);
  DSV3_CHECK(p.rows * p.inter == 0 || (p.h && p.q && p.scales), "h/q/scales: null pointer for a non-empty tensor");
}

inline void validate(const BlockQuantParams& p) {
  DSV3_CHECK(is_float_input(p.w_dtype), "w: expected float32, bfloat16 or float16, got ", dtype_name(p.w_dtype));
  DSV3_CHECK(p.n >= 0 && p.k >= 0, "w: negative shape [", p.n, ", ", p.k, "]");
  DSV3_CHECK(p.block > 0, "block: expected a positive value, got ", p.block);
  DSV3_CHECK(p.n * p.k == 0 || (p.w && p.q && p.scale_inv), "w/q/scale_inv: null pointer for a non-empty tensor");
}

inline void validate(const BlockDequantParams& p) {
  DSV3_CHECK(is_float_input(p.out_dtype), "dtype: expected float32, bfloat16 or float16, got ",
             dtype_name(p.out_dtype));
  DSV3_CHECK(p.n >= 0 && p.k >= 0, "q: negative shape [", p.n, ", ", p.k, "]");
  DSV3_CHECK(p.block > 0, "block: expected a positive value, got ", p.block);
  DSV3_CHECK(p.n * p.k == 0 || (p.q && p.scale_inv && p.out), "q/scale_inv/out: null pointer for a non-empty tensor");
}

}  // namespace dsv3
