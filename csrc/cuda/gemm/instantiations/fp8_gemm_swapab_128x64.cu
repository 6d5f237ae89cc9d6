// FP8 GEMM variant for decode-sized M (<= 64 tokens): out^T = b @ a^T in 128 (weight rows) x 64 (tokens) tiles.

#include "cuda/gemm/fp8_gemm_cutlass.cuh"
#include "cuda/gemm/fp8_gemm_variants.h"

namespace dsv3::cuda {

using SwapAB128x64 = CutlassFp8Gemm<64, true>;

template <>
int64_t Fp8GemmKernel<Fp8GemmVariant::kSwapAB128x64>::workspace_bytes(int64_t m, int64_t n, int64_t k,
                                                                      const Fp8GemmSchedule& schedule, int num_sms) {
  return SwapAB128x64::workspace_bytes(m, n, k, schedule, num_sms);
}

template <>
void Fp8GemmKernel<Fp8GemmVariant::kSwapAB128x64>::run(const Fp8GemmParams& params, const Fp8GemmSchedule& schedule,
                                                       void* workspace, int num_sms, cudaStream_t stream) {
  SwapAB128x64::run(params, schedule, workspace, num_sms, stream);
}

}  // namespace dsv3::cuda
