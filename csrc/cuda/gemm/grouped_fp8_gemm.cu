// Grouped FP8 GEMMs of MoE layers (contiguous and masked layouts) for sm_90a: the CUTLASS kernel, or the hand-written
// kernel DSV3_FP8_GEMM_KERNEL asks for (overlap, overlap_cluster, or decode for the masked layout at decode sizes).

#include <cuda_runtime_api.h>

#include <algorithm>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/gemm/fp8_gemm_variants.h"
#include "cuda/gemm/grouped_fp8_gemm.h"

namespace dsv3::cuda {

int64_t grouped_fp8_gemm_workspace_bytes(int64_t groups, int num_sms) {
  // enough for either kernel: DSV3_FP8_GEMM_KERNEL may change between the query and the call
  return std::max(grouped_fp8_gemm_kernel_workspace_bytes(groups, num_sms),
                  grouped_fp8_gemm_overlap_workspace_bytes(groups));
}

void grouped_fp8_gemm(const GroupedFp8GemmParams& params, std::uintptr_t workspace, int num_sms,
                      std::uintptr_t stream) {
  validate(params);
  DSV3_CHECK(params.k % 16 == 0 && params.n % 8 == 0,
             "a/b: the CUDA kernel needs K % 16 == 0 and N % 8 == 0, got K=", params.k, " N=", params.n);
  DSV3_CHECK(params.groups * params.n <= INT32_MAX && params.m <= INT32_MAX && params.k <= INT32_MAX &&
                 (params.layout == GroupedLayout::kContiguous || params.groups * params.m <= INT32_MAX),
             "a/b: dimensions beyond 2^31");
  DSV3_CHECK(num_sms > 0 && workspace != 0, "workspace/num_sms: missing");
  if (params.m == 0) return;
  const auto stream_handle = reinterpret_cast<cudaStream_t>(stream);
  const std::optional<Fp8GemmVariant> variant = requested_fp8_gemm_variant();
  if (variant == Fp8GemmVariant::kDecode128x64 && params.layout == GroupedLayout::kMasked &&
      expected_rows(params) <= kDecodeMaxTokens) {
    grouped_fp8_gemm_decode_run(params, num_sms, stream_handle);
    return;
  }
  if (variant && variant != Fp8GemmVariant::kDecode128x64) {
    grouped_fp8_gemm_overlap_run(params, *variant == Fp8GemmVariant::kTile128x128OverlapCluster1x2,
                                 reinterpret_cast<void*>(workspace), num_sms, stream_handle);
    return;
  }
  grouped_fp8_gemm_kernel_run(params, reinterpret_cast<void*>(workspace), num_sms, stream_handle);
}

}  // namespace dsv3::cuda
