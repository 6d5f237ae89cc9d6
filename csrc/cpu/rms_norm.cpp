// RMSNorm (optionally after a residual add) on the CPU, one row per iteration: the sum of squares in kLanes
// independent fp32 partial sums (a fixed order the compiler vectorizes), then the same roundings as the reference.

#include <cmath>
#include <cstdint>

#include "cpu/cpu_ops.h"
#include "cpu/fp8_rows.h"

namespace dsv3::cpu {
namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kParallelValues = int64_t{1} << 16;  // below this, waking the thread team costs more than the rows

template <DType kType>
void normalize_rows(const RmsNormParams& p) {
  using E = Element<kType>;
  using Storage = typename E::Storage;
  const auto* x = static_cast<const Storage*>(p.x);
  const auto* residual = static_cast<const Storage*>(p.residual);
  auto* residual_out = static_cast<Storage*>(p.residual_out);
  const auto* weight = static_cast<const Storage*>(p.weight);
  auto* out = static_cast<Storage*>(p.out);
  const int64_t h = p.hidden;
#pragma omp parallel for schedule(static) if (p.rows * h >= kParallelValues)
  for (int64_t r = 0; r < p.rows; ++r) {
    const Storage* row = x + r * h;
    Storage* out_row = out + r * h;
    if (residual != nullptr) {  // the rounded sum is what the norm reads, and what the next layer adds to
      for (int64_t i = 0; i < h; ++i) {
        residual_out[r * h + i] = E::store(E::load(row[i]) + E::load(residual[r * h + i]));
      }
      row = residual_out + r * h;
    }
    float lanes[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= h; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const float v = E::load(row[i + l]);
        lanes[l] += v * v;
      }
    }
    for (; i < h; ++i) {
      const float v = E::load(row[i]);
      lanes[i % kLanes] += v * v;
    }
    float sum = 0.0f;
    for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
    const float inverse_rms = 1.0f / std::sqrt(sum / static_cast<float>(h) + p.eps);
    for (int64_t j = 0; j < h; ++j) {
      const float normalized = E::load(E::store(E::load(row[j]) * inverse_rms));
      out_row[j] = E::store(E::load(weight[j]) * normalized);
    }
  }
}

}  // namespace

void rms_norm(const RmsNormParams& params) {
  validate(params);
  dispatch_float_type(params.dtype, [&](auto type) { normalize_rows<decltype(type)::value>(params); });
}

}  // namespace dsv3::cpu
