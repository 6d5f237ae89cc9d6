#pragma once
// The compiled grouped FP8 GEMMs, declared without CUTLASS: the CUTLASS kernel
// (instantiations/grouped_fp8_gemm_tile128x128.cu), the hand-written overlap kernel, alone or in 1x2 clusters
// (instantiations/fp8_gemm_tile128x128_overlap.cu), and the hand-written decode kernel for the masked layout.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dsv3/grouped_gemm_params.h"

namespace dsv3::cuda {

int64_t grouped_fp8_gemm_kernel_workspace_bytes(int64_t groups, int num_sms);
void grouped_fp8_gemm_kernel_run(const GroupedFp8GemmParams& params, void* workspace, int num_sms, cudaStream_t stream);

int64_t grouped_fp8_gemm_overlap_workspace_bytes(int64_t groups);
void grouped_fp8_gemm_overlap_run(const GroupedFp8GemmParams& params, bool cluster, void* workspace, int num_sms,
                                  cudaStream_t stream);

// the hand-written decode kernel (instantiations/fp8_gemm_decode.cu), masked layout only; needs no workspace
void grouped_fp8_gemm_decode_run(const GroupedFp8GemmParams& params, int num_sms, cudaStream_t stream);

}  // namespace dsv3::cuda
