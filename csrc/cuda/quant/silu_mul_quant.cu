// SiLU-and-mul fused with the per-token FP8 quantization on sm_90a: each 128-channel group of outputs is spread over
// 16 lanes of a warp, each reading 8 gate and 8 up values (16-byte loads), rounding silu(gate) * up to bf16 as the
// reference does (silu in fp32, x / (1 + exp(-x)) with the same expf as torch's CUDA kernel) and quantizing the
// group with the per-token kernel's lane helper (dsv3/fp8.h rules), so the codes and scales are those of
// per_token_group_quant_fp8(silu_and_mul(h)).

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/element_types.cuh"
#include "cuda/quant/group_quant.cuh"

namespace dsv3::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;                            // bf16 values per 16-byte load
constexpr int kLanes = kSiluMulQuantGroup / kVec;  // lanes per group
constexpr int kGroupsPerWarp = kWarpSize / kLanes;

__global__ void silu_mul_quant_kernel(const __nv_bfloat16* __restrict__ h, uint8_t* __restrict__ q,
                                      float* __restrict__ scales, int64_t total_groups, int64_t inter) {
  using Vector = AlignedVector<__nv_bfloat16, kVec>;
  const int lane = threadIdx.x % kWarpSize, sub_lane = lane % kLanes;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  const int64_t groups_per_row = inter / kSiluMulQuantGroup;
  // The loop bound depends on the warp only, so every lane reaches the shuffles together.
  for (int64_t first = warp * kGroupsPerWarp; first < total_groups; first += warps * kGroupsPerWarp) {
    const int64_t group = first + lane / kLanes;
    Vector values;
    if (group < total_groups) {
      const int64_t row = group / groups_per_row, column = (group % groups_per_row) * kSiluMulQuantGroup;
      const __nv_bfloat16* gate = h + row * 2 * inter + column;
      const Vector g = reinterpret_cast<const Vector*>(gate)[sub_lane];
      const Vector u = reinterpret_cast<const Vector*>(gate + inter)[sub_lane];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float x = to_float(g.values[i]);
        values.values[i] = from_float<__nv_bfloat16>(x / (1.0f + expf(-x)) * to_float(u.values[i]));
      }
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) values.values[i] = from_float<__nv_bfloat16>(0.0f);
    }
    AlignedVector<uint8_t, kVec> codes;
    const float scale = quantize_lane_vector<__nv_bfloat16, kVec, kLanes>(values, false, codes);  // every lane
    if (group >= total_groups) continue;
    reinterpret_cast<AlignedVector<uint8_t, kVec>*>(q + group * kSiluMulQuantGroup)[sub_lane] = codes;
    if (sub_lane == 0) scales[group] = scale;
  }
}

}  // namespace

void silu_and_mul_quant_fp8(const SiluMulQuantParams& params, std::uintptr_t stream_handle) {
  validate(params);
  const int64_t groups = params.rows * (params.inter / kSiluMulQuantGroup);
  if (groups == 0) return;
  DSV3_CHECK(
      reinterpret_cast<std::uintptr_t>(params.h) % 16 == 0 && reinterpret_cast<std::uintptr_t>(params.q) % 16 == 0,
      "h/q: expected 16-byte aligned data");
  const int64_t groups_per_block = (kThreads / kWarpSize) * kGroupsPerWarp;
  const auto blocks =
      std::max<int64_t>(1, std::min<int64_t>((groups + groups_per_block - 1) / groups_per_block, 1 << 20));
  silu_mul_quant_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, reinterpret_cast<cudaStream_t>(stream_handle)>>>(
      reinterpret_cast<const __nv_bfloat16*>(params.h), params.q, params.scales, groups, params.inter);
  DSV3_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv3::cuda
