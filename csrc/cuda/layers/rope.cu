// Interleaved rotary embedding on the GPU: one thread per (token, head, pair), fp32 math with the reference's
// operations in its order (explicit _rn intrinsics: no FMA contraction), one rounding to the dtype. A position
// outside cos_sin's rows is never dereferenced: that token's output is NaN (checking on the host would need a
// synchronization).

#include <cuda_runtime_api.h>

#include <algorithm>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/element_types.cuh"

namespace dsv3::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(const T* __restrict__ x, T* __restrict__ out, const int64_t* __restrict__ positions,
                const float* __restrict__ cos_sin, int64_t pairs_total, int64_t heads, int64_t dim,
                int64_t token_stride, int64_t head_stride, int64_t max_positions) {
  const int64_t half = dim / 2;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; item < pairs_total;
       item += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = item % half, head = (item / half) % heads, token = item / (half * heads);
    const T* src = x + token * token_stride + head * head_stride;
    T* dst = out + (token * heads + head) * dim;
    const int64_t position = positions[token];
    if (position < 0 || position >= max_positions) {
      dst[2 * i] = dst[2 * i + 1] = from_float<T>(__int_as_float(0x7FC00000));
      continue;
    }
    const float c = cos_sin[position * dim + i], s = cos_sin[position * dim + half + i];
    const float even = to_float(src[2 * i]), odd = to_float(src[2 * i + 1]);
    dst[2 * i] = from_float<T>(__fsub_rn(__fmul_rn(even, c), __fmul_rn(odd, s)));
    dst[2 * i + 1] = from_float<T>(__fadd_rn(__fmul_rn(even, s), __fmul_rn(odd, c)));
  }
}

}  // namespace

void apply_rope(const RopeParams& params, std::uintptr_t stream_handle) {
  validate(params);
  const int64_t pairs_total = params.tokens * params.heads * (params.dim / 2);
  if (pairs_total == 0) return;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((pairs_total + kThreads - 1) / kThreads, 1 << 16));
  dispatch_float_type(params.dtype, [&](auto type) {
    using T = decltype(type);
    rope_kernel<T><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(params.x), static_cast<T*>(params.out), params.positions, params.cos_sin, pairs_total,
        params.heads, params.dim, params.token_stride, params.head_stride, params.max_positions);
  });
  DSV3_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv3::cuda
