#pragma once
// Per-group FP8 quantization inside a warp, shared by the per-token quantization and the MoE permute-and-quantize
// kernels: a group is spread over kLanes consecutive lanes (a power of two), each holding kVec of its values. The
// scale rule and rounding come from dsv3/fp8.h, so both stay bit-exact with the reference.

#include <cstdint>

#include "cuda/element_types.cuh"
#include "dsv3/fp8.h"

namespace dsv3::cuda {

constexpr int kWarpSize = 32;

// The NaN-propagating max over each aligned group of `lanes` lanes (a power of two): xor offsets below `lanes` stay
// inside the group. Every lane of the warp must call it.
__device__ __forceinline__ float lanes_nan_max(float value, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2)
    value = nan_max(value, __shfl_xor_sync(0xFFFFFFFFu, value, offset));
  return value;
}

// The group's scale (from the amax over its kLanes lanes) and this lane's codes in `out`. Every lane of the warp must
// call it, its group real or not: a lane past the data passes zeros and ignores the results.
template <typename T, int kVec, int kLanes>
__device__ __forceinline__ float quantize_lane_vector(const AlignedVector<T, kVec>& in, bool ue8m0,
                                                      AlignedVector<uint8_t, kVec>& out) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) amax = nan_max(amax, fabsf(to_float(in.values[i])));
  const float scale = scale_from_amax(lanes_nan_max(amax, kLanes), ue8m0);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out.values[i] = float_to_e4m3(scale_and_clamp(to_float(in.values[i]), scale));
  return scale;
}

}  // namespace dsv3::cuda
