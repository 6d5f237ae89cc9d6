#pragma once
// The compiled FP8 GEMM variants. Each is defined in its own translation unit under instantiations/ (a CUTLASS
// kernel costs ~90 s and ~4 GB to compile), so this header stays free of CUTLASS.

#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>

#include "dsv3/gemm_params.h"
#include "dsv3/gemm_schedule.h"

namespace dsv3::cuda {

// The hand-written kernel DSV3_FP8_GEMM_KERNEL asks for instead of the heuristic's choice (overlap, overlap_cluster:
// dense and grouped; decode: dense and masked grouped at decode sizes, see kDecodeMaxTokens); nothing when unset.
std::optional<Fp8GemmVariant> requested_fp8_gemm_variant();

// The hand-written decode kernel (kDecode128x64, instantiations/fp8_gemm_decode.cu), K split over `splits` CTAs;
// overlap_predecessor as for fp8_gemm_nt.
void fp8_gemm_decode_run(const Fp8GemmParams& params, int splits, bool overlap_predecessor, cudaStream_t stream);

template <Fp8GemmVariant kVariant>
struct Fp8GemmKernel {
  static int64_t workspace_bytes(int64_t m, int64_t n, int64_t k, const Fp8GemmSchedule& schedule, int num_sms);
  static void run(const Fp8GemmParams& params, const Fp8GemmSchedule& schedule, void* workspace, int num_sms,
                  cudaStream_t stream);
};

}  // namespace dsv3::cuda
