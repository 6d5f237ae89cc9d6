#pragma once
// Parameters of the elementwise layers around the GEMMs (RMSNorm, residual add + RMSNorm, interleaved RoPE) and the
// invariants the kernels rely on. Semantics: dsv3.reference.layers.

#include <cstdint>

#include "dsv3/check.h"
#include "dsv3/dtype.h"

namespace dsv3 {

// out = weight * round(x * rsqrt(mean(x^2) + eps)), in fp32 with one rounding to dtype before and after the weight.
// With residual set: x + residual is first rounded to dtype, written to residual_out, and normalized.
struct RmsNormParams {
  const void* x;         // [rows, hidden]
  const void* residual;  // [rows, hidden], or null
  void* residual_out;    // [rows, hidden] when residual is set (may be residual itself), else null
  const void* weight;    // [hidden]
  void* out;             // [rows, hidden]
  DType dtype;           // of every tensor above: bf16, fp16 or fp32
  int64_t rows;
  int64_t hidden;
  float eps;
};

// Rotates interleaved pairs (x[2i], x[2i + 1]) of every head of every token by the angle of the token's position at
// frequency i: cos_sin[position, i] and cos_sin[position, dim / 2 + i]. fp32 math, one rounding to dtype.
struct RopeParams {
  const void* x;             // [tokens, heads, dim], element strides (token_stride, head_stride, 1)
  void* out;                 // [tokens, heads, dim], contiguous
  DType dtype;               // of x and out: bf16, fp16 or fp32
  const int64_t* positions;  // [tokens], each in [0, max_positions)
  const float* cos_sin;      // [max_positions, dim]
  int64_t tokens;
  int64_t heads;
  int64_t dim;
  int64_t token_stride;
  int64_t head_stride;
  int64_t max_positions;
};

inline bool is_layer_dtype(DType dtype) {
  return dtype == DType::kBFloat16 || dtype == DType::kFloat16 || dtype == DType::kFloat32;
}

inline void validate(const RmsNormParams& p) {
  DSV3_CHECK(is_layer_dtype(p.dtype), "x: expected bfloat16, float16 or float32, got ", dtype_name(p.dtype));
  DSV3_CHECK(p.rows >= 0 && p.hidden >= 1, "x: bad shape [", p.rows, ", ", p.hidden, "]");
  DSV3_CHECK((p.residual == nullptr) == (p.residual_out == nullptr), "residual: residual_out must come with it");
  DSV3_CHECK(p.rows == 0 || (p.x && p.weight && p.out), "x/weight/out: null pointer for a non-empty tensor");
  DSV3_CHECK(p.eps >= 0.0f, "eps: expected a non-negative value, got ", p.eps);
}

inline void validate(const RopeParams& p) {
  DSV3_CHECK(is_layer_dtype(p.dtype), "x: expected bfloat16, float16 or float32, got ", dtype_name(p.dtype));
  DSV3_CHECK(p.tokens >= 0 && p.heads >= 0 && p.dim >= 2 && p.dim % 2 == 0, "x: bad shape [", p.tokens, ", ", p.heads,
             ", ", p.dim, "] (the last dimension must be even)");
  DSV3_CHECK(p.max_positions >= 1, "cos_sin: expected at least one position");
  DSV3_CHECK(p.tokens * p.heads == 0 || (p.x && p.out && p.positions && p.cos_sin),
             "x/out/positions/cos_sin: null pointer for a non-empty tensor");
}

}  // namespace dsv3
