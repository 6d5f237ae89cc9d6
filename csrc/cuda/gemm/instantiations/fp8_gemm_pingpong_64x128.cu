// FP8 GEMM variant: 64 x 128 output tiles, the two consumer warp groups alternating tiles (ping-pong).

#include "cuda/gemm/fp8_gemm_cutlass.cuh"
#include "cuda/gemm/fp8_gemm_variants.h"

namespace dsv3::cuda {

using Pingpong64x128 = CutlassFp8Gemm<128, false, true>;

template <>
int64_t Fp8GemmKernel<Fp8GemmVariant::kPingpong64x128>::workspace_bytes(int64_t m, int64_t n, int64_t k,
                                                                        const Fp8GemmSchedule& schedule, int num_sms) {
  return Pingpong64x128::workspace_bytes(m, n, k, schedule, num_sms);
}

template <>
void Fp8GemmKernel<Fp8GemmVariant::kPingpong64x128>::run(const Fp8GemmParams& params, const Fp8GemmSchedule& schedule,
                                                         void* workspace, int num_sms, cudaStream_t stream) {
  Pingpong64x128::run(params, schedule, workspace, num_sms, stream);
}

}  // namespace dsv3::cuda
