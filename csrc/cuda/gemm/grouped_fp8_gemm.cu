// Grouped FP8 GEMMs of MoE layers (contiguous and masked layouts) for sm_90a.

#include <cuda_runtime_api.h>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/gemm/grouped_fp8_gemm.h"

namespace dsv3::cuda {

int64_t grouped_fp8_gemm_workspace_bytes(int64_t groups, int num_sms) {
  return grouped_fp8_gemm_kernel_workspace_bytes(groups, num_sms);
}

void grouped_fp8_gemm(const GroupedFp8GemmParams& params, std::uintptr_t workspace, int num_sms,
                      std::uintptr_t stream) {
  validate(params);
  DSV3_CHECK(params.k % 16 == 0 && params.n % 8 == 0,
             "a/b: the CUDA kernel needs K % 16 == 0 and N % 8 == 0, got K=", params.k, " N=", params.n);
  DSV3_CHECK(params.groups * params.n <= INT32_MAX && params.m <= INT32_MAX && params.k <= INT32_MAX,
             "a/b: dimensions beyond 2^31");
  DSV3_CHECK(num_sms > 0 && workspace != 0, "workspace/num_sms: missing");
  if (params.m == 0) return;
  grouped_fp8_gemm_kernel_run(params, reinterpret_cast<void*>(workspace), num_sms,
                              reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace dsv3::cuda
