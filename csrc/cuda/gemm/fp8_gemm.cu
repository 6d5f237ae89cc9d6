// FP8 block-scaled GEMM for sm_90a: picks the variant and decomposition (dsv3/gemm_schedule.h) and launches it.

#include <cuda_runtime_api.h>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/gemm/fp8_gemm_variants.h"

namespace dsv3::cuda {

int64_t fp8_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k, int num_sms) {
  if (m == 0 || n == 0 || k == 0) return 0;
  const Fp8GemmSchedule schedule = choose_fp8_gemm_schedule(m, n, k, num_sms);
  return schedule.variant == Fp8GemmVariant::kSwapAB128x64
             ? Fp8GemmKernel<Fp8GemmVariant::kSwapAB128x64>::workspace_bytes(m, n, k, schedule, num_sms)
             : Fp8GemmKernel<Fp8GemmVariant::kTile128x128>::workspace_bytes(m, n, k, schedule, num_sms);
}

void fp8_gemm_nt(const Fp8GemmParams& params, std::uintptr_t workspace, int num_sms, std::uintptr_t stream_handle) {
  validate(params);
  DSV3_CHECK(params.k % 16 == 0 && params.n % 8 == 0,
             "a/b: the CUDA kernel needs K % 16 == 0 and N % 8 == 0, got K=", params.k, " N=", params.n);
  DSV3_CHECK(params.m <= INT32_MAX && params.n <= INT32_MAX && params.k <= INT32_MAX, "a/b: dimensions beyond 2^31");
  DSV3_CHECK(num_sms > 0, "num_sms: expected a positive SM count, got ", num_sms);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (params.m == 0 || params.n == 0) return;
  if (params.k == 0) {  // empty sum
    DSV3_CUDA_CHECK(cudaMemsetAsync(params.out, 0, params.m * params.n * sizeof(uint16_t), stream));
    return;
  }
  const Fp8GemmSchedule schedule = choose_fp8_gemm_schedule(params.m, params.n, params.k, num_sms);
  DSV3_CHECK(workspace != 0 || fp8_gemm_workspace_bytes(params.m, params.n, params.k, num_sms) == 0,
             "workspace: the split-K schedule needs a workspace");
  void* workspace_ptr = reinterpret_cast<void*>(workspace);
  if (schedule.variant == Fp8GemmVariant::kSwapAB128x64) {
    Fp8GemmKernel<Fp8GemmVariant::kSwapAB128x64>::run(params, schedule, workspace_ptr, num_sms, stream);
  } else {
    Fp8GemmKernel<Fp8GemmVariant::kTile128x128>::run(params, schedule, workspace_ptr, num_sms, stream);
  }
}

}  // namespace dsv3::cuda
