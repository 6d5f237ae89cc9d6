// Interleaved rotary embedding on the CPU: each pair rotated in fp32 with the reference's operations in its order
// (two products, then the difference or sum; the build disables FMA contraction), so results are bit-exact.

#include <cstdint>

#include "cpu/cpu_ops.h"
#include "cpu/fp8_rows.h"

namespace dsv3::cpu {
namespace {

template <DType kType>
void rotate(const RopeParams& p) {
  using E = Element<kType>;
  using Storage = typename E::Storage;
  const auto* x = static_cast<const Storage*>(p.x);
  auto* out = static_cast<Storage*>(p.out);
  const int64_t half = p.dim / 2;
#pragma omp parallel for schedule(static) if (p.tokens * p.heads * p.dim >= (int64_t{1} << 16))
  for (int64_t t = 0; t < p.tokens; ++t) {
    const float* cos = p.cos_sin + p.positions[t] * p.dim;
    const float* sin = cos + half;
    for (int64_t h = 0; h < p.heads; ++h) {
      const Storage* src = x + t * p.token_stride + h * p.head_stride;
      Storage* dst = out + (t * p.heads + h) * p.dim;
      for (int64_t i = 0; i < half; ++i) {
        const float even = E::load(src[2 * i]), odd = E::load(src[2 * i + 1]);
        dst[2 * i] = E::store(even * cos[i] - odd * sin[i]);
        dst[2 * i + 1] = E::store(even * sin[i] + odd * cos[i]);
      }
    }
  }
}

}  // namespace

void apply_rope(const RopeParams& params) {
  validate(params);
  for (int64_t t = 0; t < params.tokens; ++t) {
    DSV3_CHECK(params.positions[t] >= 0 && params.positions[t] < params.max_positions, "positions[", t,
               "]=", params.positions[t], ": expected 0..", params.max_positions - 1, " (the rows of cos_sin)");
  }
  dispatch_float_type(params.dtype, [&](auto type) { rotate<decltype(type)::value>(params); });
}

}  // namespace dsv3::cpu
