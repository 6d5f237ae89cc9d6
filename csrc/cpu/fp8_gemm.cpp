// FP8 block-scaled GEMM on the CPU.

#include <stdexcept>

#include "cpu/cpu_ops.h"

namespace dsv3::cpu {

void fp8_gemm_nt(const Fp8GemmParams& params) {
  validate(params);
  throw std::runtime_error("fp8_gemm_nt: the CPU kernel is not implemented yet");
}

}  // namespace dsv3::cpu
