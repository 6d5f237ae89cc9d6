// FP8 block-scaled GEMM for sm_90a.

#include <stdexcept>

#include "cuda/cuda_ops.h"

namespace dsv3::cuda {

int64_t fp8_gemm_workspace_bytes(int64_t, int64_t, int64_t, int) { return 0; }

void fp8_gemm_nt(const Fp8GemmParams& params, std::uintptr_t, int, std::uintptr_t) {
  validate(params);
  throw std::runtime_error("fp8_gemm_nt: the CUDA kernel is not implemented yet");
}

}  // namespace dsv3::cuda
