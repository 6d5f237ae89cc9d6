// FP8 quantization kernels: per-token groups (activations), 128x128 blocks (weights) and block dequantization.
// Bit-exact with dsv3.reference.quant: the scale rule and rounding come from dsv3/fp8.h, shared with the CPU kernels.

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/element_types.cuh"
#include "cuda/quant/group_quant.cuh"
#include "cuda/sm90_ptx.cuh"
#include "dsv3/fp8.h"

namespace dsv3::cuda {
namespace {

using sm90::allow_dependent_launch;

// One group of group_size values is handled by kLanes consecutive lanes of a warp, each lane loading kVec elements
// (16 bytes when the group allows it) at a time, so a warp covers 32 / kLanes groups per step and every load is
// coalesced. The row-major [rows, k] input is a sequence of groups: group g starts at element g * group_size.
template <typename T, int kVec, int kLanes>
__global__ void token_group_quant_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scales,
                                         int64_t total_groups, int group_size, bool ue8m0) {
  constexpr int kGroupsPerWarp = kWarpSize / kLanes;
  using InVector = AlignedVector<T, kVec>;
  using OutVector = AlignedVector<uint8_t, kVec>;
  const int lane = threadIdx.x % kWarpSize;
  const int sub_lane = lane % kLanes;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  const int vectors = group_size / kVec;
  allow_dependent_launch();  // fp8_linear's GEMM may start (it waits for this grid before reading the codes)

  // The loop bound depends on the warp only, so every lane reaches the shuffles together.
  for (int64_t first = warp * kGroupsPerWarp; first < total_groups; first += warps * kGroupsPerWarp) {
    const int64_t group = first + lane / kLanes;
    const bool active = group < total_groups;
    const T* group_x = x + group * group_size;
    float amax = 0.0f;
    if (active) {
      for (int v = sub_lane; v < vectors; v += kLanes) {
        const InVector in = reinterpret_cast<const InVector*>(group_x)[v];
#pragma unroll
        for (int i = 0; i < kVec; ++i) amax = nan_max(amax, fabsf(to_float(in.values[i])));
      }
    }
    amax = lanes_nan_max(amax, kLanes);
    if (!active) continue;
    const float scale = scale_from_amax(amax, ue8m0);
    uint8_t* group_q = q + group * group_size;
    for (int v = sub_lane; v < vectors; v += kLanes) {
      const InVector in = reinterpret_cast<const InVector*>(group_x)[v];
      OutVector out;
#pragma unroll
      for (int i = 0; i < kVec; ++i) out.values[i] = float_to_e4m3(scale_and_clamp(to_float(in.values[i]), scale));
      reinterpret_cast<OutVector*>(group_q)[v] = out;
    }
    if (sub_lane == 0) scales[group] = scale;
  }
}

constexpr int kThreads = 256;

// The common layout of one 16-byte vector per lane (kLanes * kVec == group_size, e.g. 128-channel groups of 16-bit
// or 32-bit values): a warp takes kUnrollSteps steps of 32 / kLanes groups at once, issuing all their loads before
// the first reduction waits on them, and keeps the values in registers for the second pass. (Step by step, a warp
// had one load in flight and read each group twice.)
constexpr int kUnrollSteps = 4;
template <typename T, int kVec, int kLanes>
__global__ void token_group_quant_unrolled_kernel(const T* __restrict__ x, uint8_t* __restrict__ q,
                                                  float* __restrict__ scales, int64_t total_groups, bool ue8m0) {
  constexpr int kGroupsPerStep = kWarpSize / kLanes;
  constexpr int kGroupSize = kLanes * kVec;
  using InVector = AlignedVector<T, kVec>;
  using OutVector = AlignedVector<uint8_t, kVec>;
  const int lane = threadIdx.x % kWarpSize;
  const int sub_lane = lane % kLanes;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  constexpr int kGroupsPerIteration = kGroupsPerStep * kUnrollSteps;
  allow_dependent_launch();  // fp8_linear's GEMM may start (it waits for this grid before reading the codes)

  // The loop bound depends on the warp only, so every lane reaches the shuffles together.
  for (int64_t first = warp * kGroupsPerIteration; first < total_groups; first += warps * kGroupsPerIteration) {
    InVector in[kUnrollSteps];
#pragma unroll
    for (int u = 0; u < kUnrollSteps; ++u) {
      const int64_t group = first + u * kGroupsPerStep + lane / kLanes;
      if (group < total_groups) {
        in[u] = reinterpret_cast<const InVector*>(x + group * kGroupSize)[sub_lane];
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) in[u].values[i] = from_float<T>(0.0f);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnrollSteps; ++u) {
      const int64_t group = first + u * kGroupsPerStep + lane / kLanes;
      OutVector out;
      const float scale = quantize_lane_vector<T, kVec, kLanes>(in[u], ue8m0, out);  // every lane, past the end or not
      if (group >= total_groups) continue;
      reinterpret_cast<OutVector*>(q + group * kGroupSize)[sub_lane] = out;
      if (sub_lane == 0) scales[group] = scale;
    }
  }
}

int64_t grid_for(int64_t work_items, int64_t items_per_block) {
  return std::max<int64_t>(1, std::min<int64_t>((work_items + items_per_block - 1) / items_per_block, 1 << 20));
}

template <typename T, int kVec>
void launch_token_group_quant(const TokenGroupQuantParams& p, cudaStream_t stream) {
  const int vectors = static_cast<int>(p.group_size / kVec);
  int lanes = 1;
  while (lanes * 2 <= std::min(vectors, kWarpSize)) lanes *= 2;
  const int64_t groups = p.rows * (p.k / p.group_size);
  const auto* x = static_cast<const T*>(p.x);
  if (vectors == lanes && (lanes == 16 || lanes == 32)) {  // one vector per lane
    const int64_t groups_per_block = (kThreads / kWarpSize) * (kWarpSize / lanes) * kUnrollSteps;
    const dim3 grid(static_cast<unsigned>(grid_for(groups, groups_per_block)));
    if (lanes == 16) {
      token_group_quant_unrolled_kernel<T, kVec, 16><<<grid, kThreads, 0, stream>>>(x, p.q, p.scales, groups, p.ue8m0);
    } else {
      token_group_quant_unrolled_kernel<T, kVec, 32><<<grid, kThreads, 0, stream>>>(x, p.q, p.scales, groups, p.ue8m0);
    }
    return;
  }
  const int64_t groups_per_block = (kThreads / kWarpSize) * (kWarpSize / lanes);
  const dim3 grid(static_cast<unsigned>(grid_for(groups, groups_per_block)));
  const int group_size = static_cast<int>(p.group_size);
  switch (lanes) {
    case 1:
      token_group_quant_kernel<T, kVec, 1>
          <<<grid, kThreads, 0, stream>>>(x, p.q, p.scales, groups, group_size, p.ue8m0);
      break;
    case 2:
      token_group_quant_kernel<T, kVec, 2>
          <<<grid, kThreads, 0, stream>>>(x, p.q, p.scales, groups, group_size, p.ue8m0);
      break;
    case 4:
      token_group_quant_kernel<T, kVec, 4>
          <<<grid, kThreads, 0, stream>>>(x, p.q, p.scales, groups, group_size, p.ue8m0);
      break;
    case 8:
      token_group_quant_kernel<T, kVec, 8>
          <<<grid, kThreads, 0, stream>>>(x, p.q, p.scales, groups, group_size, p.ue8m0);
      break;
    case 16:
      token_group_quant_kernel<T, kVec, 16>
          <<<grid, kThreads, 0, stream>>>(x, p.q, p.scales, groups, group_size, p.ue8m0);
      break;
    default:
      token_group_quant_kernel<T, kVec, 32>
          <<<grid, kThreads, 0, stream>>>(x, p.q, p.scales, groups, group_size, p.ue8m0);
      break;
  }
}

__device__ float block_nan_max(float value, float* shared) {
  value = lanes_nan_max(value, kWarpSize);
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) shared[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = threadIdx.x < blockDim.x / kWarpSize ? shared[threadIdx.x] : 0.0f;
    value = lanes_nan_max(value, kWarpSize);
    if (threadIdx.x == 0) shared[0] = value;
  }
  __syncthreads();
  return shared[0];
}

