#pragma once
// The compiled grouped FP8 GEMM (instantiations/grouped_fp8_gemm_tile128x128.cu), declared without CUTLASS.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dsv3/grouped_gemm_params.h"

namespace dsv3::cuda {

int64_t grouped_fp8_gemm_kernel_workspace_bytes(int64_t groups, int num_sms);
void grouped_fp8_gemm_kernel_run(const GroupedFp8GemmParams& params, void* workspace, int num_sms, cudaStream_t stream);

}  // namespace dsv3::cuda
