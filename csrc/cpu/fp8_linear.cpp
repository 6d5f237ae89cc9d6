// The FP8 linear layer on the CPU: the block-scaled GEMM with the activations quantized per token and 128 channels
// while the GEMM decodes them (Fp8GemmJob::x): one pass over the activations and one thread team, no codes written.

#include "cpu/cpu_ops.h"
#include "cpu/fp8_gemm_batch.h"

namespace dsv3::cpu {

void fp8_linear(const Fp8LinearParams& params) {
  validate(params);
  const Fp8GemmJob job{{nullptr, nullptr, params.b, params.b_scales, params.out, params.m, params.n, params.k},
                       nullptr,
                       params.x,
                       params.x_dtype};
  fp8_gemm_batch(&job, 1);
}

}  // namespace dsv3::cpu
