// RMSNorm (optionally after a residual add) on the GPU: one CTA per row, threads striding over the row (coalesced),
// the sum of squares reduced across the CTA in fp32, then the reference's roundings: normalized value to the dtype,
// times the weight, to the dtype (explicit _rn intrinsics keep the compiler from contracting into FMAs).

#include <cuda_runtime_api.h>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/element_types.cuh"

namespace dsv3::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;

__device__ float block_sum(float value, float* shared) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xFFFFFFFFu, value, offset);
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) shared[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = threadIdx.x < kThreads / kWarpSize ? shared[threadIdx.x] : 0.0f;
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xFFFFFFFFu, value, offset);
    if (threadIdx.x == 0) shared[0] = value;
  }
  __syncthreads();
  return shared[0];
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    rms_norm_kernel(const T* __restrict__ x, const T* residual, T* residual_out, const T* __restrict__ weight,
                    T* __restrict__ out, int64_t hidden, float eps) {
  __shared__ float shared[kThreads / kWarpSize];
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * hidden;
  const T* row = x + offset;
  if (residual != nullptr) {  // residual_out may alias residual: each element is read, then written, by one thread
    for (int64_t i = threadIdx.x; i < hidden; i += kThreads) {
      residual_out[offset + i] = from_float<T>(__fadd_rn(to_float(row[i]), to_float(residual[offset + i])));
    }
    row = residual_out + offset;  // written by this thread at the same indices it reads below
  }
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < hidden; i += kThreads) {
    const float v = to_float(row[i]);
    sum = __fadd_rn(sum, __fmul_rn(v, v));
  }
  const float mean = __fdiv_rn(block_sum(sum, shared), static_cast<float>(hidden));
  const float inverse_rms = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
  for (int64_t i = threadIdx.x; i < hidden; i += kThreads) {
    const float normalized = to_float(from_float<T>(__fmul_rn(to_float(row[i]), inverse_rms)));
    out[offset + i] = from_float<T>(__fmul_rn(to_float(weight[i]), normalized));
  }
}

}  // namespace

void rms_norm(const RmsNormParams& params, std::uintptr_t stream_handle) {
  validate(params);
  DSV3_CHECK(params.rows < (int64_t{1} << 31), "x: more than 2^31 rows");
  if (params.rows == 0) return;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  dispatch_float_type(params.dtype, [&](auto type) {
    using T = decltype(type);
    rms_norm_kernel<T><<<static_cast<unsigned>(params.rows), kThreads, 0, stream>>>(
        static_cast<const T*>(params.x), static_cast<const T*>(params.residual), static_cast<T*>(params.residual_out),
        static_cast<const T*>(params.weight), static_cast<T*>(params.out), params.hidden, params.eps);
  });
  DSV3_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv3::cuda
