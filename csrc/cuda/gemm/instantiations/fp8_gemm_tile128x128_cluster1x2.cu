// FP8 GEMM variant for prefill-sized M: 128 x 128 output tiles in 1x2 clusters sharing their tiles of a by multicast.

#include "cuda/gemm/fp8_gemm_cutlass.cuh"
#include "cuda/gemm/fp8_gemm_variants.h"

namespace dsv3::cuda {

using Tile128x128Cluster1x2 = CutlassFp8Gemm<128, false, false, 2>;

template <>
int64_t Fp8GemmKernel<Fp8GemmVariant::kTile128x128Cluster1x2>::workspace_bytes(int64_t m, int64_t n, int64_t k,
                                                                               const Fp8GemmSchedule& schedule,
                                                                               int num_sms) {
  return Tile128x128Cluster1x2::workspace_bytes(m, n, k, schedule, num_sms);
}

template <>
void Fp8GemmKernel<Fp8GemmVariant::kTile128x128Cluster1x2>::run(const Fp8GemmParams& params,
                                                                const Fp8GemmSchedule& schedule, void* workspace,
                                                                int num_sms, cudaStream_t stream) {
  Tile128x128Cluster1x2::run(params, schedule, workspace, num_sms, stream);
}

}  // namespace dsv3::cuda