// One CTA per weight block; threads stride over the block's (possibly partial) rows x cols, consecutive threads on
// consecutive columns of a row so loads are coalesced.
template <typename T>
__global__ void block_quant_kernel(const T* __restrict__ w, uint8_t* __restrict__ q, float* __restrict__ scale_inv,
                                   int64_t n, int64_t k, int64_t block) {
  __shared__ float shared[kThreads / kWarpSize];
  const int64_t row0 = blockIdx.y * block, col0 = blockIdx.x * block;
  const int64_t rows = min(block, n - row0), cols = min(block, k - col0);
  float amax = 0.0f;
  for (int64_t i = threadIdx.x; i < rows * cols; i += blockDim.x) {
    amax = nan_max(amax, fabsf(to_float(w[(row0 + i / cols) * k + col0 + i % cols])));
  }
  const float scale = scale_from_amax(block_nan_max(amax, shared), false);
  for (int64_t i = threadIdx.x; i < rows * cols; i += blockDim.x) {
    const int64_t index = (row0 + i / cols) * k + col0 + i % cols;
    q[index] = float_to_e4m3(scale_and_clamp(to_float(w[index]), scale));
  }
  if (threadIdx.x == 0) scale_inv[blockIdx.y * gridDim.x + blockIdx.x] = scale;
}

