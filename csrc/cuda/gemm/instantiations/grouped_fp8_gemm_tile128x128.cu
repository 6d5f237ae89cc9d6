// Grouped (MoE) FP8 GEMM: 128 x 128 tiles over every group's rows, contiguous or masked layout.

#include "cuda/gemm/grouped_fp8_gemm.h"
#include "cuda/gemm/grouped_fp8_gemm_cutlass.cuh"

namespace dsv3::cuda {

int64_t grouped_fp8_gemm_kernel_workspace_bytes(int64_t groups, int num_sms) {
  return CutlassGroupedFp8Gemm::workspace_bytes(groups, num_sms);
}

void grouped_fp8_gemm_kernel_run(const GroupedFp8GemmParams& params, void* workspace, int num_sms,
                                 cudaStream_t stream) {
  run_grouped_fp8_gemm(params, workspace, num_sms, stream);
}

}  // namespace dsv3::cuda
