// Appending tokens to the paged MLA latent cache on the GPU, bit-exact with the CPU kernel (csrc/cpu/mla_cache.cpp):
// bf16 rows are the inputs rounded to bf16; FP8 rows quantize the latent in 4 groups of 128 with dsv3/fp8.h's rules.
// One block per token; warp g owns latent group g (4 values a lane), so a group's amax is one warp reduction.

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/element_types.cuh"
#include "dsv3/fp8.h"
#include "dsv3/mla_params.h"

namespace dsv3::cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps = 4 latent groups of 128
static_assert(kThreads * 4 == kMlaLatentDim, "one lane per 4 latent values");

// Round-to-nearest-even with the CPU's NaN encoding (dsv3/half_types.h float_to_bf16), so rows match bit for bit.
__device__ __forceinline__ uint16_t bf16_bits(float value) {
  const uint32_t u = float_bits(value);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) mla_append_kernel(const MlaAppendParams p) {
  const int64_t token = blockIdx.x;
  const int64_t slot = p.slot_mapping[token];
  // Slots outside the cache are dropped (the CPU kernel rejects them before writing anything).
  if (slot < 0 || slot >= p.num_blocks * kMlaPageSize) return;
  const T* latent = static_cast<const T*>(p.latent) + token * kMlaLatentDim;
  const T* rope = static_cast<const T*>(p.rope) + token * kMlaRopeDim;
  const int lane = threadIdx.x % 32, group = threadIdx.x / 32;
  float values[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) values[i] = to_float(latent[group * 128 + lane * 4 + i]);
  const float rope_value = threadIdx.x < kMlaRopeDim ? to_float(rope[threadIdx.x]) : 0.0f;

  if (!p.fp8_cache) {
    auto* row = reinterpret_cast<uint16_t*>(p.kv_cache) + slot * kMlaHeadDim;
#pragma unroll
    for (int i = 0; i < 4; ++i) row[group * 128 + lane * 4 + i] = bf16_bits(values[i]);
    if (threadIdx.x < kMlaRopeDim) row[kMlaLatentDim + threadIdx.x] = bf16_bits(rope_value);
    return;
  }
  // amax as the CPU computes it: the unsigned maximum of the sign-cleared bit patterns (NaN sorts above inf).
  uint32_t amax_bits = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) amax_bits = max(amax_bits, float_bits(values[i]) & 0x7FFFFFFFu);
  amax_bits = __reduce_max_sync(0xFFFFFFFFu, amax_bits);
  const float scale = scale_from_amax(bits_to_float(amax_bits), p.ue8m0);
  uint8_t* row = p.kv_cache + slot * kMlaFp8RowBytes;
  uint32_t codes = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    codes |= static_cast<uint32_t>(float_to_e4m3(scale_and_clamp(values[i], scale))) << (8 * i);
  reinterpret_cast<uint32_t*>(row)[group * 32 + lane] = codes;
  if (lane == 0) reinterpret_cast<float*>(row + kMlaLatentDim)[group] = scale;
  if (threadIdx.x < kMlaRopeDim) {
    reinterpret_cast<uint16_t*>(row + kMlaLatentDim + 16)[threadIdx.x] = bf16_bits(rope_value);
  }
}

}  // namespace

void mla_append_kv(const MlaAppendParams& params, std::uintptr_t stream) {
  validate(params);
  DSV3_CHECK(params.tokens <= 0x7FFFFFFF, "latent: too many tokens");
  if (params.tokens == 0) return;
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (params.input_dtype == DType::kBFloat16) {
    mla_append_kernel<__nv_bfloat16><<<static_cast<unsigned>(params.tokens), kThreads, 0, cuda_stream>>>(params);
  } else {
    mla_append_kernel<float><<<static_cast<unsigned>(params.tokens), kThreads, 0, cuda_stream>>>(params);
  }
  DSV3_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv3::cuda