template <typename T>
__global__ void block_dequant_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scale_inv,
                                     T* __restrict__ out, int64_t n, int64_t k, int64_t block) {
  const int64_t block_cols = (k + block - 1) / block;
  const int64_t total = n * k;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / k, col = i % k;
    out[i] = from_float<T>(e4m3_to_float(q[i]) * scale_inv[(row / block) * block_cols + col / block]);
  }
}

void check_launch() { DSV3_CUDA_CHECK(cudaGetLastError()); }

}  // namespace

void per_token_group_quant_fp8(const TokenGroupQuantParams& params, std::uintptr_t stream_handle) {
  validate(params);
  if (params.rows * params.k == 0) return;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  dispatch_float_type(params.x_dtype, [&](auto type) {
    using T = decltype(type);
    constexpr int kVec = 16 / sizeof(T);
    // 16-byte vectors need every group to start on a 16-byte boundary; dsv3.ops guarantees 16-byte aligned bases.
    const bool vectorizable = params.group_size % kVec == 0 && reinterpret_cast<std::uintptr_t>(params.x) % 16 == 0 &&
                              reinterpret_cast<std::uintptr_t>(params.q) % 16 == 0;
    if (vectorizable) {
      launch_token_group_quant<T, kVec>(params, stream);
    } else {
      launch_token_group_quant<T, 1>(params, stream);
    }
  });
  check_launch();
}

void per_block_quant_fp8(const BlockQuantParams& params, std::uintptr_t stream_handle) {
  validate(params);
  if (params.n * params.k == 0) return;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const dim3 grid(static_cast<unsigned>((params.k + params.block - 1) / params.block),
                  static_cast<unsigned>((params.n + params.block - 1) / params.block));
  DSV3_CHECK(grid.y <= 65535, "w: ", params.n, " rows make more than 65535 row blocks of ", params.block);
  dispatch_float_type(params.w_dtype, [&](auto type) {
    using T = decltype(type);
    block_quant_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(params.w), params.q, params.scale_inv,
                                                         params.n, params.k, params.block);
  });
  check_launch();
}

void dequant_fp8_block(const BlockDequantParams& params, std::uintptr_t stream_handle) {
  validate(params);
  if (params.n * params.k == 0) return;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const dim3 grid(static_cast<unsigned>(grid_for(params.n * params.k, kThreads * 8)));
  dispatch_float_type(params.out_dtype, [&](auto type) {
    using T = decltype(type);
    block_dequant_kernel<T><<<grid, kThreads, 0, stream>>>(params.q, params.scale_inv, static_cast<T*>(params.out),
                                                           params.n, params.k, params.block);
  });
  check_launch();
}

}  // namespace dsv3::cuda
